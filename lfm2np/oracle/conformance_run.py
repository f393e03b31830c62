"""Running a pack's cases on a backend and writing its results in the layout ``conformance check`` reads.

:func:`run_pack` plays every selected case on a **backend**, an object with

- ``name`` (str) and ``config_hash`` (the model it runs: :func:`lfm2np.oracle.conformance.config_hash`);
- ``play(steps)``: the logits of each feed of a case's steps (:mod:`lfm2np.oracle.conformance_cases`), as
  ``{"logits.<k>": (n, V)}``, on the backend's own decoding state (prefills, decoding, rollback, batches);
- ``trace(ids)``: intermediates of one sequence under any tool's names, or None (a backend that shows none);
- ``operator(case, inputs)``: an operator case's ``{"output.<key>": value}`` from its inputs and weights, or None.

and writes ``cases/<case>.npz``, ``ops/<NNN_name>.npz`` and ``results.json`` (the backend, its model's config
hash, how it ran). :class:`Lfm2npBackend` is lfm2np itself (any checkpoint or GGUF, in any numerics mode: a
second opinion, or a check of a converted file); :mod:`lfm2np.oracle.conformance_backends` holds llama.cpp's and
transformers'.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import Lfm2npError
from ..version import __version__
from .conformance import Pack, config_hash
from .conformance_cases import play, usual_patterns
from .conformance_check import select
from .golden import save_arrays
from .trace import record


class Lfm2npBackend:
    """lfm2np's own model as a backend: :meth:`lfm2np.Model.step` with its states (a rollback is
    :meth:`lfm2np.State.rollback`, a batch :meth:`lfm2np.Model.step_batch`), its traces, and each operator's outputs
    as its own forward pass computes them on the case's prompt."""

    def __init__(self, model: Any, name: str = "lfm2np"):
        self.model, self.name = model, name
        self.config_hash = config_hash(model.config)
        self.details = {"dtype": model.numerics.name, "weights": model.params.describe()
                        if hasattr(model.params, "describe") else None}
        self._traces: dict[tuple[int, ...], dict[str, np.ndarray]] = {}

    def play(self, steps: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        states: dict[int, Any] = {}
        out: dict[str, np.ndarray] = {}
        for step in steps:
            if step["op"] == "rollback":
                states[step["seq"]] = states[step["seq"]].rollback(step["n"])
                continue
            entries = step["feeds"] if step["op"] == "batch" else [step]
            logits, new = self.model.step_batch([e["ids"] for e in entries], [states.get(e["seq"]) for e in entries])
            for e, rows, state in zip(entries, logits, new):
                out[f"logits.{len(out)}"], states[e["seq"]] = rows, state
        return out

    def trace(self, ids: list[int]) -> dict[str, np.ndarray]:
        _, t = record(self.model, ids, usual_patterns(self.model))
        return dict(t.tensors)

    def operator(self, case: dict[str, Any], inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        key = tuple(case["ids"])
        if key not in self._traces:
            self._traces = {key: dict(record(self.model, list(key))[1].tensors)}
        t = self._traces[key]
        return {f"output.{k}": t[name] for k, name in case["outputs"].items() if name in t}


def run_pack(pack: Pack, backend: Any, out: "str | os.PathLike[str]", cases: Sequence[str] | None = None,
             progress: Callable[[int, int], None] | None = None) -> dict[str, int]:
    """Play the selected cases of ``pack`` on ``backend`` and write its results into ``out`` (see the module
    docstring). The backend must run the pack's model (its config hash). Returns how many files of each kind were
    written."""
    if backend.config_hash != pack.config_hash:
        raise Lfm2npError(f"the backend's model has config hash {backend.config_hash}, the pack's "
                          f"{pack.config_hash}: it runs another model than {pack.manifest['model']['name']}")
    out = Path(out)
    counts = {"cases": 0, "operators": 0, "skipped": 0}
    try:
        (out / "cases").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise Lfm2npError(f"{out}: cannot create the results directory ({e.strerror or e})") from None
    chosen = [c for c in select(pack, cases) if c["kind"] != "llama.cpp"]  # llama.cpp's own files: finish()
    for done, case in enumerate(chosen):
        if progress is not None:
            progress(done, len(chosen))
        stem = case["file"].rsplit(".", 1)[0]
        if case["kind"] == "operator":
            arrays = backend.operator(case, pack.reference(case))
            if not arrays:
                counts["skipped"] += 1
                continue
            (out / "ops").mkdir(exist_ok=True)
            counts["operators"] += 1
        else:
            play(case["steps"], case["id"])  # the steps are well formed before a backend sees them
            arrays = backend.play(case["steps"])
            if case["kind"] == "oneshot":
                arrays.update(backend.trace(case["feeds"][0]["ids"]) or {})
            counts["cases"] += 1
        save_arrays({k: np.asarray(v) for k, v in arrays.items()}, out / f"{stem}.npz")
    if progress is not None:
        progress(len(chosen), len(chosen))
    extra = getattr(backend, "finish", None)
    if extra is not None:
        extra(pack, out)
    meta = {"backend": backend.name, "config_hash": backend.config_hash, "pack": str(pack.directory),
            "written_by": f"lfm2np {__version__} conformance run", **getattr(backend, "details", {})}
    (out / "results.json").write_text(json.dumps(meta, indent=1, default=str) + "\n")
    return counts
