"""``lfm2np embed``: the JSON and text outputs are the model's embeddings, in the inputs' order; bad input is one line."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import lfm2np
from lfm2np.cli import main
from lfm2np.io.tokenizer import Tokenizer

from conftest import GOLDEN, subprocess_env

TEXTS = ["query: what is the capital of France?", "document: Paris is the capital of France."]


def run_json(capsys, argv: list[str]) -> dict:
    assert main(argv + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("path", ["bidir-cls", "bidir-colbert/model-f32.gguf"])
def test_json_holds_one_normalised_embedding_per_input_in_order(capsys, path):
    model_arg = str(GOLDEN / path)
    out = run_json(capsys, ["embed", model_arg, "--text", TEXTS[0], "--ids", "1", "5", "9", "--text", TEXTS[1],
                            "--per-token"])
    tok = Tokenizer.load(model_arg)
    seqs = [tok.encode(TEXTS[0], add_bos=True), [1, 5, 9], tok.encode(TEXTS[1], add_bos=True)]
    assert [i["ids"] for i in out["inputs"]] == seqs and out["inputs"][0]["text"] == TEXTS[0]
    model = lfm2np.load(model_arg)
    want = [model.embed(s) for s in seqs]
    assert np.array(out["embeddings"]).shape == (3, model.config.embedding_size)
    for got, ref in zip(out["embeddings"], want):
        assert np.abs(np.array(got) - ref).max() < 1e-6
    np.testing.assert_allclose(np.array(out["similarities"]), np.array(want, np.float64) @ np.array(want).T,
                               atol=1e-6)
    assert out["pooling"] == (model.config.pooling or "mean")
    for got, s in zip(out["token_embeddings"], seqs):
        assert np.abs(np.array(got) - model.embed(s, per_token=True)).max() < 1e-6


def test_the_text_output_shows_the_similarities(capsys):
    assert main(["embed", str(GOLDEN / "bidir-cls"), "--text", TEXTS[0], "--text", TEXTS[1], "--pooling", "mean"]) == 0
    out = capsys.readouterr().out
    m = lfm2np.load(GOLDEN / "bidir-cls")
    tok = Tokenizer.load(GOLDEN / "bidir-cls")
    a, b = (m.embed(tok.encode(t, add_bos=True), pooling="mean") for t in TEXTS)
    assert "bidirectional; pooling mean (--pooling)" in out and "cosine similarities:" in out
    assert f"{float(a @ b):9.4f}" in out.splitlines()[-1]


@pytest.mark.parametrize("argv, message", [
    (["embed", str(GOLDEN / "bidir-cls")], "give at least one input"),
    (["embed", str(GOLDEN / "bidir-cls"), "--ids", "1", "999"], "token id 999 at index 1 is outside"),
    (["embed", str(GOLDEN / "bidir-cls"), "--ids", "x"], "is not an integer"),
    (["embed", str(GOLDEN / "bidir-cls"), "--ids", "1", "--pooling", "max"], "invalid choice"),
    (["embed", str(GOLDEN / "dense-legacy"), "--text", "hi"], "no tokenizer.json"),
])
def test_bad_input_is_one_line(argv, message):
    proc = subprocess.run([sys.executable, "-m", "lfm2np", *argv], capture_output=True, text=True,
                          env=subprocess_env())
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("lfm2np: error:"), proc.stderr
    assert message in lines[0] and "Traceback" not in proc.stderr
