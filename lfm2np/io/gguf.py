"""GGUF files: read an LFM2 / LFM2-MoE GGUF (``lfm2``, ``lfm2moe``) into the same Model a checkpoint gives
(writing small ones for tests and llama.cpp comparisons is :mod:`lfm2np.io.gguf_write`; the tokenizer a file
carries is :meth:`lfm2np.io.tokenizer.Tokenizer.from_gguf`).

The file is parsed by :mod:`lfm2np.io.gguf_file`, which checks every count, length and offset against the
file before it allocates or reads; tensors are dequantised with the ``gguf`` package (llama.cpp's own
``gguf-py``, an optional dependency: ``pip install 'lfm2np[gguf]'``), so lfm2np runs on exactly the values
llama.cpp's dequantisation gives. Then:

1. the hyperparameters under ``{arch}.*`` become a Hugging Face ``config.json`` dictionary
   (:func:`lfm2np.io.gguf_meta.config_dict_from_metadata`, which checks every key's type and checks the keys
   against the tensor shapes) and a :class:`~lfm2np.config.Config`;
2. every GGUF tensor is checked against the names and ggml shapes the config implies
   (:func:`gguf_layout`: :func:`lfm2np.io.gguf_names.gguf_tensors`, derived from the one tensor layout that
   the size calculator uses too, with the fused ``attn_qkv`` of the layers that have one);
3. the model reads its tensors by Hugging Face name: the conv kernel ``[L, D]`` (ggml order) becomes
   ``[D, 1, L]``, stacked experts ``ffn_{gate,up,down}_exps`` give per-expert ``w1/w3/w2``, and a fused
   ``attn_qkv`` (``convert_hf_to_gguf.py --fuse-qkv``) gives ``q_proj``, ``k_proj``, ``v_proj`` as its row
   ranges ``[0, H*hd)``, ``[H*hd, (H+G)*hd)``, ``[(H+G)*hd, (H+2G)*hd)`` -- the converter concatenates q, k, v
   along the output axis (``conversion/base.py``: ``torch.cat([q, k, v], dim=0)``) and llama.cpp views them
   at those offsets (``llm_graph_context::build_qkv``, ``src/llama-graph.cpp``).

Tensors are dequantised lazily, one at a time (an expert's slice of a stacked tensor alone, q/k/v's rows of a
fused tensor alone, an embedding's looked-up rows alone when weights are not kept), so a large quantised file
is never expanded whole. ``convert_hf_to_gguf.py`` writes LFM2's q/k projections as they are (no llama-style
row permutation; llama.cpp applies NeoX RoPE, as transformers does), so no permutation is undone.
"""

from __future__ import annotations

import math
import os
import warnings
import weakref
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..config import Config
from ..errors import Lfm2npError
from ..numerics import numerics
from ..tensors import layout
from .gguf_file import GgufFile
from .gguf_meta import ARCHITECTURES, GGUF_ARCH, config_dict_from_metadata
from .gguf_names import GgufTensor, gguf_tensors
from .params import LazyParams, parse_budget

__all__ = ["ARCHITECTURES", "GGUF_ARCH", "config_dict_from_metadata", "read_metadata", "gguf_layout",
           "fused_qkv_layers", "open_gguf", "read_gguf", "read_gguf_config", "gguf_tensor_types",
           "gguf_tensor_bytes", "gguf_type_summary", "FUSED_QKV"]

FUSED_QKV = "attn_qkv.weight"  #: the suffix of llama.cpp's fused q/k/v projection (``--fuse-qkv``)
_QKV = ("attn_q.weight", "attn_k.weight", "attn_v.weight")


# ----------------------------------------------------------------------------------- metadata
def read_metadata(f: GgufFile) -> dict[str, Any]:
    """Every key/value of a GGUF file except the (large) tokenizer arrays, which are replaced by
    ``("array", length)``."""
    return {k: ("array", len(v)) if k.startswith("tokenizer.ggml.") and isinstance(v, list) else v
            for k, v in f.metadata.items()}


