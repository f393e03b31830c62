"""Checkpoints in the sentence-transformers layout: the embedding head declared beside config.json, and the
tensors of a base model.

LiquidAI's retrieval checkpoints (LFM2.5-Embedding-350M, LFM2-ColBERT-350M, LFM2.5-ColBERT-350M) are
sentence-transformers (or PyLate) models: ``modules.json`` lists the modules in order, each in its own
directory -- the transformer (``""``: config.json and model.safetensors), a ``Pooling`` module
(``1_Pooling/config.json``: ``pooling_mode_cls_token``, ``..._mean_tokens``, ``..._lasttoken``, or
``pooling_mode``), a ``Dense`` module (``1_Dense/config.json``: ``in_features``, ``out_features``, ``bias``,
``activation_function``; ``1_Dense/model.safetensors``: ``linear.weight``, ``linear.bias``) and a ``Normalize``
module. llama.cpp's converter reads the same files (``_try_set_pooling_type``; the ``1_Dense`` weight becomes
``dense_2.weight``). :func:`read_head` gives the config's ``sentence_transformers`` entry (pooling, dense width
and bias). The transformer's ``model.safetensors`` of a base model (``Lfm2Model``,
``Lfm2BidirectionalModel``) names its tensors without the ``model.`` prefix, and the dense
weight (lfm2np's ``dense.weight``) lives in the Dense module's own file (:func:`lfm2np_names`, :class:`Renamed`).
:func:`head_files` gives the files that declare a config's head (``save_checkpoint`` writes them).
Every problem is an :class:`~lfm2np.errors.Lfm2npError` naming the file and the key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Config
from ..errors import Lfm2npError, shown
from ..schema import DENSE_HEAD, DENSE_HEAD_BIAS, HEAD_TIED
from .files import present, read_json

MODULES = "modules.json"
_IDENTITY = ("torch.nn.modules.linear.Identity", "torch.nn.Identity", "Identity", None)
#: the Pooling module's switches, in the order llama.cpp's converter tries them
_MODES = (("pooling_mode_mean_tokens", "mean"), ("pooling_mode_cls_token", "cls"), ("pooling_mode_lasttoken", "last"))
_UNSUPPORTED = ("pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens")


def _modules(directory: Path) -> list[tuple[str, Path]] | None:
    """``(type, directory)`` of each module listed in ``modules.json`` (None when there is no such file)."""
    path = directory / MODULES
    if not present(path, "the sentence-transformers module list"):
        return None
    data = read_json(path, "sentence-transformers module list")
    if not isinstance(data, list):
        raise Lfm2npError(f"{path}: a JSON {type(data).__name__}; expected a list of modules")
    out = []
    for n, m in enumerate(data):
        if not isinstance(m, dict) or not isinstance(m.get("type"), str) or not isinstance(m.get("path", ""), str):
            raise Lfm2npError(f"{path}: module {n} is {shown(m)}; expected an object with a type and a path")
        sub = m.get("path", "")
        if sub.startswith(("/", "\\")) or ".." in Path(sub).parts:
            raise Lfm2npError(f"{path}: module {n}'s path {shown(sub)} leaves the checkpoint directory")
        out.append((m["type"], directory / sub))
    return out


def _side_file(path: Path, what: str) -> Any:
    """A module's JSON config: a FIFO or a directory in its place is named, never read (a FIFO would wait)."""
    present(path, f"the {what}")
    return read_json(path, what)


