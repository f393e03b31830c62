"""The LFM operators, one small pure function each.

Dimension legend (used in every shape comment of lfm2np):

    T  tokens in this call            S  cached + new positions (keys/values attended over)
    D  hidden size                    H  query heads          G  KV heads        hd  head dim
    F  dense FFN width                Fm expert FFN width     E  experts         k   experts per token
    V  vocabulary                     L  conv kernel length (conv_L_cache)       W   sliding window

Operators work on one sequence: activations are ``(T, D)``. Weights are passed explicitly, in the
layout of the Hugging Face checkpoint (a linear weight is ``(out, in)``). Every function computes in
the dtype of its activation input (float32 by default, float64 in the oracle mode); weights are
expected in that dtype already.

Two optional arguments thread through the operators, and cost nothing when left at their defaults:

- ``rnd(x)`` marks each point where a low-precision backend stores a result; it is the identity in the
  float32 and float64 modes and rounds to bfloat16 in the bf16 emulation (:mod:`lfm2np.numerics`).
- ``tap(name, value)`` receives each named intermediate and returns the value the computation goes on
  with: the value itself (recording), or a replacement (an intervention). :func:`untapped` is the
  default. :mod:`lfm2np.model` documents the protocol and the names.

This module imports nothing from lfm2np but :mod:`lfm2np.passes` (how its long elementwise passes run).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from .passes import in_parallel, logistic

#: ``tap(name, value) -> value``: sees a named intermediate and returns what the computation continues with.
Tap = Callable[[str, np.ndarray], np.ndarray]
#: ``rnd(x) -> x``: rounding applied where a backend stores a result (identity unless emulating bf16).
Rounding = Callable[[np.ndarray], np.ndarray]

#: The constant transformers adds to the sum of the top-k routing weights before dividing.
ROUTER_NORM_EPS = 1e-6


def exact(x: np.ndarray) -> np.ndarray:
    """The identity rounding: results are kept as the compute dtype gives them."""
    return x


def untapped(name: str, value: np.ndarray) -> np.ndarray:
    """The default tap: nothing recorded, nothing replaced."""
    return value


def prefixed(tap: Tap, prefix: str) -> Tap:
    """``tap`` seeing names with ``prefix`` in front (``untapped`` stays untapped, at no cost)."""
    if tap is untapped:
        return untapped
    return lambda name, value: tap(prefix + name, value)


# ----------------------------------------------------------------------------- basics
def linear(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """``y = x W^T + b``.  (T, in), (out, in), (out,) -> (T, out)"""
    y = x @ w.T
    if b is not None:
        y += b
    return y


def sigmoid(x: np.ndarray) -> np.ndarray:
    """``1 / (1 + exp(-x))``; exp overflows to inf for very negative x, which gives the right 0.
    (In one buffer, a cache-sized slice at a time: these run on every FFN activation of long prompts.)"""
    return logistic(x, numerator=False)


def silu(x: np.ndarray) -> np.ndarray:
    """``x * sigmoid(x)``, written ``x / (1 + exp(-x))`` as torch computes it (one buffer, in slices)."""
    return logistic(x, numerator=True)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float, rnd: Rounding = exact) -> np.ndarray:
    """RMSNorm over the last axis: ``w * x / sqrt(mean(x^2) + eps)``.  (..., N), (N,) -> (..., N)

    Statistics are taken in at least float32 (float64 in the oracle mode). The weight is used as is,
    not as ``1 + w``. A bf16 backend stores the normalised value, then the product with the weight.
    """
    xf = x.astype(np.promote_types(x.dtype, np.float32), copy=False)
    inv_rms = 1.0 / np.sqrt(np.mean(xf * xf, axis=-1, keepdims=True) + xf.dtype.type(eps))
    return rnd(weight * rnd((xf * inv_rms).astype(x.dtype, copy=False)))


def embed(ids: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Token embedding, no scaling.  (T,) int, (V, D) -> (T, D)"""
    return table[ids]


