"""The hostile-input corpus (issue 11): distinct bad inputs across every entry point, each refused with an
Lfm2npError (or, on the command line, one ``lfm2np: error:`` line on stderr and exit status 2) whose message
names the culprit: the file, and the tensor, field, key, argument or layer at fault.

Classes: safetensors files, safetensors index files, config.json files, GGUF files read through
``lfm2np.load`` and the CLI (the GGUF container itself has its own corpus in tests/test_gguf_file.py),
files that change under a loaded model, decoding states, sequence lengths, non-finite weights, traces for
compare, the arguments of load and generation, backend dumps for diagnose, and the command line. tests/test_fuzz.py mutates real files byte by byte on top of this.
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from safetensors.numpy import save_file

import lfm2np
from lfm2np import Lfm2npError
from lfm2np.cli import main
from lfm2np.embedded import embedded_model_path
from lfm2np.io.safetensors import Checkpoint, save_checkpoint, write_safetensors
from lfm2np.oracle.compare import compare
from lfm2np.oracle.trace import Trace, record
from lfm2np.state import ConvState, KVState
from lfm2np.synthetic import random_params

ROOT = Path(__file__).resolve().parent.parent
TINY_DENSE = lfm2np.load_config("tiny-dense")
TINY_MOE = lfm2np.load_config("tiny-moe")


def refused(action: Callable[[], Any], *needles: str) -> str:
    """Run ``action``: it must raise Lfm2npError, on one line, naming every one of ``needles``."""
    with pytest.raises(Lfm2npError) as err:
        action()
    message = str(err.value)
    assert "\n" not in message, message
    missing = [n for n in needles if n not in message]
    assert not missing, f"message does not name {missing}: {message}"
    return message


def refused_or_warned(action: Callable[[], Any], *needles: str) -> None:
    """Never silent: an Lfm2npError, or a warning, naming ``needles``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            action()
        except Lfm2npError as e:
            text = str(e)
        else:
            assert caught, "accepted without an error or a warning"
            text = " ".join(str(w.message) for w in caught)
    missing = [n for n in needles if n not in text]
    assert not missing, f"message does not name {missing}: {text}"


# ============================================================================ safetensors files
def st(header: "dict | str | bytes", data: bytes = b"", length: int | None = None) -> bytes:
    """A safetensors file: 8-byte header length (``length`` overrides it), the header, the data."""
    text = header if isinstance(header, bytes) else (header if isinstance(header, str) else json.dumps(header)).encode()
    return (len(text) if length is None else length).to_bytes(8, "little") + text + data


def entry(dtype: Any = "F32", shape: Any = (2,), offsets: Any = (0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape) if isinstance(shape, tuple) else shape,
            "data_offsets": list(offsets) if isinstance(offsets, tuple) else offsets}


W8 = bytes(8)
VALID_HEADER = json.dumps({"w": entry()})
SAFETENSORS: dict[str, tuple[bytes, tuple[str, ...]]] = {
    # the length prefix
    "empty file": (b"", ("0 bytes, too short",)),
    "seven bytes": (b"\x10" * 7, ("7 bytes, too short",)),
    "header length 2^64-1": (st(VALID_HEADER, W8, 2**64 - 1), ("header length 18446744073709551615", "limit")),
    "header length past the 100 MB limit": (st(VALID_HEADER, W8, 100_000_001), ("header length 100000001", "limit")),
    "header length past the file": (st(VALID_HEADER, W8, 4000), ("header length 4000 exceeds the file",)),
    "header length 0": (st(b"", W8), ("corrupt safetensors header",)),
    # the JSON
    "header not UTF-8": (st(b'{"w\xff": 1}', W8), ("not UTF-8", "byte 3")),
    "header UTF-16": (st(VALID_HEADER.encode("utf-16"), W8), ("not UTF-8",)),
    "header with a BOM": (st(b"\xef\xbb\xbf" + VALID_HEADER.encode(), W8), ("corrupt safetensors header", "BOM")),
    "header not JSON": (st(b"{not json}", W8), ("corrupt safetensors header",)),
    "header truncated JSON": (st(VALID_HEADER[:-3], W8), ("corrupt safetensors header",)),
    "header a JSON list": (st("[1, 2]", W8), ("a JSON list, expected an object",)),
    "header a JSON string": (st('"w"', W8), ("a JSON str, expected an object",)),
    "header a JSON number": (st("8", W8), ("a JSON int, expected an object",)),
    "header null": (st("null", W8), ("a JSON NoneType, expected an object",)),
    "duplicate tensor name": (st('{"w": %s, "w": %s}' % (json.dumps(entry()), json.dumps(entry())), W8),
                              ("key 'w' appears twice",)),
    "duplicate field in an entry": (st('{"w": {"dtype": "F32", "dtype": "F64", "shape": [2], '
                                       '"data_offsets": [0, 8]}}', W8), ("key 'dtype' appears twice",)),
    "deeply nested header": (st("[" * 200_000 + "]" * 200_000, W8), ("nested too deeply",)),
    "huge integer literal": (st('{"w": {"dtype": "F32", "shape": [%s], "data_offsets": [0, 8]}}' % ("9" * 5000), W8),
                             ("corrupt safetensors header", "digits")),
    "NaN offset": (st('{"w": {"dtype": "F32", "shape": [2], "data_offsets": [NaN, 8]}}', W8),
                   ("'w'", "data_offsets is [nan, 8]")),
    # __metadata__
    "__metadata__ a list": (st({"__metadata__": ["pt"], "w": entry()}, W8), ("__metadata__ is ['pt']",)),
    "__metadata__ with a number": (st({"__metadata__": {"format": 1}, "w": entry()}, W8), ("__metadata__ is",)),
    "__metadata__ null": (st({"__metadata__": None, "w": entry()}, W8), ("__metadata__ is None",)),
    "__metadata__ nested": (st({"__metadata__": {"a": {"b": "c"}}, "w": entry()}, W8), ("__metadata__ is",)),
    # entries
    "entry a string": (st({"w": "F32"}, W8), ("tensor 'w'", "the entry is 'F32'")),
    "entry a list": (st({"w": ["F32", [2], [0, 8]]}, W8), ("tensor 'w'", "the entry is")),
    "dtype missing": (st({"w": {"shape": [2], "data_offsets": [0, 8]}}, W8), ("tensor 'w'", "dtype is None")),
    "dtype a number": (st({"w": entry(dtype=7)}, W8), ("tensor 'w'", "dtype is 7")),
    "dtype a list": (st({"w": entry(dtype=["F32"])}, W8), ("tensor 'w'", "dtype is ['F32']")),
    "dtype F8_E4M3": (st({"w": entry(dtype="F8_E4M3", offsets=(0, 2))}, W8[:2]), ("tensor 'w'", "'F8_E4M3'")),
    "dtype lower case": (st({"w": entry(dtype="f32")}, W8), ("tensor 'w'", "'f32'")),
    "dtype I64 for a weight": (st({"w": entry(dtype="I64", shape=(1,))}, W8), ("tensor 'w'", "'I64'")),
    "dtype BOOL for a weight": (st({"w": entry(dtype="BOOL", shape=(8,))}, W8), ("tensor 'w'", "'BOOL'")),
    "shape missing": (st({"w": {"dtype": "F32", "data_offsets": [0, 8]}}, W8), ("tensor 'w'", "shape is None")),
    "shape a string": (st({"w": entry(shape="2")}, W8), ("tensor 'w'", "shape is '2'")),
    "shape negative": (st({"w": entry(shape=(-2,))}, W8), ("tensor 'w'", "shape is [-2]")),
    "shape float": (st({"w": entry(shape=(2.0,))}, W8), ("tensor 'w'", "shape is [2.0]")),
    "shape bool": (st({"w": entry(shape=(True, 2))}, W8), ("tensor 'w'", "shape is [True, 2]")),
    "shape 33 dimensions": (st({"w": entry(shape=(1,) * 31 + (2, 1))}, W8), ("tensor 'w'", "shape is")),
    "shape overflowing int64": (st({"w": entry(shape=(2**40, 2**40, 2**40))}, W8), ("tensor 'w'", "does not fit shape")),
    "shape with a huge dim, tiny range": (st({"w": entry(shape=(2**62,))}, W8), ("tensor 'w'", "does not fit shape")),
    "zero-size shape no array can have": (st({"w": entry(shape=(0, 2**62), offsets=(0, 0))}),
                                          ("tensor 'w'", "shape [0, 4611686018427387904]", "beyond what an array can hold")),
    "zero-size bf16 shape too wide once widened": (st({"w": entry("BF16", shape=(2**61, 0), offsets=(0, 0))}),
                                                   ("tensor 'w'", "beyond what an array can hold")),
    "offsets missing": (st({"w": {"dtype": "F32", "shape": [2]}}, W8), ("tensor 'w'", "data_offsets is None")),
    "offsets three numbers": (st({"w": entry(offsets=(0, 4, 8))}, W8), ("tensor 'w'", "data_offsets is [0, 4, 8]")),
    "offsets strings": (st({"w": entry(offsets=("0", "8"))}, W8), ("tensor 'w'", "data_offsets is ['0', '8']")),
    "offsets floats": (st({"w": entry(offsets=(0.0, 8.0))}, W8), ("tensor 'w'", "data_offsets is [0.0, 8.0]")),
    "offsets reversed": (st({"w": entry(offsets=(8, 0))}, W8), ("tensor 'w'", "byte range 8..0")),
    "offsets negative": (st({"w": entry(offsets=(-8, 0))}, W8), ("tensor 'w'", "byte range -8..0")),
    "range too short for the shape": (st({"w": entry(offsets=(0, 4))}, W8[:4]), ("tensor 'w'", "does not fit shape")),
    "range past the end": (st({"w": entry(shape=(4,), offsets=(0, 16))}, W8), ("tensor 'w'", "truncated")),
    "data missing": (st(VALID_HEADER), ("tensor 'w'", "truncated")),
    "overlapping tensors": (st({"a": entry(), "b": entry(offsets=(4, 12))}, bytes(12)), ("tensor 'b'", "overlaps")),
    "gap between tensors": (st({"a": entry(shape=(1,), offsets=(0, 4)), "b": entry(shape=(1,), offsets=(8, 12))},
                               bytes(12)), ("tensor 'b'", "gap at byte 4")),
    "gap at the start": (st({"a": entry(offsets=(8, 16))}, bytes(16)), ("tensor 'a'", "gap at byte 0")),
    "trailing bytes": (st(VALID_HEADER, W8 + b"junk"), ("4 bytes after the last tensor",)),
}


