"""Writing small LFM2 GGUF files, for tests and for comparisons against llama.cpp (reading is
:mod:`lfm2np.io.gguf`): the metadata and tensor layout ``convert_hf_to_gguf.py`` writes, optionally with
fused q/k/v (``--fuse-qkv``) and with the tokenizer metadata the converter writes for a ``tokenizer.json``
(:func:`lfm2np.io.gguf_vocab.tokenizer_metadata`, a port of the converter's ``get_vocab_base`` and gguf-py's
``SpecialVocab``).

F32, F16, BF16, Q8_0 and Q4_0 use the ``gguf`` package's own encoders. gguf-py can only DEcode the
k-quants, so Q4_K, Q5_K and Q6_K are encoded here with a simple min/max (or absmax) scale per
sub-block and no search: the blocks are valid (llama.cpp and gguf-py decode them identically) but they
are not the values ``llama-quantize`` would choose, so errors measured on them are upper bounds.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import numpy as np

from ..config import Config
from ..errors import Lfm2npError
from .gguf import FUSED_QKV, GGUF_ARCH, gguf_layout
from .gguf_names import GgufTensor, quantisable
from .gguf_vocab import tokenizer_metadata, tokenizer_metadata_from_dir

__all__ = ["quantize", "dequantize", "to_gguf_tensors", "default_type", "write_gguf", "write_gguf_tensors",
           "tokenizer_metadata",
           "tokenizer_metadata_from_dir"]


def _import_gguf():
    try:
        import gguf  # noqa: PLC0415 (optional dependency)
    except ImportError:
        raise Lfm2npError("writing GGUF needs the gguf package: pip install 'lfm2np[gguf]'") from None
    return gguf

# ------------------------------------------------------------------------------------ encoding
QK_K = 256


def _f16(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 -> (float16 bytes (n, 2), the float16 value back as float32 (n, 1))."""
    h = x.astype(np.float16)
    return h.reshape(-1, 1).view(np.uint8), h.astype(np.float32).reshape(-1, 1)


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b == 0, 0.0, a / np.where(b == 0, 1.0, b))


