"""Sampling and the generation loop: the processors against transformers' own (tests/golden/sampling.json,
written by tools/make_sampling_reference.py), the checkpoint's generation_config.json, batched generation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import lfm2np
from lfm2np.generate import (Generation, Sampling, generate, generation_defaults, probabilities, process_logits,
                             read_generation_config, sample, sampling_for)
from lfm2np.oracle.tolerance import FP32, rel_error
from lfm2np.synthetic import random_model

from conftest import GOLDEN, golden, model

SAMPLING = json.loads((GOLDEN / "sampling.json").read_text())


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


def test_stop_ends_the_generation_between_two_ids_as_interrupted():
    """stop() from the consuming loop: no further step, finish_reason "interrupted", and the state holds every id
    yielded but the last (as after "length"), so the conversation continues from it."""
    m = random_model(lfm2np.load_config("tiny-moe"), seed=4)
    free = generate(m, [1, 9, 4], 8, stop_ids=[])
    calls = []
    real_step = m.step
    m.step = lambda ids, state=None: (calls.append(len(ids)), real_step(ids, state))[1]
    g, out = Generation(m, [1, 9, 4], 8, stop_ids=[]), []
    for token in g:
        out.append(token)
        if len(out) == 3:
            g.stop()
    assert out == g.tokens == free[:3] and g.finish_reason == "interrupted" and g.stop_id is None
    assert calls == [3, 1, 1] and g.state.position == 3 + 2
    g.stop()  # again, after the end: nothing changes
    assert g.finish_reason == "interrupted"
    before = Generation(m, [1, 9, 4], 8, stop_ids=[])
    before.stop()  # before iterating: nothing is computed
    assert list(before) == [] and before.finish_reason == "interrupted" and before.state is None and calls == [3, 1, 1]
    done = Generation(m, [1, 9, 4], 2, stop_ids=[])
    assert list(done) == free[:2]
    done.stop()  # the generation had ended on its own: its reason stays
    assert done.finish_reason == "length"


def test_no_new_tokens_feeds_nothing_and_keeps_the_state():
    m = random_model(lfm2np.load_config("tiny-dense"), seed=3)
    _, state = m.step([5, 6, 7])
    calls = []
    m.step = lambda *a, **k: calls.append(a)
    g = Generation(m, [8, 9], 0, state=state)
    assert list(g) == [] and g.finish_reason == "length" and g.state is state and calls == []


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
    """The nucleus, by its definition: the most likely tokens (of the top k) whose mass before them is below p."""
    logits = np.random.default_rng(seed).standard_normal(12) * 2
    rng = np.random.default_rng(seed + 1)
    order = np.argsort(-logits, kind="stable")
    probs = np.exp(logits[order[:k]] - logits[order[0]])
    probs /= probs.sum()
    before = np.concatenate([[0.0], np.cumsum(probs)[:-1]])
    nucleus = set(order[:k][before < p - 1e-12].tolist())
    for _ in range(50):
        assert sample(logits, Sampling(1.0, top_k=k, top_p=p), rng) in nucleus


@pytest.mark.parametrize("case", SAMPLING["cases"], ids=lambda c: c["name"])
def test_processors_equal_transformers(case, tmp_path):
    """The checkpoint's generation_config.json read as transformers reads it (defaults included), then the
    processors in transformers' order: the same tokens removed, the same processed logits and probabilities."""
    (tmp_path / "generation_config.json").write_text(json.dumps(case["generation_config"]))
    s = sampling_for(generation_defaults(tmp_path))
    logits = np.array(case["logits"], np.float32)
    ours = process_logits(logits, s, case["seen"])
    theirs = np.array([-np.inf if x is None else x for x in case["processed"]])
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(theirs))
    assert rel_error(ours, theirs) <= FP32.op_rel
    if s.greedy:
        assert sample(logits, s, np.random.default_rng(0), case["seen"]) == case["argmax"]
    else:
        assert rel_error(probabilities(logits, s, case["seen"]), np.array(case["probabilities"])) <= FP32.op_rel


