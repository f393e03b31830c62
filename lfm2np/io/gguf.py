"""GGUF files: read an LFM2 / LFM2-MoE GGUF (``lfm2``, ``lfm2moe``) into the same Model a checkpoint gives,
(writing small ones for tests and llama.cpp comparisons is :mod:`lfm2np.gguf_write`).

Reading goes through the ``gguf`` package (llama.cpp's own ``gguf-py``, an optional dependency:
``pip install 'lfm2np[gguf]'``): its :class:`gguf.GGUFReader` memory-maps the file and
``gguf.quants.dequantize`` turns every tensor type into float32, so lfm2np runs on exactly the values
llama.cpp's dequantisation gives. Then:

1. the hyperparameters under ``{arch}.*`` become a Hugging Face ``config.json`` dictionary
   (:func:`config_dict_from_metadata`) and a :class:`~lfm2np.config.Config`;
2. every GGUF tensor is checked against the names and ggml shapes the config implies
   (:func:`lfm2np.quant.gguf_tensors`, the same list the size calculator uses);
3. GGUF names are mapped back to Hugging Face names (:data:`HF_TO_GGUF`): the conv kernel ``[L, D]`` (ggml
   order) becomes ``[D, 1, L]``, stacked experts ``ffn_{gate,up,down}_exps`` become per-expert ``w1/w3/w2``;
4. the result is checked against :func:`lfm2np.weights.expected_tensors`.

Tensors are dequantised lazily, one at a time (an expert's slice of a stacked tensor alone), so a large
quantised file is never expanded whole. ``convert_hf_to_gguf.py`` writes LFM2's q/k projections as they are
(no llama-style row permutation; llama.cpp applies NeoX RoPE, as transformers does), so no permutation is undone.

ggml dimensions are numpy's in reverse: ``ne = [D, F]`` is a numpy array of shape ``(F, D)``, which is the
Hugging Face ``(out, in)`` layout of a linear weight. Only the conv kernel and stacked experts change shape.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from . import quant
from .config import ATTENTION, CONV, Config
from .errors import Lfm2npError
from .model import LazyParams
from .weights import expected_tensors

ARCHITECTURES = {"lfm2": "lfm2", "lfm2moe": "lfm2_moe"}  # GGUF general.architecture -> HF model_type
GGUF_ARCH = {v: k for k, v in ARCHITECTURES.items()}
_INSTALL_HINT = "pip install 'lfm2np[gguf]'"

#: Hugging Face name -> GGUF name, outside the layers.
GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.embedding_norm.weight": "token_embd_norm.weight",  # the FINAL norm (llama.cpp LLM_TENSOR_OUTPUT_NORM_LFM2)
    "lm_head.weight": "output.weight",  # only when the head is not tied
}
#: Suffix after ``model.layers.{i}.`` -> suffix after ``blk.{i}.``.
LAYER_NAMES = {
    "operator_norm.weight": "attn_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.out_proj.weight": "attn_output.weight",
    "self_attn.q_layernorm.weight": "attn_q_norm.weight",
    "self_attn.k_layernorm.weight": "attn_k_norm.weight",
    "conv.in_proj.weight": "shortconv.in_proj.weight",
    "conv.in_proj.bias": "shortconv.in_proj.bias",
    "conv.conv.weight": "shortconv.conv.weight",  # HF (D, 1, L) -> ggml [L, D], i.e. numpy (D, L)
    "conv.conv.bias": "shortconv.conv.bias",
    "conv.out_proj.weight": "shortconv.out_proj.weight",
    "conv.out_proj.bias": "shortconv.out_proj.bias",
    "feed_forward.w1.weight": "ffn_gate.weight",
    "feed_forward.w3.weight": "ffn_up.weight",
    "feed_forward.w2.weight": "ffn_down.weight",
    "feed_forward.gate.weight": "ffn_gate_inp.weight",  # the router
    "feed_forward.expert_bias": "exp_probs_b.bias",
}
#: Per-expert ``feed_forward.experts.{e}.{w}.weight`` -> stacked GGUF tensor (expert e is numpy index e).
EXPERT_NAMES = {"w1": "ffn_gate_exps.weight", "w3": "ffn_up_exps.weight", "w2": "ffn_down_exps.weight"}

_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")
_EXPERT_RE = re.compile(r"feed_forward\.experts\.(\d+)\.(w[123])\.weight")


def gguf_name(hf_name: str) -> tuple[str, int | None]:
    """The GGUF tensor holding Hugging Face tensor ``hf_name``, and the expert index within it (or None)."""
    if hf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[hf_name], None
    m = _LAYER_RE.fullmatch(hf_name)
    if m:
        layer, rest = int(m.group(1)), m.group(2)
        e = _EXPERT_RE.fullmatch(rest)
        if e:
            return f"blk.{layer}.{EXPERT_NAMES[e.group(2)]}", int(e.group(1))
        if rest in LAYER_NAMES:
            return f"blk.{layer}.{LAYER_NAMES[rest]}", None
    raise Lfm2npError(f"tensor {hf_name!r} has no GGUF name in the lfm2/lfm2moe mapping")


def _import_gguf() -> Any:
    try:
        import gguf  # noqa: PLC0415 (optional dependency)
    except ImportError:
        raise Lfm2npError(f"reading GGUF needs the gguf package: {_INSTALL_HINT}") from None
    return gguf


# ----------------------------------------------------------------------------------- metadata
def _field_value(field: Any) -> Any:
    """A GGUF key's value as a Python scalar, string or list (works on every gguf-py >= 0.10)."""
    gguf = _import_gguf()
    types = list(field.types)
    if not types:
        return None

    def one(part: np.ndarray, kind: Any) -> Any:
        if kind == gguf.GGUFValueType.STRING:
            return bytes(part).decode("utf-8", errors="replace")
        return part.tolist()[0]

    if types[0] == gguf.GGUFValueType.ARRAY:
        return [one(field.parts[i], types[-1]) for i in field.data]
    return one(field.parts[field.data[0]], types[0])


