"""Named traces of every intermediate: recording, saving, loading, and the names other tools give them.

The names, their order, shapes and the names transformers and llama.cpp give the same values are the trace
schema, :func:`lfm2np.trace_names` (:mod:`lfm2np.schema`); docs/oracle.md lists them. Tensors are ``(T, ...)``
for one sequence of T tokens (the RoPE frequencies ``(hd/2,)``). Recording costs nothing when off: the forward
pass calls the recorder only when one is given.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from safetensors.numpy import save_file

from ..errors import Lfm2npError, shown
from ..io.files import parse_json
from ..io.params import machine_memory
from ..io.safetensors_file import STORAGE, SafetensorsFile
from ..schema import LLAMA_CPP_NAME, holds_integers, llama_cpp_names, transformers_name
from ..schema import is_trace_name as schema_trace_name

# ------------------------------------------------------------------------------ names
def llama_cpp_alias(name: str) -> str | None:
    """The name llama.cpp's graph callback gives the same value, where one exists (the first of
    :func:`lfm2np.schema.llama_cpp_names`)."""
    names = llama_cpp_names(name)
    return names[0] if names else None


def matches(name: str, patterns: "Sequence[str] | str | None") -> bool:
    """Whether ``name`` matches one of the fnmatch globs ``patterns`` (None or empty: everything; one string is one
    glob, never a glob per character; anything else an error: :func:`checked_patterns`)."""
    patterns = checked_patterns(patterns)
    return not patterns or any(fnmatch.fnmatchcase(name, p) for p in patterns)


def checked_patterns(patterns: Any) -> "tuple[str, ...] | None":
    """``patterns`` of :func:`record` (and compare): None, one glob (a string) or a list of globs (strings), as a
    tuple; an :class:`Lfm2npError` naming the argument otherwise."""
    if patterns is None:
        return None
    if isinstance(patterns, str):
        return (patterns,)
    if not isinstance(patterns, (list, tuple)):
        raise Lfm2npError(f"patterns is {shown(patterns)}; expected a glob (a str) or a list of globs, e.g. "
                          f"['model.layers.3.*']")
    odd = next((p for p in patterns if not isinstance(p, str)), None)
    if odd is not None or any(not isinstance(p, str) for p in patterns):
        raise Lfm2npError(f"patterns holds {shown(odd)}; each pattern is a glob (a str)")
    return tuple(patterns)


def _check_model(model: Any, what: str) -> None:
    """A model for :func:`record` and the like: an lfm2np Model, or a stand-in with its check_ids, forward, config."""
    if not all(hasattr(model, attr) for attr in ("check_ids", "forward", "config")):
        raise Lfm2npError(f"{what} takes an lfm2np Model (lfm2np.load); got {type(model).__name__}")


def is_trace_name(name: str) -> bool:
    """Whether ``name`` is one the record protocol or llama.cpp's graph callback gives an intermediate."""
    return schema_trace_name(name) or LLAMA_CPP_NAME.fullmatch(name) is not None


def _check_dtype(path: Path, name: str, dtype: str) -> None:
    """A tensor under a trace name must hold floats (the chosen experts: integers)."""
    if not is_trace_name(name):
        return
    if holds_integers(name):
        if dtype[0] not in "IU":
            raise Lfm2npError(f"{path}: tensor {shown(name)} has dtype {dtype}; chosen experts are integers")
    elif dtype[0] != "F" and dtype != "BF16":
        raise Lfm2npError(f"{path}: tensor {shown(name)} has dtype {dtype}; a trace intermediate is floating point "
                          f"(F16, BF16, F32 or F64)")


def json_number(x: float) -> "float | str":
    """A float for strict JSON: itself when finite, else the string ``"inf"``, ``"-inf"`` or ``"nan"``."""
    if math.isfinite(x):
        return x
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def _json_field(path: Path, meta: dict[str, str], key: str, kind: type, default: Any) -> Any:
    """A JSON-encoded metadata field of a trace file, parsed strictly (no key twice) and checked to be a
    ``kind``."""
    if key not in meta:
        return default
    value = parse_json(meta[key], str(path), f"trace metadata {shown(key)}")
    if not isinstance(value, kind):
        raise Lfm2npError(f"{path}: trace metadata {shown(key)} is a JSON {type(value).__name__}; expected a "
                          f"{'list' if kind is list else 'object'}")
    return value


