"""Checkpoint loading: layouts, dtypes, validation, and every error a user can meet."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import lfm2np
from lfm2np.io.files import CheckedFile
from lfm2np.numerics import to_bf16
from lfm2np.synthetic import random_params
from lfm2np.io.safetensors import (Checkpoint, SafetensorsFile, bfloat16_bits, expected_tensors, save_checkpoint,
                                   widen, write_safetensors)

from conftest import GOLDEN, MANIFEST, golden


@pytest.fixture
def tiny(tmp_path):
    """A tiny MoE checkpoint written by lfm2np itself, and its in-memory weights."""
    config = lfm2np.load_config("tiny-moe")
    params = random_params(config, seed=3)
    return save_checkpoint(tmp_path / "ckpt", config, params), config, params


# -------------------------------------------------------------------- layouts and dtypes
def test_fixture_dtypes_are_what_the_manifest_says(case):
    counts = Checkpoint(GOLDEN / case).stored_dtypes()
    stored = MANIFEST["cases"][case]["checkpoint_dtype"]
    code = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[stored]
    cfg = lfm2np.load_config(GOLDEN / case)
    n_bias = len(cfg.moe_layers) if cfg.use_expert_bias else 0
    if code == "F32":
        assert counts == {"F32": len(expected_tensors(cfg))}
    else:  # reduced precision weights beside a float32 expert bias, as released
        assert counts == {code: len(expected_tensors(cfg)) - n_bias, **({"F32": n_bias} if n_bias else {})}


def test_sharded_fixture_reads_like_a_single_file(tmp_path):
    """Re-save a sharded fixture as one file: the model's logits are identical."""
    case = next(c for c in MANIFEST["cases"] if MANIFEST["cases"][c]["shards"] > 1)
    assert (GOLDEN / case / "model.safetensors.index.json").is_file()
    m = lfm2np.load(GOLDEN / case)
    single = save_checkpoint(tmp_path / "single", m.config, {n: m.params[n] for n in m.params})
    ids = golden(case)["logits.T5.ids"]
    np.testing.assert_array_equal(lfm2np.load(single).forward(ids), m.forward(ids))


def test_bf16_widening_is_exact_and_rounding_matches_torch():
    ref = load_file(str(GOLDEN / "bf16_rounding.safetensors"))
    x = ref["float32"]
    ours = bfloat16_bits(x)
    np.testing.assert_array_equal(ours.astype(np.int64), ref["bfloat16_bits"].astype(np.uint16).astype(np.int64))
    # widening puts the 16 bits on top of 16 zero bits: exact, and idempotent with rounding
    wide = widen(ours, "BF16", np.float32)
    np.testing.assert_array_equal(bfloat16_bits(wide), ours)
    assert (wide.view(np.uint32) & 0xFFFF == 0).all()


def test_float32_tensors_are_read_into_fresh_read_only_arrays(tiny):
    path, config, params = tiny
    m = lfm2np.load(path)
    w = m.params["model.layers.0.feed_forward.w1.weight"]
    assert w.flags.owndata and not w.flags.writeable  # read from the file (no memory map), not changeable
    np.testing.assert_array_equal(w, params["model.layers.0.feed_forward.w1.weight"])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_reduced_precision_checkpoints_load_and_keep_the_float32_bias(tmp_path, dtype):
    config = lfm2np.load_config("tiny-moe")
    params = random_params(config, seed=4)
    path = save_checkpoint(tmp_path / dtype, config, params, dtype=dtype)
    ckpt = Checkpoint(path)
    assert ckpt.tensors["model.layers.1.feed_forward.expert_bias"].dtype == "F32"
    assert ckpt.tensors["model.layers.1.feed_forward.gate.weight"].dtype == {"float16": "F16",
                                                                           "bfloat16": "BF16"}[dtype]
    m = lfm2np.load(path)
    bias = m.params["model.layers.1.feed_forward.expert_bias"]
    np.testing.assert_array_equal(bias, params["model.layers.1.feed_forward.expert_bias"])
    w = m.params["model.embed_tokens.weight"]
    assert w.dtype == np.float32
    np.testing.assert_allclose(w, params["model.embed_tokens.weight"], rtol=2 ** -7 if dtype == "bfloat16" else 1e-3)


