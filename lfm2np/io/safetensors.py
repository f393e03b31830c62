"""Safetensors checkpoints: a directory's files and index, tensors widened one at a time, and writing.

A checkpoint directory holds ``config.json`` and either ``model.safetensors`` or a sharded set listed in
``model.safetensors.index.json``. Each file is read by :mod:`lfm2np.io.safetensors_file` (header validated,
tensor bytes read with pread, never memory-mapped: a file that changes after loading is an error naming
it, never SIGBUS), which lets us

- widen bfloat16 exactly (bf16 -> f32 is a 16-bit shift) one tensor at a time, never the whole model;
- check every tensor's dtype, shape and byte range against the file before any is used, so a truncated or
  corrupt file is reported with its name instead of failing later;
- never unpickle anything (safetensors holds no code; ``.bin``/``.pt`` checkpoints are refused).

An index must be a JSON object (UTF-8, no repeated key) whose ``weight_map`` maps tensor names to plain
``*.safetensors`` file names in the same directory (no path separator, no ``..``: an index cannot point
outside its directory), and it and the shards must agree on where every tensor is: each tensor in exactly
one shard, the one the index names, and no shard holding a tensor the index does not list.

:meth:`Checkpoint.read` ``(name, dtype, rows=None)`` is the one way tensors leave the files: a fresh,
read-only array in the compute dtype (read-only, so a kept weight cannot be changed by accident).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Config
from ..errors import Lfm2npError, shown
from ..numerics import bfloat16_bits
from ..schema import DENSE_HEAD, DENSE_HEAD_BIAS, expected_tensors
from .files import file_kind, present, read_json
from .safetensors_file import MAX_HEADER, STORAGE, SafetensorsFile, TensorInfo, widen
from .sentence_transformers import DENSE_WEIGHTS, head_files

__all__ = ["Checkpoint", "SafetensorsFile", "TensorInfo", "read_index", "save_checkpoint", "widen",
           "write_safetensors", "INDEX_FILE", "SINGLE_FILE"]

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def read_index(index: Path) -> dict[str, str]:
    """The ``weight_map`` of a sharded checkpoint's index, every shard name checked to be a plain
    ``*.safetensors`` file name (no directory part: an index cannot point outside its directory)."""
    data = read_json(index, "safetensors index", MAX_HEADER)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        got = f"a JSON {type(data).__name__}" if not isinstance(data, dict) else f"weight_map {shown(weight_map)}"
        raise Lfm2npError(f"{index}: not a valid safetensors index ({got}); expected an object whose "
                          f"'weight_map' maps tensor names to shard files")
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str):
            raise Lfm2npError(f"{index}: weight_map[{shown(tensor)}] is {shown(shard)}; expected a shard file name")
        parts = {os.sep, "/", "\\", "\0"} | ({os.altsep} if os.altsep else set())
        if any(p in shard for p in parts) or shard in ("", ".", "..") or not shard.endswith(".safetensors"):
            raise Lfm2npError(f"{index}: weight_map[{shown(tensor)}] is {shown(shard)}; expected the name of a "
                              f"*.safetensors file in {index.parent} (no directory part)")
    return weight_map


class Checkpoint:
    """The safetensors files of a checkpoint directory, indexed by tensor name: a
    :class:`~lfm2np.weights.TensorSource`."""

    def __init__(self, directory: "str | os.PathLike[str]"):
        if not isinstance(directory, (str, os.PathLike)) or not str(directory).strip():
            raise Lfm2npError(f"a checkpoint is the path of a directory; got {shown(directory)}")
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        single = self.directory / SINGLE_FILE
        if present(index, "a safetensors index (JSON)"):
            weight_map: dict[str, str] | None = read_index(index)
            files = sorted(set(weight_map.values()))
        elif present(single, "the checkpoint's safetensors file"):
            weight_map, files = None, [SINGLE_FILE]
        else:
            pickled = [p.name for p in self.directory.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
            hint = f" (found {', '.join(pickled)}: pickled checkpoints are never loaded)" if pickled else ""
            raise Lfm2npError(f"{self.directory}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")
        self.files: dict[str, SafetensorsFile] = {}
        self.tensors: dict[str, TensorInfo] = {}
        for name in files:
            path = self.directory / name
            kind = file_kind(path)
            if kind is not None:  # missing, or a directory, a FIFO, a loop of links: named as what it is
                what = "not a file" if kind == "missing" else f"{kind}, not a regular file"
                raise Lfm2npError(f"{index}: lists shard {shown(name)}, which is {what} in {self.directory}")
            shard = self.files[name] = SafetensorsFile(path)
            for tensor, info in shard.tensors.items():
                if tensor in self.tensors:
                    raise Lfm2npError(f"{path}: tensor {shown(tensor)} also appears in {self.tensors[tensor].file}")
                if weight_map is not None and tensor not in weight_map:
                    raise Lfm2npError(f"{path}: holds tensor {shown(tensor)}, which {index} does not list")
                self.tensors[tensor] = info
        for tensor, shard_name in (weight_map or {}).items():
            info = self.tensors.get(tensor)
            if info is None or info.file.name != shard_name:
                raise Lfm2npError(f"{index}: maps {shown(tensor)} to {shard_name}, which does not hold it")

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """``{name: shape}`` of every tensor the checkpoint holds."""
        return {name: info.shape for name, info in self.tensors.items()}

    def stored_type(self, name: str) -> str:
        """The safetensors dtype code tensor ``name`` is stored with (``BF16``, ``F32``...)."""
        return self.tensors[name].dtype

    def close(self) -> None:
        for f in self.files.values():
            f.close()

    def describe(self) -> dict[str, Any]:
        return {"format": "safetensors", "path": str(self.directory)}

    def read(self, name: str, dtype: Any, rows: np.ndarray | None = None) -> np.ndarray:
        """Tensor ``name`` in the compute ``dtype``, or only its ``rows`` (an integer array of indices into the
        first axis; the result has shape ``(*rows.shape, *shape[1:])``), read from the file now (never a
        memory map: a file that changed since loading is an Lfm2npError). A fresh, read-only array."""
        info = self.tensors.get(name)
        if info is None:
            raise Lfm2npError(f"{self.directory}: no tensor named {shown(name)}")
        out = self.files[info.file.name].read(name, dtype, rows)
        out.flags.writeable = False
        return out

    def prefetch(self, names: "list[str]") -> None:
        """Start reading these tensors into the page cache in the background (a hint), e.g. the experts a
        layer just chose while the first computes."""
        for name in names:
            info = self.tensors.get(name)
            if info is not None:
                self.files[info.file.name].prefetch(name)

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
        raise Lfm2npError(f"cannot write dtype {shown(dtype)}; expected one of {', '.join(_CODES)}")
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    blobs, offset = [], 0
    for name, arr in tensors.items():
        code = "F32" if name.endswith(keep_float32) else _CODES[dtype]
        if code == "BF16":
            data = bfloat16_bits(arr)
        else:
            data = np.ascontiguousarray(arr, dtype=STORAGE[code])
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
    that :func:`lfm2np.load` reads back. Every expected tensor must be given, with its shape; ``shards`` is
    1 .. the number of tensors (0 wrote an index of no shard, which nothing reads back)."""
    if not isinstance(directory, (str, os.PathLike)) or not str(directory).strip():
        raise Lfm2npError(f"save_checkpoint: directory is {shown(directory)}; expected the path of a directory")
    if isinstance(shards, bool) or not isinstance(shards, int) or not 1 <= shards <= max(1, len(tensors)):
        raise Lfm2npError(f"save_checkpoint: shards is {shown(shards)}; expected 1 .. {max(1, len(tensors))} "
                          f"(the number of tensors)")
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file in the way, a permission
        raise Lfm2npError(f"{directory}: cannot create the checkpoint directory ({e.strerror or e})") from None
    expected = expected_tensors(config)
    for name, shape in expected.items():
        if name not in tensors or tuple(np.shape(tensors[name])) != shape:
            got = "missing" if name not in tensors else f"shape {list(np.shape(tensors[name]))}"
            raise Lfm2npError(f"save_checkpoint: tensor {shown(name)} is {got}; expected shape {list(shape)}")
    d = config.to_dict()
    d["torch_dtype"] = dtype
    if d.pop("sentence_transformers", None) is not None:  # the head: modules.json, 1_Pooling, 1_Dense
        for rel, content in head_files(config).items():
            (directory / rel).parent.mkdir(parents=True, exist_ok=True)
            (directory / rel).write_text(json.dumps(content, indent=2) + "\n")
        head = {DENSE_HEAD: "linear.weight", DENSE_HEAD_BIAS: "linear.bias"}
        if config.dense_out:
            dense_dir = next(directory / rel for rel in head_files(config) if rel.endswith("_Dense/config.json")).parent
            write_safetensors(dense_dir / DENSE_WEIGHTS, {head[n]: tensors[n] for n in head if n in expected}, dtype)
        tensors = {n: a for n, a in tensors.items() if n not in head}
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
