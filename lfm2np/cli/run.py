"""``lfm2np forward`` and ``lfm2np generate``."""

from __future__ import annotations

import argparse
import time

import numpy as np

from ..io.tokenizer import Tokenizer
from .common import LayerProgress, Subparsers, add_model_arguments, add_sampling_arguments, encode_prompt, \
    load_for_generation, load_model, run_generation, sampling_from
from .common import positive_int, utf8_text
from .options import add_ids_argument, add_image_argument, add_model_argument, add_text_argument


def _cmd_forward(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    model = load_model(args)
    t1 = time.perf_counter()
    ids = np.array(Tokenizer.load(args.model).encode(args.text, add_bos=True) if args.text is not None
                   else args.ids, dtype=np.int64)
    logits = model.forward(ids, progress=LayerProgress())
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


def _register_forward(sub: Subparsers) -> None:
    p = sub.add_parser("forward", help="run the forward pass on token ids and show the logits",
                       description="Load a model and print the logits' top entries for each position of token ids "
                                   "or of a text.")
    add_model_argument(p)
    what = p.add_mutually_exclusive_group()
    add_ids_argument(what, "token ids (default: 1 2 3 4)", default=[1, 2, 3, 4])
    add_text_argument(what, "text to tokenize with the checkpoint's tokenizer (BOS prepended)")
    add_model_arguments(p)
    p.add_argument("--top", type=positive_int, default=3, help="how many top logits to show per position")
    p.set_defaults(func=_cmd_forward)


def _cmd_generate(args: argparse.Namespace) -> int:
    sampling_from(args)
    model, tokenizer = load_for_generation(args.model, args)
    prompt_ids, images = encode_prompt(model, tokenizer, args)
    run_generation(model, tokenizer, prompt_ids, args, images=images)
    return 0


def _register_generate(sub: Subparsers) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt or a chat message, streaming",
                       description="Generate from a checkpoint directory or a repo id in the local Hugging Face "
                                   "cache (e.g. LiquidAI/LFM2-350M after `hf download LiquidAI/LFM2-350M`).")
    add_model_argument(p)
    what = p.add_mutually_exclusive_group(required=True)
    add_text_argument(what, "raw text to continue (BOS prepended)")
    what.add_argument("--chat", type=utf8_text, help="a user message, formatted with the checkpoint's chat template")
    p.add_argument("--system", type=utf8_text, help="system message for --chat")
    add_image_argument(p, "LFM2-VL: an image for the prompt, at its next <image> or, without any, before the text")
    add_sampling_arguments(p)
    p.set_defaults(func=_cmd_generate)


def register(sub: Subparsers) -> None:
    """Add the ``forward`` and ``generate`` subcommands."""
    _register_forward(sub)
    _register_generate(sub)