def test_a_zero_memory_budget_gives_identical_logits(tiny):
    path, _, _ = tiny
    ids = np.array([5, 9, 1, 0, 44])
    a = lfm2np.load(path, memory_budget="all")
    b = lfm2np.load(path, memory_budget=0)
    np.testing.assert_array_equal(a.forward(ids), b.forward(ids))
    assert b.memory_report()["resident_bytes"] == 0 and a.memory_report()["resident_bytes"] > 0


def test_loaded_weights_equal_in_memory_model(tiny):
    path, config, params = tiny
    ids = np.array([3, 1, 4, 1, 5, 9, 2, 6])
    np.testing.assert_array_equal(lfm2np.load(path).forward(ids), lfm2np.Model(config, params).forward(ids))


# ------------------------------------------------------------------------------ errors
def test_missing_tensor(tiny, tmp_path):
    path, config, params = tiny
    del params["model.layers.2.self_attn.k_layernorm.weight"]
    write_safetensors(path / "model.safetensors", params)
    with pytest.raises(lfm2np.Lfm2npError, match=r"missing tensor model\.layers\.2\.self_attn\.k_layernorm"):
        lfm2np.load(path)


def test_wrong_shape(tiny):
    path, config, params = tiny
    params["model.layers.0.conv.in_proj.weight"] = params["model.layers.0.conv.in_proj.weight"][:-1]
    write_safetensors(path / "model.safetensors", params)
    with pytest.raises(lfm2np.Lfm2npError, match=r"in_proj.weight' has shape \[143, 48\]; the config expects "
                                                 r"\[144, 48\]"):
        lfm2np.load(path)


def test_unexpected_tensor_is_an_error_or_a_warning(tiny):
    path, config, params = tiny
    params["lm_head.weight"] = params["model.embed_tokens.weight"].copy()  # tied config: not used
    write_safetensors(path / "model.safetensors", params)
    with pytest.raises(lfm2np.Lfm2npError, match="lm_head.weight is not used.*strict=False"):
        lfm2np.load(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = lfm2np.load(path, strict=False)
    assert any("lm_head.weight is not used" in str(w.message) for w in caught)
    assert m.forward([1, 2]).shape == (2, config.vocab_size)


def test_truncated_file_names_the_file(tiny):
    path, _, _ = tiny
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(lfm2np.Lfm2npError, match=f"{f}.*truncated"):
        lfm2np.load(path)
    f.write_bytes(data[:20])
    with pytest.raises(lfm2np.Lfm2npError, match=f"{f}.*(truncated|header)"):
        lfm2np.load(path)
    f.write_bytes(data[:5])
    with pytest.raises(lfm2np.Lfm2npError, match=f"{f}.*too short"):
        lfm2np.load(path)


def test_corrupt_header_names_the_file(tiny):
    path, _, _ = tiny
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:12] = b"\xff\xfe{["
    f.write_bytes(bytes(data))
    with pytest.raises(lfm2np.Lfm2npError, match=f"{f}: corrupt safetensors header"):
        lfm2np.load(path)


def test_unsupported_dtype_names_the_tensor(tmp_path):
    f = tmp_path / "model.safetensors"
    header = json.dumps({"w": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}).encode()
    f.write_bytes(len(header).to_bytes(8, "little") + header + b"\0\0")
    (tmp_path / "config.json").write_text(json.dumps(lfm2np.load_config("tiny-dense").to_dict()))
    with pytest.raises(lfm2np.Lfm2npError, match="tensor 'w' has dtype 'F8_E4M3'"):
        lfm2np.load(tmp_path)


