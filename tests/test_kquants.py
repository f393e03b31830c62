"""lfm2np.io.kquants against the gguf package's dequantisation (llama.cpp's reference in Python): the same
float32 bits for every block, including blocks whose f16 scales are inf or NaN."""

from __future__ import annotations

import gguf  # a test extra (pyproject's dev)
import numpy as np
import pytest

from lfm2np.io import kquants

F16_SCALES = {"Q4_K": (0, 2), "Q6_K": (208,)}  # byte offsets of the f16 fields of a block


def _blocks(kind: str, n: int, seed: int, finite: bool) -> np.ndarray:
    block_bytes, _ = kquants.DEQUANTIZERS[kind]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (n, block_bytes), dtype=np.uint8)  # every bit pattern of scales and values
    if finite:  # scales of a real file: finite f16 of order 1e-3
        for at in F16_SCALES[kind]:
            d = (1e-3 * rng.standard_normal((n, 1))).astype(np.float16)
            raw[:, at:at + 2] = np.ascontiguousarray(d).view(np.uint8)
    return raw


def _reference(raw: np.ndarray, kind: str) -> np.ndarray:
    with np.errstate(invalid="ignore", over="ignore"):
        return np.asarray(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[kind]), np.float32).reshape(-1)


@pytest.mark.parametrize("kind", sorted(kquants.DEQUANTIZERS))
@pytest.mark.parametrize("finite", [True, False], ids=["finite-scales", "any-bits"])
@pytest.mark.parametrize("n, per_pass", [(1, 1024), (7, 3), (300, 64), (2048, 1024)])
def test_bit_identical_to_gguf_py(kind, finite, n, per_pass, monkeypatch):
    monkeypatch.setattr(kquants, "BLOCKS_PER_PASS", per_pass)  # passes that end mid-tensor
    raw = _blocks(kind, n, seed=n, finite=finite)
    got, want = kquants.dequantize(raw, kind), _reference(raw, kind)
    assert got.dtype == np.float32 and got.shape == (n * kquants.QK_K,)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("kind", sorted(kquants.DEQUANTIZERS))
def test_rows_of_blocks_in_any_byte_shape(kind):
    # GgufFile hands the bytes shaped (rows, bytes per row): the values come out flat, in file order
    raw = _blocks(kind, 12, seed=3, finite=True)
    block_bytes, _ = kquants.DEQUANTIZERS[kind]
    as_rows = raw.reshape(3, 4 * block_bytes)
    np.testing.assert_array_equal(kquants.dequantize(as_rows, kind), _reference(raw, kind))
    np.testing.assert_array_equal(kquants.dequantize(as_rows[1:], kind),
                                  _reference(raw[4:], kind))  # a non-first run of rows