def read_metadata(reader: Any) -> dict[str, Any]:
    """Every key/value of a GGUF file except the (large) tokenizer arrays, which are replaced by their length."""
    out: dict[str, Any] = {}
    gguf = _import_gguf()
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or not field.types:
            continue
        if key.startswith("tokenizer.ggml.") and field.types[0] == gguf.GGUFValueType.ARRAY:
            out[key] = ("array", len(field.data))
            continue
        out[key] = _field_value(field)
    return out


def _f32_decimal(value: Any) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-5 stays 1e-5, not
    9.99999974e-06): GGUF stores floats in 32 bits, config.json in decimal."""
    return float(str(np.float32(value)))


def config_dict_from_metadata(meta: Mapping[str, Any], tensors: Mapping[str, tuple[int, ...]],
                              source: str = "GGUF") -> dict[str, Any]:
    """A Hugging Face ``config.json`` dictionary from GGUF metadata (see :func:`read_metadata`) and the ggml
    shapes of the file's tensors (``{gguf_name: ne}``), which decide the switches llama.cpp has no key for:
    an untied head (``output.weight``), the expert bias (``exp_probs_b.bias``) and conv biases."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise Lfm2npError(f"{source}: general.architecture is {arch!r}; lfm2np reads {', '.join(ARCHITECTURES)}")
    model_type = ARCHITECTURES[arch]

    def key(name: str, required: bool = True, default: Any = None) -> Any:
        full = f"{arch}.{name}"
        if full in meta:
            return meta[full]
        if required:
            raise Lfm2npError(f"{source}: metadata key {full!r} is missing")
        return default

    n_layers = int(key("block_count"))
    kv = key("attention.head_count_kv")
    kv_list = [int(x) for x in kv] if isinstance(kv, list) else [int(kv)] * n_layers
    if len(kv_list) != n_layers:
        raise Lfm2npError(f"{source}: {arch}.attention.head_count_kv has {len(kv_list)} entries; "
                          f"expected block_count = {n_layers}")
    layer_types = [CONV if g == 0 else ATTENTION for g in kv_list]
    groups = sorted({g for g in kv_list if g})
    if len(groups) > 1:
        raise Lfm2npError(f"{source}: attention layers have different KV head counts {groups}; lfm2np expects one")
    heads = key("attention.head_count")
    if isinstance(heads, list):
        if len(set(heads)) != 1:
            raise Lfm2npError(f"{source}: {arch}.attention.head_count varies per layer ({heads}); expected one value")
        heads = heads[0]
    D = int(key("embedding_length"))

    # vocabulary: {arch}.vocab_size, else the token list, else the embedding's rows
    vocab = key("vocab_size", required=False)
    if vocab is None and isinstance(meta.get("tokenizer.ggml.tokens"), tuple):
        vocab = meta["tokenizer.ggml.tokens"][1]
    if vocab is None and "token_embd.weight" in tensors:
        vocab = tensors["token_embd.weight"][1]
    if vocab is None:
        raise Lfm2npError(f"{source}: cannot tell the vocabulary size (no {arch}.vocab_size, token list or embedding)")

    # FFN width: one value, or one per layer (then every dense layer must agree)
    ff = key("feed_forward_length", required=model_type == "lfm2")
    n_dense = int(key("leading_dense_block_count", required=False, default=0)) if model_type == "lfm2_moe" else n_layers
    if isinstance(ff, list):
        widths = sorted({int(ff[i]) for i in range(min(n_dense, len(ff))) if ff[i]})
        if len(widths) > 1:
            raise Lfm2npError(f"{source}: {arch}.feed_forward_length differs between dense layers ({widths})")
        ff = widths[0] if widths else None
    d: dict[str, Any] = {
        "model_type": model_type,
        "vocab_size": int(vocab),
        "hidden_size": D,
        "num_hidden_layers": n_layers,
        "num_attention_heads": int(heads),
        "num_key_value_heads": groups[0] if groups else int(heads),
        "layer_types": layer_types,
        "norm_eps": _f32_decimal(key("attention.layer_norm_rms_epsilon")),
        "conv_L_cache": int(key("shortconv.l_cache")),
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    theta = key("rope.freq_base", required=False)
    if theta is not None:
        d["rope_theta"] = _f32_decimal(theta)
    scaling = key("rope.scaling.type", required=False)
    if scaling not in (None, "none"):
        raise Lfm2npError(f"{source}: {arch}.rope.scaling.type is {scaling!r}; only plain RoPE is implemented")
    ctx = key("context_length", required=False)
    if ctx is not None:
        d["max_position_embeddings"] = int(ctx)
    head_dim = key("attention.key_length", required=False)
    if head_dim is not None and int(head_dim) * int(heads) != D:
        d["head_dim"] = int(head_dim)
    conv_layer = next((i for i, t in enumerate(layer_types) if t == CONV), None)
    d["conv_bias"] = conv_layer is not None and f"blk.{conv_layer}.shortconv.in_proj.bias" in tensors

    if model_type == "lfm2":
        if ff is None:
            raise Lfm2npError(f"{source}: {arch}.feed_forward_length is missing")
        # llama.cpp stores the effective width: no further adjustment
        d.update(intermediate_size=int(ff), block_auto_adjust_ff_dim=False)
    else:
        n_experts = int(key("expert_count"))
        moe_layer = next((i for i in range(n_dense, n_layers)), None)
        gating = key("expert_gating_func", required=False, default=2)
        if int(gating) != 2:  # gguf.ExpertGatingFuncType.SIGMOID
            raise Lfm2npError(f"{source}: {arch}.expert_gating_func is {gating}; LFM2-MoE routes with sigmoid (2)")
        d.update(
            num_experts=n_experts,
            num_experts_per_tok=int(key("expert_used_count")),
            moe_intermediate_size=int(key("expert_feed_forward_length")),
            num_dense_layers=n_dense,
            # llama.cpp's LFM2-MoE graph always renormalises the top-k weights and never scales them
            # (build_moe_ffn(..., norm_w=true, scale_w=false)); convert_hf_to_gguf.py writes neither key.
            norm_topk_prob=bool(key("expert_weights_norm", required=False, default=True)),
            routed_scaling_factor=_f32_decimal(key("expert_weights_scale", required=False, default=1.0) or 1.0),
            use_expert_bias=moe_layer is not None and f"blk.{moe_layer}.exp_probs_b.bias" in tensors,
            # the dense layers' width; a file with no dense layer may omit it
            intermediate_size=int(ff) if ff else int(key("expert_feed_forward_length")),
        )
    for name, hf in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                     ("padding_token_id", "pad_token_id")):
        value = meta.get(f"tokenizer.ggml.{name}")
        if value is not None:
            d[hf] = int(value)
    return d