def _pack_scale_min(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins per block -> the 12 packed bytes ``Q4_K.get_scale_min`` unpacks."""
    sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
    out = np.empty((sc.shape[0], 12), np.uint8)
    out[:, 0:4] = (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = (mn[:, :4] & 0x3F) | ((mn[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return out


def _quantize_asym_k(blocks: np.ndarray, bits: int) -> tuple[np.ndarray, ...]:
    """Q4_K / Q5_K: per 32-element sub-block ``x ~ d*sc*q - dmin*m`` with 6-bit sc, m and ``bits``-bit q."""
    n = blocks.shape[0]
    qmax = (1 << bits) - 1
    sub = blocks.reshape(n, 8, 32)
    lo = np.minimum(sub.min(axis=2), 0.0)
    scale_f = (sub.max(axis=2) - lo) / qmax  # (n, 8)
    min_f = -lo
    d_bytes, d = _f16(scale_f.max(axis=1) / 63)
    dmin_bytes, dmin = _f16(min_f.max(axis=1) / 63)
    # rounding the 6-bit scale and min UP keeps the sub-block's extremes inside the grid (no clipping)
    sc = np.clip(np.ceil(_safe_div(scale_f, d)), 0, 63)
    mn = np.clip(np.ceil(_safe_div(min_f, dmin)), 0, 63)
    step = (d * sc)[:, :, None]
    q = np.clip(np.rint(_safe_div(sub + (dmin * mn)[:, :, None], step)), 0, qmax).astype(np.uint8)
    return d_bytes, dmin_bytes, _pack_scale_min(sc, mn), q


def _quantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    d, dmin, scales, q = _quantize_asym_k(blocks, 4)
    n = blocks.shape[0]
    pairs = q.reshape(n, 4, 2, 32)  # sub-blocks 2g (low nibble) and 2g+1 (high nibble) share 32 bytes
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(n, 128)
    return np.concatenate([d, dmin, scales, qs], axis=1)


def _quantize_q5_k(blocks: np.ndarray) -> np.ndarray:
    d, dmin, scales, q = _quantize_asym_k(blocks, 5)
    n = blocks.shape[0]
    low = q & 0x0F
    pairs = low.reshape(n, 4, 2, 32)
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(n, 128)
    high = (q >> 4) & 1  # (n, 8, 32): bit j of qh[i] is sub-block j's fifth bit
    qh = np.zeros((n, 32), np.uint8)
    for j in range(8):
        qh |= high[:, j] << j
    return np.concatenate([d, dmin, scales, qh, qs], axis=1)


def _quantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    """Q6_K: per 16-element sub-block ``x ~ d*sc*(q-32)``, sc an int8, q 6 bits."""
    n = blocks.shape[0]
    sub = blocks.reshape(n, 16, 16)
    scale_f = np.abs(sub).max(axis=2) / 31  # (n, 16)
    d_bytes, d = _f16(scale_f.max(axis=1) / 127)
    sc = np.clip(np.ceil(_safe_div(scale_f, d)), 0, 127)
    q = (np.clip(np.rint(_safe_div(sub, (d * sc)[:, :, None])), -32, 31) + 32).astype(np.uint8).reshape(n, 256)
    # element e = h*128 + r: low nibble in ql[h*64 + r%64] (nibble r//64), high 2 bits in qh[h*32 + r%32] (shift 2*(r//32))
    halves = q.reshape(n, 2, 128)
    low, high = halves & 0x0F, halves >> 4
    ql = (low[:, :, :64] | (low[:, :, 64:] << 4)).reshape(n, 128)
    hq = high.reshape(n, 2, 4, 32)
    qh = (hq[:, :, 0] | (hq[:, :, 1] << 2) | (hq[:, :, 2] << 4) | (hq[:, :, 3] << 6)).reshape(n, 64)
    return np.concatenate([ql, qh, sc.astype(np.int8).view(np.uint8), d_bytes], axis=1)


#: K-quant encoders lfm2np supplies because gguf-py (0.19) only dequantises these types.
_K_ENCODERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "Q4_K": _quantize_q4_k, "Q5_K": _quantize_q5_k, "Q6_K": _quantize_q6_k,
}


def quantize(values: np.ndarray, type_name: str) -> np.ndarray:
    """``values`` (float, last axis = rows) encoded as ggml type ``type_name``: uint8 bytes of shape
    ``(..., row bytes)`` for block types, float arrays for F32/F16.

    F32, F16, BF16, Q8_0, Q4_0 (and the other 32-element types) use gguf-py's encoders, which match
    ggml's reference quantisers bit for bit. Q4_K, Q5_K and Q6_K use lfm2np's own simple encoders (min/max
    scales, no search): valid blocks that llama.cpp and gguf-py decode, but not the values llama-quantize
    would choose. Rows must be a multiple of the block size (32, or 256 for K-quants).
    """
    gguf = _import_gguf()
    arr = np.ascontiguousarray(values, dtype=np.float32)
    qtype = gguf.GGMLQuantizationType[type_name]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    if arr.shape[-1] % block:
        raise Lfm2npError(f"cannot store a row of {arr.shape[-1]} values as {type_name} (blocks of {block})")
    if type_name in _K_ENCODERS:
        rows = arr.reshape(-1, block)
        out = _K_ENCODERS[type_name](rows)
        assert out.shape[1] == size, (type_name, out.shape)
        return out.reshape(*arr.shape[:-1], arr.shape[-1] // block * size)
    return gguf.quants.quantize(arr, qtype)


def dequantize(data: np.ndarray, type_name: str) -> np.ndarray:
    """gguf-py's dequantisation of ``data`` stored as ``type_name`` (float32)."""
    gguf = _import_gguf()
    return np.asarray(gguf.quants.dequantize(data, gguf.GGMLQuantizationType[type_name]), dtype=np.float32)


def to_gguf_tensors(config: Config, params: Mapping[str, np.ndarray], fuse_qkv: bool = False) -> dict[str, np.ndarray]:
    """Hugging Face tensors -> GGUF tensors (numpy order, float32) as ``convert_hf_to_gguf.py`` lays them out:
    conv kernels squeezed to (D, L), experts stacked to (E, out, in), ``lm_head`` only when untied, and with
    ``fuse_qkv`` each attention layer's q, k, v concatenated along the output axis (``--fuse-qkv``)."""
    out: dict[str, np.ndarray] = {}
    for g in gguf_layout(config, fuse_qkv):
        arrays = [np.asarray(params[t.name], dtype=np.float32) for t in g.holds]  # E of them when stacked
        if g.holds[0].part == "expert":
            out[g.name] = np.stack(arrays).reshape(g.shape)
        elif g.name.endswith(FUSED_QKV):
            out[g.name] = np.concatenate(arrays, axis=0)  # rows q, then k, then v (torch.cat(..., dim=0))
        else:
            out[g.name] = arrays[0].reshape(g.shape)
    return out


def default_type(gguf_name: str, ne: tuple[int, ...], type_name: str) -> str:
    """The type a tensor gets in a file of mostly ``type_name``: as ``convert_hf_to_gguf.py`` and
    llama-quantize do, 1-D tensors, norms, the router and the conv kernel stay F32; a row length that is not a
    multiple of the type's block falls back to F16 (llama.cpp would try another quant first)."""
    if type_name == "F32" or not quantisable(GgufTensor(gguf_name, ne, None)):
        return "F32"
    gguf = _import_gguf()
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]][0]
    return type_name if ne[0] % block == 0 else "F16"


