# %% [markdown]
# # 02 · The gated short convolution and its decoding state
#
# A conv layer looks at the current token and the L-1 = 2 tokens before it. That is why decoding needs
# only a tiny, constant state per conv layer: the last L-1 inputs of the convolution.

# %%
import matplotlib.pyplot as plt
import numpy as np

import lfm2np
from lfm2np import ops

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
ax.set_xlabel("token"); ax.legend(); fig.tight_layout()

# %% [markdown]
# ## The window moves with the tokens
# Decoding one token at a time, the state carries the last L-1 values of `u`; each step reads the
# window, adds the new input, and keeps the last L-1 again. The result equals the one-shot convolution.

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

fig, axes = plt.subplots(1, 2, figsize=(8, 2.2))
for ax, s, title in zip(axes, (state, after), ("after 4 tokens", "after 6 tokens")):
    ax.imshow(s.conv_window(0), aspect="auto", cmap="coolwarm")
    ax.set_title(f"layer 0 window {title}"); ax.set_ylabel("row (t-2, t-1)"); ax.set_xlabel("channel")
fig.tight_layout()

# %% [markdown]
# ## Why LFM2 decodes cheaply
# A conv layer's state is L-1 rows whatever the context; an attention layer's KV cache grows by one row
# of K and V per token.

# %%
c = lfm2np.load_config("LFM2-1.2B")
contexts = np.array([1_000, 4_000, 16_000, 32_000, 128_000])
conv_bytes = len(c.conv_layers) * (c.conv_L_cache - 1) * c.hidden_size * 2       # f16
kv_bytes = len(c.attention_layers) * 2 * c.num_key_value_heads * c.head_dim * 2 * contexts
print(f"LFM2-1.2B, per sequence, f16: conv state {conv_bytes / 1e3:.0f} kB (constant); "
      f"KV cache {kv_bytes[-1] / 1e9:.2f} GB at 128K")
