# %% [markdown]
# # 03 · Attention: RoPE, QK-norm, grouped queries — and what the trained tiny model looks at
#
# LFM2's attention layers are standard causal GQA with two details: each head's queries and keys are
# RMS-normalised *before* the rotary embedding, and RoPE uses the split-half layout.

# %%
import matplotlib.pyplot as plt
import numpy as np

import lfm2np
from lfm2np import ops
from lfm2np.embedded import embedded_model_path
from lfm2np.io.tokenizer import Tokenizer
from lfm2np.oracle.trace import record

model = lfm2np.load(embedded_model_path())
tok = Tokenizer.from_dir(embedded_model_path())
c = model.config
print(model)
print("attention layers:", c.attention_layers, "| H =", c.num_attention_heads, "G =", c.num_key_value_heads,
      "hd =", c.head_dim)

# %% [markdown]
# ## RoPE: rotation by position, relative scores
# The head's hd dimensions form hd/2 pairs, dims (i, i + hd/2), and pair i turns by theta^(-2i/hd) radians
# per position: pair 0 by a full radian, the last pair by a few thousandths. So the table below has hd/2
# rows, not hd (the cos of dim i + hd/2 is the cos of dim i). The fast pairs turn by more than a radian
# between neighbouring positions: drawn as a picture, their integer-position samples make slow-looking
# ripples (aliasing), so the right panel draws three pairs as continuous curves with the positions the
# model sees as dots.

# %%
pairs = c.head_dim // 2
cos, sin = ops.rope_tables(np.arange(64), c.head_dim, c.rope_theta)  # (64, hd): the halves repeat
assert np.array_equal(cos[:, :pairs], cos[:, pairs:])
freq = ops.rope_frequencies(c.head_dim, c.rope_theta)                 # (hd/2,) radians per position
fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.9), gridspec_kw={"width_ratios": [1, 1.5]})
left.semilogy(np.arange(pairs), freq, "o-", ms=4)
left.set_xticks(range(0, pairs, 3))
left.set_xlabel("frequency pair i (dims i and i + hd/2)"); left.set_ylabel("radians per position")
left.set_title(f"theta^(-2i/hd), theta = {c.rope_theta:g}, hd = {c.head_dim}", fontsize=10)
turn = lambda v: 2 * np.pi / np.maximum(v, 1e-12)  # radians per position <-> positions per turn  # noqa: E731
wavelength = left.secondary_yaxis("right", functions=(turn, turn))
wavelength.set_ylabel("positions per turn")
p_fine = np.linspace(0, 40, 800)
for i, colour in zip((0, 3, pairs - 1), ("C0", "C1", "C2")):
    right.plot(p_fine, np.cos(p_fine * freq[i]), color=colour, lw=1, label=f"pair {i}: {freq[i]:.3g} rad/position")
    right.plot(np.arange(41), cos[:41, i], "o", color=colour, ms=3)
right.set_xlabel("position p (dots: the positions the model sees)"); right.set_ylabel("cos(p · freq)")
right.set_title("how fast pairs turn: curves in continuous p, dots at integer p", fontsize=10)
right.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, frameon=False)
fig.tight_layout()

rng = np.random.default_rng(0)
q, k = rng.standard_normal((1, 1, c.head_dim)), rng.standard_normal((1, 1, c.head_dim))
def score(m, n):
    cq, sq = ops.rope_tables(np.array([m]), c.head_dim, c.rope_theta, np.float64)
    ck, sk = ops.rope_tables(np.array([n]), c.head_dim, c.rope_theta, np.float64)
    return float(np.sum(ops.apply_rope(q, cq, sq) * ops.apply_rope(k, ck, sk)))
print("score(10, 4) =", round(score(10, 4), 6), "  score(50, 44) =", round(score(50, 44), 6))

# %% [markdown]
# ## QK-norm then RoPE, from a trace
# The trace of one forward pass holds every step: the projected queries, the normalised ones (unit RMS
# per head before the weight), and the rotated ones (RoPE preserves each head's norm).

# %%
messages = [{"role": "user", "content": "What does the with statement do?"}]
ids = tok.encode_chat(messages)
logits, trace = record(model, ids)
layer = c.attention_layers[0]
a = f"model.layers.{layer}.self_attn."
qn, qr = trace[a + "q_normed"], trace[a + "q_rope"]
w = model.params[a + "q_layernorm.weight"]
print("RMS per head before the weight:", np.sqrt(np.mean((qn / w) ** 2, axis=-1))[0].round(3))
print("RoPE keeps the norms:", np.allclose(np.linalg.norm(qn, axis=-1), np.linalg.norm(qr, axis=-1), rtol=1e-5))

# %% [markdown]
# ## Where the heads look
# The attention probabilities of the first attention layer, recomputed from the traced queries and keys
# with the same formula as `ops.attention` (query head j reads KV head j // (H/G)).

# %%
T, H, hd = qr.shape
kr = trace[a + "k_rope"]
G = kr.shape[1]
probs = np.zeros((H, T, T))
for j in range(H):
    s = qr[:, j] @ kr[:, j // (H // G)].T / np.sqrt(hd)
    s[np.triu_indices(T, 1)] = -np.inf
    p = np.exp(s - s.max(-1, keepdims=True))
    probs[j] = p / p.sum(-1, keepdims=True)
labels = [tok.decode([i]).replace("\n", "\\n") for i in ids]
future = np.triu(np.ones((T, T), dtype=bool), 1)  # key after query: masked, never attended (not "probability 0")
cmap = plt.get_cmap("viridis").copy()
cmap.set_bad("#d9d9d9")  # masked cells in light grey, apart from the dark blue of a near-zero probability
fig, axes = plt.subplots(2, (H + 1) // 2, figsize=(13, 13), layout="constrained")
for j, ax in enumerate(axes.flat):
    if j >= H:
        ax.axis("off")
        continue
    im = ax.imshow(np.ma.masked_array(probs[j], future), cmap=cmap, vmin=0, vmax=1)
    ax.set_title(f"layer {layer}, head {j} (KV head {j // (H // G)})", fontsize=11)
    ax.set_xticks(range(T)); ax.set_xticklabels(labels, rotation=90, fontsize=9)
    ax.set_yticks(range(T)); ax.set_yticklabels(labels, fontsize=9)
    ax.set_xlabel("key (attended token)", fontsize=10)
    ax.set_ylabel("query (attending token)", fontsize=10)
fig.colorbar(im, ax=axes, label="attention probability (grey: a future key, masked)", shrink=0.6)
assert np.allclose(probs.sum(-1), 1) and (probs[:, future] == 0).all()
