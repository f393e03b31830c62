"""The conformance pack: a self-describing directory of reference outputs a backend's CI runs against.

A pack (``lfm2np conformance make``; docs/conformance.md for backend authors) holds

- ``manifest.json``: the format and lfm2np's version; the model (its name, where it was read, its format, its
  config and the config's hash, the inventory of every tensor of the file: name, shape, stored type and the
  SHA-256 of its bytes; the tokenizer's and chat template's hashes); the reference's numerics; the tiers, each
  with its bounds and where they come from; every case (its id, kind, tier, prompt, what it proves, its steps and
  outputs); and the SHA-256 of every other file of the pack, so that a pack changed by hand is refused naming
  the file;
- ``prompts.json``: every prompt as text (a conversation as the chat template renders it) and as token ids;
- ``cases/<case>.npz``: each case's reference outputs (logits per feed, routing margins, intermediates);
- ``ops/NNN_<name>.npz`` and ``ops/manifest.json``: the per-operator cases (golden vectors: inputs, weights,
  outputs; :mod:`lfm2np.oracle.golden`);
- ``llama.cpp/data/pytorch-<model>.bin`` (float32 logits of the last position), ``-tokens.bin`` (int32 ids),
  ``.txt`` (``i: value`` lines) and ``-prompt.txt``: the files llama.cpp's examples/model-conversion scripts read
  (``check-nmse.py``, ``compare-logits.py``), for one text prompt.

Every ``.npz`` file is written byte for byte the same for the same values (:func:`lfm2np.oracle.golden.save_arrays`),
so a pack made on a cluster is the same files as one made serially.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Config
from ..errors import Lfm2npError
from ..io.files import read_json
from ..io.gguf import open_gguf
from ..io.safetensors import Checkpoint
from .dumps import read_arrays

FORMAT = "lfm2np-conformance"
VERSION = 1
MANIFEST = "manifest.json"
PROMPTS = "prompts.json"
#: the largest manifest read (a big model's tensor inventory is ~1 MB)
MAX_MANIFEST = 64 << 20
KINDS = ("oneshot", "decode", "operator", "llama.cpp")


def config_hash(config: Config) -> str:
    """``sha256:<hex>`` of the config as canonical JSON (:meth:`Config.to_dict`, sorted keys): the same for a
    checkpoint and a GGUF converted from it, different for any other architecture or size."""
    text = json.dumps(config.to_dict(), sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def manifest_digest(manifest: dict[str, Any]) -> str:
    """The SHA-256 of a manifest's canonical JSON without its own ``digest``: a manifest edited by hand no longer
    matches it (the other files are held by their hashes in the manifest)."""
    rest = {k: v for k, v in manifest.items() if k != "digest"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tensor_inventory(path: "str | os.PathLike[str]") -> tuple[str, list[dict[str, Any]]]:
    """``(format, tensors)`` of a checkpoint directory or a ``.gguf`` file: per tensor as stored, in the file's
    names and order, its ``name``, ``shape``, ``type`` (safetensors dtype or ggml type) and the ``sha256`` of its
    bytes. Every byte of every tensor is read (one tensor at a time)."""
    path = Path(path)
    out = []
    if str(path).lower().endswith(".gguf"):
        with open_gguf(path) as f:
            for name, t in f.tensors.items():
                data = f.data(name)
                out.append({"name": name, "shape": list(t.shape), "type": t.ggml_type,
                            "sha256": hashlib.sha256(np.ascontiguousarray(data).data).hexdigest()})
        return "gguf", out
    source = Checkpoint(path)
    try:
        for name in sorted(source.tensors, key=lambda n: (str(source.tensors[n].file), source.tensors[n].begin)):
            info = source.tensors[name]
            raw = source.files[info.file.name].raw(name)
            out.append({"name": name, "shape": list(info.shape), "type": info.dtype,
                        "sha256": hashlib.sha256(np.ascontiguousarray(raw).data).hexdigest()})
    finally:
        source.close()
    return "safetensors", out


def tokenizer_hashes(directory_or_gguf: "str | os.PathLike[str]", tokenizer: Any) -> dict[str, str | None]:
    """The SHA-256 of the tokenizer file (``tokenizer.json``, or the GGUF file's tokenizer as it renders) and of
    the chat template's text."""
    path = Path(directory_or_gguf)
    file = path / "tokenizer.json"
    template = getattr(tokenizer, "chat_template", None)
    return {"tokenizer_json": file_sha256(file) if file.is_file() else None,
            "chat_template": hashlib.sha256(template.encode()).hexdigest() if template else None}


# ------------------------------------------------------------------------------------- reading a pack
class Pack:
    """A pack read back and verified: its manifest, and the arrays of its files on demand."""

    def __init__(self, directory: Path, manifest: dict[str, Any]):
        self.directory, self.manifest = directory, manifest
        self.cases: list[dict[str, Any]] = manifest["cases"]
        self.by_id = {c["id"]: c for c in self.cases}

    @classmethod
    def open(cls, directory: "str | os.PathLike[str]", verify: bool = True) -> "Pack":
        """Read ``directory``'s manifest and (``verify``) check every file it lists against its SHA-256: a file
        missing or changed since the pack was made is an :class:`Lfm2npError` naming it."""
        directory = Path(directory)
        if not directory.is_dir():
            raise Lfm2npError(f"{directory}: not a directory; a conformance pack is the directory "
                              f"'lfm2np conformance make' writes")
        path = directory / MANIFEST
        if not path.is_file():
            raise Lfm2npError(f"{directory}: no {MANIFEST}: not a conformance pack")
        manifest = read_json(path, "conformance manifest", MAX_MANIFEST)
        _check_manifest(path, manifest)
        if verify and manifest.get("digest") != manifest_digest(manifest):
            raise Lfm2npError(f"{path}: its digest does not match its content: the manifest was edited after the "
                              f"pack was made (make it again rather than editing it)")
        if verify:
            for rel, digest in manifest["files"].items():
                file = directory / rel
                if not file.is_file():
                    raise Lfm2npError(f"{file}: listed in {MANIFEST} but missing: the pack is incomplete")
                if file_sha256(file) != digest:
                    raise Lfm2npError(f"{file}: its SHA-256 differs from the one {MANIFEST} records: the pack was "
                                      f"changed after it was made (make it again rather than editing it)")
        return cls(directory, manifest)

    @property
    def config_hash(self) -> str:
        return self.manifest["model"]["config_hash"]

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["model"]["config"]["vocab_size"])

    def arrays(self, rel: str) -> dict[str, np.ndarray]:
        """The arrays of one of the pack's files (``cases/x.npz``, ``ops/003_y.npz``)."""
        return read_arrays(self.directory / rel, True)[0]

    def reference(self, case: dict[str, Any]) -> dict[str, np.ndarray]:
        return self.arrays(case["file"])

    def prompts(self) -> list[dict[str, Any]]:
        return read_json(self.directory / PROMPTS, "prompts", MAX_MANIFEST)