def test_the_reference_covers_every_processor_in_transformers_order():
    order = ["RepetitionPenaltyLogitsProcessor", "TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper",
             "MinPLogitsWarper"]
    seen = set()
    for case in SAMPLING["cases"]:
        names = case["processors"]
        assert names == sorted(names, key=order.index)
        seen.update(names)
    assert seen == set(order)


def test_repetition_penalty_counts_the_prompt_and_the_generated_ids():
    """Greedy with a huge penalty never repeats a token it has seen (prompt included)."""
    m = random_model(lfm2np.load_config("tiny-dense"), seed=6)
    prompt = [1, 2, 3, 4]
    out = generate(m, prompt, 20, repetition_penalty=1e6, stop_ids=[])
    assert len(set(out)) == len(out) and not set(out) & set(prompt)
    # ... and a state reused from an earlier turn counts through context_ids
    _, state = m.step(prompt)
    g = Generation(m, [5], 10, Sampling(repetition_penalty=1e6), [], state=state, context_ids=prompt)
    assert not set(g) & {1, 2, 3, 4, 5}


def test_batched_generation_equals_each_prompt_alone():
    m = random_model(lfm2np.load_config("tiny-moe"), seed=7)
    prompts = [[1, 5, 9, 2, 7], [3], [4, 4, 8]]
    for kw in ({}, {"temperature": 1.3, "top_k": 10, "min_p": 0.05, "repetition_penalty": 1.1, "seed": 3}):
        rows = generate(m, prompts, 9, stop_ids=[], **kw)
        assert rows == [generate(m, p, 9, stop_ids=[], **kw) for p in prompts]
    free = generate(m, prompts[0], 9, stop_ids=[])
    stop = free[4]
    rows = generate(m, prompts, 9, stop_ids=[stop])
    assert rows == [generate(m, p, 9, stop_ids=[stop]) for p in prompts]
    assert rows[0] == free[:free.index(stop)]
    assert generate(m, np.array([[1, 2], [3, 4]]), 2, stop_ids=[]) == [generate(m, [1, 2], 2, stop_ids=[]),
                                                                       generate(m, [3, 4], 2, stop_ids=[])]


def test_generation_config_defaults_as_transformers_reads_them(tmp_path):
    f = tmp_path / "generation_config.json"
    assert generation_defaults(tmp_path) == {}  # no file: lfm2np's defaults (greedy)
    f.write_text(json.dumps({"do_sample": True, "temperature": 0.3, "min_p": 0.15, "repetition_penalty": 1.05,
                             "eos_token_id": [7, 2], "max_length": 4096}))
    s = sampling_for(generation_defaults(tmp_path))
    assert (s.temperature, s.top_k, s.top_p, s.min_p, s.repetition_penalty) == (0.3, 50, 1.0, 0.15, 1.05)
    assert generation_defaults(tmp_path)["stop_ids"] == [7, 2]
    s = sampling_for(generation_defaults(tmp_path), temperature=0, top_k=None, min_p=0.5)  # explicit values win
    assert (s.temperature, s.top_k, s.min_p) == (0, 50, 0.5)
    f.write_text(json.dumps({"temperature": 0.3, "repetition_penalty": 1.2}))  # no do_sample: greedy
    s = sampling_for(generation_defaults(tmp_path))
    assert s.greedy and s.repetition_penalty == 1.2
    assert sampling_for(generation_defaults(tmp_path), temperature=0.3).temperature == 0.3


@pytest.mark.parametrize("content, message", [
    ("{", r"corrupt generation config \(Expecting"),
    ("[1]", "expected an object"),
    ("[" * 100000, "corrupt generation config: JSON nested too deeply"),
    ('{"do_sample": false, "do_sample": true}', "appears twice"),
    ('{"temperature": "hot"}', "temperature is 'hot'"),
    ('{"top_k": 2.5}', "top_k is 2.5"),
    ('{"top_p": 0}', "top_p is 0"),
    ('{"min_p": 2}', "min_p is 2"),
    ('{"repetition_penalty": -1}', "repetition_penalty is -1"),
    ('{"do_sample": "yes"}', "do_sample is 'yes'"),
    ('{"eos_token_id": [7, "x"]}', "eos_token_id"),
    ('{"do_sample": true, "temperature": 0}', "temperature is 0"),
])
def test_bad_generation_config_names_the_file_and_the_key(tmp_path, content, message):
    (tmp_path / "generation_config.json").write_text(content)
    with pytest.raises(lfm2np.Lfm2npError, match=message) as e:
        generation_defaults(tmp_path)
    assert "generation_config.json" in str(e.value)


