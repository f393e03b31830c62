"""Fast dequantisation of the k-quants a Q4_K_M file is made of: Q4_K (most weights) and Q6_K (the
output/embedding and half of the ffn_down / attn_v tensors), in NumPy.

The values are bit-identical to the ``gguf`` package's (llama.cpp's own reference in Python), which
:mod:`lfm2np.io.gguf_file` uses for every other type: the same float32 operations in the same order, on
contiguous arrays a cache-sized run of blocks at a time instead of broadcasts over small axes. That makes
an expert's dequantisation, paid at every use when experts do not fit the memory budget, several times
cheaper (docs/gguf.md has the numbers).

Block layouts (llama.cpp ``ggml-common.h``; QK_K = 256 values per block):

- Q4_K, 144 bytes: ``d`` (f16), ``dmin`` (f16), 12 bytes of eight 6-bit scales and eight 6-bit mins,
  128 bytes of 4-bit values. Sub-block ``2j`` is the low nibbles of bytes ``32j .. 32j+31``, sub-block
  ``2j+1`` their high nibbles; value = ``(d * scale) * q - (dmin * min)``.
- Q6_K, 210 bytes: 128 bytes of low 4 bits, 64 bytes of high 2 bits, sixteen int8 scales, ``d`` (f16);
  value = ``(d * scale) * (q - 32)`` with ``q`` the 6-bit value.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

QK_K = 256
#: blocks per pass: the float32 output of a pass (1024 x 1 KiB) stays in a core's L2 cache
BLOCKS_PER_PASS = 1024


def _f16(column: np.ndarray) -> np.ndarray:
    """Two bytes per block (n, 2) read as one float16 each, widened: (n, 1) float32."""
    return np.ascontiguousarray(column).view(np.float16).astype(np.float32)


def _q4_k(blocks: np.ndarray, out: np.ndarray) -> None:
    n = blocks.shape[0]
    d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
    low, mid, high = blocks[:, 4:8], blocks[:, 8:12], blocks[:, 12:16]
    sc, mn = np.empty((n, 8), np.uint8), np.empty((n, 8), np.uint8)
    sc[:, :4] = low & 0x3F
    sc[:, 4:] = (high & 0x0F) | ((low >> 2) & 0x30)
    mn[:, :4] = mid & 0x3F
    mn[:, 4:] = (high >> 4) | ((mid >> 2) & 0x30)
    scale = d * sc.astype(np.float32)  # (n, 8)
    offset = dmin * mn.astype(np.float32)
    packed = blocks[:, 16:].reshape(n, 4, 32)
    q = np.empty((n, 4, 2, 32), np.uint8)
    np.bitwise_and(packed, 0x0F, out=q[:, :, 0])
    np.right_shift(packed, 4, out=q[:, :, 1])
    values = out.reshape(n, 8, 32)
    np.multiply(q.reshape(n, 8, 32), scale[:, :, None], out=values)  # q widened to float32 in the product
    values -= offset[:, :, None]


def _q6_k(blocks: np.ndarray, out: np.ndarray) -> None:
    n = blocks.shape[0]
    low = blocks[:, 0:128].reshape(n, 2, 64)
    high = blocks[:, 128:192].reshape(n, 2, 32)
    scales = np.ascontiguousarray(blocks[:, 192:208]).view(np.int8)
    d = _f16(blocks[:, 208:210])
    q = np.empty((n, 2, 2, 64), np.uint8)
    np.bitwise_and(low, 0x0F, out=q[:, :, 0])
    np.right_shift(low, 4, out=q[:, :, 1])
    h = np.empty((n, 2, 4, 32), np.uint8)
    for i in range(4):
        np.bitwise_and(high >> (2 * i), 0x03, out=h[:, :, i])
    h <<= 4
    q6 = q.reshape(n, 8, 32) | h.reshape(n, 8, 32)
    values = out.reshape(n, 16, 16)
    values[...] = q6.reshape(n, 16, 16)  # uint8 -> float32
    values -= 32.0  # exact: small integers
    values *= (d * scales.astype(np.float32))[:, :, None]  # (n, 16) scales


#: ggml type name -> (bytes per block, the function writing (n, bytes) uint8 blocks' values into (n, 256) float32)
DEQUANTIZERS: dict[str, tuple[int, Callable[[np.ndarray, np.ndarray], None]]] = {
    "Q4_K": (144, _q4_k),
    "Q6_K": (210, _q6_k),
}


def dequantize(data: np.ndarray, ggml_type: str) -> np.ndarray:
    """The float32 values of the raw bytes ``data`` (any shape, whole blocks of ``ggml_type``, one of
    :data:`DEQUANTIZERS`), flat, in file order."""
    block_bytes, blocks_to_values = DEQUANTIZERS[ggml_type]
    raw = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, block_bytes)
    out = np.empty((raw.shape[0], QK_K), np.float32)
    with np.errstate(invalid="ignore", over="ignore"):  # a corrupt scale gives inf/NaN values, found later
        for start in range(0, raw.shape[0], BLOCKS_PER_PASS):
            blocks_to_values(raw[start:start + BLOCKS_PER_PASS], out[start:start + BLOCKS_PER_PASS])
    return out.reshape(-1)
