# %% [markdown]
# # 08 · LFM3, the tri-hybrid: conv, sliding-window and full attention
#
# LFM3 keeps LFM2's gated short convolution and adds a third layer kind: attention over a sliding window
# of the last W positions. Every block's output is RMS-normed before it joins the residual stream
# (sandwich norms), each attention head's output passes through a sigmoid gate, and RoPE differs per layer
# type. This notebook looks at each of these on LFM3-1.7B's config and on a small random LFM3 model.

# %%
import matplotlib.pyplot as plt
import numpy as np

import lfm2np
from lfm2np import calc, ops
from lfm2np.synthetic import random_model

c = lfm2np.load_config("LFM3-1.7B")
print(c.layer_pattern(), " (C conv, S sliding-window attention, A full attention)")
print(f"{len(c.conv_layers)} conv, {len(c.sliding_layers)} sliding (W = {c.sliding_window}), "
      f"{len(c.full_attention_layers)} full; head_dim {c.head_dim}, conv_L_cache {c.conv_L_cache}")
print(f"{calc.param_counts(c)['total']:,} parameters (tied)")

# %% [markdown]
# ## The three layer kinds
# The default pattern: layer i is full attention if i % 4 == 2, sliding if i % 4 == 0 (and i > 0), else a
# conv layer.

# %%
kinds = {"conv": 0, "sliding_attention": 1, "full_attention": 2}
fig, ax = plt.subplots(figsize=(8, 1.6))
ax.imshow([[kinds[k] for k in c.layer_types]], cmap=plt.matplotlib.colors.ListedColormap(
    ["#9ecae1", "#fdae6b", "#e6550d"]), aspect="auto", vmin=0, vmax=2)
ax.set_yticks([]); ax.set_xticks(range(c.num_hidden_layers)); ax.set_xlabel("layer index")
for i, k in enumerate(c.layer_types):
    ax.text(i, 0, {"conv": "C", "sliding_attention": "S", "full_attention": "A"}[k], ha="center", va="center")
ax.set_title("LFM3-1.7B: C conv, S sliding-window attention, A full attention")
fig.tight_layout()

# %% [markdown]
# ## What each position can see
# A full-attention query sees every earlier position; a sliding-window query only the last W, itself
# included; a conv output mixes the last L inputs of its layer. Drawn for 24 positions with W = 6 and
# L = 7 (LFM3-1.7B: W = 256, L = 7). The window and the conv read the same kind of band: one attends over
# it with softmax weights that depend on the content, the other sums it with fixed per-channel taps.

# %%
T, W, L = 24, 6, 7
pos = np.arange(T)
full = (pos[None, :] <= pos[:, None]).astype(float)
sliding = full * (pos[None, :] > pos[:, None] - W)
conv = full * (pos[None, :] > pos[:, None] - L)
fig, axes = plt.subplots(1, 3, figsize=(11, 3.6))
for ax, (title, m) in zip(axes, [("full attention", full), (f"sliding window W = {W}", sliding),
                                 (f"short conv, L = {L} taps", conv)]):
    ax.imshow(m, cmap="Greys", vmin=0, vmax=1)
    ax.set_title(title); ax.set_xlabel("key / input position"); ax.set_ylabel("query / output position")
fig.suptitle("black: the positions an output reads (white: hidden)", y=1.0)
fig.tight_layout()
# the mask lfm2np applies is this band: check it against ops.attention on a one-hot probe
rng = np.random.default_rng(0)
q, k = rng.standard_normal((T, 1, T)), rng.standard_normal((T, 1, T))
v = np.eye(T)[:, None, :]  # value t is the one-hot vector of position t: the output is the attention row
probs = ops.attention(q, k, v, window=W).reshape(T, T)
assert ((probs > 0) == (sliding > 0)).all()
print("attention weights outside the window: ", float(np.abs(probs[sliding == 0]).max()))

# %% [markdown]
# ## Proportional RoPE: which frequencies turn
# Sliding layers rotate the whole head (theta 1e4). Full layers rotate only the first
# `int(0.5 * hd // 2)` = 32 of the 64 frequency pairs (theta 1e6); the rest have frequency 0, so their
# dims pass through untouched. Released configs reportedly label this "default" with
# partial_rotary_factor 0.5, which transformers 5.24 reads as a full rotation (the dashed line): lfm2np
# reads the partial rotation the model was trained with and warns (docs/ops/rope.md).