def lm_head(h: np.ndarray, head: np.ndarray, rnd: Rounding = exact, out: np.ndarray | None = None) -> np.ndarray:
    """Logits from the final hidden states. ``head`` is ``lm_head.weight`` or, when tied (every released
    model), ``model.embed_tokens.weight``. ``out``: a (T, V) array to write them into (the rows of a long
    prompt's logits: no copy of gigabytes afterwards).  (T, D), (V, D) -> (T, V)"""
    logits = rnd(np.matmul(h, head.T, out=out))
    if out is not None and logits is not out:
        out[...] = logits
        return out
    return logits


# ------------------------------------------------------------------------------- RoPE
def rope_frequencies(head_dim: int, theta: float, rotated: int | None = None,
                     dtype: np.dtype = np.float32) -> np.ndarray:
    """The hd/2 inverse frequencies of split-half RoPE: ``inv_freq_i = theta^(-2i/hd)`` for the first
    ``rotated`` pairs (all of them by default) and 0 for the rest, whose dims are then left unrotated
    (LFM3's "proportional" partial rotation).  -> (hd/2,)"""
    dtype = np.dtype(dtype)
    inv_freq = 1.0 / (dtype.type(theta) ** (np.arange(0, head_dim, 2, dtype=dtype) / dtype.type(head_dim)))
    if rotated is not None:
        inv_freq[rotated:] = 0
    return inv_freq


