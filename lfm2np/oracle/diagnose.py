"""Diagnosing a backend: from its dump (logits, a trace, or the tokens it generated) to the porting mistake.

:func:`diagnose` runs the reference on the dump's ids, says whether the dump agrees with it at a compare
tier (fp32 by default) and where it first diverges, then applies every applicable mistake of the
catalogue (:mod:`lfm2np.oracle.mistakes`) to the reference and ranks them by how well the mutated
reference matches the dump. A hypothesis *reproduces* the dump when the mutated reference agrees with it at
the tier. What "agrees" means per kind of dump:

- **logits**: the logits tensor within the tier (:func:`lfm2np.oracle.compare.diff_tensors`: max_rel and
  NMSE); its positions are judged one by one, ``max|a_t - b_t| / max|b|``;
- **trace**: every tensor the dump and the reference share within the tier, in forward order, as
  ``lfm2np compare`` judges them (expert choices may differ only at near-ties); a hypothesis ignores the names
  its mistake makes ambiguous (:attr:`lfm2np.oracle.mistakes.Mistake.ambiguous`);
- **tokens**: the stream is run through the reference with teacher forcing (prompt + tokens, one forward
  pass), so each step is judged on the backend's own prefix; a step agrees when its token is the
  reference's argmax or within the tier's noise of it, ``max - logit[token] <= max_rel * max|logits|`` (a
  near-tie: float32 implementations may pick either). Greedy generation is deterministic, so a mutated
  reference that predicts every token of the stream on that prefix generates exactly that stream.

Hypotheses rank by: reproduces, not contradicted, visible (the mutation changes anything on this input), how
far it explains the dump (positions, tensors or steps before its first disagreement), its error there, and for
token streams the stream's log-likelihood under it. A hypothesis is *contradicted* when the mutated reference
departs from the dump before the reference itself does: it would change values that the dump shows unchanged,
so the dump rules it out. When no single mistake reproduces the dump, combinations of two or three are searched
(:func:`_search`: the best two, each extended by every other, and so on), and those that reproduce are added
(e.g. the three router slips of ml-explore/mlx-lm#1883 at once); for a trace, each mistake is then tried in the
layer alone where the divergence begins (and, on a MoE layer, in each chosen expert alone): a weight converter
that exchanged w1 and w3 in one layer is named with its layer. When still nothing reproduces the dump,
:attr:`Diagnosis.nothing_reproduces` is true, ``best`` is None, and the report's first line says so, with the
operator, layer and position where the divergence begins.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..errors import Lfm2npError, shown
from ..schema import layer_of, order_key, per_position
from . import mistakes as M
from .compare import compare
from .dumps import Dump
from .judges import EmbeddingsJudge, LogitsJudge, TokensJudge, TraceJudge, row_errors
from .tolerance import CompareTier, compare_tier, default_tier
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
    contradicted: bool = False

    def rank_key(self) -> tuple:
        err = self.error if not math.isnan(self.error) else math.inf
        return (not self.reproduces, self.size if self.reproduces else 0, self.contradicted, not self.visible,
                -self.explained, err, -(self.log_likelihood or 0.0))

    def to_json(self) -> dict[str, Any]:
        out = {"id": self.id, "variant": self.variant, "reproduces": self.reproduces,
               "contradicted": self.contradicted, "error": _finite(self.error), "where": self.where,
               "visible": self.visible, "explained": self.explained, "first_disagreement": self.first_disagreement,
               "params": {k: list(v) if isinstance(v, tuple) else v for k, v in self.switches.items()}}
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
    comparison: dict[str, Any] | None = None  # a trace dump: its comparison with the reference (compare's JSON)
    no_mistake: Hypothesis | None = None  # the reference as it is, judged as a hypothesis (a dump that disagrees)
    impossible: list[str] = field(default_factory=list)  # values no model computes (an expert it does not have)

    @property
    def best(self) -> Hypothesis | None:
        """The first hypothesis when it reproduces a dump that does not agree with the reference, else None."""
        if self.agrees or not self.hypotheses or not self.hypotheses[0].reproduces:
            return None
        return self.hypotheses[0]

    @property
    def nothing_reproduces(self) -> bool:
        """The dump differs from the reference and no catalogued mistake (alone, combined or localised to the
        layer where the divergence begins) reproduces it."""
        return not self.agrees and self.best is None

    def to_json(self) -> dict[str, Any]:
        return _strict({"kind": self.kind, "model": self.model, "tier": self.tier, "positions": self.positions,
                        "compared": self.compared, "agrees": self.agrees, "first_divergence": self.first_divergence,
                        "best": self.best.id if self.best else None, "nothing_reproduces": self.nothing_reproduces,
                        "hypotheses": [h.to_json() for h in self.hypotheses],
                        "not_applicable": self.not_applicable,
                        "prefill": self.prefill, "prefill_from": self.prefill_from, "skipped": self.skipped,
                        **({"comparison": self.comparison} if self.comparison is not None else {}),
                        **({"no_mistake": {"error": _finite(self.no_mistake.error),
                                           "explained": self.no_mistake.explained}}
                           if self.no_mistake is not None else {}),
                        **({"impossible": self.impossible} if self.impossible else {})})


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


# --------------------------------------------------------------------------------- diagnose
def _run(model: Any, seq: np.ndarray, port: M.Port, keep: "set[str] | None" = None,
         reference: dict[str, np.ndarray] | None = None, limit: float = 0.0, images: Any = None,
         dump: Dump | None = None):
    """The values of a (mutated) forward pass whose names are in ``keep`` (None: all), and where it first
    departs from ``reference`` by more than ``limit`` (``{"tensor", "position"}``, or None). An embeddings
    dump's rows: their pooled embeddings (``head.embedding`` (B, E)), and the first row that departs."""
    values: dict[str, np.ndarray] = {}
    where = None
    if dump is not None and dump.kind == "embeddings":
        values["head.embedding"] = M.embed(model, seq, dump.mask, port)
        if reference is not None:
            bad = np.flatnonzero(row_errors(values["head.embedding"], reference["head.embedding"]) > limit)
            where = {"tensor": "head.embedding", "position": int(bad[0])} if bad.size else None
        return values, where

    def observe(name: str, value: np.ndarray) -> None:
        nonlocal where
        if keep is None or name in keep:
            values[name] = value
        if where is None and reference is not None:
            bad = np.flatnonzero(row_errors(value, reference[name]) > limit)
            if bad.size:
                where = {"tensor": name, "position": int(bad[0]) if per_position(name) else None}

    M.run(model, seq, port, observe=observe, images=images)
    return values, where


