#!/usr/bin/env python
"""Reference perplexities computed by transformers, for tests/test_perplexity.py.

The embedded tiny LFM2-MoE model (lfm2np/data/tiny-lfm2-moe), loaded by transformers in float32, scores a
short text (the start of Python's help topic on the "for" statement, which it was trained on, and of a
topic held out of its training) in sliding windows, for a few window/stride settings. The windows are the
ones lfm2np.evaluate documents, written out again here: window k reads ids[k*S : min(k*S + W, N)] and
scores the targets from the previous window's end (1 for the first) up to its own end. Each window's
negative log-likelihood is transformers' own loss (``model(input_ids, labels=labels)``, the labels
before the first target set to -100) times the number of targets it averaged, summed in float64; a
float64 log-softmax of the same logits cross-checks it. The token ids come from transformers' tokenizer
(BOS added, as ``tokenizer(text)`` does).

Needs the reference environment (tools/setup_reference.sh: torch 2.13.0 CPU, transformers 5.24.0):

    . .venv-ref/bin/activate && python tools/make_perplexity_reference.py [--out tests/golden/perplexity.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import transformers
from pydoc_data.topics import topics
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "lfm2np" / "data" / "tiny-lfm2-moe"
#: (window, stride): overlapping windows, an odd stride, a tiny window (context of 1-2 tokens), one window
#: (the default of lfm2np.evaluate.perplexity for this model: its context, 2048, and half of it).
SETTINGS = [(64, 32), (100, 37), (3, 1), (2048, 1024)]  # the last: the default for this model
TEXTS = {"trained": ("for", 900), "held out": (sorted(topics)[5], 600)}  # tools/train_tiny.py holds out [5::16]


def plan(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    out, prev_end, begin = [], 1, 0
    while True:
        end = min(begin + window, n)
        out.append((begin, end, prev_end))
        if end == n:
            return out
        prev_end, begin = end, begin + stride


def score(model, ids: list[int], window: int, stride: int) -> dict:
    nll_sum, nll_check, tokens = 0.0, 0.0, 0
    windows = plan(len(ids), window, stride)
    for begin, end, first in windows:
        input_ids = torch.tensor(ids[begin:end])[None]
        labels = input_ids.clone()
        labels[:, : first - begin] = -100  # only the targets first .. end-1 count
        with torch.no_grad():
            out = model(input_ids, labels=labels)
        counted = int((labels[:, 1:] != -100).sum())  # the loss averages the shifted labels
        assert counted == end - first
        nll_sum += float(out.loss) * counted
        logp = torch.log_softmax(out.logits[0].double(), dim=-1)
        targets = torch.arange(first, end)
        nll_check -= float(logp[targets - begin - 1, torch.tensor(ids)[targets]].sum())
        tokens += counted
    assert tokens == len(ids) - 1
    assert abs(nll_sum - nll_check) <= 1e-5 * abs(nll_check), (nll_sum, nll_check)
    return {"window": window, "stride": stride, "windows": len(windows), "tokens": tokens, "nll_sum": nll_sum,
            "nll": nll_sum / tokens, "perplexity": math.exp(nll_sum / tokens)}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "tests" / "golden" / "perplexity.json"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32, attn_implementation="eager").eval()
    texts = []
    for kind, (topic, chars) in TEXTS.items():
        text = topics[topic][:chars]
        ids = tokenizer(text)["input_ids"]
        results = [score(model, ids, w, s) for w, s in SETTINGS]
        for r in results:
            print(f"{kind} ({topic!r}, {len(ids)} tokens) window {r['window']} stride {r['stride']}: "
                  f"{r['windows']} windows, perplexity {r['perplexity']:.4f}")
        texts.append({"kind": kind, "topic": topic, "text": text, "ids": ids, "results": results})
    out = {"generator": "tools/make_perplexity_reference.py",
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
           "model": "lfm2np/data/tiny-lfm2-moe (float32, eager attention)",
           "what": "sliding-window perplexity: nll_sum = sum over windows of transformers' loss x targets",
           "texts": texts}
    Path(args.out).write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
