"""lfm2np.io.gguf_file: the defensive GGUF reader agrees with gguf-py's GGUFReader on valid files, and refuses
every malformed one with an Lfm2npError naming the file and the culprit -- never a hang, a runaway
allocation or a crash (hostile files and the fuzzer run in a subprocess under an address-space limit)."""

from __future__ import annotations

import builtins
import json
import os
import re
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

gguf = pytest.importorskip("gguf")

from lfm2np.errors import Lfm2npError  # noqa: E402
from lfm2np.io.gguf_file import GgufFile, TensorInfo, open_gguf  # noqa: E402

from conftest import subprocess_env  # noqa: E402

VT = gguf.GGUFValueType
QT = gguf.GGMLQuantizationType


# ------------------------------------------------------------------------------------ raw GGUF builder
def u32(v: int) -> bytes:
    return struct.pack("<I", v)


def u64(v: int) -> bytes:
    return struct.pack("<Q", v)


def gstr(s: "str | bytes", length: int | None = None) -> bytes:
    """A GGUF string (u64 length + bytes); ``length`` overrides the stored length."""
    b = s.encode() if isinstance(s, str) else s
    return u64(len(b) if length is None else length) + b


def kv(key: "str | bytes", vtype: int, payload: bytes) -> bytes:
    return gstr(key) + u32(vtype) + payload


def kv_str(key: str, value: "str | bytes") -> bytes:
    return kv(key, VT.STRING, gstr(value))


def kv_array(key: str, etype: int, payload_items: list[bytes], count: int | None = None) -> bytes:
    return kv(key, VT.ARRAY, u32(etype) + u64(len(payload_items) if count is None else count) + b"".join(payload_items))


def tinfo(name: "str | bytes", ne: list[int], gtype: int = QT.F32, offset: int = 0, n_dims: int | None = None) -> bytes:
    return (gstr(name) + u32(len(ne) if n_dims is None else n_dims) + b"".join(u64(d) for d in ne)
            + u32(gtype) + u64(offset))


def gguf_bytes(kvs=(), infos=(), data: bytes = b"", *, version: int = 3, magic: bytes = b"GGUF",
               n_tensors: int | None = None, n_kv: int | None = None, alignment: int = 32,
               version_bytes: bytes | None = None) -> bytes:
    """A whole file: header, key/values, tensor infos, padding to ``alignment``, then ``data``."""
    head = (magic + (version_bytes if version_bytes is not None else u32(version))
            + u64(len(infos) if n_tensors is None else n_tensors) + u64(len(kvs) if n_kv is None else n_kv)
            + b"".join(kvs) + b"".join(infos))
    return head + b"\0" * (-len(head) % alignment) + data


ARCH = kv_str("general.architecture", "lfm2")
A_INFO = tinfo("a", [4], QT.F32, 0)  # 16 bytes at data offset 0
B_INFO = tinfo("b", [8, 2], QT.F32, 32)  # 64 bytes at data offset 32
DATA = np.arange(4, dtype="<f4").tobytes() + b"\0" * 16 + np.arange(16, dtype="<f4").tobytes()


def base_file(**overrides) -> bytes:
    """A small valid file (two F32 tensors); keyword arguments replace its parts."""
    parts = dict(kvs=[ARCH, kv("n", VT.UINT32, u32(7))], infos=[A_INFO, B_INFO], data=DATA)
    parts.update(overrides)
    return gguf_bytes(**parts)


