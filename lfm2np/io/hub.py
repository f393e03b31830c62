"""Finding a checkpoint: a directory, or a repo id already in the local Hugging Face cache (offline).

The cache layout (``huggingface_hub``) is ``$HF_HUB_CACHE/models--{org}--{name}/snapshots/{revision}/``
with ``refs/main`` naming the revision last downloaded. ``$HF_HUB_CACHE`` defaults to
``$HF_HOME/hub``, and ``$HF_HOME`` to ``~/.cache/huggingface``. Nothing is ever downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import Lfm2npError


def hub_cache() -> Path:
    """The Hugging Face hub cache directory, following the same environment variables as huggingface_hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def is_cached(model: str) -> bool:
    """Whether ``model`` looks like a repo id (``org/name``) with a snapshot in the local cache."""
    text = str(model)
    if text.count("/") != 1 or text.startswith(("/", ".", "~")) or Path(text).exists():
        return False
    return (hub_cache() / ("models--" + text.replace("/", "--")) / "snapshots").is_dir()


def resolve(model: "str | os.PathLike[str]") -> Path:
    """A checkpoint directory for ``model``: the path itself when it is a directory, else the cached
    snapshot of the repo id ``org/name`` (the ``refs/main`` revision, or the only snapshot)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    text = str(model)
    if text.count("/") == 1 and not text.startswith(("/", ".", "~")) and not path.exists():
        repo = hub_cache() / ("models--" + text.replace("/", "--"))
        snapshots = repo / "snapshots"
        if snapshots.is_dir():
            ref = repo / "refs" / "main"
            if ref.is_file():
                snap = snapshots / ref.read_text().strip()
                if snap.is_dir():
                    return snap
            found = sorted(p for p in snapshots.iterdir() if p.is_dir())
            if len(found) == 1:
                return found[0]
            if found:
                raise Lfm2npError(f"{text}: {len(found)} cached snapshots and no refs/main in {repo}; "
                                  f"pass the snapshot directory")
        raise Lfm2npError(f"{text}: not a directory and not in the Hugging Face cache ({hub_cache()}); "
                          f"lfm2np never downloads: fetch it first, e.g. `hf download {text}`")
    raise Lfm2npError(f"{text}: not a checkpoint directory")
