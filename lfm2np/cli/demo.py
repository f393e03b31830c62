"""``lfm2np demo``: the embedded tiny LFM2-MoE model, generating and showing its walk through the layers."""

from __future__ import annotations

import argparse

from ..embedded import DEFAULT_PROMPT, embedded_model_path, layer_walk
from .common import Subparsers, add_sampling_arguments, generation_defaults_for, load_for_generation, progress, \
    run_generation, sampling_from
from .common import positive_int, utf8_text
from .options import add_text_argument


def _cmd_demo(args: argparse.Namespace) -> int:
    sampling_from(args)
    path = str(embedded_model_path())
    model, tokenizer = load_for_generation(path, args)
    c = model.config
    print(f"layers: {c.layer_pattern()}  (C conv, A attention; lower case: MoE feed-forward, "
          f"{c.num_experts} experts, top-{c.num_experts_per_tok})")
    messages = [{"role": "user", "content": args.chat}]
    prompt_ids = tokenizer.encode_chat(messages) if args.text is None else tokenizer.encode(args.text, add_bos=True)
    shown = args.chat if args.text is None else args.text
    print(f"{'user' if args.text is None else 'text'}: {shown}")
    print("assistant: " if args.text is None else "continuation: ", end="", flush=True)
    generated = run_generation(model, tokenizer, prompt_ids, args, defaults=generation_defaults_for(path))
    if not args.no_walk:
        progress("")
        everything = list(prompt_ids) + generated
        shown = min(args.walk_tokens, len(everything))
        print(f"\nthe walk through the layers: each layer's kind, and the experts each of the last {shown} "
              f"tokens chose")
        print(layer_walk(model, tokenizer, everything, last=shown))
    return 0


def register(sub: Subparsers) -> None:
    p = sub.add_parser("demo", help="run the embedded tiny LFM2-MoE model (no download)",
                       description="Generate with the tiny LFM2-MoE model shipped inside lfm2np and show which "
                                   "experts each token chose in each layer.")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--chat", type=utf8_text, default=DEFAULT_PROMPT, help=f"a user message (default: {DEFAULT_PROMPT!r})")
    add_text_argument(what, "raw text to continue instead of a chat message (BOS prepended)")
    p.add_argument("--no-walk", action="store_true", help="do not print the layer walk")
    p.add_argument("--walk-tokens", type=positive_int, default=24, help="how many of the last tokens the walk shows")
    add_sampling_arguments(p)
    p.set_defaults(func=_cmd_demo)
