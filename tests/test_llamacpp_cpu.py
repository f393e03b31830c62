"""llama.cpp's CPU arithmetic (dtype ``llamacpp-cpu``) against llama.cpp itself: tiny LFM2 and LFM2-MoE models
quantised by llama.cpp (F32, Q8_0, Q6_K, Q4_K_M, Q4_0) and llama.cpp's logits for them, one-shot, token by token and
a prefill followed by single tokens, with an f16 and an f32 KV cache (tests/golden/llamacpp-cpu, written by
tools/make_llamacpp_fixtures.py with llama-cpp-python 0.3.36 on x86-64 AVX2).

The bar of the issue: NMSE <= 1e-6 to llama.cpp (or no further than llama.cpp's own one-shot run is from its
token-by-token run, where that is more), no more argmax differences than llama.cpp's two runs have, and at least
ten times closer than exact arithmetic over all files. What was measured is stronger: the same bits.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import lfm2np
from lfm2np.cli import main

pytest.importorskip("gguf")  # the dev extra has it (GGUF files)

from tools_loader import load_tool  # noqa: E402

FIXTURES = Path(__file__).parent / "golden" / "llamacpp-cpu"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
FILES = [(kind, ftype) for kind, m in MANIFEST["models"].items() for ftype in m["files"]]
MODES = {"f16": "llamacpp-cpu", "f32": "llamacpp-cpu-kv-f32"}


@functools.lru_cache(maxsize=None)
def llama_logits() -> dict[str, np.ndarray]:
    return load_file(str(FIXTURES / "logits.safetensors"))


@functools.lru_cache(maxsize=None)
def gguf_path(kind: str, ftype: str, tmp: str) -> Path:
    """The fixture file: llama.cpp's quantised file, or the F32 source rebuilt as the generator wrote it."""
    entry = MANIFEST["models"][kind]
    if entry["files"][ftype]["file"]:
        return FIXTURES / entry["files"][ftype]["file"]
    gen = load_tool("make_llamacpp_fixtures")
    return gen.f32_file(Path(tmp) / f"{kind}-F32.gguf", entry["config"], entry["seed"])


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("llamacpp-cpu"))


def run(path: Path, ids: list[int], dtype: str, how: str) -> np.ndarray:
    """lfm2np's logits fed as llama.cpp was: all at once, one by one, or a prefill then one by one."""
    return load_tool("make_llamacpp_fixtures").ours(path, ids, dtype, how)


def nmse(a: np.ndarray, ref: np.ndarray) -> float:
    a64, r64 = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(((a64 - r64) ** 2).sum() / (r64 ** 2).sum())


@pytest.mark.parametrize("kind,ftype", FILES)
def test_the_files_are_the_ones_llama_cpp_ran(kind, ftype, tmp):
    gen = load_tool("make_llamacpp_fixtures")
    assert gen.tensor_hash(gguf_path(kind, ftype, tmp)) == MANIFEST["models"][kind]["files"][ftype]["tensor_sha256"]


@pytest.mark.parametrize("kv", ["f16", "f32"])
@pytest.mark.parametrize("kind,ftype", FILES)
def test_the_mode_computes_llama_cpps_bits(kind, ftype, kv, tmp):
    """Every run of every file, every position: the logits llama.cpp computed, bit for bit; and the issue's bar."""
    ids = MANIFEST["models"][kind]["ids"]
    key = f"{kind}-{ftype}/{kv}/"
    theirs = {k[len(key):]: v for k, v in llama_logits().items() if k.startswith(key)}
    assert set(theirs) == ({"oneshot", "stepwise", f"split:{MANIFEST['split']}"} if kv == "f16" else
                           {"oneshot", "stepwise"})
    self_nmse = nmse(theirs["stepwise"], theirs["oneshot"])
    self_flips = int((theirs["stepwise"].argmax(-1) != theirs["oneshot"].argmax(-1)).sum())
    for how, ref in theirs.items():
        ours = run(gguf_path(kind, ftype, tmp), ids, MODES[kv], how)
        assert nmse(ours, ref) <= max(1e-6, self_nmse), (how, nmse(ours, ref))
        assert int((ours.argmax(-1) != ref.argmax(-1)).sum()) <= self_flips
        diff = np.argwhere(ours != ref)
        assert not diff.size, f"{how}: first differing logit at (position, id) {tuple(diff[0])} of {len(diff)}"


