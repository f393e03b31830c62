"""lfm2np.io.kquants against the gguf package's dequantisation (llama.cpp's reference in Python): the same
float32 bits for every block, including blocks whose f16 scales are inf or NaN, whatever the chunks, pieces
and threads the work is cut into."""

from __future__ import annotations

import gguf  # a test extra (pyproject's dev)
import numpy as np
import pytest

from lfm2np import passes
from lfm2np.io import kquants

F16_SCALES = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "Q8_0": (0,), "Q4_0": (0,)}  # f16 fields of a block
TYPES = sorted(kquants.DEQUANTIZERS)


def _blocks(kind: str, n: int, seed: int, finite: bool) -> np.ndarray:
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (n, kquants.DEQUANTIZERS[kind].nbytes), dtype=np.uint8)  # every bit pattern
    if finite:  # scales of a real file: finite f16 of order 1e-3
        for at in F16_SCALES[kind]:
            d = (1e-3 * rng.standard_normal((n, 1))).astype(np.float16)
            raw[:, at:at + 2] = np.ascontiguousarray(d).view(np.uint8)
    return raw


def _reference(raw: np.ndarray, kind: str) -> np.ndarray:
    with np.errstate(invalid="ignore", over="ignore"):
        return np.asarray(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[kind]), np.float32).reshape(-1)


def _same_bits(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize("finite", [True, False], ids=["finite-scales", "any-bits"])
@pytest.mark.parametrize("n, piece", [(1, 1 << 19), (7, 96), (300, 4096), (2048, 1 << 19)])
def test_bit_identical_to_gguf_py(kind, finite, n, piece, monkeypatch):
    monkeypatch.setattr(kquants, "PIECE_VALUES", piece)  # pieces that end mid-tensor
    raw = _blocks(kind, n, seed=n, finite=finite)
    _same_bits(kquants.dequantize(raw, kind), _reference(raw, kind))


@pytest.mark.parametrize("kind", TYPES)
def test_every_byte_value_in_every_position(kind):
    # block i holds byte value (i + position) % 256 at every position: each position sees all 256 values
    nbytes = kquants.DEQUANTIZERS[kind].nbytes
    raw = ((np.arange(256)[:, None] + np.arange(nbytes)[None, :]) % 256).astype(np.uint8)
    _same_bits(kquants.dequantize(raw, kind), _reference(raw, kind))


@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_threads_and_out_buffer(kind, threads, monkeypatch):
    # shared among threads (pieces that are not a multiple of a chunk), straight into a given buffer
    monkeypatch.setattr(passes, "THREADS", threads)
    monkeypatch.setattr(passes, "PARALLEL_MIN", 1)
    monkeypatch.setattr(kquants, "PIECE_VALUES", 5 * kquants.DEQUANTIZERS[kind].nvalues)
    raw = _blocks(kind, 301, seed=threads, finite=True)
    out = np.full((301, kquants.DEQUANTIZERS[kind].nvalues), np.nan, np.float32)
    got = kquants.dequantize(raw, kind, out=out)
    assert np.shares_memory(got, out)
    _same_bits(out.reshape(-1), _reference(raw, kind))


@pytest.mark.parametrize("kind", TYPES)
def test_rows_of_blocks_in_any_byte_shape(kind):
    # GgufFile hands the bytes shaped (rows, bytes per row): the values come out flat, in file order
    raw = _blocks(kind, 12, seed=3, finite=True)
    nbytes = kquants.DEQUANTIZERS[kind].nbytes
    as_rows = raw.reshape(3, 4 * nbytes)
    np.testing.assert_array_equal(kquants.dequantize(as_rows, kind), _reference(raw, kind))
    np.testing.assert_array_equal(kquants.dequantize(as_rows[1:], kind), _reference(raw[4:], kind))


def test_a_wrong_out_buffer_is_refused():
    raw = _blocks("Q8_0", 2, seed=0, finite=True)
    for bad in (np.empty(63, np.float32), np.empty(64, np.float64), np.empty((64, 2), np.float32)[:, 0]):
        with pytest.raises(ValueError, match="C-contiguous float32 array of 64 values"):
            kquants.dequantize(raw, "Q8_0", out=bad)


def test_scratch_reused_across_sizes_and_types(monkeypatch):
    # each thread's scratch arrays outlive a call: a small piece after a large one and another type after
    # that must not see the earlier call's bytes
    monkeypatch.setattr(passes, "THREADS", 1)
    for kind, n in [("Q6_K", 700), ("Q4_K", 3), ("Q5_K", 900), ("Q4_0", 5), ("Q8_0", 4000), ("Q4_K", 700)]:
        raw = _blocks(kind, n, seed=n, finite=True)
        _same_bits(kquants.dequantize(raw, kind), _reference(raw, kind))
