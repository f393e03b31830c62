"""Finding a checkpoint: a directory, a repo id already in the local Hugging Face cache (offline), or the
embedded tiny model (the name ``"embedded"``, shipped in ``lfm2np/data``).

The cache is found and read by ``huggingface_hub`` itself (a dependency of ``tokenizers``, and of
lfm2np): its cache directory (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
``~/.cache/huggingface/hub``, read when huggingface_hub is imported) and
``snapshot_download(repo_id, local_files_only=True)``, which returns the snapshot ``refs/main`` names
and never touches the network. A cache without ``refs/main`` (copied by hand, say) is accepted when it
holds exactly one snapshot, found with ``scan_cache_dir``. Nothing is ever downloaded.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants

from ..errors import Lfm2npError

#: the model name that means the tiny model shipped inside lfm2np (a directory of that name is ``./embedded``)
EMBEDDED_NAME = "embedded"
#: its directory under ``lfm2np/data``
EMBEDDED_DIR = "tiny-lfm2-moe"


def embedded_model_path() -> Path:
    """The directory of the embedded tiny model (config.json, model.safetensors, tokenizer files)."""
    path = Path(str(resources.files("lfm2np") / "data" / EMBEDDED_DIR))
    if not (path / "config.json").is_file():
        raise Lfm2npError(f"{path}: the embedded model is missing from this installation")
    return path


def hub_cache() -> Path:
    """The Hugging Face hub cache directory, as huggingface_hub resolves it."""
    return Path(huggingface_hub.constants.HF_HUB_CACHE).expanduser()


def looks_like_repo_id(model: "str | os.PathLike[str]") -> bool:
    """``org/name``, and not an existing path."""
    text = str(model)
    return text.count("/") == 1 and not text.startswith(("/", ".", "~")) and not text.endswith("/") \
        and not Path(text).exists()


def is_cached(model: str) -> bool:
    """Whether ``model`` is a repo id (``org/name``) with a snapshot in the local cache."""
    if not looks_like_repo_id(model):
        return False
    try:
        _cached_snapshot(str(model))
    except Lfm2npError:
        return False
    return True


def _cached_snapshot(repo: str) -> Path:
    hub = huggingface_hub
    cache = hub_cache()
    try:
        return Path(hub.snapshot_download(repo, cache_dir=cache, local_files_only=True))
    except Exception:  # any way of not finding it locally (the error classes moved between versions)
        pass  # not there with a refs/main: perhaps one snapshot without refs
    if not (cache / ("models--" + repo.replace("/", "--"))).is_dir():
        raise Lfm2npError(f"{repo}: not a directory and not in the Hugging Face cache ({cache}); "
                          f"lfm2np never downloads: fetch it first, e.g. `hf download {repo}`")
    try:
        found = [r for r in hub.scan_cache_dir(cache).repos if r.repo_id == repo and r.repo_type == "model"]
    except Exception as e:  # CacheNotFound, CorruptedCacheException, OSError
        raise Lfm2npError(f"{repo}: the Hugging Face cache {cache} cannot be read ({e})") from None
    revisions = sorted((r for repo_info in found for r in repo_info.revisions), key=lambda r: r.commit_hash)
    if len(revisions) == 1:
        return Path(revisions[0].snapshot_path)
    if revisions:
        raise Lfm2npError(f"{repo}: {len(revisions)} cached snapshots and no refs/main in "
                          f"{cache / ('models--' + repo.replace('/', '--'))}; pass the snapshot directory")
    raise Lfm2npError(f"{repo}: not a directory and not in the Hugging Face cache ({cache}) (no snapshot); "
                      f"lfm2np never downloads: fetch it first, e.g. `hf download {repo}`")


def resolve(model: "str | os.PathLike[str]") -> Path:
    """A checkpoint directory for ``model``: the path itself when it is a directory, else the cached
    snapshot of the repo id ``org/name`` (the ``refs/main`` revision, or the only snapshot); the name
    ``"embedded"`` (exactly that string) is the embedded model's directory."""
    if isinstance(model, str) and model == EMBEDDED_NAME:
        return embedded_model_path()
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if looks_like_repo_id(model):
        return _cached_snapshot(str(model))
    raise Lfm2npError(f"{model}: not a checkpoint directory")
