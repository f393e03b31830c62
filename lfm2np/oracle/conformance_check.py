"""Judging a backend's results against a conformance pack (``lfm2np conformance check``).

The results directory (docs/conformance.md) holds, per case, ``cases/<case>.npz`` or ``.safetensors`` (per feed
``logits.<k>``: every row of the feed ``(n, V)``, or only its last ``(1, V)`` or ``(V,)``; a single-feed case may
call it ``logits``; a oneshot case may add intermediates under lfm2np's, llama.cpp's or transformers' names), per
operator ``ops/<NNN_name>.npz`` or ``.safetensors`` (``output.<key>``), llama.cpp's ``data/llamacpp-<model>.bin``
(with ``-tokens.bin``), and optionally ``results.json`` (``config_hash``: the model the backend ran, checked
against the pack's; ``backend``: its name).

Each case is judged at its tier (:data:`lfm2np.oracle.tolerance.COMPARE_TIERS`; operators at
:func:`~lfm2np.oracle.tolerance.operator_tier`):

- **logits**, feed by feed: max_rel and NMSE within the tier (:func:`lfm2np.oracle.compare.diff_tensors`), and the
  backend's top token the reference's or a near-tie of it (within ``max_rel`` of the row's scale); positions after
  a routing near-tie of the reference (:mod:`lfm2np.oracle.conformance_cases`) are not judged, and counted;
- **intermediates** of a oneshot case and **operator** outputs: :func:`lfm2np.oracle.compare.compare` (names from
  any tool, near-ties in the chosen experts allowed);
- a case the backend wrote nothing for, or a feed or output it left out, fails.
"""

from __future__ import annotations

import fnmatch
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import Lfm2npError
from ..io.files import read_json
from ..schema import per_position
from .compare import compare, diff_tensors
from .conformance import Pack
from .dumps import read_arrays
from .tolerance import COMPARE_TIERS, CompareTier, operator_tier
from .trace import Trace

#: what a results directory may hold beside the cases' files
RESULTS_JSON = "results.json"
SUFFIXES = (".npz", ".safetensors")
FEED_KEYS = ("ids", "margin")


@dataclass
class CaseResult:
    """One case's verdict: ``status`` "pass" or "fail", a one-line ``detail``, the feeds' or outputs' measures, the
    comparison's JSON (oneshot and operator cases) and, for a failure, the diagnosis."""

    id: str
    kind: str
    tier: str
    status: str
    detail: str
    parts: list[dict[str, Any]] = field(default_factory=list)
    comparison: dict[str, Any] | None = None
    diagnosis: dict[str, Any] | None = None
    diagnosis_text: str | None = None
    not_judged: int = 0  # positions after a routing near-tie

    @property
    def ok(self) -> bool:
        return self.status in ("pass", "skip")

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "tier": self.tier, "status": self.status, "ok": self.ok,
                "detail": self.detail, "parts": self.parts, "not_judged_after_near_tie": self.not_judged,
                "comparison": self.comparison, "diagnosis": self.diagnosis}