def diagnose(model: Any, dump: Dump, tier: "str | CompareTier | None" = None, prefill: int | None = None,
             only: Sequence[str] | None = None, combine: bool = True, images: Any = None) -> Diagnosis:
    """Diagnose ``dump`` against ``model`` (the reference): see the module docstring. ``tier``: fp32 by default
    (llamacpp-cpu for a reference computing llama.cpp's CPU arithmetic). ``prefill`` (or the dump's) is where
    the backend's second call began; without it a token stream's is the end of the prompt, and a logits or trace
    dump's the position where it first diverges. ``only``: these catalogue ids. LFM2-VL: ``images``, the images
    the backend ran with the dump's ids (as :meth:`lfm2np.Model.forward` takes them)."""
    if not all(hasattr(model, a) for a in ("config", "check_ids", "forward")):
        raise Lfm2npError(f"diagnose: model must be an lfm2np Model (lfm2np.load gives one); got "
                          f"{type(model).__name__}")
    if not isinstance(dump, Dump):
        raise Lfm2npError(f"diagnose: dump must be a Dump (lfm2np.oracle.dumps.load_dump reads one); got "
                          f"{type(dump).__name__}")
    mode = getattr(getattr(model, "numerics", None), "name", None)
    tier = compare_tier(default_tier(mode) if tier is None else tier)
    if prefill is not None and (isinstance(prefill, (bool, np.bool_)) or not isinstance(prefill, (int, np.integer))
                                or prefill < 1):
        raise Lfm2npError(f"diagnose: prefill must be an integer >= 1 (where the backend's second call began); got "
                          f"{shown(prefill)}")
    if not isinstance(combine, (bool, np.bool_)):
        raise Lfm2npError(f"diagnose: combine must be True or False; got {shown(combine)}")
    if isinstance(only, str):  # one id, not its characters
        only = (only,)
    c = model.config
    catalogue = M.CATALOGUE if only is None else tuple(M.mistake(i) for i in only)
    if dump.kind == "tokens":
        model.check_ids(np.concatenate([dump.ids, dump.tokens]))
    seq = model.check_ids(dump.ids if dump.kind != "tokens" else np.concatenate([dump.ids, dump.tokens[:-1]]))
    if dump.kind == "embeddings" and dump.embeddings.shape[1] != c.embedding_size:
        raise Lfm2npError(f"{dump.source}: embeddings have {dump.embeddings.shape[1]} dimensions; the model's are "
                          f"{c.embedding_size}")
    if dump.kind == "logits" and dump.logits.shape[1] != c.vocab_size:
        raise Lfm2npError(f"{dump.source}: logits have {dump.logits.shape[1]} columns; the model's vocabulary is "
                          f"{c.vocab_size}")
    if images is not None:  # checked once (file paths through the processor), then given to every run
        images = model.pixels(images, seq)
    reference, _ = _run(model, seq, M.REFERENCE, images=images, dump=dump)
    judge = {"logits": lambda: LogitsJudge(dump, tier), "trace": lambda: TraceJudge(dump, tier, reference),
             "tokens": lambda: TokensJudge(dump, tier), "embeddings": lambda: EmbeddingsJudge(dump, tier)}[dump.kind]()

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
    elif first is not None and first["position"] > 0 and dump.kind != "embeddings":  # (there: a row)
        prefill, prefill_from = int(first["position"]), "first divergence"
    else:
        prefill, prefill_from = None, None

    def evaluate(mid: str, label: str, switches: dict[str, Any], ambiguous: Sequence[str], size: int = 1):
        try:
            values, where = _run(model, seq, M.Port(**switches), keep, reference, tier.max_rel, images, dump)
        except Lfm2npError as e:  # the mutated reference overflows (non-finite logits): it reproduces nothing
            return Hypothesis(mid, label, switches, False, math.inf, None, 0, {"problem": str(e)}, True, None, size)
        ambiguous = [a if a.startswith("model.") else f"model.layers.*.{a}" for a in ambiguous]
        v = judge.judge(values, ambiguous)
        return Hypothesis(mid, label, switches, v.reproduces, v.error, where, v.explained, v.disagreement,
                          judge.visible(values, reference, ambiguous), v.log_likelihood, size)

    hypotheses, not_applicable, entries = [], [], {}
    for m in catalogue:
        variants = m.variants(c, prefill) if m.concerns(model) else []
        if not m.concerns(model):
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
    if not agrees and not any(h.reproduces for h in hypotheses) and dump.kind == "trace":
        # before giving up: each mistake made in the layer (and, on MoE layers, the expert) where the dump departs
        hypotheses += _localised([m for m in catalogue if m.concerns(model)], c, prefill, first, reference, evaluate)
    # the line the contradicted mistakes rank below: the reference itself, judged as a hypothesis
    no_mistake = None if agrees else evaluate("no-mistake", "the reference as it is", {}, [])
    at = _departure(dump.kind, first, agrees)
    for h in hypotheses:  # a mistake that changes what the dump shows unchanged is ruled out by it
        h.contradicted = not h.reproduces and h.visible and (
            agrees or (_departure(dump.kind, h.first_disagreement, False) or at) < at)
    hypotheses.sort(key=Hypothesis.rank_key)
    name = os.path.basename(os.path.dirname(os.path.abspath(c.source))) if (c.source or "").endswith("config.json") \
        else c.source or c.model_type
    comparison = None
    if dump.kind == "trace":
        ran = {"ids": [int(i) for i in dump.ids]}  # both ran the dump's ids
        comparison = compare(Trace(judge.tensors, ran), Trace(reference, ran), tier, partial=True).to_json()
    return Diagnosis(dump.kind, name, tier.name, dump.length, agrees, first, hypotheses,
                     not_applicable, prefill, prefill_from, getattr(judge, "skipped", {}),
                     {"logits": len(seq), "trace": len(getattr(judge, "tensors", ())), "embeddings": len(seq),
                      "tokens": len(dump.tokens if dump.tokens is not None else ())}[dump.kind], comparison,
                     no_mistake, _impossible(getattr(judge, "tensors", {}), c.num_experts))


