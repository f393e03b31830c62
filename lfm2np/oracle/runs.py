"""What two traces ran: their values under lfm2np's names, their ids, and the weights behind them.

- :func:`canonical_tensors`: a trace's intermediates under lfm2np's names whatever tool named them
  (:func:`lfm2np.schema.canonical_name`); one value under two names must hold the same numbers.
- :func:`trace_ids` and :func:`same_run`: the ids each trace ran (metadata or an ``ids`` tensor), refused when
  they differ, a common prefix only on request.
- :func:`ran_a_gguf` and :func:`reference_notes`: a backend that ran a GGUF (lfm2np's trace metadata says so, or
  llama.cpp named its tensors) judged against a reference that did not run the same file: what the comparison
  then measures, and which reference answers which question.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import Lfm2npError
from ..schema import LLAMA_CPP_NAME, canonical_name, is_trace_name, order_key
from .tolerance import CompareTier
from .trace import Trace

#: tensors a trace file may hold beside its intermediates: what the run was given, not what it computed
INPUTS = ("ids", "prefill", "positions")


def canonical_tensors(trace: Trace, label: str) -> tuple[dict[str, np.ndarray], list[str]]:
    """The trace's intermediates under lfm2np's names, in forward order, and the keys that name none. One value
    given under two names must hold the same numbers (an :class:`Lfm2npError` naming both otherwise)."""
    out: dict[str, np.ndarray] = {}
    source: dict[str, str] = {}
    unknown = []
    for key, value in trace.tensors.items():
        if key in INPUTS:
            continue
        name = canonical_name(key)
        if name is None:
            unknown.append(key)
            continue
        value = np.asarray(value)
        if name in out:
            held = out[name]
            same = held.size == value.size and np.array_equal(held.reshape(-1), value.reshape(-1), equal_nan=True) \
                if held.dtype.kind == "f" and value.dtype.kind == "f" else \
                held.size == value.size and np.array_equal(held.reshape(-1), value.reshape(-1))
            if not same:
                raise Lfm2npError(f"trace {label}: {source[name]!r} and {key!r} both name {name} but hold different "
                                  f"values: which one did the backend compute?")
            continue
        out[name], source[name] = value, key
    return {n: out[n] for n in sorted(out, key=order_key)}, unknown


def trace_ids(trace: Trace, label: str) -> list[int] | None:
    """The ids a trace ran (its metadata's ``ids`` or an ``ids`` tensor; both must agree), or None. ``label``
    begins the messages ("trace A", a dump's path)."""
    found = []
    if "ids" in trace.meta:
        found.append(("metadata", trace.meta["ids"]))
    if "ids" in trace.tensors:
        found.append(("tensor", trace.tensors["ids"]))
    out = None
    for where, value in found:
        a = np.asarray(value)
        if a.dtype == bool or not (np.issubdtype(a.dtype, np.integer) or a.size == 0) or a.ndim != 1:
            raise Lfm2npError(f"{label}: its ids ({where}) are not a list of integers")
        ids = [int(x) for x in a]
        if out is not None and ids != out:
            raise Lfm2npError(f"{label}: its metadata's ids and its ids tensor differ")
        out = ids
    return out


def same_run(a: Trace, b: Trace, prefix: bool, warnings: list[str]) -> tuple[list[int] | None, int | None]:
    """The ids both traces ran (refused when they differ), and the positions to compare (None: all)."""
    ids = {label: trace_ids(t, f"trace {label}") for label, t in (("A", a), ("B", b))}
    for label, got in ids.items():
        if got is None:
            warnings.append(f"trace {label} records no ids: nothing checks that both traces ran the same input")
    starts = [t.meta.get("start") for t in (a, b)]
    if all(isinstance(s, int) and not isinstance(s, bool) for s in starts) and starts[0] != starts[1]:
        raise Lfm2npError(f"the traces start at other positions (A at {starts[0]}, B at {starts[1]}): they are not "
                          f"the same run")
    ia, ib = ids["A"], ids["B"]
    if ia is None or ib is None:
        return ia or ib, None
    n = min(len(ia), len(ib))
    diff = next((t for t in range(n) if ia[t] != ib[t]), None)
    if diff is not None:
        raise Lfm2npError(f"the traces ran different inputs: their ids first differ at position {diff} (A: {ia[diff]}, "
                          f"B: {ib[diff]}); compare traces of the same ids")
    if len(ia) != len(ib):
        if not prefix:
            raise Lfm2npError(f"the traces ran inputs of different lengths (A: {len(ia)} ids, B: {len(ib)}; the same "
                              f"first {n}): compare their common prefix with prefix=True (--prefix)")
        return ia[:n], n
    return ia, None


#: stored types that are no quantisation: the weights as trained (or widened)
UNQUANTISED = ("F64", "F32", "F16", "BF16", "?")


def ran_a_gguf(trace: Trace) -> dict[str, Any] | None:
    """What a trace says of the GGUF it ran: its metadata's weights (``lfm2np trace FILE.gguf``), or, for a trace
    whose tensors llama.cpp named, that it ran some GGUF (llama.cpp runs nothing else); None otherwise."""
    weights = trace.meta.get("weights")
    if isinstance(weights, dict) and weights.get("format") == "gguf":
        return weights
    if any(not is_trace_name(k) and LLAMA_CPP_NAME.fullmatch(k) for k in trace.tensors):
        return {"format": "gguf", "by": "llama.cpp"}
    return None


def reference_notes(a: Trace, b: Trace, tier: CompareTier) -> list[str]:
    """When the backend ran a GGUF and the reference did not run the same weights, what the comparison then
    measures, and which reference answers which question (docs/oracle.md)."""
    gguf = ran_a_gguf(a)
    if gguf is None:
        return []
    ref = ran_a_gguf(b) or (b.meta.get("weights") if isinstance(b.meta.get("weights"), dict) else {})
    if ref.get("format") == "gguf" and ("path" not in gguf or "path" not in ref or ref["path"] == gguf["path"]):
        return []  # the same GGUF, as far as the traces say
    types = gguf.get("types")
    types = types if isinstance(types, dict) else {}
    quantised = sorted(t for t in types if t not in UNQUANTISED)
    what = f"its weights are {', '.join(quantised)}" if quantised else \
        "llama.cpp names its tensors" if gguf.get("by") else "its weights are not quantised"
    seen = f"the reference ran {ref.get('format', 'weights its trace does not record')}" + (
        f" ({ref['path']})" if "path" in ref else "")
    return [f"trace A ran a GGUF ({what}); {seen}: its quantisation error then counts as divergence. To judge the "
            f"backend's arithmetic, take as reference lfm2np on the same GGUF (lfm2np trace FILE.gguf --ids ...) at "
            f"the fp32 tier; against the original weights, use the tier of its quantisation"
            + (f" (this comparison uses {tier.name})" if tier.name == "fp32" else "") + " (docs/oracle.md)"]