def _pooling(path: Path) -> str:
    conf = _side_file(path, "Pooling config")
    if not isinstance(conf, dict):
        raise Lfm2npError(f"{path}: a JSON {type(conf).__name__}; expected the Pooling module's config object")
    unsupported = [k for k in _UNSUPPORTED if conf.get(k)]
    if unsupported:
        raise Lfm2npError(f"{path}: {unsupported[0]} is set; lfm2np pools with cls, mean or lasttoken")
    how = next((mode for key, mode in _MODES if conf.get(key)), None)
    if how is None:
        how = {"mean": "mean", "cls": "cls", "lasttoken": "last"}.get(conf.get("pooling_mode"))
    if how is None:
        raise Lfm2npError(f"{path}: no pooling mode is set (pooling_mode_cls_token, pooling_mode_mean_tokens, "
                          f"pooling_mode_lasttoken or pooling_mode)")
    if conf.get("include_prompt") is False and how != "cls":
        raise Lfm2npError(f"{path}: include_prompt is false: the prompt's tokens would be left out of {how} "
                          f"pooling, which lfm2np does not do")
    return how


def _dense(path: Path) -> dict[str, Any]:
    conf = _side_file(path, "Dense config")
    if not isinstance(conf, dict):
        raise Lfm2npError(f"{path}: a JSON {type(conf).__name__}; expected the Dense module's config object")
    for key in ("in_features", "out_features"):
        v = conf.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise Lfm2npError(f"{path}: {key} is {shown(v)}; expected a positive integer")
    if conf.get("activation_function") not in _IDENTITY:
        raise Lfm2npError(f"{path}: activation_function is {shown(conf.get('activation_function'))}; lfm2np's "
                          f"dense head is linear (Identity)")
    if conf.get("use_residual"):  # (a residual path beside the projection, an option of some ColBERT heads)
        raise Lfm2npError(f"{path}: use_residual is set; lfm2np's dense head is one linear projection")
    if not isinstance(conf.get("bias", True), bool):
        raise Lfm2npError(f"{path}: bias is {shown(conf.get('bias'))}; expected true or false")
    return {"in": conf["in_features"], "dense_out": conf["out_features"], "dense_bias": conf.get("bias", True)}


def read_head(directory: "str | os.PathLike[str]") -> dict[str, Any] | None:
    """The head a sentence-transformers checkpoint declares (``{"pooling", "dense_out", "dense_bias"}``, the config's
    ``sentence_transformers`` entry), or None when the directory has no ``modules.json``."""
    modules = _modules(Path(directory))
    if modules is None:
        return None
    head: dict[str, Any] = {"pooling": None}
    for kind, where in modules:
        name = kind.rsplit(".", 1)[-1]
        if name == "Pooling":
            head["pooling"] = _pooling(where / "config.json")
        elif name == "Dense":
            if "dense_out" in head:
                raise Lfm2npError(f"{directory}/{MODULES}: two Dense modules; lfm2np's head has one")
            dense = _dense(where / "config.json")
            dense.pop("in")
            head.update(dense)
    return head


class Renamed:
    """A :class:`~lfm2np.weights.TensorSource` over checkpoints (:class:`~lfm2np.io.safetensors.Checkpoint`) whose
    tensors have other names: ``where`` maps lfm2np's name to (checkpoint, stored name); ``sources`` are closed
    together."""

    def __init__(self, where: dict[str, tuple[Any, str]], sources: list[Any]):
        self.where, self.sources = where, sources

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: src.tensors[stored].shape for name, (src, stored) in self.where.items()}

    def read(self, name: str, dtype: Any, rows: np.ndarray | None = None) -> np.ndarray:
        src, stored = self.where[name]
        return src.read(stored, dtype, rows)

    def stored_type(self, name: str) -> str:
        src, stored = self.where[name]
        return src.stored_type(stored)

    def prefetch(self, names: "list[str]") -> None:
        for name in names:
            if name in self.where:
                self.where[name][0].prefetch([self.where[name][1]])

    def close(self) -> None:
        for src in self.sources:
            src.close()

    def describe(self) -> dict[str, Any]:
        return self.sources[0].describe()


