"""``lfm2np demo``: the embedded tiny LFM2-MoE model, generating and showing its walk through the layers.

The model ships inside the package (``lfm2np/data/tiny-lfm2-moe``): a few MB, trained by
``tools/train_tiny.py`` on the Python standard library's pydoc topics, with a byte-level BPE tokenizer
that carries LFM2's special tokens and chat template. :func:`embedded_model_path` gives its directory.
"""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path

from .errors import Lfm2npError

EMBEDDED = "tiny-lfm2-moe"
DEFAULT_PROMPT = 'What is the "while" statement?'


def embedded_model_path() -> Path:
    """The directory of the embedded tiny model (config.json, model.safetensors, tokenizer files)."""
    path = Path(str(resources.files("lfm2np") / "data" / EMBEDDED))
    if not (path / "config.json").is_file():
        raise Lfm2npError(f"{path}: the embedded model is missing from this installation")
    return path


def layer_walk(model, tokenizer, ids: list[int], last: int | None = None, width: int = 12) -> str:
    """A table: one row per token, its text and, per MoE layer, the experts it chose (and each layer's kind).
    The whole sequence ``ids`` is run (experts depend on the context); ``last`` limits the rows shown."""
    from .trace import record

    c = model.config
    _, trace = record(model, ids, ["*.selected_experts"])
    first = 0 if last is None else max(0, len(ids) - last)
    header = [f"{'token':>{width}s}"]
    for i in range(c.num_hidden_layers):
        kind = "attn" if c.is_attention(i) else "conv"
        header.append(f"{f'L{i} {kind}':>9s}")
    lines = [" ".join(header),
             " ".join([f"{'':>{width}s}"] + [f"{'MoE' if c.is_moe_layer(i) else 'dense':>9s}"
                                               for i in range(c.num_hidden_layers)])]
    for t in range(first, len(ids)):
        token = ids[t]
        text = tokenizer.decode([token])
        shown = repr(text if len(text) <= width - 2 else text[: width - 3] + "~")
        cells = [f"{shown:>{width}s}"]
        for i in range(c.num_hidden_layers):
            name = f"model.layers.{i}.feed_forward.selected_experts"
            cells.append(f"{','.join(str(int(e)) for e in sorted(trace[name][t])) if name in trace else '-':>9s}")
        lines.append(" ".join(cells))
    return "\n".join(lines)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .cli import _load_for_generation, _progress, run_generation, sampling_from

    sampling_from(args)
    model, tokenizer = _load_for_generation(str(embedded_model_path()), args.dtype)
    c = model.config
    print(f"layers: {c.layer_pattern()}  (C conv, A attention; lower case: MoE feed-forward, "
          f"{c.num_experts} experts, top-{c.num_experts_per_tok})")
    messages = [{"role": "user", "content": args.chat}]
    prompt_ids = tokenizer.encode_chat(messages) if args.prompt is None else tokenizer.encode(args.prompt, add_bos=True)
    shown = args.chat if args.prompt is None else args.prompt
    print(f"{'user' if args.prompt is None else 'prompt'}: {shown}")
    print("assistant: " if args.prompt is None else "continuation: ", end="", flush=True)
    generated = run_generation(model, tokenizer, prompt_ids, args)
    if not args.no_walk:
        _progress("")
        everything = list(prompt_ids) + generated
        shown = min(args.walk_tokens, len(everything))
        print(f"\nthe walk through the layers: each layer's kind, and the experts each of the last {shown} "
              f"tokens chose")
        print(layer_walk(model, tokenizer, everything, last=shown))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from .cli import add_sampling_arguments

    p = sub.add_parser("demo", help="run the embedded tiny LFM2-MoE model (no download)",
                       description="Generate with the tiny LFM2-MoE model shipped inside lfm2np and show which "
                                   "experts each token chose in each layer.")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--chat", default=DEFAULT_PROMPT, help=f"a user message (default: {DEFAULT_PROMPT!r})")
    what.add_argument("--prompt", help="raw text to continue instead of a chat message")
    p.add_argument("--no-walk", action="store_true", help="do not print the layer walk")
    p.add_argument("--walk-tokens", type=int, default=24, help="how many of the last tokens the walk shows")
    add_sampling_arguments(p, max_new_tokens=48)
    p.set_defaults(func=_cmd_demo)

