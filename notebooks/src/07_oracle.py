# %% [markdown]
# # 07 · The oracle workflow: find where a backend goes wrong, and why
#
# A backend author's logits disagree with the reference. Instead of staring at logits, record a trace of
# every intermediate on both sides and let `compare` name the first tensor that diverges; then let
# `diagnose` name the porting mistake.
#
# Here the "backend" is a deliberately broken copy of the model: in every conv layer it applies the
# convolution taps in reverse order, a real bug class (the GGUF file stores the kernel `[L, D]`, and reading
# it the other way round flips it).

# %%
import numpy as np

import lfm2np
from lfm2np.embedded import embedded_model_path
from lfm2np.io.tokenizer import Tokenizer
from lfm2np.oracle.compare import compare, format_comparison
from lfm2np.oracle.trace import record

path = embedded_model_path()
reference = lfm2np.load(path)
tok = Tokenizer.from_dir(path)
ids = tok.encode("The try statement specifies exception handlers", add_bos=True)

params = {name: reference.params[name] for name in reference.params}
for i in reference.config.conv_layers:
    conv = f"model.layers.{i}.conv.conv.weight"
    params[conv] = params[conv][..., ::-1].copy()          # the bug: taps reversed
backend = lfm2np.Model(reference.config, params)

ref_logits, ref_trace = record(reference, ids)
our_logits, our_trace = record(backend, ids)
print("logits differ by up to", round(float(np.abs(our_logits - ref_logits).max()), 1),
      "| same argmax at the last position:", int(our_logits[-1].argmax()) == int(ref_logits[-1].argmax()))

# %% [markdown]
# ## Compare, tensor by tensor, in forward order

# %%
result = compare(our_trace, ref_trace, "fp32")
print(format_comparison(result))
first_conv = reference.config.conv_layers[0]
assert result.first_divergence.name == f"model.layers.{first_conv}.conv.conv_out"

# %% [markdown]
# The first divergence is the convolution's output in the first conv layer: everything before it (the
# in_proj, the gates, `bx`, the conv's input) agrees to float32 rounding. That is where to look.
#
# The same comparison as a picture: the error of every tensor, in forward order. Up to the first divergence
# the backend computes exactly what the reference does (the two share every operator but the broken one, so
# the errors are zero, drawn at the bottom); from there on every tensor is off by far more than the fp32
# tier allows.

# %%
import matplotlib.pyplot as plt

names = [d.name for d in result.diffs]
experts = np.array([d.routing_agreement is not None for d in result.diffs])
# chosen experts are integers: their error is the share of tokens routed to another set of experts
errors = np.array([1 - d.routing_agreement if d.routing_agreement is not None else d.max_rel for d in result.diffs])
ok = np.array([d.ok for d in result.diffs])
floor = 1e-9  # where an error of exactly 0 is drawn
first = names.index(result.first_divergence.name)
x = np.arange(len(names))
fig, ax = plt.subplots(figsize=(10, 3.8), layout="constrained")
for kind, marker, what in ((~experts, "o", "tensor"), (experts, "^", "chosen experts (share routed elsewhere)")):
    for mask, color, where in ((kind & ok, "#3182bd", "within the fp32 tier"), (kind & ~ok, "#de2d26", "outside it")):
        if mask.any():
            ax.scatter(x[mask], np.maximum(errors[mask], floor), s=16, marker=marker, color=color,
                       label=f"{what}: {where}")
ax.axhline(result.tier.max_rel, color="gray", ls="--", lw=1)
ax.text(len(names) - 1, result.tier.max_rel * 1.6, f"fp32 tier: max_rel {result.tier.max_rel:g}", ha="right",
        color="gray")
ax.axvline(first, color="#de2d26", lw=1, alpha=0.6)
ax.annotate(f"first divergence:\n{names[first]}", (first, errors[first]), xytext=(first + 6, 1e-3),
            arrowprops=dict(arrowstyle="->", color="#de2d26"), color="#de2d26")
starts = [names.index(f"model.layers.{i}.operator_norm") for i in range(reference.config.num_hidden_layers)]
ax.set_xticks(starts, [f"layer {i}\n({'conv' if i in reference.config.conv_layers else 'attn'})"
                       for i in range(reference.config.num_hidden_layers)], fontsize=8)
ax.set_yscale("log")
ax.set_ylim(floor / 3, 30)
ax.set_yticks([floor, 1e-7, 1e-5, 1e-3, 1e-1, 10], ["0 (identical)", "1e-7", "1e-5", "1e-3", "0.1", "10"])
ax.set_xlabel("tensors in forward order (tick: first tensor of each layer; embeddings first, logits last)")
ax.set_ylabel("max|backend - ref| / max|ref|")
ax.set_title("Reversed conv taps: the error of every tensor, backend vs reference")
ax.legend(loc="lower right", fontsize=8, framealpha=0.95)
plt.show()

