"""Comparing two traces tensor by tensor, in forward order, and naming the first divergence.

Error measures per tensor: max_abs, max_rel (``max|a - b| / max|b|``, :func:`lfm2np.oracle.tolerance.rel_error`),
the normalised mean squared error in dB, the cosine, and for chosen experts the routing agreement
(fraction of tokens with the same expert set), reported separately because routing is discrete. The
tiers are :data:`lfm2np.oracle.tolerance.COMPARE_TIERS`.

Nothing passes by accident: a tensor holding a NaN or an infinity in either trace fails, whatever its
other values, with a ``problem`` saying how many and where the first is (its error measures are then
those of the positions where both are finite); so does a tensor that is not numeric, or a float
intermediate held as integers or bools. :meth:`Comparison.to_json` is strict JSON: a non-finite measure
(``nmse_db`` is ``"-inf"`` for identical tensors, ``max_rel`` ``"inf"`` against an all-zero reference)
is written as the string ``"inf"``, ``"-inf"`` or ``"nan"``, never as the non-standard
``Infinity``/``NaN`` tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..errors import Lfm2npError
from .tolerance import COMPARE_TIERS, CompareTier, rel_error
from .trace import Trace, holds_integers, is_trace_name, json_number, llama_cpp_alias, matches


@dataclass(frozen=True)
class TensorDiff:
    name: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    nmse: float
    nmse_db: float
    cosine: float
    routing_agreement: float | None  # for selected_experts: fraction of tokens with the same expert set
    ok: bool
    problem: str = ""


def diff_tensors(name: str, a: np.ndarray, b: np.ndarray, tier: CompareTier) -> TensorDiff:
    """Error metrics of ``a`` against the reference ``b``. Axes of length 1 are ignored (a dump may keep a
    batch or sequence axis), and so are splits of the axes after the first (``(T, H * hd)`` as ``(T, H, hd)``:
    the values are compared in memory order, so a layout that really differs shows as a divergence); other
    shape differences are reported as a failed tensor."""
    if a.shape != b.shape and a.size == b.size and np.squeeze(a).shape == np.squeeze(b).shape:
        a, b = np.squeeze(a), np.squeeze(b)
    if a.shape != b.shape and a.size == b.size and a.ndim and b.ndim and a.shape[0] == b.shape[0]:
        a = a.reshape(b.shape)
    if a.shape != b.shape:
        return TensorDiff(name, a.shape, math.inf, math.inf, math.inf, math.inf, 0.0, None, False,
                          f"shape {list(a.shape)} vs reference {list(b.shape)}")
    experts = name.endswith("selected_experts") or holds_integers(name)
    kinds = "iu" if experts else "f" if is_trace_name(name) else "fiub"
    for which, x in (("A", a), ("reference", b)):
        if x.dtype.kind not in kinds:
            expected = {"iu": "integers (chosen experts)", "f": "floats (an intermediate)"}.get(kinds, "numbers")
            return TensorDiff(name, a.shape, math.inf, math.inf, math.inf, math.inf, 0.0, None, False,
                              f"{which} holds {x.dtype}; expected {expected}")
    if not experts and a.dtype.kind in "iub" and b.dtype.kind in "iub":  # another tensor of integers: exact
        # in float64: an int64 difference wraps for uint64 values past 2^63 (or opposite int64 extremes)
        d = np.abs(a.astype(np.float64) - b.astype(np.float64)) if a.size else np.zeros(1)
        same = bool(np.array_equal(a, b))
        return TensorDiff(name, a.shape, float(d.max()), 0.0 if same else math.inf, 0.0 if same else math.inf,
                          -math.inf if same else math.inf, 1.0 if same else 0.0, None, same,
                          "" if same else "integers differ")
    if experts:
        if not a.size:
            return TensorDiff(name, a.shape, 0.0, 0.0, 0.0, -math.inf, 1.0, 1.0, True)
        # per token, the set of experts (rows of the last axis; a scalar is one token's one expert)
        ea, eb = (np.sort(x.astype(np.int64).reshape(-1, x.shape[-1] if x.ndim else 1), axis=-1) for x in (a, b))
        agreement = float(np.all(ea == eb, axis=-1).mean())
        ok = agreement == 1.0 or not tier.exact_routing
        gap = float(np.max(np.abs(ea.astype(np.float64) - eb.astype(np.float64))))  # (no int64 wrap-around)
        return TensorDiff(name, a.shape, gap, 0.0, 0.0, -math.inf, 1.0, agreement, ok)
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    finite = np.isfinite(a64) & np.isfinite(b64)
    if not finite.all():
        diff = diff_tensors(name, a64[finite], b64[finite], tier)
        problems = [_non_finite(which, x) for which, x in (("A", a64), ("reference", b64))]
        return TensorDiff(name, a.shape, diff.max_abs, diff.max_rel, diff.nmse, diff.nmse_db, diff.cosine, None,
                          False, "; ".join(p for p in problems if p) + " (measures over the finite positions)")
    d = a64 - b64
    max_abs = float(np.max(np.abs(d))) if d.size else 0.0
    max_rel = rel_error(a64, b64)
    scale = max(float(np.max(np.abs(a64))), float(np.max(np.abs(b64)))) if a64.size else 0.0
    if scale > 1e150:  # sums of squares would overflow: measure in units of the largest value (ratios unchanged)
        a64, b64, d = a64 / scale, b64 / scale, d / scale
    energy = float(np.sum(b64 * b64))
    nmse = float(np.sum(d * d)) / energy if energy else (0.0 if max_abs == 0 else math.inf)
    nmse_db = 10 * math.log10(nmse) if nmse > 0 else -math.inf
    na, nb = float(np.linalg.norm(a64)), float(np.linalg.norm(b64))
    cosine = float(np.sum(a64 * b64) / (na * nb)) if na and nb else (1.0 if na == nb else 0.0)
    ok = max_rel <= tier.max_rel and nmse_db <= tier.nmse_db
    return TensorDiff(name, a.shape, max_abs, max_rel, nmse, nmse_db, cosine, None, ok)


def _non_finite(which: str, x: np.ndarray) -> str:
    """``"A has 2 NaN, 1 inf (first at index (0, 5))"``, or "" when every value is finite."""
    bad = ~np.isfinite(x)
    if not bad.any():
        return ""
    n_nan = int(np.isnan(x).sum())
    counts = ", ".join(f"{n} {kind}" for n, kind in ((n_nan, "NaN"), (int(bad.sum()) - n_nan, "inf")) if n)
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    return f"{which} has {counts} (first at index {first[0] if len(first) == 1 else first})"


@dataclass
class Comparison:
    tier: CompareTier
    diffs: list[TensorDiff]
    only_in_a: list[str]
    only_in_b: list[str]

    @property
    def first_divergence(self) -> TensorDiff | None:
        """The first tensor, in forward order, outside the tier."""
        return next((d for d in self.diffs if not d.ok), None)

    @property
    def ok(self) -> bool:
        return self.first_divergence is None and bool(self.diffs)

    def routing(self) -> dict[str, float]:
        return {d.name: d.routing_agreement for d in self.diffs if d.routing_agreement is not None}

    def to_json(self) -> dict[str, Any]:
        """The comparison as strict JSON data: non-finite measures are the strings "inf", "-inf", "nan"."""
        first = self.first_divergence
        n = json_number
        return {"tier": self.tier.name, "ok": self.ok, "first_divergence": first.name if first else None,
                "compared": len(self.diffs), "only_in_a": self.only_in_a, "only_in_b": self.only_in_b,
                "routing_agreement": {k: n(v) for k, v in self.routing().items()},
                "tensors": [{"name": d.name, "shape": [int(x) for x in d.shape], "max_abs": n(d.max_abs),
                             "max_rel": n(d.max_rel), "nmse": n(d.nmse), "nmse_db": n(d.nmse_db),
                             "cosine": n(d.cosine), "ok": d.ok, **({"problem": d.problem} if d.problem else {})}
                            for d in self.diffs]}


def compare(a: Trace, b: Trace, tier: "str | CompareTier" = "fp32",
            patterns: Sequence[str] | None = None) -> Comparison:
    """Compare trace ``a`` (the backend under test) with ``b`` (the reference), tensor by tensor in ``a``'s
    forward order. Names in ``b`` may be trace names or llama.cpp aliases."""
    if isinstance(tier, str):
        if tier not in COMPARE_TIERS:
            raise Lfm2npError(f"unknown tier {tier!r}; expected one of {', '.join(COMPARE_TIERS)}")
        tier = COMPARE_TIERS[tier]
    b_by_name = dict(b.tensors)
    for name in list(a.tensors):
        alias = llama_cpp_alias(name)
        if name not in b_by_name and alias and alias in b.tensors:
            b_by_name[name] = b.tensors[alias]
    diffs, only_a = [], []
    for name, value in a.tensors.items():
        if not matches(name, patterns):
            continue
        if name not in b_by_name:
            only_a.append(name)
            continue
        diffs.append(diff_tensors(name, np.asarray(value), np.asarray(b_by_name[name]), tier))
    used = set(a.tensors) | {llama_cpp_alias(n) for n in a.tensors}
    only_b = [n for n in b.tensors if n not in used]
    return Comparison(tier, diffs, only_a, only_b)


def format_comparison(c: Comparison, all_rows: bool = False) -> str:
    """A readable report: the first divergence, then one row per tensor (up to it unless ``all_rows``)."""
    lines = [f"tier {c.tier.name}: max_rel <= {c.tier.max_rel:g}, NMSE <= {c.tier.nmse_db:g} dB"
             f"{', identical experts' if c.tier.exact_routing else ''} ({c.tier.why})"]
    first = c.first_divergence
    if not c.diffs:
        lines.append("no tensor in common: nothing compared")
    elif first is None:
        lines.append(f"all {len(c.diffs)} tensors agree")
    else:
        detail = first.problem or (f"max_rel {first.max_rel:.3g}, NMSE {first.nmse_db:.1f} dB" + (
            f", routing agreement {first.routing_agreement:.1%}" if first.routing_agreement is not None else ""))
        lines.append(f"FIRST DIVERGENCE: {first.name} ({detail})")
    lines.append(f"{'tensor':56s} {'max_abs':>10s} {'max_rel':>10s} {'NMSE dB':>9s} {'cosine':>10s}  ok")
    for d in c.diffs:
        extra = f"  experts agree {d.routing_agreement:.1%}" if d.routing_agreement is not None else ""
        lines.append(f"{d.name:56s} {d.max_abs:10.3g} {d.max_rel:10.3g} {d.nmse_db:9.1f} {d.cosine:10.7f}"
                     f"  {'yes' if d.ok else 'NO'}{extra}")
        if d is first and not all_rows:
            lines.append(f"... {len(c.diffs) - c.diffs.index(d) - 1} more (--all to show)")
            break
    if c.only_in_a or c.only_in_b:
        lines.append(f"not compared: {len(c.only_in_a)} only in A, {len(c.only_in_b)} only in B")
    return "\n".join(lines)
