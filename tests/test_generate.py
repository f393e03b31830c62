"""Sampling and the generation loop."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import lfm2np
from lfm2np.generate import Generation, Sampling, generate, sample
from lfm2np.synthetic import random_model

from conftest import golden, model


def test_greedy_generation_equals_recomputing_the_whole_sequence(case):
    """Each greedy token is the argmax of a from-scratch forward over everything so far."""
    m = model(case)
    prompt = list(golden(case)["logits.T5.ids"])
    out = generate(m, prompt, 8, stop_ids=[])
    seq = list(prompt)
    for token in out:
        assert token == int(np.argmax(m.forward(seq)[-1]))
        seq.append(token)
    assert len(out) == 8


def test_stops_on_a_stop_id_which_is_not_yielded():
    m = random_model(lfm2np.load_config("tiny-moe"), seed=11)
    free = generate(m, [1, 2, 3], 10, stop_ids=[])
    stop = free[3]
    first = free.index(stop)
    g = Generation(m, [1, 2, 3], 10, stop_ids=[stop])
    out = list(g)
    assert out == free[:first] and g.finish_reason == "stop" and g.stop_id == stop
    g = Generation(m, [1, 2, 3], 2, stop_ids=[])
    assert list(g) == free[:2] and g.finish_reason == "length"


def test_default_stop_ids_are_the_config_eos():
    m = random_model(lfm2np.load_config("tiny-dense"), seed=0)
    assert Generation(m, [1], 4).stop_ids == frozenset(m.config.eos_token_id)


def test_generation_streams_one_token_per_step():
    m = random_model(lfm2np.load_config("tiny-dense"), seed=3)
    calls = []
    real_step = m.step
    m.step = lambda ids, state=None: (calls.append(len(ids)), real_step(ids, state))[1]
    it = iter(Generation(m, [5, 6, 7, 8], 5, stop_ids=[]))
    next(it)
    assert calls == [4]  # the prompt's prefill, nothing more yet
    next(it)
    assert calls == [4, 1]
    assert len(list(it)) == 3 and calls == [4, 1, 1, 1, 1]


def test_state_after_generation_continues_the_sequence():
    m = random_model(lfm2np.load_config("tiny-moe"), seed=4)
    g = Generation(m, [1, 9, 4], 5, stop_ids=[])
    tokens = list(g)
    assert g.state.position == 3 + len(tokens) - 1  # the last token is returned, not yet fed
    logits, _ = m.step(tokens[-1:], g.state)
    np.testing.assert_allclose(logits[-1], m.forward([1, 9, 4, *tokens])[-1], rtol=1e-5, atol=1e-5)


def test_seeded_sampling_is_reproducible_and_seeds_differ():
    m = random_model(lfm2np.load_config("tiny-dense"), seed=5)
    a = generate(m, [1, 2], 12, temperature=2.0, seed=123, stop_ids=[])
    b = generate(m, [1, 2], 12, temperature=2.0, seed=123, stop_ids=[])
    c = generate(m, [1, 2], 12, temperature=2.0, seed=124, stop_ids=[])
    assert a == b and a != c


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 1000), temperature=st.floats(0.1, 5), V=st.integers(2, 50))
def test_top_k_one_and_tiny_top_p_are_greedy(seed, temperature, V):
    logits = np.random.default_rng(seed).standard_normal(V) * 3
    rng = np.random.default_rng(seed)
    greedy = int(np.argmax(logits))
    assert sample(logits, Sampling(temperature, top_k=1), rng) == greedy
    assert sample(logits, Sampling(temperature, top_p=1e-9), rng) == greedy


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 1000), k=st.integers(1, 10), p=st.floats(0.05, 1.0))
def test_samples_stay_inside_top_k_and_the_nucleus(seed, k, p):
    logits = np.random.default_rng(seed).standard_normal(12) * 2
    rng = np.random.default_rng(seed + 1)
    order = np.argsort(-logits, kind="stable")
    probs = np.exp(logits[order[:k]] - logits[order[0]])
    probs /= probs.sum()
    nucleus = set(order[: int(np.searchsorted(np.cumsum(probs), p)) + 1].tolist())
    for _ in range(50):
        assert sample(logits, Sampling(1.0, top_k=k, top_p=p), rng) in nucleus


def test_sampling_follows_the_softmax():
    logits = np.array([2.0, 1.0, 0.0, -1.0])
    rng = np.random.default_rng(0)
    n = 40_000
    counts = np.bincount([sample(logits, Sampling(temperature=0.5), rng) for _ in range(n)], minlength=4)
    expected = np.exp(logits / 0.5) / np.exp(logits / 0.5).sum()
    np.testing.assert_allclose(counts / n, expected, atol=0.01)


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -1}, "temperature"),
    ({"top_k": -2}, "top_k"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
])
def test_bad_sampling_settings(kwargs, message):
    with pytest.raises(lfm2np.Lfm2npError, match=message):
        Sampling(**kwargs)


def test_bad_generation_arguments():
    m = random_model(lfm2np.load_config("tiny-dense"), seed=0)
    with pytest.raises(lfm2np.Lfm2npError, match="max_new_tokens"):
        Generation(m, [1], -1)
    with pytest.raises(lfm2np.Lfm2npError, match="outside the vocabulary"):
        Generation(m, [1, 1000], 3)
    g = Generation(m, [1], 0)
    assert list(g) == [] and g.finish_reason == "length"
    with pytest.raises(lfm2np.Lfm2npError, match="iterated once"):
        list(g)