# ------------------------------------------------------------------------------------------- results
class Results:
    """A backend's results directory, read as untrusted files."""

    def __init__(self, directory: "str | os.PathLike[str]", pack: Pack):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise Lfm2npError(f"{self.directory}: no such results directory")
        self.pack, self.meta = pack, {}
        file = self.directory / RESULTS_JSON
        if file.is_file():
            meta = read_json(file, "results metadata", 1 << 20)
            if not isinstance(meta, dict):
                raise Lfm2npError(f"{file}: not a JSON object")
            self.meta = meta
            theirs = meta.get("config_hash")
            if theirs is not None and theirs != pack.config_hash:
                raise Lfm2npError(f"{file}: config_hash {str(theirs)[:80]} is not the pack's {pack.config_hash}: "
                                  f"these results are for another model than {pack.manifest['model']['name']}")

    def find(self, rel_stem: str) -> Path | None:
        """``<rel_stem>.npz`` or ``.safetensors`` in the results (both: an error, which is the backend's?)."""
        found = [p for p in (self.directory / (rel_stem + s) for s in SUFFIXES) if p.exists()]
        if len(found) > 1:
            raise Lfm2npError(f"{found[0]} and {found[1]} both hold case {rel_stem}: keep one")
        return found[0] if found else None

    def arrays(self, path: Path) -> dict[str, np.ndarray]:
        return read_arrays(path, True, self.pack.vocab_size)[0]

    def llama_cpp(self) -> tuple[Path | None, Path | None]:
        """llama.cpp's logits file of the results (``data/llamacpp-*.bin`` or ``llamacpp-*.bin``) and its tokens."""
        found = sorted(p for d in (self.directory / "data", self.directory) if d.is_dir()
                       for p in d.glob("llamacpp-*.bin") if not p.name.endswith(("-tokens.bin", "-embeddings.bin")))
        if len(found) > 1:
            raise Lfm2npError(f"{self.directory}: holds {len(found)} llama.cpp logits files ({found[0].name}, "
                              f"{found[1].name}); keep the one of the model the pack was made from")
        if not found:
            return None, None
        tokens = found[0].with_name(found[0].stem + "-tokens.bin")
        return found[0], tokens if tokens.is_file() else None


# --------------------------------------------------------------------------------------------- logits
def _rows(got: np.ndarray, n: int, V: int, output: str) -> tuple[np.ndarray | None, str]:
    """A feed's logits as ``(rows, V)`` with the rows it holds: all ``n``, or the last."""
    a = np.asarray(got)
    if a.ndim >= 2 and a.shape[0] == 1 and a.ndim == 3:
        a = a[0]  # a batch axis of one
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2 or a.shape[1] != V or a.shape[0] not in (n, 1):
        return None, f"{output} has shape {list(np.shape(got))}; expected ({n}, {V}) or its last row (1, {V})"
    if a.dtype.kind != "f":
        return None, f"{output} holds {a.dtype}; logits are floating point"
    return a, ""


def _judge_rows(a: np.ndarray, b: np.ndarray, positions: np.ndarray, tier: CompareTier) -> dict[str, Any]:
    """Rows ``a`` against the reference's ``b``: within the tier, and each top token the reference's or a near-tie
    of it (within ``max_rel`` of the row's scale)."""
    d = diff_tensors("lm_head", a, b, tier)
    b64 = np.asarray(b, np.float64)
    picked = b64[np.arange(len(a)), np.argmax(a, axis=-1)]
    deficit = b64.max(axis=-1) - picked  # how much worse the backend's top token is, by the reference
    top_bad = np.flatnonzero(deficit > tier.max_rel * np.abs(b64).max(axis=-1))
    out: dict[str, Any] = {"ok": True, "max_rel": d.max_rel, "nmse_db": d.nmse_db,
                           "top1_agreement": float(np.mean(np.argmax(a, axis=-1) == np.argmax(b, axis=-1)))}
    if not d.ok:
        at = int(positions[d.position]) if d.position is not None else None
        return {**out, "ok": False, "position": at, "problem": d.problem or (
            f"max_rel {d.max_rel:.3g} (<= {tier.max_rel:g}), NMSE {d.nmse_db:.1f} dB (<= {tier.nmse_db:g})"
            + (f"; first beyond the tier at position {at}" if at is not None else ""))}
    if top_bad.size:
        at = int(positions[top_bad[0]])
        return {**out, "ok": False, "position": at,
                "problem": f"top token at position {at} is not the reference's nor a near-tie of it"}
    return out