def test_ten_times_closer_than_exact_arithmetic(tmp):
    """Over every file, llama.cpp's one-shot logits against lfm2np in float32 (exact dequantised weights, f32
    activations) and in the mode: the issue asks for ten times closer; exact arithmetic is 7e-4 NMSE away on the
    quantised files."""
    exact = mode = 0.0
    for kind, ftype in FILES:
        ref = llama_logits()[f"{kind}-{ftype}/f16/oneshot"]
        ids = MANIFEST["models"][kind]["ids"]
        exact += nmse(run(gguf_path(kind, ftype, tmp), ids, "float32", "oneshot"), ref)
        mode += nmse(run(gguf_path(kind, ftype, tmp), ids, "llamacpp-cpu", "oneshot"), ref)
    assert exact > 1e-3 and mode * 10 <= exact


def test_a_safetensors_checkpoint_computes_as_its_f32_gguf(tmp_path):
    """On a checkpoint (or arrays) the mode takes the weights as the GGUF tensors of their stored type: an F32
    checkpoint computes exactly as the F32 GGUF written from it."""
    from conftest import GOLDEN
    from lfm2np.io.gguf_write import write_gguf

    case = GOLDEN / "dense-legacy"
    model = lfm2np.load(case, dtype="llamacpp-cpu")
    write_gguf(tmp_path / "m.gguf", model.config, lfm2np.load(case).params, "F32")
    ids = [1, 5, 9, 42, 7, 3]
    assert np.array_equal(model.forward(ids), lfm2np.load(tmp_path / "m.gguf", dtype="llamacpp-cpu").forward(ids))
    assert not np.array_equal(model.forward(ids), lfm2np.load(case).forward(ids))  # (the f16 KV cache, at least)


