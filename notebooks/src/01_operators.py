# %% [markdown]
# # 01 · The operators of LFM2, from their formulas
#
# Every operator of an LFM2 model is a few lines of NumPy. Here each one is written out again from its
# formula, run on small random inputs, and checked against the implementation the full model uses: the
# formulas of `lfm2np.ops` and the blocks of `lfm2np.layers` (the short conv, SwiGLU, the router and the
# experts, over a view of one layer's weights). (A notebook re-derives a library function only to teach it;
# the asserts keep the two in step.)
#
# Dimension legend: T tokens, D hidden, H query heads, G KV heads, hd head dim, F FFN width,
# E experts, k experts per token, L conv kernel.

# %%
import numpy as np
from lfm2np import layers, ops
from lfm2np.layers import ConvWeights, SwiGLUWeights

rng = np.random.default_rng(0)
T, D, H, G, hd, F, E, k, L = 6, 16, 4, 2, 4, 24, 5, 2, 3

# %% [markdown]
# ## RMSNorm
# $y = w \odot x / \sqrt{\mathrm{mean}(x^2) + \epsilon}$ over the last axis. The weight is used as is
# (not $1 + w$); the statistics are float32.

# %%
x = rng.standard_normal((T, D)).astype(np.float32)
w = (0.5 + rng.random(D)).astype(np.float32)
mine = w * x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + 1e-5)
assert np.allclose(mine, ops.rms_norm(x, w, 1e-5), rtol=1e-6)
print("rms of the normalised rows:", np.sqrt(np.mean((mine / w) ** 2, axis=-1)).round(4))

# %% [markdown]
# ## The gated short convolution
# `in_proj` makes three streams, **b**, **c** and **x**. The convolution runs over `u = b * x`, causally,
# one kernel of length L per channel (depthwise); **c** gates its output; `out_proj` mixes the channels.

# %%
W_in = rng.standard_normal((3 * D, D)) / np.sqrt(D)
W_conv = rng.standard_normal((D, 1, L))
W_out = rng.standard_normal((D, D)) / np.sqrt(D)
h = rng.standard_normal((T, D))

b_gate, c_gate, xs = np.split(h @ W_in.T, 3, axis=-1)
u = b_gate * xs
u_padded = np.vstack([np.zeros((L - 1, D)), u])          # zeros before the sequence starts
z = np.stack([sum(W_conv[:, 0, j] * u_padded[t + j] for j in range(L)) for t in range(T)])
mine = (c_gate * z) @ W_out.T

theirs, history = layers.short_conv(h, ConvWeights(W_in, W_conv, W_out))
assert np.allclose(mine, theirs)
print("output", theirs.shape, "| conv history kept for decoding:", history.shape)

# %% [markdown]
# ## RoPE (split-half)
# Dimension $i$ rotates together with $i + hd/2$ by the angle $p \cdot \theta^{-2i/hd}$.

# %%
positions = np.arange(T)
inv_freq = 1e6 ** (-np.arange(0, hd, 2) / hd)
angles = np.concatenate([positions[:, None] * inv_freq] * 2, axis=-1)          # (T, hd)
q = rng.standard_normal((T, H, hd))
x1, x2 = q[..., : hd // 2], q[..., hd // 2 :]
mine = q * np.cos(angles)[:, None] + np.concatenate([-x2, x1], -1) * np.sin(angles)[:, None]
cos, sin = ops.rope_tables(positions, hd, 1e6, np.float64)
assert np.allclose(mine, ops.apply_rope(q, cos, sin))

# %% [markdown]
# ## Grouped-query attention
# Query head $j$ reads KV head $j \,//\, (H/G)$; causal; scores scaled by $hd^{-1/2}$.

# %%
kk, vv = rng.standard_normal((T, G, hd)), rng.standard_normal((T, G, hd))
mine = np.zeros((T, H, hd))
for j in range(H):
    g = j // (H // G)
    s = q[:, j] @ kk[:, g].T / np.sqrt(hd)
    s[np.triu_indices(T, 1)] = -np.inf
    p = np.exp(s - s.max(-1, keepdims=True))
    mine[:, j] = (p / p.sum(-1, keepdims=True)) @ vv[:, g]
assert np.allclose(mine.reshape(T, H * hd), ops.attention(q, kk, vv))

# %% [markdown]
# ## SwiGLU
# $w_2(\mathrm{silu}(w_1 h) \odot w_3 h)$ with $\mathrm{silu}(a) = a\,\sigma(a)$.

# %%
w1, w3, w2 = rng.standard_normal((F, D)), rng.standard_normal((F, D)), rng.standard_normal((D, F))
silu = lambda a: a / (1 + np.exp(-a))
assert np.allclose((silu(h @ w1.T) * (h @ w3.T)) @ w2.T, layers.swiglu(h, SwiGLUWeights(w1, w3, w2)))

# %% [markdown]
# ## The router and the experts
# Sigmoid scores (not softmax); the expert bias steers the *choice* only; the weights are the unbiased
# scores of the chosen experts, renormalised with $+10^{-6}$ and scaled.

# %%
gate = rng.standard_normal((E, D))
bias = np.array([0.0, 0.0, 0.0, 0.0, 3.0])               # a large bias on expert 4
scores = 1 / (1 + np.exp(-(h @ gate.T)))
chosen = np.argsort(-(scores + bias), axis=-1, kind="stable")[:, :k]
weights = np.take_along_axis(scores, chosen, -1)
weights = weights / (weights.sum(-1, keepdims=True) + 1e-6)

logits, experts, lib_weights = layers.route(h, gate, bias, k, norm_topk_prob=True, routed_scaling_factor=1.0)
assert (experts == chosen).all() and np.allclose(weights, lib_weights)
print("every token picked expert 4:", bool((experts == 4).any(axis=-1).all()))

expert_w = [SwiGLUWeights(*(rng.standard_normal(s) for s in ((8, D), (8, D), (D, 8)))) for _ in range(E)]
mine = np.stack([sum(weights[t, j] * layers.swiglu(h[t:t + 1], expert_w[chosen[t, j]])[0] for j in range(k))
                 for t in range(T)])
assert np.allclose(mine, layers.mixture(h, experts, lib_weights, expert_w.__getitem__))
print("all operators agree with lfm2np.ops and lfm2np.layers")
