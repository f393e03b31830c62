"""The lfm2np command: the forward subcommand, --help, and one-line errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import lfm2np
from lfm2np.cli import build_parser, main

from conftest import GOLDEN


def test_forward_prints_the_argmax_of_each_position(capsys):
    case = GOLDEN / "moe-bf16-bias"
    assert main(["forward", str(case), "--ids", "1", "5", "9"]) == 0
    out = capsys.readouterr().out
    logits = lfm2np.load(case).forward([1, 5, 9])
    for t in range(3):
        assert f"position {t} (id {[1, 5, 9][t]}): next-token argmax {int(np.argmax(logits[t]))};" in out
    assert "shape (3, 97)" in out


def test_every_subcommand_has_help(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert sub.choices
    for name in sub.choices:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        assert "usage: lfm2np " + name in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["forward", "/nonexistent/ckpt"], "not a checkpoint directory"),
    (["forward", str(GOLDEN / "dense-legacy"), "--ids", "1", "5000"], "token id 5000 at index 1 is outside"),
])
def test_bad_input_is_one_line_on_stderr_and_exit_2(argv, message):
    proc = subprocess.run([sys.executable, "-m", "lfm2np", *argv], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lfm2np: error:") and message in lines[0]
    assert "Traceback" not in proc.stderr


def _forward_argmax(capsys, argv):
    assert main(argv) == 0
    return [line for line in capsys.readouterr().out.splitlines() if "next-token argmax" in line]


def test_rope_reading_option_reaches_the_model(capsys):
    # the trap checkpoint: a partial RoPE labelled "default"; the two readings give different logits
    case = GOLDEN / "lfm3-default-label"
    ids = [3, 17, 42, 5, 60, 11]
    for reading in ("trained", "transformers"):
        lines = _forward_argmax(capsys, ["forward", str(case), "--ids", *map(str, ids), "--rope-reading", reading,
                                         "--top", "1"])
        logits = lfm2np.load(case, rope_reading=reading).forward(ids)
        for t, line in enumerate(lines):
            assert f"next-token argmax {int(np.argmax(logits[t]))};" in line
    a = lfm2np.load(case, rope_reading="trained").forward(ids)
    b = lfm2np.load(case, rope_reading="transformers").forward(ids)
    assert not np.allclose(a, b)


@pytest.mark.parametrize("budget", ["0", "1KiB", "all"])
def test_memory_budget_option_gives_the_same_logits(capsys, budget):
    case = GOLDEN / "moe-allk-convbias"
    want = _forward_argmax(capsys, ["forward", str(case), "--ids", "1", "5", "9"])
    assert _forward_argmax(capsys, ["forward", str(case), "--ids", "1", "5", "9", "--memory-budget", budget]) == want


@pytest.mark.parametrize("budget", ["lots", "-1GB", "10 parsecs"])
def test_bad_memory_budget_is_a_usage_error(capsys, budget):
    assert main(["forward", str(GOLDEN / "dense-legacy"), f"--memory-budget={budget}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--memory-budget" in err[0] and f"'{budget}' is not a size" in err[0]


def test_layer_progress_is_silent_at_first_then_reports(capsys, monkeypatch):
    from lfm2np.cli import common
    clock = iter([0.0, 1.0, 2.0, 10.0, 11.0, 20.0])
    monkeypatch.setattr(common.time, "perf_counter", lambda: next(clock))
    report = common.LayerProgress("prefill", quiet_for=3.0, every=5.0)   # reads the clock once: t0 = 0
    report(1, 4)        # t=1: still quiet
    report(2, 4)        # t=2: still quiet
    report(3, 4)        # t=10: reports
    report(4, 4)        # t=11: the last layer reports even within `every`
    err = capsys.readouterr().err.splitlines()
    assert err == ["[prefill: layer 3/4, 10 s]", "[prefill: layer 4/4, 11 s]"]


def _embedded_copy(tmp_path, **config):
    import json
    import shutil

    from lfm2np.embedded import embedded_model_path

    copy = tmp_path / "copy"
    shutil.copytree(embedded_model_path(), copy)
    c = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**c, **config}))
    return copy


def test_generate_ends_at_a_full_context_and_says_so(tmp_path):
    copy = _embedded_copy(tmp_path, max_position_embeddings=40)
    proc = subprocess.run([sys.executable, "-m", "lfm2np", "generate", str(copy), "--prompt",
                           "What is the for statement? " * 3, "--max-new-tokens", "60"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "finish: context" in proc.stderr


def test_a_generation_config_eos_outside_the_vocabulary_is_named(tmp_path):
    import json

    copy = _embedded_copy(tmp_path)
    (copy / "generation_config.json").write_text(json.dumps({"eos_token_id": 99999}))
    proc = subprocess.run([sys.executable, "-m", "lfm2np", "generate", str(copy), "--prompt", "hi"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "lfm2np: error: generation_config.json: eos_token_id 99999 is outside the vocabulary of size 3072 "
        "(valid ids are 0..3071): it could never be generated")


@pytest.mark.parametrize("argv", [["forward", "embedded", "--ids", "1", "2"], ["params", "embedded", "--json"],
                                  ["diagnose", "embedded", "--catalogue"]])
def test_embedded_is_a_model_name_for_every_command(capsys, argv):
    from lfm2np.embedded import embedded_model_path

    import re

    def without_timings(text):  # forward prints its speed
        return re.sub(r"[0-9.]+ (s|tokens/s)\b", "", text)

    assert main(argv) == 0
    out = without_timings(capsys.readouterr().out)
    assert main([argv[0], str(embedded_model_path()), *argv[2:]]) == 0
    assert without_timings(capsys.readouterr().out) == out