# ------------------------------------------------------------------------------------ reading
class GgufParams(LazyParams):
    """The model's tensors by Hugging Face name, dequantised from a GGUF file on first use.

    ``keep=True`` keeps each tensor once dequantised; ``keep=False`` dequantises it again at every use
    (memory stays near the file's size). A stacked expert tensor is dequantised one expert at a time.
    """

    def __init__(self, reader: Any, path: Path, sources: dict[str, tuple[Any, int | None, tuple[int, ...]]],
                 dtype: np.dtype, keep: bool):
        super().__init__(list(sources), keep)
        self.reader, self.path, self.dtype = reader, path, np.dtype(dtype)
        self._sources = sources  # HF name -> (ReaderTensor, expert index or None, HF shape)

    def _load(self, name: str) -> np.ndarray:
        from gguf.quants import dequantize  # noqa: PLC0415

        tensor, expert, shape = self._sources[name]
        data = tensor.data if expert is None else tensor.data[expert]
        try:
            values = dequantize(data, tensor.tensor_type)
        except NotImplementedError:
            raise Lfm2npError(f"{self.path}: tensor {tensor.name!r} has type {tensor.tensor_type.name}, which this "
                              f"version of gguf cannot dequantise") from None
        return np.asarray(values, dtype=np.float32).reshape(shape).astype(self.dtype, copy=False)

    def stored_type(self, name: str) -> str:
        """The ggml type of the GGUF tensor that holds ``name`` (``Q4_K``, ``F32``...)."""
        return self._sources[name][0].tensor_type.name


