#!/usr/bin/env python
"""Print how close lfm2np comes to the transformers fixtures: the table in docs/numerics.md.

For every fixture case: the worst per-operator relative error (float32, each operator fed the
reference's own inputs), the whole-model logits error (float32 and float64 modes) and argmax / expert
agreement. Needs only the runtime dependencies.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lfm2np  # noqa: E402
from lfm2np.layers import Scope, decoder_layer  # noqa: E402
from lfm2np.oracle.tolerance import rel_error  # noqa: E402

GOLDEN = ROOT / "tests" / "golden"


def main() -> int:
    manifest = json.loads((GOLDEN / "manifest.json").read_text())
    print("| case | checkpoint | worst layer (f32) | logits f32 | logits f64 | f32 vs f64 | argmax | experts |")
    print("|---|---|---|---|---|---|---|---|")
    for case, info in manifest["cases"].items():
        g = load_file(str(GOLDEN / case / "golden.safetensors"))
        m32 = lfm2np.load(GOLDEN / case)
        m64 = lfm2np.load(GOLDEN / case, dtype="float64")
        c = m32.config
        ids = g["capture.ids"]
        rope = m32.rope(np.arange(len(ids)))
        worst_layer = max(
            rel_error(decoder_layer(g[f"capture.model.layers.{i}.input"], m32.layer_weights(i), c, rope)[0],
                      g[f"capture.model.layers.{i}.output"]) for i in range(c.num_hidden_layers))
        errs32, errs64, errs_mode, argmax = [], [], [], True
        for key in [k for k in g if k.startswith("logits.T") and not k.endswith(".ids")] + ["batch.logits"]:
            ids_key = "batch.ids" if key == "batch.logits" else key + ".ids"
            o32, o64 = m32.forward(g[ids_key]), m64.forward(g[ids_key])
            errs32.append(rel_error(o32, g[key]))
            errs64.append(rel_error(o64, g[key]))
            errs_mode.append(rel_error(o32, o64))
            argmax &= bool((o32.argmax(-1) == g[key].argmax(-1)).all())
        experts = "n/a"
        if c.is_moe:
            seen = {}
            m32.forward(ids, record=lambda n, v: seen.__setitem__(n, v))
            agree = [np.mean(np.sort(seen[f"model.layers.{i}.feed_forward.selected_experts"], -1) ==
                             np.sort(g[f"capture.model.layers.{i}.feed_forward.gate.selected_experts"], -1))
                     for i in c.moe_layers]
            experts = f"{100 * min(agree):.0f}%"
        print(f"| {case} | {info['checkpoint_dtype']} | {worst_layer:.1e} | {max(errs32):.1e} | {max(errs64):.1e} "
              f"| {max(errs_mode):.1e} | {'identical' if argmax else 'DIFFERS'} | {experts} |")
    print()
    bf16_table(manifest)
    return 0


def bf16_table(manifest: dict) -> None:
    """The bf16 emulation against transformers run in bfloat16 on the same checkpoints."""
    print("| case | layers bit-identical (each fed transformers' bf16 input) | logits: emulation vs transformers bf16 "
          "| logits: float32 vs transformers bf16 | argmax agreement |")
    print("|---|---|---|---|---|")
    for case in manifest["cases"]:
        g = load_file(str(GOLDEN / case / "golden.safetensors"))
        m32 = lfm2np.load(GOLDEN / case)
        m = lfm2np.load(GOLDEN / case, dtype="bfloat16")
        c = m.config
        ids = g["bf16.ids"]
        rope = m.rope(np.arange(len(ids)))
        h, exact = g["bf16.model.embed_tokens.output"], 0
        for i in range(c.num_hidden_layers):
            out, _ = decoder_layer(h, m.layer_weights(i), c, rope, s=Scope(m.numerics.round))
            exact += int(rel_error(out, g[f"bf16.model.layers.{i}.output"]) == 0)
            h = g[f"bf16.model.layers.{i}.output"]
        ref = g["bf16.lm_head.output"]
        ours = m.forward(ids)
        agree = float(np.mean(ours.argmax(-1) == ref.argmax(-1)))
        print(f"| {case} | {exact} of {c.num_hidden_layers} | {rel_error(ours, ref):.1e} "
              f"| {rel_error(m32.forward(ids), ref):.1e} | {agree:.0%} |")


if __name__ == "__main__":
    sys.exit(main())
