"""How a dump is judged against values of the reference (or of a mutated reference): one judge per kind of dump.

- :class:`LogitsJudge`: the logits within the tier (:func:`lfm2np.oracle.compare.diff_tensors`); positions judged
  one by one, ``max|a_t - b_t| / max|b|``;
- :class:`TraceJudge`: every tensor the dump and the reference share, within the tier, in forward order, as
  :func:`lfm2np.oracle.compare.compare` judges them (near-ties in the expert choices allowed), names a mistake
  makes ambiguous left out;
- :class:`TokensJudge`: a generated stream with teacher forcing: each step's token is the reference's argmax or
  within the tier's noise of it;
- :class:`EmbeddingsJudge`: pooled embeddings, one per row, normalised (a backend may leave that to its caller),
  within the tier, row by row (``max|a_b - b_b| / max|b_b|``).

Each ``judge(values, ambiguous)`` gives a :class:`Verdict`: whether the values reproduce the dump, the error,
how far they explain it (positions, tensors or steps before the first disagreement), and that disagreement.
"""

from __future__ import annotations

import fnmatch
from typing import Any, NamedTuple, Sequence

import numpy as np

from ..errors import Lfm2npError
from .compare import compare, diff_tensors
from .dumps import Dump, align, canonical_routing
from .tolerance import CompareTier
from .trace import Trace


class Verdict(NamedTuple):
    """A judge's verdict on values against the dump: see :class:`Hypothesis` for the fields."""

    reproduces: bool
    error: float
    explained: int
    disagreement: dict[str, Any] | None
    log_likelihood: float | None = None


def row_errors(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per position t: ``max|a_t - b_t| / max|b|`` (float64), or for chosen experts 1 where the sets differ."""
    if a.dtype.kind in "iu" or b.dtype.kind in "iu":
        same = np.all(np.sort(a, axis=-1) == np.sort(b, axis=-1), axis=-1)
        return (~same.reshape(a.shape[0], -1).all(axis=-1)).astype(np.float64)
    d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).reshape(a.shape[0], -1)
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    with np.errstate(invalid="ignore"):
        err = d.max(axis=-1) / scale if scale else np.where(d.max(axis=-1) > 0, np.inf, 0.0)
    return np.where(np.isnan(err), np.inf, err)


def first_row(a: np.ndarray, b: np.ndarray, limit: float) -> tuple[int, float]:
    """The first position outside ``limit`` (or the worst one, when only the NMSE failed) and its error."""
    err = row_errors(a, b)
    bad = np.flatnonzero(err > limit)
    t = int(bad[0]) if bad.size else int(np.argmax(err))
    return t, float(err[t])


class LogitsJudge:
    def __init__(self, dump: Dump, tier: CompareTier):
        self.dump, self.tier, self.seq = dump, tier, dump.ids

    def visible(self, values: dict[str, np.ndarray], reference: dict[str, np.ndarray], ambiguous: Sequence[str]):
        return not diff_tensors("lm_head", values["lm_head"], reference["lm_head"], self.tier).ok

    def judge(self, values: dict[str, np.ndarray], ambiguous: Sequence[str] = ()) -> Verdict:
        mine, theirs = values["lm_head"], self.dump.logits
        d = diff_tensors("lm_head", theirs, mine, self.tier)
        if d.ok:
            return Verdict(True, d.max_rel, len(self.seq), None)
        t, err = first_row(theirs, mine, self.tier.max_rel)
        return Verdict(False, err, t, {"position": t, "max_rel": err,
                                        "argmax_agrees": bool(np.argmax(theirs[t]) == np.argmax(mine[t]))})


class TraceJudge:
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

    def judge(self, values: dict[str, np.ndarray], ambiguous: Sequence[str] = ()) -> Verdict:
        theirs = {n: v for n, v in self.tensors.items() if not any(fnmatch.fnmatchcase(n, a) for a in ambiguous)}
        mine = canonical_routing({n: values[n] for n in theirs})
        result = compare(Trace(theirs), Trace(mine), self.tier)
        first = result.first_divergence
        if first is None:
            return Verdict(True, max((d.max_rel for d in result.diffs), default=0.0), len(result.diffs), None)
        t, _ = first_row(theirs[first.name], mine[first.name], self.tier.max_rel)
        if first.routing_agreement is not None:  # chosen experts: the error is the share of tokens routed elsewhere
            error = 1.0 - first.routing_agreement
            detail = {"tensor": first.name, "position": t, "routing_agreement": first.routing_agreement}
        else:
            error = first.max_rel
            detail = {"tensor": first.name, "position": t, "max_rel": first.max_rel, "nmse_db": first.nmse_db}
        return Verdict(False, error, result.diffs.index(first), detail)


class TokensJudge:
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

    def judge(self, values: dict[str, np.ndarray], ambiguous: Sequence[str] = ()) -> Verdict:
        rows, picked, scale, deficit, bad = self.steps(values["lm_head"])
        with np.errstate(invalid="ignore", divide="ignore"):
            rel = np.where(scale > 0, deficit / scale, np.where(deficit > 0, np.inf, 0.0))
        loglik = float(np.sum(picked - rows.max(axis=-1) - np.log(np.exp(rows - rows.max(axis=-1, keepdims=True))
                                                                  .sum(axis=-1))))
        if not bad.any():
            return Verdict(True, float(rel.max()), len(self.tokens), None, loglik)
        s = int(np.flatnonzero(bad)[0])
        return Verdict(False, float(rel.max()), s, self.step(rows, s, deficit, scale), loglik)

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


class EmbeddingsJudge:
    """Pooled embeddings: the dump's rows, normalised, against the (mutated) reference's ``head.embedding``."""

    def __init__(self, dump: Dump, tier: CompareTier):
        self.tier, self.seq = tier, dump.ids
        norms = np.linalg.norm(dump.embeddings, axis=-1, keepdims=True)
        self.theirs = np.where(norms > 0, dump.embeddings / np.where(norms > 0, norms, 1), 0.0)

    def visible(self, values: dict[str, np.ndarray], reference: dict[str, np.ndarray], ambiguous: Sequence[str]):
        return not diff_tensors("head.embedding", values["head.embedding"], reference["head.embedding"], self.tier).ok

    def judge(self, values: dict[str, np.ndarray], ambiguous: Sequence[str] = ()) -> Verdict:
        mine = values["head.embedding"]
        if mine.shape != self.theirs.shape:
            raise Lfm2npError(f"the dump's embeddings have shape {list(self.theirs.shape)}; the model gives "
                              f"{list(mine.shape)}")
        d = diff_tensors("head.embedding", self.theirs, mine, self.tier)
        if d.ok:
            return Verdict(True, d.max_rel, len(mine), None)
        err = np.array([row_errors(a[None], b[None])[0] for a, b in zip(self.theirs, mine)])
        bad = np.flatnonzero(err > self.tier.max_rel)
        b = int(bad[0]) if bad.size else int(np.argmax(err))
        cos = float(np.dot(self.theirs[b], mine[b]) / max(np.linalg.norm(mine[b]), 1e-30))
        return Verdict(False, float(err[b]), b, {"position": b, "max_rel": float(err[b]), "cosine": cos})
