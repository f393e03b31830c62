# %% [markdown]
# # 02 · The gated short convolution and its decoding state
#
# A conv layer looks at the current token and the L-1 = 2 tokens before it. That is why decoding needs
# only a tiny, constant state per conv layer: the last L-1 inputs of the convolution.

# %%
import matplotlib.pyplot as plt
import numpy as np

import lfm2np
from lfm2np import calc, ops

# %% [markdown]
# ## An impulse response
# Feed a single 1 at t = 3 through a 3-tap causal convolution: the output is the kernel, read backwards
# in time, starting at the impulse and never before it.

# %%
u = np.zeros((10, 1), np.float32)
u[3] = 1.0
w = np.array([[0.2, 0.5, 1.0]], np.float32)      # taps for t-2, t-1, t
z, _ = ops.causal_conv1d(u, w)
print("input :", u[:, 0])
print("output:", z[:, 0])
fig, ax = plt.subplots(figsize=(6, 2.2))
ax.stem(np.arange(10), u[:, 0], linefmt="C0-", markerfmt="C0o", basefmt=" ", label="u (input)")
ax.stem(np.arange(10) + 0.15, z[:, 0], linefmt="C1-", markerfmt="C1s", basefmt=" ", label="z (output)")
ax.set_xlabel("token position t"); ax.set_ylabel("value"); ax.set_title("a 3-tap causal convolution of an impulse")
ax.legend(); fig.tight_layout()

# %% [markdown]
# ## The window moves with the tokens
# Decoding one token at a time, the state carries the last L-1 values of `u`; each step reads the
# window, adds the new input, and keeps the last L-1 again. The result equals the one-shot convolution.
# In the picture each row is one decoding step: the two positions of the state (blue) and the new input
# (orange) that the step's output reads. Row t+1 starts one position to the right, so consecutive
# windows overlap: the state after step t is the window of step t+1.

# %%
rng = np.random.default_rng(0)
u = rng.standard_normal((8, 4)).astype(np.float32)
w = rng.standard_normal((4, 3)).astype(np.float32)
one_shot, _ = ops.causal_conv1d(u, w)
window = None
steps = []
for t in range(len(u)):
    out, history = ops.causal_conv1d(u[t:t + 1], w, window=window)
    window = history[-2:]                            # keep L-1 = 2 rows: all the next step needs
    steps.append(out)
assert np.allclose(np.concatenate(steps), one_shot)
print("token by token with a 2-row window == one shot")

T = len(u)
reads = np.zeros((T, T))                                # reads[t, s]: what step t does with u[s]
for t in range(T):
    reads[t, max(0, t - 2):t] = 1                       # the state: u[t-2], u[t-1] (zeros before the start)
    reads[t, t] = 2                                     # the new input u[t]
fig, ax = plt.subplots(figsize=(5.5, 3.6))
ax.imshow(reads, cmap=plt.matplotlib.colors.ListedColormap(["white", "#6baed6", "#fd8d3c"]), vmin=0, vmax=2)
for t in range(T):
    for s_ in range(max(0, t - 2), t + 1):
        ax.text(s_, t, f"{u[s_, 0]:+.1f}", ha="center", va="center", fontsize=7)
ax.set_xticks(range(T)); ax.set_yticks(range(T))
ax.set_xlabel("position s of the conv input u = b·x (channel 0 values shown)")
ax.set_ylabel("decoding step t")
ax.set_title("what each step reads: state (blue) + new input (orange)")
ax.legend(handles=[plt.matplotlib.patches.Patch(color="#6baed6", label="state: last L-1 = 2 inputs"),
                   plt.matplotlib.patches.Patch(color="#fd8d3c", label="new input u[t]")],
          loc="upper right", fontsize=7)
fig.tight_layout()

# %% [markdown]
# ## In a real (tiny) model
# `model.step` returns the state after the tokens; `state.conv_window(i)` is the `(L-1, D)` window of conv
# layer i (exactly what llama.cpp keeps), and a snapshot is just keeping the old state.

# %%
model = lfm2np.load("../tests/golden/moe-bf16-bias")
print(model)
ids = [1, 22, 35, 47, 8, 13]
logits, state = model.step(ids[:4])
print("position:", state.position, "| conv layers:", model.config.conv_layers,
      "| window of layer 0:", state.conv_window(0).shape, "| bytes held:", state.nbytes)
more, after = model.step(ids[4:], state)
assert np.allclose(np.concatenate([logits, more]), model.forward(ids), atol=1e-4)
again, _ = model.step(ids[4:], state)            # the snapshot is untouched: restore = reuse
assert np.array_equal(again, more)

# %% [markdown]
# The window of conv layer 0 after 4, 5 and 6 tokens: each row is the conv input `u` of one token (its
# position on the left). One step later the newer row has moved up and a new row came in below.

# %%
_, after5 = model.step(ids[4:5], state)                    # one token at a time
_, after6 = model.step(ids[5:6], after5)
windows = [state.conv_window(0), after5.conv_window(0), after6.conv_window(0)]
assert np.array_equal(windows[0][1], windows[1][0]) and np.array_equal(windows[1][1], windows[2][0])
limit = max(np.abs(w).max() for w in windows)
fig, axes = plt.subplots(3, 1, figsize=(8, 4.4), sharex=True, layout="constrained")
for ax, w, n in zip(axes, windows, (4, 5, 6)):
    im = ax.imshow(w, aspect="auto", cmap="coolwarm", vmin=-limit, vmax=limit)
    ax.set_yticks([0, 1]); ax.set_yticklabels([f"u of token {n - 2}", f"u of token {n - 1}"], fontsize=8)
    ax.set_title(f"layer 0 window after {n} tokens", fontsize=9)
