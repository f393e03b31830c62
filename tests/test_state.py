"""Incremental decoding with an explicit state, against one-shot prefill (ours and transformers').

Decode references are one-shot prefill logits, never transformers' own cached path. Each test below is
named after a decoding bug other implementations shipped (see the facts sheet): here they must fail.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import lfm2np
from lfm2np.state import ConvState, State
from lfm2np.synthetic import random_model
from lfm2np.oracle.tolerance import FP32, rel_error

from conftest import DENSE, MOE, captured, golden, model

TWO = [DENSE[0], MOE[0]]  # one dense and one MoE checkpoint for the longer scenarios
TOL = FP32.logits_rel


def assert_logits(out, ref, what=""):
    assert out.shape == ref.shape, what
    err = rel_error(out, ref)
    assert err < TOL, f"{what}: relative error {err:.2e}"
    np.testing.assert_array_equal(out.argmax(-1), ref.argmax(-1), err_msg=what)


@pytest.mark.parametrize("k", [1, 2, 3, 7])
def test_prefill_k_then_the_rest_equals_one_shot(case, k):
    ids = golden(case)["logits.T13.ids"]
    ref = golden(case)["logits.T13"]  # transformers, one shot
    m = model(case)
    a, state = m.step(ids[:k])
    b, end = m.step(ids[k:], state)
    assert_logits(np.concatenate([a, b]), ref, f"{case} split at {k}")
    assert end.position == len(ids)


@pytest.mark.parametrize("k", [1, 2, 3, 7])
def test_prefill_k_then_single_token_steps_equals_one_shot(case, k):
    ids = golden(case)["logits.T13.ids"]
    m = model(case)
    out, state = m.step(ids[:k])
    outs = [out]
    for t in ids[k:]:
        out, state = m.step([t], state)
        outs.append(out)
    assert_logits(np.concatenate(outs), golden(case)["logits.T13"], f"{case} decode after {k}")
    np.testing.assert_allclose(np.concatenate(outs), m.forward(ids), rtol=0, atol=1e-4 * np.abs(m.forward(ids)).max())


def test_conv_window_is_the_last_inputs_of_the_reference_conv(case):
    """The state's conv window equals transformers' b_gate * x for the last L-1 tokens (llama.cpp's layout)."""
    m = model(case)
    ids = captured(case, "model.embed_tokens.input")
    _, state = m.step(ids)
    L1 = m.config.conv_L_cache - 1
    for i in m.config.conv_layers:
        ref = captured(case, f"model.layers.{i}.conv.bx")[-L1:]
        assert state.conv_window(i).shape == (L1, m.config.hidden_size)
        assert rel_error(state.conv_window(i), ref) < FP32.op_rel
    for i in m.config.attention_layers:
        assert rel_error(state.keys[i], captured(case, f"model.layers.{i}.self_attn.k_rope")) < FP32.op_rel
        assert rel_error(state.values[i], captured(case, f"model.layers.{i}.self_attn.v")) < FP32.op_rel


def test_conv_window_is_zero_padded_at_the_start():
    m = random_model(lfm2np.load_config("tiny-dense"), seed=2)
    _, state = m.step([5])
    i = m.config.conv_layers[0]
    w = state.conv_window(i)
    assert w.shape == (2, m.config.hidden_size)
    assert (w[0] == 0).all() and not (w[1] == 0).all()


@pytest.mark.parametrize("case", TWO)
def test_snapshot_continue_restore_continue_gives_the_same_logits_twice(case):
    """Cache restore must bring the conv state back too (vmlx-swift #210/#211)."""
    ids = golden(case)["logits.T13.ids"]
    m = model(case)
    _, snapshot = m.step(ids[:6])
    first, after = m.step(ids[6:], snapshot)
    other, _ = m.step(ids[::-1][:4], snapshot)  # a different continuation in between
    second, after2 = m.step(ids[6:], snapshot)
    np.testing.assert_array_equal(first, second)
    assert not np.allclose(other, first[:4])
    for a, b in zip(after.conv + after.keys, after2.conv + after2.keys):
        if a is not None:
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("case", TWO)
@pytest.mark.parametrize("j", [1, 2, 3, 5, 9])
def test_rolling_back_j_tokens_equals_never_having_fed_them(case, j):
    """Speculative decoding needs the conv state rolled back too (vllm #44296)."""
    ids = golden(case)["logits.T13.ids"]
    m = model(case)
    _, base = m.step(ids[:4])
    drafts = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5])[:j] % m.config.vocab_size
    _, drafted = m.step(drafts, base)
    rolled = drafted.rollback(j)
    assert rolled.position == base.position
    for a, b in zip(rolled.conv + rolled.keys + rolled.values, base.conv + base.keys + base.values):
        if a is not None:
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(m.step(ids[4:], rolled)[0], m.step(ids[4:], base)[0])


