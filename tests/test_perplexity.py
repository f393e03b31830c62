"""Perplexity in sliding windows: equal to what transformers computes on the same tokens and windows
(tests/golden/perplexity.json, written by tools/make_perplexity_reference.py), each token scored once,
the command line and its errors."""

from __future__ import annotations

import io
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
    assert out["nll_stderr"] > 0 and out["perplexity_stderr"] == pytest.approx(out["perplexity"] * out["nll_stderr"])
    # not a terminal and quicker than the 10 s between plain progress lines: no line per window
    assert "window" not in proc.stderr and ref["windows"] > 2
    plain = subprocess.run([sys.executable, "-m", "lfm2np", "perplexity", str(PATH), str(f), "--quiet"],
                           capture_output=True, text=True)
    assert plain.returncode == 0 and plain.stdout.startswith("perplexity ") and " +/- " in plain.stdout
    assert "perplexity" not in plain.stderr


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


# ------------------------------------------------------------------ uncertainty, progress, text files
def test_the_standard_error_is_over_tokens_as_an_independent_computation_gives_it(model):
    ids = REFERENCE["texts"][0]["ids"][:90]
    nll = []
    for begin, end, first in windows(len(ids), 24, 10):  # each token's NLL from its own window, one at a time
        logits = model.forward(ids[begin:end]).astype(np.float64)
        for t in range(first, end):
            z = logits[t - 1 - begin]
            nll.append(float(np.log(np.exp(z - z.max()).sum()) + z.max() - z[ids[t]]))
    r = perplexity(model, ids, 24, 10)
    want = np.std(nll, ddof=1) / math.sqrt(len(nll))
    assert r["tokens"] == len(nll) and r["nll"] == pytest.approx(np.mean(nll), rel=1e-9)
    assert r["nll_stderr"] == pytest.approx(want, rel=1e-9)
    assert r["perplexity_stderr"] == pytest.approx(r["perplexity"] * want, rel=1e-9)
    assert math.isnan(perplexity(model, ids[:2])["nll_stderr"])  # one scored token: no spread to measure


def test_a_progress_that_is_not_a_function_fails_before_the_first_window(model):
    calls = []

    class Counting:
        config = model.config

        def check_ids(self, ids):
            return model.check_ids(ids)

        def forward(self, ids):
            calls.append(len(ids))
            return model.forward(ids)

    with pytest.raises(lfm2np.Lfm2npError, match="progress is 5; expected a function"):
        perplexity(Counting(), list(range(1, 60)), 16, 8, progress=5)
    assert calls == []


class _Stream(io.StringIO):
    def __init__(self, terminal):
        super().__init__()
        self.terminal = terminal

    def isatty(self):
        return self.terminal


def test_progress_on_a_terminal_is_one_line_rewritten_in_place():
    from lfm2np.cli.evaluate import PerplexityProgress

    clock = iter(float(x) for x in range(0, 100, 2))
    stream = _Stream(terminal=True)
    report = PerplexityProgress(stream, clock=lambda: next(clock))  # t0 = 0; each call reads the clock once
    for k in (1, 2, 3):
        report(k, 3, {"perplexity": 12.5 - k, "perplexity_stderr": 0.25, "tokens": 100 * k})
    text = stream.getvalue()
    assert text.count("\r") == 3 and text.count("\n") == 1 and text.endswith("\n")
    first, second, last = text.split("\r")[1:]
    assert first.strip() == "[perplexity 11.5000 +/- 0.2500 after window 1/3 (100 tokens); 2 s, ETA 4 s]"
    assert "ETA" in second and last.strip().endswith("done]") and "9.5000 +/- 0.2500" in last


def test_progress_elsewhere_is_a_plain_line_now_and_then():
    from lfm2np.cli.evaluate import PerplexityProgress

    now = [0.0]
    stream = _Stream(terminal=False)
    report = PerplexityProgress(stream, every=10.0, clock=lambda: now[0])
    for k in range(1, 21):  # 20 windows of 3 s: a line every 10 s or so, none at the end
        now[0] = 3.0 * k
        report(k, 20, {"perplexity": 8.0, "perplexity_stderr": 0.5, "tokens": 50 * k})
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and 4 <= len(lines) <= 6
    assert lines[0] == "[perplexity 8.0000 +/- 0.5000 after window 4/20 (200 tokens); 12 s, ETA 48 s]"


def test_a_long_file_gives_far_fewer_progress_lines_than_windows(tmp_path, capsys):
    from lfm2np.cli import main

    f = tmp_path / "long.txt"
    f.write_text('The "for" statement is used to iterate over the elements of a sequence.\n' * 15, encoding="utf-8")
    assert main(["perplexity", "embedded", str(f), "-c", "16", "--stride", "8", "--json"]) == 0
    out = capsys.readouterr()  # stderr is not a terminal here
    assert json.loads(out.out)["windows"] > 25
    assert sum("perplexity" in line for line in out.err.splitlines()) <= 2


def test_a_crlf_file_scores_as_its_text(model, tmp_path, capsys):
    from lfm2np.cli import main
    from lfm2np.evaluate import read_text

    text = 'The "for" statement is used to iterate.\nThe "while" statement repeats.\n'
    unix, windows_, mac = tmp_path / "lf.txt", tmp_path / "crlf.txt", tmp_path / "cr.txt"
    unix.write_bytes(text.encode())
    windows_.write_bytes(text.replace("\n", "\r\n").encode())
    mac.write_bytes(text.replace("\n", "\r").encode())
    assert read_text(windows_) == read_text(mac) == read_text(unix) == text
    results = []
    for f in (unix, windows_, mac):
        assert main(["perplexity", "embedded", str(f), "--json", "--quiet"]) == 0
        results.append({k: v for k, v in json.loads(capsys.readouterr().out).items() if k != "file"})
    assert results[0] == results[1] == results[2]
    tok = Tokenizer.from_dir(PATH)
    assert results[0]["input_tokens"] == len(tok.encode(text, add_bos=True))
