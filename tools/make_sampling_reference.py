#!/usr/bin/env python
"""Reference numbers for lfm2np's sampling processors, computed by transformers' own processors.

For each case below this script builds a ``GenerationConfig``, asks a (tiny, randomly initialised)
``Lfm2ForCausalLM`` for the processor list ``generate`` would use (``GenerationMixin._get_logits_processor``,
so the order is transformers' own, after filling unset fields with its defaults as ``generate`` does:
top_k 50 when sampling), applies it to fixed float32 logits with fixed "seen" ids, and writes
the processed logits, the probabilities and the processors' class names to
``tests/golden/sampling.json``. ``tests/test_generate.py`` compares ``lfm2np.generate.process_logits``
with them (no torch in the tests).

Needs the reference environment (tools/setup_reference.sh: torch 2.13.0 CPU, transformers 5.24.0):

    . .venv-ref/bin/activate && python tools/make_sampling_reference.py [--out tests/golden/sampling.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import GenerationConfig, Lfm2Config, Lfm2ForCausalLM

ROOT = Path(__file__).resolve().parent.parent
V = 128  # > 50, so transformers' default top_k (50) of a sampling config matters

#: (name, GenerationConfig fields, logits kind). "ties" rounds the logits to 0.5 so top_k meets equal values.
CASES = [
    ("repetition_penalty, greedy", {"do_sample": False, "repetition_penalty": 1.3}, "normal"),
    ("temperature", {"do_sample": True, "temperature": 0.7, "top_k": 0}, "normal"),
    ("top_k", {"do_sample": True, "temperature": 1.0, "top_k": 5}, "normal"),
    ("top_k with ties", {"do_sample": True, "temperature": 1.0, "top_k": 7}, "ties"),
    ("top_p", {"do_sample": True, "top_p": 0.8, "top_k": 0}, "normal"),
    ("min_p", {"do_sample": True, "min_p": 0.15, "top_k": 0}, "normal"),
    ("LiquidAI's recommendation (top_k defaults to 50)",
     {"do_sample": True, "temperature": 0.3, "min_p": 0.15, "repetition_penalty": 1.05}, "flat"),
    ("everything", {"do_sample": True, "temperature": 1.5, "top_k": 20, "top_p": 0.9, "min_p": 0.05,
                    "repetition_penalty": 1.2}, "normal"),
    ("penalty then temperature then top_p", {"do_sample": True, "temperature": 0.5, "top_k": 0, "top_p": 0.6,
                                             "repetition_penalty": 2.0}, "wide"),
]


def tiny_model() -> Lfm2ForCausalLM:
    config = Lfm2Config(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        num_key_value_heads=1, intermediate_size=32, layer_types=["conv", "full_attention"])
    torch.manual_seed(0)
    return Lfm2ForCausalLM(config).eval()


def logits_for(kind: str, rng: np.random.Generator) -> np.ndarray:
    z = rng.standard_normal(V) * {"normal": 2.0, "ties": 2.0, "wide": 4.0, "flat": 0.3}[kind]
    if kind == "ties":
        z = np.round(z * 2) / 2
    return z.astype(np.float32)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "tests" / "golden" / "sampling.json"))
    args = parser.parse_args(argv)
    model = tiny_model()
    rng = np.random.default_rng(2024)
    cases = []
    for name, settings, kind in CASES:
        logits = logits_for(kind, rng)
        seen = rng.choice(V, size=12).astype(np.int64)  # the prompt and the generated ids, repeats included
        config = GenerationConfig(**settings)
        # what generate() does first (_prepare_generation_config): unset fields take transformers' defaults
        config.update(**GenerationConfig._get_default_generation_params(), defaults_only=True)
        processors = model._get_logits_processor(generation_config=config, input_ids_seq_length=len(seen),
                                                 encoder_input_ids=torch.tensor(seen)[None], device="cpu",
                                                 model_kwargs={})
        scores = processors(torch.tensor(seen)[None], torch.tensor(logits)[None].clone())[0]
        probs = torch.softmax(scores, dim=-1)
        cases.append({
            "name": name, "generation_config": settings, "seen": seen.tolist(),
            "processors": [type(p).__name__ for p in processors],
            "logits": logits.tolist(),
            "processed": [None if not np.isfinite(x) else float(x) for x in scores.numpy().astype(np.float64)],
            "probabilities": probs.numpy().astype(np.float64).tolist(),
            "argmax": int(torch.argmax(scores)),
        })
        print(f"{name}: {[type(p).__name__ for p in processors]}, kept {int(torch.isfinite(scores).sum())} of {V}")
    out = {"generator": "tools/make_sampling_reference.py",
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
           "what": "transformers' logits processors (as generate builds them) applied to fixed float32 logits; "
                   "processed: null where a filter removed the token (-inf)",
           "cases": cases}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
