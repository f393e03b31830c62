"""Dequantisation of the GGUF block types llama.cpp's quantised files are made of, at memory speed, in NumPy:
Q4_K, Q5_K, Q6_K (the k-quants: blocks of 256 values), Q8_0 and Q4_0 (blocks of 32).

The values are bit-identical to the ``gguf`` package's (llama.cpp's own reference in Python), which
:mod:`lfm2np.io.gguf_file` uses for every other type: the same float32 operations in the same order, on
every bit pattern (inf and NaN scales included). What differs is how the work is laid out:

- the per-block part (f16 scales widened, 6-bit scales unpacked, ``d * scale``) runs once over a whole
  run of blocks, so every array is long;
- the per-value part runs over a piece of blocks at a time (:data:`PIECE_VALUES`): the bits are
  unpacked with byte operations over the whole piece, and the runs of bytes that belong to one sub-block are
  moved into place as single items (a ``void`` dtype of the run's width), never one small axis at a time;
  one cast to float32 and the scale's one or two operations then write the values straight into the
  output. The scratch arrays (unpacked bytes, scales spread along their runs) are each thread's own and
  made once, not once per piece;
- a tensor's blocks are shared among the threads of :func:`lfm2np.passes.in_parallel` (NumPy releases
  the interpreter lock inside its loops), a few pieces per thread, so a large tensor is dequantised on
  every core.

Block layouts (llama.cpp ``ggml-common.h``; sub-block ``s`` of a k-quant is values ``32s .. 32s+31``):

- Q4_K, 144 bytes: ``d``, ``dmin`` (f16), 12 bytes of eight 6-bit scales and mins, 128 bytes of 4-bit values;
  sub-block ``2j`` is the low nibbles of bytes ``32j .. 32j+31``, ``2j+1`` their high nibbles;
  value = ``(d * scale) * q - (dmin * min)``.
- Q5_K, 176 bytes: as Q4_K, with 32 bytes ``qh`` before the nibbles: bit ``s`` of ``qh[i]`` is the fifth
  bit of value ``i`` of sub-block ``s``.
- Q6_K, 210 bytes: 128 bytes of low 4 bits, 64 of high 2 bits, sixteen int8 scales (one per 16 values),
  ``d`` (f16); value = ``(d * scale) * (q - 32)``. In each half of 128 values, value ``r`` has its low bits
  in byte ``r % 64`` of the half's 64 (the high nibble for ``r >= 64``) and its high bits at shift
  ``2 * (r // 32)`` of byte ``r % 32`` of the half's 32.
- Q8_0, 34 bytes: ``d`` (f16), 32 int8; value = ``q * d``.
- Q4_0, 18 bytes: ``d`` (f16), 16 bytes: values 0-15 their low nibbles, 16-31 their high ones;
  value = ``d * (q - 8)``.
"""

from __future__ import annotations

import threading
from typing import Callable, NamedTuple

import numpy as np

from ..passes import in_parallel

QK_K = 256
#: values per run of blocks decoded at once, in long passes (fewer, longer NumPy calls beat cache-sized ones:
#: measured on Q4_K, 2^19 values ran 1.3x faster than 2^16)
PIECE_VALUES = 1 << 19
#: pieces per thread: threads claim them as they free up (see :func:`lfm2np.passes.in_parallel`)
PIECES_PER_THREAD = 4


class BlockType(NamedTuple):
    """A block type: bytes and values per block, and ``decode(blocks, out)`` writing the values of
    ``blocks`` (uint8, one block per row) into ``out`` (float32, one block's values per row)."""

    nbytes: int
    nvalues: int
    decode: Callable[[np.ndarray, np.ndarray], None]


def _runs(width: int) -> np.dtype:
    """A ``width``-byte item: a run of bytes moved as one element."""
    return np.dtype((np.void, width))


_scratch = threading.local()


def _buffer(key: str, shape: "tuple[int, ...]", dtype: "type[np.generic]") -> np.ndarray:
    """This thread's reusable buffer ``key`` viewed as ``shape``: the per-chunk arrays are made once per
    thread, not once per chunk (a fresh allocation of a chunk's size costs its page faults each time once the
    allocator has given the memory back, and threads allocating at once contend in the kernel)."""
    size = int(np.prod(shape))
    buf = getattr(_scratch, key, None)
    if buf is None or buf.size < size or buf.dtype != dtype:
        buf = np.empty(max(size, 1 << 16), dtype)
        setattr(_scratch, key, buf)
    return buf[:size].reshape(shape)


