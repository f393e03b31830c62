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


def rewrite_gguf(src: Path, dst: Path, meta: dict | None = None, drop=(), tensors: dict | None = None) -> Path:
    """A copy of GGUF file ``src`` at ``dst``, through gguf's reader and writer: metadata values replaced by
    ``meta`` (``None``: the key left out; ``general.architecture`` too), the tensors ``drop`` left out,
    ``tensors`` ({name: array}) replacing those of the same name or added after the others; every other tensor
    copied as stored (quantised blocks included)."""
    import gguf  # the dev extra: only the GGUF tests call this

    meta, tensors = meta or {}, tensors or {}
    reader = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(str(dst), meta.get("general.architecture",
                                           reader.fields["general.architecture"].contents()))
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or (key in meta and meta[key] is None):
            continue
        vtype = field.types[0]
        w.add_key_value(key, meta.get(key, field.contents()), vtype,
                        sub_type=field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
    stored = set()
    for t in reader.tensors:
        stored.add(t.name)
        if t.name in drop:
            continue
        if t.name in tensors:
            w.add_tensor(t.name, tensors[t.name])
        else:
            w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    for name, values in tensors.items():
        if name not in stored:
            w.add_tensor(name, values)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst
