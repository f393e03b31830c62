"""A GGUF file's tensors: read on demand, checked, and dequantised (the header is :mod:`lfm2np.io.gguf_header`).

Tensor bytes are read through :class:`lfm2np.io.files.CheckedFile`: positioned reads into a fresh buffer,
never a memory map (a file that shrinks under a map turns the next access into SIGBUS), and before each read
the file must still be the one whose header was checked (same inode, size, mtime and ctime), else an error
naming the file and the tensor. A tensor is copied into memory when asked for, so reading one costs its size
in RAM; :meth:`GgufFile.dequantize` with ``rows=`` reads only the rows asked for (one read per run of
consecutive rows), which keeps embedding lookups and single experts cheap. The header is read the same way,
in chunks of 1 MiB.

gguf-py (``pip install 'lfm2np[gguf]'``) is still needed, imported lazily: for its table of ggml types
(names, block sizes) and for ``gguf.quants.dequantize``.

Use
---
::

    with GgufFile("model.gguf") as f:          # or open_gguf(path); everything is checked here
        f.metadata["general.architecture"]     # "lfm2"; f.types[key] == "STRING"
        t = f.tensors["token_embd.weight"]     # TensorInfo: ne (ggml order), shape (numpy order), ...
        f.data(t.name)                         # stored values, laid out as gguf-py's GGUFReader does
        f.dequantize(t.name, rows=[1, 422])    # float32 (2, D), reading only those two rows

``data()`` gives F32/F16/F64/I8/I16/I32/I64 tensors as arrays of that dtype in numpy shape, and quantised
and BF16 tensors as uint8 of shape ``(*shape[:-1], shape[-1] // block_size * type_size)`` -- exactly what
``GGUFReader(...).tensors[i].data`` is, and what ``gguf.quants.dequantize(data, qtype)`` takes.
"""

from __future__ import annotations

import operator
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import Lfm2npError
from . import kquants
from .files import CheckedFile
from .gguf_header import VALUE_TYPE_NAMES, MetadataValue, TensorInfo, import_gguf, parse_header

__all__ = ["GgufFile", "INTEGER_TYPES", "TensorInfo", "open_gguf", "VALUE_TYPE_NAMES"]

#: ggml types whose ``data()`` is an array of elements (as gguf-py's GGUFReader gives); all others
#: (quantised types and BF16) are raw bytes, uint8 of shape ``(*shape[:-1], shape[-1] // block * type_size)``.
ELEMENT_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(code) for name, code in
    {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I8": "i1", "I16": "<i2", "I32": "<i4", "I64": "<i8"}.items()
}
#: ggml types of integers: :meth:`GgufFile.dequantize` converts them as numbers, but a weight stored so is refused
#: by the loader (:class:`lfm2np.io.gguf.GgufSource`): no converter writes one
INTEGER_TYPES = ("I8", "I16", "I32", "I64")