# ------------------------------------------------------------------------------------- layout
def gguf_layout(config: Config, fused: "Iterable[int] | bool" = ()) -> list[GgufTensor]:
    """The tensors of an LFM2 GGUF file (:func:`~lfm2np.io.gguf_names.gguf_tensors`), with the q/k/v
    projections of the attention layers in ``fused`` (``True``: every attention layer) stored as one
    ``blk.N.attn_qkv.weight`` of ggml shape ``[D, (H + 2G) * hd]``: q's rows, then k's, then v's (what
    ``convert_hf_to_gguf.py --fuse-qkv`` writes). Same order as gguf_tensors (by layer, then name)."""
    layers = set(config.attention_layers) if fused is True else set(fused or ())
    out: list[GgufTensor] = []
    parts: dict[int, list[GgufTensor]] = {}
    for t in gguf_tensors(config):
        if t.layer in layers and t.name.endswith(_QKV):
            parts.setdefault(t.layer, []).append(t)
        else:
            out.append(t)
    for i, qkv in parts.items():
        qkv.sort(key=lambda t: _QKV.index(t.name.rsplit(".", 2)[-2] + ".weight"))
        rows = sum(t.ne[1] for t in qkv)
        out.append(GgufTensor(f"blk.{i}.{FUSED_QKV}", (qkv[0].ne[0], rows), i,
                              tuple(h for t in qkv for h in t.holds)))
    outside = [t for t in out if t.layer is None]
    inside = sorted((t for t in out if t.layer is not None), key=lambda t: (t.layer, t.name))
    return outside + inside


def fused_qkv_layers(config: Config, names: Iterable[str]) -> list[int]:
    """The attention layers whose q/k/v are stored fused (``blk.N.attn_qkv.weight``) among ``names``."""
    present = set(names)
    return [i for i in config.attention_layers if f"blk.{i}.{FUSED_QKV}" in present]


# ------------------------------------------------------------------------------------ reading
def open_gguf(path: "str | os.PathLike[str]") -> GgufFile:
    """A checked GGUF file (see :mod:`lfm2np.io.gguf_file`)."""
    path = Path(path)
    if not path.is_file():
        raise Lfm2npError(f"{path}: no such GGUF file")
    return GgufFile(path)


def _config(f: GgufFile) -> Config:
    split = f.metadata.get("split.count")
    if isinstance(split, int) and not isinstance(split, bool) and split > 1:
        raise Lfm2npError(f"{f.path}: a split GGUF ({split} parts); merge it first with llama-gguf-split --merge")
    ne = {name: t.ne for name, t in f.tensors.items()}
    return Config.from_dict(config_dict_from_metadata(read_metadata(f), ne, str(f.path)), source=str(f.path))


def read_gguf_config(path: "str | os.PathLike[str]") -> Config:
    """The config of a GGUF file, from its metadata checked against its tensor shapes (no tensor is read)."""
    with open_gguf(path) as f:
        return _config(f)


def read_gguf(path: "str | os.PathLike[str]", dtype: Any = "float32", *, strict: bool = True,
              memory_budget: Any = None) -> tuple[Config, LazyParams]:
    """The config and the tensors (by Hugging Face name, a lazy :class:`~lfm2np.io.params.LazyParams`) of an
    LFM2 GGUF file.

    Raises :class:`Lfm2npError` naming the file and tensor when a tensor the config needs is missing or
    has another shape, and naming the key when the metadata is malformed or contradicts the tensors (or
    warns, where the tensors settle it: :mod:`lfm2np.io.gguf_meta`). A tensor the model does not use raises
    (``strict=True``) or warns. ``memory_budget`` bounds the dequantised tensors kept, as for checkpoints
    (:mod:`lfm2np.io.params`: bytes or a size, "all", 0; None: the default rule), experts cached least
    recently used first.
    """
    mode = numerics(dtype)
    f = open_gguf(path)
    try:
        config = _config(f)
        params = _params(f, config, mode, strict, memory_budget)
    except BaseException:
        f.close()
        raise
    return config, params