def test_safetensors_corpus_is_distinct():
    assert len({raw for raw, _ in SAFETENSORS.values()}) == len(SAFETENSORS) >= 50


@pytest.mark.parametrize("case", list(SAFETENSORS))
def test_hostile_safetensors_file(tmp_path, case):
    raw, needles = SAFETENSORS[case]
    f = tmp_path / "model.safetensors"
    f.write_bytes(raw)
    message = refused(lambda: Checkpoint(tmp_path), *needles)
    assert message.startswith(f"{f}: "), message


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory) -> Path:
    """A tiny dense float32 checkpoint."""
    return save_checkpoint(tmp_path_factory.mktemp("dense"), TINY_DENSE, random_params(TINY_DENSE, seed=1))


@pytest.fixture
def dense_copy(tmp_path, dense_dir) -> Path:
    for f in dense_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    return tmp_path


def rewrite(directory: Path, change: Callable[[dict], None]) -> Path:
    """Rewrite a checkpoint's tensors after ``change(tensors)``."""
    f = directory / "model.safetensors"
    ckpt = Checkpoint(directory)
    tensors = {n: np.array(ckpt.read(n, np.float32)) for n in ckpt.tensors}
    change(tensors)
    write_safetensors(f, tensors)
    return f


CHECKPOINT_CASES: dict[str, tuple[Callable[[dict], None], tuple[str, ...]]] = {
    "a tensor missing": (lambda t: t.pop("model.layers.3.ffn_norm.weight"),
                         ("missing tensor model.layers.3.ffn_norm.weight",)),
    "a tensor with another shape": (lambda t: t.update({"model.embedding_norm.weight": np.ones(47, np.float32)}),
                                    ("'model.embedding_norm.weight' has shape [47]", "expects [48]")),
    "a transposed tensor": (lambda t: t.update({"model.layers.0.conv.in_proj.weight":
                                               t["model.layers.0.conv.in_proj.weight"].T.copy()}),
                            ("'model.layers.0.conv.in_proj.weight' has shape [48, 144]",)),
    "an unexpected tensor": (lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"]}),
                             ("lm_head.weight is not used", "strict=False")),
    "a vocabulary one row short": (lambda t: t.update({"model.embed_tokens.weight": t["model.embed_tokens.weight"][:-1]}),
                                   ("'model.embed_tokens.weight' has shape [96, 48]",)),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_hostile_checkpoint_against_its_config(dense_copy, case):
    change, needles = CHECKPOINT_CASES[case]
    rewrite(dense_copy, change)
    refused(lambda: lfm2np.load(dense_copy), *needles)


def test_pickled_checkpoint_is_never_opened(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY_DENSE.to_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04cos\nsystem\n(S'echo pwned'\ntR.")
    refused(lambda: lfm2np.load(tmp_path), "pytorch_model.bin: pickled checkpoints are never loaded")


def test_checkpoint_file_that_is_a_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY_DENSE.to_dict()))
    (tmp_path / "model.safetensors").mkdir()
    refused(lambda: lfm2np.load(tmp_path), str(tmp_path / "model.safetensors"), "is a directory")  # not "no ..."


def test_file_corpus_under_limits(tmp_path):
    """The safetensors and config.json corpora again, in a subprocess under a 1 GiB address-space limit and a
    time limit (tests/test_fuzz.py's harness): no hang, no runaway allocation, no crash."""
    from test_fuzz import run_limited

    for i, (raw, _) in enumerate(SAFETENSORS.values()):
        (tmp_path / "st" / f"{i:03d}").mkdir(parents=True)
        (tmp_path / "st" / f"{i:03d}" / "config.json").write_text(json.dumps(TINY_DENSE.to_dict()))
        (tmp_path / "st" / f"{i:03d}" / "model.safetensors").write_bytes(raw)
    for i, (raw, _) in enumerate(CONFIG_JSON.values()):
        (tmp_path / "cfg" / f"{i:03d}").mkdir(parents=True)
        (tmp_path / "cfg" / f"{i:03d}" / "config.json").write_bytes(raw)
    assert set(run_limited("load", tmp_path / "st").values()) == {"refused"}
    outcomes = run_limited("config", tmp_path / "cfg")  # what each must say: test_hostile_config_json
    assert set(outcomes.values()) <= {"refused", "ok"}, outcomes


# ============================================================================== index files
def sharded(directory: Path) -> Path:
    """Two shards (x in a.safetensors, y in b.safetensors) and a valid index."""
    write_safetensors(directory / "a.safetensors", {"x": np.ones(2, np.float32)})
    write_safetensors(directory / "b.safetensors", {"y": np.ones(3, np.float32)})
    index = directory / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {"x": "a.safetensors", "y": "b.safetensors"}}))
    return index


def weight_map(**mapping: Any) -> str:
    return json.dumps({"weight_map": mapping})


INDEX: dict[str, tuple["str | bytes", tuple[str, ...]]] = {
    "empty": ("", ("corrupt safetensors index", "line 1 column 1")),
    "not JSON": ("{weight_map: }", ("corrupt safetensors index",)),
    "not UTF-8": (b'{"weight_map": {"x": "a\xff.safetensors"}}', ("not UTF-8",)),
    "deeply nested": ("[" * 100_000 + "]" * 100_000, ("nested too deeply",)),
    "a JSON list": ('["a.safetensors"]', ("a JSON list",)),
    "weight_map missing": ('{"metadata": {}}', ("weight_map None",)),
    "weight_map a list": ('{"weight_map": ["a.safetensors"]}', ("weight_map ['a.safetensors']",)),
    "weight_map a string": ('{"weight_map": "a.safetensors"}', ("weight_map 'a.safetensors'",)),
    "weight_map empty": ('{"weight_map": {}}', ("weight_map {}",)),
    "duplicate tensor in weight_map": ('{"weight_map": {"x": "a.safetensors", "x": "b.safetensors", '
                                       '"y": "b.safetensors"}}', ("key 'x' appears twice",)),
    "shard a number": (weight_map(x=1, y="b.safetensors"), ("weight_map['x'] is 1",)),
    "shard null": (weight_map(x=None, y="b.safetensors"), ("weight_map['x'] is None",)),
    "shard a list": (weight_map(x=["a.safetensors"], y="b.safetensors"), ("weight_map['x'] is ['a.safetensors']",)),
    "shard escaping with ..": (weight_map(x="../a.safetensors", y="b.safetensors"),
                               ("weight_map['x'] is '../a.safetensors'", "no directory part")),
    "shard an absolute path": (weight_map(x="/etc/a.safetensors", y="b.safetensors"),
                               ("weight_map['x'] is '/etc/a.safetensors'",)),
    "shard in a subdirectory": (weight_map(x="sub/a.safetensors", y="b.safetensors"),
                                ("weight_map['x'] is 'sub/a.safetensors'",)),
    "shard with a backslash": (weight_map(x="..\\a.safetensors", y="b.safetensors"), ("weight_map['x']",)),
    "shard ..": (weight_map(x="..", y="b.safetensors"), ("weight_map['x'] is '..'",)),
    "shard empty": (weight_map(x="", y="b.safetensors"), ("weight_map['x'] is ''",)),
    "shard with a NUL": (weight_map(x="a\u0000.safetensors", y="b.safetensors"), ("weight_map['x']",)),
    "shard a pickle": (weight_map(x="pytorch_model.bin", y="b.safetensors"), ("'pytorch_model.bin'",)),
    "shard missing": (weight_map(x="a.safetensors", y="c.safetensors"), ("lists shard 'c.safetensors'",)),
    "tensor mapped to the wrong shard": (weight_map(x="b.safetensors", y="b.safetensors"),
                                         ("maps 'x' to b.safetensors, which does not hold it",)),
    "a tensor no shard holds": (weight_map(x="a.safetensors", y="b.safetensors", z="b.safetensors"),
                                ("maps 'z' to b.safetensors, which does not hold it",)),
    "tensors swapped between shards": (weight_map(x="b.safetensors", y="a.safetensors"),
                                       ("maps 'x' to b.safetensors, which does not hold it",)),
}


def test_index_corpus_is_distinct():
    assert len({str(v) for v, _ in INDEX.values()}) == len(INDEX) >= 25


@pytest.mark.parametrize("case", list(INDEX))
def test_hostile_index_file(tmp_path, case):
    text, needles = INDEX[case]
    index = sharded(tmp_path)
    index.write_bytes(text if isinstance(text, bytes) else text.encode())
    refused(lambda: Checkpoint(tmp_path), str(tmp_path), *needles)


def test_index_shard_that_is_a_directory(tmp_path):
    index = sharded(tmp_path)
    (tmp_path / "b.safetensors").unlink()
    (tmp_path / "b.safetensors").mkdir()
    refused(lambda: Checkpoint(tmp_path), str(index), "lists shard 'b.safetensors', which is a directory")


def test_index_tensor_in_two_shards(tmp_path):
    index = sharded(tmp_path)
    write_safetensors(tmp_path / "b.safetensors", {"x": np.ones(2, np.float32), "y": np.ones(3, np.float32)})
    refused(lambda: Checkpoint(tmp_path), "b.safetensors: tensor 'x' also appears in", "a.safetensors")
    assert index.is_file()


def test_index_shard_holding_a_tensor_it_does_not_list(tmp_path):
    index = sharded(tmp_path)
    write_safetensors(tmp_path / "a.safetensors", {"x": np.ones(2, np.float32), "z": np.ones(1, np.float32)})
    refused(lambda: Checkpoint(tmp_path), "a.safetensors: holds tensor 'z', which", str(index), "does not list")


def test_index_shard_with_a_corrupt_header(tmp_path):
    sharded(tmp_path)
    (tmp_path / "b.safetensors").write_bytes(st("{oops", W8))
    refused(lambda: Checkpoint(tmp_path), f"{tmp_path / 'b.safetensors'}: corrupt safetensors header")


