# %% [markdown]
# # 06 · Counting: parameters, active parameters, memory
#
# Everything here comes from `lfm2np.calc`, pure functions of the config: nothing is downloaded and no
# weight is allocated. The totals are exact (they equal the sum of the tensor shapes the loader expects).

# %%
import matplotlib.pyplot as plt
import numpy as np

import lfm2np
from lfm2np import calc, presets

# %% [markdown]
# ## The family

# %%
print(f"{'model':15s} {'total':>15s} {'active':>15s} {'card':>30s}")
for name in presets.RELEASED:
    c = lfm2np.load_config(name)
    p = calc.param_counts(c)
    print(f"{name:15s} {p['total']:15,d} {p['active']:15,d} {str(presets.MODEL_CARD_PARAMS[name]):>30s}")

# %% [markdown]
# ## Where the parameters of LFM2-24B-A2B are
# 96% of the parameters sit in the experts, but a token only uses 4 of 64 of them.

# %%
c = lfm2np.load_config("LFM2-24B-A2B")
p = calc.param_counts(c)
b = calc.param_breakdown(c)
print(f"total {p['total'] / 1e9:.2f}B, active {p['active'] / 1e9:.2f}B "
      f"({p['active'] / p['total']:.1%}), active without embedding {p['active_without_embedding'] / 1e9:.2f}B")
print(b["by_kind"])

# %% [markdown]
# ## Memory against context: the hybrid against an all-attention model of the same size
# Only the 10 attention layers of LFM2-24B-A2B keep a KV cache; the same model with 40 attention layers
# would need four times as much.

# %%
contexts = np.array([1024, 4096, 16384, 32768, 65536, 128000])
hybrid = [calc.kv_cache_bytes(c, n, 1, "f16") / 2**30 for n in contexts]
full = [calc.kv_cache_bytes(calc.attention_only(c), n, 1, "f16") / 2**30 for n in contexts]
weights = calc.weight_bytes(c, "Q4_K_M") / 2**30
for n, h_, f_ in zip(contexts, hybrid, full):
    print(f"{n:7d} tokens: KV {h_:6.2f} GiB hybrid, {f_:6.2f} GiB all-attention")
fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(contexts, weights + np.array(hybrid), "o-", label="LFM2-24B-A2B Q4_K_M (hybrid)")
ax.plot(contexts, weights + np.array(full), "s--", label="same, every layer attention")
ax.axhline(32 * 1e9 / 2**30, color="gray", lw=0.8)
ax.text(contexts[0], 32 * 1e9 / 2**30 + 0.3, "32 GB")
ax.set_xscale("log"); ax.set_ylim(0, 34); ax.set_xlabel("context (tokens)"); ax.set_ylabel("weights + KV (GiB)")
ax.legend(); fig.tight_layout()

# %% [markdown]
# ## The announcement's claims, checked
# "24B total, 2.3B active" and "designed to fit in 32 GB of RAM".

# %%
for q in ("Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "F16"):
    m = calc.memory(c, q, context=32768, budget=calc.parse_bytes("32GB"))
    print(f"{q:7s} weights {m['weights_bytes'] / 1e9:6.2f} GB, total at 32K context {m['total_bytes'] / 1e9:6.2f} GB:"
          f" {'fits' if m['fits'] else 'does not fit'} in 32 GB")
assert round(p["total"] / 1e9) == 24 and round(p["active"] / 1e9, 1) == 2.3
