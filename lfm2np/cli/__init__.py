"""The ``lfm2np`` command.

Subcommands register themselves through a ``register(subparsers)`` function per module, so each
capability keeps its command line beside its code. Bad input prints one line on stderr and exits 2;
no traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Callable, Sequence

import numpy as np

from . import calc_cli, demo, oracle_cli
from .errors import Lfm2npError


#: The ``--dtype`` choices of every command that runs a model.
DTYPE_CHOICES = ["float32", "float64", "bfloat16"]
DTYPE_HELP = "compute dtype (float64: the oracle mode; bfloat16: the emulation)"


def _cmd_forward(args: argparse.Namespace) -> int:
    from .model import load

    t0 = time.perf_counter()
    model = load(args.model, dtype=args.dtype)
    t1 = time.perf_counter()
    ids = np.array(args.ids, dtype=np.int64)
    logits = model.forward(ids)
    t2 = time.perf_counter()
    print(model)
    print(f"loaded in {t1 - t0:.2f} s; forward of {len(ids)} tokens in {t2 - t1:.2f} s "
          f"({len(ids) / max(t2 - t1, 1e-9):.1f} tokens/s)")
    print(f"logits: shape {logits.shape}, dtype {logits.dtype}")
    for t, (tok, row) in enumerate(zip(ids, logits)):
        top = np.argsort(-row, kind="stable")[: args.top]
        shown = ", ".join(f"{int(j)}:{row[j]:+.4f}" for j in top)
        print(f"  position {t} (id {int(tok)}): next-token argmax {int(top[0])}; top-{args.top} [{shown}]")
    return 0


def _register_forward(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("forward", help="run the forward pass on token ids and show the logits",
                       description="Load a checkpoint directory and print the logits' top entries for each position.")
    p.add_argument("model", help="checkpoint directory, cached repo id (e.g. LiquidAI/LFM2-350M) or .gguf file")
    p.add_argument("--ids", type=int, nargs="+", default=[1, 2, 3, 4], help="token ids (default: 1 2 3 4)")
    p.add_argument("--dtype", default="float32", choices=DTYPE_CHOICES, help=DTYPE_HELP)
    p.add_argument("--top", type=int, default=3, help="how many top logits to show per position")
    p.set_defaults(func=_cmd_forward)


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _load_for_generation(model_arg: str, dtype: str):
    from .hub import resolve
    from .model import load
    from .tokenizer import Tokenizer

    t0 = time.perf_counter()
    directory = resolve(model_arg)
    model = load(directory, dtype=dtype)
    tokenizer = Tokenizer.from_dir(directory)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise Lfm2npError(f"{directory}: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                          f"vocabulary is {model.config.vocab_size}")
    _progress(f"loaded {model} in {time.perf_counter() - t0:.2f} s")
    return model, tokenizer


def run_generation(model, tokenizer, prompt_ids: list[int], args: argparse.Namespace, out=None) -> list[int]:
    """Stream a generation to ``out`` (stdout) with a progress line on stderr; returns the generated ids."""
    from .generate import Generation

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
    _progress(f"[prompt {len(prompt_ids)} tokens, prefill {len(prompt_ids) / max(prefill, 1e-9):.1f} tokens/s; "
              f"generated {n} tokens, {max(n - 1, 0) / max(decode, 1e-9):.1f} tokens/s; "
              f"finish: {gen.finish_reason}]")
    return gen.tokens


def sampling_from(args: argparse.Namespace):
    """The Sampling of the command-line options (validated before anything is loaded)."""
    from .generate import Sampling

    if args.max_new_tokens < 0:
        raise Lfm2npError(f"--max-new-tokens is {args.max_new_tokens}; expected >= 0")
    return Sampling(args.temperature, args.top_k, args.top_p, args.seed)


def _cmd_generate(args: argparse.Namespace) -> int:
    sampling_from(args)
    model, tokenizer = _load_for_generation(args.model, args.dtype)
    if args.chat is not None:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": args.chat})
        prompt_ids = tokenizer.encode_chat(messages)
    else:
        prompt_ids = tokenizer.encode(args.prompt, add_bos=True)
    run_generation(model, tokenizer, prompt_ids, args)
    return 0


def add_sampling_arguments(p: argparse.ArgumentParser, max_new_tokens: int = 64) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"default {max_new_tokens}")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument("--dtype", default="float32", choices=DTYPE_CHOICES, help=DTYPE_HELP)


def _register_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt or a chat message, streaming",
                       description="Generate from a checkpoint directory or a repo id in the local Hugging Face "
                                   "cache (e.g. LiquidAI/LFM2-350M after `hf download LiquidAI/LFM2-350M`).")
    p.add_argument("model", help="checkpoint directory, cached repo id (e.g. LiquidAI/LFM2-350M) or .gguf file")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="raw text to continue (BOS is prepended)")
    what.add_argument("--chat", help="a user message, formatted with the checkpoint's chat template")
    p.add_argument("--system", help="system message for --chat")
    add_sampling_arguments(p)
    p.set_defaults(func=_cmd_generate)


#: Modules (or functions) that add subcommands: each is called with the subparsers object.
REGISTRARS: list[Callable[[argparse._SubParsersAction], None]] = [_register_forward, _register_generate, demo.register,
                                                                   calc_cli.register, oracle_cli.register]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="lfm2np", description="NumPy reference interpreter for LFM2 models.")
    parser.add_argument("--version", action="version", version=f"lfm2np {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for register in REGISTRARS:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except Lfm2npError as e:
        print(f"lfm2np: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lfm2np: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