# %%
hd = c.head_dim
full_f = ops.rope_frequencies(hd, c.rope("full_attention").theta, c.rotated_pairs("full_attention"))
literal = ops.rope_frequencies(hd, c.rope("full_attention").theta)
slide_f = ops.rope_frequencies(hd, c.rope("sliding_attention").theta)
fig, ax = plt.subplots(figsize=(7, 3.2))
i = np.arange(hd // 2)
ax.semilogy(i, slide_f, "o-", ms=3, label="sliding layers (default, theta 1e4)")
ax.semilogy(i[full_f > 0], full_f[full_f > 0], "s-", ms=3, label="full layers (proportional 0.5, theta 1e6)")
ax.semilogy(i, literal, "--", color="grey", label="full layers as transformers reads 'default'")
ax.axvline(c.rotated_pairs("full_attention") - 0.5, color="k", lw=0.8)
ax.set_xlabel("frequency pair i (dims i and i + hd/2)"); ax.set_ylabel("radians per token")
ax.set_title("RoPE inverse frequencies; pairs right of the line do not turn in full layers")
ax.legend(fontsize=8); fig.tight_layout()
print("pairs that turn in full layers:", int((full_f > 0).sum()), "of", hd // 2)

# %% [markdown]
# ## The output gate
# Each attention head's output is multiplied by `sigmoid(gate_proj(x))`, one value per token and head,
# before the heads are projected back. A small random LFM3 model (the gate is visible in its trace as
# `self_attn.gate`):

# %%
tiny = lfm2np.Config.from_dict({
    "model_type": "lfm3", "vocab_size": 64, "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 8,
    "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 96, "sliding_window": 6,
    "layer_types": ["conv", "sliding_attention", "full_attention", "conv"], "eos_token_id": 2,
    "bos_token_id": 1, "pad_token_id": 0})
m = random_model(tiny, seed=3)
gates = {}
ids = np.arange(1, 21)
logits = m.forward(ids, record=lambda name, value: gates.__setitem__(name, value) if name.endswith(".gate") else None)
fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
for ax, (name, g) in zip(axes, gates.items()):
    im = ax.imshow(g.T, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_title(name.replace("model.", "")); ax.set_xlabel("token position"); ax.set_ylabel("query head")
fig.colorbar(im, ax=axes, label="gate value sigmoid(gate_proj x)")
print({n: (round(float(g.min()), 3), round(float(g.max()), 3)) for n, g in gates.items()})

# %% [markdown]
# ## Decoding state: a sliding layer's cache stops growing
# After 40 tokens the full layer holds 40 positions of K and V; the sliding layer holds W - 1 plus what a
# rollback may need (here 2); the conv layers L - 1 + 2 rows of their inputs.

# %%
state = m.new_state(max_rollback=2)
for chunk in np.array_split(np.arange(1, 41) % 64, 5):
    _, state = m.step(chunk, state)
for i, kind in enumerate(tiny.layer_types):
    held = state.conv[i].shape[0] if kind == "conv" else state.keys[i].shape[0]
    print(f"layer {i} ({kind}): {held} rows kept")

# %% [markdown]
# ## Memory against context: LFM2 and LFM3
# KV cache (f16, one sequence) as the context grows. LFM3-1.7B's 5 sliding layers keep at most 256
# positions, so only its 6 full layers grow; counting all 11 attention layers as full would nearly double it.
# Its 6 full layers hold as much per token as LFM2-1.2B's 6 attention layers (4 KV heads of 128 against 8 of
# 64), so the two lines meet once the sliding layers' fixed 2.6 MB no longer shows.

# %%
contexts = np.array([1024, 4096, 16384, 32768, 65536, 131072, 262144])
rows = {
    "LFM2-1.2B (6 attention layers)": lfm2np.load_config("LFM2-1.2B"),
    "LFM3-1.7B (6 full + 5 sliding)": c,
    "LFM3-1.7B, sliding counted as full": c.replace(layer_types=tuple(
        "full_attention" if k != "conv" else "conv" for k in c.layer_types)),
}
fig, ax = plt.subplots(figsize=(7, 3.4))
for label, cfg in rows.items():
    ax.loglog(contexts, [calc.kv_cache_bytes(cfg, int(n)) / 1e9 for n in contexts], "o-", label=label)
ax.set_xlabel("context (tokens)"); ax.set_ylabel("KV cache, GB (f16, 1 sequence)")
ax.set_title("KV cache against context"); ax.legend(fontsize=8); fig.tight_layout()
kv = calc.kv_cache_bytes(c, 131072)
print(f"LFM3-1.7B at 128K: {calc.format_bytes(kv)}; sliding counted as full: "
      f"{calc.format_bytes(calc.kv_cache_bytes(rows['LFM3-1.7B, sliding counted as full'], 131072))}")
print(f"conv state: {calc.format_bytes(calc.conv_state_bytes(c))} (13 layers x {c.conv_L_cache - 1} columns x "
      f"{c.hidden_size} x 4 bytes)")