def test_index_larger_than_any_index(tmp_path):
    index = sharded(tmp_path)
    os.truncate(index, 100_000_001)  # sparse: refused by its size, never read
    refused(lambda: Checkpoint(tmp_path), str(index), "100000001 bytes")


# ============================================================================== config files
DENSE = TINY_DENSE.to_dict()
MOE = TINY_MOE.to_dict()
DROP = object()


def cfg(base: dict, **changes: Any) -> dict:
    d = dict(base)
    for key, value in changes.items():
        if value is DROP:
            d.pop(key, None)
        else:
            d[key] = value
    return d


NO_TYPES = cfg(DENSE, layer_types=DROP)
CONFIGS: dict[str, tuple[dict, tuple[str, ...]]] = {
    # required shape fields: type and range
    "vocab_size a string": (cfg(DENSE, vocab_size="97"), ("'vocab_size'",)),
    "vocab_size a float": (cfg(DENSE, vocab_size=97.0), ("'vocab_size'",)),
    "vocab_size a bool": (cfg(DENSE, vocab_size=True), ("'vocab_size'",)),
    "vocab_size 0": (cfg(DENSE, vocab_size=0), ("'vocab_size'",)),
    "vocab_size negative": (cfg(DENSE, vocab_size=-5), ("'vocab_size'",)),
    "vocab_size 10^12": (cfg(DENSE, vocab_size=10**12), ("'vocab_size'",)),
    "vocab_size missing": (cfg(DENSE, vocab_size=DROP), ("'vocab_size'", "missing")),
    "hidden_size 2^40": (cfg(DENSE, hidden_size=2**40), ("'hidden_size'",)),
    "hidden_size a list": (cfg(DENSE, hidden_size=[48]), ("'hidden_size'",)),
    "num_hidden_layers 10^9": (cfg(NO_TYPES, num_hidden_layers=10**9), ("'num_hidden_layers'",)),
    "num_hidden_layers a string": (cfg(DENSE, num_hidden_layers="4"), ("'num_hidden_layers'",)),
    "num_attention_heads negative": (cfg(DENSE, num_attention_heads=-6), ("'num_attention_heads'",)),
    "num_attention_heads not dividing": (cfg(DENSE, num_attention_heads=5), ("'num_attention_heads'",)),
    "num_key_value_heads 0": (cfg(DENSE, num_key_value_heads=0), ("'num_key_value_heads'",)),
    "num_key_value_heads not dividing": (cfg(DENSE, num_key_value_heads=4), ("'num_key_value_heads'",)),
    "intermediate_size 10^15": (cfg(DENSE, intermediate_size=10**15), ("'intermediate_size'",)),
    "intermediate_size a string": (cfg(DENSE, intermediate_size="80"), ("'intermediate_size'",)),
    "head_dim a string": (cfg(DENSE, head_dim="8"), ("'head_dim'",)),
    "head_dim odd": (cfg(DENSE, head_dim=7), ("head_dim",)),
    "conv_L_cache a string": (cfg(DENSE, conv_L_cache="3"), ("'conv_L_cache'",)),
    "conv_L_cache 10^9": (cfg(DENSE, conv_L_cache=10**9), ("'conv_L_cache'",)),
    "max_position_embeddings 0": (cfg(DENSE, max_position_embeddings=0), ("'max_position_embeddings'",)),
    "max_position_embeddings a float": (cfg(DENSE, max_position_embeddings=1e5), ("'max_position_embeddings'",)),
    "model_type missing": (cfg(DENSE, model_type=DROP), ("'model_type'", "missing")),
    "model_type unknown": (cfg(DENSE, model_type="llama"), ("'model_type'", "'llama'")),
    "model_type a list": (cfg(DENSE, model_type=["lfm2"]), ("'model_type'",)),
    # token ids
    "bos_token_id a string": (cfg(DENSE, bos_token_id="1"), ("'bos_token_id'",)),
    "pad_token_id a float": (cfg(DENSE, pad_token_id=0.5), ("'pad_token_id'",)),
    "eos_token_id a string": (cfg(DENSE, eos_token_id="7"), ("'eos_token_id'",)),
    "eos_token_id outside the vocabulary": (cfg(DENSE, eos_token_id=97), ("'eos_token_id'", "97")),
    "eos_token_id negative": (cfg(DENSE, eos_token_id=-1), ("'eos_token_id'",)),
    "eos_token_id a list with a string": (cfg(DENSE, eos_token_id=[7, "x"]), ("'eos_token_id'",)),
    "eos_token_id an empty list": (cfg(DENSE, eos_token_id=[]), ("'eos_token_id'",)),
    "eos_token_id an object": (cfg(DENSE, eos_token_id={"id": 7}), ("'eos_token_id'",)),
    # multipliers and other numbers
    "norm_eps a string": (cfg(DENSE, norm_eps="1e-5"), ("'norm_eps'",)),
    "norm_eps NaN": (cfg(DENSE, norm_eps=math.nan), ("'norm_eps'",)),
    "norm_eps 0": (cfg(DENSE, norm_eps=0), ("'norm_eps'",)),
    "rope_theta infinite": (cfg(DENSE, rope_theta=math.inf), ("'rope_theta'",)),
    "rope_theta a string": (cfg(DENSE, rope_theta="1e6"), ("'rope_theta'",)),
    "theta negative (legacy)": (cfg(DENSE, theta=-1.0), ("theta",)),
    "block_ffn_dim_multiplier a string": (cfg(DENSE, block_auto_adjust_ff_dim=True, block_ffn_dim_multiplier="1.5"),
                                          ("'block_ffn_dim_multiplier'",)),
    "block_ffn_dim_multiplier NaN": (cfg(DENSE, block_auto_adjust_ff_dim=True, block_ffn_dim_multiplier=math.nan),
                                     ("'block_ffn_dim_multiplier'",)),
    "block_ffn_dim_multiplier infinite": (cfg(DENSE, block_auto_adjust_ff_dim=True,
                                              block_ffn_dim_multiplier=math.inf), ("'block_ffn_dim_multiplier'",)),
    "block_multiple_of 0": (cfg(DENSE, block_auto_adjust_ff_dim=True, block_multiple_of=0), ("'block_multiple_of'",)),
    "block_auto_adjust_ff_dim a string": (cfg(DENSE, block_auto_adjust_ff_dim="yes"), ("'block_auto_adjust_ff_dim'",)),
    "routed_scaling_factor a string": (cfg(MOE, routed_scaling_factor="1"), ("'routed_scaling_factor'",)),
    "routed_scaling_factor NaN": (cfg(MOE, routed_scaling_factor=math.nan), ("'routed_scaling_factor'",)),
    "conv_bias a string": (cfg(DENSE, conv_bias="false"), ("'conv_bias'",)),
    "tie_word_embeddings a number": (cfg(DENSE, tie_word_embeddings=1), ("'tie_word_embeddings'",)),
    # layer kinds
    "full_attn_idxs floats": (cfg(NO_TYPES, full_attn_idxs=[1.0, 3.0]), ("'full_attn_idxs'",)),
    "full_attn_idxs bools": (cfg(NO_TYPES, full_attn_idxs=[True, False]), ("'full_attn_idxs'",)),
    "full_attn_idxs negative": (cfg(NO_TYPES, full_attn_idxs=[-1]), ("'full_attn_idxs'",)),
    "full_attn_idxs past the last layer": (cfg(NO_TYPES, full_attn_idxs=[4]), ("'full_attn_idxs'",)),
    "full_attn_idxs a layer twice": (cfg(NO_TYPES, full_attn_idxs=[1, 1]), ("'full_attn_idxs'",)),
    "full_attn_idxs a string": (cfg(NO_TYPES, full_attn_idxs="1,3"), ("'full_attn_idxs'",)),
    "full_attn_idxs nested lists": (cfg(NO_TYPES, full_attn_idxs=[[1]]), ("'full_attn_idxs'",)),
    "full_attn_idxs an object": (cfg(NO_TYPES, full_attn_idxs={"1": True}), ("'full_attn_idxs'",)),
    "layer_types too short": (cfg(DENSE, layer_types=["conv"]), ("'layer_types'",)),
    "layer_types unknown kind": (cfg(DENSE, layer_types=["conv", "sliding_attention", "conv", "conv"]),
                                 ("layer_types[1]", "'sliding_attention'")),
    "layer_types numbers": (cfg(DENSE, layer_types=[0, 1, 0, 1]), ("layer_types[0]",)),
    "layer_types nested lists": (cfg(DENSE, layer_types=[["conv"]] * 4), ("layer_types[0]",)),
    "layer_types a string": (cfg(DENSE, layer_types="conv"), ("'layer_types'",)),
    # rope_parameters shapes
    "rope_parameters a list": (cfg(DENSE, rope_parameters=[1e6]), ("'rope_parameters'",)),
    "rope_parameters a string": (cfg(DENSE, rope_parameters="default"), ("'rope_parameters'",)),
    "rope_parameters yarn": (cfg(DENSE, rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}),
                             ("rope_type", "'yarn'")),
    "rope_parameters rope_type a list": (cfg(DENSE, rope_parameters={"rope_type": ["default"]}), ("rope_type",)),
    "rope_parameters theta a string": (cfg(DENSE, rope_parameters={"rope_type": "default", "rope_theta": "1e6"}),
                                       ("rope_theta",)),
    "rope_parameters per layer type": (cfg(DENSE, rope_parameters={"full_attention": {"rope_type": "default",
                                                                                      "rope_theta": 1e4}}),
                                       ("rope_parameters",)),
    "rope_scaling linear": (cfg(DENSE, rope_scaling={"type": "linear", "factor": 2.0}), ("rope_scaling",)),
    # MoE
    "num_experts 10^9": (cfg(MOE, num_experts=10**9), ("'num_experts'",)),
    "num_experts_per_tok 0": (cfg(MOE, num_experts_per_tok=0), ("'num_experts_per_tok'",)),
    "num_experts_per_tok above num_experts": (cfg(MOE, num_experts_per_tok=7), ("'num_experts_per_tok'",)),
    "num_dense_layers negative": (cfg(MOE, num_dense_layers=-1), ("'num_dense_layers'",)),
    "num_dense_layers a float": (cfg(MOE, num_dense_layers=1.0), ("'num_dense_layers'",)),
    "num_dense_layers past the last layer": (cfg(MOE, num_dense_layers=5), ("'num_dense_layers'",)),
    "moe_intermediate_size a string": (cfg(MOE, moe_intermediate_size="24"), ("'moe_intermediate_size'",)),
    "use_expert_bias a number": (cfg(MOE, use_expert_bias=1), ("'use_expert_bias'",)),
    "norm_topk_prob a string": (cfg(MOE, norm_topk_prob="true"), ("'norm_topk_prob'",)),
}
#: Token ids outside the vocabulary in fields the model never feeds: refused, or at least warned about.
CONFIG_WARNED = {
    "bos_token_id outside the vocabulary": (cfg(DENSE, bos_token_id=1000), ("'bos_token_id'", "1000")),
    "bos_token_id negative": (cfg(DENSE, bos_token_id=-1), ("'bos_token_id'",)),
    "pad_token_id outside the vocabulary": (cfg(DENSE, pad_token_id=97), ("'pad_token_id'", "97")),
}