def lfm2np_names(stored: "list[str]", dense: "list[str]") -> dict[str, tuple[int, str]] | None:
    """lfm2np's name for each tensor of a checkpoint's own file (``stored``, source 0) and of its Dense module
    (``dense``, source 1), as ``{name: (source, stored name)}``: a base model's names gain the ``model.`` prefix,
    the Dense module's ``linear.weight`` / ``linear.bias`` are ``dense.weight`` / ``dense.bias`` (any other keeps
    its name behind ``Dense/``, and is refused as unused). None when nothing is renamed."""
    bare = HEAD_TIED not in stored and HEAD_TIED[len("model."):] in stored
    if not bare and not dense:
        return None
    out = {(f"model.{n}" if bare and not n.startswith("model.") else n): (0, n) for n in stored}
    for n in dense:
        out[{"linear.weight": DENSE_HEAD, "linear.bias": DENSE_HEAD_BIAS}.get(n, f"Dense/{n}")] = (1, n)
    return out


def dense_directory(directory: "str | os.PathLike[str]") -> Path | None:
    """The directory of the checkpoint's Dense module, or None."""
    return next((p for kind, p in _modules(Path(directory)) or [] if kind.rsplit(".", 1)[-1] == "Dense"), None)


def head_files(config: Config) -> dict[str, Any]:
    """The sentence-transformers files of ``config``'s head, ``{relative path: JSON object}`` (modules.json, the
    Pooling and Dense configs); the Dense weights go to ``DENSE_WEIGHTS`` beside its config."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]
    files: dict[str, Any] = {}

    def module(kind: str, conf: Any) -> None:
        n = len(modules)
        modules.append({"idx": n, "name": str(n), "path": f"{n}_{kind}", "type": f"sentence_transformers.models.{kind}"})
        if conf is not None:
            files[f"{n}_{kind}/config.json"] = conf

    if config.pooling is not None:
        module("Pooling", {"word_embedding_dimension": config.hidden_size,
                           **{key: config.pooling == mode for key, mode in _MODES}})
    if config.dense_out:
        module("Dense", {"in_features": config.hidden_size, "out_features": config.dense_out,
                         "bias": config.dense_bias, "activation_function": "torch.nn.modules.linear.Identity"})
    module("Normalize", None)
    files[MODULES] = modules
    return files


#: the Dense module's weights, beside its config.json
DENSE_WEIGHTS = "model.safetensors"


#: llama.cpp's pooling types (enum llama_pooling_type) -> lfm2np's; RANK (4) is a reranker's, refused
GGUF_POOLING = {0: None, 1: "mean", 2: "cls", 3: "last"}


def gguf_head(pooling: int | None, n_out: int | None, dense: "tuple[int, ...] | None", bias: "tuple[int, ...] | None",
              D: int, error: Any) -> dict[str, Any] | None:
    """The embedding head of a GGUF file: ``{arch}.pooling_type`` and the ``dense_2.weight`` (``dense``: its ggml
    shape ``[D, n_out]``) and ``dense_2.bias`` projection, checked against ``{arch}.embedding_length_out``
    (``n_out``); None when the file declares neither. ``error(key, problem)`` makes the error naming the key."""
    if pooling is not None and pooling not in GGUF_POOLING:
        raise error("pooling_type", f"is {pooling}; lfm2np pools with none (0), mean (1), cls (2) or last (3)")
    if dense is None:
        if bias is not None:
            raise error("embedding_length_out", "comes with dense_2.bias but no dense_2.weight")
        return None if pooling is None else {"pooling": GGUF_POOLING[pooling]}
    if len(dense) != 2 or dense[0] != D:
        raise error("embedding_length", f"is {D} but dense_2.weight has ggml shape {list(dense)}; expected [{D}, n]")
    if n_out is not None and n_out != dense[1]:
        raise error("embedding_length_out", f"is {n_out} but dense_2.weight projects to {dense[1]}")
    if bias is not None and list(bias) != [dense[1]]:
        raise error("embedding_length_out", f"is {dense[1]} but dense_2.bias has shape {list(bias)}")
    return {"pooling": GGUF_POOLING.get(pooling), "dense_out": dense[1], "dense_bias": bias is not None}