def rope_tables(positions: np.ndarray, head_dim: int, theta: float, dtype: np.dtype = np.float32,
                rotated: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin tables for the split-half (NeoX) rotary embedding over the full head dim.

    angle ``a[t, i] = pos_t * inv_freq_i`` (:func:`rope_frequencies`), repeated for both halves. The
    reference computes angles in float32; pass float64 for the oracle mode.
    (T,) int -> (T, hd), (T, hd)
    """
    inv_freq = rope_frequencies(head_dim, theta, rotated, dtype)
    angles = np.asarray(positions).astype(dtype)[:, None] * inv_freq[None, :]  # (T, hd/2)
    angles = np.concatenate([angles, angles], axis=-1)  # (T, hd)
    return np.cos(angles), np.sin(angles)


def rotate_half(x: np.ndarray) -> np.ndarray:
    """``[x1, x2] -> [-x2, x1]`` over the last axis (dim i pairs with i + hd/2)."""
    x1, x2 = np.split(x, 2, axis=-1)
    return np.concatenate([-x2, x1], axis=-1)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, rnd: Rounding = exact,
               wide: bool = False) -> np.ndarray:
    """``x * cos + rotate_half(x) * sin`` per head.  (T, n, hd), (T, hd), (T, hd) -> (T, n, hd)

    A bf16 backend rounds each product and the sum; with ``wide`` (LFM3, whose cos and sin stay float32)
    the products and the sum are float32 and only the result is rounded."""
    if wide:
        return rnd(x * cos[:, None, :] + rotate_half(x) * sin[:, None, :])
    return rnd(rnd(x * cos[:, None, :]) + rnd(rotate_half(x) * sin[:, None, :]))


# -------------------------------------------------------------------------- attention
def _softmax_in_place(e: np.ndarray, axis: int = -1) -> None:
    e -= np.max(e, axis=axis, keepdims=True)
    np.exp(e, out=e)
    e /= np.sum(e, axis=axis, keepdims=True)


def softmax(x: np.ndarray, axis: int = -1, in_place: bool = False) -> np.ndarray:
    """Numerically stable softmax; rows that are entirely -inf are not expected (causality keeps one key).
    ``in_place`` overwrites ``x`` (the attention scores, a fresh buffer) instead of allocating another.
    Along a contiguous last axis, the rows are shared among threads (:mod:`lfm2np.passes`) (the same bits)."""
    e = x if in_place else x.copy()
    if e.ndim and e.size and e.flags.c_contiguous and axis in (-1, e.ndim - 1):
        rows = e.reshape(-1, e.shape[-1])
        in_parallel(rows.shape[0], lambda lo, hi: _softmax_in_place(rows[lo:hi]), e.size)
    else:
        _softmax_in_place(e, axis)
    return e


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, window: int | None = None,
              rnd: Rounding = exact, start: int | None = None) -> np.ndarray:
    """Causal grouped-query attention of T new queries over S keys (earlier ones first).

    Query t sits at position ``p_t = start + t`` (``start = S - T`` by default: the queries are the last T
    keys) and sees keys ``0 .. p_t``, or with a sliding ``window`` only the last W of them,
    ``p_t - W + 1 .. p_t``. Query head j reads KV head ``j // (H // G)``.
    ``softmax((q k^T) * hd^-0.5 + mask) v``.  (T, H, hd), (S, G, hd), (S, G, hd) -> (T, H * hd)
    """
    T, H, hd = q.shape
    S, G, _ = k.shape
    R = H // G  # query heads per KV head
    start = S - T if start is None else start
    scale = q.dtype.type(hd ** -0.5)
    # a power of two (head dim 16, 64, 256) scales q first: every product and partial sum of q k^T is then
    # scaled exactly (bf16 rounding too), the same bits as scaling the scores, one pass over them fewer
    fold = bool(np.frexp(scale)[0] == 0.5)
    qg = (q * scale if fold else q).reshape(T, G, R, hd).transpose(1, 2, 0, 3).reshape(G, R * T, hd)  # (r, t) rows
    kg, vg = k.transpose(1, 0, 2), v.transpose(1, 0, 2)  # (G, S, hd)
    scores = rnd(qg @ kg.transpose(0, 2, 1)).reshape(G, R, T, S)
    if not fold:
        scores *= scale
        scores = rnd(scores)
    # -inf where a key is hidden: in the columns where that can happen only (the causal diagonal, and the
    # window's left edge), one pass over them
    pos = start + np.arange(T)[:, None]
    for lo, hi in ((start + 1, S), (0, start + T - window if window else 0)):
        lo, hi = max(lo, 0), min(hi, S)
        if lo < hi:
            key = np.arange(lo, hi)[None, :]
            hidden = (key > pos) if window is None else (key > pos) | (key <= pos - window)
            scores[..., lo:hi] += np.where(hidden, -np.inf, 0).astype(scores.dtype)
    probs = rnd(softmax(scores, axis=-1, in_place=True)).reshape(G, R * T, S)
    out = rnd(probs @ vg).reshape(G, R, T, hd)  # (G, R, T, hd)
    return out.transpose(2, 0, 1, 3).reshape(T, H * hd)


#: the most bytes of scores :func:`attention_blocked` makes at once: a block's score matrix stays in a
#: shared L3 cache (8 MiB of 32 on the AMD EPYC measured), where the softmax's passes over it are cheap
SCORE_BYTES = 8 << 20


def attention_blocked(q: np.ndarray, k: np.ndarray, v: np.ndarray, block: int = 128, window: int | None = None,
                      rnd: Rounding = exact) -> np.ndarray:
    """:func:`attention` computed ``block`` queries at a time, so the score matrix takes ``block x S``
    instead of ``T x S`` memory. Each block of queries reads only the keys it can see (up to its last
    position; with a window, from its first query's window start): fully masked key ranges are skipped.
    A block whose scores would pass :data:`SCORE_BYTES` runs a few KV groups (and their query heads) at a
    time. The result is the same rows.  (T, H, hd), (S, G, hd), (S, G, hd) -> (T, H * hd)
    """
    T, H, hd = q.shape
    S, G, _ = k.shape
    R = H // G
    out = np.empty((T, H * hd), q.dtype)
    # KV groups outermost: a group's keys and values stay in cache across the blocks of queries
    groups = max(1, min(G, SCORE_BYTES // (R * min(T, block) * S * q.dtype.itemsize)))
    for g0 in range(0, G, groups):
        g1 = min(G, g0 + groups)
        qs, ks, vs = q[:, g0 * R:g1 * R], k[:, g0:g1], v[:, g0:g1]
        if g1 - g0 < G:
            qs, ks, vs = np.ascontiguousarray(qs), np.ascontiguousarray(ks), np.ascontiguousarray(vs)
        for t0 in range(0, T, block):
            t1 = min(T, t0 + block)
            first = S - T + t0  # position of this block's first query
            lo = 0 if window is None else max(0, first - window + 1)
            end = S - T + t1  # keys visible to the last query of this block
            out[t0:t1, g0 * R * hd:g1 * R * hd] = attention(qs[t0:t1], ks[lo:end], vs[lo:end], window, rnd,
                                                              start=first - lo)
    return out


def output_gate(attn: np.ndarray, gate: np.ndarray, rnd: Rounding = exact) -> np.ndarray:
    """LFM3's per-head output gate: each head's attention output scaled by its gate,
    ``o[t, h, :] <- o[t, h, :] * gate[t, h]``, with ``gate = sigmoid(h_in @ gate_proj^T)`` one number per head
    and position in (0, 1) (the attention block computes it; a head can be switched off for a token).
    (T, H*hd), (T, H) -> (T, H*hd)"""
    T, H = gate.shape
    return rnd(attn.reshape(T, H, -1) * gate[:, :, None]).reshape(T, -1)


def attention_block(
    h: np.ndarray,
    q_proj: np.ndarray, k_proj: np.ndarray, v_proj: np.ndarray, out_proj: np.ndarray,
    q_norm: np.ndarray, k_norm: np.ndarray,
    cos: np.ndarray, sin: np.ndarray, eps: float,
    past_k: np.ndarray | None = None, past_v: np.ndarray | None = None,
    tap: Tap = untapped, attention_block_size: int = 128, rnd: Rounding = exact,
    window: int | None = None, gate_proj: np.ndarray | None = None,
    biases: tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None, np.ndarray | None] = (None,) * 4,
    wide_rope: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The attention mixer: projections, per-head QK RMSNorm, RoPE, causal GQA, output projection.

    ``cos``/``sin`` are the tables for the T new positions. ``past_k``/``past_v`` hold earlier keys and
    values (already normed and rotated): all of them, or, with a sliding ``window``, at least the last
    W - 1. The keys and values returned include them and the new ones. With ``gate_proj`` (LFM3's output
    gate, ``(H, D)``) each head's output is multiplied by ``sigmoid(gate_proj h)`` before ``out_proj``;
    ``biases`` are those of q_proj, k_proj, v_proj and out_proj (LFM3's ``attention_bias``); ``wide_rope``
    is :func:`apply_rope`'s ``wide``.
    ``tap`` sees q_proj, k_proj, v_proj, q_normed, k_normed, q_rope, k_rope, (gate,) attn_out, out_proj.
    Attention runs ``attention_block_size`` queries at a time, which bounds memory on long prompts.
    (T, D) -> (T, D), (S, G, hd), (S, G, hd)
    """
    T = h.shape[0]
    hd = q_norm.shape[0]
    q_bias, k_bias, v_bias, out_bias = biases
    q = tap("q_proj", rnd(linear(h, q_proj, q_bias)).reshape(T, -1, hd))  # (T, H, hd)
    k = tap("k_proj", rnd(linear(h, k_proj, k_bias)).reshape(T, -1, hd))  # (T, G, hd)
    v = tap("v_proj", rnd(linear(h, v_proj, v_bias)).reshape(T, -1, hd))  # (T, G, hd)
    q = tap("q_normed", rms_norm(q, q_norm, eps, rnd))
    k = tap("k_normed", rms_norm(k, k_norm, eps, rnd))
    q = tap("q_rope", apply_rope(q, cos, sin, rnd, wide_rope))
    k = tap("k_rope", apply_rope(k, cos, sin, rnd, wide_rope))
    if past_k is not None:
        k = np.concatenate([past_k, k], axis=0)  # (S, G, hd)
        v = np.concatenate([past_v, v], axis=0)
    attn = attention_blocked(q, k, v, attention_block_size, window, rnd)  # (T, H*hd)
    if gate_proj is not None:
        gate = tap("gate", rnd(sigmoid(rnd(linear(h, gate_proj)))))  # (T, H)
        attn = output_gate(attn, gate, rnd)
    attn = tap("attn_out", attn)
    return tap("out_proj", rnd(linear(attn, out_proj, out_bias))), k, v


# ------------------------------------------------------------------ gated short conv
def causal_conv1d(u: np.ndarray, w: np.ndarray, b: np.ndarray | None = None,
                  window: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Depthwise causal convolution: ``z_t = sum_j w[:, j] * u_{t-(L-1)+j} (+ b)``.

    The last tap multiplies the current token. ``window`` holds the inputs before the first token, most
    recent last; only its last L-1 rows are read, and missing rows (fewer than L-1: the sequence began
    less than L-1 tokens ago, or ``None`` at its start) are zeros. Returns the output and the input
    history extended by this chunk, ``concat(window, u)``, of which the caller keeps what it needs
    (the last L-1 rows to continue; more to be able to roll back).
    (T, D), (D, L), (D,), (n, D) -> (T, D), (n + T, D)
    """
    T, D = u.shape
    L = w.shape[1]
    history = np.zeros((0, D), dtype=u.dtype) if window is None else window
    past = history[history.shape[0] - min(L - 1, history.shape[0]):]  # at most the last L-1 rows
    padded = np.concatenate([np.zeros((L - 1 - past.shape[0], D), dtype=u.dtype), past, u])  # (L-1+T, D)
    z = np.zeros_like(u)
    for j in range(L):
        z += w[:, j] * padded[j:j + T]
    if b is not None:
        z += b
    return z, np.concatenate([history, u])


def short_conv(
    h: np.ndarray,
    in_proj: np.ndarray, conv: np.ndarray, out_proj: np.ndarray,
    in_proj_bias: np.ndarray | None = None, conv_bias: np.ndarray | None = None,
    out_proj_bias: np.ndarray | None = None, window: np.ndarray | None = None,
    tap: Tap = untapped, rnd: Rounding = exact,
) -> tuple[np.ndarray, np.ndarray]:
    """The gated short convolution mixer.

    ``b_gate, c_gate, x = split(in_proj(h), 3)``; ``u = b_gate * x``; ``z = causal_conv1d(u)``;
    ``out = out_proj(c_gate * z)``. No activation, no norm. ``conv`` is the checkpoint's ``(D, 1, L)``
    weight. ``window`` holds earlier values of u (see :func:`causal_conv1d`). Returns the output and the
    history of u extended by this chunk. ``tap`` sees in_proj, b_gate, c_gate, x, bx, conv_out, y, out_proj.
    (T, D), (n, D) -> (T, D), (n + T, D)
    """
    bcx = tap("in_proj", rnd(linear(h, in_proj, in_proj_bias)))  # (T, 3D)
    b_gate, c_gate, x = (tap(n, part) for n, part in zip(("b_gate", "c_gate", "x"), np.split(bcx, 3, axis=-1)))
    u = tap("bx", rnd(b_gate * x))
    z, history = causal_conv1d(u, conv[:, 0, :], conv_bias, window)
    z = tap("conv_out", rnd(z))
    y = tap("y", rnd(c_gate * z))
    return tap("out_proj", rnd(linear(y, out_proj, out_proj_bias))), history


# -------------------------------------------------------------------------------- FFN
def swiglu(h: np.ndarray, w1: np.ndarray, w3: np.ndarray, w2: np.ndarray,
           tap: Tap = untapped, rnd: Rounding = exact) -> np.ndarray:
    """``w2(silu(w1 h) * w3 h)``; w1 = gate, w3 = up, w2 = down.  (T, D), (F, D), (F, D), (D, F) -> (T, D)

    ``tap`` sees w1 (the gate projection), w3 (the up projection), act (``silu(w1 h) * w3 h``) and w2."""
    gate = tap("w1", rnd(linear(h, w1)))
    up = tap("w3", rnd(linear(h, w3)))
    if rnd is exact:  # the same operations per element, fused into one pass (and into gate's buffer when
        # nothing recorded it): silu(gate) * up, bit for bit as the two steps below
        act = logistic(gate, True, times=up, out=gate if tap is untapped else None)
    else:  # a bf16 backend rounds silu's output before the product
        act = rnd(np.multiply(rnd(silu(gate)), up))
    act = tap("act", act)
    return tap("w2", rnd(linear(act, w2)))


def top_k_experts(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores per row, largest first; equal scores go to the lower index.
    (T, E) -> (T, k) int64"""
    return np.argsort(-scores, axis=-1, kind="stable")[:, :k]


def route(
    h: np.ndarray, gate: np.ndarray, expert_bias: np.ndarray | None, k: int,
    norm_topk_prob: bool, routed_scaling_factor: float, rnd: Rounding = exact,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The LFM2-MoE router: ``logits = gate h``, then :func:`select_experts`.
    (T, D), (E, D), (E,) -> logits (T, E), experts (T, k) int64, weights (T, k)
    """
    logits = rnd(linear(h, gate))
    return (logits, *select_experts(logits, expert_bias, k, norm_topk_prob, routed_scaling_factor, rnd))


def select_experts(
    logits: np.ndarray, expert_bias: np.ndarray | None, k: int, norm_topk_prob: bool,
    routed_scaling_factor: float, rnd: Rounding = exact,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k sigmoid routing from the router logits.

    ``s = sigmoid(logits)``; the k experts are chosen on ``s + expert_bias`` (the bias steers selection
    only; it is float32, so a bf16 backend selects in float32); their weights are the unbiased ``s``; if
    ``norm_topk_prob``: ``w = w / (sum(w) + 1e-6)``; finally ``w *= routed_scaling_factor``.
    (T, E), (E,) -> experts (T, k) int64, weights (T, k)
    """
    scores = rnd(sigmoid(logits))
    experts = top_k_experts(scores if expert_bias is None else scores + expert_bias, k)
    weights = np.take_along_axis(scores, experts, axis=-1)
    if norm_topk_prob:
        total = rnd(rnd(weights.sum(axis=-1, keepdims=True)) + weights.dtype.type(ROUTER_NORM_EPS))
        weights = rnd(weights / total)
    return experts, rnd(weights * weights.dtype.type(routed_scaling_factor))


ExpertWeights = Callable[[int], tuple[np.ndarray, np.ndarray, np.ndarray]]


def moe(h: np.ndarray, experts: np.ndarray, weights: np.ndarray,
        expert_weights: "ExpertWeights | Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]",
        rnd: Rounding = exact) -> np.ndarray:
    """Mixture of SwiGLU experts: ``out_t = sum_j weights[t, j] * expert_{experts[t, j]}(h_t)``.

    Tokens are grouped by expert: each chosen expert runs once on all the tokens that chose it, in
    increasing expert order (the order in which a bf16 backend adds the contributions up).
    ``expert_weights(e)`` (or ``expert_weights[e]``) gives ``(w1, w3, w2)``.
    (T, D), (T, k) int, (T, k) -> (T, D)
    """
    get = expert_weights if callable(expert_weights) else expert_weights.__getitem__
    T, k = experts.shape
    flat_experts = experts.ravel()  # (T*k,)
    flat_tokens = np.repeat(np.arange(T), k)  # (T*k,)
    flat_weights = weights.ravel()  # (T*k,)
    order = np.argsort(flat_experts, kind="stable")
    bounds = np.searchsorted(flat_experts[order], np.arange(flat_experts.max(initial=-1) + 2))
    out = np.zeros_like(h)
    for e in range(len(bounds) - 1):
        picks = order[bounds[e]:bounds[e + 1]]
        if picks.size == 0:
            continue
        tokens = flat_tokens[picks]  # each token at most once per expert: no duplicate rows
        y = swiglu(h[tokens], *get(e), rnd=rnd)
        out[tokens] = rnd(out[tokens] + rnd(y * flat_weights[picks, None]))
    return out
