"""GGUF files: read an LFM2 / LFM2-MoE GGUF (``lfm2``, ``lfm2moe``) into the same Model a checkpoint gives
(writing small ones for tests and llama.cpp comparisons is :mod:`lfm2np.io.gguf_write`).

The file is parsed by :mod:`lfm2np.io.gguf_file`, which checks every count, length and offset against the
file before it allocates or reads; tensors are dequantised with the ``gguf`` package (llama.cpp's own
``gguf-py``, an optional dependency: ``pip install 'lfm2np[gguf]'``), so lfm2np runs on exactly the values
llama.cpp's dequantisation gives. Then:

1. the hyperparameters under ``{arch}.*`` become a Hugging Face ``config.json`` dictionary
   (:func:`config_dict_from_metadata`) and a :class:`~lfm2np.config.Config`;
2. every GGUF tensor is checked against the names and ggml shapes the config implies
   (:func:`lfm2np.io.gguf_names.gguf_tensors`, derived from the one tensor layout, which the size
   calculator uses too);
3. the model reads its tensors by Hugging Face name: the conv kernel ``[L, D]`` (ggml order) becomes
   ``[D, 1, L]``, stacked experts ``ffn_{gate,up,down}_exps`` give per-expert ``w1/w3/w2``.

Tensors are dequantised lazily, one at a time (an expert's slice of a stacked tensor alone, an embedding's
looked-up rows alone), so a large quantised file is never expanded whole. ``convert_hf_to_gguf.py`` writes
LFM2's q/k projections as they are (no llama-style row permutation; llama.cpp applies NeoX RoPE, as
transformers does), so no permutation is undone.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..config import ATTENTION, CONV, Config
from ..errors import Lfm2npError
from ..numerics import Numerics, numerics
from ..tensors import layout
from .gguf_file import GgufFile
from .gguf_names import gguf_name, gguf_tensors
from .params import LazyParams, default_keep

ARCHITECTURES = {"lfm2": "lfm2", "lfm2moe": "lfm2_moe"}  # GGUF general.architecture -> HF model_type
GGUF_ARCH = {v: k for k, v in ARCHITECTURES.items()}


# ----------------------------------------------------------------------------------- metadata
def read_metadata(f: GgufFile) -> dict[str, Any]:
    """Every key/value of a GGUF file except the (large) tokenizer arrays, which are replaced by their length."""
    return {k: ("array", len(v)) if k.startswith("tokenizer.ggml.") and isinstance(v, list) else v
            for k, v in f.metadata.items()}


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
def open_gguf(path: "str | os.PathLike[str]") -> GgufFile:
    """A checked GGUF file (see :mod:`lfm2np.io.gguf_file`)."""
    path = Path(path)
    if not path.is_file():
        raise Lfm2npError(f"{path}: no such GGUF file")
    return GgufFile(path)


def read_gguf(path: "str | os.PathLike[str]", dtype: Any = "float32", *, strict: bool = True,
              keep_weights: bool | None = None) -> tuple[Config, LazyParams]:
    """The config and the tensors (by Hugging Face name, a lazy :class:`~lfm2np.io.params.LazyParams`) of an
    LFM2 GGUF file.

    Raises :class:`Lfm2npError` naming the file and tensor when a tensor the config needs is missing or
    has another shape. A tensor the model does not use raises (``strict=True``) or warns.
    ``keep_weights=None`` keeps dequantised tensors when the model in the compute dtype takes at most half
    of the machine's memory, as :func:`lfm2np.load` does for checkpoints.
    """
    mode = numerics(dtype)
    f = open_gguf(path)
    path = f.path
    split = f.metadata.get("split.count")
    if isinstance(split, int) and split > 1:
        raise Lfm2npError(f"{path}: a split GGUF ({split} parts); merge it first with llama-gguf-split --merge")
    ne = {name: t.ne for name, t in f.tensors.items()}
    config = Config.from_dict(config_dict_from_metadata(read_metadata(f), ne, str(path)), source=str(path))

    # 1. GGUF names and ggml shapes, as the size calculator lists them
    wanted = {t.name: t.ne for t in gguf_tensors(config)}
    missing = [n for n in wanted if n not in ne]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise Lfm2npError(f"{path}: missing tensor {', '.join(missing[:3])}{more} "
                          f"(the metadata describes {config.model_type} with {config.num_hidden_layers} layers)")
    for name, shape in wanted.items():
        if ne[name] != shape:
            raise Lfm2npError(f"{path}: tensor {name!r} has ggml shape {list(ne[name])}; "
                              f"the metadata implies {list(shape)}")
    unexpected = [n for n in ne if n not in wanted]
    if unexpected:
        message = f"{path}: tensor {', '.join(unexpected[:5])} is not used by lfm2np's {config.model_type} model"
        if strict:
            raise Lfm2npError(message + "; pass strict=False to load anyway")
        warnings.warn(message + "; ignored", stacklevel=2)

    # 2. Hugging Face names -> (GGUF tensor, expert index or None, HF shape)
    sources = {t.name: (gguf_name(t), t.expert, t.shape) for t in layout(config)}
    dt = mode.dtype

    def read(name: str) -> np.ndarray:
        gname, expert, shape = sources[name]
        values = f.dequantize(gname) if expert is None else f.dequantize(gname, rows=expert)
        return values.reshape(shape).astype(dt, copy=False)

    def read_rows(name: str, index: np.ndarray) -> np.ndarray:
        gname, expert, shape = sources[name]
        if expert is not None:
            return read(name)[index]
        return f.dequantize(gname, rows=[int(i) for i in np.asarray(index).ravel()]).reshape(
            (*np.shape(index), *shape[1:])).astype(dt, copy=False)

    keep = default_keep({n: s for n, (_, _, s) in sources.items()}, mode) if keep_weights is None else keep_weights
    return config, LazyParams(list(sources), read, mode, bool(keep), read_rows,
                              lambda name: f.tensors[sources[name][0]].ggml_type)


# -------------------------------------------------------------------------------- calculators
def gguf_tensor_types(path: "str | os.PathLike[str]") -> dict[str, str]:
    """``{gguf_name: ggml type name}`` of every tensor in a GGUF file (the types llama-quantize chose)."""
    return {t.name: t.ggml_type for t in open_gguf(path).tensors.values()}


def gguf_tensor_bytes(path: "str | os.PathLike[str]") -> int:
    """Bytes of tensor data in a GGUF file (no padding, no header): what :func:`lfm2np.calc.weight_bytes`
    computes for a file type, here read from a real file."""
    return sum(t.nbytes for t in open_gguf(path).tensors.values())


def gguf_type_summary(path: "str | os.PathLike[str]") -> dict[str, dict[str, int]]:
    """Per ggml type: how many tensors, elements and bytes a GGUF file holds (same shape as
    :func:`lfm2np.calc.quant.type_summary`, which predicts it for a file type)."""
    out: dict[str, dict[str, int]] = {}
    for t in open_gguf(path).tensors.values():
        s = out.setdefault(t.ggml_type, {"tensors": 0, "elements": 0, "bytes": 0})
        s["tensors"] += 1
        s["elements"] += t.n_elements
        s["bytes"] += t.nbytes
    return out
