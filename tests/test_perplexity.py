"""Perplexity in sliding windows: equal to what transformers computes on the same tokens and windows
(tests/golden/perplexity.json, written by tools/make_perplexity_reference.py), each token scored once,
the command line and its errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

import lfm2np
from lfm2np.embedded import embedded_model_path
from lfm2np.evaluate import log_probs, perplexity, windows
from lfm2np.io.tokenizer import Tokenizer
from lfm2np.oracle.tolerance import FP32
from lfm2np.synthetic import random_model

from conftest import GOLDEN

REFERENCE = json.loads((GOLDEN / "perplexity.json").read_text(encoding="utf-8"))
PATH = embedded_model_path()
CASES = [(t, r) for t in REFERENCE["texts"] for r in t["results"]]


@pytest.fixture(scope="module")
def model():
    return lfm2np.load(PATH)


def test_the_tokens_are_transformers_tokens():
    tok = Tokenizer.from_dir(PATH)
    for text in REFERENCE["texts"]:
        assert tok.encode(text["text"], add_bos=True) == text["ids"]


@pytest.mark.parametrize("text, ref", CASES, ids=[f"{t['kind']}-W{r['window']}-S{r['stride']}" for t, r in CASES])
def test_perplexity_equals_transformers(model, text, ref):
    ours = perplexity(model, text["ids"], ref["window"], ref["stride"])
    assert (ours["tokens"], ours["windows"]) == (ref["tokens"], ref["windows"]) == (len(text["ids"]) - 1,
                                                                                   ref["windows"])
    # a whole-model output, so the logits tier (measured: 1e-7 .. 4e-6 relative, float32 and float64 alike)
    assert abs(ours["nll"] - ref["nll"]) <= FP32.logits_rel * ref["nll"]
    assert abs(ours["perplexity"] - ref["perplexity"]) <= FP32.logits_rel * ref["perplexity"]


def test_the_default_window_is_the_context_and_the_stride_half_of_it(model):
    ids = REFERENCE["texts"][0]["ids"]
    r = perplexity(model, ids)
    assert (r["window"], r["stride"], r["windows"]) == (2048, 1024, 1)


def test_every_token_after_the_first_is_scored_once_with_the_context_the_window_allows():
    """The law behind the windows: the summed NLL equals scoring each token from its own window start."""
    m = random_model(lfm2np.load_config("tiny-dense"), seed=2, dtype="float64")  # no float32 noise between lengths
    ids = list(np.random.default_rng(0).integers(0, m.config.vocab_size, 23))
    for W, S in [(5, 2), (6, 5), (4, 1), (30, 7)]:
        plan = windows(len(ids), W, S)
        targets = [t for b, e, first in plan for t in range(first, e)]
        assert targets == list(range(1, len(ids)))
        expected = 0.0
        for b, e, first in plan:
            for t in range(first, e):
                assert b < t and t - b <= W - 1 and (b == 0 or t - b >= W - S)
                logits = m.forward(ids[b:t])[-1]
                expected -= float(log_probs(logits[None], np.array([ids[t]]))[0])
        r = perplexity(m, ids, W, S)
        assert math.isclose(r["nll_sum"], expected, rel_tol=1e-9)


def test_log_probs_are_stable_for_huge_logits():
    logits = np.array([[1e4, 0.0, -1e4], [3.0e38, 3.0e38, 0.0]], np.float32)
    lp = log_probs(logits, np.array([0, 1]))
    np.testing.assert_allclose(lp, [0.0, -math.log(2)], atol=1e-12)


@pytest.mark.parametrize("kwargs, message", [
    ({"window": 1}, "window is 1"),
    ({"window": 8, "stride": 8}, "stride is 8"),
    ({"window": 8, "stride": 0}, "stride is 0"),
    ({"window": 4096}, "max_position_embeddings"),
])
def test_bad_windows(model, kwargs, message):
    with pytest.raises(lfm2np.Lfm2npError, match=message):
        perplexity(model, [1, 2, 3, 4], **kwargs)
    with pytest.raises(lfm2np.Lfm2npError, match="at least 2 tokens"):
        perplexity(model, [1])


def test_the_command_prints_json_and_progress(tmp_path):
    text = REFERENCE["texts"][0]
    ref = next(r for r in text["results"] if r["window"] == 64)
    f = tmp_path / "text.txt"
    f.write_text(text["text"], encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "lfm2np", "perplexity", str(PATH), str(f), "--window", "64",
                           "--stride", "32", "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["tokens"] == ref["tokens"] and out["windows"] == ref["windows"] and out["bos"] is True
    assert abs(out["perplexity"] - ref["perplexity"]) <= FP32.logits_rel * ref["perplexity"]
    assert proc.stderr.count("window ") == ref["windows"] and f"window {ref['windows']}/{ref['windows']}" in proc.stderr
    plain = subprocess.run([sys.executable, "-m", "lfm2np", "perplexity", str(PATH), str(f), "--quiet"],
                           capture_output=True, text=True)
    assert plain.returncode == 0 and plain.stdout.startswith("perplexity ") and "window 1/1" not in plain.stderr


@pytest.mark.parametrize("content, extra, message", [
    (b"\xff\xfe not utf-8", [], "not UTF-8"),
    (b"x", [], "at least 2 tokens"),
    (b"some text here", ["--window", "8", "--stride", "9"], "stride is 9"),
])
def test_command_errors_are_one_line(tmp_path, content, extra, message):
    f = tmp_path / "in.txt"
    f.write_bytes(content)
    proc = subprocess.run([sys.executable, "-m", "lfm2np", "perplexity", str(PATH), str(f), "--no-bos", *extra],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("lfm2np: error:") and message in proc.stderr


def test_a_perplexity_past_float_range_is_inf_not_an_error():
    m = random_model(lfm2np.load_config("tiny-dense"), seed=3)
    norm = m.params["model.embedding_norm.weight"] * 1e5  # logits ~1e5 apart
    m = lfm2np.Model(m.config, {**m.params, "model.embedding_norm.weight": norm})
    r = perplexity(m, list(range(1, 40)))
    assert r["nll"] > 710 and math.isfinite(r["nll"]) and r["perplexity"] == math.inf
