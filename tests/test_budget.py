"""The memory budget: what is kept, in which order, and that no budget changes a single logit."""

from __future__ import annotations

import numpy as np
import pytest

import lfm2np
from lfm2np.io import params as P
from lfm2np.io.safetensors import save_checkpoint
from lfm2np.synthetic import random_params


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory):
    config = lfm2np.load_config("tiny-moe")
    return save_checkpoint(tmp_path_factory.mktemp("budget"), config, random_params(config, seed=5), "bfloat16")


IDS = list(range(1, 60))


def test_no_budget_changes_a_logit(moe_checkpoint):
    ref = lfm2np.load(moe_checkpoint, memory_budget="all").forward(IDS)
    for budget in (0, 10_000, 100_000, 250_000, "300KB", None):
        m = lfm2np.load(moe_checkpoint, memory_budget=budget)
        np.testing.assert_array_equal(m.forward(IDS), ref)
        np.testing.assert_array_equal(m.forward(IDS), ref)  # again, with whatever it kept
        report = m.memory_report()
        if report["budget_bytes"] is not None:
            assert report["resident_bytes"] <= report["budget_bytes"]


def test_every_token_tensors_come_first_then_experts_least_recently_used(moe_checkpoint):
    everything = lfm2np.load(moe_checkpoint, memory_budget="all")
    everything.forward(IDS)
    full = everything.memory_report()
    need = full["every_token"]["needed_bytes"]
    expert = full["experts"]["bytes"] // full["experts"]["of"]
    m = lfm2np.load(moe_checkpoint, memory_budget=need + 30 * expert)  # 30 of the 54 expert tensors
    s = None
    for token in IDS:  # decoding: every step uses every every-token tensor and a few experts
        _, s = m.step([token], s)
        r = m.memory_report()
        assert r["resident_bytes"] <= r["budget_bytes"]
    r = m.memory_report()
    assert r["every_token"]["kept"] == r["every_token"]["of"]  # all kept, though experts came in between
    assert r["experts"]["cached"] == 30 and r["experts"]["evictions"] > 0 and r["experts"]["hits"] > 0


def test_a_budget_below_the_every_token_tensors_keeps_what_fits(moe_checkpoint):
    m = lfm2np.load(moe_checkpoint, memory_budget=20_000)
    m.forward(IDS)
    r = m.memory_report()
    assert 0 < r["every_token"]["kept"] < r["every_token"]["of"] and r["experts"]["cached"] == 0


def test_budget_spellings_and_errors():
    assert P.parse_budget("6GiB", 0) == 6 * 2**30 and P.parse_budget("500MB", 0) == 500 * 10**6
    assert P.parse_budget("all", 0) is None and P.parse_budget(0, 0) == 0 and P.parse_budget(1234, 0) == 1234
    for bad in ("lots", "-1GB", -5, 1.5, True, [1]):
        with pytest.raises(lfm2np.Lfm2npError, match="memory budget"):
            P.parse_budget(bad, 0)


@pytest.mark.parametrize("text, size", [("8G", 8 * 2**30), ("8g", 8 * 2**30), ("512M", 512 * 2**20),
                                        ("512m", 512 * 2**20), ("1.5k", 1536), ("2T", 2 * 2**40), ("2 t", 2 * 2**40),
                                        ("8GB", 8 * 10**9), ("8GiB", 8 * 2**30), ("4096", 4096), ("4096B", 4096)])
def test_one_size_reader_for_the_api_and_the_command_line(text, size):
    """One-letter units are binary, any case (GNU tools, Docker, the JVM); the command line's reader is the same
    function as load()'s memory_budget."""
    from lfm2np import calc

    assert P.parse_size(text) == calc.parse_bytes(text) == P.parse_budget(text, 0) == size


def test_load_takes_a_budget_with_a_one_letter_unit(moe_checkpoint):
    assert lfm2np.load(moe_checkpoint, memory_budget="8G").memory_report()["budget_bytes"] == 8 * 2**30
    for bad in ("8X", "8Gi", "G", "8 GG", "8e9"):
        with pytest.raises(lfm2np.Lfm2npError, match=f"memory budget '{bad}' is not a size"):
            lfm2np.load(moe_checkpoint, memory_budget=bad)


def test_the_default_budget_follows_available_memory(monkeypatch):
    monkeypatch.setattr(P, "available_memory", lambda: 100 * 2**30)
    assert P.default_budget(10 * 2**30) is None  # fits a fifth: keep everything
    assert P.default_budget(50 * 2**30) == 20 * 2**30
    monkeypatch.setattr(P, "available_memory", lambda: 2 * 2**30)
    assert P.default_budget(50 * 2**30) == 2**30  # at least 1 GiB


def test_keep_weights_still_means_everything_or_nothing_and_warns(moe_checkpoint):
    with pytest.warns(DeprecationWarning, match="memory_budget"):
        assert lfm2np.load(moe_checkpoint, keep_weights=True).memory_report()["budget_bytes"] is None
    with pytest.warns(DeprecationWarning, match="memory_budget"):
        assert lfm2np.load(moe_checkpoint, keep_weights=False).memory_report()["budget_bytes"] == 0
    with pytest.raises(lfm2np.Lfm2npError, match="not both"):
        lfm2np.load(moe_checkpoint, keep_weights=True, memory_budget="1GiB")


def test_an_in_memory_model_reports_everything():
    c = lfm2np.load_config("tiny-dense")
    r = lfm2np.Model(c, random_params(c)).memory_report()
    assert r["resident_bytes"] == r["all_tensors_bytes"] > 0


def test_a_lazy_checkpoint_reads_the_next_layer_and_the_chosen_experts_ahead(moe_checkpoint, monkeypatch):
    """With tensors read at use, the forward asks the kernel (posix_fadvise WILLNEED) for what comes next:
    the next layer's tensors while a layer runs, and an MoE layer's chosen experts once the router chose."""
    import os

    from lfm2np.io.safetensors_file import SafetensorsFile

    asked: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, advice: asked.append((off, n)), raising=False)
    monkeypatch.setattr(os, "POSIX_FADV_WILLNEED", getattr(os, "POSIX_FADV_WILLNEED", 3), raising=False)
    m = lfm2np.load(moe_checkpoint, memory_budget=0)
    m.forward([1, 2, 3])
    f = SafetensorsFile(moe_checkpoint / "model.safetensors")
    ranges = {name: (f.data_start + t.begin, t.end - t.begin) for name, t in f.tensors.items()}
    chosen = {n for n, r in ranges.items() if r in asked}
    assert "model.layers.1.operator_norm.weight" in chosen  # the next layer, ahead of it
    experts = {n for n in chosen if ".experts." in n}
    assert experts and len(experts) < sum(".experts." in n for n in ranges)  # the chosen ones, not all
