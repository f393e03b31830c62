"""Named traces of every intermediate: recording, saving, loading, and the names other tools give them.

Names are the Hugging Face module path plus the step, in forward order (:mod:`lfm2np.model`), e.g.::

    model.embed_tokens
    model.layers.3.operator_norm
    model.layers.3.conv.{in_proj, b_gate, c_gate, x, bx, conv_out, y, out_proj}
    model.layers.3.self_attn.{q_proj, k_proj, v_proj, q_normed, k_normed, q_rope, k_rope, attn_out, out_proj}
    model.layers.3.mixer_residual                  (h + mixer output)
    model.layers.3.ffn_norm
    model.layers.3.feed_forward.{w1, w3, act, w2}  (dense SwiGLU)
    model.layers.3.feed_forward.{router_logits, selected_experts, routing_weights}  (MoE)
    model.layers.3.feed_forward.output
    model.layers.3                                 (the residual stream after the layer)
    model.embedding_norm
    lm_head                                        (the logits)

Each name may carry an alias: the name llama.cpp's graph callback gives the same tensor (its LFM2 graph
names some after the Hugging Face modules, others generically: ``Qcur-3``, ``ffn_moe_logits-3``,
``l_out-3``). Tensors are ``(T, ...)`` for one sequence of T tokens. Recording costs nothing when off: the
forward pass calls the recorder only when one is given.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from safetensors.numpy import save_file

from ..errors import Lfm2npError
from ..io.params import machine_memory
from ..io.safetensors_file import STORAGE, SafetensorsFile

# ------------------------------------------------------------------------------ aliases
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
#: llama.cpp's LFM2 graph (src/models/lfm2.cpp) names tensors with a literal "{}" where the layer goes, and its
#: graph callback appends "-{layer}" (ggml_format_name(cur, "%s-%d", name, il)): "model.layers.{}.conv.conv-3".
#: Checked against real dumps (tools/dump_llama_cpp_trace.py, llama-cpp-python 0.3.36). The FFN norm's output
#: is named "model.layers.{}.ffn_out" when it is computed (it was "...ffn_norm" when the graph was built: a
#: reshape of it is "model.layers.{}.ffn_norm-3 (reshaped)"), and the projections are "Qcur"/"Kcur"/"Vcur".
_LLAMA_HF_STYLE = {"operator_norm": "operator_norm", "conv.in_proj": "conv.in_proj", "conv.conv_out": "conv.conv",
                   "conv.out_proj": "conv.out_proj", "self_attn.q_normed": "self_attn.q_layernorm",
                   "self_attn.k_normed": "self_attn.k_layernorm", "self_attn.out_proj": "self_attn.out_proj",
                   "ffn_norm": "ffn_out"}
#: ... and the generic graph helpers name the rest "<name>-{layer}" (build_attn, build_ffn, build_moe_ffn).
#: Dense FFN layers have no name for their output (the down projection); MoE layers call it ffn_moe_out.
_LLAMA_GENERIC = {"self_attn.q_proj": "Qcur", "self_attn.k_proj": "Kcur", "self_attn.v_proj": "Vcur",
                  "self_attn.attn_out": "kqv_out", "feed_forward.w1": "ffn_gate", "feed_forward.w3": "ffn_up",
                  "feed_forward.act": "ffn_swiglu", "feed_forward.output": "ffn_moe_out"}
_LLAMA_MOE = {"feed_forward.router_logits": "ffn_moe_logits", "feed_forward.selected_experts": "ffn_moe_topk",
              "feed_forward.routing_weights": "ffn_moe_weights_norm"}


def llama_cpp_alias(name: str) -> str | None:
    """The name llama.cpp's graph callback gives the same tensor, where one exists."""
    if name == "model.embed_tokens":
        return name
    if name == "model.embedding_norm":
        return "result_norm"
    if name == "lm_head":
        return "result_output"
    m = re.fullmatch(r"model\.layers\.(\d+)", name)
    if m:
        return f"l_out-{m.group(1)}"
    m = _LAYER.match(name)
    if not m:
        return None
    i, step = m.groups()
    if step in _LLAMA_HF_STYLE:
        return f"model.layers.{{}}.{_LLAMA_HF_STYLE[step]}-{i}"
    if step in _LLAMA_GENERIC:
        return f"{_LLAMA_GENERIC[step]}-{i}"
    if step in _LLAMA_MOE:
        return f"{_LLAMA_MOE[step]}-{i}"
    return None


def matches(name: str, patterns: Sequence[str] | None) -> bool:
    return not patterns or any(fnmatch.fnmatchcase(name, p) for p in patterns)


