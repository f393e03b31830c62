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
# Each attention head's output is multiplied by `sigmoid(gate_proj(x))`, one value per token and head, before
# the heads are projected back: a head can switch itself off for a token. No trained LFM3 weights are public
# yet, so the model below is a small LFM3 with **random weights**: its gates are sigmoids of random
# projections, scattered around 0.5 with no pattern (an untrained gate halves a head's output on average,
# and means nothing). To show
# what the gate can do, head 0's `gate_proj` row in layer 1 is **set by hand**: fitted (least squares on this
# input) to read the attention input and close at every occurrence of token 9, open elsewhere. The left panel
# is the gate (the trace's `self_attn.gate`), the right one each head's output after it: head 0's output
# vanishes exactly where its gate closed, the other heads go on.

# %%
tiny = lfm2np.Config.from_dict({
    "model_type": "lfm3", "vocab_size": 64, "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 8,
    "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 96, "sliding_window": 6,
    "layer_types": ["conv", "sliding_attention", "full_attention", "conv"], "eos_token_id": 2,
    "bos_token_id": 1, "pad_token_id": 0})
m = random_model(tiny, seed=3)
ids = np.array([1, 9, 14, 5, 22, 9, 31, 40, 12, 7, 9, 18, 3, 27, 11, 9, 6, 33, 9, 20])


def layer1(model):
    seen = {}
    model.forward(ids, record=lambda name, value: seen.setdefault(name, value.copy()))
    a = "model.layers.1.self_attn."
    T, H = seen[a + "gate"].shape
    return seen["model.layers.1.operator_norm"], seen[a + "gate"], seen[a + "attn_out"].reshape(T, H, -1)


x, random_gates, _ = layer1(m)
print(f"random weights: gate values {random_gates.min():.2f} .. {random_gates.max():.2f}, "
      f"mean {random_gates.mean():.2f}")
name = "model.layers.1.self_attn.gate_proj.weight"
by_hand = np.array(m.params[name])
by_hand[0] = np.linalg.lstsq(x, np.where(ids == 9, -6.0, 6.0), rcond=None)[0]  # head 0: -6 at token 9, else +6
m = lfm2np.Model(m.config, {**m.params, name: by_hand})  # the same model with head 0's gate set by hand
_, gates, out = layer1(m)
fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), layout="constrained")
im = axes[0].imshow(gates.T, cmap="viridis", vmin=0, vmax=1, aspect="auto")
fig.colorbar(im, ax=axes[0], label="gate = sigmoid(gate_proj x)")
norms = np.linalg.norm(out, axis=-1).T
im = axes[1].imshow(norms, cmap="magma", vmin=0, aspect="auto")
fig.colorbar(im, ax=axes[1], label="|head output| after the gate")
for ax, title in zip(axes, ["layer 1 gates: head 0 set by hand, heads 1-7 random",
                            "each head's output after its gate"]):
    ax.set_title(title, fontsize=10); ax.set_ylabel("query head"); ax.set_xlabel("token (9: where head 0 closes)")
    ax.set_xticks(range(len(ids))); ax.set_xticklabels(ids, fontsize=8)
    for k in np.flatnonzero(ids == 9):
        ax.get_xticklabels()[k].set_color("red")
closed = gates[ids == 9, 0]
print(f"head 0's gate at the 9s: {closed.max():.4f} at most; elsewhere {gates[ids != 9, 0].min():.4f} at least")
assert closed.max() < 0.01 and gates[ids != 9, 0].min() > 0.99 and np.allclose(gates[:, 1:], random_gates[:, 1:])

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
# KV cache (f16, one sequence) as the context grows, each model up to the context its card supports (LFM2:
# 32,768; LFM3-1.7B: 262,144). LFM3-1.7B's 5 sliding layers keep at most 256 positions, so only its 6 full
# layers grow; counting all 11 attention layers as full would nearly double it. Its 6 full layers hold as much
# per token as LFM2-1.2B's 6 attention layers (4 KV heads of 128 against 8 of 64), so the two models' lines
# meet once the sliding layers' fixed 2.6 MB no longer shows: LFM2-1.2B is drawn dashed on top, where it ends.

# %%
from lfm2np import presets

contexts = np.array([1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144])
lfm2 = lfm2np.load_config("LFM2-1.2B")
rows = [  # (label, config, style); each line stops at the model's supported context
    ("LFM3-1.7B, sliding counted as full", c.replace(layer_types=tuple(
        "full_attention" if k != "conv" else "conv" for k in c.layer_types)), dict(color="C2", marker="o")),
    ("LFM3-1.7B (6 full + 5 sliding)", c, dict(color="C1", marker="o", ms=7)),
    ("LFM2-1.2B (6 attention layers)", lfm2, dict(color="C0", marker="x", ls="--", ms=8, lw=1.5)),
]
fig, ax = plt.subplots(figsize=(7.5, 3.8))
for label, cfg, style in rows:
    supported = presets.supported_context(cfg)[0]  # the model card's (the variant keeps its source name)
    n = contexts[contexts <= supported]
    ax.loglog(n, [calc.kv_cache_bytes(cfg, int(k)) / 1e9 for k in n], label=f"{label}, to {supported:,}", **style)
ax.axvline(32768, color="grey", lw=0.6, ls=":")
ax.text(32768 * 1.08, 0.015, "LFM2's supported\ncontext: 32,768", fontsize=8, color="grey")
ax.set_xlabel("context (tokens)"); ax.set_ylabel("KV cache, GB (f16, 1 sequence)")
ax.set_title("KV cache against context, up to each model's supported context"); ax.legend(fontsize=8)
fig.tight_layout()
kv = calc.kv_cache_bytes(c, 131072)
print(f"LFM3-1.7B at 128K: {calc.format_bytes(kv)}; sliding counted as full: "
      f"{calc.format_bytes(calc.kv_cache_bytes(rows[0][1], 131072))}")
print(f"at 32,768 tokens: LFM2-1.2B {calc.format_bytes(calc.kv_cache_bytes(lfm2, 32768))}, "
      f"LFM3-1.7B {calc.format_bytes(calc.kv_cache_bytes(c, 32768))}")
print(f"conv state: {calc.format_bytes(calc.conv_state_bytes(c))} (13 layers x {c.conv_L_cache - 1} columns x "
      f"{c.hidden_size} x 4 bytes)")