def _check_manifest(path: Path, m: Any) -> None:
    """The manifest's structure: what the check reads, each field of its type (a hand-made or truncated
    manifest is an error naming the field)."""
    def need(cond: bool, what: str) -> None:
        if not cond:
            raise Lfm2npError(f"{path}: {what}")

    need(isinstance(m, dict), "not a JSON object")
    need(m.get("format") == FORMAT, f"format is {m.get('format')!r:.40}; expected {FORMAT!r}")
    need(m.get("version") == VERSION, f"version {m.get('version')!r:.20}: this lfm2np reads version {VERSION}")
    model = m.get("model")
    need(isinstance(model, dict) and isinstance(model.get("config"), dict)
         and isinstance(model.get("config_hash"), str), "model (with config and config_hash) missing")
    need(isinstance(model["config"].get("vocab_size"), int), "model.config.vocab_size missing")
    need(isinstance(m.get("files"), dict) and all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in m["files"].items()), "files must map paths to hashes")
    for rel in m["files"]:
        parts = Path(rel).parts
        need(bool(parts) and not Path(rel).is_absolute() and ".." not in parts,
             f"files lists {rel!r:.80}, outside the pack")
    need(isinstance(m.get("tiers"), dict), "tiers missing")
    cases = m.get("cases")
    need(isinstance(cases, list) and cases, "cases missing")
    seen = set()
    for n, c in enumerate(cases):
        need(isinstance(c, dict) and isinstance(c.get("id"), str) and c.get("kind") in KINDS,
             f"case {n} has no id or an unknown kind")
        need(c["id"] not in seen, f"case {c['id']!r} is listed twice")
        seen.add(c["id"])
        need(c.get("tier") in m["tiers"], f"case {c['id']!r}: tier {c.get('tier')!r:.20} is not among the tiers")
        need(isinstance(c.get("file"), str) and c["file"] in m["files"], f"case {c['id']!r}: its file is not listed")
        if c["kind"] == "operator":
            need(isinstance(c.get("outputs"), dict) and all(isinstance(k, str) and isinstance(v, str)
                                                            for k, v in c["outputs"].items())
                 and isinstance(c.get("ids"), list), f"case {c['id']!r}: outputs or ids missing")
        if c["kind"] == "llama.cpp":
            need(isinstance(c.get("ids"), list) and isinstance(c.get("text"), str), f"case {c['id']!r}: ids missing")
        if c["kind"] in ("oneshot", "decode"):
            need(isinstance(c.get("feeds"), list) and c["feeds"], f"case {c['id']!r}: feeds missing")
            for f in c["feeds"]:
                need(isinstance(f, dict) and all(isinstance(f.get(k), int) for k in ("seq", "start", "length"))
                     and f["length"] >= 1 and isinstance(f.get("ids"), list), f"case {c['id']!r}: a feed is malformed")