def test_a_type_the_mode_does_not_cover_is_named(tmp_path, capsys):
    from lfm2np.io.gguf_write import write_gguf
    from lfm2np.synthetic import random_params

    c = lfm2np.load_config(MANIFEST["models"]["dense"]["config"])
    path = tmp_path / "q5k.gguf"
    write_gguf(path, c, random_params(c, seed=0), "Q5_K")
    with pytest.raises(lfm2np.Lfm2npError, match=r"stored as Q5_K.*llamacpp-cpu.*covered: F32"):
        lfm2np.load(path, dtype="llamacpp-cpu")
    assert main(["forward", str(path), "--ids", "1", "2", "--dtype", "llamacpp-cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Q5_K" in err[0]


def test_the_quantisation_steps_are_named(tmp):
    """The trace holds what each product read: Q8_0 blocks of 32 for a Q8_0 file (each value an integer multiple
    of its block's scale, at most 127 of them), the KV cache in f16, the query in f16."""
    from lfm2np.oracle.trace import record

    model = lfm2np.load(gguf_path("dense", "Q8_0", tmp), dtype="llamacpp-cpu")
    _, trace = record(model, MANIFEST["models"]["dense"]["ids"][:8])
    assert trace.names() == [t.name for t in lfm2np.trace_names(model.config, inputs=True)]
    x, q = trace["model.layers.0.conv.in_proj.input"], trace["model.layers.0.operator_norm"]
    blocks, exact = x.reshape(8, -1, 32), q.reshape(8, -1, 32)
    scale = np.abs(blocks).max(axis=-1, keepdims=True) / 127
    assert np.allclose(blocks / scale, np.rint(blocks / scale), atol=1e-3) and not np.array_equal(x, q)
    assert np.abs(blocks - exact).max() <= scale.max() / 2 * 1.01
    for name in ("self_attn.q_input", "self_attn.k_cache", "self_attn.v_cache"):
        v = trace[f"model.layers.1.{name}"]
        assert np.array_equal(v, v.astype(np.float16).astype(np.float32))


# ------------------------------------------------------------------------------ the oracle in this mode
def test_more_exact_than_llama_cpp_is_told_from_a_kernel_that_is_off(tmp):
    """Against the mode (tier llamacpp-cpu), lfm2np's own float32 run of a Q8_0 file (f32 activations, f32 cache)
    is reproduced by activations-unquantised; a kernel that is off (two blocks' scales exchanged in the first
    layer) by nothing, its comparison departing at the first layer's first product."""
    from lfm2np.oracle.diagnose import diagnose
    from lfm2np.oracle.dumps import trace_dump
    from lfm2np.oracle.trace import record

    gen = load_tool("make_llamacpp_fixtures")
    path, ids = gguf_path("dense", "Q8_0", tmp), MANIFEST["models"]["dense"]["ids"][:12]
    reference = lfm2np.load(path, dtype="llamacpp-cpu")
    d = diagnose(reference, trace_dump(record(lfm2np.load(path), ids)[1], ids))
    assert d.tier == "llamacpp-cpu" and not d.agrees and d.first_divergence["tensor"] == "model.layers.0.conv.in_proj"
    assert d.best is not None and d.best.id.startswith("activations-unquantised"), d.hypotheses[:3]
    buggy = lfm2np.load(path, dtype="llamacpp-cpu")
    gen.kernel_bug(buggy)
    d = diagnose(reference, trace_dump(record(buggy, ids)[1], ids))
    assert not d.agrees and d.best is None and d.first_divergence["tensor"] == "model.layers.0.conv.in_proj"


@pytest.mark.parametrize("kv,mistake", [("f32", "kv-cache-f32"), ("f16", "kv-cache-f16")])
def test_llama_cpp_with_another_cache_type_is_named(kv, mistake, tmp):
    """llama.cpp's own logits with an f32 cache against the mode with its default f16 cache, and the reverse:
    the kv-cache entry reproduces them to the bit."""
    from lfm2np.oracle.diagnose import diagnose
    from lfm2np.oracle.dumps import logits_dump

    ids = MANIFEST["models"]["moe"]["ids"]
    theirs = llama_logits()[f"moe-Q4_K_M/{kv}/oneshot"]
    reference = lfm2np.load(gguf_path("moe", "Q4_K_M", tmp), dtype=MODES["f16" if kv == "f32" else "f32"])
    d = diagnose(reference, logits_dump(ids, theirs), only=["kv-cache-f32", "kv-cache-f16", "activations-unquantised"])
    assert not d.agrees and d.best.id == mistake and d.best.error == 0, d.hypotheses
    assert {n["id"] for n in d.not_applicable} == {"kv-cache-f16" if kv == "f32" else "kv-cache-f32"}


def test_compare_takes_the_mode_and_its_tier(tmp, tmp_path, capsys):
    """compare --model FILE --dtype llamacpp-cpu judges a trace at the tier llamacpp-cpu: a trace of the mode
    passes it, a float32 trace of the same file fails it at the first product."""
    from lfm2np.oracle.trace import record

    path, ids = gguf_path("dense", "Q4_0", tmp), MANIFEST["models"]["dense"]["ids"][:8]
    for dtype, status in (("llamacpp-cpu", 0), ("float32", 1)):
        trace = record(lfm2np.load(path, dtype=dtype), ids)[1].save(tmp_path / f"{dtype}.safetensors")
        assert main(["compare", str(trace), "--model", str(path), "--dtype", "llamacpp-cpu", "--json"]) == status
        result = json.loads(capsys.readouterr().out)
        assert result["tier"] == "llamacpp-cpu"
        if status:
            assert result["first_divergence"]["tensor"] == "model.layers.0.conv.in_proj"