def _add_tokenizer(w: Any, meta: Mapping[str, Any]) -> None:
    """Write tokenizer metadata (:func:`tokenizer_metadata`) with the GGUF types gguf-py's setters use."""
    gguf = _import_gguf()
    setters = {"tokenizer.ggml.model": w.add_tokenizer_model, "tokenizer.ggml.pre": w.add_tokenizer_pre,
               "tokenizer.ggml.tokens": w.add_token_list, "tokenizer.ggml.token_type": w.add_token_types,
               "tokenizer.ggml.merges": w.add_token_merges, "tokenizer.ggml.bos_token_id": w.add_bos_token_id,
               "tokenizer.ggml.eos_token_id": w.add_eos_token_id,
               "tokenizer.ggml.padding_token_id": w.add_pad_token_id,
               "tokenizer.ggml.add_bos_token": w.add_add_bos_token,
               "tokenizer.ggml.add_eos_token": w.add_add_eos_token, "tokenizer.ggml.add_sep_token": w.add_add_sep_token,
               "tokenizer.chat_template": w.add_chat_template}
    for key, value in meta.items():
        setter = setters.get(key)
        if setter is None:
            raise Lfm2npError(f"tokenizer metadata key {key!r} is not one the converter writes")
        if key == "tokenizer.ggml.token_type":
            value = [gguf.TokenType(int(v)) for v in value]
        setter(value)


def _add_metadata(w: Any, extra: Mapping[str, Any]) -> None:
    """Extra keys (``{key: value}``, value a bool, int (UINT32; negative: INT32), float (FLOAT32), str or a
    list of one kind) written as given: for files that exercise a reader."""
    for key, value in extra.items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            (w.add_uint32 if value >= 0 else w.add_int32)(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, (list, tuple)):
            w.add_array(key, list(value))
        else:
            raise Lfm2npError(f"metadata {key!r}: cannot write a {type(value).__name__}")


