# %% [markdown]
# # 07 · The oracle workflow: find where a backend goes wrong
#
# A backend author's logits disagree with the reference. Instead of staring at logits, record a trace of
# every intermediate on both sides and let `compare` name the first tensor that diverges.
#
# Here the "backend" is a deliberately broken copy of the model: in one conv layer it applies the
# convolution taps in reverse order, a real bug class.

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
broken_layer = reference.config.conv_layers[2]

params = {name: reference.params[name] for name in reference.params}
conv = f"model.layers.{broken_layer}.conv.conv.weight"
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
assert result.first_divergence.name == f"model.layers.{broken_layer}.conv.conv_out"

# %% [markdown]
# The first divergence is the convolution's output in the broken layer: everything before it (the
# in_proj, the gates, `bx`, the conv's input) agrees to float32 rounding. That is where to look.
#
# ## The same from the command line
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
    write_golden(reference, ids, tmp, layers=[broken_layer])
    manifest = json.loads((Path(tmp) / "manifest.json").read_text())
    for op in manifest["operators"]:
        if op["name"].startswith(f"model.layers.{broken_layer}"):
            print(f"{op['file']:45s} {op['function']:32s} weights: {len(op['weights'])}, outputs: {op['outputs']}")