def test_config_corpus_is_distinct():
    texts = [json.dumps(d, sort_keys=True) for d, _ in [*CONFIGS.values(), *CONFIG_WARNED.values()]]
    assert len(set(texts)) == len(texts) >= 80


@pytest.mark.parametrize("case", list(CONFIGS))
def test_hostile_config(tmp_path, case):
    d, needles = CONFIGS[case]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(d))
    refused(lambda: lfm2np.load_config(path), str(path), *needles)


@pytest.mark.parametrize("case", list(CONFIG_WARNED))
def test_config_token_id_outside_the_vocabulary_is_never_silent(tmp_path, case):
    d, needles = CONFIG_WARNED[case]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(d))
    refused_or_warned(lambda: lfm2np.load_config(path), *needles)


_BASE_JSON = json.dumps(DENSE)
CONFIG_JSON: dict[str, tuple[bytes, tuple[str, ...]]] = {
    "empty file": (b"", ("JSON",)),
    "a UTF-8 BOM": (b"\xef\xbb\xbf" + _BASE_JSON.encode(), ("BOM",)),
    "UTF-16": (_BASE_JSON.encode("utf-16"), ("UTF-8",)),
    "Latin-1": (_BASE_JSON.replace('"lfm2"', '"lfm2\u00e9"').encode("latin-1"), ("UTF-8",)),
    "nested 100000 deep": (b"[" * 100_000 + b"]" * 100_000, ("JSON",)),
    "objects nested 50000 deep": (b'{"a":' * 50_000 + b"1" + b"}" * 50_000, ("JSON",)),
    "NaN literal": (_BASE_JSON.replace('"norm_eps": 1e-05', '"norm_eps": NaN').encode(), ("'norm_eps'",)),
    "Infinity literal": (_BASE_JSON.replace('"rope_theta": 1000000.0', '"rope_theta": Infinity').encode(),
                         ("'rope_theta'",)),
    "1e400": (_BASE_JSON.replace('"vocab_size": 97', '"vocab_size": 1e400').encode(), ("'vocab_size'",)),
    "a 5000-digit integer": (_BASE_JSON.replace('"vocab_size": 97', '"vocab_size": ' + "9" * 5000).encode(),
                             ("digits",)),
    "trailing garbage": (_BASE_JSON.encode() + b"}", ("JSON",)),
    "a NUL after the object": (_BASE_JSON.encode() + b"\0", ("JSON",)),
    "a JSON list": (b"[]", ("a list",)),
    "a JSON number": (b"3", ("a int",)),
    "a JSON string": (b'"lfm2"', ("a str",)),
    "a key given twice": (_BASE_JSON[:-1].encode() + b', "rope_theta": 10000.0}', ("rope_theta",)),
}


@pytest.mark.parametrize("case", list(CONFIG_JSON))
def test_hostile_config_json(tmp_path, case):
    raw, needles = CONFIG_JSON[case]
    path = tmp_path / "config.json"
    path.write_bytes(raw)
    refused(lambda: lfm2np.load_config(path), str(path), *needles)


def test_config_against_the_checkpoint(dense_copy):
    """A config whose sizes contradict the tensors names the first tensor that disagrees."""
    (dense_copy / "config.json").write_text(json.dumps(cfg(DENSE, vocab_size=200)))
    refused(lambda: lfm2np.load(dense_copy), "'model.embed_tokens.weight' has shape [97, 48]", "[200, 48]")
    (dense_copy / "config.json").write_text(json.dumps(cfg(DENSE, layer_types=["conv"] * 4)))
    refused(lambda: lfm2np.load(dense_copy), "missing tensor model.layers.1.conv")


# ================================================================================ GGUF files
A = "lfm2"
GGUF_METADATA: dict[str, tuple[dict, tuple[str, ...]]] = {
    "block_count a string": ({f"{A}.block_count": "4"}, ("lfm2.block_count",)),
    "block_count 0": ({f"{A}.block_count": 0}, ("lfm2.block_count",)),
    "block_count 2^31": ({f"{A}.block_count": 2**31}, ("lfm2.block_count",)),
    "block_count a float": ({f"{A}.block_count": 4.0}, ("lfm2.block_count",)),
    "block_count a bool": ({f"{A}.block_count": True}, ("lfm2.block_count",)),
    "block_count an array": ({f"{A}.block_count": [4]}, ("lfm2.block_count",)),
    "block_count below the tensors": ({f"{A}.block_count": 3}, ("lfm2.block_count",)),
    "head_count 0": ({f"{A}.attention.head_count": 0}, ("lfm2.attention.head_count",)),
    "head_count a string": ({f"{A}.attention.head_count": "6"}, ("lfm2.attention.head_count",)),
    "head_count_kv too short": ({f"{A}.attention.head_count_kv": [0, 2]}, ("lfm2.attention.head_count_kv",)),
    "head_count_kv strings": ({f"{A}.attention.head_count_kv": ["0", "2", "0", "2"]},
                              ("lfm2.attention.head_count_kv",)),
    "head_count_kv two values": ({f"{A}.attention.head_count_kv": [0, 2, 0, 3]}, ("lfm2.attention.head_count_kv",)),
    "head_count_kv layer kinds swapped": ({f"{A}.attention.head_count_kv": [2, 0, 2, 0]},
                                          ("lfm2.attention.head_count_kv",)),
    "embedding_length wrong": ({f"{A}.embedding_length": 64}, ("embedding_length",)),
    "embedding_length 2^31": ({f"{A}.embedding_length": 2**31}, ("embedding_length",)),
    "rms epsilon NaN": ({f"{A}.attention.layer_norm_rms_epsilon": math.nan}, ("layer_norm_rms_epsilon",)),
    "rms epsilon negative": ({f"{A}.attention.layer_norm_rms_epsilon": -1.0}, ("layer_norm_rms_epsilon",)),
    "rms epsilon a string": ({f"{A}.attention.layer_norm_rms_epsilon": "1e-5"}, ("layer_norm_rms_epsilon",)),
    "freq_base infinite": ({f"{A}.rope.freq_base": math.inf}, ("lfm2.rope.freq_base",)),
    "freq_base 0": ({f"{A}.rope.freq_base": 0.0}, ("lfm2.rope.freq_base",)),
    "l_cache 0": ({f"{A}.shortconv.l_cache": 0}, ("lfm2.shortconv.l_cache",)),
    "l_cache against the conv taps": ({f"{A}.shortconv.l_cache": 4}, ("lfm2.shortconv.l_cache",)),
    "context_length 0": ({f"{A}.context_length": 0}, ("lfm2.context_length",)),
    "context_length a string": ({f"{A}.context_length": "512"}, ("lfm2.context_length",)),
    "feed_forward_length an array of 2": ({f"{A}.feed_forward_length": [80, 80]}, ("lfm2.feed_forward_length",)),
    "rope scaling yarn": ({f"{A}.rope.scaling.type": "yarn"}, ("lfm2.rope.scaling.type",)),
    "sliding window": ({f"{A}.attention.sliding_window": 128}, ("lfm2.attention.sliding_window",)),
    "causal a string": ({f"{A}.attention.causal": "false"}, ("lfm2.attention.causal",)),
    "pooling type rank": ({f"{A}.pooling_type": 4}, ("lfm2.pooling_type",)),
    "split file": ({"split.count": 2}, ("split",)),
    "bos outside the vocabulary": ({"tokenizer.ggml.bos_token_id": 1000}, ("tokenizer.ggml.bos_token_id",)),
    "eos a string": ({"tokenizer.ggml.eos_token_id": "2"}, ("tokenizer.ggml.eos_token_id",)),
    "key_length against q_norm": ({f"{A}.attention.key_length": 6}, ("lfm2.attention.key_length",)),
}
GGUF_MOE_METADATA: dict[str, tuple[dict, tuple[str, ...]]] = {
    "expert_count 0": ({"lfm2moe.expert_count": 0}, ("lfm2moe.expert_count",)),
    "expert_count 2^30": ({"lfm2moe.expert_count": 2**30}, ("lfm2moe.expert_count",)),
    "expert_used_count above expert_count": ({"lfm2moe.expert_used_count": 7}, ("lfm2moe.expert_used_count",)),
    "softmax gating": ({"lfm2moe.expert_gating_func": 1}, ("lfm2moe.expert_gating_func",)),
    "leading dense blocks past the last": ({"lfm2moe.leading_dense_block_count": 99},
                                           ("lfm2moe.leading_dense_block_count",)),
    "expert weights scale NaN": ({"lfm2moe.expert_weights_scale": math.nan}, ("lfm2moe.expert_weights_scale",)),
}


def write_gguf(*args, **kwargs):
    pytest.importorskip("gguf")  # the optional dependency GGUF files need (installed for the tests)
    from lfm2np.io.gguf_write import write_gguf as write

    return write(*args, **kwargs)


@pytest.fixture(scope="module")
def gguf_params():
    return random_params(TINY_DENSE, seed=5), random_params(TINY_MOE, seed=6)


@pytest.mark.parametrize("case", [*GGUF_METADATA, *(f"moe: {c}" for c in GGUF_MOE_METADATA)])
def test_hostile_gguf_metadata(tmp_path, gguf_params, case):
    moe = case.startswith("moe: ")
    meta, needles = (GGUF_MOE_METADATA[case[5:]] if moe else GGUF_METADATA[case])
    path = tmp_path / "hostile.gguf"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gguf-py warns when an override replaces a key it wrote
        write_gguf(path, TINY_MOE if moe else TINY_DENSE, gguf_params[1 if moe else 0], metadata=meta)
    refused(lambda: lfm2np.load(path).forward([1, 2, 3]), str(path), *needles)