#: Names the record protocol or llama.cpp's graph callback gives an intermediate: their values are floats,
#: except the chosen experts (integers). A trace file may hold other tensors (a dump's token ids) too.
_GENERIC = "|".join(sorted(set(_LLAMA_GENERIC.values()) | set(_LLAMA_MOE.values())))
_TRACE_NAME = re.compile(r"model\.embed_tokens|model\.embedding_norm|lm_head|result_norm|result_output|"
                         r"model\.layers\.\d+(\.[\w.]+)?|l_out-\d+|model\.layers\.\{\}\.[\w.]+-\d+|"
                         rf"({_GENERIC})-\d+")
_INTEGER_NAME = re.compile(r".*\.selected_experts|ffn_moe_topk-\d+")


def is_trace_name(name: str) -> bool:
    """Whether ``name`` is one the record protocol or llama.cpp's graph callback gives an intermediate."""
    return _TRACE_NAME.fullmatch(name) is not None


def holds_integers(name: str) -> bool:
    """Whether the intermediate ``name`` holds integers (the chosen experts) rather than floats."""
    return _INTEGER_NAME.fullmatch(name) is not None


def _check_dtype(path: Path, name: str, dtype: str) -> None:
    """A tensor under a trace name must hold floats (the chosen experts: integers)."""
    if not is_trace_name(name):
        return
    if holds_integers(name):
        if dtype[0] not in "IU":
            raise Lfm2npError(f"{path}: tensor {name!r} has dtype {dtype}; chosen experts are integers")
    elif dtype[0] != "F" and dtype != "BF16":
        raise Lfm2npError(f"{path}: tensor {name!r} has dtype {dtype}; a trace intermediate is floating point "
                          f"(F16, BF16, F32 or F64)")


def json_number(x: float) -> "float | str":
    """A float for strict JSON: itself when finite, else the string ``"inf"``, ``"-inf"`` or ``"nan"``."""
    if math.isfinite(x):
        return x
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def _json_field(path: Path, meta: dict[str, str], key: str, kind: type, default: Any) -> Any:
    """A JSON-encoded metadata field of a trace file, checked to be a ``kind``."""
    if key not in meta:
        return default
    try:
        value = json.loads(meta[key])
    except (ValueError, RecursionError) as e:
        raise Lfm2npError(f"{path}: trace metadata {key!r} is not valid JSON ({type(e).__name__})") from None
    if not isinstance(value, kind):
        raise Lfm2npError(f"{path}: trace metadata {key!r} is a JSON {type(value).__name__}; expected a "
                          f"{'list' if kind is list else 'object'}")
    return value


# -------------------------------------------------------------------------------- Trace
class Trace:
    """Named intermediates of one forward pass, in forward order."""

    def __init__(self, tensors: "dict[str, np.ndarray] | None" = None, meta: "dict[str, Any] | None" = None):
        self.tensors: dict[str, np.ndarray] = dict(tensors or {})
        self.meta: dict[str, Any] = dict(meta or {})

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
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_suffix(".safetensors")
        order = list(self.tensors)
        try:
            save_file({n: np.ascontiguousarray(a) for n, a in self.tensors.items()}, str(path),
                      metadata={"lfm2np_trace": "1", "order": json.dumps(order), "meta": json.dumps(self.meta)})
        except Exception as e:  # safetensors' own error type: a directory in the way, a full disk
            raise Lfm2npError(f"{path}: cannot write the trace ({e})") from None
        summary = {n: {k: json_number(v) if isinstance(v, float) else v for k, v in row.items()}
                   for n, row in self.summary().items()}  # strict JSON: a NaN tensor's mean is "nan"
        path.with_suffix(".json").write_text(json.dumps({"meta": self.meta, "tensors": summary}, indent=1,
                                                        allow_nan=False))
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
        path = Path(path)
        f = SafetensorsFile(path, dtypes=tuple(STORAGE))
        order = _json_field(path, f.metadata, "order", list, list(f.tensors))
        for name in order:
            if not isinstance(name, str) or name not in f.tensors:
                raise Lfm2npError(f"{path}: trace metadata 'order' lists {name!r:.80}, which the file does not hold")
        seen: set[str] = set()
        twice = next((n for n in order if n in seen or seen.add(n)), None)  # linear: order may be long
        if twice is not None or len(seen) != len(f.tensors):
            problem = f"lists {twice!r} twice" if twice is not None else \
                f"leaves out tensor {next(n for n in f.tensors if n not in seen)!r}"
            raise Lfm2npError(f"{path}: trace metadata 'order' {problem}; expected each tensor once")
        meta = _json_field(path, f.metadata, "meta", dict, {})
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
                raise Lfm2npError(f"{path}: out of memory reading tensor {name!r}") from None
        return cls(tensors, meta)