def _params(f: GgufFile, config: Config, mode: Any, strict: bool, memory_budget: Any) -> LazyParams:
    path = f.path
    ne = {name: t.ne for name, t in f.tensors.items()}
    tensors = gguf_layout(config, fused_qkv_layers(config, ne))

    # 1. GGUF names and ggml shapes, as the size calculator lists them
    wanted = {t.name: t.ne for t in tensors}
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
        warnings.warn(message + "; ignored", stacklevel=3)

    # 2. Hugging Face names -> (GGUF tensor, rows of it: None = all, an expert index, or a fused q/k/v slice)
    where: dict[str, tuple[str, "int | slice | None"]] = {}
    for g in tensors:
        start = 0
        for t in g.holds:
            if g.name.endswith(FUSED_QKV):
                where[t.name] = (g.name, slice(start, start + t.shape[0]))
                start += t.shape[0]
            else:
                where[t.name] = (g.name, t.expert)
    shapes = {t.name: t.shape for t in layout(config)}
    dt = mode.dtype

    def read(name: str) -> np.ndarray:
        gname, rows = where[name]
        values = f.dequantize(gname) if rows is None else f.dequantize(gname, rows=rows)
        return values.reshape(shapes[name]).astype(dt, copy=False)

    def read_rows(name: str, index: np.ndarray) -> np.ndarray:
        gname, rows = where[name]
        if rows is not None:
            return read(name)[index]
        return f.dequantize(gname, rows=[int(i) for i in np.asarray(index).ravel()]).reshape(
            (*np.shape(index), *shapes[name][1:])).astype(dt, copy=False)

    sizes = {name: math.prod(shape) * dt.itemsize for name, shape in shapes.items()}
    budget = parse_budget(memory_budget, sum(sizes.values()))
    experts = frozenset(t.name for t in layout(config) if t.expert is not None)
    def prefetch(names: "list[str]") -> None:  # the next layer's tensors, or the experts just chosen
        asked = {}  # (slices are not hashable before Python 3.12: keyed by their text)
        for n in names:
            if n in where:
                asked.setdefault(f"{where[n][0]}{where[n][1]!r}", where[n])
        for gname, rows in asked.values():
            f.prefetch(gname, rows)

    params = LazyParams(list(shapes), read, mode, budget, read_rows,
                        lambda name: f.tensors[where[name][0]].ggml_type, sizes, experts, prefetch)
    weakref.finalize(params, f.close)  # the file stays open while its tensors can be read
    return params


# -------------------------------------------------------------------------------- calculators
def gguf_tensor_types(path: "str | os.PathLike[str]") -> dict[str, str]:
    """``{gguf_name: ggml type name}`` of every tensor in a GGUF file (the types llama-quantize chose)."""
    with open_gguf(path) as f:
        return {t.name: t.ggml_type for t in f.tensors.values()}


def gguf_tensor_bytes(path: "str | os.PathLike[str]") -> int:
    """Bytes of tensor data in a GGUF file (no padding, no header): what :func:`lfm2np.calc.weight_bytes`
    computes for a file type, here read from a real file."""
    with open_gguf(path) as f:
        return sum(t.nbytes for t in f.tensors.values())


def gguf_type_summary(path: "str | os.PathLike[str]") -> dict[str, dict[str, int]]:
    """Per ggml type: how many tensors, elements and bytes a GGUF file holds (same shape as
    :func:`lfm2np.calc.quant.type_summary`, which predicts it for a file type)."""
    out: dict[str, dict[str, int]] = {}
    with open_gguf(path) as f:
        for t in f.tensors.values():
            s = out.setdefault(t.ggml_type, {"tensors": 0, "elements": 0, "bytes": 0})
            s["tensors"] += 1
            s["elements"] += t.n_elements
            s["bytes"] += t.nbytes
    return out
