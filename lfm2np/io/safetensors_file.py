"""One safetensors file: its header validated, its tensor bytes read with positioned reads (no memory map).

The format is an 8-byte little-endian header length, a UTF-8 JSON header and raw little-endian data. What
the header must be (each failure is an :class:`~lfm2np.errors.Lfm2npError` naming the file and the
culprit):

- a length of at most 100 MB (the safetensors library's limit) inside the file;
- valid UTF-8 JSON, no key repeated in one object (``json`` would keep the last one silently), nesting
  the parser can follow (deeper is an error, not a RecursionError);
- an object whose ``__metadata__``, if present, maps strings to strings, and whose other entries each give
  a ``dtype`` string the reader accepts (weights: ``F64 F32 F16 BF16``), a ``shape`` list of at most 32
  non-negative integers that NumPy can make an array of (:func:`array_fits`: even with an axis of 0, the
  other axes times the widest item a tensor is read as must stay below 2^63) and ``data_offsets``
  ``[begin, end]`` integers (not floats, not bools);
- byte ranges that match the shapes exactly and tile the data section: no overlap, no gap, nothing after
  the last tensor (as the safetensors library requires). Sizes are Python integers: nothing overflows, and
  every tensor lies inside the file, so what a header claims never allocates more than the file holds.

Tensor bytes are read through :class:`lfm2np.io.files.CheckedFile` (positioned reads, never a memory map; a
file that changed since its header was checked is an error; read-ahead; one read per run of consecutive rows).
A conversion (bf16 widening) goes through a small buffer, chunk by chunk, so no full-size copy of the stored
bytes is ever made. A tensor costs its size in memory when read, as a widened or converted one did anyway.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import Lfm2npError
from ..numerics import bfloat16_to_float32
from .files import CheckedFile, no_duplicate_keys, parse_json, row_runs

__all__ = ["FLOAT_DTYPES", "MAX_HEADER", "STORAGE", "SafetensorsFile", "TensorInfo", "array_fits",
           "no_duplicate_keys", "parse_json", "widen"]

#: Every safetensors dtype code NumPy can hold, and its storage dtype (bf16 is stored as raw uint16).
STORAGE = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("u1"),  # read as bytes, checked to be 0 or 1, then viewed as bool
}
#: The dtypes of weights (and the default of :class:`SafetensorsFile`).
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
MAX_HEADER = 100_000_000  #: the safetensors library's limit on the JSON header (and lfm2np's on an index)
MAX_DIMS = 32  #: more dimensions than any tensor needs (numpy's own limit is 32 or 64)
MAX_ITEMSIZE = 8  #: the widest item a stored tensor is read as (float64, int64)
_CHUNK = 1 << 18  # bytes of stored data converted at a time (a buffer that stays in the CPU's cache)


# ------------------------------------------------------------------------- the file
@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, safetensors dtype code, shape and byte range in the data section."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


class SafetensorsFile:
    """One safetensors file, open, with a validated header; tensor bytes are read on demand (pread)."""

    def __init__(self, path: "str | os.PathLike[str]", dtypes: "tuple[str, ...]" = FLOAT_DTYPES):
        self.path = Path(path)
        self.dtypes = dtypes
        self._file = CheckedFile(self.path, "safetensors file")
        self.size = self._file.size
        if self.size < 8:
            raise Lfm2npError(f"{self.path}: {self.size} bytes, too short for a safetensors file (truncated?)")
        n = int.from_bytes(self._file.read_bytes(0, 8, "the header length"), "little")
        if n > MAX_HEADER:
            raise Lfm2npError(f"{self.path}: header length {n} exceeds the safetensors limit of {MAX_HEADER} "
                              f"bytes: not a safetensors file?")
        if n > self.size - 8:
            raise Lfm2npError(f"{self.path}: header length {n} exceeds the file ({self.size} bytes): "
                              f"truncated or not safetensors")
        header = parse_json(self._file.read_bytes(8, n, "the header"), str(self.path), "safetensors header")
        if not isinstance(header, dict):
            raise Lfm2npError(f"{self.path}: corrupt safetensors header: a JSON {type(header).__name__}, "
                              f"expected an object")
        self.metadata = self._metadata(header.pop("__metadata__", {}))
        self.data_start = 8 + n
        self.tensors: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            dtype, shape, begin, end = self._entry(name, entry)
            nbytes = math.prod(shape) * STORAGE[dtype].itemsize  # Python ints: no overflow
            if not (0 <= begin <= end) or end - begin != nbytes:
                raise Lfm2npError(
                    f"{self.path}: tensor {name!r} byte range {begin}..{end} does not fit shape {list(shape)} {dtype}"
                )
            if end > self.size - self.data_start:
                raise Lfm2npError(
                    f"{self.path}: tensor {name!r} ends at byte {end} of the data but the file holds only "
                    f"{self.size - self.data_start}: the file is truncated"
                )
            if not array_fits(shape):  # what is left: a shape of no bytes, a 0 among huge dimensions
                raise Lfm2npError(f"{self.path}: tensor {name!r} has shape {list(shape)!s:.120}, beyond what an array "
                                  f"can hold (its non-zero dimensions times {MAX_ITEMSIZE} bytes reach 2^63, though it "
                                  f"holds no element)")
            self.tensors[name] = TensorInfo(self.path, dtype, shape, begin, end)
        self._check_layout(self.size - self.data_start)

    def _metadata(self, value: Any) -> dict[str, str]:
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise Lfm2npError(f"{self.path}: corrupt safetensors header: __metadata__ is {value!r:.80}; "
                              f"expected an object of strings")
        return value

    def _entry(self, name: str, entry: Any) -> tuple[str, tuple[int, ...], int, int]:
        """dtype, shape and byte range of one header entry, each checked for its type."""
        def bad(field: str, value: Any) -> Lfm2npError:
            return Lfm2npError(f"{self.path}: corrupt header entry for tensor {name!r}: {field} is {value!r:.80}")

        if not isinstance(entry, dict):
            raise bad("the entry", entry)
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str):
            raise bad("dtype", dtype)
        if dtype not in self.dtypes:
            raise Lfm2npError(f"{self.path}: tensor {name!r} has dtype {dtype!r:.40}; lfm2np reads "
                              f"{', '.join(self.dtypes)} here")
        is_int = lambda v: type(v) is int  # noqa: E731  (not bool, not float, not str)
        if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(is_int(d) and d >= 0 for d in shape):
            raise bad("shape", shape)
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(is_int(o) for o in offsets):
            raise bad("data_offsets", offsets)
        return dtype, tuple(shape), offsets[0], offsets[1]

    def _check_layout(self, data_size: int) -> None:
        """Tensors must tile the data section: no overlap, no gap, nothing after the last one (as the
        safetensors library requires)."""
        position = 0
        for name, info in sorted(self.tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
            if info.begin != position:
                what = "overlaps the previous tensor" if info.begin < position else f"leaves a gap at byte {position}"
                raise Lfm2npError(f"{self.path}: corrupt header: tensor {name!r} at byte {info.begin} {what}")
            position = info.end
        if position != data_size:
            raise Lfm2npError(f"{self.path}: corrupt file: {data_size - position} bytes after the last tensor "
                              f"(the data section ends at byte {position} of {data_size})")

    # ------------------------------------------------------------------ reading
    def close(self) -> None:
        self._file.close()

    def check_unchanged(self) -> None:
        """Raise unless the file is still the one whose header was checked (:class:`CheckedFile`)."""
        self._file.check_unchanged()

    def read(self, name: str, dtype: Any = None, rows: Any = None) -> np.ndarray:
        """Tensor ``name`` in ``dtype`` (None: as stored, bf16 as uint16) in a fresh array, or only ``rows`` of
        its first axis (any integer array: the result has shape ``(*rows.shape, *shape[1:])``), one read per
        run of consecutive rows. A conversion (bf16 widening: :func:`widen`) goes through a small buffer,
        chunk by chunk, so no full-size copy of the stored bytes is ever made."""
        info = self.tensors[name]
        storage = STORAGE[info.dtype]
        target = storage if dtype is None else np.dtype(dtype)
        self._file.check_unchanged(f"tensor {name!r}")
        row_shape, base, size = info.shape[1:], self.data_start + info.begin, storage.itemsize
        if rows is None:
            index, shape = None, info.shape
            runs = [(base, math.prod(info.shape) * size, f"tensor {name!r}")]
        else:
            index = self._row_index(info, name, rows)
            wanted, inverse = np.unique(index.reshape(-1), return_inverse=True)
            shape = (wanted.size, *row_shape)
            runs = row_runs(wanted, math.prod(row_shape) * size, base, f"tensor {name!r}")
        out = np.empty(shape, target)
        for offset, nbytes, _ in runs:  # the kernel fetches the whole range while the first chunks convert
            self._file.will_need(offset, nbytes)
        self._fill(out.reshape(-1), runs, info)
        if info.dtype == "BOOL" and dtype is None:
            out = self._bool(out, name)
        return out if index is None else out[inverse.reshape(-1)].reshape((*index.shape, *row_shape))

    def prefetch(self, name: str) -> None:
        """Ask the kernel to read tensor ``name`` into the page cache now, in the background (a hint only:
        nothing is read into this process)."""
        info = self.tensors[name]
        self._file.will_need(self.data_start + info.begin, info.end - info.begin)

    def raw(self, name: str, rows: Any = None) -> np.ndarray:
        """Tensor ``name`` (or its ``rows``) as stored: :meth:`read` with ``dtype=None``."""
        return self.read(name, None, rows)

    def _fill(self, flat: np.ndarray, runs: list[tuple[int, int, str]], info: TensorInfo) -> None:
        """Fill ``flat`` with the byte runs ``(offset, nbytes, what)`` of a tensor, in order, converting the
        stored values to ``flat``'s dtype a cache-sized chunk at a time."""
        storage = STORAGE[info.dtype]
        if not flat.size:
            return
        if flat.dtype == storage:  # no conversion: straight into the result
            self._file.read_runs(flat, runs)
            return
        size, pos = storage.itemsize, 0
        scratch = np.empty(min(_CHUNK // size, max(n for _, n, _ in runs) // size), storage)
        for offset, nbytes, what in runs:
            count = nbytes // size
            for done in range(0, count, scratch.size):
                k = min(scratch.size, count - done)
                self._file.read_into(memoryview(scratch[:k].view(np.uint8)), offset + done * size, what)
                flat[pos + done:pos + done + k] = widen(scratch[:k], info.dtype, flat.dtype)
            pos += count

    def _bool(self, raw: np.ndarray, name: str) -> np.ndarray:
        bad = np.flatnonzero(raw.reshape(-1) > 1)
        if bad.size:
            raise Lfm2npError(f"{self.path}: tensor {name!r} is BOOL but element {int(bad[0])} is byte "
                              f"{int(raw.reshape(-1)[bad[0]])}, expected 0 or 1")
        return raw.view(np.bool_)

    def _row_index(self, info: TensorInfo, name: str, rows: Any) -> np.ndarray:
        """``rows`` as non-negative int64 indices into the first axis (negatives count from the end)."""
        index = np.asarray(rows)
        if not info.shape:
            raise Lfm2npError(f"{self.path}: tensor {name!r} is a scalar; it has no rows")
        if index.dtype == bool or not (np.issubdtype(index.dtype, np.integer) or index.size == 0):
            raise Lfm2npError(f"{self.path}: tensor {name!r}: row indices must be integers, got {index.dtype}")
        index = index.astype(np.int64)
        n = info.shape[0]
        bad = index[(index < -n) | (index >= n)]
        if bad.size:
            raise Lfm2npError(f"{self.path}: tensor {name!r}: row {int(bad[0])} is out of range for its first axis "
                              f"of length {n}")
        return np.where(index < 0, index + n, index)


def array_fits(shape: "list[int] | tuple[int, ...]", itemsize: int = MAX_ITEMSIZE) -> bool:
    """Whether NumPy can make an array of ``shape`` (non-negative integers) with items of ``itemsize`` bytes:
    at most :data:`MAX_DIMS` axes and ``prod(d for d in shape if d) * itemsize < 2**63``. NumPy checks that product
    even when an axis is 0 (``np.empty((0, 2**62))`` raises "array is too big"), so a header can claim a tensor
    of no bytes that still cannot be made."""
    return len(shape) <= MAX_DIMS and math.prod(d for d in shape if d) * itemsize < 2**63


def widen(raw: np.ndarray, stored: str, dtype: np.dtype) -> np.ndarray:
    """A stored tensor converted to the compute dtype. bf16 -> f32 is exact: the 16 bits become the high
    half of a float32. Returns ``raw`` itself when the stored dtype already is the compute dtype."""
    if stored == "BF16":
        return bfloat16_to_float32(raw).astype(dtype, copy=False)
    return raw.astype(dtype, copy=False)
