"""Resolving a repo id in the local Hugging Face cache (never downloading)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import lfm2np
from lfm2np.io.hub import hub_cache, resolve

from conftest import GOLDEN


def fake_cache(root, repo, revisions, main=None):
    base = root / ("models--" + repo.replace("/", "--"))
    for rev in revisions:
        shutil.copytree(GOLDEN / "dense-legacy", base / "snapshots" / rev)
    if main:
        (base / "refs").mkdir(parents=True)
        (base / "refs" / "main").write_text(main + "\n")
    return base


def test_cache_location_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub1"))
    assert hub_cache() == tmp_path / "hub1"
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub_cache() == tmp_path / "home" / "hub"


def test_repo_id_resolves_to_the_main_snapshot(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    base = fake_cache(tmp_path, "LiquidAI/LFM2-Tiny", ["aaa", "bbb"], main="bbb")
    assert resolve("LiquidAI/LFM2-Tiny") == base / "snapshots" / "bbb"
    m = lfm2np.load("LiquidAI/LFM2-Tiny")
    np.testing.assert_array_equal(m.forward([1, 2]), lfm2np.load(GOLDEN / "dense-legacy").forward([1, 2]))


def test_a_single_snapshot_needs_no_ref(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    base = fake_cache(tmp_path, "org/one", ["ccc"])
    assert resolve("org/one") == base / "snapshots" / "ccc"


def test_ambiguous_or_missing_repos(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    fake_cache(tmp_path, "org/two", ["a1", "b2"])
    with pytest.raises(lfm2np.Lfm2npError, match="2 cached snapshots and no refs/main"):
        resolve("org/two")
    with pytest.raises(lfm2np.Lfm2npError, match="not in the Hugging Face cache.*never downloads"):
        resolve("LiquidAI/LFM2-350M")
