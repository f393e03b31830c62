"""Shared helpers: the golden fixtures written by tools/make_fixtures.py (read without torch)."""

from __future__ import annotations

import contextlib
import functools
import json
from pathlib import Path

import os

import numpy as np
import pytest
from hypothesis import settings
from safetensors.numpy import load_file

import lfm2np
from lfm2np import passes

# CI explores the same examples every run (a failure there reproduces); local runs keep exploring anew.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

GOLDEN = Path(__file__).parent / "golden"
PACKAGE_ROOT = str(Path(lfm2np.__file__).resolve().parents[1])  # the lfm2np under test, for subprocesses
MANIFEST = json.loads((GOLDEN / "manifest.json").read_text())
CASES = sorted(MANIFEST["cases"])
DENSE = [c for c in CASES if MANIFEST["cases"][c]["reference_config"]["model_type"] == "lfm2"]
#: bf16 emulation against transformers in bf16: a few bf16 ulps (2^-8 = 3.9e-3) relative to the scale, the
#: size of a value rounded the other way at a boundary (float32 sums in another order) and carried on
ULP_FLIP = 1e-2
MOE = [c for c in CASES if MANIFEST["cases"][c]["reference_config"]["model_type"] == "lfm2_moe"]


@functools.lru_cache(maxsize=None)
def golden(case: str) -> dict[str, np.ndarray]:
    """All arrays recorded from transformers for one fixture case."""
    return load_file(str(GOLDEN / case / "golden.safetensors"))


@functools.lru_cache(maxsize=None)
def model(case: str, dtype: str = "float32") -> lfm2np.Model:
    return lfm2np.load(GOLDEN / case, dtype=dtype)


def captured(case: str, name: str) -> np.ndarray:
    return golden(case)["capture." + name]


@pytest.fixture(params=CASES)
def case(request) -> str:
    return request.param


def subprocess_env() -> dict[str, str]:
    """The environment for a test's child Python: one BLAS thread, and the lfm2np under test first on the path."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([PACKAGE_ROOT, *filter(None, [env.get("PYTHONPATH")])])
    return env


@contextlib.contextmanager
def split(chunk: int, threads: int):
    """Long passes (lfm2np.passes) in slices of ``chunk`` elements, shared among ``threads`` threads however
    small."""
    saved = passes.ELEMENTWISE_CHUNK, passes.THREADS, passes.PARALLEL_MIN
    passes.ELEMENTWISE_CHUNK, passes.THREADS, passes.PARALLEL_MIN = chunk, threads, 1
    try:
        yield
    finally:
        passes.ELEMENTWISE_CHUNK, passes.THREADS, passes.PARALLEL_MIN = saved