#: transformers forward-hook captures (module path + ".output", or a function-level step) -> trace names.
_FROM_TRANSFORMERS = [
    (r"model\.embed_tokens\.output", "model.embed_tokens"),
    (r"model\.layers\.(\d+)\.operator_norm\.output", r"model.layers.\1.operator_norm"),
    (r"model\.layers\.(\d+)\.conv\.in_proj\.output", r"model.layers.\1.conv.in_proj"),
    (r"model\.layers\.(\d+)\.conv\.(bx|conv_out)", r"model.layers.\1.conv.\2"),
    (r"model\.layers\.(\d+)\.conv\.output", r"model.layers.\1.conv.out_proj"),
    (r"model\.layers\.(\d+)\.self_attn\.(q|k)_layernorm\.output", r"model.layers.\1.self_attn.\2_normed"),
    (r"model\.layers\.(\d+)\.self_attn\.(q_rope|k_rope|attn_out)", r"model.layers.\1.self_attn.\2"),
    (r"model\.layers\.(\d+)\.self_attn\.output", r"model.layers.\1.self_attn.out_proj"),
    (r"model\.layers\.(\d+)\.ffn_norm\.output", r"model.layers.\1.ffn_norm"),
    (r"model\.layers\.(\d+)\.feed_forward\.gate\.(router_logits|selected_experts|routing_weights)",
     r"model.layers.\1.feed_forward.\2"),
    (r"model\.layers\.(\d+)\.feed_forward\.output", r"model.layers.\1.feed_forward.output"),
    (r"model\.layers\.(\d+)\.output", r"model.layers.\1"),
    (r"model\.embedding_norm\.output", "model.embedding_norm"),
    (r"lm_head\.output", "lm_head"),
]


def from_transformers(captured: "dict[str, np.ndarray]") -> Trace:
    """A trace from tensors captured with forward hooks on a transformers LFM2 model (keys: module path +
    ``.output``, as ``tools/make_fixtures.py`` and ``tools/dump_transformers_trace.py`` record them)."""
    tensors = {}
    for key, value in captured.items():
        for pattern, name in _FROM_TRANSFORMERS:
            if re.fullmatch(pattern, key):
                tensors[re.sub(pattern, name, key)] = value
                break
    return Trace(tensors, {"source": "transformers"})


def record(model: Any, ids: Any, patterns: Sequence[str] | None = None,
           progress: Any = None) -> tuple[np.ndarray, Trace]:
    """Run ``model`` on one sequence ``ids`` (T,) and record the intermediates whose names match one of
    ``patterns`` (fnmatch globs, e.g. ``"model.layers.3.*"``; None: all). Returns the logits and the trace.
    (The names and the recording protocol are :meth:`lfm2np.Model.forward`'s ``record``.)"""
    ids = model.check_ids(ids)
    if ids.ndim != 1:
        raise Lfm2npError(f"a trace records one sequence, shape (T,); got shape {ids.shape}")
    tensors: dict[str, np.ndarray] = {}

    def keep(name: str, value: np.ndarray) -> None:
        if matches(name, patterns):
            tensors[name] = np.array(value)

    # progress goes only to a model that asked for it: a stand-in model need not know the keyword
    extra = {} if progress is None else {"progress": progress}
    logits = model.forward(ids, record=keep, **extra)
    meta = {"ids": ids.tolist(), "dtype": model.numerics.name, "model": model.config.source,
            "model_type": model.config.model_type}
    return logits, Trace(tensors, meta)


def hidden_states(model: Any, ids: Any, *, final_norm: bool = True) -> list[np.ndarray]:
    """The residual stream after each layer, as transformers' ``output_hidden_states=True`` gives it:
    a list of ``num_hidden_layers + 1`` arrays ``(T, D)`` for one sequence ``ids`` (T,).

    ``hidden_states[0]`` is the embedding output and ``hidden_states[i + 1]`` the output of layer ``i``,
    except the last entry: transformers 5 ties it to ``last_hidden_state``, i.e. the final norm
    (``model.embedding_norm``) applied to the last layer's output. ``final_norm=False`` gives the last
    layer's raw output there instead (the trace's ``model.layers.{L-1}``). Built on the record protocol:
    the same values as the trace names ``model.embed_tokens``, ``model.layers.{i}``, ``model.embedding_norm``."""
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