def test_rollback_beyond_the_kept_history_is_refused():
    m = random_model(lfm2np.load_config("tiny-moe"), seed=0)
    ids = np.arange(30) % 97
    _, s = m.step(ids)
    s = State.start(m.config, max_rollback=3)
    _, s = m.step(ids, s)
    assert s.rollback_limit == 3
    s.rollback(3)
    with pytest.raises(lfm2np.Lfm2npError, match="max_rollback >= 4"):
        s.rollback(4)
    with pytest.raises(lfm2np.Lfm2npError, match="cannot roll back 31 tokens from position 30"):
        s.rollback(31)
    # a sequence shorter than L-1 + max_rollback keeps its whole history: any rollback works
    _, short = m.step(ids[:3], State.start(m.config, max_rollback=1))
    assert short.rollback_limit == 3
    assert rel_error(m.step(ids[1:3], short.rollback(2))[0], m.step(ids[1:3], m.step(ids[:1])[1])[0]) < 1e-6
    # and going back to the very start is always possible
    _, tight = m.step(ids[:5], State.start(m.config, max_rollback=0))
    assert tight.rollback_limit == 0
    np.testing.assert_array_equal(m.step(ids[:3], tight.rollback(5))[0], m.step(ids[:3])[0])


@pytest.mark.parametrize("case", TWO)
def test_a_batch_of_different_lengths_equals_each_sequence_alone(case):
    """Parallel sequences must not mix their states (llama.cpp #14670, sglang #23975)."""
    g = golden(case)
    m = model(case)
    seqs = [g["logits.T13.ids"], g["logits.T5.ids"], g["batch.ids"][0], g["batch.ids"][1][:3]]
    logits, states = m.step_batch(seqs, [None] * len(seqs))
    for ids, out, st in zip(seqs, logits, states):
        np.testing.assert_array_equal(out, m.step(ids)[0])
        assert st.position == len(ids)
    # and continuing the batch by one token each
    nxt = [[int(o[-1].argmax())] for o in logits]
    more, _ = m.step_batch(nxt, states)
    for ids, n, out in zip(seqs, nxt, more):
        whole = m.forward(np.concatenate([ids, n]))
        assert rel_error(out, whole[-1:]) < TOL


def test_packed_sequences_do_not_leak():
    """A new sequence starts from an empty state, whatever ran before (transformers #46588)."""
    m = random_model(lfm2np.load_config("tiny-dense"), seed=5)
    a = np.array([4, 8, 15, 16, 23, 42])
    b = np.array([7, 7, 1, 2])
    _, s = m.step(a)
    fresh, _ = m.step(b)
    np.testing.assert_array_equal(fresh, m.step(b, None)[0])
    continued, _ = m.step(b, s)
    assert not np.allclose(continued, fresh)  # continuing a differs from starting anew


def test_a_second_prefill_keeps_the_conv_state():
    """Conv state lost or zeroed on a second, chunked prefill (transformers #42017)."""
    m = random_model(lfm2np.load_config("tiny-dense"), seed=6)
    ids = np.array([9, 3, 27, 4, 81, 2, 2, 50, 11])
    a, s = m.step(ids[:4])
    b, _ = m.step(ids[4:], s)
    zeroed = s.replace(layers=tuple(ConvState(np.zeros_like(x.history)) if isinstance(x, ConvState) else x
                                    for x in s.layers))
    c, _ = m.step(ids[4:], zeroed)
    ref = m.forward(ids)[4:]
    assert rel_error(b, ref) < TOL
    assert rel_error(c, ref) > 1e-3  # the test can tell a lost conv state


def test_states_are_immutable_values():
    m = random_model(lfm2np.load_config("tiny-moe"), seed=7)
    _, s = m.step([1, 2, 3])
    before = [None if a is None else a.copy() for a in s.conv + s.keys]
    m.step([4, 5], s)
    for a, b in zip(s.conv + s.keys, before):
        if a is not None:
            np.testing.assert_array_equal(a, b)
            with pytest.raises(ValueError):
                a[...] = 0
    with pytest.raises(AttributeError):
        s.position = 0  # type: ignore[misc]


def test_state_checks():
    dense = random_model(lfm2np.load_config("tiny-dense"), seed=0)
    moe = random_model(lfm2np.load_config("tiny-moe"), seed=0)
    _, s = dense.step([1, 2])
    with pytest.raises(lfm2np.Lfm2npError, match="does not belong to this model: layer 1 is conv"):
        moe.step([1], s)
    wider = random_model(lfm2np.load_config("tiny-dense").replace(hidden_size=60, num_attention_heads=6), seed=0)
    with pytest.raises(lfm2np.Lfm2npError, match=r"layer 0 holds rows of shape \(48,\), the config needs \(60,\)"):
        wider.step([1], s)
    with pytest.raises(lfm2np.Lfm2npError, match="shape \\(T,\\)"):
        dense.step([[1, 2]])
    with pytest.raises(lfm2np.Lfm2npError, match="float32 arrays but the model computes in float64"):
        lfm2np.Model(dense.config, {k: v.astype(np.float64) for k, v in dense.params.items()}, "float64").step([1], s)
    with pytest.raises(lfm2np.Lfm2npError, match="2 id sequences but 1 states"):
        dense.step_batch([[1], [2]], [None])


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), name=st.sampled_from(["tiny-dense", "tiny-moe"]),
       cuts=st.lists(st.integers(1, 5), min_size=1, max_size=6))
def test_any_chunking_equals_one_shot(seed, name, cuts):
    m = random_model(lfm2np.load_config(name), seed=seed % 100)
    ids = np.random.default_rng(seed).integers(0, m.config.vocab_size, size=sum(cuts))
    state, outs, start = None, [], 0
    for n in cuts:
        out, state = m.step(ids[start:start + n], state)
        outs.append(out)
        start += n
    assert rel_error(np.concatenate(outs), m.forward(ids)) < FP32.op_rel