def _impossible(tensors: dict[str, np.ndarray], experts: int) -> list[str]:
    """The dump's expert choices outside ``0 .. experts - 1``, each layer's first: no mistake in the catalogue
    computes them (an indexing slip in the backend, or experts numbered from 1), so they are said, not ranked."""
    out = []
    for name, v in tensors.items():
        if name.endswith(".selected_experts") and v.size:
            bad = np.argwhere((v < 0) | (v >= experts))
            if len(bad):
                out.append(f"{name} chooses expert {int(v[tuple(bad[0])])} at position {int(bad[0][0])}, outside "
                           f"0 .. {experts - 1}: the model has no such expert (an indexing slip in the backend, "
                           f"or its experts numbered from 1?)")
    return out


def _departure(kind: str, where: dict[str, Any] | None, agrees: bool) -> tuple | None:
    """Where a dump departs from some values, as a key in forward order: (tensor, position) for a trace, the
    position for logits, the step for tokens (a stream's near-tie counts from its first real deviation)."""
    if where is None or agrees:
        return None
    if kind == "trace":
        return (order_key(where["tensor"]), where.get("position") or 0) if "tensor" in where else None
    if kind == "tokens":
        if where.get("near_tie"):
            where = where.get("first_deviation")
        return None if where is None else (where["step"],)
    return (where["position"],) if "position" in where else None  # logits: a position; embeddings: a row