def _place(parts: "list[np.ndarray]", out: np.ndarray, width: int) -> None:
    """``out`` (m, k, len(parts), width) bytes gets part ``p`` (m, k*width bytes, contiguous) at ``[:, :, p]``:
    each ``width``-byte run moved as one item."""
    m = out.shape[0]
    slots = out.reshape(m, -1).view(_runs(width)).reshape(m, -1, len(parts))
    for p, part in enumerate(parts):
        slots[:, :, p] = part.view(_runs(width)).reshape(m, -1)


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The f16 at byte ``at`` of each block, widened: (n,) float32."""
    return np.ascontiguousarray(blocks[:, at:at + 2]).view(np.float16).reshape(-1).astype(np.float32)


def _nibbles(packed: np.ndarray, out: np.ndarray, width: int) -> None:
    """``out`` (m, k, 2, width) gets the low nibbles of each ``width``-byte run of ``packed`` (m, k*width), then
    their high nibbles."""
    low = np.bitwise_and(packed, 0x0F, out=_buffer("low", packed.shape, np.uint8))  # contiguous (m, k*width)
    high = np.right_shift(packed, 4, out=_buffer("high", packed.shape, np.uint8))
    _place([low, high], out, width)


def _scale_min(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: the eight ``d * scale`` and ``dmin * min`` of each block, (n, 8) float32 each. The 12
    bytes hold scales and mins 0-3 in the low 6 bits of bytes 0-3 and 4-7; 4-7 in the nibbles of bytes
    8-11 (scale low, min high) with their top 2 bits in the top 2 bits of bytes 0-3 and 4-7. Worked on
    four bytes at a time (uint32 words)."""
    n = blocks.shape[0]
    head = np.ascontiguousarray(blocks[:, :16])  # (n, 16): d, dmin, the 12 bytes
    d = head[:, :4].view(np.float16).astype(np.float32)  # (n, 2): d, dmin
    words = head[:, 4:].view("<u4")  # (n, 3)
    low, mid, high = words[:, 0], words[:, 1], words[:, 2]
    sc, mn = np.empty((n, 2), "<u4"), np.empty((n, 2), "<u4")
    np.bitwise_and(low, 0x3F3F3F3F, out=sc[:, 0])
    sc[:, 1] = (high & 0x0F0F0F0F) | ((low >> 2) & 0x30303030)
    np.bitwise_and(mid, 0x3F3F3F3F, out=mn[:, 0])
    mn[:, 1] = ((high >> 4) & 0x0F0F0F0F) | ((mid >> 2) & 0x30303030)
    scale = d[:, 0:1] * sc.view(np.uint8).astype(np.float32)
    offset = d[:, 1:2] * mn.view(np.uint8).astype(np.float32)
    return scale, offset


def _q4_k(blocks: np.ndarray, out: np.ndarray) -> None:
    q = _buffer("q", (blocks.shape[0], 4, 2, 32), np.uint8)
    _nibbles(blocks[:, 16:], q, 32)
    _apply(q, out, *_scale_min(blocks))


def _q5_k(blocks: np.ndarray, out: np.ndarray) -> None:
    n = blocks.shape[0]
    q = _buffer("q", (n, 4, 2, 32), np.uint8)
    _nibbles(blocks[:, 48:], q, 32)
    high = _buffer("bits", (n, 1, 8, 32), np.uint8)  # sub-block s's fifth bits: bit s of each qh byte
    _high_bits(blocks[:, 16:48], high, 1)
    q |= high.reshape(q.shape)
    _apply(q, out, *_scale_min(blocks))


def _q6_k(blocks: np.ndarray, out: np.ndarray) -> None:
    n = blocks.shape[0]
    q = _buffer("q", (n, 2, 2, 64), np.uint8)  # per half: values 0-63 low nibbles, 64-127 high ones
    _nibbles(blocks[:, 0:128], q, 64)
    high = _buffer("bits", (n, 2, 4, 32), np.uint8)
    _high_bits(blocks[:, 128:192], high, 2)
    q |= high.reshape(q.shape)
    q -= 32  # wraps in uint8: read as int8 it is q - 32 (-32 .. 31)
    scales = np.ascontiguousarray(blocks[:, 192:208]).view(np.int8).astype(np.float32)  # (n, 16)
    _apply(q.view(np.int8), out, _f16(blocks, 208)[:, None] * scales)


