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

:class:`GgufSource` is the file as a :class:`~lfm2np.weights.TensorSource`: tensors by Hugging Face name,
dequantised lazily, one at a time (an expert's slice of a stacked tensor alone, q/k/v's rows of a
fused tensor alone, an embedding's looked-up rows alone when weights are not kept), so a large quantised file
is never expanded whole. ``convert_hf_to_gguf.py`` writes LFM2's q/k projections as they are (no llama-style
row permutation; llama.cpp applies NeoX RoPE, as transformers does), so no permutation is undone.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..config import Config
from ..errors import Lfm2npError
from ..schema import Tensor, layout
from ..weights import check_tensors
from .files import present
from .gguf_file import INTEGER_TYPES, GgufFile
from .gguf_meta import ARCHITECTURES, GGUF_ARCH, config_dict_from_metadata
from .gguf_names import GgufTensor, gguf_tensors

__all__ = ["ARCHITECTURES", "GGUF_ARCH", "config_dict_from_metadata", "read_metadata", "gguf_layout",
           "fused_qkv_layers", "open_gguf", "GgufSource", "read_gguf_source", "read_gguf_config", "gguf_tensor_types",
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
def gguf_layout(config: Config, fused: "Iterable[int] | bool" = (), tensors: "list[Tensor] | None" = None) \
        -> list[GgufTensor]:
    """The tensors of an LFM2 GGUF file (:func:`~lfm2np.io.gguf_names.gguf_tensors`), with the q/k/v
    projections of the attention layers in ``fused`` (``True``: every attention layer) stored as one
    ``blk.N.attn_qkv.weight`` of ggml shape ``[D, (H + 2G) * hd]``: q's rows, then k's, then v's (what
    ``convert_hf_to_gguf.py --fuse-qkv`` writes). Same order as gguf_tensors (by layer, then name); ``tensors``:
    the config's layout, when the caller has it already."""
    layers = set(config.attention_layers) if fused is True else set(fused or ())
    out: list[GgufTensor] = []
    parts: dict[int, list[GgufTensor]] = {}
    for t in gguf_tensors(config, tensors):
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
    if not present(path, "a GGUF file"):  # a FIFO, a directory or a loop of links is named as what it is
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


class GgufSource:
    """The tensors of an LFM2 GGUF file by Hugging Face name (a :class:`~lfm2np.weights.TensorSource`): each
    one dequantised when read, an expert's slice of a stacked tensor or q/k/v's rows of a fused one alone,
    an embedding's looked-up rows alone.

    Built from the open file, its config and the config's tensor ``layout``; every GGUF tensor is checked
    against the names and ggml shapes the config implies first (:func:`lfm2np.weights.check_tensors`: missing
    and mis-shaped ones are errors, unused ones an error, or a warning when not ``strict``), and every weight
    the model reads for its type: floating point (F32, F16, BF16, F64) or quantised; an integer type (I8 ..
    I64) is refused naming the tensor, since its values would be taken as weights without a scale."""

    def __init__(self, f: GgufFile, config: Config, tensors: "list[Tensor]", strict: bool = True):
        self.file = f
        held = gguf_layout(config, fused_qkv_layers(config, f.tensors), tensors)
        check_tensors({name: t.ne for name, t in f.tensors.items()}, {g.name: g.ne for g in held}, str(f.path),
                      strict, f"the metadata describes {config.model_type} with {config.num_hidden_layers} layers",
                      "ggml shape")
        for g in held:
            kind = f.tensors[g.name].ggml_type
            if kind in INTEGER_TYPES:
                raise Lfm2npError(f"{f.path}: tensor {g.name!r} is stored as {kind}, an integer type; a weight must "
                                  f"be floating point (F32, F16, BF16) or quantised (Q8_0, Q4_K, ...)")
        # Hugging Face name -> (GGUF tensor, rows of it: None = all, an expert index, or a fused q/k/v slice)
        self._where: dict[str, tuple[str, "int | slice | None"]] = {}
        for g in held:
            start = 0
            for t in g.holds:
                if g.name.endswith(FUSED_QKV):
                    self._where[t.name] = (g.name, slice(start, start + t.shape[0]))
                    start += t.shape[0]
                else:
                    self._where[t.name] = (g.name, t.expert)
        self._shapes = {t.name: t.shape for t in tensors}

    def read(self, name: str, dtype: Any, rows: np.ndarray | None = None) -> np.ndarray:
        gname, part = self._where[name]
        if rows is not None and part is None:  # an embedding's rows: only those are read
            index = np.asarray(rows)
            values = self.file.dequantize(gname, rows=[int(i) for i in index.ravel()])
            return values.reshape((*index.shape, *self._shapes[name][1:])).astype(dtype, copy=False)
        values = self.file.dequantize(gname) if part is None else self.file.dequantize(gname, rows=part)
        values = values.reshape(self._shapes[name]).astype(dtype, copy=False)
        return values if rows is None else values[np.asarray(rows)]

    def stored_type(self, name: str) -> str:
        return self.file.tensors[self._where[name][0]].ggml_type

    def read_blocks(self, name: str) -> np.ndarray:
        """The stored bytes of tensor ``name`` (an expert's of a stacked tensor, q/k/v's rows of a fused one): uint8
        (rows, row bytes), whole blocks per row."""
        gname, part = self._where[name]
        data = self.file.data(gname) if part is None else self.file.blocks(gname, part)
        return np.ascontiguousarray(data).reshape(self._shapes[name][0], -1)

    def prefetch(self, names: "list[str]") -> None:
        """Read ahead the GGUF ranges that hold these tensors (the next layer's, or the experts just chosen)."""
        asked = {}  # (slices are not hashable before Python 3.12: keyed by their text)
        for n in names:
            if n in self._where:
                asked.setdefault(f"{self._where[n][0]}{self._where[n][1]!r}", self._where[n])
        for gname, part in asked.values():
            self.file.prefetch(gname, part)

    def close(self) -> None:
        self.file.close()

    def describe(self) -> dict[str, Any]:
        return {"format": "gguf", "path": str(self.file.path)}


def read_gguf_source(path: "str | os.PathLike[str]", strict: bool = True) \
        -> tuple[Config, "list[Tensor]", GgufSource]:
    """The config (from the metadata checked against the tensor shapes), the tensor layout and the tensors of
    an LFM2 GGUF file; the file stays open until the source is closed."""
    f = open_gguf(path)
    try:
        config = _config(f)
        tensors = layout(config)
        return config, tensors, GgufSource(f, config, tensors, strict)
    except BaseException:
        f.close()
        raise


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