def _patched(data: bytes, old: bytes, new: bytes) -> bytes:
    assert data.count(old) == 1
    return data.replace(old, new)


def _gstr(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s


def gguf_raw_cases(valid: bytes) -> dict[str, tuple[bytes, tuple[str, ...]]]:
    arch = _gstr(b"general.architecture") + struct.pack("<I", 8) + _gstr(b"lfm2")
    return {
        "architecture gpt2": (_patched(valid, arch, arch[:-4] + b"gpt2"), ("general.architecture", "'gpt2'")),
        "architecture not UTF-8": (_patched(valid, arch, arch[:-4] + b"lf\xffm"), ("general.architecture",)),
        "cut in the tensor data": (valid[:-100], ("extends past the end of the file",)),
        "cut in the header": (valid[:300], ("kv_count 20 cannot fit",)),
        "a tensor renamed": (_patched(valid, _gstr(b"token_embd_norm.weight"), _gstr(b"token_embd_norx.weight")),
                             ("token_embd_norm.weight",)),
        "not GGUF at all": (b"PK\x03\x04" + valid[4:], ("not a GGUF file",)),
    }


@pytest.fixture(scope="module")
def valid_gguf(tmp_path_factory, gguf_params) -> bytes:
    path = tmp_path_factory.mktemp("gguf") / "valid.gguf"
    write_gguf(path, TINY_DENSE, gguf_params[0])
    assert lfm2np.load(path).forward([1, 2]).shape == (2, 97)
    return path.read_bytes()


@pytest.mark.parametrize("case", ["architecture gpt2", "architecture not UTF-8", "cut in the tensor data",
                                  "cut in the header", "a tensor renamed", "not GGUF at all"])
def test_hostile_gguf_file_through_load(tmp_path, valid_gguf, case):
    data, needles = gguf_raw_cases(valid_gguf)[case]
    path = tmp_path / "hostile.gguf"
    path.write_bytes(data)
    refused(lambda: lfm2np.load(path).forward([1, 2, 3]), str(path), *needles)


@pytest.mark.parametrize("case", ["architecture gpt2", "cut in the tensor data", "not GGUF at all"])
def test_hostile_gguf_file_through_the_cli(tmp_path, capsys, valid_gguf, case):
    data, needles = gguf_raw_cases(valid_gguf)[case]
    path = tmp_path / "hostile.gguf"
    path.write_bytes(data)
    cli_refuses(capsys, ["forward", str(path)], str(path), *needles)
    cli_refuses(capsys, ["memory", str(path)], str(path))


# =================================================================== files that change after loading
CHANGES: dict[str, tuple[Callable[[Path], None], tuple[str, ...]]] = {
    "truncated to half": (lambda f: os.truncate(f, f.stat().st_size // 2), ("changed since it was loaded",
                                                                            "its size went from")),
    "emptied": (lambda f: os.truncate(f, 0), ("changed since it was loaded", "to 0 bytes")),
    "grown": (lambda f: f.open("ab").write(b"\0" * 64), ("changed since it was loaded",)),
    "rewritten in place": (lambda f: (f.write_bytes(f.read_bytes()), os.utime(f, ns=(1, 1))),
                           ("changed since it was loaded", "modified")),
    "touched": (lambda f: os.utime(f, ns=(10**18, 10**18)), ("changed since it was loaded", "modified")),
    "header overwritten": (lambda f: (f.open("r+b").write(b"\xff" * 8), os.utime(f, ns=(5, 5))),
                           ("changed since it was loaded",)),
    "one byte changed, size and times restored": (lambda f: _rewrite_keeping_times(f), ("changed since it was loaded",)),
}


def _rewrite_keeping_times(f: Path) -> None:
    """Change one byte of the last tensor in place, then give the file back its size, access and modification
    times (what ``os.utime`` can restore; the status-change time it cannot)."""
    st = f.stat()
    with f.open("r+b") as out:
        out.seek(st.st_size - 3)
        byte = out.read(1)
        out.seek(st.st_size - 3)
        out.write(bytes([byte[0] ^ 0x40]))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (f.stat().st_size, f.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)


@pytest.mark.parametrize("keep", [False, True], ids=["lean", "kept"])
@pytest.mark.parametrize("case", list(CHANGES))
def test_checkpoint_changed_after_loading(dense_copy, case, keep):
    """Whatever happens to the file after load(), the next read is an Lfm2npError naming it (a memory map
    would have delivered SIGBUS for the truncations)."""
    change, needles = CHANGES[case]
    model = lfm2np.load(dense_copy, memory_budget="all" if keep else 0)
    change(dense_copy / "model.safetensors")
    refused(lambda: model.forward([1, 2, 3]), str(dense_copy / "model.safetensors"), *needles)


def test_embedding_rows_after_the_file_shrank(dense_copy):
    model = lfm2np.load(dense_copy, memory_budget=0)
    os.truncate(dense_copy / "model.safetensors", 4096)
    refused(lambda: model.embed_tokens(np.array([5])), "model.safetensors", "changed since it was loaded")


def test_shard_truncated_after_loading(tmp_path):
    path = save_checkpoint(tmp_path / "s", TINY_DENSE, random_params(TINY_DENSE, seed=2), shards=3)
    model = lfm2np.load(path, memory_budget=0)
    shard = sorted(path.glob("model-*.safetensors"))[1]
    os.truncate(shard, 100)
    refused(lambda: model.forward([1, 2]), str(shard), "changed since it was loaded")


@pytest.mark.parametrize("case", list(CHANGES))
def test_gguf_changed_after_loading(tmp_path, valid_gguf, case):
    """A GGUF file is read through the same checked reader: the same changes are refused the same way."""
    change, needles = CHANGES[case]
    path = tmp_path / "changes.gguf"
    path.write_bytes(valid_gguf)
    model = lfm2np.load(path, memory_budget=0)
    change(path)
    refused(lambda: model.forward([1, 2]), str(path), *needles)


def test_deleted_or_replaced_file_keeps_its_validated_data(dense_copy):
    """Not an error: the open file is still the one that was validated (unlinked or renamed over)."""
    f = dense_copy / "model.safetensors"
    want = lfm2np.load(dense_copy).forward([1, 2, 3])
    model = lfm2np.load(dense_copy, memory_budget=0)
    replacement = dense_copy / "other.safetensors"
    replacement.write_bytes(f.read_bytes()[:100])
    os.replace(replacement, f)
    np.testing.assert_array_equal(model.forward([1, 2, 3]), want)
    f.unlink()
    np.testing.assert_array_equal(model.forward([1, 2, 3]), want)


# ============================================================================= decoding states
@pytest.fixture(scope="module")
def dense_model():
    return lfm2np.synthetic.random_model(TINY_DENSE, seed=3)


def _state_of(config, **changes):
    return lfm2np.synthetic.random_model(config.replace(**changes), seed=4).step([1, 2, 3])[1]


def _with_layers(state, change):
    """``state`` with ``change`` applied to each layer's state (checked as a hand-built state is)."""
    return state.replace(layers=tuple(change(s) for s in state.layers))


STATES: dict[str, tuple[Callable[[Any], Any], tuple[str, ...]]] = {
    "a state of another conv kernel": (lambda m: m.step([1], _state_of(TINY_DENSE, conv_L_cache=4)),
                                       ("conv_L_cache",)),
    "a state of more layers": (lambda m: m.step([1], _state_of(TINY_DENSE, num_hidden_layers=5,
                                                               layer_types=TINY_DENSE.layer_types + ("conv",))),
                               ("5 layers",)),
    "a state of other layer kinds": (lambda m: m.step([1], _state_of(TINY_DENSE, layer_types=("conv",) * 4)),
                                     ("layer 1",)),
    "a state of another width": (lambda m: m.step([1], _state_of(TINY_DENSE, hidden_size=24, num_attention_heads=3,
                                                                 num_key_value_heads=1)), ("layer 0",)),
    "a state of another KV head count": (lambda m: m.step([1], _state_of(TINY_DENSE, num_key_value_heads=3)),
                                         ("layer 1",)),
    "a float64 state for a float32 model": (lambda m: m.step([1], lfm2np.synthetic.random_model(
        TINY_DENSE, seed=4, dtype="float64").step([1])[1]), ("float64",)),
    "a bf16-emulated state for a float32 model": (lambda m: m.step([1], lfm2np.synthetic.random_model(
        TINY_DENSE, seed=4, dtype="bfloat16").step([1])[1]), ("bfloat16 numerics", "float32")),
    "a state given a negative max_rollback": (lambda m: m.new_state().replace(max_rollback=-10),
                                              ("max_rollback is -10",)),
    "a state given max_rollback 2.5": (lambda m: m.new_state().replace(max_rollback=2.5),
                                       ("max_rollback is 2.5",)),
    "a state whose conv history was emptied": (lambda m: _with_layers(
        m.step([1, 2, 3])[1], lambda s: ConvState(s.history[:0]) if isinstance(s, ConvState) else s),
        ("conv history holds 0 rows at position 3",)),
    "a state whose values are missing": (lambda m: _with_layers(
        m.step([1, 2])[1], lambda s: KVState(s.keys, None) if isinstance(s, KVState) else s), ("layer 1",)),
    "a state with values shorter than the keys": (lambda m: _with_layers(
        m.step([1, 2])[1], lambda s: KVState(s.keys, s.values[:1]) if isinstance(s, KVState) else s),
        ("layer 1", "one shape")),
    "a state whose conv history is a number": (lambda m: _with_layers(
        m.new_state(), lambda s: ConvState(np.float32(0)) if isinstance(s, ConvState) else s), ("(n, D)",)),
    "a state with a list as a layer": (lambda m: _with_layers(m.new_state(), lambda s: [1, 2]),
                                       ("layer 0", "ConvState")),
    "a dict as the state": (lambda m: m.step([1], {"position": 0}), ("state must be an lfm2np State", "dict")),
    "a string as the state": (lambda m: m.step([1], "state"), ("state must be an lfm2np State", "str")),
    "rollback by 1.5": (lambda m: m.step([1, 2])[1].rollback(1.5), ("rollback", "1.5")),
    "rollback by True": (lambda m: m.step([1, 2])[1].rollback(True), ("rollback", "True")),
    "rollback by '1'": (lambda m: m.step([1, 2])[1].rollback("1"), ("rollback", "'1'")),
    "rollback by -1": (lambda m: m.step([1, 2])[1].rollback(-1), ("roll back -1",)),
    "rollback past the start": (lambda m: m.step([1, 2])[1].rollback(3), ("roll back 3", "position 2")),
    "rollback past what is kept": (lambda m: m.step(list(range(1, 30)), m.new_state(max_rollback=2))[1].rollback(10),
                                   ("roll back 10", "max_rollback")),
    "max_rollback negative": (lambda m: m.new_state(max_rollback=-1), ("max_rollback", "-1")),
    "max_rollback a string": (lambda m: m.new_state(max_rollback="4"), ("max_rollback", "'4'")),
    "conv_window of a missing layer": (lambda m: m.new_state().conv_window(9), ("layer 9",)),
    "conv_window of an attention layer": (lambda m: m.new_state().conv_window(1), ("layer 1", "attention")),
    "conv_window of layer '0'": (lambda m: m.new_state().conv_window("0"), ("layer '0'",)),
    "step_batch with fewer states": (lambda m: m.step_batch([[1], [2]], [None]), ("2 id sequences", "1 states")),
    "step_batch with a tuple of ids": (lambda m: m.step_batch("12", [None]), ("step_batch",)),
}


@pytest.mark.parametrize("case", list(STATES))
def test_hostile_state(dense_model, case):
    action, needles = STATES[case]
    refused(lambda: action(dense_model), *needles)


# ============================================================================= sequence length
SHORT = TINY_DENSE.replace(max_position_embeddings=8)
LENGTHS: dict[str, tuple[Callable[[Any], Any], tuple[str, ...]]] = {
    "forward of 9 tokens": (lambda m: m.forward(list(range(1, 10))), ("max_position_embeddings 8",)),
    "a batch of 9 tokens": (lambda m: m.forward([list(range(1, 10))] * 2), ("max_position_embeddings 8",)),
    "record of 9 tokens": (lambda m: record(m, list(range(1, 10))), ("max_position_embeddings 8",)),
    "step past the end": (lambda m: m.step([1, 2, 3], m.step(list(range(1, 7)))[1]), ("max_position_embeddings 8",)),
    "generate from a prompt past the end": (lambda m: lfm2np.generate.generate(m, list(range(1, 10)), 5, stop_ids=[]),
                                            ("max_position_embeddings 8",)),
}


@pytest.mark.parametrize("case", list(LENGTHS))
def test_sequence_longer_than_the_model(case):
    action, needles = LENGTHS[case]
    model = lfm2np.synthetic.random_model(SHORT, seed=1)
    refused(lambda: action(model), *needles)


# ============================================================================= non-finite weights
def _with(name: str, value: float, index: Any = (0,)) -> Callable[[dict], None]:
    def change(params: dict) -> None:
        params[name] = params[name].copy()
        params[name][index] = value
    return change


NON_FINITE: dict[str, tuple[Any, Callable[[dict], None], str]] = {
    "NaN in the embedding row of a token": (TINY_DENSE, _with("model.embed_tokens.weight", math.nan, (1, 0)),
                                            "model.embed_tokens.weight"),
    "inf in a norm weight": (TINY_DENSE, _with("model.layers.1.operator_norm.weight", math.inf),
                             "model.layers.1.operator_norm.weight"),
    "NaN in a conv kernel": (TINY_DENSE, _with("model.layers.0.conv.conv.weight", math.nan, (3, 0, 1)),
                             "model.layers.0.conv.conv.weight"),
    "-inf in a query projection": (TINY_DENSE, _with("model.layers.1.self_attn.q_proj.weight", -math.inf, (0, 0)),
                                   "model.layers.1.self_attn.q_proj.weight"),
    "NaN in the final norm": (TINY_DENSE, _with("model.embedding_norm.weight", math.nan), "model.embedding_norm.weight"),
    "NaN in an expert": (TINY_MOE, _with("model.layers.1.feed_forward.experts.3.w2.weight", math.nan, (0, 0)),
                         "model.layers.1.feed_forward.experts"),
    "NaN in the router": (TINY_MOE, _with("model.layers.2.feed_forward.gate.weight", math.nan, (0, 0)),
                          "model.layers.2.feed_forward.gate.weight"),
    "inf in the expert bias": (TINY_MOE, _with("model.layers.3.feed_forward.expert_bias", math.inf),
                               "model.layers.3.feed_forward.expert_bias"),
}


@pytest.mark.parametrize("case", list(NON_FINITE))
def test_non_finite_weights_are_named(case):
    config, change, culprit = NON_FINITE[case]
    params = random_params(config, seed=7)
    change(params)
    model = lfm2np.Model(config, params)
    refused(lambda: model.forward(list(range(1, 12))), culprit)


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "seed": 1}], ids=["greedy", "sampled"])
def test_non_finite_weights_never_become_tokens(tmp_path, sampling):
    params = random_params(TINY_DENSE, seed=8)
    params["model.embedding_norm.weight"] = np.full(48, np.nan, np.float32)
    path = save_checkpoint(tmp_path / "nan", TINY_DENSE, params)
    model = lfm2np.load(path)
    refused(lambda: lfm2np.generate.generate(model, [1, 2], 4, **sampling), "model.embedding_norm.weight")


