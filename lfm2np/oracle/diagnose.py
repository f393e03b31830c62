"""Diagnosing a backend: from its dump (logits, a trace, or the tokens it generated) to the porting mistake.

:func:`diagnose` runs the reference on the dump's ids, says whether the dump agrees with it at a compare
tier (fp32 by default) and where it first diverges, then applies every applicable mistake of the
catalogue (:mod:`lfm2np.oracle.mistakes`) to the reference and ranks them by how well the mutated
reference matches the dump. A hypothesis *reproduces* the dump when the mutated reference agrees with it at
the tier. What "agrees" means per kind of dump:

- **logits**: the logits tensor within the tier (:func:`lfm2np.oracle.compare.diff_tensors`: max_rel and
  NMSE); its positions are judged one by one, ``max|a_t - b_t| / max|b|``;
- **trace**: every tensor the dump and the reference share within the tier, in forward order (the chosen
  experts identical), as ``lfm2np compare`` judges them; a hypothesis ignores the names its mistake makes
  ambiguous (:attr:`lfm2np.oracle.mistakes.Mistake.ambiguous`);
- **tokens**: the stream is run through the reference with teacher forcing (prompt + tokens, one forward
  pass), so each step is judged on the backend's own prefix; a step agrees when its token is the
  reference's argmax or within the tier's noise of it, ``max - logit[token] <= max_rel * max|logits|`` (a
  near-tie: float32 implementations may pick either). Greedy generation is deterministic, so a mutated
  reference that predicts every token of the stream on that prefix generates exactly that stream.

Hypotheses rank by: reproduces, visible (the mutation changes anything on this input), how far it explains
the dump (positions, tensors or steps before its first disagreement), its error there, and for token
streams the stream's log-likelihood under it. When no single mistake reproduces the dump, combinations of
two or three are searched (:func:`_search`: the best two, each extended by every other, and so on), and
those that reproduce are added (e.g. the three router slips of ml-explore/mlx-lm#1883 at once).
"""

from __future__ import annotations

import fnmatch
import math
import os
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Sequence

import numpy as np

from ..errors import Lfm2npError
from . import mistakes as M
from .compare import compare, diff_tensors
from .dumps import Dump, align, canonical_routing
from .tolerance import COMPARE_TIERS, CompareTier
from ..schema import per_position
from .trace import Trace

#: The search for combinations keeps this many candidates per size, up to this many mistakes at once.
COMBINE_BEAM, COMBINE_UP_TO = 2, 3


@dataclass
class Hypothesis:
    """One mistake (or combination) applied to the reference, judged against the dump. ``where``: the first
    intermediate the mistake changes on this input (None: it changes nothing); ``visible``: whether it changes
    what this dump shows (a mistake in attention scores is invisible in the logits of one position);
    ``explained``: positions (logits), tensors (trace) or steps (tokens) it matches before its first
    disagreement; ``error``: the max_rel there (logits, trace) or the largest relative logit deficit of a
    backend token (tokens); ``first_disagreement``: where it still differs from the dump (None: reproduces)."""

    id: str
    variant: str
    switches: dict[str, Any]
    reproduces: bool
    error: float
    where: dict[str, Any] | None
    explained: int
    first_disagreement: dict[str, Any] | None
    visible: bool
    log_likelihood: float | None = None
    size: int = 1

    def rank_key(self) -> tuple:
        err = self.error if not math.isnan(self.error) else math.inf
        return (not self.reproduces, self.size if self.reproduces else 0, not self.visible, -self.explained, err,
                -(self.log_likelihood or 0.0))

    def to_json(self) -> dict[str, Any]:
        out = {"id": self.id, "variant": self.variant, "reproduces": self.reproduces, "error": _finite(self.error),
               "where": self.where, "visible": self.visible, "explained": self.explained,
               "first_disagreement": self.first_disagreement, "params": self.switches}
        if self.log_likelihood is not None:
            out["log_likelihood"] = _finite(self.log_likelihood)
        return out