class GgufFile:
    """A GGUF file, its header parsed and checked (:func:`lfm2np.io.gguf_header.parse_header`); tensor bytes
    are read on demand.

    ``metadata`` maps each key to a Python value (int, float, bool, str or a list of one of those) and
    ``types`` to its GGUF type name (``"UINT32"``; ``("ARRAY", "STRING")`` for an array). ``tensors`` maps
    each tensor name, in file order, to its :class:`TensorInfo`. Use as a context manager, or ``close()``.
    """

    path: Path
    size: int  #: the file's size in bytes when it was opened
    version: int  #: 2 or 3
    metadata: dict[str, MetadataValue]
    types: dict[str, Any]  #: key -> ``"UINT32"`` ... or ``("ARRAY", element type name)``
    alignment: int  #: ``general.alignment`` or 32
    header_end: int  #: where the last tensor info ends
    data_start: int  #: ``header_end`` rounded up to ``alignment``: tensor offsets count from here
    tensors: dict[str, TensorInfo]

    def __init__(self, path: "str | os.PathLike[str]") -> None:
        self.path = Path(os.fspath(path))
        if not self.path.exists():
            raise Lfm2npError(f"{self.path}: no such file")
        if self.path.is_dir():
            raise Lfm2npError(f"{self.path}: is a directory, expected a GGUF file")
        self._file = CheckedFile(self.path, "GGUF file")
        try:
            self.size = self._file.size
            h = parse_header(self._file)
        except BaseException:
            self._file.close()
            raise
        self.version, self.metadata, self.types, self.alignment = h.version, h.metadata, h.types, h.alignment
        self.header_end, self.data_start, self.tensors = h.header_end, h.data_start, h.tensors

    # -------------------------------------------------------------------------------- lifetime
    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "GgufFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"GgufFile({str(self.path)!r}, version={self.version}, {len(self.metadata)} keys, "
                f"{len(self.tensors)} tensors)")

    # -------------------------------------------------------------------------------- tensors
    def info(self, name: str) -> TensorInfo:
        """The tensor info of ``name``, or an error naming it."""
        try:
            return self.tensors[name]
        except KeyError:
            raise Lfm2npError(f"{self.path}: no tensor named {name!r} ({len(self.tensors)} tensors in the file)") \
                from None

    def _read(self, offset: int, nbytes: int, what: str) -> np.ndarray:
        """``nbytes`` bytes at ``offset`` in a fresh, writable uint8 array (the file checked unchanged first)."""
        self._file.check_unchanged(what)
        out = np.empty(nbytes, dtype=np.uint8)
        self._file.read_into(memoryview(out), offset, what)
        return out

    def data(self, name: str) -> np.ndarray:
        """The tensor's stored values as a read-only array, laid out exactly as gguf-py's ``GGUFReader`` does.

        F32/F16/F64/I8/I16/I32/I64: an array of that dtype in numpy shape. Quantised types and BF16: uint8
        raw bytes of shape ``(*shape[:-1], shape[-1] // block_size * type_size)``, which is what
        ``gguf.quants.dequantize(data, qtype)`` expects.
        """
        t = self.info(name)
        out = _shaped(self._read(t.offset, t.nbytes, f"tensor {name!r}"), t, t.shape[0])
        out.flags.writeable = False
        return out

    def dequantize(self, name: str, rows: "int | slice | Sequence[int] | None" = None) -> np.ndarray:
        """The tensor as float32 in numpy shape; with ``rows``, only those indices of the outermost axis.

        ``rows`` may be a list of indices (``shape[0]`` becomes ``len(rows)``), a slice, or one int (that
        axis dropped). Only the selected rows are read from the file: one token's embedding, or one expert
        ``rows=[e]`` of a stacked ``(E, out, in)`` expert tensor.
        """
        t = self.info(name)
        if rows is None:
            raw = self._read(t.offset, t.nbytes, f"tensor {name!r}")
            return self._float32(_shaped(raw, t, t.shape[0]), t, t.shape)
        index = _row_indices(self.path, t, rows)
        if not index:
            return np.zeros((0, *t.shape[1:]), dtype=np.float32)
        if len(t.shape) == 1 and t.block_size > 1:  # a row is a fraction of a block: decode all, then pick
            values = self.dequantize(name)[index]
        else:
            values = self._float32(self._read_rows(t, index), t, (len(index), *t.shape[1:]))
        return values[0] if isinstance(rows, (int, np.integer)) else values

    def blocks(self, name: str, rows: "int | slice") -> np.ndarray:
        """Rows ``rows`` of the outermost axis of the tensor as stored (one expert of a stacked tensor, a slice of a
        fused one), laid out as :meth:`data` lays them out; only those rows are read."""
        t = self.info(name)
        index = _row_indices(self.path, t, rows if isinstance(rows, slice) else [rows])
        return self._read_rows(t, index)

    def prefetch(self, name: str, rows: "int | slice | None" = None) -> None:
        """Ask the kernel to read tensor ``name`` (or those ``rows`` of its outermost axis: one expert, one
        of q/k/v) into the page cache now, in the background (``posix_fadvise(WILLNEED)``); a later read
        finds it there. A hint only: nothing is read into this process, and nothing happens where the
        platform has no such call."""
        t = self.info(name)
        offset, nbytes = t.offset, t.nbytes
        if rows is not None and t.shape:
            index = _row_indices(self.path, t, rows if isinstance(rows, slice) else [rows])
            if not index:
                return
            row_bytes = t.nbytes // t.shape[0]
            offset, nbytes = t.offset + index[0] * row_bytes, (index[-1] - index[0] + 1) * row_bytes
        self._file.will_need(offset, nbytes)

    def _read_rows(self, t: TensorInfo, index: Sequence[int]) -> np.ndarray:
        """Rows ``index`` of the outermost numpy axis, their bytes read run by run of consecutive indices (the
        runs in the order of ``index``, which may repeat or go back)."""
        row_bytes = t.nbytes // t.shape[0]
        self._file.check_unchanged(f"tensor {t.name!r}")
        runs, start = [], 0
        while start < len(index):
            stop = start + 1
            while stop < len(index) and index[stop] == index[stop - 1] + 1:
                stop += 1
            runs.append((t.offset + index[start] * row_bytes, (stop - start) * row_bytes,
                         f"tensor {t.name!r} rows {index[start]}..{index[stop - 1]}"))
            start = stop
        out = np.empty(len(index) * row_bytes, dtype=np.uint8)
        self._file.read_runs(out, runs)
        return _shaped(out, t, len(index))

    def _float32(self, data: np.ndarray, t: TensorInfo, shape: tuple[int, ...]) -> np.ndarray:
        """Stored values (as :meth:`data` shapes them) -> float32 of ``shape``: Q4_K, Q5_K, Q6_K, Q8_0 and Q4_0
        by :mod:`lfm2np.io.kquants` (on every core), other quantised types through gguf-py."""
        if t.ggml_type == "F32":
            return data.reshape(shape)
        if t.ggml_type in ELEMENT_DTYPES:
            return data.astype(np.float32).reshape(shape)
        if t.ggml_type in kquants.DEQUANTIZERS:  # the same values as gguf-py's, faster
            return kquants.dequantize(data, t.ggml_type).reshape(shape)
        gguf = import_gguf(self.path)
        try:
            values = gguf.quants.dequantize(data, gguf.GGMLQuantizationType(t.type_id))
        except NotImplementedError:
            raise Lfm2npError(f"{self.path}: tensor {t.name!r} has type {t.ggml_type}, which this version of gguf "
                              f"cannot dequantise") from None
        return np.asarray(values, dtype=np.float32).reshape(shape)