def test_overflowing_logits_are_named():
    """Finite weights whose product overflows float32: the logits are not finite, and that is said."""
    params = random_params(TINY_DENSE, seed=9)
    params["model.embedding_norm.weight"] = np.full(48, 1e38, np.float32)
    model = lfm2np.Model(TINY_DENSE, params)
    refused(lambda: model.forward([1, 2]), "lm_head", "overflowed")


# ================================================================================= traces
@pytest.fixture(scope="module")
def trace_path(tmp_path_factory) -> Path:
    model = lfm2np.synthetic.random_model(TINY_MOE, seed=2)
    _, trace = record(model, [1, 2, 3])
    return trace.save(tmp_path_factory.mktemp("trace") / "trace.safetensors")


def resaved(src: Path, dst: Path, metadata: "dict | None" = None, change: "Callable[[dict], None] | None" = None) -> Path:
    t = Trace.load(src)
    tensors = dict(t.tensors)
    if change:
        change(tensors)
    meta = {"order": json.dumps(list(tensors)), "meta": json.dumps(t.meta)}
    meta.update(metadata or {})
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(dst), metadata=meta)
    return dst


L0 = "model.layers.0.feed_forward.w1"
TRACES: dict[str, tuple[dict, "Callable[[dict], None] | None", tuple[str, ...]]] = {
    "order not JSON": ({"order": "[lm_head"}, None, ("corrupt trace metadata 'order'",)),
    "order an object": ({"order": '{"a": 1}'}, None, ("'order' is a JSON dict; expected a list",)),
    "order a string": ({"order": '"lm_head"'}, None, ("'order' is a JSON str",)),
    "order naming a missing tensor": ({"order": json.dumps(["lm_head", "nope"])}, None,
                                      ("'order' lists 'nope', which the file does not hold",)),
    "order with a number": ({"order": "[1]"}, None, ("'order' lists 1",)),
    "order nested too deeply": ({"order": "[" * 100_000 + "]" * 100_000}, None,
                                ("corrupt trace metadata 'order'", "nested too deeply")),
    "meta not JSON": ({"meta": "{ids"}, None, ("corrupt trace metadata 'meta'",)),
    "meta a list": ({"meta": "[1, 2]"}, None, ("'meta' is a JSON list; expected a object",)),
    "logits as integers": ({}, lambda t: t.update({"lm_head": t["lm_head"].astype(np.int32)}),
                           ("'lm_head' has dtype I32", "floating point")),
    "an intermediate as bools": ({}, lambda t: t.update({L0: t[L0] > 0}), (f"'{L0}' has dtype BOOL",)),
    "chosen experts as floats": ({}, lambda t: t.update({
        "model.layers.1.feed_forward.selected_experts": t["model.layers.1.feed_forward.selected_experts"].astype(
            np.float32)}), ("'model.layers.1.feed_forward.selected_experts' has dtype F32", "integers")),
    "a llama.cpp name as integers": ({}, lambda t: t.update({"l_out-0": np.zeros((3, 48), np.int64)}),
                                     ("'l_out-0' has dtype I64",)),
}


@pytest.mark.parametrize("case", list(TRACES))
def test_hostile_trace_file(tmp_path, trace_path, case):
    metadata, change, needles = TRACES[case]
    path = resaved(trace_path, tmp_path / "bad.safetensors", metadata, change)
    refused(lambda: Trace.load(path), str(path), *needles)


def test_trace_order_incomplete_or_repeated(tmp_path, trace_path):
    names = Trace.load(trace_path).names()
    path = resaved(trace_path, tmp_path / "a.safetensors", {"order": json.dumps(names[1:])})
    refused(lambda: Trace.load(path), "'order' leaves out tensor", names[0])
    path = resaved(trace_path, tmp_path / "b.safetensors", {"order": json.dumps([names[0], *names])})
    refused(lambda: Trace.load(path), f"'order' lists {names[0]!r} twice")


TRACE_FILES: dict[str, tuple[bytes, tuple[str, ...]]] = {
    "not safetensors": (b"GGUF\x03\x00\x00\x00" + bytes(40), ("header length",)),
    "empty": (b"", ("too short",)),
    "an unknown dtype": (st({"lm_head": entry(dtype="F8_E5M2", offsets=(0, 2))}, b"\0\0"), ("'lm_head'", "F8_E5M2")),
    "bool bytes other than 0 and 1": (st({"mask": entry(dtype="BOOL", shape=(2,), offsets=(0, 2))}, b"\x01\x07"),
                                      ("'mask' is BOOL but element 1 is byte 7",)),
}


@pytest.mark.parametrize("case", list(TRACE_FILES))
def test_hostile_trace_bytes(tmp_path, case):
    raw, needles = TRACE_FILES[case]
    path = tmp_path / "t.safetensors"
    path.write_bytes(raw)
    refused(lambda: Trace.load(path), str(path), *needles)


