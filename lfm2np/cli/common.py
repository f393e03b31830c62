"""What the commands share: the dtype option, loading a model with its tokenizer, streaming a generation,
the sampling options, and progress lines on stderr."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from ..errors import Lfm2npError
from ..generate import Generation, Sampling
from ..io.hub import resolve
from ..io.tokenizer import Tokenizer
from ..loading import load
from ..numerics import MODES

#: argparse's subparsers object, which each command module's ``register`` receives (its class is private).
Subparsers = Any

#: The ``--dtype`` choices of every command that runs a model.
DTYPE_CHOICES = list(MODES)
DTYPE_HELP = "compute dtype (float64: the oracle mode; bfloat16: the emulation)"


def progress(message: str) -> None:
    """One line on stderr (the commands' progress and timing reports)."""
    print(message, file=sys.stderr, flush=True)


def load_for_generation(model_arg: str, dtype: str):
    t0 = time.perf_counter()
    directory = resolve(model_arg)
    model = load(directory, dtype=dtype)
    tokenizer = Tokenizer.from_dir(directory)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise Lfm2npError(f"{directory}: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                          f"vocabulary is {model.config.vocab_size}")
    progress(f"loaded {model} in {time.perf_counter() - t0:.2f} s")
    return model, tokenizer


def run_generation(model, tokenizer, prompt_ids: list[int], args: argparse.Namespace, out=None) -> list[int]:
    """Stream a generation to ``out`` (stdout) with a progress line on stderr; returns the generated ids."""
    out = out or sys.stdout
    sampling = sampling_from(args)
    stop = tokenizer.stop_ids(model.config.eos_token_id)
    gen = Generation(model, prompt_ids, args.max_new_tokens, sampling, stop)
    t0 = time.perf_counter()
    first = None

    def timed():
        nonlocal first
        for token in gen:
            if first is None:
                first = time.perf_counter()
            yield token

    for piece in tokenizer.stream(timed()):
        out.write(piece)
        out.flush()
    end = time.perf_counter()
    out.write("\n")
    n = len(gen.tokens)
    prefill = (first or end) - t0
    decode = end - (first or end)
    progress(f"[prompt {len(prompt_ids)} tokens, prefill {len(prompt_ids) / max(prefill, 1e-9):.1f} tokens/s; "
              f"generated {n} tokens, {max(n - 1, 0) / max(decode, 1e-9):.1f} tokens/s; "
              f"finish: {gen.finish_reason}]")
    return gen.tokens


def sampling_from(args: argparse.Namespace):
    """The Sampling of the command-line options (validated before anything is loaded)."""
    if args.max_new_tokens < 0:
        raise Lfm2npError(f"--max-new-tokens is {args.max_new_tokens}; expected >= 0")
    return Sampling(args.temperature, args.top_k, args.top_p, args.seed)


def add_sampling_arguments(p: argparse.ArgumentParser, max_new_tokens: int = 64) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"default {max_new_tokens}")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument("--dtype", default="float32", choices=DTYPE_CHOICES, help=DTYPE_HELP)