axes[-1].set_xlabel("channel (D = %d)" % model.config.hidden_size)
fig.colorbar(im, ax=axes, label="u = b·x");

# %% [markdown]
# ## Why LFM2 decodes cheaply
# A conv layer's state is L-1 rows whatever the context; an attention layer's KV cache grows by one row
# of K and V per token. The figures come from the calculator (`lfm2np.calc`, see docs/calculators.md):
# the conv state in float32 as llama.cpp keeps it, the KV cache in f16, one sequence, up to the 32,768
# tokens of context the LFM2 model cards give.

# %%
c = lfm2np.load_config("LFM2-1.2B")
conv_bytes = calc.conv_state_bytes(c)
assert conv_bytes == len(c.conv_layers) * (c.conv_L_cache - 1) * c.hidden_size * 4     # float32
for n in (1_024, 4_096, 16_384, 32_768):
    print(f"LFM2-1.2B, {n:6,d} tokens: conv state {conv_bytes / 1e3:.0f} kB (constant), "
          f"KV cache {calc.kv_cache_bytes(c, n, kv_type='f16') / 1e6:7.1f} MB")

# %% [markdown]
# ## The bidirectional models: a centred window, attention both ways
# LFM2.5-Embedding-350M, LFM2.5-ColBERT-350M and the LFM2.5-Encoder models keep LFM2's weights and change two
# things (docs/ops/centred_conv.md, docs/ops/bidirectional_attention.md). The conv window is **centred**: it is
# padded by L//2 on each side instead of L-1 on the left, so with L = 3 position t reads t-1, t and t+1. The
# same impulse as above now shows up one step *before* it arrives, and the window needs no state: a
# bidirectional model reads whole sequences, it does not decode.

# %%
impulse = np.zeros((10, 1), np.float32)
impulse[3] = 1.0
taps = np.array([[0.2, 0.5, 1.0]], np.float32)  # the first section's kernel
z, _ = ops.causal_conv1d(impulse, taps)
z_centred = ops.centred_conv1d(impulse, taps)
print("causal  :", z[:, 0])
print("centred :", z_centred[:, 0])
fig, ax = plt.subplots(figsize=(6, 2.2))
ax.stem(np.arange(10) - 0.1, z[:, 0], linefmt="C1-", markerfmt="C1s", basefmt=" ", label="causal (L-1 on the left)")
ax.stem(np.arange(10) + 0.1, z_centred[:, 0], linefmt="C2-", markerfmt="C2^", basefmt=" ", label="centred (L//2 each side)")
ax.axvline(3, color="0.7", ls=":"); ax.set_xlabel("token position t"); ax.legend(fontsize=8)
ax.set_title("the same taps, the window one step earlier"); fig.tight_layout()

# %% [markdown]
# Attention loses its causal mask: every query sees every key. Below, the attention weights of one head of a
# random query/key set, causal (a triangle) and bidirectional (full). In a padded batch the padding keys are
# left out (their weight is exp(-inf) = 0), which is why a padded row can equal the sequence alone.

# %%
rng = np.random.default_rng(0)
q, k, v = rng.standard_normal((6, 1, 8)), rng.standard_normal((6, 1, 8)), np.eye(6)[:, None, :6]
v = np.concatenate([v, np.zeros((6, 1, 2))], axis=-1)               # v = one-hot positions: out = the weights
causal_w = ops.attention(q, k, v)[:, :6]
both_w = ops.attention(q, k, v, causal=False)[:, :6]
fig, axes = plt.subplots(1, 2, figsize=(7, 3), layout="constrained")
for ax, m, title in zip(axes, (causal_w, both_w), ("causal", "bidirectional")):
    ax.imshow(m, cmap="viridis", vmin=0, vmax=1); ax.set_title(title, fontsize=9)
    ax.set_xlabel("key position"); ax.set_ylabel("query position")
assert np.allclose(np.triu(causal_w, 1), 0) and (both_w > 0).all()

# %% [markdown]
# A tiny random bidirectional model (a config in the released layout: `architectures:
# [Lfm2BidirectionalModel]` and a CLS-pooling head): changing the *last* token changes the *first* position's
# output, which a causal LFM2 never does; `embed` pools, and a batch of sequences of different lengths, padded
# inside, gives each what it gives alone.

# %%
from lfm2np.synthetic import random_params

d = lfm2np.load_config("tiny-dense").to_dict()
d.update(architectures=["Lfm2BidirectionalModel"], sentence_transformers={"pooling": "cls"})
encoder = lfm2np.Model(lfm2np.Config.from_dict(d), random_params(lfm2np.Config.from_dict(d), seed=0))
a, b = encoder.forward([1, 5, 9, 40]), encoder.forward([1, 5, 9, 41])
print("first position moved by", float(np.abs(a[0] - b[0]).max()), "(causal LFM2: exactly 0)")
batch = encoder.embed([[1, 5, 9, 40], [1, 7]])
print("padded batch vs alone:", float(np.abs(batch[1] - encoder.embed([1, 7])).max()))