# -------------------------------------------------------------------------------- Trace
class Trace:
    """Named intermediates of one forward pass, in forward order."""

    def __init__(self, tensors: "dict[str, np.ndarray] | None" = None, meta: "dict[str, Any] | None" = None):
        if not isinstance(tensors, (Mapping, type(None))) or not isinstance(meta, (Mapping, type(None))):
            raise Lfm2npError(f"a Trace takes a dict of named arrays and a dict of metadata; got "
                              f"{type(tensors).__name__} and {type(meta).__name__}")
        self.tensors: dict[str, np.ndarray] = {}
        for name, value in (tensors or {}).items():
            a = np.asarray(value) if isinstance(value, (np.ndarray, np.generic)) else None
            if not isinstance(name, str) or a is None or a.dtype.kind not in "biuf":
                what = f"a {type(value).__name__}" if a is None else f"an array of {a.dtype}"
                raise Lfm2npError(f"trace tensor {shown(name)} is {what}; a trace holds arrays of real numbers "
                                  f"under string names")
            self.tensors[name] = a
        self.meta: dict[str, Any] = checked_meta(dict(meta or {}), "trace")

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str) -> np.ndarray:
        return self.tensors[name]

    def __len__(self) -> int:
        return len(self.tensors)

    def names(self) -> list[str]:
        return list(self.tensors)

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per tensor: shape, dtype, mean, rms, max |x|, and the llama.cpp alias."""
        out = {}
        for name, a in self.tensors.items():
            f = np.asarray(a, dtype=np.float64)
            out[name] = {"shape": list(a.shape), "dtype": str(a.dtype),
                         "mean": float(f.mean()) if f.size else 0.0,
                         "rms": float(np.sqrt(np.mean(f * f))) if f.size else 0.0,
                         "max_abs": float(np.max(np.abs(f))) if f.size else 0.0,
                         "llama_cpp": llama_cpp_alias(name)}
        return out

    def save(self, path: "str | os.PathLike[str]") -> Path:
        """Write ``path`` (safetensors, tensors in forward order) and ``path`` with ``.json`` (the summary)."""
        path = _trace_path(path)
        if path.suffix != ".safetensors":
            path = path.with_suffix(".safetensors")
        order = list(self.tensors)
        try:  # the metadata first: strict JSON (a NaN would be written, then refused in the summary)
            meta = json.dumps(self.meta, allow_nan=False)
        except (TypeError, ValueError, RecursionError) as e:
            raise Lfm2npError(f"{path}: the trace's meta is not strict JSON ({e}); nothing was written") from None
        summary = {n: {k: json_number(v) if isinstance(v, float) else v for k, v in row.items()}
                   for n, row in self.summary().items()}  # strict JSON: a NaN tensor's mean is "nan"
        try:
            save_file({n: np.ascontiguousarray(a) for n, a in self.tensors.items()}, str(path),
                      metadata={"lfm2np_trace": "1", "order": json.dumps(order), "meta": meta})
        except Exception as e:  # safetensors' own error type: a directory in the way, a full disk
            raise Lfm2npError(f"{path}: cannot write the trace ({e})") from None
        summary_path = path.with_suffix(".json")
        try:
            summary_path.write_text(json.dumps({"meta": self.meta, "tensors": summary}, indent=1, allow_nan=False))
        except OSError as e:
            raise Lfm2npError(f"{summary_path}: cannot write the trace's summary ({e.strerror or e})") from None
        return path

    @classmethod
    def load(cls, path: "str | os.PathLike[str]") -> "Trace":
        """Read a trace written by :meth:`save`, or any safetensors file of named tensors (e.g. a dump from
        transformers or llama.cpp whose names are trace names or llama.cpp aliases).

        Checked as it is read (an :class:`Lfm2npError` naming the file and the culprit otherwise): a valid
        safetensors file (:mod:`lfm2np.io.safetensors_file`: bounded header, pread, no memory map); the
        ``order`` metadata, if present, a JSON list naming each of its tensors once; ``meta`` a JSON object;
        floating-point tensors under trace names (integers for the chosen experts; bf16 is widened to float32
        exactly); no more data than this machine's memory. NaN and infinities are kept as they are:
        :func:`~lfm2np.oracle.compare.compare` reports every tensor that holds one as failed."""
        path = _trace_path(path)
        f = SafetensorsFile(path, dtypes=tuple(STORAGE))
        order = _json_field(path, f.metadata, "order", list, list(f.tensors))
        for name in order:
            if not isinstance(name, str) or name not in f.tensors:
                raise Lfm2npError(f"{path}: trace metadata 'order' lists {shown(name)}, which the file does not hold")
        seen: set[str] = set()
        twice = next((n for n in order if n in seen or seen.add(n)), None)  # linear: order may be long
        if twice is not None or len(seen) != len(f.tensors):
            problem = f"lists {shown(twice)} twice" if twice is not None else \
                f"leaves out tensor {shown(next(n for n in f.tensors if n not in seen))}"
            raise Lfm2npError(f"{path}: trace metadata 'order' {problem}; expected each tensor once")
        meta = checked_meta(_json_field(path, f.metadata, "meta", dict, {}), str(path))
        need = sum((i.end - i.begin) * (2 if i.dtype == "BF16" else 1) for i in f.tensors.values())
        if need > machine_memory():
            raise Lfm2npError(f"{path}: the trace holds {need} bytes of tensors, more than this machine's memory")
        tensors = {}
        for name in order:
            dtype = f.tensors[name].dtype
            _check_dtype(path, name, dtype)
            try:
                tensors[name] = f.read(name, np.float32 if dtype == "BF16" else None)
            except MemoryError:
                raise Lfm2npError(f"{path}: out of memory reading tensor {shown(name)}") from None
        return cls(tensors, meta)


def checked_meta(meta: dict[str, Any], where: str) -> dict[str, Any]:
    """A trace's metadata, its known fields checked (what compare and diagnose read): ``start`` a position (an
    integer >= 0), ``dtype``/``model``/``model_type`` text (or null), ``weights`` an object whose ``format`` and
    ``path`` are text and ``types`` counts per stored type (``{"Q8_0": 24}``). ``ids`` is checked where it is read.
    Other keys are kept as they are."""
    def bad(key: str, expected: str) -> Lfm2npError:
        return Lfm2npError(f"{where}: trace metadata {key!r} is {shown(meta_value(key))}; expected {expected}")

    def meta_value(key: str) -> Any:
        value: Any = meta
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        return value

    start = meta.get("start")
    if start is not None and (isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < 2**63):
        raise bad("start", "a position (an integer >= 0)")
    for key in ("dtype", "model", "model_type"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise bad(key, "text or null")
    weights = meta.get("weights")
    if weights is not None:
        if not isinstance(weights, dict):
            raise bad("weights", "an object (format, path, types)")
        for key in ("format", "path", "by"):
            if weights.get(key) is not None and not isinstance(weights[key], str):
                raise bad(f"weights.{key}", "text")
        types = weights.get("types")
        if types is not None and not (isinstance(types, dict) and all(
                isinstance(k, str) and isinstance(n, int) and not isinstance(n, bool) and n >= 0
                for k, n in types.items())):
            raise bad("weights.types", "an object of tensor counts per stored type, e.g. {\"Q8_0\": 24}")
    return meta


def _trace_path(path: Any) -> Path:
    """``path`` of :meth:`Trace.save` / :meth:`Trace.load`: a str or a path, not empty."""
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise Lfm2npError(f"a trace path is a file name (a str or a path); got {shown(path)}")
    return Path(path)


def from_transformers(captured: "dict[str, np.ndarray]") -> Trace:
    """A trace from tensors captured with forward hooks on a transformers LFM2 or LFM3 model (keys: module path +
    ``.output``, or the function-level steps, as ``tools/make_fixtures.py`` and
    ``tools/dump_transformers_trace.py`` record them); keys that name no schema value are left out."""
    tensors = {}
    for key, value in captured.items():
        name = transformers_name(key)
        if name is not None:
            tensors[name] = value
    return Trace(tensors, {"source": "transformers"})


def record(model: Any, ids: Any, patterns: Sequence[str] | None = None,
           progress: Any = None, images: Any = None) -> tuple[np.ndarray, Trace]:
    """Run ``model`` on one sequence ``ids`` (T,) and record the intermediates whose names match one of
    ``patterns`` (fnmatch globs, e.g. ``"model.layers.3.*"``; None: all). Returns the logits and the trace.
    (The names and the recording protocol are :meth:`lfm2np.Model.forward`'s ``record``; ``images``, LFM2-VL's,
    as it takes them.)"""
    _check_model(model, "record")
    patterns = checked_patterns(patterns)
    ids = model.check_ids(ids)
    if ids.ndim != 1:
        raise Lfm2npError(f"a trace records one sequence, shape (T,); got shape {ids.shape}")
    tensors: dict[str, np.ndarray] = {}

    def keep(name: str, value: np.ndarray) -> None:
        if matches(name, patterns):
            tensors[name] = np.array(value)

    # progress goes only to a model that asked for it: a stand-in model need not know the keyword
    extra = {} if progress is None else {"progress": progress}
    if images is not None:
        extra["images"] = images
    logits = model.forward(ids, record=keep, **extra)
    weights = model.params.describe() if hasattr(model.params, "describe") else {"format": "unknown"}
    meta = {"ids": ids.tolist(), "start": 0, "dtype": model.numerics.name, "model": model.config.source,
            "model_type": model.config.model_type, "weights": weights}
    return logits, Trace(tensors, meta)


def trace_task(model: Any, payload: "tuple[Any, Sequence[str] | None]") -> Trace:
    """One trace of a prompts file's (``lfm2np trace --prompts``): :func:`record` of ``payload = (ids, patterns)``,
    its trace (a task a cluster's worker runs: module-level, picklable in and out)."""
    ids, patterns = payload
    return record(model, ids, patterns)[1]


def hidden_states(model: Any, ids: Any, *, final_norm: bool = True) -> list[np.ndarray]:
    """The residual stream after each layer, as transformers' ``output_hidden_states=True`` gives it:
    a list of ``num_hidden_layers + 1`` arrays ``(T, D)`` for one sequence ``ids`` (T,).

    ``hidden_states[0]`` is the embedding output and ``hidden_states[i + 1]`` the output of layer ``i``,
    except the last entry: transformers 5 ties it to ``last_hidden_state``, i.e. the final norm
    (``model.embedding_norm``) applied to the last layer's output. ``final_norm=False`` gives the last
    layer's raw output there instead (the trace's ``model.layers.{L-1}``). Built on the record protocol:
    the same values as the trace names ``model.embed_tokens``, ``model.layers.{i}``, ``model.embedding_norm``."""
    _check_model(model, "hidden_states")
    if not isinstance(final_norm, (bool, np.bool_)):  # "no" would be true
        raise Lfm2npError(f"final_norm must be True or False; got {shown(final_norm)}")
    ids = model.check_ids(ids)
    if ids.ndim != 1:
        raise Lfm2npError(f"hidden_states takes one sequence, shape (T,); got shape {ids.shape}")
    n = model.config.num_hidden_layers
    wanted = ["model.embed_tokens", *(f"model.layers.{i}" for i in range(n)), "model.embedding_norm"]
    kept: dict[str, np.ndarray] = {}

    def keep(name: str, value: np.ndarray) -> None:
        if name in wanted:
            kept[name] = np.array(value)

    model.forward(ids, record=keep)
    states = [kept[name] for name in wanted[:-1]]
    if final_norm:
        states[-1] = kept["model.embedding_norm"]
    return states