# ------------------------------------------------------------------------------------ valid files
def write_with_gguf_py(path: Path, alignment: int | None = None) -> Path:
    """A file with every metadata value type and tensors of several ggml types, written by GGUFWriter."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "lfm2")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 65000)
    w.add_int16("t.i16", -32000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 0.1)
    w.add_uint64("t.u64", 2**64 - 1)
    w.add_int64("t.i64", -(2**63))
    w.add_float64("t.f64", 1e300)
    w.add_bool("t.true", True)
    w.add_bool("t.false", False)
    w.add_string("t.str", "héllo wörld ✓")
    w.add_array("tokenizer.ggml.tokens", ["<s>", "a", "ç", "日本", " "])
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.5, -0.25, 1e-3])
    w.add_array("t.bools", [True, False, True])
    w.add_key_value("t.u64s", [0, 2**64 - 1], VT.ARRAY, sub_type=VT.UINT64)
    w.add_key_value("t.i8s", [-128, 127], VT.ARRAY, sub_type=VT.INT8)
    w.add_key_value("t.f64s", [1.5, -2.5], VT.ARRAY, sub_type=VT.FLOAT64)

    def quantised(name: str, shape: tuple[int, ...], qtype) -> None:
        data = rng.standard_normal(shape).astype(np.float32)
        w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)

    w.add_tensor("f32", rng.standard_normal((3, 8)).astype(np.float32))
    w.add_tensor("f16", rng.standard_normal(16).astype(np.float16))
    w.add_tensor("i32", rng.integers(-1000, 1000, (2, 5)).astype(np.int32))
    w.add_tensor("f64", rng.standard_normal((2, 3)).astype(np.float64))
    quantised("bf16", (4, 8), QT.BF16)
    quantised("q8", (5, 64), QT.Q8_0)
    quantised("q4_experts", (3, 4, 64), QT.Q4_0)  # stacked experts: numpy (E, out, in)
    # gguf-py cannot encode Q4_K: random bytes with finite block scales (d, dmin: the first 2 f16) stand in
    q4k = rng.integers(0, 256, (2, 144), dtype=np.uint8)
    q4k[:, :4] = np.array([0.01, 0.002], dtype="<f2").view(np.uint8)
    w.add_tensor("q4k", q4k, raw_dtype=QT.Q4_K)
    quantised("q8_vec", (64,), QT.Q8_0)  # 1-D quantised: a row is a fraction of a block
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def valid_path(tmp_path_factory) -> Path:
    return write_with_gguf_py(tmp_path_factory.mktemp("valid") / "valid.gguf")


def reference_float32(t) -> np.ndarray:
    """A GGUFReader tensor as float32 in numpy shape, through gguf.quants.dequantize where it applies."""
    if t.tensor_type in (QT.I32, QT.F64):
        return t.data.astype(np.float32)
    shape = tuple(reversed(t.shape.tolist()))
    return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(shape)


@pytest.mark.parametrize("alignment", [None, 64])
def test_agrees_with_gguf_reader(tmp_path, alignment):
    path = write_with_gguf_py(tmp_path / "v.gguf", alignment)
    reader = gguf.GGUFReader(path)
    with GgufFile(path) as f:
        assert f.version == 3 and f.alignment == (alignment or 32) and f.data_start == reader.data_offset
        fields = {k: v for k, v in reader.fields.items() if not k.startswith("GGUF.")}
        assert list(f.metadata) == list(fields)
        for key, field in fields.items():
            assert f.metadata[key] == field.contents(), key
            names = [t.name for t in field.types]
            assert f.types[key] == (tuple(names) if names[0] == "ARRAY" else names[0]), key
        assert [t.name for t in reader.tensors] == list(f.tensors)
        for t in reader.tensors:
            info = f.tensors[t.name]
            assert isinstance(info, TensorInfo)
            assert (info.ggml_type, info.type_id) == (t.tensor_type.name, int(t.tensor_type))
            assert info.ne == tuple(t.shape.tolist()) and info.shape == tuple(reversed(info.ne))
            assert (info.n_elements, info.nbytes, info.offset) == (t.n_elements, t.n_bytes, t.data_offset)
            data = f.data(t.name)
            assert data.dtype == t.data.dtype and data.shape == t.data.shape, t.name
            assert np.array_equal(data, t.data) and not data.flags.writeable
            full = f.dequantize(t.name)
            assert full.dtype == np.float32 and full.shape == info.shape
            assert np.array_equal(full, reference_float32(t), equal_nan=True), t.name


def test_metadata_values(valid_path):
    with open_gguf(valid_path) as f:
        m = f.metadata
    assert m["t.u64"] == 2**64 - 1 and m["t.i64"] == -(2**63) and m["t.f64"] == 1e300
    assert m["t.f32"] == float(np.float32(0.1)) and m["t.true"] is True and m["t.false"] is False
    assert m["tokenizer.ggml.tokens"] == ["<s>", "a", "ç", "日本", " "]
    assert m["t.bools"] == [True, False, True] and m["t.u64s"] == [0, 2**64 - 1]


ROW_CHOICES = [[0], [1, 0], [2, 0, 1, 2], 1, -1, slice(1, None), slice(None, None, 2), []]


@pytest.mark.parametrize("rows", ROW_CHOICES, ids=repr)
def test_dequantize_rows(valid_path, rows):
    reader = {t.name: t for t in gguf.GGUFReader(valid_path).tensors}
    with GgufFile(valid_path) as f:
        for name, info in f.tensors.items():
            if isinstance(rows, list) and any(r >= info.shape[0] for r in rows):
                continue
            want = reference_float32(reader[name])[rows]
            got = f.dequantize(name, rows=rows)
            assert got.dtype == np.float32 and got.shape == want.shape, name
            assert np.array_equal(got, want, equal_nan=True), name


def test_one_expert_is_read_alone(valid_path):
    """rows=[e] of a stacked (E, out, in) tensor reads only that expert's bytes."""
    with GgufFile(valid_path) as f:
        info = f.tensors["q4_experts"]
        calls = []
        real = f._file.read_into
        f._file.read_into = lambda view, offset, what: (calls.append((offset, len(view))), real(view, offset, what))
        f.dequantize("q4_experts", rows=[2])
        assert calls == [(info.offset + 2 * info.nbytes // 3, info.nbytes // 3)]


def test_bad_row_and_name_requests(valid_path):
    with GgufFile(valid_path) as f:
        with pytest.raises(Lfm2npError, match=r"row 5 is out of range .* length 5"):
            f.dequantize("q8", rows=[5])
        with pytest.raises(Lfm2npError, match=r"row -6 is out of range"):
            f.dequantize("q8", rows=-6)
        with pytest.raises(Lfm2npError, match=r"row index 0.5 is not an integer"):
            f.dequantize("q8", rows=[0.5])
        with pytest.raises(Lfm2npError, match=r"no tensor named 'nope'"):
            f.data("nope")
    with pytest.raises(Lfm2npError, match="closed"):
        f.data("q8")


def test_missing_gguf_package_message(monkeypatch, valid_path):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "gguf" or name.startswith("gguf."):
            raise ImportError("no gguf")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(Lfm2npError, match=r"reading GGUF needs the gguf package: pip install 'lfm2np\[gguf\]'"):
        GgufFile(valid_path)


def test_version_2_is_read(tmp_path):
    path = tmp_path / "v2.gguf"
    path.write_bytes(base_file(version=2))
    with GgufFile(path) as f:
        assert f.version == 2 and f.metadata == {"general.architecture": "lfm2", "n": 7}
        assert np.array_equal(f.data("b"), np.arange(16, dtype=np.float32).reshape(2, 8))


def test_no_tensors_and_no_keys(tmp_path):
    path = tmp_path / "bare.gguf"
    path.write_bytes(gguf_bytes())
    with GgufFile(path) as f:
        assert f.metadata == {} and f.tensors == {}


def test_large_tokenizer_arrays_parse_fast(tmp_path):
    """130k tokens + 130k merges (+ scores, types): a few MB of header, crossing the 1 MiB read chunks."""
    n = 130_000
    tokens = [f"tok{i}" + "é" * (i % 7) for i in range(n)]
    merges = [f"a{i} b{i % 97}" for i in range(n)]
    kvs = [ARCH,
           kv_array("tokenizer.ggml.tokens", VT.STRING, [gstr(t) for t in tokens]),
           kv_array("tokenizer.ggml.merges", VT.STRING, [gstr(m) for m in merges]),
           kv_array("tokenizer.ggml.scores", VT.FLOAT32, [np.arange(n, dtype="<f4").tobytes()], count=n),
           kv_array("tokenizer.ggml.token_type", VT.INT32, [np.ones(n, dtype="<i4").tobytes()], count=n)]
    path = tmp_path / "vocab.gguf"
    path.write_bytes(gguf_bytes(kvs))
    start = time.perf_counter()
    f = GgufFile(path)
    elapsed = time.perf_counter() - start
    f.close()
    assert f.metadata["tokenizer.ggml.tokens"] == tokens and f.metadata["tokenizer.ggml.merges"] == merges
    assert f.metadata["tokenizer.ggml.scores"][-1] == n - 1 and f.types["tokenizer.ggml.token_type"] == ("ARRAY", "INT32")
    print(f"130k tokens + 130k merges parsed in {elapsed * 1000:.0f} ms")
    assert elapsed < 2.0  # typically ~0.1 s; generous for slow CI machines


# ------------------------------------------------------------------------------------ the hostile corpus
_N_KV = kv("n", VT.UINT32, u32(7))
_BASE = base_file()
_HEADER_END = len(gguf_bytes(kvs=[ARCH, _N_KV], infos=[A_INFO, B_INFO], alignment=1))
_DATA_START = -(-_HEADER_END // 32) * 32
# Truncations: a long first value makes the file outgrow the minimum sizes behind the count check, so cuts
# past it reach the per-field "truncated" checks (an earlier cut already fails the count check).
_LONG_ARCH = kv_str("general.architecture", "x" * 400)
_ROOMY = base_file(kvs=[_LONG_ARCH, _N_KV])
_R_KEY1 = 24 + len(_LONG_ARCH)  # key 'n'
_R_INFO = _R_KEY1 + len(_N_KV)  # tensor info 'a'
_R_HEADER_END = _R_INFO + len(A_INFO) + len(B_INFO)
_WRAP = 2**64 - _DATA_START + 32  # data_start + offset wraps to 32 (into the header) in 64-bit arithmetic

HOSTILE: dict[str, tuple[bytes, str]] = {
    # preamble
    "bad magic": (b"GGML" + _BASE[4:], "magic is b'GGML', expected b'GGUF'"),
    "three bytes": (b"GGU", "magic is b'GGU'"),
    "magic only": (b"GGUF", "truncated: version"),
    "version 1": (base_file(version=1), "GGUF version 1 is not supported"),
    "version 4": (base_file(version=4), "unsupported GGUF version 4, expected 2 or 3"),
    "version 0": (base_file(version=0), "unsupported GGUF version 0"),
    "big-endian": (base_file(version_bytes=struct.pack(">I", 3)), "big-endian GGUF"),
    "tensor_count 2^63": (base_file(n_tensors=2**63), "tensor_count 9223372036854775808 cannot fit"),
    "tensor_count 9 of 2": (base_file(n_tensors=9), "tensor_count 9 cannot fit"),
    "tensor_count 3 of 2": (base_file(n_tensors=3), "tensor info #2 at offset"),  # reads padding and data
    "kv_count 2^64-1": (base_file(n_kv=2**64 - 1), "kv_count 18446744073709551615 cannot fit"),
    "kv_count one too many": (gguf_bytes([ARCH, _N_KV], n_kv=3, alignment=1), "truncated: key #2"),
    "truncated counts": (_BASE[:20], "truncated: kv_count"),
    # keys
    "key length 2^62": (base_file(kvs=[gstr("k", length=2**62) + u32(VT.UINT8) + b"\0"]), "key #0 at offset 24"),
    "key past end": (gguf_bytes([gstr("k", length=200) + b"k" * 20]), "runs past the end of the file"),
    "empty key": (base_file(kvs=[kv("", VT.UINT8, b"\1")]), "key #0 at offset 24 is empty"),
    "non-UTF-8 key": (base_file(kvs=[ARCH, kv(b"bad\xff", VT.UINT8, b"\1")]), "key #1 at offset"),
    "duplicate key": (base_file(kvs=[ARCH, ARCH]), "duplicate key 'general.architecture'"),
    # value types
    "unknown value type 13": (base_file(kvs=[kv("k", 13, b"\0" * 8)]), "key 'k': unknown value type 13"),
    "unknown value type 2^32-1": (base_file(kvs=[ARCH, kv("k", 2**32 - 1, b"")]), "unknown value type 4294967295"),
    "bool 2": (base_file(kvs=[kv("flag", VT.BOOL, b"\2")]), "key 'flag': BOOL value 2, expected 0 or 1"),
    "bool array 2": (base_file(kvs=[kv_array("flags", VT.BOOL, [b"\1", b"\2"])]), "key 'flags': element 1 is BOOL"),
    "string length 2^40": (base_file(kvs=[kv("s", VT.STRING, gstr("x", length=2**40))]),
                           "key 's': string length 1099511627776 exceeds the limit"),
    "string past end": (base_file(kvs=[kv("s", VT.STRING, gstr("x", length=5000))]),
                        "truncated: key 's': string length 5000 runs past"),
    "non-UTF-8 string": (base_file(kvs=[kv_str("bad", b"\xc3\x28")]), "key 'bad' string value is not valid UTF-8"),
    "array length 2^60": (base_file(kvs=[kv_array("arr", VT.UINT32, [u32(1)], count=2**60)]),
                          "key 'arr': array length 1152921504606846976 exceeds"),
    "uint8 array length 2^40": (base_file(kvs=[kv_array("arr", VT.UINT8, [b"\1"], count=2**40)]),
                                "key 'arr': array length 1099511627776 exceeds"),  # GGUFReader: MemoryError
    "uint8 array past end": (base_file(kvs=[kv_array("arr", VT.UINT8, [b"\1"], count=10**6)]),
                             "truncated: key 'arr': array of 1000000 UINT8 elements needs at least 1000000 bytes"),
    "array past end": (base_file(kvs=[kv_array("arr", VT.UINT64, [u64(1)], count=1000)]),
                       "truncated: key 'arr': array of 1000 UINT64 elements"),
    "string array past end": (base_file(kvs=[kv_array("toks", VT.STRING, [gstr("a")], count=100_000)]),
                              "key 'toks': array of 100000 STRING"),
    "string element length 2^63": (base_file(kvs=[kv_array("toks", VT.STRING, [gstr("a"), gstr("b", length=2**63)])]),
                                   "key 'toks' element 1: string length 9223372036854775808 exceeds"),
    "string element past end": (base_file(kvs=[kv_array("toks", VT.STRING, [gstr("a"), gstr("b", length=999)])]),
                                "truncated: key 'toks' element 1"),
    "non-UTF-8 string element": (base_file(kvs=[kv_array("toks", VT.STRING, [gstr("a"), gstr("b"), gstr(b"\xff")])]),
                                 "key 'toks': element 2 is not valid UTF-8"),
    "nested arrays": (base_file(kvs=[kv_array("nest", VT.ARRAY, [u32(VT.UINT8) + u64(1) + b"\1"])]),
                      "key 'nest': arrays of arrays are not supported"),
    "unknown element type": (base_file(kvs=[kv_array("arr", 99, [b"\0"])]), "key 'arr' array element: unknown value type 99"),
    # alignment
    "alignment 48": (base_file(kvs=[kv("general.alignment", VT.UINT32, u32(48))]),
                     "key 'general.alignment' is 48, expected a power of two"),
    "alignment 0": (base_file(kvs=[kv("general.alignment", VT.UINT32, u32(0))]), "is 0, expected a power of two"),
    "alignment INT32": (base_file(kvs=[kv("general.alignment", VT.INT32, u32(32))]),
                        "'general.alignment' has type INT32, expected UINT32"),
    "alignment string": (base_file(kvs=[kv_str("general.alignment", "32")]), "has type STRING, expected UINT32"),
    # tensor infos
    "n_dims 0": (base_file(infos=[tinfo("a", [], n_dims=0)]), "tensor 'a': n_dims is 0, expected 1..4"),
    "n_dims 5": (base_file(infos=[tinfo("a", [1, 1, 1, 1, 4])]), "tensor 'a': n_dims is 5"),
    "n_dims 2^32-1": (base_file(infos=[tinfo("a", [4], n_dims=2**32 - 1)]), "n_dims is 4294967295"),
    "dim 0": (base_file(infos=[A_INFO, tinfo("b", [8, 0], offset=32)]), "tensor 'b': dimension ne[1] is 0"),
    "dims 2^40 x 2^40": (base_file(infos=[tinfo("big", [2**40, 2**40])]), "tensor 'big': element count"),
    "dim 2^63": (base_file(infos=[tinfo("big", [2**63])]), "overflows int64"),
    "2^62 bytes": (base_file(infos=[tinfo("big", [2**31, 2**29])]), "tensor 'big': data"),
    "unknown ggml type 4": (base_file(infos=[tinfo("a", [4], gtype=4)]), "tensor 'a': unknown ggml type 4"),
    "unknown ggml type 2^32-1": (base_file(infos=[tinfo("a", [4], gtype=2**32 - 1)]), "unknown ggml type 4294967295"),
    "ne[0] not a block multiple": (base_file(infos=[tinfo("q", [33], gtype=QT.Q8_0)]),
                                   "tensor 'q': ne[0] = 33 is not a multiple of the Q8_0 block size 32"),
    "misaligned offset": (base_file(infos=[tinfo("a", [4], offset=8)]),
                          "tensor 'a': data offset 8 is not a multiple of the alignment 32"),
    "offset wraps 2^64": (base_file(infos=[tinfo("a", [4], offset=_WRAP), B_INFO]),
                          f"tensor 'a': data [{2**64 + 32}, {2**64 + 48}) (16 bytes at data offset {_WRAP})"),
    "offset past EOF": (base_file(infos=[A_INFO, tinfo("b", [8, 2], offset=4096)]), "tensor 'b': data ["),
    "range one byte past EOF": (base_file(data=DATA[:-1]), "tensor 'b': data ["),
    "data section missing": (base_file(data=b""), "extends past the end of the file"),
    "overlapping tensors": (base_file(infos=[A_INFO, tinfo("b", [8, 2], offset=0)]), "tensors 'a' ["),
    "contained tensor": (base_file(infos=[tinfo("b", [8, 2], offset=32), tinfo("a", [4], offset=64)]),
                         "tensors 'b' [" ),
    "duplicate tensor name": (base_file(infos=[A_INFO, tinfo("a", [8, 2], offset=32)]),
                              "duplicate tensor name 'a' (tensor infos #0 and #1)"),
    "empty tensor name": (base_file(infos=[tinfo("", [4])]), "tensor info #0 at offset"),
    "non-UTF-8 tensor name": (base_file(infos=[A_INFO, tinfo(b"\xfe\xff", [8, 2], offset=32)]),
                              "tensor info #1 at offset"),
    "tensor name 2^40 bytes": (base_file(infos=[gstr("a", length=2**40)]), "tensor info #0 at offset"),
    # truncated at byte positions in every section
    "cut in header": (_BASE[:10], "truncated: tensor_count"),
    "cut in key length": (_BASE[:27], "kv_count 2 cannot fit"),
    "cut in key": (_BASE[:40], "kv_count 2 cannot fit"),
    "cut in first tensor info": (_BASE[:100], "tensor_count 2 cannot fit"),
    "cut in string value": (_ROOMY[:200], "truncated: key 'general.architecture': string length 400 runs past"),
    "cut in second key length": (_ROOMY[:_R_KEY1 + 5], f"truncated: key #1 at offset {_R_KEY1} (length)"),
    "cut before value type": (_ROOMY[:_R_KEY1 + 9], "truncated: key 'n' (value type)"),
    "cut in value": (_ROOMY[:_R_KEY1 + 15], "truncated: key 'n' needs 4 bytes"),
    "cut in tensor name": (_ROOMY[:_R_INFO + 8], f"truncated: tensor info #0 at offset {_R_INFO} name"),
    "cut in n_dims": (_ROOMY[:_R_INFO + 10], "truncated: tensor 'a' n_dims"),
    "cut in dims": (_ROOMY[:_R_INFO + 16], "truncated: tensor 'a' dimensions"),
    "cut in ggml type": (_ROOMY[:_R_INFO + 23], "truncated: tensor 'a' ggml type"),
    "cut in offset": (_ROOMY[:_R_HEADER_END - 2], "truncated: tensor 'b' offset"),
    "cut at header end": (_ROOMY[:_R_HEADER_END], "tensor 'a': data"),
    "cut in data": (_ROOMY[:-30], "tensor 'b': data"),
    "empty file": (b"", "empty file (0 bytes)"),
}


def test_corpus_is_large_and_distinct():
    assert len(HOSTILE) >= 40
    assert len({data for data, _ in HOSTILE.values()}) == len(HOSTILE)


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_file_is_refused(tmp_path, case):
    data, expected = HOSTILE[case]
    path = tmp_path / "hostile.gguf"
    path.write_bytes(data)
    with pytest.raises(Lfm2npError) as err:
        with GgufFile(path) as f:  # refused when opened, or at the latest when a tensor is read
            for name in f.tensors:
                f.data(name)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and expected in message, message


def test_hostile_corpus_in_a_limited_subprocess(tmp_path):
    """The whole corpus again, under a 1 GiB address-space limit and a time limit: no hang, no crash."""
    for i, (data, _) in enumerate(HOSTILE.values()):
        (tmp_path / f"{i:03d}.gguf").write_bytes(data)
    outcomes = run_limited(tmp_path)
    assert set(outcomes.values()) == {"refused"}, outcomes


def test_directory_and_missing_file(tmp_path):
    with pytest.raises(Lfm2npError, match=re.escape(f"{tmp_path}: is a directory")):
        GgufFile(tmp_path)
    with pytest.raises(Lfm2npError, match=re.escape(f"{tmp_path / 'absent.gguf'}: no such file")):
        GgufFile(tmp_path / "absent.gguf")


def test_not_a_regular_file():
    if not os.path.exists("/dev/null"):
        pytest.skip("no /dev/null")
    with pytest.raises(Lfm2npError, match="not a regular file"):
        GgufFile("/dev/null")


def test_every_truncation_is_refused(tmp_path, valid_path):
    """Cut the GGUFWriter file at every byte before its last tensor ends: each cut is refused."""
    data = valid_path.read_bytes()
    with GgufFile(valid_path) as f:
        end = max(t.offset + t.nbytes for t in f.tensors.values())
    path = tmp_path / "cut.gguf"
    for n in range(end):
        path.write_bytes(data[:n])
        with pytest.raises(Lfm2npError, match=re.escape(str(path))):
            GgufFile(path).close()


TRUNCATE_AFTER_OPEN = textwrap.dedent("""
    import os, sys
    from lfm2np.errors import Lfm2npError
    from lfm2np.io.gguf_file import GgufFile
    path = sys.argv[1]
    f = GgufFile(path)
    keep = f.tensors["a"]
    assert f.data("a").tolist() == [0.0, 1.0, 2.0, 3.0]
    os.truncate(path, keep.offset + keep.nbytes)  # the file shrinks under the open reader
    for read in (lambda: f.data("b"), lambda: f.dequantize("b"), lambda: f.dequantize("b", rows=[1])):
        try:
            read()
        except Lfm2npError as e:
            print("refused:", e)
        else:
            print("READ A TENSOR PAST THE END")
""")


def test_file_truncated_after_opening(tmp_path):
    """Reading a tensor of a file that changed since it was opened (here: the tensor is no longer there) is an
    Lfm2npError naming the file and the tensor (a memory map would SIGBUS here)."""
    path = tmp_path / "shrinks.gguf"
    path.write_bytes(_BASE)
    proc = subprocess.run([sys.executable, "-c", TRUNCATE_AFTER_OPEN, str(path)], capture_output=True, text=True,
                          timeout=60, env=subprocess_env())
    assert proc.returncode == 0, (proc.returncode, proc.stderr)
    lines = proc.stdout.splitlines()
    assert len(lines) == 3 and all(line.startswith(f"refused: {path}: tensor 'b'") for line in lines), lines
    assert all("the file changed since it was loaded" in line for line in lines), lines


# ------------------------------------------------------------------------------------ limited subprocess
#: Opens every file in a directory and reads every tensor, under an address-space limit and a per-file
#: time limit; prints {file: "ok" | "refused" | "timeout" | "crash: ..."} as JSON.
WORKER = textwrap.dedent("""
    import json, os, resource, signal, sys
    import numpy as np
    import gguf, gguf.quants
    from lfm2np.errors import Lfm2npError
    from lfm2np.io.gguf_file import GgufFile

    limit = int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    class Timeout(BaseException):
        pass

    def alarm(signum, frame):
        raise Timeout()

    signal.signal(signal.SIGALRM, alarm)
    folder, outcomes = sys.argv[1], {}
    for name in sorted(os.listdir(folder)):
        signal.setitimer(signal.ITIMER_REAL, float(sys.argv[3]))
        try:
            with GgufFile(os.path.join(folder, name)) as f:
                for tensor in f.tensors:
                    f.data(tensor)
                    f.dequantize(tensor)
                    f.dequantize(tensor, rows=[0])
            outcomes[name] = "ok"
        except Lfm2npError:
            outcomes[name] = "refused"
        except Timeout:
            outcomes[name] = "timeout"
        except BaseException as e:
            outcomes[name] = f"crash: {type(e).__name__}: {e}"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    print(json.dumps(outcomes))
""")
ADDRESS_SPACE = 1 << 30
PER_FILE_SECONDS = 5.0



def run_limited(folder: Path) -> dict[str, str]:
    """Run WORKER on ``folder``: a hang, a runaway allocation or a crash fails the calling test."""
    n = len(os.listdir(folder))
    proc = subprocess.run([sys.executable, "-c", WORKER, str(folder), str(ADDRESS_SPACE), str(PER_FILE_SECONDS)],
                          capture_output=True, text=True, timeout=30 + PER_FILE_SECONDS * n, env=subprocess_env())
    assert proc.returncode == 0, f"worker died with status {proc.returncode}: {proc.stderr[-2000:]}"
    return json.loads(proc.stdout)


# ------------------------------------------------------------------------------------ the fuzzer
@pytest.fixture(scope="module")
def fuzz_seed(tmp_path_factory) -> bytes:
    """A small valid file whose header outweighs its data, so mutations land mostly in the header."""
    rng = np.random.default_rng(1)
    path = tmp_path_factory.mktemp("seed") / "seed.gguf"
    w = gguf.GGUFWriter(str(path), "lfm2")
    w.add_uint32("lfm2.block_count", 2)
    w.add_float32("lfm2.rope.freq_base", 1e6)
    w.add_bool("t.flag", True)
    w.add_array("tokenizer.ggml.tokens", ["<s>", "a", "ç"])
    w.add_array("t.ints", [1, 2])
    w.add_tensor("f32", rng.standard_normal((2, 4)).astype(np.float32))
    w.add_tensor("f16", rng.standard_normal(8).astype(np.float16))
    w.add_tensor("q8", gguf.quants.quantize(rng.standard_normal((2, 32)).astype(np.float32), QT.Q8_0),
                 raw_dtype=QT.Q8_0)
    w.add_tensor("q4", gguf.quants.quantize(rng.standard_normal((1, 32)).astype(np.float32), QT.Q4_0),
                 raw_dtype=QT.Q4_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


INTERESTING_U64 = [0, 1, 2, 3, 4, 5, 7, 8, 9, 12, 13, 31, 32, 33, 255, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63,
                   2**64 - 32, 2**64 - 1]


def mutation():
    position = st.integers(0, 2047)  # taken modulo the (current) file length
    return st.one_of(
        st.tuples(st.just("flip"), position, st.integers(0, 7)),
        st.tuples(st.just("ff"), position, st.integers(1, 8)),
        st.tuples(st.just("set"), position, st.binary(min_size=1, max_size=8)),
        st.tuples(st.just("u64"), position, st.sampled_from(INTERESTING_U64) | st.integers(0, 2**64 - 1)),
        st.tuples(st.just("u32"), position, st.sampled_from([0, 1, 5, 9, 13, 2**31, 2**32 - 1])),
        st.tuples(st.just("insert"), position, st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("delete"), position, st.integers(1, 16)),
        st.tuples(st.just("truncate"), position, st.just(0)),
    )


def mutate(data: bytes, ops) -> bytes:
    b = bytearray(data)
    for op, pos, arg in ops:
        pos = pos % (len(b) + 1)
        if op == "flip" and pos < len(b):
            b[pos] ^= 1 << arg
        elif op == "ff":
            b[pos:pos + arg] = b"\xff" * len(b[pos:pos + arg])
        elif op == "set":
            b[pos:pos + len(arg)] = arg
        elif op == "u64":
            b[pos:pos + 8] = u64(arg)
        elif op == "u32":
            b[pos:pos + 4] = u32(arg)
        elif op == "insert":
            b[pos:pos] = arg
        elif op == "delete":
            del b[pos:pos + arg]
        elif op == "truncate":
            del b[pos:]
    return bytes(b)


FUZZ_BATCH = 100


@settings(deadline=None, max_examples=15, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(batch=st.lists(st.lists(mutation(), min_size=1, max_size=4), min_size=FUZZ_BATCH, max_size=FUZZ_BATCH))
def test_fuzzed_files_are_read_or_refused(tmp_path_factory, fuzz_seed, batch):
    """Mutated files (bit flips, 0xFF runs, huge counts, inserts, deletes, truncations) are read or refused."""
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "seed.gguf").write_bytes(fuzz_seed)
    for i, ops in enumerate(batch):
        (folder / f"{i:03d}.gguf").write_bytes(mutate(fuzz_seed, ops))
    outcomes = run_limited(folder)
    assert outcomes.pop("seed.gguf") == "ok"
    bad = {name: outcome for name, outcome in outcomes.items() if outcome not in ("ok", "refused")}
    assert not bad, {name: (outcome, batch[int(name[:3])]) for name, outcome in bad.items()}
