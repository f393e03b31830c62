"""Comparing two traces tensor by tensor, in forward order, and naming the first divergence.

Error measures per tensor: max_abs, max_rel (``max|a - b| / max|b|``, :func:`lfm2np.oracle.tolerance.rel_error`),
the normalised mean squared error in dB, the cosine, and for chosen experts the routing agreement
(fraction of tokens with the same expert set), reported separately because routing is discrete. The
tiers are :data:`lfm2np.oracle.tolerance.COMPARE_TIERS`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..errors import Lfm2npError
from .tolerance import COMPARE_TIERS, CompareTier, rel_error
from .trace import Trace, llama_cpp_alias, matches


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
    batch or sequence axis); other shape differences are reported as a failed tensor."""
    if a.shape != b.shape and a.size == b.size and np.squeeze(a).shape == np.squeeze(b).shape:
        a, b = np.squeeze(a), np.squeeze(b)
    if a.shape != b.shape:
        return TensorDiff(name, a.shape, math.inf, math.inf, math.inf, math.inf, 0.0, None, False,
                          f"shape {list(a.shape)} vs reference {list(b.shape)}")
    if name.endswith("selected_experts"):
        same = np.all(np.sort(a, axis=-1) == np.sort(b, axis=-1), axis=-1)
        agreement = float(same.mean()) if same.size else 1.0
        ok = agreement == 1.0 or not tier.exact_routing
        return TensorDiff(name, a.shape, float(np.max(np.abs(a - b))) if a.size else 0.0, 0.0, 0.0, -math.inf,
                          1.0, agreement, ok)
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d = a64 - b64
    max_abs = float(np.max(np.abs(d))) if d.size else 0.0
    max_rel = rel_error(a64, b64)
    energy = float(np.sum(b64 * b64))
    nmse = float(np.sum(d * d)) / energy if energy else (0.0 if max_abs == 0 else math.inf)
    nmse_db = 10 * math.log10(nmse) if nmse > 0 else -math.inf
    na, nb = float(np.linalg.norm(a64)), float(np.linalg.norm(b64))
    cosine = float(np.sum(a64 * b64) / (na * nb)) if na and nb else (1.0 if na == nb else 0.0)
    ok = max_rel <= tier.max_rel and nmse_db <= tier.nmse_db
    return TensorDiff(name, a.shape, max_abs, max_rel, nmse, nmse_db, cosine, None, ok)


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
        first = self.first_divergence
        return {"tier": self.tier.name, "ok": self.ok, "first_divergence": first.name if first else None,
                "compared": len(self.diffs), "only_in_a": self.only_in_a, "only_in_b": self.only_in_b,
                "routing_agreement": self.routing(),
                "tensors": [{"name": d.name, "shape": list(d.shape), "max_abs": d.max_abs, "max_rel": d.max_rel,
                             "nmse": d.nmse, "nmse_db": d.nmse_db, "cosine": d.cosine, "ok": d.ok,
                             **({"problem": d.problem} if d.problem else {})}
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