# %% [markdown]
# ## Diagnose: from the divergence to the mistake
#
# `compare` says *where*. `diagnose` says *why*: it applies each mistake of a catalogue of known porting
# mistakes to the reference (through the forward pass's record protocol: no second copy of the model) and
# ranks them by how well the mutated reference reproduces the backend's dump. The dump can be a trace, the
# logits alone, or only the tokens a text-only backend generated.

# %%
from lfm2np.oracle.diagnose import diagnose, format_diagnosis
from lfm2np.oracle.dumps import logits_dump, token_stream, trace_dump

d = diagnose(reference, trace_dump(our_trace, ids))
print(format_diagnosis(d))
assert d.best.id == "conv-taps-reversed"

# %% [markdown]
# From the command line: `lfm2np diagnose MODEL --dump backend.safetensors` (a trace, or an `.npz` with
# `ids` and `logits`), or `lfm2np diagnose MODEL --ids ... --tokens ...` for a backend that only gives text;
# `--json` for a machine-readable report. [docs/diagnose.md](../docs/diagnose.md) has the catalogue.
#
# ## A buggy backend for every catalogue entry
#
# The tests build buggy backends independently of lfm2np (`tests/buggy_backends.py`: a small NumPy forward
# of its own, with its own conv window, RoPE, attention and router, prefilling then decoding one token at a
# time, and the mistakes as switches). On a small random MoE model (an expert bias that changes choices, a
# routed scaling of 2.5), each mistake's logits, trace and greedy tokens are diagnosed:

# %%
import sys

sys.path.insert(0, "../tests")
from buggy_backends import BUGS, Backend  # noqa: E402

from lfm2np.oracle.trace import Trace  # noqa: E402
from lfm2np.synthetic import random_params  # noqa: E402

config = lfm2np.Config.from_dict(dict(
    model_type="lfm2_moe", vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, layer_types=["conv", "full_attention", "conv", "full_attention"], rope_theta=1e6,
    intermediate_size=48, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, num_dense_layers=1,
    use_expert_bias=True, routed_scaling_factor=2.5, max_position_embeddings=256))
weights = random_params(config, seed=2, expert_bias_scale=0.3)
small = lfm2np.Model(config, weights)
run_ids, prompt = np.array([5, 17, 3, 40, 22, 9, 61, 30, 2, 47, 11, 33]), np.array([28, 10, 34, 37, 15, 52])
print(f"{'mistake made':24s} {'from its logits':24s} {'from its trace':24s} {'from its tokens':24s}")
for bug in BUGS:
    b = Backend(config, weights, [bug])
    logits, trace = b.run(run_ids, prefill=7)
    dumps = (logits_dump(run_ids, logits), trace_dump(Trace(trace), run_ids), token_stream(prompt, b.generate(prompt, 16)))
    found = [diagnose(small, dump).best for dump in dumps]
    print(f"{bug:24s} " + " ".join(f"{(h.id if h else '-'):24s}" for h in found))
    assert [h.id for h in found] == [bug] * 3

# %% [markdown]
# The same for LFM3's own mistakes, on a small random LFM3 (a sliding layer with a window of 4, shorter than
# the 12 ids; a full layer with a proportional RoPE of small base, so the pairs it leaves unrotated would
# turn visibly; sandwich norms and the output gate):

# %%
from buggy_backends import LFM3_BUGS  # noqa: E402

config3 = lfm2np.Config.from_dict(dict(
    model_type="lfm3", vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, intermediate_size=64, sliding_window=4, tie_word_embeddings=False,
    layer_types=["conv", "sliding_attention", "conv", "full_attention"], max_position_embeddings=256,
    bos_token_id=1, eos_token_id=2, pad_token_id=0, rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        "full_attention": {"rope_type": "proportional", "rope_theta": 100.0, "partial_rotary_factor": 0.5}}))
weights3 = random_params(config3, seed=0)
small3 = lfm2np.Model(config3, weights3)
print(f"{'mistake made':28s} {'from its logits':28s} {'from its trace':28s}")
for bug in LFM3_BUGS:
    logits, trace = Backend(config3, weights3, [bug]).run(run_ids, prefill=7)
    found = [diagnose(small3, dump).best for dump in (logits_dump(run_ids, logits), trace_dump(Trace(trace), run_ids))]
    print(f"{bug:28s} " + " ".join(f"{(h.id if h else '-'):28s}" for h in found))
    assert [h.id for h in found] == [bug] * 2

