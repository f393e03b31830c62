"""Laws the operators and the model must obey, checked on random inputs with hypothesis."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings, strategies as st

import lfm2np
from lfm2np import ops
from lfm2np import layers as L
from lfm2np.layers import ConvWeights, Scope, SwiGLUWeights
from lfm2np.synthetic import random_model, random_params
from lfm2np.oracle.tolerance import FP32, rel_error

from conftest import split

SETTINGS = settings(max_examples=40, deadline=None)
seeds = st.integers(0, 2**32 - 1)


def rng_arrays(seed, *shapes, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


# ------------------------------------------------------------------------------ RMSNorm
@SETTINGS
@given(seed=seeds, scale=st.floats(1e-2, 1e3), n=st.integers(2, 64))
def test_rms_norm_is_scale_invariant(seed, scale, n):
    x, w = rng_arrays(seed, (5, n), (n,))
    a = ops.rms_norm(x, w, eps=0.0)  # the law is exact without eps; eps breaks it only for tiny inputs
    b = ops.rms_norm(scale * x, w, eps=0.0)
    assert rel_error(b, a) < 1e-12


@SETTINGS
@given(seed=seeds, n=st.integers(2, 64))
def test_rms_norm_output_has_unit_rms_before_the_weight(seed, n):
    (x,) = rng_arrays(seed, (4, n))
    y = ops.rms_norm(x, np.ones(n), eps=0.0)
    np.testing.assert_allclose(np.sqrt(np.mean(y * y, axis=-1)), 1.0, rtol=1e-12)


# ------------------------------------------------------------------------- short conv
@SETTINGS
@given(seed=seeds, T=st.integers(2, 12), L=st.integers(1, 5), t0=st.integers(0, 11))
def test_conv_is_causal(seed, T, L, t0):
    t0 = t0 % T
    u, w, b = rng_arrays(seed, (T, 6), (6, L), (6,))
    z, _ = ops.causal_conv1d(u, w, b)
    u2 = u.copy()
    u2[t0:] += 10.0  # change the present and future
    z2, _ = ops.causal_conv1d(u2, w, b)
    np.testing.assert_array_equal(z[:t0], z2[:t0])
    assert not np.allclose(z[t0], z2[t0]) or np.allclose(w[:, -1], 0)


@SETTINGS
@given(seed=seeds, T=st.integers(1, 12), L=st.integers(1, 5), cut=st.integers(0, 12))
def test_conv_chunked_equals_one_shot(seed, T, L, cut):
    cut = cut % (T + 1)
    u, w = rng_arrays(seed, (T, 5), (5, L))
    whole, history = ops.causal_conv1d(u, w)
    first, window = ops.causal_conv1d(u[:cut], w)
    rest, history2 = ops.causal_conv1d(u[cut:], w, window=window[max(0, cut - (L - 1)):])  # L-1 rows suffice
    np.testing.assert_allclose(np.concatenate([first, rest]), whole, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(history, u)
    np.testing.assert_array_equal(history2[history2.shape[0] - (T - cut):], u[cut:])


def test_conv_last_tap_multiplies_the_current_token():
    u = np.zeros((4, 1))
    u[2, 0] = 1.0
    w = np.array([[10.0, 20.0, 30.0]])
    z, _ = ops.causal_conv1d(u, w)
    np.testing.assert_array_equal(z[:, 0], [0.0, 0.0, 30.0, 20.0])


@SETTINGS
@given(seed=seeds, T=st.integers(1, 10), cut=st.integers(0, 10))
def test_short_conv_block_chunked_equals_one_shot(seed, T, cut):
    cut = cut % (T + 1)
    D = 4
    h, wi, wc, wo = rng_arrays(seed, (T, D), (3 * D, D), (D, 1, 3), (D, D))
    w = ConvWeights(wi, wc, wo)
    whole, _ = L.short_conv(h, w)
    a, window = L.short_conv(h[:cut], w)
    b, _ = L.short_conv(h[cut:], w, window)
    np.testing.assert_allclose(np.concatenate([a, b]), whole, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------- RoPE
@SETTINGS
@given(seed=seeds, m=st.integers(0, 500), n=st.integers(0, 500), shift=st.integers(0, 500))
def test_rope_scores_depend_only_on_relative_position(seed, m, n, shift):
    hd = 16
    q, k = rng_arrays(seed, (1, 1, hd), (1, 1, hd))

    def score(pm, pn):
        cq, sq = ops.rope_tables(np.array([pm]), hd, 10000.0, np.float64)
        ck, sk = ops.rope_tables(np.array([pn]), hd, 10000.0, np.float64)
        return float(np.sum(ops.apply_rope(q, cq, sq) * ops.apply_rope(k, ck, sk)))

    assert abs(score(m, n) - score(m + shift, n + shift)) < 1e-9 * (1 + abs(score(m, n)))


@SETTINGS
@given(seed=seeds, pos=st.integers(0, 10_000))
def test_rope_preserves_norms_and_pairs_split_halves(seed, pos):
    hd = 8
    (x,) = rng_arrays(seed, (1, 2, hd))
    cos, sin = ops.rope_tables(np.array([pos]), hd, 1e6, np.float64)
    y = ops.apply_rope(x, cos, sin)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-12)
    # dim i and dim i + hd/2 rotate together: rotating a vector living only in dim 0 leaves dims != 0, 4 zero
    e0 = np.zeros((1, 1, hd))
    e0[..., 0] = 1
    r = ops.apply_rope(e0, cos, sin)[0, 0]
    assert np.count_nonzero(np.abs(r) > 1e-15) <= 2 and abs(r[1]) < 1e-15 and abs(r[5]) < 1e-15


# -------------------------------------------------------------------------- attention
@SETTINGS
@given(seed=seeds, T=st.integers(1, 8), G=st.sampled_from([1, 2, 3]), R=st.sampled_from([1, 2, 4]))
def test_gqa_equals_attention_with_repeated_kv_heads(seed, T, G, R):
    hd = 4
    q, k, v = rng_arrays(seed, (T, G * R, hd), (T, G, hd), (T, G, hd))
    gqa = ops.attention(q, k, v)
    mha = ops.attention(q, np.repeat(k, R, axis=1), np.repeat(v, R, axis=1))  # head j -> KV head j // R
    np.testing.assert_allclose(gqa, mha, rtol=1e-12, atol=1e-12)


@SETTINGS
@given(seed=seeds, S=st.integers(1, 10), T=st.integers(1, 10))
def test_attention_over_earlier_keys_equals_the_tail_of_full_attention(seed, S, T):
    T = min(T, S)
    q, k, v = rng_arrays(seed, (S, 4, 4), (S, 2, 4), (S, 2, 4))
    full = ops.attention(q, k, v)
    tail = ops.attention(q[S - T:], k, v)
    np.testing.assert_allclose(tail, full[S - T:], rtol=1e-12, atol=1e-12)


@SETTINGS
@given(seed=seeds, S=st.integers(1, 40), T=st.integers(1, 40), block=st.integers(1, 9))
def test_blocked_attention_equals_attention(seed, S, T, block):
    T = min(T, S)
    q, k, v = rng_arrays(seed, (T, 4, 4), (S, 2, 4), (S, 2, 4))
    np.testing.assert_allclose(ops.attention(q, k, v, block=block), ops.attend(q, k, v), rtol=1e-12, atol=1e-14)


@SETTINGS
@given(seed=seeds, S=st.integers(1, 30), T=st.integers(1, 30), block=st.integers(1, 9),
       window=st.one_of(st.none(), st.integers(1, 12)), score_bytes=st.integers(1, 4096))
def test_blocked_attention_split_by_kv_groups_equals_attention(seed, S, T, block, window, score_bytes):
    # a tiny score budget makes every block run one or a few KV groups (with their query heads) at a time
    T = min(T, S)
    q, k, v = rng_arrays(seed, (T, 6, 4), (S, 3, 4), (S, 3, 4))
    want = ops.attend(q, k, v, window)
    saved, ops.SCORE_BYTES = ops.SCORE_BYTES, score_bytes
    try:
        got = ops.attention(q, k, v, window, block=block)
    finally:
        ops.SCORE_BYTES = saved
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


def test_attention_matches_a_per_head_loop():
    """The batched-matmul formulation against the textbook loop over heads and queries."""
    rng = np.random.default_rng(0)
    T, S, G, R, hd = 3, 5, 2, 3, 4
    q, k, v = rng.standard_normal((T, G * R, hd)), rng.standard_normal((S, G, hd)), rng.standard_normal((S, G, hd))
    out = ops.attention(q, k, v).reshape(T, G * R, hd)
    for t in range(T):
        for j in range(G * R):
            g = j // R
            visible = S - T + t + 1
            s = k[:visible, g] @ q[t, j] / np.sqrt(hd)
            p = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
            np.testing.assert_allclose(out[t, j], p @ v[:visible, g], rtol=1e-12)


@SETTINGS
@given(seed=seeds, T=st.integers(2, 8), t0=st.integers(1, 7))
def test_attention_is_causal(seed, T, t0):
    t0 = 1 + t0 % (T - 1)
    q, k, v = rng_arrays(seed, (T, 2, 4), (T, 1, 4), (T, 1, 4))
    a = ops.attention(q, k, v)
    k2, v2 = k.copy(), v.copy()
    k2[t0:] += 5
    v2[t0:] -= 5
    b = ops.attention(q, k2, v2)
    np.testing.assert_array_equal(a[:t0], b[:t0])


# ------------------------------------------------------------------------------ router
@SETTINGS
@given(seed=seeds, E=st.integers(1, 12), k=st.integers(1, 12), scale=st.floats(0.1, 4.0),
       norm=st.booleans(), use_bias=st.booleans())
def test_router_laws(seed, E, k, scale, norm, use_bias):
    k = 1 + (k - 1) % E
    h, gate, bias = rng_arrays(seed, (7, 5), (E, 5), (E,))
    bias = bias if use_bias else None
    logits, experts, weights = L.route(h, gate, bias, k, norm, scale)
    scores = ops.sigmoid(logits)
    assert experts.shape == weights.shape == (7, k)
    for t in range(7):
        assert len(set(experts[t])) == k  # distinct experts
        sel = scores[t] + (bias if bias is not None else 0)
        # the chosen experts are the k best by the selection score
        assert sel[experts[t]].min() >= np.delete(sel, experts[t]).max(initial=-np.inf)
    raw = np.take_along_axis(scores, experts, -1)  # weights use the UNBIASED scores
    if norm:
        expected = raw / (raw.sum(-1, keepdims=True) + 1e-6) * scale
        np.testing.assert_allclose(weights.sum(-1), scale * raw.sum(-1) / (raw.sum(-1) + 1e-6), rtol=1e-12)
    else:
        expected = raw * scale
    np.testing.assert_allclose(weights, expected, rtol=1e-12)


def test_expert_bias_changes_selection_not_weights():
    h = np.eye(3)
    gate = np.array([[2.0, 0, 0], [1.0, 0, 0], [0.0, 0, 0]])  # token 0 prefers expert 0, then 1, then 2
    bias = np.array([0.0, 0.0, 5.0])
    _, e_plain, w_plain = L.route(h[:1], gate, None, 1, False, 1.0)
    _, e_bias, w_bias = L.route(h[:1], gate, bias, 1, False, 1.0)
    assert e_plain[0, 0] == 0 and e_bias[0, 0] == 2
    np.testing.assert_allclose(w_bias[0, 0], ops.sigmoid(np.array(0.0)))  # sigmoid(0), not sigmoid(0) + 5


def test_top_k_ties_go_to_the_lower_index():
    scores = np.array([[0.5, 0.7, 0.5, 0.7, 0.1]])
    np.testing.assert_array_equal(ops.top_k_experts(scores, 3), [[1, 3, 0]])


# -------------------------------------------------------------------------------- MoE
@SETTINGS
@given(seed=seeds, E=st.integers(1, 6), k=st.integers(1, 6), T=st.integers(1, 9))
def test_moe_with_identical_experts_is_the_dense_ffn_times_total_weight(seed, E, k, T):
    k = 1 + (k - 1) % E
    h, w1, w3, w2, gate = rng_arrays(seed, (T, 6), (5, 6), (5, 6), (6, 5), (E, 6))
    _, experts, weights = L.route(h, gate, None, k, True, 1.0)
    out = L.mixture(h, experts, weights, lambda e: SwiGLUWeights(w1, w3, w2))
    dense = L.swiglu(h, SwiGLUWeights(w1, w3, w2)) * weights.sum(-1, keepdims=True)
    np.testing.assert_allclose(out, dense, rtol=1e-10, atol=1e-12)


@SETTINGS
@given(seed=seeds, E=st.integers(1, 5), k=st.integers(1, 5), T=st.integers(1, 9))
def test_moe_grouped_by_expert_equals_the_per_token_sum(seed, E, k, T):
    k = 1 + (k - 1) % E
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((T, 4))
    experts = np.stack([rng.permutation(E)[:k] for _ in range(T)])
    weights = rng.random((T, k))
    ew = [SwiGLUWeights(*(rng.standard_normal(s) for s in ((3, 4), (3, 4), (4, 3)))) for _ in range(E)]
    out = L.mixture(h, experts, weights, ew.__getitem__)
    for t in range(T):
        ref = sum(weights[t, j] * L.swiglu(h[t:t + 1], ew[experts[t, j]])[0] for j in range(k))
        np.testing.assert_allclose(out[t], ref, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------ model
TINY = {name: lfm2np.load_config(name) for name in ("tiny-dense", "tiny-moe")}


@settings(max_examples=10, deadline=None)
@given(seed=seeds, name=st.sampled_from(sorted(TINY)), T=st.integers(1, 9), B=st.integers(1, 3))
def test_a_batch_equals_its_rows_run_alone(seed, name, T, B):
    m = random_model(TINY[name], seed=seed % 1000)
    ids = np.random.default_rng(seed).integers(0, m.config.vocab_size, size=(B, T))
    batch = m.forward(ids)
    for b in range(B):
        np.testing.assert_array_equal(batch[b], m.forward(ids[b]))


@settings(max_examples=10, deadline=None)
@given(seed=seeds, name=st.sampled_from(sorted(TINY)), T=st.integers(2, 10))
def test_the_model_is_causal(seed, name, T):
    m = random_model(TINY[name], seed=seed % 1000)
    ids = np.random.default_rng(seed).integers(0, m.config.vocab_size, size=T)
    full = m.forward(ids)
    prefix = m.forward(ids[:-1])
    assert rel_error(full[:-1], prefix) < FP32.op_rel  # float32 rounding (other matmul shapes), not leakage


def test_untied_head_is_used_when_present():
    config = TINY["tiny-dense"].replace(tie_word_embeddings=False)
    params = random_params(config, seed=1)
    m = lfm2np.Model(config, params)
    ids = np.array([1, 2, 3])
    tied = lfm2np.Model(config.replace(tie_word_embeddings=True),
                        {k: v for k, v in params.items() if k != "lm_head.weight"})
    assert not np.allclose(m.forward(ids), tied.forward(ids))
    params["lm_head.weight"] = params["model.embed_tokens.weight"]
    np.testing.assert_array_equal(lfm2np.Model(config, params).forward(ids), tied.forward(ids))


@SETTINGS
@given(seed=seeds, shape=st.sampled_from([(), (1,), (5, 3), (4, 7, 2)]), chunk=st.integers(1, 9),
       threads=st.integers(1, 4), transpose=st.booleans(), dtype=st.sampled_from([np.float32, np.float64]))
def test_silu_and_sigmoid_in_slices_equal_the_formula(seed, shape, chunk, threads, transpose, dtype):
    # slices of `chunk` elements shared among threads (any remainder, non-contiguous input, 0-d input) give
    # the formula's values
    x = np.asarray(8 * np.random.default_rng(seed).standard_normal(shape), dtype=dtype)
    if x.ndim:
        x[..., :1] = -800.0  # exp(800) overflows: sigmoid 0, silu -0
    if transpose:
        x = x.T
    with split(chunk, threads):
        got_silu, got_sigmoid = ops.silu(x), ops.sigmoid(x)
    with np.errstate(over="ignore"):
        denominator = 1 + np.exp(-x)
    assert got_silu.shape == got_sigmoid.shape == np.shape(x) and got_silu.dtype == dtype
    np.testing.assert_array_equal(got_silu, x / denominator)
    np.testing.assert_array_equal(got_sigmoid, 1 / denominator)


@SETTINGS
@given(seed=seeds, T=st.integers(1, 6), chunk=st.integers(1, 40), threads=st.integers(1, 4),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_swiglu_fused_in_place_equals_the_two_steps_and_spares_what_was_recorded(seed, T, chunk, threads, dtype):
    rng = np.random.default_rng(seed)
    D, F = 5, 7
    h = rng.standard_normal((T, D)).astype(dtype)
    w1, w3, w2 = (rng.standard_normal(s).astype(dtype) for s in ((F, D), (F, D), (D, F)))
    gate, up = h @ w1.T, h @ w3.T
    with np.errstate(over="ignore"):
        expected = (gate / (1 + np.exp(-gate)) * up) @ w2.T
    seen = {}

    def keep(name, value):  # a block's tap: records and goes on with the value
        seen[name] = value
        return value

    w = SwiGLUWeights(w1, w3, w2)
    with split(chunk, threads):
        plain, recorded = L.swiglu(h, w), L.swiglu(h, w, Scope(tap=keep))
    np.testing.assert_array_equal(plain, expected)
    np.testing.assert_array_equal(recorded, expected)
    np.testing.assert_array_equal(seen["w1"], gate)  # the recorded gate is not overwritten by the fused pass


def test_swiglu_of_float16_computes_in_float32_as_silu_does():
    rng = np.random.default_rng(0)
    h = rng.standard_normal((3, 5)).astype(np.float16)
    w1, w3, w2 = (rng.standard_normal(s).astype(np.float16) for s in ((7, 5), (7, 5), (5, 7)))
    gate, up = h @ w1.T, h @ w3.T
    np.testing.assert_array_equal(L.swiglu(h, SwiGLUWeights(w1, w3, w2)), (ops.silu(gate) * up) @ w2.T)
