"""A defensive reader of GGUF files (versions 2 and 3, little-endian) that trusts no count, length or offset.

The layout (all integers little-endian)::

    magic       4 bytes   b"GGUF"
    version     u32       2 or 3 (1 had 32-bit counts; a big-endian file reads as 0x02000000 / 0x03000000)
    n_tensors   u64
    n_kv        u64
    n_kv times  key: string, value type: u32, value
    n_tensors   name: string, n_dims: u32, ne: u64[n_dims] (ggml order, fastest first),
      times     ggml type: u32, offset: u64 (relative to the data section)
    padding     up to a multiple of ``general.alignment`` (a u32 power of two; 32 when absent)
    data        tensor i occupies [data_start + offset_i, ... + nbytes_i),
                nbytes = n_elements / block_size * type_size of its ggml type

    string      u64 byte length, then that many UTF-8 bytes (no terminator)
    value       u8 i8 u16 i16 u32 i32 f32 bool(u8) u64 i64 f64 | string
                | array: element type u32, count u64, count elements (arrays of arrays are refused)

What is checked, and why
------------------------
gguf-py's ``GGUFReader`` believes every number in the header, so a file of a few bytes can make it loop
2^64 times, allocate without end, or (an offset that wraps around 2^64 in C arithmetic) point a tensor into
the header. Here, before anything is allocated or looped over:

* **bounded allocation** -- ``kv_count`` and ``tensor_count`` must fit in the file at their minimum encoded
  sizes (14 bytes a key/value pair, 33 bytes a tensor info); every string length must fit in the bytes left
  and under a cap (1 MiB for keys and tensor names, 64 MiB for string values); every array count must fit
  in the bytes left at its element's minimum size and under 2^24 elements. So the parser's memory and time
  stay proportional to the file's size, whatever its header claims.
* **no out-of-bounds read** -- every read is length-checked against the file size first; a file that
  ends early gives a "truncated" error naming the field being read.
* **no wraparound** -- offsets, element counts and byte ranges are Python ints: element counts must fit
  in int64 (ggml's ``int64_t ne``), each tensor's byte range must lie inside the file, and no two tensors'
  ranges may overlap.
* **types** -- value types must be in the GGUF enum (``uint8`` .. ``float64``, ``bool``, ``string``,
  ``array``), bools must be 0 or 1, keys and string values valid UTF-8, keys and tensor names non-empty and
  unique, ``n_dims`` in 1..4 (``GGML_MAX_DIMS``), each dimension >= 1, the ggml type known to gguf-py with
  ``ne[0]`` a multiple of its block size, and each tensor offset a multiple of the alignment.

Every failure is a :class:`~lfm2np.errors.Lfm2npError` whose message names the file, the culprit (key,
tensor, field) and what was expected.

Reading tensor bytes: pread, not mmap
-------------------------------------
A memory map of a file that shrinks after opening turns a read past the new end into SIGBUS, which kills
the process; checking the size with ``fstat`` before touching the map still leaves a window between check
and access. So tensor bytes are read with ``os.preadv``/``os.pread`` into a fresh buffer: the current file
size is checked first (a clear error when the file shrank) and a short read is an error too, never a
crash. The trade-off: a tensor is copied into memory when asked for, rather than paged in lazily, so
reading a tensor costs its size in RAM (and :meth:`GgufFile.dequantize` with ``rows=`` reads only the
rows asked for, which keeps embedding lookups and single experts cheap). The header is read the same way,
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
import stat
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import Lfm2npError
from . import kquants

__all__ = ["GgufFile", "TensorInfo", "open_gguf", "VALUE_TYPE_NAMES"]

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
GGML_MAX_DIMS = 4
INT64_MAX = 2**63 - 1

MAX_KEY_BYTES = 1 << 20  #: cap on a key's (and a tensor name's) length in bytes
MAX_STRING_BYTES = 64 << 20  #: cap on a string value's length in bytes
MAX_ARRAY_LEN = 1 << 24  #: cap on an array's element count (tokenizer arrays are ~65k-262k long)

HEADER_BYTES = 4 + 4 + 8 + 8
MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length, a 1-byte key, value type, a 1-byte value
MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8  # name length, 1-byte name, n_dims, one dim, type, offset

_CHUNK = 1 << 20  # header read-ahead
_MAX_READ = 1 << 30  # largest single pread (Linux caps one read at ~2 GiB)

#: GGUF value type id -> name (the ``gguf_type`` enum of ggml's gguf.h).
VALUE_TYPE_NAMES: dict[int, str] = {
    0: "UINT8", 1: "INT8", 2: "UINT16", 3: "INT16", 4: "UINT32", 5: "INT32", 6: "FLOAT32",
    7: "BOOL", 8: "STRING", 9: "ARRAY", 10: "UINT64", 11: "INT64", 12: "FLOAT64",
}
_BOOL, _STRING, _ARRAY = 7, 8, 9
#: scalar value type id -> little-endian numpy dtype (bool is read as u8 and checked to be 0/1).
_SCALAR_DTYPES: dict[int, np.dtype] = {
    t: np.dtype(code) for t, code in
    {0: "u1", 1: "i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "u1", 10: "<u8", 11: "<i8",
     12: "<f8"}.items()
}
_SCALAR_STRUCTS: dict[int, struct.Struct] = {
    t: struct.Struct("<" + fmt) for t, fmt in
    {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "B", 10: "Q", 11: "q", 12: "d"}.items()
}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

#: ggml types whose ``data()`` is an array of elements (as gguf-py's GGUFReader gives); all others
#: (quantised types and BF16) are raw bytes, uint8 of shape ``(*shape[:-1], shape[-1] // block * type_size)``.
ELEMENT_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(code) for name, code in
    {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I8": "i1", "I16": "<i2", "I32": "<i4", "I64": "<i8"}.items()
}

MetadataValue = Any  # int | float | bool | str | list of one of those


def _import_gguf(path: Path) -> Any:
    """The optional gguf package (llama.cpp's gguf-py), or an Lfm2npError saying how to install it."""
    try:
        import gguf  # noqa: PLC0415 (optional dependency)
    except ImportError:
        raise Lfm2npError(f"{path}: reading GGUF needs the gguf package: pip install 'lfm2np[gguf]'") from None
    return gguf


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in the file and what it holds (all sizes checked against the file)."""

    name: str
    ne: tuple[int, ...]  #: ggml order (fastest-varying first)
    shape: tuple[int, ...]  #: numpy order: ``tuple(reversed(ne))``
    ggml_type: str  #: ``"F32"``, ``"Q8_0"``, ...
    type_id: int  #: the ggml type's number
    offset: int  #: absolute byte offset in the file
    nbytes: int
    n_elements: int
    block_size: int  #: elements per quantisation block (1 for F32/F16/BF16/...)
    type_size: int  #: bytes per block

    @property
    def byte_shape(self) -> tuple[int, ...]:
        """The shape of the raw bytes: numpy shape with the last axis in bytes (gguf-py's layout)."""
        return (*self.shape[:-1], self.shape[-1] // self.block_size * self.type_size)


# ---------------------------------------------------------------------------------------- file access
class _Source:
    """Positioned reads of an open file that never read past its current end (pread, not mmap)."""

    def __init__(self, path: Path, file: Any) -> None:
        self.path = path
        self._file = file
        self._lock = threading.Lock()  # only for the seek+read fallback (no pread on Windows)

    def error(self, detail: str) -> Lfm2npError:
        return Lfm2npError(f"{self.path}: {detail}")

    @property
    def closed(self) -> bool:
        return self._file is None or self._file.closed

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def _fileno(self) -> int:
        if self.closed:
            raise self.error("the GGUF file has been closed")
        return self._file.fileno()

    def will_need(self, offset: int, nbytes: int) -> None:
        """Hint the kernel to read these bytes into the page cache (``posix_fadvise(WILLNEED)``), if it can."""
        try:
            os.posix_fadvise(self._fileno(), offset, nbytes, os.POSIX_FADV_WILLNEED)
        except (OSError, Lfm2npError, AttributeError):  # no such call, a file system without it, a closed file
            pass

    def size_now(self) -> int:
        """The file's size at this moment (it may have changed since opening)."""
        return os.fstat(self._fileno()).st_size

    def read_bytes(self, offset: int, n: int, what: str) -> bytes:
        """Exactly ``n`` bytes at ``offset``, or an error naming ``what`` if the file ends sooner."""
        fd = self._fileno()
        parts: list[bytes] = []
        done = 0
        while done < n:
            want = min(n - done, _MAX_READ)
            if hasattr(os, "pread"):
                part = os.pread(fd, want, offset + done)
            else:
                with self._lock:
                    self._file.seek(offset + done)
                    part = self._file.read(want)
            if not part:
                raise self._short(offset, n, done, what)
            parts.append(part)
            done += len(part)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def read_into(self, view: memoryview, offset: int, what: str) -> None:
        """Fill ``view`` with the bytes at ``offset``, or an error naming ``what`` if the file ends sooner."""
        fd = self._fileno()
        n, done = len(view), 0
        while done < n:
            chunk = view[done:done + _MAX_READ]
            if hasattr(os, "preadv"):
                got = os.preadv(fd, [chunk], offset + done)
            else:
                with self._lock:
                    self._file.seek(offset + done)
                    got = self._file.readinto(chunk) or 0
            if got == 0:
                raise self._short(offset, n, done, what)
            done += got

    def _short(self, offset: int, n: int, done: int, what: str) -> Lfm2npError:
        return self.error(f"{what}: read {done} of {n} bytes at offset {offset}: the file ends at "
                          f"{self.size_now()} bytes (was it truncated or replaced after opening?)")


class _Cursor:
    """Sequential reads through the header, buffered in chunks and bounded by the file size."""

    def __init__(self, source: _Source, size: int) -> None:
        self.source, self.size = source, size
        self.pos = 0
        self._buf = b""  # the file's bytes [self._base, self._base + len(self._buf))
        self._base = 0

    def error(self, detail: str) -> Lfm2npError:
        return self.source.error(detail)

    @property
    def remaining(self) -> int:
        return self.size - self.pos

    def need(self, n: int, what: str) -> None:
        """Make the next ``n`` bytes available, or raise naming ``what`` when the file ends first."""
        end = self.pos + n
        if end > self.size:
            raise self.error(f"truncated: {what} needs {n} bytes at offset {self.pos}, "
                             f"but the file ends at {self.size}")
        have = self._base + len(self._buf)
        if end <= have:
            return
        stop = min(self.size, max(end, self.pos + _CHUNK))
        new = self.source.read_bytes(have, stop - have, what)
        self._buf = self._buf[self.pos - self._base:] + new
        self._base = self.pos

    def take(self, n: int, what: str) -> bytes:
        self.need(n, what)
        start = self.pos - self._base
        self.pos += n
        return self._buf[start:start + n]

    def unpack(self, s: struct.Struct, what: str) -> tuple[Any, ...]:
        self.need(s.size, what)
        values = s.unpack_from(self._buf, self.pos - self._base)
        self.pos += s.size
        return values

    def u32(self, what: str) -> int:
        return self.unpack(_U32, what)[0]

    def u64(self, what: str) -> int:
        return self.unpack(_U64, what)[0]

    def raw_string(self, what: str, cap: int) -> bytes:
        """A length-prefixed string's bytes, its length checked against ``cap`` and the bytes left."""
        n = self.u64(f"{what} (length)")
        if n > cap:
            raise self.error(f"{what}: string length {n} exceeds the limit of {cap} bytes")
        if n > self.remaining:
            raise self.error(f"truncated: {what}: string length {n} runs past the end of the file "
                             f"({self.remaining} bytes left at offset {self.pos})")
        return self.take(n, what)

    def strings(self, count: int, what: str) -> list[str]:
        """``count`` UTF-8 strings (a string array's elements): a tight loop over the buffered bytes."""
        out: list[str] = []
        append, unpack = out.append, _U64.unpack_from
        i = 0
        while i < count:
            buf, base = self._buf, self._base
            p, end = self.pos - base, len(buf)
            try:
                while i < count and p + 8 <= end:
                    n = unpack(buf, p)[0]
                    q = p + 8 + n
                    if q > end or n > MAX_STRING_BYTES:
                        break
                    append(buf[p + 8:q].decode("utf-8"))
                    p = q
                    i += 1
            except UnicodeDecodeError:
                raise self.error(f"{what}: element {i} is not valid UTF-8: {buf[p + 8:p + 8 + 40]!r}") from None
            finally:
                self.pos = base + p
            if i < count:  # the next string crosses the buffered bytes (or is bad): the checked path
                append(_decode(self, self.raw_string(f"{what} element {i}", MAX_STRING_BYTES),
                               f"{what} element {i}"))
                i += 1
        return out


def _decode(cur: _Cursor, raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise cur.error(f"{what} is not valid UTF-8: {raw[:40]!r}") from None


# ---------------------------------------------------------------------------------------- header
def _open(path: Path) -> tuple[Any, int]:
    """The file opened for binary reading and its size, or an error saying why it cannot be read."""
    try:
        file = open(path, "rb", buffering=0)  # noqa: SIM115 (owned by GgufFile)
    except FileNotFoundError:
        raise Lfm2npError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise Lfm2npError(f"{path}: is a directory, expected a GGUF file") from None
    except OSError as e:
        raise Lfm2npError(f"{path}: cannot open: {e.strerror or e}") from None
    st = os.fstat(file.fileno())
    if not stat.S_ISREG(st.st_mode):
        file.close()
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise Lfm2npError(f"{path}: is {kind}, expected a GGUF file")
    return file, st.st_size


def _read_preamble(cur: _Cursor) -> tuple[int, int, int]:
    """Magic, version, tensor_count and kv_count, each checked."""
    if cur.size == 0:
        raise cur.error("empty file (0 bytes), expected a GGUF header")
    magic = cur.take(min(4, cur.size), "magic")
    if magic != GGUF_MAGIC:
        raise cur.error(f"not a GGUF file: magic is {magic!r}, expected {GGUF_MAGIC!r}")
    version = cur.u32("version")
    if version not in SUPPORTED_VERSIONS:
        raise cur.error(_version_message(version))
    n_tensors = cur.u64("tensor_count")
    n_kv = cur.u64("kv_count")
    _check_counts(cur, n_tensors, n_kv)
    return version, n_tensors, n_kv


def _version_message(version: int) -> str:
    swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
    if version & 0xFFFF == 0 and swapped in (1, 2, 3):
        return (f"big-endian GGUF (version field 0x{version:08x} is version {swapped} byte-swapped); "
                f"only little-endian GGUF is supported")
    if version == 1:
        return "GGUF version 1 is not supported (it had 32-bit counts); expected version 2 or 3"
    return f"unsupported GGUF version {version}, expected 2 or 3"


def _check_counts(cur: _Cursor, n_tensors: int, n_kv: int) -> None:
    """Refuse counts that the file could not hold even at the minimum encoded size of each entry."""
    room = cur.size - HEADER_BYTES
    max_kv = room // MIN_KV_BYTES
    if n_kv > max_kv:
        raise cur.error(f"kv_count {n_kv} cannot fit: the {cur.size}-byte file has room for at most {max_kv} "
                        f"key/value pairs (each takes at least {MIN_KV_BYTES} bytes)")
    max_tensors = (room - n_kv * MIN_KV_BYTES) // MIN_TENSOR_INFO_BYTES
    if n_tensors > max_tensors:
        raise cur.error(f"tensor_count {n_tensors} cannot fit: after {n_kv} key/value pairs the {cur.size}-byte "
                        f"file has room for at most {max_tensors} tensor infos (each takes at least "
                        f"{MIN_TENSOR_INFO_BYTES} bytes)")


def _read_key(cur: _Cursor, index: int) -> str:
    at = cur.pos
    what = f"key #{index} at offset {at}"
    raw = cur.raw_string(what, MAX_KEY_BYTES)
    if not raw:
        raise cur.error(f"{what} is empty")
    return _decode(cur, raw, what)


def _value_type(cur: _Cursor, what: str) -> int:
    vtype = cur.u32(f"{what} (value type)")
    if vtype not in VALUE_TYPE_NAMES:
        raise cur.error(f"{what}: unknown value type {vtype}, expected 0..12 (UINT8 .. FLOAT64, see VALUE_TYPE_NAMES)")
    return vtype


def _read_scalar(cur: _Cursor, vtype: int, what: str) -> MetadataValue:
    value = cur.unpack(_SCALAR_STRUCTS[vtype], what)[0]
    if vtype == _BOOL:
        if value not in (0, 1):
            raise cur.error(f"{what}: BOOL value {value}, expected 0 or 1")
        return bool(value)
    return value


def _read_array(cur: _Cursor, what: str) -> tuple[list[MetadataValue], str]:
    """An array's elements and its element type's name (arrays of arrays are refused)."""
    etype = _value_type(cur, f"{what} array element")
    ename = VALUE_TYPE_NAMES[etype]
    if etype == _ARRAY:
        raise cur.error(f"{what}: arrays of arrays are not supported (llama.cpp refuses them too)")
    count = cur.u64(f"{what} (array length)")
    if count > MAX_ARRAY_LEN:
        raise cur.error(f"{what}: array length {count} exceeds the limit of {MAX_ARRAY_LEN} elements")
    min_size = 8 if etype == _STRING else _SCALAR_DTYPES[etype].itemsize
    if count * min_size > cur.remaining:
        raise cur.error(f"truncated: {what}: array of {count} {ename} elements needs at least "
                        f"{count * min_size} bytes, but only {cur.remaining} are left at offset {cur.pos}")
    if etype == _STRING:
        return cur.strings(count, what), ename
    dtype = _SCALAR_DTYPES[etype]
    values = np.frombuffer(cur.take(count * dtype.itemsize, what), dtype=dtype)
    if etype == _BOOL:
        bad = np.flatnonzero(values > 1)
        if bad.size:
            raise cur.error(f"{what}: element {int(bad[0])} is BOOL value {int(values[bad[0]])}, expected 0 or 1")
        return values.astype(bool).tolist(), ename
    return values.tolist(), ename


def _read_value(cur: _Cursor, vtype: int, what: str) -> tuple[MetadataValue, Any]:
    """One value and its type name (``"UINT32"``, or ``("ARRAY", "STRING")`` for an array)."""
    if vtype == _STRING:
        return _decode(cur, cur.raw_string(what, MAX_STRING_BYTES), f"{what} string value"), "STRING"
    if vtype == _ARRAY:
        values, ename = _read_array(cur, what)
        return values, ("ARRAY", ename)
    return _read_scalar(cur, vtype, what), VALUE_TYPE_NAMES[vtype]


def _read_metadata(cur: _Cursor, n_kv: int) -> tuple[dict[str, MetadataValue], dict[str, Any]]:
    metadata: dict[str, MetadataValue] = {}
    types: dict[str, Any] = {}
    offsets: dict[str, int] = {}
    for index in range(n_kv):
        at = cur.pos
        key = _read_key(cur, index)
        if key in offsets:
            raise cur.error(f"duplicate key {key!r} (first at offset {offsets[key]}, again at offset {at})")
        offsets[key] = at
        what = f"key {key!r}"
        metadata[key], types[key] = _read_value(cur, _value_type(cur, what), what)
    return metadata, types


def _alignment(cur: _Cursor, metadata: dict[str, MetadataValue], types: dict[str, Any]) -> int:
    """``general.alignment`` (a UINT32 power of two) or the default 32."""
    if "general.alignment" not in metadata:
        return DEFAULT_ALIGNMENT
    value, vtype = metadata["general.alignment"], types["general.alignment"]
    if vtype != "UINT32":
        raise cur.error(f"key 'general.alignment' has type {vtype}, expected UINT32")
    if value == 0 or value & (value - 1):
        raise cur.error(f"key 'general.alignment' is {value}, expected a power of two")
    return value


@dataclass(frozen=True)
class _RawTensor:
    index: int
    name: str
    ne: tuple[int, ...]
    type_id: int
    offset: int  # relative to the data section
    info_at: int  # where its tensor info starts in the file


def _read_tensor_info(cur: _Cursor, index: int) -> _RawTensor:
    at = cur.pos
    what = f"tensor info #{index} at offset {at}"
    raw = cur.raw_string(f"{what} name", MAX_KEY_BYTES)
    if not raw:
        raise cur.error(f"{what}: empty tensor name")
    name = _decode(cur, raw, f"{what} name")
    what = f"tensor {name!r}"
    n_dims = cur.u32(f"{what} n_dims")
    if not 1 <= n_dims <= GGML_MAX_DIMS:
        raise cur.error(f"{what}: n_dims is {n_dims}, expected 1..{GGML_MAX_DIMS}")
    ne = cur.unpack(struct.Struct(f"<{n_dims}Q"), f"{what} dimensions")
    type_id = cur.u32(f"{what} ggml type")
    offset = cur.u64(f"{what} offset")
    return _RawTensor(index, name, tuple(ne), type_id, offset, at)


def _read_tensor_infos(cur: _Cursor, n_tensors: int) -> list[_RawTensor]:
    raws: list[_RawTensor] = []
    first: dict[str, int] = {}
    for index in range(n_tensors):
        raw = _read_tensor_info(cur, index)
        if raw.name in first:
            raise cur.error(f"duplicate tensor name {raw.name!r} (tensor infos #{first[raw.name]} and #{index})")
        first[raw.name] = index
        raws.append(raw)
    return raws


def _tensor(cur: _Cursor, raw: _RawTensor, data_start: int, alignment: int, gguf: Any) -> TensorInfo:
    """Check one tensor info against its ggml type, the alignment and the file's extent."""
    what = f"tensor {raw.name!r}"
    for axis, n in enumerate(raw.ne):
        if n < 1:
            raise cur.error(f"{what}: dimension ne[{axis}] is {n}, expected >= 1 (ne = {list(raw.ne)})")
    n_elements = 1
    for n in raw.ne:
        n_elements *= n
    if n_elements > INT64_MAX:
        raise cur.error(f"{what}: element count {n_elements} (ne = {list(raw.ne)}) overflows int64")
    try:
        qtype = gguf.GGMLQuantizationType(raw.type_id)
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise cur.error(f"{what}: unknown ggml type {raw.type_id}") from None
    if raw.ne[0] % block_size:
        raise cur.error(f"{what}: ne[0] = {raw.ne[0]} is not a multiple of the {qtype.name} block size "
                        f"{block_size}")
    if raw.offset % alignment:
        raise cur.error(f"{what}: data offset {raw.offset} is not a multiple of the alignment {alignment}")
    nbytes = n_elements // block_size * type_size
    begin = data_start + raw.offset
    if begin + nbytes > cur.size:
        raise cur.error(f"{what}: data [{begin}, {begin + nbytes}) ({nbytes} bytes at data offset {raw.offset}) "
                        f"extends past the end of the file ({cur.size} bytes)")
    return TensorInfo(raw.name, raw.ne, tuple(reversed(raw.ne)), qtype.name, int(qtype), begin, nbytes,
                      n_elements, block_size, type_size)


def _check_overlaps(cur: _Cursor, tensors: Sequence[TensorInfo]) -> None:
    ordered = sorted(tensors, key=lambda t: (t.offset, t.nbytes))
    for a, b in zip(ordered, ordered[1:]):
        if b.offset < a.offset + a.nbytes:
            raise cur.error(f"tensors {a.name!r} [{a.offset}, {a.offset + a.nbytes}) and {b.name!r} "
                            f"[{b.offset}, {b.offset + b.nbytes}) overlap")


# ---------------------------------------------------------------------------------------- the file
class GgufFile:
    """A GGUF file, its header parsed and checked; tensor bytes are read on demand.

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
        file, size = _open(self.path)
        self._source = _Source(self.path, file)
        try:
            self._parse(size)
        except BaseException:
            self._source.close()
            raise

    def _parse(self, size: int) -> None:
        cur = _Cursor(self._source, size)
        self.size = size
        gguf = _import_gguf(self.path)
        self.version, n_tensors, n_kv = _read_preamble(cur)
        self.metadata, self.types = _read_metadata(cur, n_kv)
        self.alignment = _alignment(cur, self.metadata, self.types)
        raws = _read_tensor_infos(cur, n_tensors)
        self.header_end = cur.pos
        self.data_start = -(-cur.pos // self.alignment) * self.alignment
        infos = [_tensor(cur, raw, self.data_start, self.alignment, gguf) for raw in raws]
        _check_overlaps(cur, infos)
        self.tensors = {t.name: t for t in infos}

    # -------------------------------------------------------------------------------- lifetime
    def close(self) -> None:
        self._source.close()

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

    def _check_extent(self, offset: int, nbytes: int, what: str) -> None:
        """Refuse a read the file no longer covers (it may have shrunk since it was opened)."""
        size = self._source.size_now()
        if offset + nbytes > size:
            raise Lfm2npError(f"{self.path}: {what}: needs bytes [{offset}, {offset + nbytes}) but the file is now "
                              f"{size} bytes (it was {self.size} when opened: truncated after opening?)")

    def _read(self, offset: int, nbytes: int, what: str) -> np.ndarray:
        """``nbytes`` bytes at ``offset`` in a fresh, writable uint8 array."""
        self._check_extent(offset, nbytes, what)
        out = np.empty(nbytes, dtype=np.uint8)
        self._source.read_into(memoryview(out), offset, what)
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
        self._source.will_need(offset, nbytes)

    def _read_rows(self, t: TensorInfo, index: Sequence[int]) -> np.ndarray:
        """Rows ``index`` of the outermost numpy axis, their bytes read run by run of consecutive indices."""
        row_bytes = t.nbytes // t.shape[0]
        out = np.empty(len(index) * row_bytes, dtype=np.uint8)
        view = memoryview(out)
        start = 0
        while start < len(index):
            stop = start + 1
            while stop < len(index) and index[stop] == index[stop - 1] + 1:
                stop += 1
            offset, nbytes = t.offset + index[start] * row_bytes, (stop - start) * row_bytes
            what = f"tensor {t.name!r} rows {index[start]}..{index[stop - 1]}"
            self._check_extent(offset, nbytes, what)
            self._source.read_into(view[start * row_bytes:stop * row_bytes], offset, what)
            start = stop
        return _shaped(out, t, len(index))

    def _float32(self, data: np.ndarray, t: TensorInfo, shape: tuple[int, ...]) -> np.ndarray:
        """Stored values (as :meth:`data` shapes them) -> float32 of ``shape``: Q4_K and Q6_K by
        :mod:`lfm2np.io.kquants`, other quantised types through gguf-py."""
        if t.ggml_type == "F32":
            return data.reshape(shape)
        if t.ggml_type in ELEMENT_DTYPES:
            return data.astype(np.float32).reshape(shape)
        if t.ggml_type in kquants.DEQUANTIZERS:  # Q4_K, Q6_K: the same values as gguf-py's, faster
            return kquants.dequantize(data, t.ggml_type).reshape(shape)
        gguf = _import_gguf(self.path)
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