def test_the_embedded_generation_config_is_valid():
    from lfm2np.embedded import embedded_model_path

    assert read_generation_config(embedded_model_path())["eos_token_id"] == [7, 2]


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
    ({"min_p": -0.1}, "min_p"),
    ({"min_p": 1.1}, "min_p"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty"),
    ({"seed": -1}, "seed"),
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


@pytest.mark.parametrize("stop_ids, message", [
    ([10**9], "stop id 1000000000 is outside the vocabulary of size 97"),
    ([-1], "stop id -1 is outside the vocabulary"),
    (["x"], "stop id 'x' is not a token id"),
    ([True], "stop id True is not a token id"),
    (3.5, "stop ids must be token ids"),
])
def test_stop_ids_the_model_can_never_produce_are_refused(stop_ids, message):
    m = random_model(lfm2np.load_config("tiny-dense"), seed=0)
    with pytest.raises(lfm2np.Lfm2npError, match=message):
        Generation(m, [1], 3, stop_ids=stop_ids)
    assert Generation(m, [1], 3, stop_ids=np.int64(5)).stop_ids == {5}


def test_generation_ends_when_the_context_is_full():
    """At max_position_embeddings the last token chosen has no position left: the generation ends there
    ("context"), one prompt or several, and what came before equals an unbounded model's output."""
    config = lfm2np.load_config("tiny-moe")
    small = random_model(config.replace(max_position_embeddings=12), seed=5)
    big = random_model(config, seed=5)
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    g = Generation(small, prompt, 20, stop_ids=[])
    out = list(g)
    assert g.finish_reason == "context" and len(out) == 12 - len(prompt) + 1
    assert out == generate(big, prompt, len(out), stop_ids=[]) and g.state.position == 12
    rows = generate(small, [prompt, [1, 2]], 20, stop_ids=[])
    assert rows == [out, generate(big, [1, 2], 11, stop_ids=[])]


@pytest.mark.parametrize("temperature, penalty", [(1e-320, 1.0), (1e-307, 1.0), (0.0, 1e-310), (0.5, 1e-308)])
def test_settings_that_overflow_the_logits_are_refused_not_misread(temperature, penalty):
    """Dividing by a tiny temperature (or penalty) sends the top logits to +inf, where their order is lost:
    an error, never a wrong token or an IndexError."""
    s = Sampling(temperature=temperature, repetition_penalty=penalty)
    logits = np.array([30.0, 10.0, 5.0, -4.0], np.float32)
    with pytest.raises(lfm2np.Lfm2npError, match="overflows these logits"):
        sample(logits, s, np.random.default_rng(0), seen=[0, 1])
    assert sample(logits, Sampling(temperature=1e-3), np.random.default_rng(0)) == 0  # small, not tiny: near greedy


def test_logits_sent_to_minus_inf_are_not_an_overflow():
    """A masked token (transformers' float64 minimum) divided by a temperature, or scaled by a penalty, goes
    to -inf: its probability was 0 already, so nothing is refused; all of them going there is."""
    masked = np.array([1.0, 2.0, np.finfo(np.float64).min, 0.5])
    assert sample(masked, Sampling(temperature=0.7, seed=1), np.random.default_rng(0)) in (0, 1, 3)
    assert sample(masked, Sampling(repetition_penalty=1.3), np.random.default_rng(0), seen=[2]) == 1
    with pytest.raises(lfm2np.Lfm2npError, match="temperature 1e-320 with repetition_penalty 1.0 overflows"):
        sample(np.array([-1.0, -2.0, -3.0]), Sampling(temperature=1e-320), np.random.default_rng(0))
    with pytest.raises(lfm2np.Lfm2npError, match="^repetition_penalty 1e-310 overflows"):
        sample(np.array([3.0, 1.0]), Sampling(repetition_penalty=1e-310), np.random.default_rng(0), seen=[0])