def test_pickled_checkpoints_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(lfm2np.load_config("tiny-dense").to_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")  # a pickle: never opened
    with pytest.raises(lfm2np.Lfm2npError, match="pytorch_model.bin: pickled checkpoints are never loaded"):
        lfm2np.load(tmp_path)


def test_index_pointing_at_a_missing_shard(tmp_path):
    case = next(c for c in MANIFEST["cases"] if MANIFEST["cases"][c]["shards"] > 1)
    copy = shutil.copytree(GOLDEN / case, tmp_path / case)
    shard = sorted(copy.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(lfm2np.Lfm2npError, match=f"lists shard '{shard.name}'"):
        lfm2np.load(copy)


def test_not_a_directory(tmp_path):
    with pytest.raises(lfm2np.Lfm2npError, match="not a checkpoint directory"):
        lfm2np.load(tmp_path / "nowhere")


def test_bad_dtype_argument(tiny):
    with pytest.raises(lfm2np.Lfm2npError, match="dtype 'float16' is not supported"):
        lfm2np.load(tiny[0], dtype="float16")
    with pytest.raises(lfm2np.Lfm2npError, match="dtype 'int8' is not supported"):
        lfm2np.load(tiny[0], dtype="int8")


@pytest.mark.parametrize("ids, message", [
    ([1, 97], r"token id 97 at index 1 is outside the vocabulary of size 97"),
    ([-1], r"token id -1 at index 0 is outside the vocabulary of size 97"),
    ([[1, 2], [3, 1000]], r"token id 1000 at index \(1, 1\) is outside the vocabulary of size 97"),
    ([1.5, 2.0], "token ids must be integers"),
    ([True, False], "token ids must be integers"),
    ([], "shape"),
    ([[[1]]], "shape"),
])
def test_bad_token_ids(tiny, ids, message):
    m = lfm2np.load(tiny[0])
    with pytest.raises(lfm2np.Lfm2npError, match=message):
        m.forward(ids)


def test_save_checkpoint_checks_its_input(tmp_path):
    config = lfm2np.load_config("tiny-dense")
    params = random_params(config)
    del params["model.embedding_norm.weight"]
    with pytest.raises(lfm2np.Lfm2npError, match="embedding_norm.weight' is missing"):
        save_checkpoint(tmp_path, config, params)


def write_raw(path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)


@pytest.mark.parametrize("entry, message", [
    ({"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]}, "data_offsets is"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8.0]}, "data_offsets is"),
    ({"dtype": "F32", "shape": "12", "data_offsets": [0, 8]}, "shape is"),
    ({"dtype": "F32", "shape": [-2, -1], "data_offsets": [0, 8]}, "shape is"),
    ({"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}, "shape is"),
    ({"dtype": "F32", "shape": [2**32, 2**32], "data_offsets": [0, 0]}, "does not fit shape"),
    ({"dtype": 7, "shape": [2], "data_offsets": [0, 8]}, "dtype is"),
    ("not an object", "the entry is"),
])
def test_corrupt_header_entries_are_named(tmp_path, entry, message):
    f = tmp_path / "model.safetensors"
    write_raw(f, {"w": entry}, bytes(8))
    with pytest.raises(lfm2np.Lfm2npError, match=f"{f}.*'w'.*{message}"):
        Checkpoint(tmp_path)


def test_overlapping_or_gapped_tensors_are_refused(tmp_path):
    f = tmp_path / "model.safetensors"
    write_raw(f, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                  "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12))
    with pytest.raises(lfm2np.Lfm2npError, match="overlaps"):
        Checkpoint(tmp_path)
    write_raw(f, {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                  "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}, bytes(12))
    with pytest.raises(lfm2np.Lfm2npError, match="gap at byte 4"):
        Checkpoint(tmp_path)


def reads(monkeypatch) -> list[tuple[int, int]]:
    """Record every positioned read of a safetensors file as (offset, bytes)."""
    calls: list[tuple[int, int]] = []
    real = CheckedFile.read_into
    monkeypatch.setattr(CheckedFile, "read_into",
                        lambda self, view, offset, what: (calls.append((offset, len(view))), real(self, view, offset, what))[1])
    return calls


def test_embedding_lookup_without_kept_weights_reads_only_the_rows(tmp_path, monkeypatch):
    """With memory_budget=0 an embedding lookup reads and converts the looked-up rows, not the whole table."""
    config = lfm2np.load_config("tiny-moe")
    params = random_params(config, seed=9)
    path = save_checkpoint(tmp_path / "bf", config, params, dtype="bfloat16")
    lean = lfm2np.load(path, memory_budget=0)
    calls = reads(monkeypatch)
    h = lean.embed_tokens(np.array([3, 5, 3]))
    assert [n for _, n in calls] == [2 * config.hidden_size] * 2  # rows 3 and 5, bf16, once each
    np.testing.assert_array_equal(h, lfm2np.load(path, memory_budget="all").embed_tokens(np.array([3, 5, 3])))


def test_row_reads_coalesce_consecutive_rows(tiny, monkeypatch):
    path, config, params = tiny
    ckpt = Checkpoint(path)
    info = ckpt.tensors["model.embed_tokens.weight"]
    row = config.hidden_size * 4
    calls = reads(monkeypatch)
    index = np.array([[9, 4, 5], [6, 4, -1]])
    got = ckpt.read("model.embed_tokens.weight", np.float32, rows=index)
    start = ckpt.files["model.safetensors"].data_start + info.begin
    assert calls == [(start + 4 * row, 3 * row), (start + 9 * row, row), (start + 96 * row, row)]
    np.testing.assert_array_equal(got, params["model.embed_tokens.weight"][index])
    assert got.shape == (2, 3, config.hidden_size) and not got.flags.writeable


@pytest.mark.parametrize("stored", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("compute", [np.float32, np.float64])
def test_reading_converts_exactly_in_chunks(tmp_path, monkeypatch, stored, compute):
    """Conversions go through a small buffer: the values equal a whole-tensor conversion, bit for bit."""
    import lfm2np.io.safetensors_file as F

    monkeypatch.setattr(F, "_CHUNK", 64)  # many chunks, one ending inside a row
    config = lfm2np.load_config("tiny-dense")
    params = random_params(config, seed=10)
    path = save_checkpoint(tmp_path / stored, config, params, dtype=stored)
    ckpt = Checkpoint(path)
    for name in ("model.layers.0.conv.in_proj.weight", "model.embedding_norm.weight"):
        want = {"float32": params[name], "float16": params[name].astype(np.float16),
                "bfloat16": to_bf16(params[name])}[stored].astype(compute)
        got = ckpt.read(name, compute)
        assert got.dtype == compute and got.tobytes() == want.tobytes(), name
        np.testing.assert_array_equal(ckpt.read(name, compute, rows=np.array([1, 0, 1])), want[[1, 0, 1]])


def test_bad_read_requests(tiny):
    ckpt = Checkpoint(tiny[0])
    with pytest.raises(lfm2np.Lfm2npError, match="no tensor named 'nope'"):
        ckpt.read("nope", np.float32)
    with pytest.raises(lfm2np.Lfm2npError, match="row 97 is out of range for its first axis of length 97"):
        ckpt.read("model.embed_tokens.weight", np.float32, rows=np.array([1, 97]))
    with pytest.raises(lfm2np.Lfm2npError, match="row indices must be integers, got float64"):
        ckpt.read("model.embed_tokens.weight", np.float32, rows=np.array([1.5]))
    assert ckpt.read("model.embed_tokens.weight", np.float32, rows=np.array([], np.int64)).shape == (0, 48)


TRUNCATE_AFTER_LOAD = textwrap.dedent("""
    import os, sys
    import lfm2np
    path, keep = sys.argv[1], sys.argv[2] == "keep"
    model = lfm2np.load(path, memory_budget="all" if keep else 0)
    os.truncate(os.path.join(path, "model.safetensors"), 1000)  # the checkpoint shrinks under the model
    try:
        model.forward([1, 2, 3])
    except lfm2np.Lfm2npError as e:
        print("refused:", e)
""")


@pytest.mark.parametrize("keep", ["keep", "lean"])
def test_a_checkpoint_truncated_after_loading_is_an_error_not_sigbus(tmp_path, keep):
    """The scenario of issue 11: with memory-mapped weights this process died of SIGBUS (status -7)."""
    config = lfm2np.load_config("tiny-moe")
    path = save_checkpoint(tmp_path / "ckpt", config, random_params(config, seed=5), dtype="bfloat16")
    proc = subprocess.run([sys.executable, "-c", TRUNCATE_AFTER_LOAD, str(path), keep], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(Path(lfm2np.__file__).parents[1])))
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert proc.stdout.startswith(f"refused: {path / 'model.safetensors'}: tensor 'model.embed_tokens.weight': "
                                  f"the file changed since it was loaded (its size went from"), proc.stdout
