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
# Each pair of dimensions (i, i + hd/2) turns at its own frequency. A query-key score depends only on the
# distance between the two positions.

# %%
cos, sin = ops.rope_tables(np.arange(64), c.head_dim, c.rope_theta)
fig, ax = plt.subplots(figsize=(6.5, 2.6))
im = ax.imshow(cos.T, aspect="auto", cmap="RdBu", vmin=-1, vmax=1)
ax.set_xlabel("position p"); ax.set_ylabel("head dimension i")
ax.set_title(f"cos(p · theta^(-2i/hd)), theta = {c.rope_theta:g}")
fig.colorbar(im, ax=ax, label="cos"); fig.tight_layout()

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
fig, axes = plt.subplots(1, H, figsize=(3.3 * H, 3.9), layout="constrained")
for j, ax in enumerate(np.atleast_1d(axes)):
    im = ax.imshow(probs[j], cmap="viridis", vmin=0, vmax=1)
    ax.set_title(f"layer {layer}, head {j} (KV head {j // (H // G)})", fontsize=9)
    ax.set_xticks(range(T)); ax.set_xticklabels(labels, rotation=90, fontsize=6)
    ax.set_yticks(range(T)); ax.set_yticklabels(labels, fontsize=6)
    ax.set_xlabel("key (attended token)", fontsize=8)
    if j == 0:
        ax.set_ylabel("query (attending token)", fontsize=8)
fig.colorbar(im, ax=axes, label="attention probability", shrink=0.8)
assert np.allclose(probs.sum(-1), 1)
