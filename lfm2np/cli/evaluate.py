"""``lfm2np perplexity``: the perplexity of a text file under a model, in sliding windows."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..errors import Lfm2npError
from ..evaluate import perplexity
from ..oracle.trace import json_number
from .common import Subparsers, add_model_arguments, input_file, load_for_generation, positive_int, progress
from .options import add_model_argument


def read_text(path: "str | Path") -> str:
    file = Path(path)
    if not file.is_file():
        raise Lfm2npError(f"{file}: no such file")
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise Lfm2npError(f"{file}: not UTF-8 text ({e})") from None
    except OSError as e:
        raise Lfm2npError(f"{file}: cannot read it ({e.strerror})") from None


def _cmd_perplexity(args: argparse.Namespace) -> int:
    text = read_text(args.file)
    model, tokenizer = load_for_generation(args.model, args)
    ids = tokenizer.encode(text, add_bos=not args.no_bos)
    t0 = time.perf_counter()

    def report(k: int, n: int, so_far: dict) -> None:
        if not args.quiet:
            progress(f"window {k}/{n}: {so_far['tokens']} tokens scored, perplexity so far "
                     f"{so_far['perplexity']:.4f} ({time.perf_counter() - t0:.1f} s)")

    result = perplexity(model, ids, args.window, args.stride, progress=report)
    result = {**result, "bos": not args.no_bos, "file": str(args.file), "model": args.model}
    if args.json:
        print(json.dumps({k: json_number(v) if isinstance(v, float) else v for k, v in result.items()},
                         indent=1, allow_nan=False))
    else:
        print(f"perplexity {result['perplexity']:.4f} over {result['tokens']} tokens of {args.file} "
              f"(mean NLL {result['nll']:.6f} nats/token; window {result['window']}, stride {result['stride']}, "
              f"{result['windows']} window{'s' if result['windows'] != 1 else ''})")
    return 0


def register(sub: Subparsers) -> None:
    p = sub.add_parser("perplexity", help="perplexity of a text file, in sliding windows",
                       description="Perplexity of a UTF-8 text file under the model: exp of the mean negative "
                                   "log-likelihood of every token after the first, each scored once in windows of "
                                   "WINDOW tokens that advance by STRIDE (the Hugging Face recipe; "
                                   "docs/cli.md defines it). Progress goes to stderr.")
    add_model_argument(p)
    p.add_argument("file", type=input_file, help="a UTF-8 text file")
    p.add_argument("--window", "-c", type=positive_int, metavar="W", help="tokens per forward pass (default: the model's context, "
                                                      "at most 2048)")
    p.add_argument("--stride", type=positive_int, metavar="S", help="tokens the window advances by, < window (default: half "
                                                      "the window)")
    p.add_argument("--no-bos", action="store_true", help="do not prepend BOS (by default it is, as "
                                                         "transformers' tokenizer does)")
    add_model_arguments(p)
    p.add_argument("--json", action="store_true", help="print JSON (fields: perplexity, nll, nll_sum, tokens, "
                                                        "input_tokens, window, stride, windows, bos, file, model)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=_cmd_perplexity)