@dataclass
class Diagnosis:
    """The verdict on one dump: ``agrees``, the ``first_divergence`` from the reference, the ranked
    ``hypotheses`` and the mistakes ``not_applicable`` to this model or dump (with the reason)."""

    kind: str
    model: str
    tier: str
    positions: int
    agrees: bool
    first_divergence: dict[str, Any] | None
    hypotheses: list[Hypothesis]
    not_applicable: list[dict[str, str]]
    prefill: int | None
    prefill_from: str | None
    skipped: dict[str, str] = field(default_factory=dict)
    compared: int = 0  # what is judged: positions (logits), tensors in common (trace), generated tokens

    @property
    def best(self) -> Hypothesis | None:
        """The first hypothesis when it reproduces a dump that does not agree with the reference, else None."""
        if self.agrees or not self.hypotheses or not self.hypotheses[0].reproduces:
            return None
        return self.hypotheses[0]

    def to_json(self) -> dict[str, Any]:
        return _strict({"kind": self.kind, "model": self.model, "tier": self.tier, "positions": self.positions,
                        "compared": self.compared, "agrees": self.agrees, "first_divergence": self.first_divergence,
                        "best": self.best.id if self.best else None,
                        "hypotheses": [h.to_json() for h in self.hypotheses],
                        "not_applicable": self.not_applicable,
                        "prefill": self.prefill, "prefill_from": self.prefill_from, "skipped": self.skipped})


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _strict(obj: Any) -> Any:
    """``obj`` with every non-finite float as None (strict JSON has no NaN or Infinity)."""
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return _finite(float(obj))
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


# ------------------------------------------------------------------------------------ judges
class _Verdict(NamedTuple):
    """A judge's verdict on values against the dump: see :class:`Hypothesis` for the fields."""

    reproduces: bool
    error: float
    explained: int
    disagreement: dict[str, Any] | None
    log_likelihood: float | None = None