def judge_logits(output: str, got: Any, ref: np.ndarray, margin: np.ndarray | None, start: int,
                 tier: CompareTier) -> dict[str, Any]:
    """One feed's logits (``got``; None: the backend wrote none) against the reference rows ``ref`` (n, V) that
    begin at position ``start``; ``margin``: the reference's routing margins of those rows (None: no MoE). Rows
    from a routing near-tie of the reference on that differ beyond the tier are excused (``excused``), not
    failed, when every row before it agrees."""
    n, V = ref.shape
    part: dict[str, Any] = {"output": output, "positions": [start, start + n]}
    if got is None:
        return {**part, "ok": False, "problem": f"no {output} in the results"}
    rows, problem = _rows(got, n, V, output)
    if rows is None:
        return {**part, "ok": False, "problem": problem}
    first = n - len(rows)  # 0, or n - 1 for the last row only
    ref, margin = ref[first:], None if margin is None else margin[first:]
    positions = start + first + np.arange(len(rows))
    verdict = _judge_rows(rows, ref, positions, tier)
    part["rows_given"] = int(len(rows))
    if verdict["ok"] or margin is None or (margin > tier.max_rel).all():
        return {**part, **verdict}
    strict = margin > tier.max_rel  # cumulative: True up to the first near-tie, False from it on
    part["near_tie_at"] = int(positions[int(np.argmin(strict))])
    if verdict.get("position") is not None and verdict["position"] < part["near_tie_at"]:
        return {**part, **verdict}
    before = _judge_rows(rows[strict], ref[strict], positions[strict], tier) if strict.any() else {"ok": True}
    if not before["ok"]:
        return {**part, **before}
    return {**part, **before, "excused": int((~strict).sum()),
            "note": f"positions {part['near_tie_at']}.. differ beyond the tier after a routing near-tie of the "
                    f"reference at position {part['near_tie_at']}: not judged"}


def _feed_output(arrays: dict[str, np.ndarray], k: int, single: bool) -> Any:
    got = arrays.get(f"logits.{k}")
    return arrays.get("logits") if got is None and single else got


def judge_model_case(case: dict[str, Any], ref: dict[str, np.ndarray], arrays: dict[str, np.ndarray] | None,
                     tier: CompareTier) -> CaseResult:
    """A oneshot or decode case: every feed's logits, and a oneshot's intermediates when the backend gave some."""
    if arrays is None:
        return CaseResult(case["id"], case["kind"], tier.name, "fail", "no results for this case (expected "
                          f"cases/{case['id']}.npz or .safetensors)")
    feeds = case["feeds"]
    single = len(feeds) == 1
    parts = [judge_logits(f["output"], _feed_output(arrays, n, single), ref[f"logits.{n}"], ref.get(f"margin.{n}"),
                          f["start"], tier) for n, f in enumerate(feeds)]
    result = CaseResult(case["id"], case["kind"], tier.name, "pass", "", parts,
                        not_judged=sum(p.get("excused", 0) for p in parts))
    if single and "ids" in arrays:
        ran = np.asarray(arrays["ids"]).reshape(-1).tolist()
        if ran != feeds[0]["ids"]:
            result.status, result.detail = "fail", "the results ran other ids than the case's"
            return result
    if case["kind"] == "oneshot":
        result.comparison = _intermediates(case, ref, arrays, parts[0], tier, result)
    bad = next((p for p in parts if not p["ok"]), None)
    if bad is not None and result.status == "pass":
        result.status, result.detail = "fail", f"{bad['output']} (positions {bad['positions'][0]}.." \
                                               f"{bad['positions'][1] - 1}): {bad['problem']}"
    if result.status == "pass":
        worst = max((p["max_rel"] for p in parts if p.get("max_rel") is not None), default=None)
        result.detail = (f"{len(parts)} feed{'s' if len(parts) > 1 else ''} within {tier.name}"
                         + (f" (worst max_rel {worst:.3g})" if worst is not None else "")
                         + (f"; {result.not_judged} positions after a routing near-tie excused"
                            if result.not_judged else ""))
    return result


