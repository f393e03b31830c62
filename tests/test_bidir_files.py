"""The files that declare a bidirectional model's head: sentence-transformers side files (modules.json, Pooling,
Dense) and GGUF keys (pooling_type, dense_2, embedding_length_out, attention.causal); each malformed one is one
Lfm2npError naming the file and the key; a checkpoint written by lfm2np reads back as itself."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

import lfm2np
from lfm2np.io.gguf_write import write_gguf
from lfm2np.io.safetensors import save_checkpoint
from lfm2np.synthetic import random_params

from conftest import GOLDEN


def copy(case: str, tmp_path):
    target = tmp_path / case
    shutil.copytree(GOLDEN / case, target, ignore=shutil.ignore_patterns("*.gguf", "golden.safetensors",
                                                                          "llama.safetensors"))
    return target


def replaced(path, make):
    """``path`` replaced by what ``make`` puts there (a FIFO, a directory): named, never read (a FIFO would wait)."""
    path.unlink()
    make(path)


@pytest.mark.parametrize("case, edit, problem", [
    ("bidir-cls", lambda d: replaced(d / "1_Pooling" / "config.json", os.mkfifo), "is a FIFO"),
    ("bidir-colbert", lambda d: replaced(d / "1_Dense" / "config.json", os.mkdir), "is a directory"),
    ("bidir-cls", lambda d: replaced(d / "modules.json", os.mkfifo), "modules.json: is a FIFO"),
    ("bidir-cls", lambda d: (d / "modules.json").write_text("{}"), "expected a list of modules"),
    ("bidir-cls", lambda d: (d / "modules.json").write_text('[{"type": 3}]'), "module 0 is"),
    ("bidir-cls", lambda d: (d / "modules.json").write_text(
        '[{"type": "sentence_transformers.models.Pooling", "path": "../x"}]'), "leaves the checkpoint directory"),
    ("bidir-cls", lambda d: (d / "1_Pooling" / "config.json").write_text(
        '{"pooling_mode_max_tokens": true}'), "pooling_mode_max_tokens is set"),
    ("bidir-cls", lambda d: (d / "1_Pooling" / "config.json").write_text("{}"), "no pooling mode is set"),
    ("bidir-cls", lambda d: (d / "1_Pooling" / "config.json").write_text(
        '{"pooling_mode_mean_tokens": true, "include_prompt": false}'), "include_prompt is false"),
    ("bidir-colbert", lambda d: (d / "1_Dense" / "config.json").write_text(
        '{"in_features": 32, "out_features": 16, "activation_function": "torch.nn.modules.activation.Tanh"}'),
     "activation_function"),
    ("bidir-colbert", lambda d: (d / "1_Dense" / "config.json").write_text('{"in_features": 32, "out_features": 0}'),
     "out_features is 0"),
    ("bidir-colbert", lambda d: (d / "1_Dense" / "model.safetensors").unlink(), "no model.safetensors"),
    ("bidir-colbert", lambda d: (d / "1_Dense" / "config.json").write_text(
        '{"in_features": 32, "out_features": 16, "use_residual": true}'), "use_residual is set"),
    ("bidir-colbert", lambda d: (d / "1_Dense" / "config.json").write_text(
        '{"in_features": 32, "out_features": 12, "bias": false}'), "'dense.weight' has shape \\[16, 32\\]"),
    ("bidir-cls", lambda d: (d / "config.json").write_text(json.dumps(
        {**json.loads((d / "config.json").read_text()), "conv_zero_padding": "no"})), "'conv_zero_padding'"),
])
def test_bad_side_files_are_one_error_naming_them(tmp_path, case, edit, problem):
    d = copy(case, tmp_path)
    edit(d)
    with pytest.raises(lfm2np.Lfm2npError, match=problem):
        lfm2np.load(d)


def test_without_modules_json_there_is_no_head():
    """The transformer alone: the Dense module's files are not part of the model then (nothing declares them)."""
    d = GOLDEN / "bidir-colbert"
    c = lfm2np.load_config(json.loads((d / "config.json").read_text()))  # config.json without the side files
    assert (c.pooling, c.dense_out, c.causal) == (None, 0, False)
    assert lfm2np.load_config(d).dense_out == 16


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_checkpoint_written_by_lfm2np_reads_back(tmp_path, dtype):
    c = lfm2np.load_config(GOLDEN / "bidir-last-bias")
    params = random_params(c, seed=3)
    save_checkpoint(tmp_path / "ck", c, params, dtype=dtype)
    assert (tmp_path / "ck" / "modules.json").is_file() and (tmp_path / "ck" / "2_Dense" / "model.safetensors").is_file()
    m = lfm2np.load(tmp_path / "ck", dtype=dtype)
    assert m.config == c
    np.testing.assert_array_equal(m.embed([1, 5, 9]), lfm2np.Model(c, params, dtype).embed([1, 5, 9]))


def gguf_of(tmp_path, config, metadata=None, name="m.gguf"):
    path = tmp_path / name
    write_gguf(path, config, random_params(config, seed=1), "F32", metadata=metadata)
    return path


@pytest.mark.parametrize("metadata, problem", [
    ({"lfm2.pooling_type": 4}, "pooling_type is 4"),
    ({"lfm2.embedding_length_out": 17}, "embedding_length_out is 17 but dense_2.weight projects to 16"),
    ({"lfm2.attention.causal": "no"}, "attention.causal is a string"),
])
def test_bad_gguf_head_keys_are_named(tmp_path, metadata, problem):
    c = lfm2np.load_config(GOLDEN / "bidir-colbert")
    with pytest.raises(lfm2np.Lfm2npError, match=problem):
        lfm2np.load(gguf_of(tmp_path, c, metadata))


def test_gguf_round_trip_and_what_is_refused(tmp_path):
    c = lfm2np.load_config(GOLDEN / "bidir-last-bias").replace(conv_zero_padding=False)
    g = lfm2np.load(gguf_of(tmp_path, c))
    assert g.config == c.replace(max_position_embeddings=g.config.max_position_embeddings)
    moe = lfm2np.load_config("tiny-moe")
    with pytest.raises(lfm2np.Lfm2npError, match="only lfm2 has a bidirectional variant"):
        lfm2np.load(gguf_of(tmp_path, moe, {"lfm2moe.attention.causal": False}, "moe.gguf"))