# %% [markdown]
# ## Two published bugs, reproduced from their issue descriptions
#
# **mlx-lm #1883** (ml-explore/mlx-lm): its `Lfm2MoeSparseMoeBlock` routed with `softmax` instead of a
# sigmoid, added `expert_bias` to the scores it then used as mixing weights, normalised them with `+ 1e-20`
# and never applied `routed_scaling_factor`. "There is no error and the model generates plausible text,
# which is why this went unnoticed." The embedded model has the issue's settings (expert bias, norm_topk_prob,
# a routed scaling of 1.0, so dropping it changes nothing). The buggy backend answers a question:

# %%
question = tok.encode_chat([{"role": "user", "content": 'What is the "while" statement?'}])
good = {n: reference.params[n] for n in reference.params}
mlx = Backend(reference.config, good, ["router-softmax", "router-bias-in-weights", "router-no-scaling"],
              router_eps=1e-20)
answer = mlx.generate(question, 16)
print("the mlx-style router answers:", repr(tok.decode(answer)))
print("the reference's greedy answer too (the token stream agrees):",
      diagnose(reference, token_stream(question, answer)).agrees)

# %% [markdown]
# Plausible text indeed: the token stream cannot show this bug on this prompt. Its logits can:

# %%
logits, trace = mlx.run(question)
d = diagnose(reference, logits_dump(question, logits))
print("\n".join(format_diagnosis(d).splitlines()[:5]))
assert d.best.id == "router-softmax+router-bias-in-weights"
routing = compare(Trace(trace), record(reference, question)[1]).routing()
print("tokens routed to the same experts as the reference, per MoE layer:",
      {name.split(".")[2]: f"{share:.0%}" for name, share in routing.items()})

# %% [markdown]
# No single mistake reproduces the dump; the combination of two does (the third, the scaling, is invisible at
# a factor of 1.0). Its trace shows the other observation: a share of the tokens is routed to a
# different set of experts than the reference's.
#
# **transformers #42017**: "Lfm2 issue in second prefill stage when asking followup question". After a first
# answer, the follow-up question is prefilled on the existing cache in one call; the conv layers start that
# call from an empty window (attention keeps its cache). The backend below does that; its logits over the
# whole conversation are the dump.

# %%
END = tok.token_to_id("<|im_end|>")


def conversation(backend):
    rows, context = [], list(question)
    logits = backend.feed(question)
    rows.append(logits)
    reply = []
    for _ in range(40):
        reply.append(int(np.argmax(logits[-1])))
        if reply[-1] == END:
            break
        logits = backend.feed(reply[-1:])
        rows.append(logits)
    follow = tok.encode('\n<|im_start|>user\nWhat is the "for" statement?<|im_end|>\n<|im_start|>assistant\n')
    second = len(question) + len(reply) - 1  # where the second prefill starts
    rows.append(backend.feed([reply[-1], *follow]))
    context += reply + follow
    return np.array(context), np.concatenate(rows), second


lost = Backend(reference.config, good, ["conv-state-dropped"], drop_on="multi-token")
context, logits, second = conversation(lost)
d = diagnose(reference, logits_dump(context, logits))
print("\n".join(format_diagnosis(d).splitlines()[:5]))
assert d.best.id == "conv-state-dropped" and d.prefill == second

# %% [markdown]
# The logits agree up to the position where the second prefill begins, and `conv-state-dropped` at exactly
# that position reproduces them. (This tiny model's answers happen to survive the lost window: the conv only
# looks two tokens back. The logits show it anyway.)
#
# ## Golden vectors, for fixing the kernel
# ```bash
# lfm2np trace MODEL --text "..." --out reference.safetensors
# lfm2np compare backend.safetensors reference.safetensors --tier fp32   # exit 1, names the tensor
# ```
# and `lfm2np golden MODEL --out DIR` writes each operator's inputs, weights and outputs so the broken
# kernel can be fixed in isolation.

# %%
from lfm2np.oracle.golden import write_golden
import json, tempfile
from pathlib import Path

with tempfile.TemporaryDirectory() as tmp:
    write_golden(reference, ids, tmp, layers=[first_conv])
    manifest = json.loads((Path(tmp) / "manifest.json").read_text())
    for op in manifest["operators"]:
        if op["name"].startswith(f"model.layers.{first_conv}"):
            print(f"{op['file']:45s} {op['function']:32s} weights: {len(op['weights'])}, outputs: {op['outputs']}")

