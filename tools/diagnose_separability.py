#!/usr/bin/env python
"""How well `lfm2np diagnose` tells the catalogue's mistakes apart, by kind of dump: the table in docs/diagnose.md.

    python tools/diagnose_separability.py [--seeds 5]

For each of ``--seeds`` random models of each configuration (those of tests/test_diagnose.py: 4 layers, conv
and attention, D=32; LFM2 dense with an untied head, LFM2-MoE with an expert bias and routed scaling 2.5;
LFM3 with a sliding layer of window 4, a full layer with proportional RoPE 0.5 at hd 16 and a base of 100,
sandwich norms and the output gate; and the same LFM3 with LFM3-1.7B's full-layer base 1e6), each mistake A
that applies, and each kind of dump (logits of 12 ids with a second call at position 7; the
trace of that run; 16 greedy tokens after a 6-id prompt; the logits of a single id), a dump is made by the
mutated reference (lfm2np.oracle.port.run, A's first variant) and diagnosed without combinations. A cell of
the first table counts the cases where A is ranked first and reproduces the dump; the others are listed:
``B`` when B was ranked first instead (B reproduces as well, or explains the dump better), ``unseen`` when
the dump agrees with the reference (this input does not show A). One such table per group of models (LFM2
dense + MoE; each LFM3 configuration). The last table lists, per group and kind of dump, every mistake B that
also reproduced A's dump (whatever the ranking). Prints markdown.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lfm2np  # noqa: E402
from lfm2np.oracle import mistakes as M  # noqa: E402
from lfm2np.oracle.diagnose import diagnose  # noqa: E402
from lfm2np.oracle.dumps import logits_dump, token_stream, trace_dump  # noqa: E402
from lfm2np.oracle.trace import Trace  # noqa: E402
from lfm2np.synthetic import random_params  # noqa: E402

COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
              layer_types=["conv", "full_attention", "conv", "full_attention"], rope_theta=1e6,
              max_position_embeddings=256)

def _lfm3(full_theta: float) -> dict:
    return dict(COMMON, model_type="lfm3", head_dim=16, intermediate_size=64, sliding_window=4,
                tie_word_embeddings=False, layer_types=["conv", "sliding_attention", "conv", "full_attention"],
                bos_token_id=1, eos_token_id=2, pad_token_id=0, rope_parameters={
                    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                    "full_attention": {"rope_type": "proportional", "rope_theta": full_theta,
                                       "partial_rotary_factor": 0.5}})


CONFIGS = {
    "dense": dict(COMMON, model_type="lfm2", intermediate_size=64, conv_bias=True, tie_word_embeddings=False),
    "moe": dict(COMMON, model_type="lfm2_moe", intermediate_size=48, num_experts=8, num_experts_per_tok=2,
                moe_intermediate_size=16, num_dense_layers=1, use_expert_bias=True, routed_scaling_factor=2.5),
    "lfm3": _lfm3(100.0),
    "lfm3-1e6": _lfm3(1e6),
}
#: The groups of models a table covers, with its title.
GROUPS = {"lfm2": ("LFM2 (dense and MoE)", ("dense", "moe")),
          "lfm3": ("LFM3 (full-layer RoPE base 100)", ("lfm3",)),
          "lfm3-1e6": ("LFM3 (full-layer RoPE base 1e6, as LFM3-1.7B)", ("lfm3-1e6",))}
GROUP_OF = {name: g for g, (_, names) in GROUPS.items() for name in names}
T, PREFILL, PROMPT, NEW = 12, 7, 6, 16
#: logits-1: the logits of one id only: what a single position cannot show
KINDS = ("logits", "trace", "tokens", "logits-1")


def dump_for(model, port: M.Port, kind: str, rng: np.random.Generator):
    V = model.config.vocab_size
    if kind == "tokens":
        prompt = rng.integers(0, V, PROMPT)
        seq = list(prompt)
        for _ in range(NEW):
            seq.append(int(np.argmax(M.run(model, seq, port)[-1])))
        return token_stream(prompt, seq[PROMPT:])
    ids = rng.integers(0, V, 1 if kind == "logits-1" else T)
    values: dict[str, np.ndarray] = {}
    logits = M.run(model, ids, port, observe=lambda n, v: values.__setitem__(n, np.array(v)))
    return trace_dump(Trace(values), ids) if kind == "trace" else logits_dump(ids, logits)


def outcome(d, mistake_id: str) -> str:
    top = d.hypotheses[0] if d.hypotheses else None
    if d.agrees:
        return "unseen"
    if top is not None and top.id == mistake_id and top.reproduces:
        return "first"
    return top.id if top is not None else "?"


def measure(seeds: int) -> tuple[dict[tuple[str, str, str], Counter], dict[tuple[str, str, str], Counter]]:
    cells: dict[tuple[str, str, str], Counter] = {}  # (group, A, kind) -> outcomes
    also: dict[tuple[str, str, str], Counter] = {}  # (group, kind, A) -> B: how often B also reproduced A's dump
    for name, spec in CONFIGS.items():
        config = lfm2np.Config.from_dict(spec)
        group = GROUP_OF[name]
        for seed in range(seeds):
            model = lfm2np.Model(config, random_params(config, seed=seed, expert_bias_scale=0.3))
            for m in M.CATALOGUE:
                if not m.applies(config):
                    continue
                for kind in KINDS:
                    rng = np.random.default_rng(1000 * seed + KINDS.index(kind))
                    prefill = {"tokens": PROMPT, "logits-1": 1}.get(kind, PREFILL)
                    port = M.Port(**m.variants(config, prefill)[0][1])
                    d = diagnose(model, dump_for(model, port, kind, rng), combine=False)
                    cells.setdefault((group, m.id, kind), Counter())[outcome(d, m.id)] += 1
                    if not d.agrees:
                        also.setdefault((group, kind, m.id), Counter()).update(
                            h.id for h in d.hypotheses if h.reproduces and h.id != m.id)
    return cells, also


def table(cells: dict[tuple[str, str, str], Counter], group: str) -> str:
    rows = [f"{GROUPS[group][0]}:", "", "| mistake | " + " | ".join(KINDS) + " |", "|---|" + "---|" * len(KINDS)]
    for m in M.CATALOGUE:
        if (group, m.id, KINDS[0]) not in cells:
            continue
        out = []
        for kind in KINDS:
            c = cells.get((group, m.id, kind), Counter())
            n = sum(c.values())
            rest = ", ".join(f"{k} {v}" for k, v in sorted(c.items(), key=lambda kv: (-kv[1], kv[0])) if k != "first")
            out.append(f"{c['first']}/{n}" + (f" ({rest})" if rest else ""))
        rows.append(f"| `{m.id}` | " + " | ".join(out) + " |")
    return "\n".join(rows)


def pairs(also: dict[tuple[str, str, str], Counter]) -> str:
    rows = ["| models | dump | A (the mistake made) | B (also reproduces A's dump: cases) |", "|---|---|---|---|"]
    for group in GROUPS:
        for kind in KINDS:
            for m in M.CATALOGUE:
                c = also.get((group, kind, m.id))
                if c and sum(c.values()):
                    rows.append(f"| {group} | {kind} | `{m.id}` | "
                                + ", ".join(f"`{b}` {n}" for b, n in c.most_common()) + " |")
    if len(rows) == 2:
        rows.append("| any | any | - | none |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=5, help="random models of each kind (default 5)")
    args = p.parse_args(argv)
    cells, also = measure(args.seeds)
    for group in GROUPS:
        print(table(cells, group))
        print()
    print(pairs(also))
    return 0


if __name__ == "__main__":
    sys.exit(main())