def _open(path: "str | os.PathLike[str]") -> tuple[Any, Path]:
    gguf = _import_gguf()
    path = Path(path)
    if not path.is_file():
        raise Lfm2npError(f"{path}: no such GGUF file")
    try:
        reader = gguf.GGUFReader(path, "r")
    except (ValueError, OSError, KeyError, IndexError) as e:
        raise Lfm2npError(f"{path}: not a readable GGUF file ({e})") from None
    return reader, path


def read_gguf(path: "str | os.PathLike[str]", dtype: Any = "float32", *, strict: bool = True,
              keep_weights: bool = True) -> tuple[Config, GgufParams]:
    """The config and the tensors (by Hugging Face name, a lazy :class:`GgufParams`) of an LFM2 GGUF file.

    Raises :class:`Lfm2npError` naming the file and tensor when a tensor the config needs is missing or
    has another shape. A tensor the model does not use raises (``strict=True``) or warns.
    """
    from .model import resolve_dtype  # noqa: PLC0415 (model imports nothing from here)

    dt = resolve_dtype(dtype)
    reader, path = _open(path)
    split = reader.fields.get("split.count")
    if split is not None and int(_field_value(split)) > 1:
        raise Lfm2npError(f"{path}: a split GGUF ({_field_value(split)} parts); merge it first with llama-gguf-split --merge")
    meta = read_metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    ne = {name: tuple(int(x) for x in t.shape) for name, t in tensors.items()}
    config = Config.from_dict(config_dict_from_metadata(meta, ne, str(path)), source=str(path))

    # 1. GGUF names and ggml shapes, as the size calculator lists them
    wanted = {t.name: t.ne for t in quant.gguf_tensors(config)}
    missing = [n for n in wanted if n not in tensors]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise Lfm2npError(f"{path}: missing tensor {', '.join(missing[:3])}{more} "
                          f"(the metadata describes {config.model_type} with {config.num_hidden_layers} layers)")
    for name, shape in wanted.items():
        if ne[name] != shape:
            raise Lfm2npError(f"{path}: tensor {name!r} has ggml shape {list(ne[name])}; "
                              f"the metadata implies {list(shape)}")
    unexpected = [n for n in tensors if n not in wanted]
    if unexpected:
        message = f"{path}: tensor {', '.join(unexpected[:5])} is not used by lfm2np's {config.model_type} model"
        if strict:
            raise Lfm2npError(message + "; pass strict=False to load anyway")
        warnings.warn(message + "; ignored", stacklevel=2)

    # 2. Hugging Face names, with their shapes checked against the reference list
    sources: dict[str, tuple[Any, int | None, tuple[int, ...]]] = {}
    for hf, shape in expected_tensors(config).items():
        gname, expert = gguf_name(hf)
        t = tensors[gname]
        held = tuple(reversed(ne[gname]))  # numpy order
        if expert is not None:
            held = held[1:]
        if int(np.prod(held)) != int(np.prod(shape)) or (len(shape) != 3 and held != shape):
            raise Lfm2npError(f"{path}: tensor {gname!r} holds {list(held)} for {hf!r}; expected {list(shape)}")
        sources[hf] = (t, expert, shape)
    return config, GgufParams(reader, path, sources, dt, keep_weights)


