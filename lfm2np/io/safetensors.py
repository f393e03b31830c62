"""Safetensors checkpoints: reading (validated, memory-mapped, widened per tensor) and writing.

A checkpoint directory holds ``config.json`` and either ``model.safetensors`` or a sharded set listed in
``model.safetensors.index.json``. Files are memory-mapped and parsed here directly (the safetensors
format is an 8-byte header length, a JSON header and raw little-endian data), which lets us

- widen bfloat16 exactly (bf16 -> f32 is a 16-bit shift) one tensor at a time, never the whole model;
- check every tensor's dtype, shape and byte range against the file before any is used, so a truncated or
  corrupt file is reported with its name instead of failing later;
- never unpickle anything (safetensors holds no code; ``.bin``/``.pt`` checkpoints are refused).
"""

from __future__ import annotations

import json
import math
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Config
from ..errors import Lfm2npError
from ..numerics import bfloat16_bits, bfloat16_to_float32
from ..tensors import expected_tensors

#: safetensors dtype codes we read, and their storage dtype (bf16 is stored as raw uint16).
_STORAGE = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
}
_MAX_HEADER = 100 * 1024 * 1024

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


# ---------------------------------------------------------------------- safetensors
@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, safetensors dtype code, shape and byte range in the data section."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


class SafetensorsFile:
    """One memory-mapped safetensors file with a validated header."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < 8:
                    raise Lfm2npError(f"{self.path}: {size} bytes, too short for a safetensors file (truncated?)")
                n = int.from_bytes(f.read(8), "little")
                if n > min(size - 8, _MAX_HEADER):
                    raise Lfm2npError(
                        f"{self.path}: header length {n} exceeds the file ({size} bytes): truncated or not safetensors"
                    )
                raw = f.read(n)
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > 8 + n else None
        except OSError as e:
            raise Lfm2npError(f"{self.path}: cannot read ({e.strerror})") from None
        try:
            header = json.loads(raw)
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
        except (ValueError, UnicodeDecodeError) as e:
            raise Lfm2npError(f"{self.path}: corrupt safetensors header ({e})") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        data_size = size - self._data_start
        self.tensors: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            dtype, shape, begin, end = self._entry(name, entry)
            nbytes = math.prod(shape) * _STORAGE[dtype].itemsize  # Python ints: no overflow
            if not (0 <= begin <= end) or end - begin != nbytes:
                raise Lfm2npError(
                    f"{self.path}: tensor {name!r} byte range {begin}..{end} does not fit shape {list(shape)} {dtype}"
                )
            if end > data_size:
                raise Lfm2npError(
                    f"{self.path}: tensor {name!r} ends at byte {end} of the data but the file holds only "
                    f"{data_size}: the file is truncated"
                )
            self.tensors[name] = TensorInfo(self.path, dtype, shape, begin, end)
        self._check_layout(data_size)

    def _entry(self, name: str, entry: Any) -> tuple[str, tuple[int, ...], int, int]:
        """dtype, shape and byte range of one header entry, each checked for its type."""
        def bad(field: str, value: Any) -> Lfm2npError:
            return Lfm2npError(f"{self.path}: corrupt header entry for tensor {name!r}: {field} is {value!r}")

        if not isinstance(entry, dict):
            raise bad("the entry", entry)
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str):
            raise bad("dtype", dtype)
        if dtype not in _STORAGE:
            raise Lfm2npError(f"{self.path}: tensor {name!r} has dtype {dtype}; lfm2np reads {', '.join(_STORAGE)}")
        is_int = lambda v: type(v) is int  # noqa: E731  (not bool, not float, not str)
        if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape):
            raise bad("shape", shape)
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(is_int(o) for o in offsets):
            raise bad("data_offsets", offsets)
        return dtype, tuple(shape), offsets[0], offsets[1]

    def _check_layout(self, data_size: int) -> None:
        """Tensors must tile the data section: no overlap, no gap (as the safetensors library requires)."""
        position = 0
        for info in sorted(self.tensors.values(), key=lambda i: (i.begin, i.end)):
            if info.begin != position:
                what = "overlaps the previous tensor" if info.begin < position else f"leaves a gap at byte {position}"
                name = next(n for n, i in self.tensors.items() if i is info)
                raise Lfm2npError(f"{self.path}: corrupt header: tensor {name!r} at byte {info.begin} {what}")
            position = info.end

    def raw(self, name: str) -> np.ndarray:
        """The tensor as stored (bf16 as uint16), a read-only view into the memory map."""
        info = self.tensors[name]
        count = (info.end - info.begin) // _STORAGE[info.dtype].itemsize
        if count == 0:
            return np.zeros(info.shape, _STORAGE[info.dtype])
        arr = np.frombuffer(self._map, dtype=_STORAGE[info.dtype], count=count, offset=self._data_start + info.begin)
        return arr.reshape(info.shape)


def widen(raw: np.ndarray, stored: str, dtype: np.dtype) -> np.ndarray:
    """A stored tensor converted to the compute dtype. bf16 -> f32 is exact: the 16 bits become the high
    half of a float32. Returns a view (no copy) when the stored dtype already is the compute dtype."""
    if stored == "BF16":
        return bfloat16_to_float32(raw).astype(dtype, copy=False)
    return raw.astype(dtype, copy=False)


class Checkpoint:
    """The safetensors files of a checkpoint directory, indexed by tensor name."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        single = self.directory / SINGLE_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                files = sorted(set(weight_map.values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise Lfm2npError(f"{index}: not a valid safetensors index ({e!r})") from None
        elif single.is_file():
            weight_map, files = None, [SINGLE_FILE]
        else:
            pickled = [p.name for p in self.directory.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
            hint = f" (found {', '.join(pickled)}: pickled checkpoints are never loaded)" if pickled else ""
            raise Lfm2npError(f"{self.directory}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")
        self.files: dict[str, SafetensorsFile] = {}
        self.tensors: dict[str, TensorInfo] = {}
        for name in files:
            path = self.directory / name
            if Path(name).suffix != ".safetensors" or not path.is_file():
                raise Lfm2npError(f"{index}: lists shard {name!r}, which is not a safetensors file in {self.directory}")
            shard = self.files[name] = SafetensorsFile(path)
            for tensor, info in shard.tensors.items():
                if tensor in self.tensors:
                    raise Lfm2npError(f"{path}: tensor {tensor!r} also appears in {self.tensors[tensor].file}")
                self.tensors[tensor] = info
        if weight_map is not None:
            for tensor, shard_name in weight_map.items():
                info = self.tensors.get(tensor)
                if info is None or info.file.name != shard_name:
                    raise Lfm2npError(f"{index}: maps {tensor!r} to {shard_name}, which does not hold it")

    def check(self, expected: dict[str, tuple[int, ...]]) -> list[str]:
        """Raise if an expected tensor is missing or mis-shaped; return the names of unexpected tensors."""
        missing = [n for n in expected if n not in self.tensors]
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise Lfm2npError(f"{self.directory}: missing tensor {', '.join(missing[:3])}{more}")
        for name, shape in expected.items():
            info = self.tensors[name]
            if info.shape != shape:
                raise Lfm2npError(
                    f"{info.file}: tensor {name!r} has shape {list(info.shape)}; the config expects {list(shape)}"
                )
        return [n for n in self.tensors if n not in expected]

    def read(self, name: str, dtype: np.dtype, rows: np.ndarray | None = None) -> np.ndarray:
        """Tensor ``name`` in the compute dtype (a memory-map view when no conversion is needed), or only
        its ``rows`` (gathered before conversion)."""
        info = self.tensors[name]
        raw = self.files[info.file.name].raw(name)
        return widen(raw if rows is None else raw[rows], info.dtype, np.dtype(dtype))

    def stored_dtypes(self) -> dict[str, int]:
        """How many tensors of each stored dtype the checkpoint holds."""
        counts: dict[str, int] = {}
        for info in self.tensors.values():
            counts[info.dtype] = counts.get(info.dtype, 0) + 1
        return counts

    def nbytes(self) -> int:
        """Bytes of tensor data on disk."""
        return sum(i.end - i.begin for i in self.tensors.values())


# -------------------------------------------------------------------------- writing
_CODES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def write_safetensors(path: "str | os.PathLike[str]", tensors: dict[str, np.ndarray], dtype: str = "float32",
                      keep_float32: tuple[str, ...] = ("expert_bias",),
                      metadata: dict[str, str] | None = None) -> None:
    """Write float tensors to a safetensors file, converted to ``dtype`` (float32, float16, bfloat16,
    float64). Tensors whose name ends with one of ``keep_float32`` stay float32, as released checkpoints
    keep the router's expert bias."""
    if dtype not in _CODES:
        raise Lfm2npError(f"cannot write dtype {dtype!r}; expected one of {', '.join(_CODES)}")
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    blobs, offset = [], 0
    for name, arr in tensors.items():
        code = "F32" if name.endswith(keep_float32) else _CODES[dtype]
        if code == "BF16":
            data = bfloat16_bits(arr)
        else:
            data = np.ascontiguousarray(arr, dtype=_STORAGE[code])
        raw = data.tobytes()
        header[name] = {"dtype": code, "shape": list(np.shape(arr)), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # align the data section to 8 bytes
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for raw in blobs:
            f.write(raw)


def save_checkpoint(directory: "str | os.PathLike[str]", config: Config, tensors: dict[str, np.ndarray],
                    dtype: str = "float32", shards: int = 1) -> Path:
    """Write ``config.json`` and the tensors (one file, or ``shards`` files with an index) to a directory
    that :func:`lfm2np.load` reads back. Every expected tensor must be given, with its shape."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    expected = expected_tensors(config)
    for name, shape in expected.items():
        if name not in tensors or tuple(np.shape(tensors[name])) != shape:
            got = "missing" if name not in tensors else f"shape {list(np.shape(tensors[name]))}"
            raise Lfm2npError(f"save_checkpoint: tensor {name!r} is {got}; expected shape {list(shape)}")
    d = config.to_dict()
    d["torch_dtype"] = dtype
    (directory / "config.json").write_text(json.dumps(d, indent=2) + "\n")
    names = list(tensors)
    if shards == 1:
        write_safetensors(directory / SINGLE_FILE, tensors, dtype)
        return directory
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        group = names[i::shards]
        write_safetensors(directory / fname, {n: tensors[n] for n in group}, dtype)
        weight_map.update({n: fname for n in group})
    index = {"metadata": {}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return directory
