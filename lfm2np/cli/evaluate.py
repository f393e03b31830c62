"""``lfm2np perplexity``: the perplexity of a text file under a model, in sliding windows."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any, Callable, TextIO

from ..errors import Lfm2npError
from ..evaluate import Accumulator, perplexity, plan, read_text, window_nll
from ..io.hub import resolve
from ..oracle.trace import json_number
from .cluster_options import Task, add_cluster_arguments, runner_for
from .common import Subparsers, add_model_arguments, input_file, load_for_generation, positive_int
from .options import add_model_argument


def _duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 07 min``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class PerplexityProgress:
    """The progress of :func:`lfm2np.evaluate.perplexity` on stderr, as llama-perplexity shows it: the running
    perplexity with its +/- (the standard error over tokens, :mod:`lfm2np.evaluate`) and the time left. On a
    terminal one line, rewritten in place after each window (a carriage return) and ended with a newline after
    the last; elsewhere (a log file, a pipe) a plain line every ``every`` seconds, and none for a run shorter
    than that."""

    def __init__(self, stream: TextIO | None = None, every: float = 10.0,
                 clock: Callable[[], float] = time.perf_counter):
        self.stream = stream if stream is not None else sys.stderr
        self.terminal = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every, self.clock = every, clock
        self.t0 = self.last = clock()
        self.width = 0

    def line(self, k: int, n: int, so_far: dict[str, Any]) -> str:
        elapsed = self.clock() - self.t0
        left = elapsed / k * (n - k)
        ppl, err = so_far["perplexity"], so_far["perplexity_stderr"]
        spread = f" +/- {err:.4f}" if math.isfinite(err) else ""
        eta = f"ETA {_duration(left)}" if k < n else "done"
        return (f"[perplexity {ppl:.4f}{spread} after window {k}/{n} ({so_far['tokens']:,} tokens); "
                f"{_duration(elapsed)}, {eta}]")

    def __call__(self, k: int, n: int, so_far: dict[str, Any]) -> None:
        text = self.line(k, n, so_far)
        if self.terminal:
            self.stream.write("\r" + text.ljust(self.width) + ("\n" if k == n else ""))
            self.width = len(text)
            self.stream.flush()
        elif self.clock() - self.last >= self.every and k < n:
            self.stream.write(text + "\n")
            self.stream.flush()
            self.last = self.clock()


def _cmd_perplexity(args: argparse.Namespace) -> int:
    text = read_text(args.file)
    model, tokenizer = load_for_generation(args.model, args)
    ids = tokenizer.encode(text, add_bos=not args.no_bos)
    if len(ids) < 2:  # the first token is never scored: name the file, not only the count
        raise Lfm2npError(f"{args.file}: {len(text)} characters, {len(ids)} token{'' if len(ids) == 1 else 's'}"
                          f"{' with BOS' if not args.no_bos else ''}; perplexity needs at least 2 tokens (the first "
                          f"is never scored)")
    if args.workers is None and args.scheduler is None:
        report = None if args.quiet else PerplexityProgress()
        result = perplexity(model, ids, args.window, args.stride, progress=report)
    else:  # one task per window on a cluster; added in order, as a serial run adds them: the same bits
        ids, window, stride, parts = plan(model, ids, args.window, args.stride)
        tasks = [Task((ids[b:e], f - b), f"window {k + 1}/{len(parts)} (tokens {b}..{e - 1})")
                 for k, (b, e, f) in enumerate(parts)]
        total, waiting, added = Accumulator(len(ids), window, stride, len(parts)), {}, [0]

        def add(k: int, nll) -> None:  # windows arrive in any order; they are added in theirs, as a serial run does
            waiting[k] = nll
            while added[0] in waiting:
                total.add(waiting.pop(added[0]))
                added[0] += 1

        runner_for(args, _model_source(args.model), "perplexity")(window_nll, tasks, add)
        result = total.result
    result = {**result, "bos": not args.no_bos, "file": str(args.file), "model": args.model}
    if args.json:
        print(json.dumps({k: json_number(v) if isinstance(v, float) else v for k, v in result.items()},
                         indent=1, allow_nan=False))
    else:
        err = result["perplexity_stderr"]
        spread = f" +/- {err:.4f}" if math.isfinite(err) else ""
        print(f"perplexity {result['perplexity']:.4f}{spread} over {result['tokens']} tokens of {args.file} "
              f"(mean NLL {result['nll']:.6f} nats/token; window {result['window']}, stride {result['stride']}, "
              f"{result['windows']} window{'s' if result['windows'] != 1 else ''})")
    return 0


def _model_source(model: str) -> str:
    """What a worker loads for MODEL: a .gguf file, or the checkpoint directory (a cached repo id's snapshot)."""
    return model if str(model).lower().endswith(".gguf") else str(resolve(model))


def register(sub: Subparsers) -> None:
    p = sub.add_parser("perplexity", help="perplexity of a text file, in sliding windows",
                       description="Perplexity of a UTF-8 text file under the model (line ends read as \\n, as "
                                   "Python's text mode reads them): exp of the mean negative log-likelihood of "
                                   "every token after the first, each scored once in windows of W tokens that "
                                   "advance by S (the Hugging Face recipe; docs/cli.md defines it), with its "
                                   "standard error over tokens. Progress goes to stderr: one line rewritten in "
                                   "place on a terminal, a line every 10 s otherwise.")
    add_model_argument(p)
    p.add_argument("file", type=input_file, help="a UTF-8 text file")
    p.add_argument("--window", "-c", type=positive_int, metavar="W",
                   help="tokens per forward pass, llama-perplexity's -c (default: the model's context, at most 2048)")
    p.add_argument("--stride", type=positive_int, metavar="S",
                   help="tokens the window advances by, < W (default: half the window)")
    p.add_argument("--no-bos", action="store_true", help="do not prepend BOS (by default it is, as "
                                                         "transformers' tokenizer does)")
    add_model_arguments(p)
    p.add_argument("--json", action="store_true", help="print JSON (fields: perplexity, perplexity_stderr, nll, "
                                                        "nll_stderr, nll_sum, tokens, input_tokens, window, stride, "
                                                        "windows, bos, file, model)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    add_cluster_arguments(p)
    p.set_defaults(func=_cmd_perplexity)