def load_gguf(path: "str | os.PathLike[str]", dtype: Any = "float32", *, strict: bool = True,
              keep_weights: bool | None = None) -> "Any":
    """A :class:`~lfm2np.model.Model` from a GGUF file: ``lfm2np.load("model.gguf")`` calls this.

    ``keep_weights=None`` keeps dequantised tensors when the model in the compute dtype takes at most half of
    the machine's memory, as :func:`lfm2np.load` does for checkpoints.
    """
    from .model import Model, default_keep_weights

    config, params = read_gguf(path, dtype, strict=strict, keep_weights=False)
    params.keep = default_keep_weights(config, params.dtype) if keep_weights is None else bool(keep_weights)
    return Model(config, params, dtype)


# -------------------------------------------------------------------------------- calculators
def gguf_tensor_types(path: "str | os.PathLike[str]") -> dict[str, str]:
    """``{gguf_name: ggml type name}`` of every tensor in a GGUF file (the types llama-quantize chose)."""
    reader, _ = _open(path)
    return {t.name: t.tensor_type.name for t in reader.tensors}


def gguf_tensor_bytes(path: "str | os.PathLike[str]") -> int:
    """Bytes of tensor data in a GGUF file (no padding, no header): what :func:`lfm2np.calc.weight_bytes`
    computes for a file type, here read from a real file."""
    reader, _ = _open(path)
    return sum(int(t.n_bytes) for t in reader.tensors)


def gguf_type_summary(path: "str | os.PathLike[str]") -> dict[str, dict[str, int]]:
    """Per ggml type: how many tensors, elements and bytes a GGUF file holds (same shape as
    :func:`lfm2np.quant.type_summary`, which predicts it for a file type)."""
    reader, _ = _open(path)
    out: dict[str, dict[str, int]] = {}
    for t in reader.tensors:
        s = out.setdefault(t.tensor_type.name, {"tensors": 0, "elements": 0, "bytes": 0})
        s["tensors"] += 1
        s["elements"] += int(t.n_elements)
        s["bytes"] += int(t.n_bytes)
    return out
