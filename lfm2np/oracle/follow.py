"""The reference computed on a backend's own expert choices where they are near-ties.

A correct run in lower precision may choose another expert where the reference's top-k had a near-tie
(:mod:`lfm2np.oracle.routing`); from then on its outputs legitimately differ from the reference's, and a
comparison of two traces can judge later tensors only on the positions before the near-tie. With the model at
hand, :func:`following` recomputes the reference on the backend's ids, replacing the chosen experts of each
token where the backend's choice is a near-tie (an intervention on the one forward pass, through the record
protocol: the reference's own ``selected_experts`` replaced, everything after computed by the model), so that
every later tensor is judged on equal routing. Real flips are not followed: they stay, and fail.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import Lfm2npError
from ..schema import layer_of
from .runs import canonical_tensors, trace_ids
from .routing import choice_scores, classify_routing
from .tolerance import COMPARE_TIERS, CompareTier
from .trace import Trace


def following(model: Any, theirs: Trace, tier: "str | CompareTier" = "fp32", ids: Any = None) -> Trace:
    """The reference's trace of the ids ``theirs`` ran (or ``ids``), following its expert choices at near-ties;
    its metadata lists the tokens followed (``followed``: layer, position, the experts)."""
    if isinstance(tier, str):
        if tier not in COMPARE_TIERS:
            raise Lfm2npError(f"unknown tier {tier!r}; expected one of {', '.join(COMPARE_TIERS)}")
        tier = COMPARE_TIERS[tier]
    tensors, _ = canonical_tensors(theirs, "A")
    recorded = trace_ids(theirs, "trace A")
    if ids is None:
        ids = recorded
    if ids is None:
        raise Lfm2npError("the backend's trace does not say which ids it ran: give them")
    ids = model.check_ids(ids)
    if ids.ndim != 1:
        raise Lfm2npError(f"a trace records one sequence, shape (T,); got shape {ids.shape}")
    values: dict[str, np.ndarray] = {}
    followed: list[dict[str, Any]] = []

    def record(name: str, value: np.ndarray) -> np.ndarray | None:
        out = None
        layer = layer_of(name)
        if name.endswith(".selected_experts") and name in tensors and np.size(tensors[name]) == value.size:
            chosen = np.asarray(tensors[name]).reshape(value.shape).astype(value.dtype)
            flips = classify_routing(layer, chosen, value, choice_scores(tensors, layer), choice_scores(values, layer),
                                     tier)
            near = [f.position for f in flips if f.near_tie]
            if near:
                out = value.copy()
                out[near] = chosen[near]
                followed.extend({"layer": layer, "position": t, "experts": chosen[t].tolist()} for t in near)
        values[name] = np.array(value if out is None else out)
        return out

    model.forward(ids, record=record)
    meta = {"ids": ids.tolist(), "start": 0, "dtype": model.numerics.name, "model": model.config.source,
            "model_type": model.config.model_type, "followed": followed}
    return Trace(values, meta)