def _intermediates(case: dict[str, Any], ref: dict[str, np.ndarray], arrays: dict[str, np.ndarray],
                   logits: dict[str, Any], tier: CompareTier, result: CaseResult) -> dict[str, Any] | None:
    """The oneshot's trace comparison (the backend's intermediates, its logits as ``lm_head`` when it gave every
    row); a failure of an intermediate fails the case, unless it lies after a routing near-tie of the reference and
    every earlier position agrees (as for the logits)."""
    ids = case["feeds"][0]["ids"]
    theirs = {k: v for k, v in arrays.items() if not k.startswith(("logits", *FEED_KEYS))}
    full = _feed_output(arrays, 0, True)
    if full is not None and np.ndim(full) == 2 and np.shape(full)[0] == len(ids):
        theirs["lm_head"] = full
    if not theirs:
        return None
    mine = {k: v for k, v in ref.items() if k.startswith(("model.", "lm_head"))}
    mine["lm_head"] = ref["logits.0"]
    try:
        c = compare(Trace(theirs, {"ids": ids}), Trace(mine, {"ids": ids}), tier, partial=True)
        first = c.first_divergence
        margin = ref.get("margin.0")
        tie = int(np.argmin(margin > tier.max_rel)) if margin is not None and (margin <= tier.max_rel).any() else None
        if first is not None and tie is not None and (first.position is None or first.position >= tie) and tie > 0:
            cut = compare(Trace({k: _before(k, v, tie) for k, v in theirs.items()}, {"ids": ids[:tie]}),
                          Trace({k: _before(k, v, tie) for k, v in mine.items()}, {"ids": ids[:tie]}), tier,
                          partial=True)
            if cut.first_divergence is None:
                c, first = cut, None
                result.parts[0]["note"] = (f"intermediates judged on positions before {tie}, a routing near-tie of "
                                           f"the reference")
    except Lfm2npError as e:
        result.status, result.detail = "fail", f"its intermediates: {e}"
        return None
    if first is not None and first.name != "lm_head":  # the logits are judged above, near-ties and all
        result.status, result.detail = "fail", c.verdict()
    return c.to_json()


def _before(name: str, value: np.ndarray, rows: int) -> np.ndarray:
    """A per-position tensor's first ``rows`` positions (others as they are)."""
    return value[:rows] if per_position(name) and np.ndim(value) else value


def judge_operator(case: dict[str, Any], ref: dict[str, np.ndarray], arrays: dict[str, np.ndarray] | None,
                   tier: CompareTier) -> CaseResult:
    """One operator's outputs (``output.<key>``) against the reference's, named by the trace schema."""
    tier = operator_tier(tier)
    if arrays is None:
        return CaseResult(case["id"], "operator", tier.name, "fail", f"no results for this case (expected "
                          f"{case['file'].rsplit('.', 1)[0]}.npz or .safetensors)")
    names = case["outputs"]
    theirs = {names[k[len("output."):]]: v for k, v in arrays.items()
              if k.startswith("output.") and k[len("output."):] in names}
    if not theirs:
        return CaseResult(case["id"], "operator", tier.name, "fail", "none of its outputs in the results (keys "
                          f"output.<name>: {', '.join(list(names)[:4])}...)")
    mine = {names[k]: ref[f"output.{k}"] for k in names}
    ids = case["ids"]
    try:
        c = compare(Trace(theirs, {"ids": ids}), Trace(mine, {"ids": ids}), tier, partial=True)
    except Lfm2npError as e:
        return CaseResult(case["id"], "operator", tier.name, "fail", str(e))
    missing = [k for k in names if names[k] not in theirs]
    status = "pass" if c.ok else "fail"
    detail = c.verdict() + (f"; not given: {', '.join(missing)}" if missing else "")
    parts = [{"output": d.name, "ok": d.ok, "max_rel": d.max_rel, "nmse_db": d.nmse_db} for d in c.diffs]
    return CaseResult(case["id"], "operator", tier.name, status, detail, parts, c.to_json())


