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
# ## Memory: the hybrid against an all-attention model of the same size
# Only the 10 attention layers of LFM2-24B-A2B keep a KV cache; the same model with 40 attention layers
# would need four times as much. Contexts stop at 32,768 tokens, the context its model card gives (the
# config allows 128,000 positions, but that is not what the model was trained for).

# %%
contexts = np.array([1024, 4096, 8192, 16384, 32768])
for n in contexts:
    h_ = calc.kv_cache_bytes(c, int(n), 1, "f16") / 2**30
    f_ = calc.kv_cache_bytes(calc.attention_only(c), int(n), 1, "f16") / 2**30
    print(f"{n:6d} tokens: KV {h_:5.2f} GiB hybrid, {f_:5.2f} GiB all-attention")

# %% [markdown]
# Where the difference decides what fits: serving several sequences at the full 32K context. The budget
# is 32 GiB, what a machine sold as "32 GB" has (docs/calculators.md: use `--memory-budget 32GiB` for RAM).
# Totals are the calculator's: Q4_K_M weights + f16 KV cache + conv state + compute buffer.

# %%
budget = calc.parse_bytes("32GiB")
parallel = np.arange(1, 17)
hybrid = [calc.memory(c, "Q4_K_M", context=32768, parallel=int(n))["total_bytes"] / 2**30 for n in parallel]
full = [calc.memory(calc.attention_only(c), "Q4_K_M", context=32768, parallel=int(n))["total_bytes"] / 2**30
        for n in parallel]
fits = lambda totals: int(parallel[np.array(totals) <= budget / 2**30].max())  # noqa: E731
print(f"32K sequences in 32 GiB: hybrid {fits(hybrid)} (of the 16 plotted), all-attention {fits(full)}")
fig, ax = plt.subplots(figsize=(6.5, 3.4))
ax.plot(parallel, hybrid, "o-", label="LFM2-24B-A2B Q4_K_M (hybrid: 10 attention layers)")
ax.plot(parallel, full, "s--", label="the same with all 40 layers attention")
ax.axhline(budget / 2**30, color="gray", lw=0.8)
ax.text(1, budget / 2**30 + 0.6, "32 GiB budget (a \"32 GB\" machine)", fontsize=8, color="gray")
ax.set_ylim(0, 60); ax.set_xticks(parallel[::3])
ax.set_xlabel("parallel sequences, 32,768 tokens each"); ax.set_ylabel("total memory (GiB)")
ax.set_title("LFM2-24B-A2B: weights + KV cache + conv state + compute", fontsize=10)
ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(0, 0.9)); fig.tight_layout()

# %% [markdown]
# ## The announcement's claims, checked
# "24B total, 2.3B active" and "designed to fit in 32 GB of RAM": one sequence at the full 32,768-token
# context, in the 32 GiB budget.

# %%
for q in ("Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "F16"):
    m = calc.memory(c, q, context=32768, budget=budget)
    print(f"{q:7s} weights {m['weights_bytes'] / 2**30:6.2f} GiB, total at 32K context {m['total_bytes'] / 2**30:6.2f} GiB:"
          f" {'fits' if m['fits'] else 'does not fit'} in 32 GiB")
assert round(p["total"] / 1e9) == 24 and round(p["active"] / 1e9, 1) == 2.3