def test_trace_bigger_than_memory(monkeypatch, trace_path):
    import lfm2np.oracle.trace as trace_module

    monkeypatch.setattr(trace_module, "machine_memory", lambda: 1000)
    refused(lambda: Trace.load(trace_path), str(trace_path), "more than this machine's memory")


NON_FINITE_TRACES: dict[str, tuple[Callable[[np.ndarray], np.ndarray], str, str]] = {
    "NaN in A": (lambda x: np.where(np.arange(x.size).reshape(x.shape) == 4, np.nan, x), "a", "A has 1 NaN"),
    "inf in the reference": (lambda x: np.where(np.arange(x.size).reshape(x.shape) == 0, np.inf, x), "b",
                             "reference has 1 inf (first at index (0, 0, 0))"),
    "NaN at the same place in both": (lambda x: np.full_like(x, np.nan), "ab", "A has"),
    "-inf everywhere in A": (lambda x: np.full_like(x, -np.inf), "a", "A has"),
}


@pytest.mark.parametrize("case", list(NON_FINITE_TRACES))
def test_non_finite_traces_never_pass(trace_path, case):
    """A NaN or an infinity in either trace fails that tensor, with a problem saying so."""
    poison, where, problem = NON_FINITE_TRACES[case]
    a, b = Trace.load(trace_path), Trace.load(trace_path)
    for t in [t for w, t in (("a", a), ("b", b)) if w in where]:
        t.tensors["model.layers.2.self_attn.q_proj"] = poison(t.tensors["model.layers.2.self_attn.q_proj"])
    result = compare(a, b)
    first = result.first_divergence
    assert not result.ok and first.name == "model.layers.2.self_attn.q_proj" and problem in first.problem
    json.dumps(result.to_json(), allow_nan=False)  # strict JSON, whatever the values


def test_trace_summary_of_a_nan_tensor_is_strict_json(tmp_path):
    path = Trace({"lm_head": np.array([[np.nan, 1.0]], np.float32)}).save(tmp_path / "nan.safetensors")
    summary = json.loads(path.with_suffix(".json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert summary["tensors"]["lm_head"]["mean"] == "nan" and summary["tensors"]["lm_head"]["shape"] == [1, 2]


def test_compare_json_is_strict(capsys, tmp_path, trace_path):
    """The CLI's --json output parses with a strict parser, also for identical traces (NMSE -inf dB)."""
    def strict(text: str) -> Any:
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))

    assert main(["compare", str(trace_path), str(trace_path), "--json"]) == 0
    out = strict(capsys.readouterr().out)
    assert out["ok"] and out["tensors"][0]["nmse_db"] == "-inf"
    bad = tmp_path / "nan.safetensors"
    resaved(trace_path, bad, change=lambda t: t.update({"lm_head": np.full_like(t["lm_head"], np.nan)}))
    assert main(["compare", str(bad), str(trace_path), "--json"]) == 1
    out = strict(capsys.readouterr().out)
    row = next(r for r in out["tensors"] if r["name"] == "lm_head")
    assert not out["ok"] and not row["ok"] and "A has" in row["problem"]


def with_entry(f: Path, name: str, value: dict) -> Path:
    """Add header entry ``name`` (e.g. a tensor of no bytes at the end of the data) to safetensors file ``f``."""
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header[name] = value
    f.write_bytes(st(header, raw[8 + n:]))
    return f


@pytest.mark.parametrize("shape", [(0, 2**62), (2**31, 0, 2**31), (0, 2**61)])
def test_a_tensor_of_no_bytes_that_no_array_can_have_is_named_everywhere(tmp_path, capsys, dense_copy, shape):
    """A shape with a 0 and huge other dimensions holds no byte, but NumPy refuses to make it (the product of the
    other dimensions overflows): refused with the file and the tensor when the header is read, through
    Trace.load, the compare command and lfm2np.load (even where the tensor would never be read)."""
    trace = tmp_path / "z.safetensors"
    trace.write_bytes(st({"lm_head": entry(shape=shape, offsets=(0, 0))}))
    refused(lambda: Trace.load(trace), str(trace), "tensor 'lm_head'", "beyond what an array can hold")
    cli_refuses(capsys, ["compare", str(trace), str(trace)], str(trace), "'lm_head'", "beyond what an array can hold")
    f = dense_copy / "model.safetensors"
    data = f.stat().st_size - 8 - int.from_bytes(f.read_bytes()[:8], "little")
    with_entry(f, "junk", entry(shape=shape, offsets=(data, data)))
    for strict in (True, False):
        refused(lambda: lfm2np.load(dense_copy, strict=strict), "model.safetensors", "tensor 'junk'",
                "beyond what an array can hold")


# ============================================================================ the command line
def cli_refuses(capsys, argv: list[str], *needles: str) -> str:
    """``lfm2np argv`` ends in one ``lfm2np: error:`` line naming ``needles``, with exit status 2."""
    try:
        status = main(argv)
    except SystemExit as e:
        status = e.code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert status == 2, (status, err)
    assert lines and lines[-1].startswith("lfm2np: error: ") and "Traceback" not in err, err
    assert sum(line.startswith("lfm2np: error:") for line in lines) == 1, err
    missing = [n for n in needles if n not in lines[-1]]
    assert not missing, f"{lines[-1]} does not name {missing}"
    return lines[-1]


GOLDEN_MOE = str(ROOT / "tests" / "golden" / "moe-bf16-bias")
EMBEDDED = str(embedded_model_path())
GEN = ["generate", EMBEDDED, "--prompt", "hi"]
CLI: dict[str, tuple[list[str], tuple[str, ...]]] = {
    "no command": ([], ("COMMAND",)),
    "unknown command": (["fly"], ("'fly'",)),
    "unknown option": (["forward", GOLDEN_MOE, "--nope"], ("forward: unrecognized arguments: --nope",
                                                           "lfm2np forward --help")),
    "golden --out ''": (["golden", GOLDEN_MOE, "--out", ""], ("--out", "an empty path")),
    "golden --layers past the model": (["golden", GOLDEN_MOE, "--out", "/tmp/lfm2np-never-made", "--layers", "99"],
                                       ("layers [99]",)),
    "trace --pattern matching nothing": (["trace", GOLDEN_MOE, "--out", "/tmp/lfm2np-never.safetensors",
                                          "--pattern", "x*"],
                                         ("--pattern x*", "matches no intermediate")),
    "memory --quant ''": (["memory", "LFM2-350M", "--quant", ""], ("--quant is empty",)),
    "a temperature that overflows the logits": ([*GEN, "--temperature", "1e-320"], ("overflows these logits",)),
    "forward without a model": (["forward"], ("model",)),
    "forward of a missing directory": (["forward", "/nonexistent/ckpt"], ("/nonexistent/ckpt",)),
    "forward of a file": (["forward", str(ROOT / "README.md")], ("README.md",)),
    "--top 0": (["forward", GOLDEN_MOE, "--top", "0"], ("--top", "0")),
    "--top -3": (["forward", GOLDEN_MOE, "--top", "-3"], ("--top", "-3")),
    "--top x": (["forward", GOLDEN_MOE, "--top", "x"], ("--top", "'x'")),
    "--ids -1": (["forward", GOLDEN_MOE, "--ids", "1", "-1"], ("--ids",)),
    "--ids 1.5": (["forward", GOLDEN_MOE, "--ids", "1.5"], ("--ids", "'1.5'")),
    "--ids outside the vocabulary": (["forward", GOLDEN_MOE, "--ids", "1", "97"], ("token id 97",)),
    "--ids past int64": (["forward", GOLDEN_MOE, "--ids", "9" * 300], ("--ids", "too large", str(2**63 - 1))),
    "--ids 2^63": (["forward", GOLDEN_MOE, "--ids", str(2**63)], ("--ids", "too large")),
    "--max-new-tokens 2^70": ([*GEN, "--max-new-tokens", str(2**70)], ("--max-new-tokens", "too large")),
    "--dtype int8": (["forward", GOLDEN_MOE, "--dtype", "int8"], ("--dtype", "'int8'")),
    "--seed -1": ([*GEN, "--seed", "-1"], ("--seed", "-1")),
    "--seed 2^64": ([*GEN, "--seed", str(2**64)], ("--seed", str(2**64))),
    "--seed x": ([*GEN, "--seed", "x"], ("--seed", "'x'")),
    "--temperature -1": ([*GEN, "--temperature", "-1"], ("--temperature",)),
    "--temperature nan": ([*GEN, "--temperature", "nan"], ("--temperature", "'nan'")),
    "--temperature inf": ([*GEN, "--temperature", "inf"], ("--temperature", "'inf'")),
    "--top-k -1": ([*GEN, "--top-k", "-1"], ("--top-k",)),
    "--top-p 0": ([*GEN, "--top-p", "0"], ("--top-p", "0 < top_p <= 1")),
    "--top-p 1.5": ([*GEN, "--top-p", "1.5"], ("--top-p",)),
    "--min-p 2": ([*GEN, "--min-p", "2"], ("--min-p",)),
    "--repetition-penalty 0": ([*GEN, "--repetition-penalty", "0"], ("--repetition-penalty",)),
    "--max-new-tokens -1": ([*GEN, "--max-new-tokens", "-1"], ("--max-new-tokens",)),
    "--prompt not UTF-8": (["generate", EMBEDDED, "--prompt", "caf\udce9"], ("--prompt", "UTF-8")),
    "--prompt and --chat": ([*GEN, "--chat", "hello"], ("--chat", "--prompt")),
    "generate without a prompt": (["generate", EMBEDDED], ("--prompt", "--chat")),
    "demo --walk-tokens 0": (["demo", "--walk-tokens", "0"], ("--walk-tokens",)),
    "demo --top-p nan": (["demo", "--top-p", "nan"], ("--top-p",)),
    "trace --out a directory": (["trace", GOLDEN_MOE, "--out", str(ROOT)], ("--out", "is a directory")),
    "trace --out in a missing directory": (["trace", GOLDEN_MOE, "--out", "/nonexistent/t.safetensors"],
                                           ("--out", "/nonexistent")),
    "trace without --out": (["trace", GOLDEN_MOE], ("--out",)),
    "trace --ids and --text": (["trace", GOLDEN_MOE, "--ids", "1", "--text", "x", "--out", "/tmp/t"],
                               ("--text", "--ids")),
    "compare a missing trace": (["compare", "/nonexistent/a.safetensors", "/nonexistent/b.safetensors"],
                                ("argument a", "/nonexistent/a.safetensors")),
    "compare a directory": (["compare", str(ROOT / "README.md"), str(ROOT)],
                            ("argument b", "is a directory, not a regular file")),
    "compare a file that is not a trace": (["compare", str(ROOT / "README.md"), str(ROOT / "README.md")],
                                           ("README.md",)),
    "compare --tier q2": (["compare", str(ROOT / "README.md"), str(ROOT / "README.md"), "--tier", "q2"],
                          ("--tier", "'q2'")),
    "golden --out a file": (["golden", GOLDEN_MOE, "--out", str(ROOT / "README.md")], ("--out", "is a file")),
    "golden --out under a file": (["golden", GOLDEN_MOE, "--out", str(ROOT / "README.md" / "x")],
                                  ("--out", "README.md is a file")),
    "golden --layers x": (["golden", GOLDEN_MOE, "--out", "/tmp/g", "--layers", "x"], ("--layers", "'x'")),
    "golden --layers -1": (["golden", GOLDEN_MOE, "--out", "/tmp/g", "--layers", "-1"], ("--layers",)),
    "params of a missing model": (["params", "/nonexistent/config.json"], ("/nonexistent/config.json",)),
    "params of an unknown preset": (["params", "LFM9-1T"], ("'LFM9-1T'",)),
    "memory --context 0": (["memory", "LFM2-350M", "--context", "0"], ("--context",)),
    "memory --parallel -1": (["memory", "LFM2-350M", "--parallel", "-1"], ("--parallel",)),
    "memory --chunk x": (["memory", "LFM2-350M", "--chunk", "x"], ("--chunk", "'x'")),
    "memory --budget lots": (["memory", "LFM2-350M", "--budget", "lots"], ("--budget", "'lots'")),
    "memory --budget beyond float": (["memory", "LFM2-350M", "--budget", "9" * 400], ("--budget", "too large")),
    "memory --kv-type q3": (["memory", "LFM2-350M", "--kv-type", "q3"], ("'q3'",)),
    "memory --quant Q1": (["memory", "LFM2-350M", "--quant", "Q1"], ("'Q1'",)),
}


