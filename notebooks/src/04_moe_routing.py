# %% [markdown]
# # 04 · MoE routing: sigmoid scores, the expert bias, top-k, renormalisation
#
# In an LFM2-MoE layer a router scores every expert with a sigmoid, picks the k best (after adding a
# per-expert bias that only steers the choice), and mixes the chosen experts' outputs with the
# renormalised, unbiased scores.

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
print(f"{c.num_experts} experts, top-{c.num_experts_per_tok}, MoE layers {c.moe_layers}, "
      f"norm_topk_prob={c.norm_topk_prob}, routed_scaling_factor={c.routed_scaling_factor}")

text = "A class statement defines a class object. The for statement iterates over a sequence."
ids = tok.encode(text, add_bos=True)
logits, trace = record(model, ids)
layer = c.moe_layers[0]
f = f"model.layers.{layer}.feed_forward."

# %% [markdown]
# ## One token, step by step

# %%
t = 5
router_logits = trace[f + "router_logits"][t]
scores = ops.sigmoid(router_logits)
bias = model.params[f + "expert_bias"] if c.use_expert_bias else np.zeros(c.num_experts)
chosen = ops.top_k_experts((scores + bias)[None], c.num_experts_per_tok)[0]
w = scores[chosen] / (scores[chosen].sum() + 1e-6) * c.routed_scaling_factor
print(f"token {tok.decode([ids[t]])!r}")
print("sigmoid scores :", scores.round(3))
print("expert bias    :", bias.round(3))
print("chosen experts :", chosen, " weights:", w.round(3))
assert (np.sort(chosen) == np.sort(trace[f + "selected_experts"][t])).all()
assert np.allclose(np.sort(w), np.sort(trace[f + "routing_weights"][t]), rtol=1e-5)

# %% [markdown]
# ## What the expert bias changes
# Selecting on the scores alone would pick other experts for some tokens; the weights never include the
# bias.

# %%
all_scores = ops.sigmoid(trace[f + "router_logits"])
with_bias = np.sort(trace[f + "selected_experts"], -1)
without = np.sort(ops.top_k_experts(all_scores, c.num_experts_per_tok), -1)
changed = (with_bias != without).any(-1)
print(f"layer {layer}: the bias changes the choice of {changed.sum()} of {len(ids)} tokens")

# %% [markdown]
# ## Expert load per layer, and which tokens go where

# %%
load = np.zeros((len(c.moe_layers), c.num_experts), int)
for row, i in enumerate(c.moe_layers):
    np.add.at(load[row], trace[f"model.layers.{i}.feed_forward.selected_experts"].ravel(), 1)
fig, axes = plt.subplots(1, 2, figsize=(11, 3.4), width_ratios=[1, 2.2], layout="constrained")
im = axes[0].imshow(load, cmap="Blues")
for (row, e), n in np.ndenumerate(load):
    axes[0].text(e, row, n, ha="center", va="center", fontsize=7, color="white" if n > load.max() / 2 else "black")
axes[0].set_xlabel("expert"); axes[0].set_ylabel("MoE layer"); axes[0].set_yticks(range(len(c.moe_layers)))
axes[0].set_xticks(range(c.num_experts))
axes[0].set_yticklabels(c.moe_layers); axes[0].set_title(f"tokens per expert ({len(ids)} tokens, top-{c.num_experts_per_tok})", fontsize=10)
fig.colorbar(im, ax=axes[0], label="tokens", shrink=0.8)
sel = trace[f + "selected_experts"]
grid = np.zeros((len(ids), c.num_experts))
for i_t, experts in enumerate(sel):
    grid[i_t, experts] = trace[f + "routing_weights"][i_t]
im = axes[1].imshow(grid.T, aspect="auto", cmap="Oranges", vmin=0)
axes[1].set_xticks(range(len(ids))); axes[1].set_xticklabels([tok.decode([i]) for i in ids], rotation=90, fontsize=7)
axes[1].set_yticks(range(c.num_experts))
axes[1].set_xlabel("token"); axes[1].set_ylabel("expert")
axes[1].set_title(f"layer {layer}: routing weight of each chosen expert (0: not chosen)")
fig.colorbar(im, ax=axes[1], label="routing weight", shrink=0.8)
print("tokens per expert:", load.sum(0))