def write_gguf(path: "str | os.PathLike[str]", config: Config, params: Mapping[str, np.ndarray],
               tensor_type: "str | Mapping[str, str] | Callable[[str, tuple[int, ...]], str]" = "F32",
               *, name: str = "lfm2np", vocab: bool = True,
               tokenizer: "str | os.PathLike[str] | Mapping[str, Any] | None" = None, fuse_qkv: bool = False,
               metadata: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Write ``params`` (Hugging Face names) as an LFM2 GGUF file with the metadata ``convert_hf_to_gguf.py``
    writes. ``tensor_type``: one ggml type name for every quantisable tensor (see :func:`default_type`), a
    ``{gguf_name: type}`` mapping, or a function ``(gguf_name, ne) -> type``.

    ``tokenizer``: a checkpoint directory (its tokenizer.json, tokenizer_config.json, chat_template.jinja,
    converted as the converter does: :func:`tokenizer_metadata_from_dir`) or ready ``tokenizer.*`` metadata.
    Without one, ``vocab`` writes a placeholder vocabulary of ``vocab_size`` tokens (llama.cpp refuses a file
    without one). ``fuse_qkv`` stores each attention layer's q/k/v as one ``attn_qkv`` (``--fuse-qkv``).
    ``metadata`` adds or overrides keys (written after the converter's, so an override replaces them).
    Returns ``{gguf_name: type}`` as written."""
    tensors = to_gguf_tensors(config, params, fuse_qkv)
    return write_gguf_tensors(path, config, lambda gname, kind: quantize(tensors[gname], kind), tensor_type,
                              name=name, vocab=vocab, tokenizer=tokenizer, fuse_qkv=fuse_qkv, metadata=metadata)


def write_gguf_tensors(path: "str | os.PathLike[str]", config: Config, produce: Callable[[str, str], np.ndarray],
                       tensor_type: "str | Mapping[str, str] | Callable[[str, tuple[int, ...]], str]" = "F32",
                       *, name: str = "lfm2np", vocab: bool = True,
                       tokenizer: "str | os.PathLike[str] | Mapping[str, Any] | None" = None, fuse_qkv: bool = False,
                       metadata: Mapping[str, Any] | None = None) -> dict[str, str]:
    """:func:`write_gguf` with each tensor's stored data made when it is written: ``produce(gguf_name, type)``
    returns what :func:`quantize` would (uint8 blocks ``(..., row bytes)`` or F32/F16 values, in the numpy
    order of the GGUF tensor), one tensor at a time, so a file larger than memory can be written (the
    real-scale benchmarks' random blocks). Same arguments otherwise; returns ``{gguf_name: type}``."""
    gguf = _import_gguf()
    w = _writer(gguf, path, config, name, vocab, tokenizer, dict(metadata or {}))
    types: dict[str, str] = {}
    for g in gguf_layout(config, fuse_qkv):  # llama.cpp's order (by layer, then name)
        if callable(tensor_type):
            kind = tensor_type(g.name, g.ne)
        elif isinstance(tensor_type, Mapping):
            kind = tensor_type.get(g.name) or default_type(g.name, g.ne, "F32")
        else:
            kind = default_type(g.name, g.ne, tensor_type)
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
        nbytes = int(np.prod(g.ne)) // block * size
        w.add_tensor_info(g.name, tuple(reversed(g.ne)), np.dtype(np.float32), nbytes,
                          raw_dtype=gguf.GGMLQuantizationType[kind])
        types[g.name] = kind
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for gname, kind in types.items():
        data = np.ascontiguousarray(produce(gname, kind))
        if data.nbytes != w.tensors[0][gname].nbytes:
            raise Lfm2npError(f"{path}: tensor {gname!r}: {data.nbytes} bytes given; {kind} of ggml shape "
                              f"{list(w.tensors[0][gname].shape)[::-1]} takes {w.tensors[0][gname].nbytes}")
        w.write_tensor_data(data)
    w.close()
    return types


def _writer(gguf: Any, path: "str | os.PathLike[str]", c: Config, name: str, vocab: bool,
            tokenizer: "str | os.PathLike[str] | Mapping[str, Any] | None", extra: dict[str, Any]) -> Any:
    """A ``GGUFWriter`` holding the metadata ``convert_hf_to_gguf.py`` writes (:func:`write_gguf`'s arguments)."""
    arch = GGUF_ARCH[c.model_type]
    w = gguf.GGUFWriter(str(path), arch)

    def put(key: str, write: Callable[[], None]) -> None:
        if key not in extra:  # an override replaces the converter's value
            write()

    put("general.name", lambda: w.add_name(name))
    put(f"{arch}.context_length", lambda: w.add_context_length(c.max_position_embeddings))
    put(f"{arch}.embedding_length", lambda: w.add_embedding_length(c.hidden_size))
    put(f"{arch}.block_count", lambda: w.add_block_count(c.num_hidden_layers))
    put(f"{arch}.attention.head_count", lambda: w.add_head_count(c.num_attention_heads))
    put(f"{arch}.attention.head_count_kv", lambda: w.add_head_count_kv(
        [c.num_key_value_heads if c.is_attention(i) else 0 for i in range(c.num_hidden_layers)]))
    put(f"{arch}.rope.freq_base", lambda: w.add_rope_freq_base(float(c.rope_theta)))
    put(f"{arch}.attention.layer_norm_rms_epsilon", lambda: w.add_layer_norm_rms_eps(float(c.norm_eps)))
    put(f"{arch}.vocab_size", lambda: w.add_vocab_size(c.vocab_size))
    # raw keys: older gguf-py lacks these setters
    put(f"{arch}.shortconv.l_cache", lambda: w.add_uint32(f"{arch}.shortconv.l_cache", c.conv_L_cache))
    if c.explicit_head_dim is not None:
        put(f"{arch}.attention.key_length", lambda: w.add_key_length(c.head_dim))
        put(f"{arch}.attention.value_length", lambda: w.add_value_length(c.head_dim))
    if c.is_moe:
        put(f"{arch}.feed_forward_length", lambda: w.add_feed_forward_length(c.intermediate_size))
        put(f"{arch}.expert_count", lambda: w.add_expert_count(c.num_experts))
        put(f"{arch}.expert_used_count", lambda: w.add_expert_used_count(c.num_experts_per_tok))
        put(f"{arch}.expert_feed_forward_length",
            lambda: w.add_expert_feed_forward_length(c.moe_intermediate_size))
        put(f"{arch}.leading_dense_block_count", lambda: w.add_leading_dense_block_count(c.num_dense_layers))
        put(f"{arch}.expert_gating_func", lambda: w.add_uint32(f"{arch}.expert_gating_func", 2))  # SIGMOID
        if not c.norm_topk_prob:
            put(f"{arch}.expert_weights_norm", lambda: w.add_bool(f"{arch}.expert_weights_norm", False))
        if c.routed_scaling_factor != 1.0:
            put(f"{arch}.expert_weights_scale", lambda: w.add_expert_weights_scale(float(c.routed_scaling_factor)))
    else:
        put(f"{arch}.feed_forward_length", lambda: w.add_feed_forward_length(c.ffn_dim))
    if not c.causal:  # the converter's Lfm2BidirectionalModel; then the sentence-transformers head
        put(f"{arch}.attention.causal", lambda: w.add_causal_attention(False))
    if c.pooling is not None:
        put(f"{arch}.pooling_type", lambda: w.add_pooling_type(
            gguf.PoolingType[{"cls": "CLS", "mean": "MEAN", "last": "LAST"}[c.pooling]]))
    if c.dense_out:
        put(f"{arch}.embedding_length_out", lambda: w.add_embedding_length_out(c.dense_out))
    if tokenizer is not None:
        meta = dict(tokenizer) if isinstance(tokenizer, Mapping) else tokenizer_metadata_from_dir(
            tokenizer, c.vocab_size, {"bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id[0],
                                      "pad_token_id": c.pad_token_id})
        _add_tokenizer(w, {k: v for k, v in meta.items() if k not in extra})
    elif vocab:
        # a placeholder vocabulary: llama.cpp needs one to load a model; ids are all the comparison uses
        tokens = [f"<tok{i}>" for i in range(c.vocab_size)]
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores([0.0] * c.vocab_size)
        w.add_token_types([gguf.TokenType.NORMAL] * c.vocab_size)
        for setter, value in ((w.add_bos_token_id, c.bos_token_id), (w.add_eos_token_id, c.eos_token_id[0]),
                              (w.add_pad_token_id, c.pad_token_id)):
            if value is not None and 0 <= value < c.vocab_size:
                setter(value)
        w.add_add_bos_token(False)
    _add_metadata(w, {k: v for k, v in extra.items() if k != "general.architecture"})
    return w