def test_cli_corpus_is_distinct():
    assert len({tuple(argv) for argv, _ in CLI.values()}) == len(CLI) >= 50


@pytest.mark.parametrize("case", list(CLI))
def test_hostile_command_line(capsys, case):
    argv, needles = CLI[case]
    cli_refuses(capsys, argv, *needles)


def test_cli_bad_config_and_trace(capsys, tmp_path, trace_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(cfg(DENSE, vocab_size="97")))
    cli_refuses(capsys, ["params", str(config)], str(config), "'vocab_size'")
    bad = resaved(trace_path, tmp_path / "bad.safetensors", {"order": "[x"})
    cli_refuses(capsys, ["compare", str(bad), str(trace_path)], str(bad), "'order'")
    cli_refuses(capsys, ["golden", GOLDEN_MOE, "--out", str(tmp_path / "g"), "--layers", "9"], "layers [9]")


def test_cli_output_that_cannot_be_written(capsys, tmp_path):
    """A directory where the trace's .json summary goes: an OSError, reported in one line."""
    (tmp_path / "t.json").mkdir()
    cli_refuses(capsys, ["trace", GOLDEN_MOE, "--out", str(tmp_path / "t.safetensors")], str(tmp_path / "t.json"))
    (tmp_path / "u.safetensors").mkdir()
    cli_refuses(capsys, ["trace", GOLDEN_MOE, "--out", str(tmp_path / "u")], str(tmp_path / "u.safetensors"))
    (tmp_path / "g" / "001_model.embed_tokens.safetensors").mkdir(parents=True)  # (000: the RoPE tables)
    cli_refuses(capsys, ["golden", GOLDEN_MOE, "--out", str(tmp_path / "g"), "--force"], "Is a directory")


@pytest.mark.parametrize("argv, needle", [
    (["forward", GOLDEN_MOE, "--top", "0"], "--top"),
    (["compare", "/nonexistent/a", "/nonexistent/b"], "/nonexistent/a"),
])
def test_cli_in_a_real_process(argv, needle):
    proc = subprocess.run([sys.executable, "-m", "lfm2np", *argv], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("lfm2np: error:"), proc.stderr
    assert needle in lines[0]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_cli_stdout_on_a_full_disk():
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "lfm2np", "params", "LFM2-350M", "--layers"], stdout=full,
                              stderr=subprocess.PIPE, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "lfm2np: error: cannot write the output: No space left on device"], proc.stderr


# ======================================================================= what load and diagnose are given
def _npz_member(tmp_path, name, data) -> Path:
    import zipfile

    path = tmp_path / "dump.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(name, data)
    return path


def _npy_header(shape, descr="<f4", version=b"\x01\x00") -> bytes:
    head = repr({"descr": descr, "fortran_order": False, "shape": tuple(shape)}).encode("latin1")
    head += b" " * (63 - (10 + len(head)) % 64) + b"\n"
    return b"\x93NUMPY" + version + len(head).to_bytes(2, "little") + head


def _chunked(model):
    model.prefill_chunk = 4
    return model


ARGUMENTS: dict[str, tuple[Callable[[Path], Any], tuple[str, ...]]] = {
    "load(None)": (lambda d: lfm2np.load(None), ("path must be", "NoneType")),
    "a number as the progress of a chunked forward": (lambda d: _chunked(lfm2np.synthetic.random_model(
        TINY_DENSE, seed=0)).forward([1, 2, 3, 4, 5, 6], progress=5), ("progress must be a function",)),
    "load(5)": (lambda d: lfm2np.load(5), ("path must be", "int")),
    "load of a folder holding only a GGUF": (lambda d: (d / "m.gguf").write_bytes(b"GGUF") and lfm2np.load(d),
                                             ("no config.json", "m.gguf", "give one of them")),
    "a stop id beyond the vocabulary": (lambda d: lfm2np.generate.Generation(
        lfm2np.synthetic.random_model(TINY_DENSE, seed=0), [1], 2, stop_ids=[97]), ("stop id 97", "vocabulary")),
    "a stop id that is text": (lambda d: lfm2np.generate.Generation(
        lfm2np.synthetic.random_model(TINY_DENSE, seed=0), [1], 2, stop_ids=["2"]), ("stop id '2'",)),
}

DUMPS: dict[str, tuple[Callable[[Path], Path], tuple[str, ...]]] = {
    "an npz member that is not an array": (lambda d: _npz_member(d, "notes.txt", b"hi"), ("notes.txt", "not an .npy")),
    "an npz of pickled objects": (lambda d: _npz_member(d, "ids.npy", _npy_header((2,), "|O")), ("Python objects",)),
    "an npz array of .npy version 9": (lambda d: _npz_member(d, "ids.npy", _npy_header((2,), version=b"\x09\x00")),
                                       ("ids.npy", "format")),
    "an npz array header cut short": (lambda d: _npz_member(d, "ids.npy", _npy_header((2,))[:20]), ("not a readable",)),
    "an npz promising terabytes": (lambda d: _npz_member(d, "logits.npy", _npy_header((10**6, 10**6))),
                                   ("'logits'", "would inflate")),
    "an npz of strings": (lambda d: _npz_member(d, "logits.npy", _npy_header((2, 97), "<U3")), ("dtype kind 'U'",)),
    "an npz of 3-D logits": (lambda d: _npz_member(d, "logits.npy", _npy_header((2, 3, 4))), ("logits must have shape",)),
    "logits wider than the vocabulary": (lambda d: _npz_member(d, "logits.npy", _npy_header((2, 98))),
                                         ("98 columns", "vocabulary is 97")),
    "a safetensors dump with a bad order": (lambda d: (save_file(
        {"ids": np.arange(2), "logits": np.zeros((2, 97), np.float32)}, str(d / "dump.safetensors"),
        metadata={"order": '["ids", "ids"]'}), d / "dump.safetensors")[1], ("order", "twice")),
    "a safetensors dump of strings": (lambda d: ((d / "dump.safetensors").write_bytes(
        b"\x10\x00\x00\x00\x00\x00\x00\x00" + b'"not an object"  '), d / "dump.safetensors")[1],
        ("dump.safetensors",)),
    "a dump that is a text file": (lambda d: ((d / "dump.txt").write_text("1 2 3"), d / "dump.txt")[1],
                                   (".npz or a .safetensors",)),
}


@pytest.mark.parametrize("case", list(ARGUMENTS))
def test_hostile_arguments(tmp_path, case):
    action, needles = ARGUMENTS[case]
    refused(lambda: action(tmp_path), *needles)


@pytest.mark.parametrize("case", list(DUMPS))
def test_hostile_dump(tmp_path, case):
    from lfm2np.oracle.dumps import load_dump

    make, needles = DUMPS[case]
    path = make(tmp_path)
    refused(lambda: load_dump(path, vocab_size=TINY_DENSE.vocab_size), path.name, *needles)


# ==================================================================================== the count
def test_the_corpus_has_at_least_150_distinct_inputs():
    counts = {
        "safetensors files": len(SAFETENSORS) + len(CHECKPOINT_CASES) + 2,
        "index files": len(INDEX) + 5,
        "configs": len(CONFIGS) + len(CONFIG_WARNED) + len(CONFIG_JSON) + 2,
        "GGUF files": len(GGUF_METADATA) + len(GGUF_MOE_METADATA) + 6,
        "files changed after loading": 2 * len(CHANGES) + 3,
        "decoding states": len(STATES),
        "load and generation arguments": len(ARGUMENTS),
        "backend dumps": len(DUMPS),
        "sequence length": len(LENGTHS),
        "non-finite weights": len(NON_FINITE) + 3,
        "traces": len(TRACES) + 2 + len(TRACE_FILES) + 1 + len(NON_FINITE_TRACES) + 3,
        "command line": len(CLI) + 5 + 3 + 2 + 1,
    }
    print(counts, sum(counts.values()))
    assert sum(counts.values()) >= 150 and min(counts.values()) >= 5