def judge_llama_cpp(case: dict[str, Any], pack: Pack, results: Results, tier: CompareTier,
                    required: bool = False) -> CaseResult:
    """llama.cpp's own run (``llamacpp-<model>.bin``: the last position's float32 logits) against the pack's; a
    results directory without one skips the case (another backend's), unless it is ``required``."""
    logits_file, tokens_file = results.llama_cpp()
    if logits_file is None:
        return CaseResult(case["id"], "llama.cpp", tier.name, "fail" if required else "skip",
                          "no data/llamacpp-<model>.bin in the results" + ("" if required else
                                                                          " (another backend's: select the case "
                                                                          "with --cases llama.cpp to require it)"))
    ref = np.fromfile(pack.directory / case["file"], dtype=np.float32)
    size = logits_file.stat().st_size
    if size != 4 * ref.size:
        return CaseResult(case["id"], "llama.cpp", tier.name, "fail", f"{logits_file.name}: {size} bytes; llama.cpp's "
                          f"logits of one position are {ref.size} float32 values ({4 * ref.size} bytes)")
    got = np.fromfile(logits_file, dtype=np.float32)
    if tokens_file is not None:
        if tokens_file.stat().st_size > 4 * (len(case["ids"]) + 1 << 20):
            return CaseResult(case["id"], "llama.cpp", tier.name, "fail", f"{tokens_file.name}: far more tokens than "
                              f"the prompt's {len(case['ids'])}")
        ran = np.fromfile(tokens_file, dtype=np.int32).tolist()
        if ran != case["ids"]:
            return CaseResult(case["id"], "llama.cpp", tier.name, "fail",
                              f"{tokens_file.name}: llama.cpp tokenized the prompt as {ran[:12]}..., the pack as "
                              f"{case['ids'][:12]}...: another tokenizer (or BOS) than the pack's")
    part = judge_logits(logits_file.name, got, ref[None], None, len(case["ids"]) - 1, tier)
    status = "pass" if part["ok"] else "fail"
    detail = f"{logits_file.name}: " + (part.get("problem") or f"within {tier.name} (max_rel {part['max_rel']:.3g})")
    return CaseResult(case["id"], "llama.cpp", tier.name, status, detail, [part])


# ----------------------------------------------------------------------------------------------- the check
def select(pack: Pack, patterns: Sequence[str] | None) -> list[dict[str, Any]]:
    """The pack's cases whose ids match one of ``patterns`` (globs; None: every case)."""
    if not patterns:
        return list(pack.cases)
    chosen = [c for c in pack.cases if any(fnmatch.fnmatchcase(c["id"], p) for p in patterns)]
    if not chosen:
        raise Lfm2npError(f"--cases {' '.join(patterns)} matches none of the pack's cases (e.g. "
                          f"{', '.join(c['id'] for c in pack.cases[:3])})")
    return chosen


def check(pack: Pack, results: Results, tier: str | None = None, cases: Sequence[str] | None = None) \
        -> list[CaseResult]:
    """Every selected case of ``pack`` judged on ``results`` (see the module docstring); ``tier`` overrides the
    cases' own."""
    if tier is not None and tier not in COMPARE_TIERS:
        raise Lfm2npError(f"unknown tier {tier!r}; expected one of {', '.join(COMPARE_TIERS)}")
    out = []
    for case in select(pack, cases):
        t = COMPARE_TIERS[tier or ("fp32" if case["kind"] == "operator" else case["tier"])]
        if case["kind"] == "llama.cpp":
            out.append(judge_llama_cpp(case, pack, results, t, required=bool(cases)))
            continue
        stem = case["file"].rsplit(".", 1)[0]
        found = results.find(stem)
        arrays = None if found is None else results.arrays(found)
        judge = judge_operator if case["kind"] == "operator" else judge_model_case
        out.append(judge(case, pack.reference(case), arrays, t))
    return out


def summary_json(pack: Pack, results: Results, verdicts: list[CaseResult]) -> dict[str, Any]:
    """The check as strict JSON data (non-finite measures as null)."""
    counts = {s: sum(v.status == s for v in verdicts) for s in ("pass", "fail", "skip")}
    data = {"pack": str(pack.directory), "model": pack.manifest["model"]["name"], "config_hash": pack.config_hash,
            "results": str(results.directory), "backend": results.meta.get("backend"), "ok": counts["fail"] == 0,
            "counts": counts, "cases": [v.to_json() for v in verdicts]}
    return json.loads(json.dumps(_finite(data), allow_nan=False))


def _finite(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if np.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x
