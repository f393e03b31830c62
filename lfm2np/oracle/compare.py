"""Comparing two traces: the verdict a backend author can trust.

``compare(a, b)`` judges trace ``a`` (the backend under test) against trace ``b`` (the reference) tensor by tensor,
in forward order, at a tier of :data:`lfm2np.oracle.tolerance.COMPARE_TIERS`. The verdict depends on the values
alone: not on which trace is given first, on the names the tools gave the tensors, on their order in the files,
or on a tensor given twice.

- **Names, on both sides.** Every tensor is named by lfm2np's trace schema, whatever the tool that wrote it:
  lfm2np, llama.cpp's graph callback (``Qcur-3``, ``result_output``), a transformers forward-hook capture
  (:func:`lfm2np.schema.canonical_name`). One value under two names (``lm_head`` and ``result_output``) must hold
  the same numbers; different numbers are an error naming both. Names that are no schema value are listed.
- **The same run, or an error.** Both traces must have run the same ids (their ``ids``, from the trace's metadata
  or an ``ids`` tensor): otherwise an :class:`~lfm2np.errors.Lfm2npError` says where they first differ. Traces of
  different lengths are refused unless ``prefix=True`` compares their common prefix. A trace without ids gets a
  warning: nothing then checks that the two traces saw the same input.
- **Measures, symmetric.** Per tensor: ``max_rel = max|a - b| / max(max|a|, max|b|)``, the NMSE
  ``sum (a-b)^2 / max(sum a^2, sum b^2)`` in dB, the cosine; a tensor passes when both are within the tier. A
  NaN or an infinity in either trace fails the tensor, so does a float intermediate held as integers.
- **Routing.** Where the two traces chose other experts for a token, the choice is a *near-tie* when, in both
  traces that hold router scores (``biased_scores``, else ``router_scores``), the experts only one side chose are
  within the tier of each other (``tier.max_rel`` of the scores' scale): a correct lower-precision run may choose
  either. Otherwise it is a *flip*, and the chosen experts fail. Every near-tie and flip is listed. A near-tie
  changes the token's expert outputs, and through them every later position: from the near-tie on, later tensors
  are judged on the positions before it (``positions``); :func:`lfm2np.oracle.follow.following` recomputes the
  reference with the backend's choices at its near-ties, so that everything can be judged.
- **Coverage is part of the verdict.** The report counts the reference's tensors compared and the layers they
  cover; when nothing after the embeddings is shared, or fewer than half the reference's layers, the comparison
  shares too little to localise a divergence: "not enough in common", not a pass (``partial=True`` accepts it).
- **Where.** The first divergence names the tensor, its layer and the first position beyond the tier.

:meth:`Comparison.to_json` is strict JSON: non-finite measures are the strings ``"inf"``, ``"-inf"``, ``"nan"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..errors import Lfm2npError, shown
from ..schema import holds_integers, is_trace_name, layer_of, per_position
from .routing import Flip, canonical_order, choice_scores, classify_routing
from .runs import canonical_tensors, reference_notes, same_run
from .tolerance import CompareTier, compare_tier
from .trace import Trace, checked_patterns, json_number, matches

@dataclass(frozen=True)
class TensorDiff:
    """One tensor of both traces: the measures, whether it is within the tier, and where it first is not.
    ``position``: the first position (row) beyond the tier; ``positions``: how many positions were judged (None:
    all of them)."""

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
    position: int | None = None
    positions: int | None = None

    @property
    def layer(self) -> int | None:
        return layer_of(self.name)


@dataclass(frozen=True)
class Coverage:
    """How much of the reference was compared: tensors, and layers (the reference's, and those compared)."""

    compared: int
    reference: int
    layers: tuple[int, ...]
    reference_layers: tuple[int, ...]
    after_embeddings: bool

    @property
    def enough(self) -> bool:
        """Whether the shared tensors can localise a divergence: something after the embeddings, and at least half
        of the reference's layers."""
        return self.after_embeddings and 2 * len(self.layers) >= len(self.reference_layers)

    def describe(self) -> str:
        return (f"compared {self.compared} of the reference's {self.reference} tensors, in "
                f"{len(self.layers)} of its {len(self.reference_layers)} layers"
                + ("" if self.after_embeddings else "; nothing after the embeddings"))


@dataclass
class Comparison:
    tier: CompareTier
    diffs: list[TensorDiff]
    only_in_a: list[str]
    only_in_b: list[str]
    coverage: Coverage
    flips: list[Flip] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    partial: bool = False
    ids: list[int] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def first_divergence(self) -> TensorDiff | None:
        """The first tensor, in forward order, outside the tier."""
        return next((d for d in self.diffs if not d.ok), None)

    @property
    def enough(self) -> bool:
        return bool(self.diffs) and (self.coverage.enough or self.partial)

    @property
    def ok(self) -> bool:
        return self.first_divergence is None and self.enough

    @property
    def near_ties(self) -> list[Flip]:
        return [f for f in self.flips if f.near_tie]

    def verdict(self) -> str:
        """One line: agree, the first divergence (tensor, layer, position), or not enough in common."""
        first = self.first_divergence
        if first is not None:
            where = "" if first.layer is None else f" (layer {first.layer}"
            if first.position is not None:
                where += f", position {first.position}" if where else f" (position {first.position}"
            detail = first.problem or (f"max_rel {first.max_rel:.3g}, NMSE {first.nmse_db:.1f} dB"
                                       + (f", routing agreement {first.routing_agreement:.1%}"
                                          if first.routing_agreement is not None else ""))
            return f"FIRST DIVERGENCE: {first.name}{where + ')' if where else ''}: {detail}"
        if not self.enough:
            return f"NOT ENOUGH IN COMMON: {self.coverage.describe()}: a divergence could not be localised"
        ties = f", {len(self.near_ties)} near-tie expert choices" if self.near_ties else ""
        return f"AGREE: all {len(self.diffs)} tensors within the {self.tier.name} tier{ties}"

    def routing(self) -> dict[str, float]:
        return {d.name: d.routing_agreement for d in self.diffs if d.routing_agreement is not None}

    def to_json(self) -> dict[str, Any]:
        """The comparison as strict JSON data: non-finite measures are the strings "inf", "-inf", "nan"."""
        first = self.first_divergence
        n = json_number
        c = self.coverage
        return {"tier": self.tier.name, "ok": self.ok, "verdict": self.verdict(),
                "first_divergence": None if first is None else
                {"tensor": first.name, "layer": first.layer, "position": first.position, "max_rel": n(first.max_rel),
                 "nmse_db": n(first.nmse_db), "problem": first.problem or None},
                "enough": self.enough, "partial": self.partial,
                "coverage": {"compared": c.compared, "reference": c.reference, "layers": list(c.layers),
                             "reference_layers": list(c.reference_layers), "after_embeddings": c.after_embeddings},
                "compared": len(self.diffs), "only_in_a": self.only_in_a, "only_in_b": self.only_in_b,
                "routing_agreement": {k: n(v) for k, v in self.routing().items()},
                "flips": [f.to_json() for f in self.flips], "warnings": self.warnings, "notes": self.notes,
                "ids": self.ids,
                "tensors": [{"name": d.name, "layer": d.layer, "shape": [int(x) for x in d.shape],
                             "max_abs": n(d.max_abs), "max_rel": n(d.max_rel), "nmse": n(d.nmse),
                             "nmse_db": n(d.nmse_db), "cosine": n(d.cosine), "ok": d.ok, "position": d.position,
                             "positions": d.positions, **({"problem": d.problem} if d.problem else {})}
                            for d in self.diffs]}


# ----------------------------------------------------------------------------------------- one tensor
def _failed(name: str, shape: tuple[int, ...], problem: str) -> TensorDiff:
    return TensorDiff(name, shape, math.inf, math.inf, math.inf, math.inf, 0.0, None, False, problem)


def aligned(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``a`` and ``b`` in one shape where they hold the same number of values laid out alike: axes of length 1
    dropped (a dump may keep a batch axis), and the axes after the first split alike (``(T, H * hd)`` as
    ``(T, H, hd)``; compared in memory order, a layout that really differs still shows as a divergence)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape and a.size == b.size and np.squeeze(a).shape == np.squeeze(b).shape:
        a, b = np.squeeze(a), np.squeeze(b)
    if a.shape != b.shape and a.size == b.size and a.ndim and b.ndim and a.shape[0] == b.shape[0]:
        a = a.reshape(b.shape)
    return a, b


def diff_tensors(name: str, a: np.ndarray, b: np.ndarray, tier: CompareTier) -> TensorDiff:
    """The measures of ``a`` against ``b`` (symmetric: see the module docstring). Axes of length 1 are ignored
    (a dump may keep a batch axis), and so are splits of the axes after the first (``(T, H * hd)`` as
    ``(T, H, hd)``: the values are compared in memory order, so a layout that really differs shows as a
    divergence); other shape differences fail the tensor."""
    a, b = aligned(a, b)
    if a.shape != b.shape:
        return _failed(name, a.shape, f"shape {list(a.shape)} vs reference {list(b.shape)}")
    experts = holds_integers(name)
    kinds = "iu" if experts else "f" if is_trace_name(name) else "fiub"
    for which, x in (("A", a), ("reference", b)):
        if x.dtype.kind not in kinds:
            expected = {"iu": "integers (chosen experts)", "f": "floats (an intermediate)"}.get(kinds, "numbers")
            return _failed(name, a.shape, f"{which} holds {x.dtype}; expected {expected}")
    if experts or (a.dtype.kind in "iub" and b.dtype.kind in "iub"):  # integers: exact (in float64: no wrap-around)
        same = bool(np.array_equal(a.astype(np.float64), b.astype(np.float64)))
        gap = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0
        return TensorDiff(name, a.shape, gap, 0.0 if same else math.inf, 0.0 if same else math.inf,
                          -math.inf if same else math.inf, 1.0 if same else 0.0, None, same,
                          "" if same else "integers differ")
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    finite = np.isfinite(a64) & np.isfinite(b64)
    if not finite.all():
        d = diff_tensors(name, a64[finite], b64[finite], tier)
        problems = [_non_finite(which, x) for which, x in (("A", a64), ("reference", b64))]
        return TensorDiff(name, a.shape, d.max_abs, d.max_rel, d.nmse, d.nmse_db, d.cosine, None, False,
                          "; ".join(p for p in problems if p) + " (measures over the finite positions)",
                          _first_row(a64, b64, tier.max_rel) if per_position(name) and a64.ndim else None)
    max_rel, nmse, cosine, max_abs = _measures(a64, b64)
    nmse_db = 10 * math.log10(nmse) if nmse > 0 else -math.inf
    ok = max_rel <= tier.max_rel and nmse_db <= tier.nmse_db
    position = None if ok or not per_position(name) or a64.ndim == 0 else _first_row(a64, b64, tier.max_rel)
    return TensorDiff(name, a.shape, max_abs, max_rel, nmse, nmse_db, cosine, None, ok, "", position)


def _measures(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float, float]:
    """max_rel, nmse, cosine and max_abs of two finite float64 arrays, each symmetric in a and b."""
    if not a.size:
        return 0.0, 0.0, 1.0, 0.0
    d = a - b
    max_abs = float(np.max(np.abs(d)))
    scale = max(float(np.max(np.abs(a))), float(np.max(np.abs(b))))
    if scale == 0.0:
        return 0.0, 0.0, 1.0, 0.0
    a, b, d = a / scale, b / scale, d / scale  # sums of squares cannot overflow
    energy = max(float(np.sum(a * a)), float(np.sum(b * b)))
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    cosine = float(np.sum(a * b) / (na * nb)) if na and nb else (1.0 if na == nb else 0.0)
    return max_abs / scale, float(np.sum(d * d)) / energy, cosine, max_abs


def _first_row(a: np.ndarray, b: np.ndarray, limit: float) -> int:
    """The first position whose error, ``max|a_t - b_t| / max(max|a|, max|b|)`` over the finite values, passes
    ``limit`` (the worst one when none does: only the NMSE failed)."""
    scale = max(float(np.max(np.abs(np.where(np.isfinite(x), x, 0)))) for x in (a, b)) if a.size else 0.0
    with np.errstate(invalid="ignore"):
        d = np.abs(a - b).reshape(a.shape[0], -1)
    d = np.where(np.isnan(d), np.inf, d)  # a NaN on one side is as far as it gets
    err = d.max(axis=-1) / scale if scale else np.where(d.max(axis=-1) > 0, np.inf, 0.0)
    bad = np.flatnonzero(err > limit)
    return int(bad[0]) if bad.size else int(np.argmax(err))


def _non_finite(which: str, x: np.ndarray) -> str:
    """``"A has 2 NaN, 1 inf (first at index (0, 5))"``, or "" when every value is finite."""
    bad = ~np.isfinite(x)
    if not bad.any():
        return ""
    n_nan = int(np.isnan(x).sum())
    counts = ", ".join(f"{n} {kind}" for n, kind in ((n_nan, "NaN"), (int(bad.sum()) - n_nan, "inf")) if n)
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    return f"{which} has {counts} (first at index {first[0] if len(first) == 1 else first})"


# -------------------------------------------------------------------------------------------- compare
def compare(a: Trace, b: Trace, tier: "str | CompareTier" = "fp32", patterns: Sequence[str] | None = None, *,
            prefix: bool = False, partial: bool = False) -> Comparison:
    """Judge trace ``a`` (the backend under test) against trace ``b`` (the reference): see the module docstring.
    ``patterns`` (fnmatch globs of lfm2np names) restricts the tensors compared; ``prefix`` compares traces of
    different lengths on their common prefix; ``partial`` accepts a comparison that shares too little to
    localise a divergence."""
    for label, trace in (("a", a), ("b", b)):
        if not isinstance(trace, Trace):
            raise Lfm2npError(f"compare: {label} must be a Trace (lfm2np.oracle.trace.Trace.load reads one); got "
                              f"{type(trace).__name__}")
    for label, flag in (("prefix", prefix), ("partial", partial)):
        if not isinstance(flag, (bool, np.bool_)):
            raise Lfm2npError(f"compare: {label} must be True or False; got {shown(flag)}")
    tier = compare_tier(tier)
    patterns = checked_patterns(patterns)
    warnings: list[str] = []
    ids, length = same_run(a, b, prefix, warnings)
    ta, unknown_a = canonical_tensors(a, "A")
    tb, unknown_b = canonical_tensors(b, "B")
    for label, unknown in (("A", unknown_a), ("B", unknown_b)):
        if unknown:
            warnings.append(f"trace {label}: {len(unknown)} tensors name no intermediate (e.g. {unknown[0]!r})")
    common = [n for n in tb if n in ta and matches(n, patterns)]
    diffs, flips, cut = [], [], None  # cut: positions judged after a near-tie (the first near-tie's position)
    layers_done: set[int] = set()
    for name in common:
        va, vb = ta[name], tb[name]
        layer = layer_of(name)
        if layer is not None and layer not in layers_done and name.endswith(".selected_experts"):
            layers_done.add(layer)
            ta, tb = canonical_order(ta, layer), canonical_order(tb, layer)
            va, vb = ta[name], tb[name]
        va, vb = aligned(va, vb)
        rows = length
        if per_position(name) and va.ndim and va.shape[1:] == vb.shape[1:] and va.shape[0] != vb.shape[0] \
                and rows is None:  # no ids to tell: the traces' own rows
            if not prefix:
                raise Lfm2npError(f"the traces ran inputs of different lengths ({name}: A has {va.shape[0]} rows, B "
                                  f"{vb.shape[0]}): compare their common prefix with prefix=True (--prefix)")
            length = rows = min(va.shape[0], vb.shape[0])
        if cut is not None and per_position(name):
            rows = cut if rows is None else min(rows, cut)
        if rows is not None and per_position(name) and va.ndim and vb.ndim:
            va, vb = va[:rows], vb[:rows]
        d = diff_tensors(name, va, vb, tier)
        if name.endswith(".selected_experts") and d.problem in ("", "integers differ"):
            sa, sb = choice_scores(ta, layer), choice_scores(tb, layer)
            if rows is not None:  # the scores of the positions judged, as the choices
                sa, sb = (None if x is None else x[:rows] for x in (sa, sb))
            d, new = _routing_verdict(d, layer, va, vb, sa, sb, tier)
            flips += new
            ties = [f.position for f in new if f.near_tie]
            if ties and d.ok:
                cut = min(ties) if cut is None else min(cut, min(ties))
        if rows is not None and per_position(name):
            d = TensorDiff(**{**d.__dict__, "positions": rows})
        diffs.append(d)
    only_a = [n for n in ta if n not in tb and matches(n, patterns)]
    only_b = [n for n in tb if n not in ta and matches(n, patterns)]
    reference = [n for n in tb if matches(n, patterns)]
    coverage = Coverage(len(diffs), len(reference), tuple(sorted({d.layer for d in diffs if d.layer is not None})),
                        tuple(sorted({layer_of(n) for n in reference if layer_of(n) is not None})),
                        any(not (d.name == "model.embed_tokens" or d.name.startswith("model.rotary_emb."))
                            for d in diffs))
    return Comparison(tier, diffs, only_a, only_b, coverage, flips, warnings, partial, ids, reference_notes(a, b, tier))


def _routing_verdict(d: TensorDiff, layer: int, ea: np.ndarray, eb: np.ndarray, sa: np.ndarray | None,
                     sb: np.ndarray | None, tier: CompareTier) -> tuple[TensorDiff, list[Flip]]:
    """The chosen experts of ``layer`` judged token by token: near-ties pass, flips fail."""
    flips = classify_routing(layer, ea, eb, sa, sb, tier)
    tokens = max(1, int(np.asarray(ea).reshape(-1, ea.shape[-1] if ea.ndim else 1).shape[0]))
    agreement = 1.0 - len(flips) / tokens
    real = [f for f in flips if not f.near_tie]
    if not real:
        return TensorDiff(d.name, d.shape, d.max_abs, 0.0, 0.0, -math.inf, 1.0, agreement, True), flips
    unknown = all(f.margin is None for f in real)
    problem = (f"{len(real)} tokens chose other experts"
               + (" (no router scores in the traces to tell a near-tie)" if unknown else
                  f" beyond a near-tie (margin {max(f.margin for f in real if f.margin is not None):.3g} > "
                  f"{real[0].tolerance:.3g})"))
    return TensorDiff(d.name, d.shape, d.max_abs, math.inf, math.inf, math.inf, 0.0, agreement, False, problem,
                      real[0].position), flips


def format_comparison(c: Comparison, all_rows: bool = False) -> str:
    """A readable report: the verdict, coverage, routing, warnings, then one row per tensor (up to the first
    divergence unless ``all_rows``)."""
    lines = [c.verdict(),
             f"tier {c.tier.name}: max_rel <= {c.tier.max_rel:g}, NMSE <= {c.tier.nmse_db:g} dB ({c.tier.why})",
             f"coverage: {c.coverage.describe()}" + (" (partial comparison accepted)" if c.partial else "")]
    for f in c.flips:
        kind = "near-tie" if f.near_tie else "FLIP"
        margin = "no scores" if f.margin is None else f"margin {f.margin:.3g} vs tolerance {f.tolerance:.3g}"
        lines.append(f"  {kind}: layer {f.layer}, position {f.position}: A chose {list(f.only_a)}, B chose "
                     f"{list(f.only_b)} ({margin})")
    if c.near_ties:
        lines.append(f"  later tensors judged on positions before {min(f.position for f in c.near_ties)} (a near-tie "
                     f"changes every later position); lfm2np.oracle.follow recomputes the reference on the same "
                     f"choices")
    lines += [f"warning: {w}" for w in c.warnings] + [f"note: {n}" for n in c.notes]
    lines.append(f"{'tensor':56s} {'max_abs':>10s} {'max_rel':>10s} {'NMSE dB':>9s} {'cosine':>10s}  ok")
    first = c.first_divergence
    for d in c.diffs:
        extra = f"  experts agree {d.routing_agreement:.1%}" if d.routing_agreement is not None else ""
        extra += f"  (positions < {d.positions})" if d.positions is not None else ""
        lines.append(f"{d.name:56s} {d.max_abs:10.3g} {d.max_rel:10.3g} {d.nmse_db:9.1f} {d.cosine:10.7f}"
                     f"  {'yes' if d.ok else 'NO'}{extra}")
        if d is first and not all_rows:
            lines.append(f"... {len(c.diffs) - c.diffs.index(d) - 1} more (--all to show)")
            break
    if c.only_in_a or c.only_in_b:
        lines.append(f"not compared: {len(c.only_in_a)} only in A, {len(c.only_in_b)} only in B")
    return "\n".join(lines)
