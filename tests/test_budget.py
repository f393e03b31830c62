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


def _reads(model, monkeypatch, delay: float = 0.0) -> list[tuple[str, str]]:
    """(tensor, thread) of every read of ``model``'s source, in call order (``delay``: a slow disk)."""
    import threading
    import time

    source, seen = model.params.source, []
    inner = source.read

    def read(name, dtype, rows=None):
        seen.append((name, threading.current_thread().name))
        time.sleep(delay)
        return inner(name, dtype, rows)

    monkeypatch.setattr(source, "read", read)
    return seen


def test_each_chosen_expert_is_converted_once_per_layer_in_the_order_of_the_products(moe_checkpoint, monkeypatch):
    """A prefill converts each expert an MoE layer chose once, for all the tokens that chose it, expert by
    expert in increasing order, w1, w3, w2: the background thread ahead of the products, the caller
    converting what the thread has not started yet."""
    from lfm2np.schema import expert_names

    ref = lfm2np.load(moe_checkpoint, memory_budget="all").forward(IDS)
    m = lfm2np.load(moe_checkpoint, memory_budget=0)
    reads = _reads(m, monkeypatch, delay=0.002)
    chosen: dict[int, np.ndarray] = {}
    logits = m.forward(IDS, record=lambda name, value: chosen.__setitem__(int(name.split(".")[2]), np.unique(value))
                       if name.endswith("selected_experts") else None)
    np.testing.assert_array_equal(logits, ref)
    assert chosen and all(len(e) > 1 for e in chosen.values())
    for layer, experts in chosen.items():
        want = [n for e in experts for n in expert_names(layer, int(e))]
        got = [(n, t) for n, t in reads if n.startswith(f"model.layers.{layer}.feed_forward.experts.")]
        assert sorted(n for n, _ in got) == sorted(want)  # each chosen expert's tensors once, no other expert
        for thread in {t for _, t in got}:  # each thread in the products' order
            mine = [n for n, t in got if t == thread]
            assert mine == [n for n in want if n in mine]
    assert any(t == "lfm2np-ahead" for _, t in reads)  # converted ahead while the products ran


def _until(condition, seconds: float = 10.0) -> None:
    import time

    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.005)


def test_conversion_ahead_keeps_at_most_its_window_and_hands_over_errors(monkeypatch):
    import threading
    import time

    from lfm2np import weights

    started, gate = [], threading.Event()

    def convert(name):
        started.append(name)
        gate.wait(10)
        if name == "bad":
            raise lfm2np.Lfm2npError("cannot read bad")
        return np.array([len(started)], np.float32)

    monkeypatch.setattr(weights, "AHEAD_IDLE_SECONDS", 0.1)
    ahead = weights._Ahead(convert, window=2)
    ahead.ask(["a", "b", "c", "bad", "d"])
    _until(lambda: started == ["a"])
    gate.set()
    _until(lambda: len(ahead._done) == 2)
    time.sleep(0.05)
    assert started == ["a", "b"]  # two converted and waiting: no third
    assert ahead.take("a")[0] == 1 and ahead.take("b")[0] == 2
    _until(lambda: "bad" in started)  # room for two more
    assert ahead.take("c")[0] == 3
    with pytest.raises(lfm2np.Lfm2npError, match="cannot read bad"):  # the thread's error, raised here
        ahead.take("bad")
    _until(lambda: "d" in started)
    assert ahead.take("d")[0] == 5 and ahead.take("zzz") is None  # never asked for: the caller converts it
    assert started == ["a", "b", "c", "bad", "d"]  # in the order asked, each once
    ahead.ask(["x", "y"])  # a new layer's choice
    _until(lambda: "y" in started)
    assert ahead.take("x")[0] == 6 and ahead.take("y")[0] == 7
    _until(lambda: not ahead._running)  # nothing left to do: the thread stops (and holds nothing)
    ahead.ask(["p"])  # and starts again
    _until(lambda: "p" in started)
    assert ahead.take("p")[0] == 8


def test_freed_memory_is_given_back_every_few_moe_layers_that_convert_ahead(moe_checkpoint, monkeypatch):
    """glibc's malloc_trim every TRIM_EVERY MoE layers whose chosen experts are converted ahead (the threads'
    freed matrices otherwise stay in their heaps); the logits are the same."""
    from lfm2np import weights

    calls = []
    monkeypatch.setattr(weights, "_TRIM", lambda pad: calls.append(pad) or 0)
    monkeypatch.setattr(weights, "_ASKS", 0)
    ref = lfm2np.load(moe_checkpoint, memory_budget="all").forward(IDS)
    calls.clear()
    monkeypatch.setattr(weights, "_ASKS", 0)
    m = lfm2np.load(moe_checkpoint, memory_budget=0)  # nothing kept: every MoE layer converts its experts
    moe_layers = sum(m.config.is_moe_layer(i) for i in range(m.config.num_hidden_layers))
    runs = -(-2 * weights.TRIM_EVERY // moe_layers)  # enough forwards for two trims at least
    for _ in range(runs):
        np.testing.assert_array_equal(m.forward(IDS), ref)
    asks = weights._ASKS
    assert asks >= runs * moe_layers >= 2 * weights.TRIM_EVERY
    assert calls == [0] * (asks // weights.TRIM_EVERY) and calls