def _localised(catalogue, c, prefill, first: dict[str, Any] | None, reference: dict[str, np.ndarray],
               evaluate) -> list[Hypothesis]:
    """Each catalogued mistake made in one layer only, the layer where the dump first departs from the reference
    (a weight converter that got one layer wrong), and on a MoE layer each of the experts chosen there alone:
    the variants that reproduce the dump."""
    layer = layer_of(first["tensor"]) if first and "tensor" in first else None
    if layer is None:
        return []
    out = []
    experts = reference.get(f"model.layers.{layer}.feed_forward.selected_experts")
    chosen = sorted(set(np.asarray(experts).ravel().tolist())) if experts is not None else []
    for m in catalogue:
        if not m.localisable or not m.applies(c):
            continue
        for label, switches in m.variants(c, prefill):
            tries = [(f"{label}, layer {layer}", {**switches, "layers": (layer,)})]
            if "swiglu_silu_on" in switches and c.is_moe_layer(layer):
                tries += [(f"{label}, layer {layer}, expert {e}", {**switches, "layers": (layer,), "experts": (e,)})
                          for e in chosen]
            found = [h for h in (evaluate(m.id, t, sw, m.ambiguous) for t, sw in tries) if h.reproduces]
            out += sorted(found, key=Hypothesis.rank_key)[:1]
    return out


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


def _where(kind: str, f: dict[str, Any]) -> str:
    """Where a divergence begins, in words: the operator's value, its layer and the position."""
    if "tensor" in f:
        layer = layer_of(f["tensor"])
        return f"{f['tensor']}" + (f" (layer {layer}" if layer is not None else " (") + (
            f", position {f['position']})" if f.get("position") is not None else ")").replace("(, ", "(")
    if kind == "tokens":
        return f"step {f['step']} (position {f['position']})"
    return f"row {f['position']} of the embeddings" if kind == "embeddings" else \
        f"position {f['position']} of the logits"


def format_diagnosis(d: Diagnosis) -> str:
    """A readable report: the verdict, the first divergence, the ranked hypotheses, what did not apply."""
    what = {"logits": f"logits of {d.positions} positions", "trace": f"trace of {d.compared} tensors",
            "tokens": f"{d.compared} tokens after a prompt of {d.positions + 1 - d.compared}",
            "embeddings": f"embeddings of {d.compared} rows of {d.positions} positions"}[d.kind]
    lines = []
    f = d.first_divergence
    if d.nothing_reproduces:  # the first thing a reader must know
        lines.append("no catalogued mistake reproduces this dump" + (
            "" if f is None else f": the divergence begins at {_where(d.kind, f)}"))
    lines.append(f"diagnose: {what} against {d.model} at the {d.tier} tier")
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
    lines += [f"impossible: {note}" for note in d.impossible]
    unit = {"logits": "positions", "trace": "tensors", "tokens": "steps", "embeddings": "rows"}[d.kind]
    lines.append(("the dump agrees; mistakes this input cannot rule out come first" if d.agrees
                  else "hypotheses, best first") + f" ({unit} explained / {d.compared}):")
    ruled_out = False
    for n, h in enumerate(d.hypotheses + [None], 1):
        if (h is None or h.contradicted) and not ruled_out and d.no_mistake is not None:
            ruled_out = True
            lines.append(f"{'':3s}  {'(no mistake)':26s} {'the reference as it is':24s} {'':14s} error "
                         f"{d.no_mistake.error:9.3g}  explains {d.no_mistake.explained:4d}")
            if h is not None:
                lines.append("     -- ruled out: the mistakes below would change values that the dump shows "
                             "unchanged --")
        if h is None:
            break
        verdict = "REPRODUCES" if h.reproduces else "contradicted" if h.contradicted else "no" if h.visible \
            else "no effect here"
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
