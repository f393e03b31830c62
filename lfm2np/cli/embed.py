"""``lfm2np embed``: embeddings of texts or token ids (LFM2.5-Embedding / -ColBERT, any LFM2 with a head)."""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from ..config import POOLINGS
from ..errors import Lfm2npError
from ..io.tokenizer import Tokenizer
from .common import Subparsers, add_model_arguments, clipped, load_model, utf8_text
from .options import add_model_argument, id_list


class _Input(argparse.Action):
    """``--text`` and ``--ids`` append to one list of inputs, in the order given: ("text", TEXT) or ("ids", [...])."""

    def __call__(self, parser, namespace, values, option_string=None):
        kind = "ids" if self.dest == "ids" else "text"
        value = [x for v in values for x in v] if kind == "ids" else values
        inputs = list(getattr(namespace, "inputs", None) or [])
        namespace.inputs = inputs + [(kind, value)]


def _cmd_embed(args: argparse.Namespace) -> int:
    inputs = getattr(args, "inputs", None) or []
    if not inputs:
        raise Lfm2npError("give at least one input: --text TEXT or --ids ID ... (each may be repeated)")
    t0 = time.perf_counter()
    model = load_model(args)
    tokenizer = Tokenizer.load(args.model) if any(kind == "text" for kind, _ in inputs) else None
    seqs = [tokenizer.encode(v, add_bos=True) if kind == "text" else list(v) for kind, v in inputs]
    if any(not s for s in seqs):
        raise Lfm2npError(f"input {next(i for i, s in enumerate(seqs) if not s)} has no tokens")
    t1 = time.perf_counter()
    c = model.config
    pooling = args.pooling or c.pooling or "mean"
    vectors = model.embed(seqs, pooling=pooling)  # (B, E)
    tokens = model.embed(seqs, per_token=True) if args.per_token else None
    t2 = time.perf_counter()
    sims = np.asarray(vectors, np.float64) @ np.asarray(vectors, np.float64).T
    if args.json:
        out = {"model": str(args.model), "pooling": pooling, "dimensions": c.embedding_size,
               "dtype": model.numerics.name, "inputs": [{kind: v, "ids": s} if kind == "text" else {"ids": s}
                                                        for (kind, v), s in zip(inputs, seqs)],
               "embeddings": np.asarray(vectors, np.float64).tolist(), "similarities": sims.tolist()}
        if tokens is not None:
            out["token_embeddings"] = [np.asarray(t, np.float64).tolist() for t in tokens]
        print(json.dumps(out))
        return 0
    declared = "the checkpoint's" if c.pooling == pooling and args.pooling is None else \
        "--pooling" if args.pooling else "the checkpoint declares none"
    print(model)
    print(f"{len(seqs)} input{'s' * (len(seqs) != 1)} embedded in {t2 - t1:.2f} s (loaded in {t1 - t0:.2f} s); "
          f"{'bidirectional' if not c.causal else 'causal'}; pooling {pooling} ({declared}); "
          f"{'dense ' + str(c.hidden_size) + ' -> ' + str(c.dense_out) + '; ' if c.dense_out else ''}"
          f"{c.embedding_size} dimensions, L2-normalised")
    for n, ((kind, v), s, e) in enumerate(zip(inputs, seqs, vectors)):
        what = repr(clipped(v, 50)) if kind == "text" else f"ids {clipped(' '.join(map(str, s)), 50)}"
        head = ", ".join(f"{x:+.4f}" for x in e[:6])
        print(f"  [{n}] {what} ({len(s)} tokens): [{head}{', ...' if len(e) > 6 else ''}]")
        if tokens is not None:
            for t, row in enumerate(tokens[n]):
                print(f"      token {t} (id {s[t]}): [{', '.join(f'{x:+.4f}' for x in row[:6])}"
                      f"{', ...' if len(row) > 6 else ''}]")
    if len(seqs) > 1:
        print("cosine similarities:")
        print("       " + "".join(f"{f'[{j}]':>9}" for j in range(len(seqs))))
        for i, row in enumerate(sims):
            print(f"  {f'[{i}]':5}" + "".join(f"{x:9.4f}" for x in row))
    return 0


def register(sub: Subparsers) -> None:
    """Add the ``embed`` subcommand."""
    p = sub.add_parser("embed", help="embed texts or token ids: pooled, normalised vectors and their similarities",
                       description="The embedding of each input: the final hidden states through the checkpoint's "
                                   "sentence-transformers head (its pooling, its dense projection if any, L2 "
                                   "normalisation), for bidirectional LFM2 models (LFM2.5-Embedding, -ColBERT) and "
                                   "any LFM2 with a head (LFM2-ColBERT-350M). Inputs of different lengths run as "
                                   "one padded batch, each giving what it gives alone. The text output ends with "
                                   "the inputs' cosine similarities.")
    add_model_argument(p)
    p.add_argument("--text", "-p", "--prompt", dest="text", type=utf8_text, action=_Input, metavar="TEXT",
                   help="a text to embed, tokenized with the checkpoint's tokenizer (BOS first: the CLS token); "
                        "repeat for several (prompts such as 'query: ' are part of the text)")
    p.add_argument("--ids", type=id_list, nargs="+", action=_Input, metavar="ID",
                   help="token ids of one input (1 2 3 or 1,2,3); repeat --ids for several inputs")
    p.add_argument("--pooling", choices=POOLINGS, help="pool the tokens so instead of the checkpoint's pooling "
                                                       "(default: the checkpoint's, or mean when it declares none)")
    p.add_argument("--per-token", action="store_true",
                   help="also the per-token vectors (ColBERT's: dense and normalised per token)")
    p.add_argument("--json", action="store_true", help="print JSON: embeddings (one per input, in order), "
                                                       "similarities, and with --per-token token_embeddings")
    add_model_arguments(p)
    p.set_defaults(func=_cmd_embed)