def _q8_0(blocks: np.ndarray, out: np.ndarray) -> None:
    q = _buffer("q", (blocks.shape[0], 32), np.uint8)
    np.copyto(q, blocks[:, 2:34])
    _apply(q.view(np.int8), out, _f16(blocks, 0)[:, None])


def _q4_0(blocks: np.ndarray, out: np.ndarray) -> None:
    q = _buffer("q", (blocks.shape[0], 1, 2, 16), np.uint8)
    _nibbles(blocks[:, 2:18], q, 16)
    q -= 8  # as int8: q - 8
    _apply(q.view(np.int8), out, _f16(blocks, 0)[:, None])


def _apply(q: np.ndarray, out: np.ndarray, scale: np.ndarray, offset: np.ndarray | None = None) -> None:
    """``out = q * scale (- offset)``: ``q`` the blocks' integer values (n, ...), ``out`` (n, values) float32,
    ``scale`` (and ``offset``) (n, k) float32, one per run of ``values // k`` values. The cast, then one
    pass each over the whole piece, the scale spread along its runs first into a buffer (cheaper than
    broadcasting over short runs)."""
    n, values = out.shape
    k = scale.shape[1]
    out[...] = q.reshape(n, values)
    spread = _buffer("spread", (n * k, values // k), np.float32)
    np.copyto(spread, scale.reshape(-1, 1))
    out *= spread.reshape(n, values)
    if offset is not None:
        np.copyto(spread, offset.reshape(-1, 1))
        out -= spread.reshape(n, values)


def _high_bits(qh: np.ndarray, out: np.ndarray, bits: int) -> None:
    """The high bits of Q5_K (``bits`` 1) and Q6_K (2) values: ``out`` (n, k, 8 // bits, 32) gets, for each
    32-byte run ``k`` of ``qh`` (n, 32k), its field ``j`` (bits ``j*bits ..``) of every byte at ``[:, k, j]``,
    shifted to bit 4 (where it goes in the value). Eight bytes at a time (uint64 words)."""
    words = np.ascontiguousarray(qh).view(np.uint64)
    mask = np.uint64(int.from_bytes(bytes([(1 << bits) - 1] * 8), "little") << 4)
    fields = []
    for j in range(8 // bits):
        shift = 4 - bits * j  # field j moves from bit bits*j to bit 4
        f = np.left_shift(words, np.uint64(shift)) if shift >= 0 else np.right_shift(words, np.uint64(-shift))
        f &= mask
        fields.append(f.view(np.uint8))
    _place(fields, out, 32)


#: ggml type name -> its :class:`BlockType`
DEQUANTIZERS: dict[str, BlockType] = {
    "Q4_K": BlockType(144, QK_K, _q4_k),
    "Q5_K": BlockType(176, QK_K, _q5_k),
    "Q6_K": BlockType(210, QK_K, _q6_k),
    "Q8_0": BlockType(34, 32, _q8_0),
    "Q4_0": BlockType(18, 32, _q4_0),
}


def dequantize(data: np.ndarray, ggml_type: str, out: np.ndarray | None = None) -> np.ndarray:
    """The float32 values of the raw bytes ``data`` (any shape, whole blocks of ``ggml_type``, one of
    :data:`DEQUANTIZERS`), flat, in file order; written into ``out`` (a C-contiguous float32 array of as
    many values, any shape, returned flat) when given. Large inputs are shared among threads."""
    kind = DEQUANTIZERS[ggml_type]
    raw = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, kind.nbytes)
    n = raw.shape[0]
    if out is None:
        out = np.empty(n * kind.nvalues, np.float32)
    if out.dtype != np.float32 or out.size != n * kind.nvalues or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous float32 array of {n * kind.nvalues} values")
    values = out.reshape(n, kind.nvalues)

    step = max(1, PIECE_VALUES // kind.nvalues)

    def piece(lo: int, hi: int) -> None:
        for start in range(lo, hi, step):
            stop = min(start + step, hi)
            kind.decode(raw[start:stop], values[start:stop])

    with np.errstate(invalid="ignore", over="ignore"):  # a corrupt scale gives inf/NaN values, found later
        in_parallel(n, piece, size=n * kind.nvalues, per_thread=PIECES_PER_THREAD)
    return out.reshape(-1)
