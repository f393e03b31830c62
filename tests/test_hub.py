"""Resolving a repo id in the local Hugging Face cache through huggingface_hub (never downloading)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import huggingface_hub.constants
import numpy as np
import pytest

import lfm2np
from lfm2np.io.hub import hub_cache, is_cached, resolve

from conftest import GOLDEN


def fake_cache(root, repo, revisions, main=None):
    """A cache laid out as huggingface_hub writes it (snapshots/<revision>/ and refs/main)."""
    base = root / ("models--" + repo.replace("/", "--"))
    for rev in revisions:
        shutil.copytree(GOLDEN / "dense-legacy", base / "snapshots" / rev)
    (base / "blobs").mkdir(parents=True, exist_ok=True)
    if main:
        (base / "refs").mkdir(parents=True)
        (base / "refs" / "main").write_text(main)
    return base


@pytest.fixture
def cache(monkeypatch, tmp_path):
    """Point huggingface_hub (and so lfm2np) at an empty cache in tmp_path."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    return tmp_path


def test_the_cache_is_where_huggingface_hub_says_following_the_environment(tmp_path):
    code = "from lfm2np.io.hub import hub_cache; print(hub_cache())"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    for extra, want in [({"HF_HUB_CACHE": str(tmp_path / "hub1")}, tmp_path / "hub1"),
                        ({"HF_HOME": str(tmp_path / "home")}, tmp_path / "home" / "hub")]:
        out = subprocess.run([sys.executable, "-c", code], env={**env, **extra}, capture_output=True, text=True,
                             check=True).stdout.strip()
        assert out == str(want)


def test_repo_id_resolves_to_the_main_snapshot(cache):
    base = fake_cache(cache, "LiquidAI/LFM2-Tiny", ["a" * 40, "b" * 40], main="b" * 40)
    assert resolve("LiquidAI/LFM2-Tiny") == base / "snapshots" / ("b" * 40)
    assert is_cached("LiquidAI/LFM2-Tiny") and hub_cache() == cache
    m = lfm2np.load("LiquidAI/LFM2-Tiny")
    np.testing.assert_array_equal(m.forward([1, 2]), lfm2np.load(GOLDEN / "dense-legacy").forward([1, 2]))


def test_a_single_snapshot_needs_no_ref(cache):
    base = fake_cache(cache, "org/one", ["c" * 40])
    assert resolve("org/one") == base / "snapshots" / ("c" * 40)


def test_ambiguous_or_missing_repos(cache):
    fake_cache(cache, "org/two", ["1" * 40, "2" * 40])
    with pytest.raises(lfm2np.Lfm2npError, match="2 cached snapshots and no refs/main"):
        resolve("org/two")
    with pytest.raises(lfm2np.Lfm2npError, match="not in the Hugging Face cache.*never downloads"):
        resolve("LiquidAI/LFM2-350M")
    assert not is_cached("LiquidAI/LFM2-350M") and not is_cached("not-a-repo-id")
    with pytest.raises(lfm2np.Lfm2npError, match="not a checkpoint directory"):
        resolve("a/b/c")


def test_nothing_is_downloaded(cache, monkeypatch):
    """A repo id missing from the cache is an error without a single network request."""
    import huggingface_hub.file_download  # noqa: F401  (loaded, so its references are patched too)

    def no_network(*args, **kwargs):
        raise AssertionError("lfm2np tried to reach the network")

    for module in [m for name, m in sys.modules.items() if name.startswith("huggingface_hub")]:
        for name in ("get_session", "get_async_session", "http_backoff", "get_hf_file_metadata"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, no_network)
    with pytest.raises(lfm2np.Lfm2npError, match="never downloads"):
        resolve("LiquidAI/LFM2-350M")
