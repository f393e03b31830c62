#!/usr/bin/env python
"""Regenerate the generated parts of the docs (between `<!-- generated:NAME -->` and `<!-- end -->`).

tests/test_docs.py fails when a committed doc differs from what this script writes, when a section names no
generator here, or when a generator here has no section. (docs/cli.md's options table and usages have their own
markers and writer, tests/cli_reference.py.)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lfm2np  # noqa: E402
from lfm2np import presets  # noqa: E402


def layer_patterns() -> str:
    rows = ["```", "model            layers  pattern (C conv, A attention, S sliding-window attention; lower case: MoE FFN)"]
    for name in presets.RELEASED:
        c = lfm2np.load_config(name)
        rows.append(f"{name:16s} {c.num_hidden_layers:6d}  {c.layer_pattern()}")
    rows.append("```")
    return "\n".join(rows)


def trace_names() -> str:
    """The trace schema's names as a table, from lfm2np.trace_names of two small configs whose dimensions all differ
    (so each can be written as its symbol): an LFM2-MoE model with a dense first layer and an expert bias, and an
    LFM3 model (sliding layers, the output gate, the sandwich norms); each layer's names written with {i}."""
    from lfm2np.schema import order_key

    common = {"vocab_size": 97, "hidden_size": 40, "num_hidden_layers": 4, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 6, "intermediate_size": 56, "bos_token_id": 1, "eos_token_id": 2,
              "pad_token_id": 0}
    configs = {"": lfm2np.Config.from_dict(dict(
                   common, model_type="lfm2_moe", layer_types=["conv", "full_attention", "conv", "full_attention"],
                   num_experts=8, num_experts_per_tok=3, moe_intermediate_size=16, num_dense_layers=1,
                   use_expert_bias=True)),
               "LFM3": lfm2np.Config.from_dict(dict(
                   common, model_type="lfm3", sliding_window=5, use_sandwich_norm=True, use_attention_gate=True,
                   layer_types=["conv", "sliding_attention", "full_attention", "conv"]))}
    # and a bidirectional LFM2 with a dense head of width 11 (O), for Model.embed's names
    configs["embed"] = lfm2np.Config.from_dict(dict(
        common, model_type="lfm2", architectures=["Lfm2BidirectionalModel"], block_auto_adjust_ff_dim=False,
        sentence_transformers={"pooling": "cls", "dense_out": 11}))
    symbols = {40: "D", 120: "3D", 4: "H", 2: "G", 6: "hd", 24: "H·hd", 3: "hd/2", 56: "F", 8: "E", 97: "V", 11: "O"}
    rows: dict[str, tuple] = {}
    when: dict[str, set] = {}
    for label, c in configs.items():
        outputs = ("embedding", "token_embeddings") if label == "embed" else ("logits",)
        for t in [t for output in outputs for t in lfm2np.trace_names(c, output)]:
            layer = t.layer
            name = t.name if layer is None else t.name.replace(f"model.layers.{layer}", "model.layers.{i}", 1)
            dims = ["k" if d == 3 and ("selected" in name or "topk" in name or "routing_weights" in name)
                    else str(d) if d == "T" else symbols[d] for d in t.shape]
            llama = ", ".join(x.replace(f"-{layer}", "-{i}") if layer is not None else x for x in t.llama_cpp)
            hf = ", ".join(x.replace(f"model.layers.{layer}.", "") if layer is not None else x
                           for x in t.transformers)
            shape, llamas, hfs = rows.setdefault(name, (f"({', '.join(dims)})", [], []))
            for names, found in ((llamas, llama), (hfs, hf)):
                if found and found not in names:
                    names.append(found)
            when.setdefault(name, set()).add(label)
    kinds = {"conv.": "conv layers", "self_attn.attention": "attention with LFM3's output gate",
             "self_attn.gate": "attention with LFM3's output gate", "self_attn.": "attention layers",
             "feed_forward.biased": "MoE layers with an expert bias",
             "feed_forward.topk_normed": "MoE layers with norm_topk_prob", "feed_forward.router": "MoE layers",
             "feed_forward.selected": "MoE layers", "feed_forward.topk": "MoE layers",
             "feed_forward.routing": "MoE layers", "feed_forward.w": "dense FFN layers",
             "feed_forward.act": "dense FFN layers"}
    out = ["| name | shape | where | llama.cpp | transformers capture |", "|---|---|---|---|---|"]
    for name in sorted(rows, key=lambda n: order_key(n.replace("{i}", "0"))):
        step = name.split("model.layers.{i}.", 1)[1] if "model.layers.{i}." in name else ""
        where = next((v for k, v in kinds.items() if step.startswith(k)), "every layer" if "{i}" in name else "once")
        if when[name] == {"LFM3"} and "LFM3" not in where:
            where = "LFM3's sandwich norms" if "post_" in name else "LFM3" + ("" if where == "once" else f", {where}")
        if name.startswith("model.rotary_emb."):
            where = "per attention layer type" + (" (LFM3)" if when[name] == {"LFM3"} else "")
        if name.startswith("head."):  # Model.embed's head; O: the dense head's width (else D)
            where = "embed" + (", per token" if "token" in name else "") + (
                ", with a dense head" if "dense" in name else "")
        shape, llama, hf = rows[name]
        out.append(f"| `{name}` | {shape} | {where} | {' / '.join(llama) or '-'} | {' / '.join(hf) or '-'} |")
    return "\n".join(out)


#: one generator per section name; docs/cli.md's command reference is written by tests/cli_reference.py
GENERATED = {"layer-patterns": layer_patterns, "trace-names": trace_names}


def render(text: str) -> str:
    def fill(m: re.Match) -> str:
        return f"<!-- generated:{m.group(1)} -->\n{GENERATED[m.group(1)]()}\n<!-- end -->"

    return re.sub(r"<!-- generated:([\w-]+) -->\n.*?<!-- end -->", fill, text, flags=re.S)


def main() -> int:
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        text = path.read_text(encoding="utf-8")
        new = render(text)
        if new != text:
            path.write_text(new, encoding="utf-8")
            print(f"updated {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
