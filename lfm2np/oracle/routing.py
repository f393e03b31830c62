"""Routing between two runs: which tokens chose other experts, and whether each is a near-tie or a flip.

A correct run in lower precision (bf16, a quantised GGUF) may choose another expert where the reference's
top-k had a near-tie: the experts' selection scores within the tier of each other. :func:`classify_routing`
tells those from real flips, on the scores each run chose on (``biased_scores`` when the model has an expert
bias, else ``router_scores``): a near-tie when, in every run that holds scores, the experts only one side chose
are within ``tier.max_rel`` of the scores' scale of each other. :func:`canonical_order` puts a layer's per-choice
values in one order (backends list the top-k in different orders).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .tolerance import CompareTier
from .trace import json_number


@dataclass(frozen=True)
class Flip:
    """A token for which the two traces chose other experts: the experts only ``a`` chose and only ``b`` chose,
    the margin by which the reference ``b`` (and, when it holds scores, ``a``) preferred its own, the tolerance,
    and the class: a near-tie (within the tolerance in each trace that holds scores) or a flip."""

    layer: int
    position: int
    only_a: tuple[int, ...]
    only_b: tuple[int, ...]
    margin: float | None
    tolerance: float | None
    near_tie: bool

    def to_json(self) -> dict[str, Any]:
        return {"layer": self.layer, "position": self.position, "only_a": list(self.only_a),
                "only_b": list(self.only_b), "margin": None if self.margin is None else json_number(self.margin),
                "tolerance": None if self.tolerance is None else json_number(self.tolerance),
                "near_tie": self.near_tie}


def choice_scores(tensors: dict[str, np.ndarray], layer: int) -> np.ndarray | None:
    """What a trace chose experts on in ``layer``: its biased scores, else its router scores (None: neither)."""
    p = f"model.layers.{layer}.feed_forward."
    for step in ("biased_scores", "router_scores"):
        if p + step in tensors:
            return np.asarray(tensors[p + step], np.float64).reshape(-1, tensors[p + step].shape[-1])
    return None


def classify_routing(layer: int, ea: np.ndarray, eb: np.ndarray, sa: np.ndarray | None, sb: np.ndarray | None,
                     tier: CompareTier) -> list[Flip]:
    """The tokens of ``layer`` whose chosen experts differ between trace a (``ea``, its scores ``sa``) and the
    reference (``eb``, ``sb``), each a near-tie or a flip (see the module docstring)."""
    # as Python integers: a uint64 2**64 - 1 is not an int64 -1
    ea, eb = (np.asarray(x).reshape(-1, x.shape[-1] if x.ndim else 1).tolist() for x in (ea, eb))
    held = [s for s in (sa, sb) if s is not None and s.shape[0] == len(ea)]
    tolerance = tier.max_rel * max((float(np.max(np.abs(s))) for s in held), default=0.0) if held else None
    out = []
    for t in range(len(ea)):
        only_a = tuple(sorted(set(ea[t]) - set(eb[t])))
        only_b = tuple(sorted(set(eb[t]) - set(ea[t])))
        if not only_a and not only_b:
            continue
        margins = []
        for s, mine, theirs in ((sb, only_b, only_a), (sa, only_a, only_b)):
            if s is not None and s.shape[0] == len(ea) and 0 <= min(mine + theirs) \
                    and max(mine + theirs) < s.shape[1]:
                margins.append(max(float(s[t, e] - s[t, x]) for e in mine for x in theirs))  # how much it preferred
        margin = max(margins) if margins else None
        near = margin is not None and tolerance is not None and margin <= tolerance
        out.append(Flip(layer, t, only_a, only_b, margin, tolerance, near))
    return out


def canonical_order(tensors: dict[str, np.ndarray], layer: int) -> dict[str, np.ndarray]:
    """A layer's chosen experts in increasing order per token, its per-choice values (topk scores, normalised and
    final weights) in the same order: backends list the top-k in different orders."""
    p = f"model.layers.{layer}.feed_forward."
    experts = tensors.get(p + "selected_experts")
    if experts is None or experts.ndim == 0:
        return tensors
    flat = np.asarray(experts).reshape(-1, experts.shape[-1])
    order = np.argsort(flat, axis=-1, kind="stable")
    out = dict(tensors)
    out[p + "selected_experts"] = np.take_along_axis(flat, order, axis=-1).reshape(experts.shape)
    for step in ("topk_scores", "topk_normed", "routing_weights"):
        v = tensors.get(p + step)
        if v is not None and v.size == flat.size:
            out[p + step] = np.take_along_axis(np.asarray(v).reshape(flat.shape), order, axis=-1).reshape(v.shape)
    return out
