#!/usr/bin/env python
"""Dump a transformers run of an LFM2 checkpoint as an lfm2np trace, for `lfm2np compare`.

    python tools/dump_transformers_trace.py CHECKPOINT --ids 1 2 3 --out hf.safetensors [--dtype bfloat16]
    lfm2np trace CHECKPOINT --ids 1 2 3 --out ours.safetensors
    lfm2np compare ours.safetensors hf.safetensors --tier fp32

Needs the `reference` extra (torch, transformers). Forward hooks record each module's output
(the same recorder as tools/make_fixtures.py); lfm2np.oracle.trace.from_transformers maps them to trace names.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from make_fixtures import Recorder, function_level  # noqa: E402

from lfm2np.oracle.trace import from_transformers  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--ids", type=int, nargs="+", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args(argv)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=dtype, attn_implementation="eager").eval()
    rec = Recorder(model)
    with torch.no_grad():
        model(torch.tensor([args.ids]))
    rec.close()
    if dtype == torch.float32:
        function_level(model, rec.store)  # q_rope, k_rope, attn_out, bx, conv_out
    trace = from_transformers(rec.store)
    trace.meta.update(ids=args.ids, dtype=args.dtype, model=args.checkpoint)
    path = trace.save(args.out)
    print(f"wrote {len(trace)} tensors to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
