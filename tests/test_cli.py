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
