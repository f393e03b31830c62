#!/usr/bin/env python
"""Measure what correct quantised runs look like against the float32 reference: the figures behind the compare
tiers q8_0, q6_k, q5_k and q4 (lfm2np.oracle.tolerance.COMPARE_TIERS; docs/oracle.md prints this table).

    python tools/measure_tiers.py [--seeds 4] [--tokens 32] [--llama vendor/venv-llama/bin/python]

For tiny random LFM2 models (dense and MoE, every width 256 so that every ggml block fits a row, random norm
weights), each written as an F32 GGUF and as a GGUF of each type (lfm2np.io.gguf_write, llama.cpp's type mix
rules of default_type), it traces lfm2np on the quantised file and compares it with lfm2np on the F32 file (the
original weights), reference following the quantised run's expert choices at near-ties. It prints, per type,
the worst max_rel and the worst (highest) NMSE over every tensor of every case, which tensor, and the near-ties.
With ``--llama``, the quantised files are also run by llama.cpp (tools/dump_llama_cpp_trace.py in that Python)
and judged the same way: llama.cpp quantises the activations too, so its runs are further off.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import lfm2np  # noqa: E402
from lfm2np.io.gguf_write import write_gguf  # noqa: E402
from lfm2np.oracle.compare import compare  # noqa: E402
from lfm2np.oracle.follow import following  # noqa: E402
from lfm2np.oracle.trace import Trace, record  # noqa: E402
from lfm2np.synthetic import random_params  # noqa: E402

from compare_llama_cpp import config_for  # noqa: E402

TYPES = ("Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q4_0")


def cases(kinds: list[str], seeds: int, tokens: int):
    """(name, config, params, ids): tiny random models, and the embedded trained model on help-topic text (its
    width, 128, fits the 32-blocks of Q8_0 and Q4_0 only: K-quant files fall back to F16 for its rows)."""
    for kind in kinds:
        for seed in range(seeds):
            c = config_for(kind, 256)
            yield f"{kind}-{seed}", c, random_params(c, seed=seed), np.random.default_rng(seed).integers(0, 97, tokens)
    from lfm2np.embedded import embedded_model_path
    from lfm2np.io.tokenizer import Tokenizer

    m = lfm2np.load(embedded_model_path())
    tok = Tokenizer.from_dir(embedded_model_path())
    text = "The while statement is used for repeated execution as long as an expression is true."
    yield "embedded", m.config, dict(m.params), np.array(tok.encode(text, add_bos=True)[:tokens])


def measure(kinds: list[str], seeds: int, tokens: int, llama: str | None) -> dict[str, dict[str, list]]:
    out: dict[str, dict[str, list]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind, c, params, ids in cases(kinds, seeds, tokens):
            if True:
                seed = ""
                f32 = Path(tmp) / f"{kind}-F32.gguf"
                write_gguf(f32, c, params, "F32")
                reference = lfm2np.load(f32)
                for qtype in TYPES:
                    path = Path(tmp) / f"{kind}-{qtype}.gguf"
                    write_gguf(path, c, params, qtype)
                    runs = [("lfm2np", record(lfm2np.load(path), ids)[1])]
                    if llama:
                        dump = Path(tmp) / f"{kind}-{qtype}-llama.safetensors"
                        subprocess.run([llama, str(ROOT / "tools" / "dump_llama_cpp_trace.py"), str(path), "--ids",
                                        *map(str, ids), "--out", str(dump), "--ints"], check=True,
                                       capture_output=True)
                        runs.append(("llama.cpp", Trace.load(dump)))
                    for who, theirs in runs:
                        ref = following(reference, theirs, "q4", ids)  # near-ties at the loosest tier followed
                        result = compare(theirs, ref, "fp32", partial=True)
                        rows = out.setdefault(f"{qtype} {who}", {"rel": [], "nmse": [], "ties": []})
                        for d in result.diffs:
                            if d.routing_agreement is None and np.isfinite(d.max_rel):
                                rows["rel"].append((d.max_rel, f"{kind} {d.name}"))
                                rows["nmse"].append((d.nmse_db, f"{kind} {d.name}"))
                                if kind == "embedded" and d.name == "lm_head":
                                    rows.setdefault("embedded", []).append((d.max_rel, d.nmse_db))
                        rows["ties"].append(len(ref.meta["followed"]))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--kinds", default="dense,moe")
    p.add_argument("--llama", help="a Python with llama-cpp-python (tools/setup_llama_cpp.sh --build)")
    args = p.parse_args(argv)
    table = measure(args.kinds.split(","), args.seeds, args.tokens, args.llama)
    print("| run | worst max_rel (tensor) | worst NMSE dB (tensor) | near-ties followed | the trained model's logits |")
    print("|---|---|---|---|---|")
    for key, rows in table.items():
        rel, nmse = max(rows["rel"]), max(rows["nmse"])
        trained = ", ".join(f"{r:.3g} / {n:.1f} dB" for r, n in rows.get("embedded", []))
        print(f"| {key} | {rel[0]:.3g} ({rel[1]}) | {nmse[0]:.1f} ({nmse[1]}) | {sum(rows['ties'])} | {trained} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
