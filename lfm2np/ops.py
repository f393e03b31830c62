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

Operators are formulas: arrays and scalars in, arrays out. Those that round where a low-precision backend
stores an intermediate of their own take ``rnd(x)``, the numerics mode's rounding (the identity in the float32
and float64 modes, rounding to bfloat16 in the emulation: :mod:`lfm2np.numerics`). Nothing here names or
records a value: the composite blocks (attention, the gated short conv, SwiGLU, the MoE) and the layers that
round and name each result are :mod:`lfm2np.layers`.

This module imports nothing from lfm2np but :mod:`lfm2np.passes` (how its long elementwise passes run).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from .passes import ELEMENTWISE_CHUNK, in_parallel, logistic, shared_products

#: ``rnd(x) -> x``: rounding applied where a backend stores a result (identity unless emulating bf16).
Rounding = Callable[[np.ndarray], np.ndarray]

#: The constant transformers adds to the sum of the top-k routing weights before dividing.
ROUTER_NORM_EPS = 1e-6
#: The order a mixture of experts adds its experts' weighted outputs in: "expert" (by expert index, as
#: transformers' loop over experts does); llama.cpp's operators (:mod:`lfm2np.ggml_ops`) add by top-k "slot".
MIXTURE_ORDER = "expert"


def exact(x: np.ndarray) -> np.ndarray:
    """The identity rounding: results are kept as the compute dtype gives them."""
    return x


# ----------------------------------------------------------------------------- basics
def linear(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None, shared: bool = False) -> np.ndarray:
    """``y = x W^T + b``.  (T, in), (out, in), (out,) -> (T, out)

    ``shared``: the rows of x shared among lfm2np's threads, a product each on one BLAS thread
    (:func:`lfm2np.passes.shared_products`): the bits of one BLAS thread whatever the thread count."""
    if not shared:
        y = x @ w.T
        if b is not None:
            y += b
        return y
    rows = x.reshape(-1, x.shape[-1])
    out = np.empty((rows.shape[0], w.shape[0]), np.result_type(x, w))

    def piece(lo: int, hi: int) -> None:
        np.matmul(rows[lo:hi], w.T, out=out[lo:hi])
        if b is not None:
            out[lo:hi] += b

    shared_products(rows.shape[0], piece, size=out.size)
    return out.reshape(*x.shape[:-1], w.shape[0])


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
    """``inv_freq_i = theta^(-2i/hd)``, the hd/2 inverse frequencies of split-half RoPE, for the first
    ``rotated`` pairs (all of them by default) and 0 for the rest, whose dims are then left unrotated
    (LFM3's "proportional" partial rotation).  -> (hd/2,)"""
    dtype = np.dtype(dtype)
    inv_freq = 1.0 / (dtype.type(theta) ** (np.arange(0, head_dim, 2, dtype=dtype) / dtype.type(head_dim)))
    if rotated is not None:
        inv_freq[rotated:] = 0
    return inv_freq


def rope_cos_sin(positions: np.ndarray, inv_freq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``cos(a)``, ``sin(a)`` of the angles ``a[t, i] = pos_t * inv_freq_i``, repeated for both halves of the
    head, in the dtype of ``inv_freq`` (the reference computes angles in float32; float64 in the oracle mode).
    (T,) int, (hd/2,) -> (T, hd), (T, hd)"""
    angles = np.asarray(positions).astype(inv_freq.dtype)[:, None] * inv_freq[None, :]  # (T, hd/2)
    angles = np.concatenate([angles, angles], axis=-1)  # (T, hd)
    return np.cos(angles), np.sin(angles)


def rope_tables(positions: np.ndarray, head_dim: int, theta: float, dtype: np.dtype = np.float32,
                rotated: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin tables of split-half (NeoX) RoPE over the full head dim: :func:`rope_cos_sin` of
    :func:`rope_frequencies`.  (T,) int -> (T, hd), (T, hd)"""
    return rope_cos_sin(positions, rope_frequencies(head_dim, theta, rotated, dtype))


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


def softmax(x: np.ndarray, axis: int = -1, in_place: bool = False, shared: bool = True) -> np.ndarray:
    """``exp(x - max x) / sum exp(x - max x)``; rows that are entirely -inf are not expected (causality keeps one
    key). ``in_place`` overwrites ``x`` (the attention scores, a fresh buffer) instead of allocating another.
    Along a contiguous last axis, the rows are shared among threads (:mod:`lfm2np.passes`) (the same bits),
    unless not ``shared`` (a caller that already shares its work out among the threads)."""
    e = x if in_place else x.copy()
    if shared and e.ndim and e.size and e.flags.c_contiguous and axis in (-1, e.ndim - 1):
        rows = e.reshape(-1, e.shape[-1])
        in_parallel(rows.shape[0], lambda lo, hi: _softmax_in_place(rows[lo:hi]), e.size)
    else:
        _softmax_in_place(e, axis)
    return e


#: the most bytes of scores :func:`attention` makes at once: a block's score matrix stays in a shared L3 cache
#: (8 MiB of 32 on the AMD EPYC measured), where the softmax's passes over it are cheap
SCORE_BYTES = 8 << 20


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, window: int | None = None, rnd: Rounding = exact,
              block: int = 128, causal: bool = True, keys: np.ndarray | None = None) -> np.ndarray:
    """``softmax(q k^T * hd^-0.5 + causal mask) v``: grouped-query attention of T new queries, the last T of S
    positions, over the S keys (earlier ones first); query head j reads KV head ``j // (H // G)``.
    (T, H, hd), (S, G, hd), (S, G, hd) -> (T, H * hd)

    Query t at position ``p_t = S - T + t`` sees keys ``0 .. p_t``, or with a sliding ``window`` only the last W
    of them. Not ``causal`` (a bidirectional layer): every query sees every key, except those where the key
    padding mask ``keys`` (S,) is False, which are left out: their mask is -inf, their weight exp(-inf) = 0.
    The formula is :func:`attend`; here it runs ``block`` queries at a time, so the scores take
    ``block x S`` instead of ``T x S`` memory, each block reading only the keys it can see (up to its last
    position; with a window, from its first query's window start). A block whose scores would pass
    :data:`SCORE_BYTES` runs a few KV groups (and their query heads) at a time. The result is the same rows.
    """
    if not causal and keys is not None:
        k, v = k[keys], v[keys]  # (S', G, hd): the padding's weight is exactly 0
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
            end = S - T + t1 if causal else S  # keys visible to the last query of this block
            out[t0:t1, g0 * R * hd:g1 * R * hd] = attend(qs[t0:t1], ks[lo:end], vs[lo:end], window, rnd,
                                                         start=first - lo, causal=causal)
    return out


def attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, window: int | None = None, rnd: Rounding = exact,
           start: int | None = None, causal: bool = True) -> np.ndarray:
    """``softmax(q k^T * hd^-0.5 + mask) v`` for T queries at positions ``start + t`` (``start = S - T`` by
    default) over S keys: query t sees keys ``0 .. start + t`` (with a ``window``: the last W of them; not
    ``causal``: all S, no mask).  (T, H, hd), (S, G, hd), (S, G, hd) -> (T, H * hd)
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
    for lo, hi in ((start + 1, S), (0, start + T - window if window else 0)) if causal else ():
        lo, hi = max(lo, 0), min(hi, S)
        if lo < hi:
            key = np.arange(lo, hi)[None, :]
            hidden = (key > pos) if window is None else (key > pos) | (key <= pos - window)
            scores[..., lo:hi] += np.where(hidden, -np.inf, 0).astype(scores.dtype)
    probs = rnd(softmax(scores, axis=-1, in_place=True)).reshape(G, R * T, S)
    out = rnd(probs @ vg).reshape(G, R, T, hd)  # (G, R, T, hd)
    return out.transpose(2, 0, 1, 3).reshape(T, H * hd)


def output_gate(attn: np.ndarray, gate: np.ndarray, rnd: Rounding = exact) -> np.ndarray:
    """``o[t, h, :] * gate[t, h]``: LFM3's per-head output gate scales each head's attention output by its gate,
    ``gate = sigmoid(x @ gate_proj^T)``, one number per head and position in (0, 1) (a head can be switched off
    for a token).  (T, H*hd), (T, H) -> (T, H*hd)"""
    T, H = gate.shape
    return rnd(attn.reshape(T, H, -1) * gate[:, :, None]).reshape(T, -1)


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


def centred_conv1d(u: np.ndarray, w: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """Depthwise centred convolution: ``z_t = sum_j w[:, j] * u_{t - L//2 + j} (+ b)``, zeros outside the sequence.

    The bidirectional layer's conv: the window is padded by L//2 on each side (transformers' ``padding=L//2``,
    the first T outputs), so the middle tap multiplies the current token and the others its neighbours on both
    sides (L = 3: ``w0 u_{t-1} + w1 u_t + w2 u_{t+1}``). No state: the sequence is whole.
    (T, D), (D, L), (D,) -> (T, D)
    """
    T, D = u.shape
    L = w.shape[1]
    p = L // 2
    padded = np.concatenate([np.zeros((p, D), u.dtype), u, np.zeros((L - 1 - p, D), u.dtype)])  # (T+L-1, D)
    z = np.zeros_like(u)
    for j in range(L):
        z += w[:, j] * padded[j:j + T]
    if b is not None:
        z += b
    return z


# --------------------------------------------------------------------------- pooling
def pool(h: np.ndarray, how: str, real: np.ndarray | None = None) -> np.ndarray:
    """One vector for a sequence from its token vectors: ``cls`` the first token's (LFM2's BOS), ``mean`` the
    mean over the real tokens ``sum_t m_t h_t / sum_t m_t``, ``last`` the last real token's; ``real`` (T,) bool
    marks the real tokens (None: all).  (T, E) -> (E,)"""
    m = np.ones(h.shape[0], bool) if real is None else real
    if how == "cls":
        return h[0].copy()
    if how == "last":
        return h[np.flatnonzero(m)[-1]].copy()
    return h[m].sum(axis=0) / h.dtype.type(m.sum())


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """``x / max(||x||_2, eps)`` over the last axis (torch's ``F.normalize``).  (..., E) -> (..., E)"""
    norm = np.sqrt(np.sum(np.square(x, dtype=np.promote_types(x.dtype, np.float32)), axis=-1, keepdims=True))
    return (x / np.maximum(norm, eps)).astype(x.dtype, copy=False)


# -------------------------------------------------------------------------------- FFN
def gated_silu(gate: np.ndarray, up: np.ndarray, rnd: Rounding = exact, out: np.ndarray | None = None) -> np.ndarray:
    """``silu(gate) * up``, SwiGLU's activation. A bf16 backend rounds silu's output before the product;
    otherwise the two steps are fused into one pass (into ``out``, e.g. ``gate``'s own buffer when nothing
    else holds it), bit for bit as the two steps.  (T, F), (T, F) -> (T, F)"""
    if rnd is exact:
        return logistic(gate, True, times=up, out=out)
    return rnd(np.multiply(rnd(silu(gate)), up))


def top_k_experts(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores per row, largest first; equal scores go to the lower index.
    (T, E) -> (T, k) int64"""
    return np.argsort(-scores, axis=-1, kind="stable")[:, :k]


def normalise_weights(weights: np.ndarray, rnd: Rounding = exact) -> np.ndarray:
    """``w / (sum(w) + 1e-6)`` per token, the top-k routing weights renormalised (``norm_topk_prob``) as
    transformers computes it; a bf16 backend rounds the sum, the denominator and the quotient.
    (T, k) -> (T, k)"""
    total = rnd(rnd(weights.sum(axis=-1, keepdims=True)) + weights.dtype.type(ROUTER_NORM_EPS))
    return rnd(weights / total)


# ---------------------------------------- LayerNorm and GELU-tanh (the LFM2-VL vision tower; erf and the exact GELU: ops_vision)
def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float, rnd: Rounding = exact) -> np.ndarray:
    """LayerNorm over the last axis: ``(x - mean) / sqrt(var + eps) * w + b`` (biased variance).  (..., N) -> (..., N)

    Statistics in at least float32; a bf16 backend computes the whole expression in float32 and stores it once.
    (Rows shared among threads, each row's operations the same whatever the split.)"""
    xf = x.astype(np.promote_types(x.dtype, np.float32), copy=False)
    if np.result_type(xf, weight, bias) != xf.dtype:  # wider weights: the expression as written, promoted
        centred = xf - np.mean(xf, axis=-1, keepdims=True)
        inv_std = 1.0 / np.sqrt(np.mean(centred * centred, axis=-1, keepdims=True) + xf.dtype.type(eps))
        return rnd((centred * inv_std * weight + bias).astype(x.dtype, copy=False))
    rows = np.ascontiguousarray(xf).reshape(-1, xf.shape[-1]) if xf.ndim else xf.reshape(1, 1)
    out = np.empty(rows.shape, xf.dtype)
    one, small = xf.dtype.type(1.0), xf.dtype.type(eps)

    def piece(lo: int, hi: int) -> None:
        r, o = rows[lo:hi], out[lo:hi]
        np.subtract(r, np.mean(r, axis=-1, keepdims=True), out=o)  # centred
        inv_std = one / np.sqrt(np.mean(o * o, axis=-1, keepdims=True) + small)
        o *= inv_std
        o *= weight
        o += bias

    in_parallel(rows.shape[0], piece, size=out.size)
    return rnd(out.reshape(xf.shape).astype(x.dtype, copy=False))


def gelu_tanh(x: np.ndarray, rnd: Rounding = exact) -> np.ndarray:
    """``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``, GELU's tanh approximation (``gelu_pytorch_tanh``),
    in the dtype of x (a bf16 backend: in float32, stored once)."""
    t = x.dtype.type
    c, a = t(math.sqrt(2 / math.pi)), t(0.044715)
    flat = np.ascontiguousarray(x).reshape(-1)
    out = np.empty(flat.shape, x.dtype)

    def piece(lo: int, hi: int) -> None:  # in place, a cache-sized slice at a time, each element's operations
        half = np.empty(min(ELEMENTWISE_CHUNK, hi - lo), x.dtype)  # in this order
        for i in range(lo, hi, ELEMENTWISE_CHUNK):
            j = min(i + ELEMENTWISE_CHUNK, hi)
            xs, o, h = flat[i:j], out[i:j], half[:j - i]
            np.multiply(xs, xs, out=o)
            o *= xs  # x^3
            o *= a
            o += xs
            o *= c  # the inner value
            np.tanh(o, out=o)
            o += t(1)
            np.multiply(xs, t(0.5), out=h)
            o *= h

    in_parallel(flat.size, piece)
    return rnd(out.reshape(x.shape))
