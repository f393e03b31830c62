"""A diagnosis for every failed conformance case: the case's results as a dump, :func:`lfm2np.oracle.diagnose.diagnose`.

- a **oneshot** case: its intermediates and logits as a trace (the whole prompt), or its logits alone;
- a **decode** case: the sequence of the first failed feed as it stands after it, its logits assembled from the
  feeds that computed each position (every row of each feed needed), with ``prefill`` the first failed feed's
  start (where the call that went wrong began: a lost conv state shows there);
- an **operator** case: its outputs, under their trace names, as a trace of the case's prompt: a mistake made in
  that layer alone (diagnose's localised search) reproduces a kernel's bug on the reference's inputs;
- **llama.cpp**'s file holds one position's logits: nothing to diagnose from (its oneshot case, run through the
  adapter, is).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ..errors import Lfm2npError
from .conformance import Pack, config_hash
from .conformance_check import CaseResult, Results
from .diagnose import diagnose, format_diagnosis
from .dumps import Dump, logits_dump, trace_dump
from .tolerance import COMPARE_TIERS, FP32_OPERATOR
from .trace import Trace

MODES = ("all", "first", "none")


def case_dump(case: dict[str, Any], arrays: dict[str, np.ndarray]) -> tuple[Dump | None, str]:
    """The dump a failed case's results make, or None and why none."""
    if case["kind"] == "operator":
        names = case["outputs"]
        tensors = {names[k[7:]]: v for k, v in arrays.items() if k.startswith("output.") and k[7:] in names}
        return trace_dump(Trace(tensors, {"ids": case["ids"]}), source=case["id"]), ""
    feeds = case["feeds"]
    if case["kind"] == "oneshot":
        ids = feeds[0]["ids"]
        logits = arrays.get("logits.0", arrays.get("logits"))
        full = logits is not None and np.ndim(logits) == 2 and np.shape(logits)[0] == len(ids)
        theirs = {k: v for k, v in arrays.items() if not k.startswith(("logits", "ids", "margin"))}
        if theirs:
            if full:
                theirs["lm_head"] = logits
            return trace_dump(Trace(theirs, {"ids": ids}), source=case["id"]), ""
        if full:
            return logits_dump(ids, logits, source=case["id"]), ""
        return None, "the results hold only the last position's logits: diagnose needs every position's"
    return _decode_dump(case, arrays)


def _decode_dump(case: dict[str, Any], arrays: dict[str, np.ndarray]) -> tuple[Dump | None, str]:
    """The first failed feed's sequence, its logits assembled row by row from the feeds on its branch."""
    feeds = case["feeds"]
    failed = case.get("_failed")
    f = feeds[failed]
    branch: list[int] = []
    for g in feeds[: failed + 1]:  # the sequence as it stands after the failed feed (rollbacks cut it)
        if g["seq"] == f["seq"]:
            branch = branch[: g["start"]] + list(g["ids"])
    end = f["start"] + f["length"]
    rows: dict[int, np.ndarray] = {}
    for n, g in enumerate(feeds[: failed + 1]):
        if g["seq"] != f["seq"] or branch[g["start"]: g["start"] + g["length"]] != list(g["ids"]):
            continue
        got = arrays.get(f"logits.{n}", arrays.get("logits") if len(feeds) == 1 else None)
        if got is None or np.ndim(got) != 2 or np.shape(got)[0] != g["length"]:
            return None, f"{g['output']} holds only its last row: diagnose needs every position's logits"
        for r in range(g["length"]):
            rows[g["start"] + r] = got[r]
    if sorted(rows) != list(range(end)):
        return None, "the results do not cover every position of the sequence"
    prefill = f["start"] if f["start"] > 0 else None
    return logits_dump(branch[:end], np.stack([rows[p] for p in range(end)]), prefill, case["id"]), ""


def diagnose_failures(model: Any, pack: Pack, results: Results, verdicts: list[CaseResult], mode: str = "all",
                      progress: Callable[[str], None] | None = None) -> None:
    """Diagnose the failed cases of ``verdicts`` (``mode``: "all", "first" of each kind, or "none") against
    ``model``, the pack's model (its config hash checked), filling each verdict's ``diagnosis``."""
    if mode not in MODES:
        raise Lfm2npError(f"diagnose mode {mode!r}; expected one of {', '.join(MODES)}")
    if mode == "none" or model is None:
        return
    if config_hash(model.config) != pack.config_hash:
        raise Lfm2npError(f"the model given for the diagnosis is not the pack's (config hash "
                          f"{config_hash(model.config)} vs {pack.config_hash})")
    seen: set[str] = set()
    for v in verdicts:
        if v.ok or (mode == "first" and v.kind in seen):
            continue
        seen.add(v.kind)
        case = dict(pack.by_id[v.id])
        if case["kind"] == "llama.cpp":
            v.diagnosis_text = "not diagnosed: llama.cpp's file holds one position's logits (run the oneshot " \
                               "cases through the adapter for a diagnosis)"
            continue
        found = results.find(case["file"].rsplit(".", 1)[0])
        if found is None:
            v.diagnosis_text = "not diagnosed: the backend wrote nothing for this case"
            continue
        case["_failed"] = next((n for n, p in enumerate(v.parts) if not p.get("ok", True)), 0)
        if progress is not None:
            progress(f"diagnosing {v.id}")
        try:
            dump, why = case_dump(case, results.arrays(found))
            if dump is None:
                v.diagnosis_text = f"not diagnosed: {why}"
                continue
            d = diagnose(model, dump, FP32_OPERATOR if v.tier == FP32_OPERATOR.name else COMPARE_TIERS[v.tier])
        except Lfm2npError as e:
            v.diagnosis_text = f"not diagnosed: {e}"
            continue
        v.diagnosis, v.diagnosis_text = d.to_json(), format_diagnosis(d)