def _shaped(raw: np.ndarray, t: TensorInfo, rows: int) -> np.ndarray:
    """Raw bytes of ``rows`` outermost rows viewed as :meth:`GgufFile.data` lays them out."""
    dtype = ELEMENT_DTYPES.get(t.ggml_type)
    if dtype is not None:
        return raw.view(dtype).reshape((rows, *t.shape[1:]))
    return raw.reshape((rows, *t.byte_shape[1:]) if len(t.shape) > 1 else (raw.size,))


def _row_indices(path: Path, t: TensorInfo, rows: "int | slice | Sequence[int]") -> list[int]:
    """``rows`` as a list of non-negative indices into the outermost numpy axis (negatives count from the end)."""
    n = t.shape[0]
    if isinstance(rows, slice):
        return list(range(*rows.indices(n)))
    items = [rows] if isinstance(rows, (int, np.integer)) else list(rows)
    out = []
    for r in items:
        try:
            i = operator.index(r)
        except TypeError:
            raise Lfm2npError(f"{path}: tensor {t.name!r}: row index {r!r} is not an integer") from None
        if not -n <= i < n:
            raise Lfm2npError(f"{path}: tensor {t.name!r}: row {i} is out of range for the outermost axis of "
                              f"length {n} (shape {t.shape})")
        out.append(i % n)
    return out


def open_gguf(path: "str | os.PathLike[str]") -> GgufFile:
    """Open and check a GGUF file (see :class:`GgufFile`)."""
    return GgufFile(path)
