"""The GGUF header grammar (versions 2 and 3, little-endian), read by a parser that trusts no count, length or offset.

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

Every failure is a :class:`~lfm2np.errors.Lfm2npError` whose message names the file, the culprit (key,
tensor, field) and what was expected. Reading tensors is :mod:`lfm2np.io.gguf_file`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..errors import Lfm2npError
from .files import CheckedFile

__all__ = ["Header", "TensorInfo", "VALUE_TYPE_NAMES", "import_gguf", "parse_header"]

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

MetadataValue = Any  # int | float | bool | str | list of one of those


def import_gguf(path: Any) -> Any:
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


# ---------------------------------------------------------------------------------------- the cursor
class _Cursor:
    """Sequential reads through the header, buffered in chunks and bounded by the file size."""

    def __init__(self, source: CheckedFile, size: int) -> None:
        self.source, self.size = source, size
        self.pos = 0
        self._buf = b""  # the file's bytes [self._base, self._base + len(self._buf))
        self._base = 0

    def error(self, detail: str) -> Lfm2npError:
        return Lfm2npError(f"{self.source.path}: {detail}")

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


# ---------------------------------------------------------------------------------------- the grammar
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


@dataclass(frozen=True)
class Header:
    """A parsed and checked GGUF header: ``metadata`` (key -> int, float, bool, str or a list of one of those),
    ``types`` (key -> ``"UINT32"``... or ``("ARRAY", element type)``), ``alignment``, where the tensor infos end
    (``header_end``) and the data section starts (``data_start``), and ``tensors`` in file order."""

    version: int
    metadata: dict[str, MetadataValue]
    types: dict[str, Any]
    alignment: int
    header_end: int
    data_start: int
    tensors: dict[str, TensorInfo]


def parse_header(file: CheckedFile) -> Header:
    """Parse and check the header of the GGUF ``file`` (see the module docstring); gguf-py gives the ggml
    types' block sizes."""
    cur = _Cursor(file, file.size)
    gguf = import_gguf(file.path)
    version, n_tensors, n_kv = _read_preamble(cur)
    metadata, types = _read_metadata(cur, n_kv)
    alignment = _alignment(cur, metadata, types)
    raws = _read_tensor_infos(cur, n_tensors)
    header_end = cur.pos
    data_start = -(-cur.pos // alignment) * alignment
    infos = [_tensor(cur, raw, data_start, alignment, gguf) for raw in raws]
    _check_overlaps(cur, infos)
    return Header(version, metadata, types, alignment, header_end, data_start, {t.name: t for t in infos})