def _rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per position t: ``max|a_t - b_t| / max|b|`` (float64), or for chosen experts 1 where the sets differ."""
    if a.dtype.kind in "iu" or b.dtype.kind in "iu":
        same = np.all(np.sort(a, axis=-1) == np.sort(b, axis=-1), axis=-1)
        return (~same.reshape(a.shape[0], -1).all(axis=-1)).astype(np.float64)
    d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).reshape(a.shape[0], -1)
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    with np.errstate(invalid="ignore"):
        err = d.max(axis=-1) / scale if scale else np.where(d.max(axis=-1) > 0, np.inf, 0.0)
    return np.where(np.isnan(err), np.inf, err)


def _first_row(a: np.ndarray, b: np.ndarray, limit: float) -> tuple[int, float]:
    """The first position outside ``limit`` (or the worst one, when only the NMSE failed) and its error."""
    err = _rows(a, b)
    bad = np.flatnonzero(err > limit)
    t = int(bad[0]) if bad.size else int(np.argmax(err))
    return t, float(err[t])


class _Logits:
    def __init__(self, dump: Dump, tier: CompareTier):
        self.dump, self.tier, self.seq = dump, tier, dump.ids

    def visible(self, values: dict[str, np.ndarray], reference: dict[str, np.ndarray], ambiguous: Sequence[str]):
        return not diff_tensors("lm_head", values["lm_head"], reference["lm_head"], self.tier).ok

    def judge(self, values: dict[str, np.ndarray], ambiguous: Sequence[str] = ()) -> _Verdict:
        mine, theirs = values["lm_head"], self.dump.logits
        d = diff_tensors("lm_head", theirs, mine, self.tier)
        if d.ok:
            return _Verdict(True, d.max_rel, len(self.seq), None)
        t, err = _first_row(theirs, mine, self.tier.max_rel)
        return _Verdict(False, err, t, {"position": t, "max_rel": err,
                                        "argmax_agrees": bool(np.argmax(theirs[t]) == np.argmax(mine[t]))})


class _Traced:
    def __init__(self, dump: Dump, tier: CompareTier, reference: dict[str, np.ndarray]):
        self.tier, self.seq = tier, dump.ids
        self.tensors, self.skipped = align(dump.trace, reference)
        if not self.tensors:
            raise Lfm2npError(f"{dump.source}: none of its {len(dump.trace)} tensors is an intermediate of this "
                              f"model (e.g. {next(iter(self.skipped), '?')}: {next(iter(self.skipped.values()), '')})")

    def visible(self, values: dict[str, np.ndarray], reference: dict[str, np.ndarray], ambiguous: Sequence[str]):
        names = [n for n in self.tensors if not any(fnmatch.fnmatchcase(n, a) for a in ambiguous)]
        mine, ref = (canonical_routing({n: v[n] for n in names}) for v in (values, reference))
        return any(not diff_tensors(n, mine[n], ref[n], self.tier).ok for n in names)

    def judge(self, values: dict[str, np.ndarray], ambiguous: Sequence[str] = ()) -> _Verdict:
        theirs = {n: v for n, v in self.tensors.items() if not any(fnmatch.fnmatchcase(n, a) for a in ambiguous)}
        mine = canonical_routing({n: values[n] for n in theirs})
        result = compare(Trace(theirs), Trace(mine), self.tier)
        first = result.first_divergence
        if first is None:
            return _Verdict(True, max((d.max_rel for d in result.diffs), default=0.0), len(result.diffs), None)
        t, _ = _first_row(theirs[first.name], mine[first.name], self.tier.max_rel)
        if first.routing_agreement is not None:  # chosen experts: the error is the share of tokens routed elsewhere
            error = 1.0 - first.routing_agreement
            detail = {"tensor": first.name, "position": t, "routing_agreement": first.routing_agreement}
        else:
            error = first.max_rel
            detail = {"tensor": first.name, "position": t, "max_rel": first.max_rel, "nmse_db": first.nmse_db}
        return _Verdict(False, error, result.diffs.index(first), detail)


class _Tokens:
    def __init__(self, dump: Dump, tier: CompareTier):
        self.tier, self.prompt, self.tokens = tier, dump.ids, dump.tokens
        self.seq = np.concatenate([dump.ids, dump.tokens[:-1]])

    def steps(self, logits: np.ndarray):
        rows = np.asarray(logits[len(self.prompt) - 1:], np.float64)  # row s predicts tokens[s]
        picked = rows[np.arange(len(self.tokens)), self.tokens]
        scale = np.max(np.abs(rows), axis=-1)
        deficit = rows.max(axis=-1) - picked
        return rows, picked, scale, deficit, deficit > self.tier.max_rel * scale

    def visible(self, values: dict[str, np.ndarray], reference: dict[str, np.ndarray], ambiguous: Sequence[str]):
        """Whether, on the backend's prefix, the mutated reference would not choose the reference's tokens."""
        rows = np.asarray(values["lm_head"][len(self.prompt) - 1:], np.float64)
        choice = np.asarray(reference["lm_head"][len(self.prompt) - 1:]).argmax(axis=-1)
        deficit = rows.max(axis=-1) - rows[np.arange(len(rows)), choice]
        return bool(np.any(deficit > self.tier.max_rel * np.max(np.abs(rows), axis=-1)))

    def judge(self, values: dict[str, np.ndarray], ambiguous: Sequence[str] = ()) -> _Verdict:
        rows, picked, scale, deficit, bad = self.steps(values["lm_head"])
        with np.errstate(invalid="ignore", divide="ignore"):
            rel = np.where(scale > 0, deficit / scale, np.where(deficit > 0, np.inf, 0.0))
        loglik = float(np.sum(picked - rows.max(axis=-1) - np.log(np.exp(rows - rows.max(axis=-1, keepdims=True))
                                                                  .sum(axis=-1))))
        if not bad.any():
            return _Verdict(True, float(rel.max()), len(self.tokens), None, loglik)
        s = int(np.flatnonzero(bad)[0])
        return _Verdict(False, float(rel.max()), s, self.step(rows, s, deficit, scale), loglik)

    def step(self, rows: np.ndarray, s: int, deficit: np.ndarray, scale: np.ndarray) -> dict[str, Any]:
        top = np.argsort(-rows[s], kind="stable")[:5]
        tolerance = float(self.tier.max_rel * scale[s])
        return {"step": s, "position": len(self.prompt) + s, "token": int(self.tokens[s]),
                "reference_top": [{"id": int(i), "logit": float(rows[s, i])} for i in top],
                "margin": float(deficit[s]), "tolerance": tolerance, "near_tie": bool(deficit[s] <= tolerance)}

    def divergence(self, logits: np.ndarray) -> tuple[bool, dict[str, Any] | None]:
        """The reference's verdict: agrees (every step its argmax or a near-tie), and the first step whose
        token is not its argmax, with the first real deviation when that step is a near-tie."""
        rows, _, scale, deficit, bad = self.steps(logits)
        differ = np.flatnonzero(self.tokens != rows.argmax(axis=-1))
        if not differ.size:
            return True, None
        first = self.step(rows, int(differ[0]), deficit, scale)
        if first["near_tie"]:
            real = np.flatnonzero(bad)
            first["first_deviation"] = self.step(rows, int(real[0]), deficit, scale) if real.size else None
        return not bad.any(), first


# --------------------------------------------------------------------------------- diagnose
def _run(model: Any, seq: np.ndarray, port: M.Port, keep: "set[str] | None" = None,
         reference: dict[str, np.ndarray] | None = None, limit: float = 0.0):
    """The values of a (mutated) forward pass whose names are in ``keep`` (None: all), and where it first
    departs from ``reference`` by more than ``limit`` (``{"tensor", "position"}``, or None)."""
    values: dict[str, np.ndarray] = {}
    where = None

    def observe(name: str, value: np.ndarray) -> None:
        nonlocal where
        if keep is None or name in keep:
            values[name] = value
        if where is None and reference is not None:
            bad = np.flatnonzero(_rows(value, reference[name]) > limit)
            if bad.size:
                where = {"tensor": name, "position": int(bad[0]) if per_position(name) else None}

    M.run(model, seq, port, observe=observe)
    return values, where


def diagnose(model: Any, dump: Dump, tier: "str | CompareTier" = "fp32", prefill: int | None = None,
             only: Sequence[str] | None = None, combine: bool = True) -> Diagnosis:
    """Diagnose ``dump`` against ``model`` (the reference): see the module docstring. ``prefill`` (or the
    dump's) is where the backend's second call began; without it a token stream's is the end of the prompt,
    and a logits or trace dump's the position where it first diverges. ``only``: these catalogue ids."""
    if isinstance(tier, str):
        if tier not in COMPARE_TIERS:
            raise Lfm2npError(f"unknown tier {tier!r}; expected one of {', '.join(COMPARE_TIERS)}")
        tier = COMPARE_TIERS[tier]
    c = model.config
    catalogue = M.CATALOGUE if only is None else tuple(M.mistake(i) for i in only)
    if dump.kind == "tokens":
        model.check_ids(np.concatenate([dump.ids, dump.tokens]))
    seq = model.check_ids(dump.ids if dump.kind != "tokens" else np.concatenate([dump.ids, dump.tokens[:-1]]))
    if dump.kind == "logits" and dump.logits.shape[1] != c.vocab_size:
        raise Lfm2npError(f"{dump.source}: logits have {dump.logits.shape[1]} columns; the model's vocabulary is "
                          f"{c.vocab_size}")
    reference, _ = _run(model, seq, M.REFERENCE)
    judge = {"logits": lambda: _Logits(dump, tier), "trace": lambda: _Traced(dump, tier, reference),
             "tokens": lambda: _Tokens(dump, tier)}[dump.kind]()

    keep = set(judge.tensors) if dump.kind == "trace" else {"lm_head"}
    if dump.kind == "tokens":
        agrees, first = judge.divergence(reference["lm_head"])
    else:
        agrees, _, _, first, _ = judge.judge(reference)
    given = prefill if prefill is not None else dump.prefill
    if given is not None and not 0 < given < len(seq) + (dump.kind == "tokens"):
        raise Lfm2npError(f"prefill {given} is outside the {len(seq)} positions of the dump")
    if given is not None:
        prefill, prefill_from = int(given), "given"
    elif dump.kind == "tokens":
        prefill, prefill_from = len(dump.ids), "prompt"
    elif first is not None and first["position"] > 0:
        prefill, prefill_from = int(first["position"]), "first divergence"
    else:
        prefill, prefill_from = None, None

    def evaluate(mid: str, label: str, switches: dict[str, Any], ambiguous: Sequence[str], size: int = 1):
        try:
            values, where = _run(model, seq, M.Port(**switches), keep, reference, tier.max_rel)
        except Lfm2npError as e:  # the mutated reference overflows (non-finite logits): it reproduces nothing
            return Hypothesis(mid, label, switches, False, math.inf, None, 0, {"problem": str(e)}, True, None, size)
        ambiguous = [a if a.startswith("model.") else f"model.layers.*.{a}" for a in ambiguous]
        v = judge.judge(values, ambiguous)
        return Hypothesis(mid, label, switches, v.reproduces, v.error, where, v.explained, v.disagreement,
                          judge.visible(values, reference, ambiguous), v.log_likelihood, size)

    hypotheses, not_applicable, entries = [], [], {}
    for m in catalogue:
        variants = m.variants(c, prefill) if m.applies(c) else []
        if not m.applies(c):
            not_applicable.append({"id": m.id, "reason": f"needs {m.requires}"})
        elif not variants:
            not_applicable.append({"id": m.id, "reason": "needs the position where the backend's second call "
                                   "began: pass prefill, or give a dump that diverges after position 0"})
        else:
            best = min((evaluate(m.id, label, sw, m.ambiguous) for label, sw in variants), key=Hypothesis.rank_key)
            hypotheses.append(best)
            entries[m.id] = m
    hypotheses.sort(key=Hypothesis.rank_key)
    if combine and hypotheses and not hypotheses[0].reproduces:
        order = {m.id: n for n, m in enumerate(catalogue)}

        def combined(group: tuple[Hypothesis, ...]) -> Hypothesis | None:
            group = tuple(sorted(group, key=lambda h: order[h.id]))
            try:
                port = M.merge(*(h.switches for h in group))
            except Lfm2npError:
                return None  # two of them set the same switch: they cannot both be the mistake
            return evaluate("+".join(h.id for h in group), " + ".join(h.variant for h in group), port.changes(),
                            [a for h in group for a in entries[h.id].ambiguous], len(group))

        hypotheses += _search(hypotheses, combined)
        hypotheses.sort(key=Hypothesis.rank_key)
    name = os.path.basename(os.path.dirname(os.path.abspath(c.source))) if (c.source or "").endswith("config.json") \
        else c.source or c.model_type
    return Diagnosis(dump.kind, name, tier.name, dump.length, agrees, first, hypotheses,
                     not_applicable, prefill, prefill_from, getattr(judge, "skipped", {}),
                     {"logits": len(seq), "trace": len(getattr(judge, "tensors", ())),
                      "tokens": len(dump.tokens if dump.tokens is not None else ())}[dump.kind])


def _search(singles: list[Hypothesis], combined) -> list[Hypothesis]:
    """Combinations of mistakes that reproduce the dump, by a beam search: the COMBINE_BEAM best single
    hypotheses, each extended by every other visible one, the COMBINE_BEAM best pairs extended again, up
    to COMBINE_UP_TO mistakes; it stops at the first size where some combination reproduces the dump."""
    pool = [h for h in singles if h.visible]
    beam: list[tuple[Hypothesis, ...]] = [(h,) for h in pool[:COMBINE_BEAM]]
    for _ in range(2, COMBINE_UP_TO + 1):
        tried: dict[frozenset, tuple[tuple[Hypothesis, ...], Hypothesis]] = {}
        for group in beam:
            for h in pool:
                key = frozenset(x.id for x in (*group, h))
                if h in group or key in tried:
                    continue
                result = combined((*group, h))
                if result is not None:
                    tried[key] = ((*group, h), result)
        ranked = sorted(tried.values(), key=lambda gh: gh[1].rank_key())
        found = [h for _, h in ranked if h.reproduces]
        if found:
            return found
        beam = [g for g, _ in ranked[:COMBINE_BEAM]]
    return []


# --------------------------------------------------------------------------------- the report
def _at(d: dict[str, Any] | None) -> str:
    if d is None:
        return "-"
    if "tensor" in d:
        return d["tensor"] + (f" @{d['position']}" if d.get("position") is not None else "")
    return f"step {d['step']}" if "step" in d else f"position {d['position']}"


def format_diagnosis(d: Diagnosis) -> str:
    """A readable report: the verdict, the first divergence, the ranked hypotheses, what did not apply."""
    what = {"logits": f"logits of {d.positions} positions", "trace": f"trace of {d.compared} tensors",
            "tokens": f"{d.compared} tokens after a prompt of {d.positions + 1 - d.compared}"}[d.kind]
    lines = [f"diagnose: {what} against {d.model} at the {d.tier} tier"]
    f = d.first_divergence
    if f is None:
        lines.append("agrees: yes, everywhere")
    elif d.kind == "tokens":
        top = ", ".join(f"{t['id']} ({t['logit']:.4g})" for t in f["reference_top"][:3])
        lines.append(f"agrees: {'yes' if d.agrees else 'NO'}; first different token at step {f['step']} (position "
                     f"{f['position']}): {f['token']}, the reference's top: {top}; margin {f['margin']:.3g} "
                     f"{'<=' if f['near_tie'] else '>'} float32 noise {f['tolerance']:.3g}: "
                     f"{'a near-tie' if f['near_tie'] else 'a real deviation'}")
        if f.get("first_deviation"):
            lines.append(f"  first real deviation at step {f['first_deviation']['step']}")
    else:
        size = f"routing agreement {f['routing_agreement']:.1%}" if "routing_agreement" in f \
            else f"max_rel {f['max_rel']:.3g}"
        lines.append(f"agrees: {'yes' if d.agrees else 'NO'}; first divergence: {_at(f)} ({size})")
    unit = {"logits": "positions", "trace": "tensors", "tokens": "steps"}[d.kind]
    lines.append(("the dump agrees; mistakes this input cannot rule out come first" if d.agrees
                  else "hypotheses, best first") + f" ({unit} explained / {d.compared}):")
    for n, h in enumerate(d.hypotheses, 1):
        verdict = "REPRODUCES" if h.reproduces else "no" if h.visible else "no effect here"
        lines.append(f"{n:3d}. {h.id:26s} {h.variant:24s} {verdict:14s} error {h.error:9.3g}  explains "
                     f"{h.explained:4d}  acts at {_at(h.where)}")
    if d.prefill is not None and any("conv-state-dropped" in h.id.split("+") for h in d.hypotheses):
        lines.append(f"conv-state-dropped was tested with the second call at position {d.prefill} ({d.prefill_from})")
    if d.not_applicable:
        lines.append("not applicable: " + "; ".join(f"{n['id']} ({n['reason']})" for n in d.not_applicable))
    if d.skipped:
        lines.append(f"not compared: {len(d.skipped)} tensors of the dump (e.g. {next(iter(d.skipped))}: "
                     f"{next(iter(d.skipped.values()))})")
    return "\n".join(lines)