# %% [markdown]
# ## Quantisation noise, or a bug? llama.cpp's CPU arithmetic
#
# A GGUF backend does not compute with the dequantised weights alone: llama.cpp's CPU backend quantises the
# activations before every product (to Q8_K for the k-quants, Q8_0 for Q8_0 and Q4_0), keeps the KV cache in f16
# and has its own exp. Against exact arithmetic its logits are further off than a kernel bug would move them.
# The numerics mode `llamacpp-cpu` computes as llama.cpp does ([docs/llamacpp-cpu.md](../docs/llamacpp-cpu.md)).
# The test fixtures hold two tiny models (dense, and MoE) quantised by llama.cpp itself, and llama.cpp's logits
# for 30 ids, run in one batch and token by token. Before (lfm2np's exact arithmetic on the same file) and after
# (the mode), against llama.cpp's one-batch run, beside llama.cpp's own token-by-token run:

# %%
from safetensors.numpy import load_file

from lfm2np.io.gguf_write import write_gguf

fixtures = Path("../tests/golden/llamacpp-cpu")
manifest = json.loads((fixtures / "manifest.json").read_text())
llama_logits = load_file(str(fixtures / "logits.safetensors"))


def fixture_file(kind, ftype, work):
    """llama.cpp's quantised file, or the F32 file it was quantised from (rebuilt: it is not committed)."""
    entry = manifest["models"][kind]
    if entry["files"][ftype]["file"]:
        return fixtures / entry["files"][ftype]["file"]
    config = lfm2np.load_config(entry["config"])
    write_gguf(Path(work) / f"{kind}.gguf", config, random_params(config, seed=entry["seed"]), "F32")
    return Path(work) / f"{kind}.gguf"


def versus(logits, ref):
    """max relative difference / NMSE / argmax agreement over the positions"""
    a, r = np.asarray(logits, np.float64), np.asarray(ref, np.float64)
    return (f"{np.abs(a - r).max() / np.abs(r).max():7.1e} / {((a - r) ** 2).sum() / (r ** 2).sum():7.1e} / "
            f"{100 * (a.argmax(-1) == r.argmax(-1)).mean():3.0f}%")


print(f"{'file':12} {'exact arithmetic':>27} {'llamacpp-cpu':>27} {'llama.cpp token by token':>27}")
for kind in ("dense", "moe"):
    q_ids = manifest["models"][kind]["ids"]
    for ftype in ("F32", "Q8_0", "Q6_K", "Q4_K_M", "Q4_0"):
        theirs = llama_logits[f"{kind}-{ftype}/f16/oneshot"]
        with tempfile.TemporaryDirectory() as work:
            gguf = fixture_file(kind, ftype, work)
            exact = lfm2np.load(gguf).forward(q_ids)
            emulated = lfm2np.load(gguf, dtype="llamacpp-cpu").forward(q_ids)
        print(f"{kind + ' ' + ftype:12} {versus(exact, theirs):>27} {versus(emulated, theirs):>27} "
              f"{versus(llama_logits[f'{kind}-{ftype}/f16/stepwise'], theirs):>27}")

# %% [markdown]
# Exact arithmetic is 1e-4 to 1e-3 NMSE away on the quantised files; the mode gives llama.cpp's bits (also token
# by token: `tests/test_llamacpp_cpu.py`), so a backend that claims llama.cpp's arithmetic can be held to a tight
# tier. The mode names what each product read: here the first product's input, quantised to Q8_K (one scale per
# 256 values, integers up to 127).

# %%
gguf, q_ids = fixtures / "dense-Q4_K_M.gguf", manifest["models"]["dense"]["ids"]
emulated = lfm2np.load(gguf, dtype="llamacpp-cpu")
_, q_trace = record(emulated, q_ids[:4])
x_in = q_trace["model.layers.0.conv.in_proj.input"]
step = np.abs(x_in).max(axis=-1, keepdims=True) / 127
print("levels used in row 0:", len(np.unique(np.rint(x_in[0] / step[0]))),
      "| off the exact input by up to", float(np.abs(x_in - q_trace["model.layers.0.operator_norm"]).max()))

# %% [markdown]
# A backend that multiplies f32 activations by the dequantised weights (here: lfm2np's own float32 mode) is
# not broken, only more exact than llama.cpp; `diagnose` against the mode says so.

# %%
_, f32_trace = record(lfm2np.load(gguf), q_ids[:12])
d = diagnose(emulated, trace_dump(f32_trace, q_ids[:12]))
print(d.tier, "| agrees:", d.agrees, "| best:", d.best.id if d.best else None)
