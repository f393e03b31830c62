"""The command line's vocabulary: each shared option spelled once for every command that takes it, with the
older spellings and llama.cpp's short options as aliases.

- MODEL: the positional, or ``-m``/``--model`` (llama.cpp's ``-m``), checked by :func:`resolve_model`;
- text: ``--text`` (aliases ``-p`` and ``--prompt``), tokenized by the model's tokenizer with BOS first;
- id lists: ``--ids 1 2 3`` or ``--ids 1,2,3`` (or both mixed), and layer lists the same way (``--layers``);
- ``--max-new-tokens``/``-n``, ``--memory-budget`` (``memory``'s ``--budget`` is its alias), and the types
  of :mod:`lfm2np.cli.common`.

docs/cli.md lists each option once (written from the parsers by ``tests/cli_reference.py``).
"""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import Lfm2npError
from .common import ascii_number, MAX_INT, MODEL_HELP, input_file, model_argument, shown, utf8_text


# ----------------------------------------------------------------------------------------- MODEL
def add_model_argument(p: argparse.ArgumentParser, help: str = MODEL_HELP, required: bool = True) -> None:
    """MODEL as a positional or as ``-m``/``--model`` (one of the two; :func:`resolve_model` checks)."""
    p.add_argument("model", type=model_argument, nargs="?", help=help)
    p.add_argument("-m", "--model", dest="model_option", type=model_argument, metavar="MODEL",
                   help="MODEL as an option instead of the positional (llama.cpp's -m)")
    p.set_defaults(model_required=required)


def resolve_model(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Merge ``-m MODEL`` into ``args.model``: a parser error when both name different models, or when neither
    is given and the command needs one."""
    if not hasattr(args, "model_option"):
        return
    given = [m for m in (args.model, args.model_option) if m is not None]
    if len(given) == 2 and given[0] != given[1]:
        parser.error(f"the model is given twice: {shown(given[0])} and -m {shown(given[1])}")
    if not given and args.model_required:
        parser.error("the following arguments are required: model (the positional MODEL, or -m/--model MODEL)")
    args.model = given[0] if given else None


# ------------------------------------------------------------------------------------------ text
def add_text_argument(p: Any, help: str) -> None:
    """``--text TEXT`` with its aliases ``-p`` and ``--prompt`` (llama.cpp's prompt option); ``p`` may be a
    mutually exclusive group."""
    p.add_argument("--text", "-p", "--prompt", dest="text", type=utf8_text, metavar="TEXT", help=help)


def add_image_argument(p: Any, help: str) -> None:
    """``--image FILE``, repeatable: LFM2-VL's images, in order."""
    p.add_argument("--image", action="append", type=input_file, metavar="FILE", help=f"{help} (repeat for several)")


# ------------------------------------------------------------------------------------ id lists
def _integers(value: str, what: str) -> list[int]:
    """One command-line word of a list: an integer >= 0, or several separated by commas (``1,2,3``)."""
    out = []
    for item in value.split(","):
        item = item.strip()
        try:
            n = int(ascii_number(item), 10)
        except ValueError:
            example = "0,2 or 0 2" if what == "a layer index" else "1,2,3 or 1 2 3"
            raise argparse.ArgumentTypeError(f"{shown(item or value)} is not an integer; expected {what} >= 0, "
                                             f"or several separated by commas or spaces ({example})") from None
        if n < 0:
            raise argparse.ArgumentTypeError(f"{n} is not {what} (an integer >= 0)")
        if n > MAX_INT:
            raise argparse.ArgumentTypeError(f"{shown(str(n))} is too large (at most {MAX_INT})")
        out.append(n)
    return out


def id_list(value: str) -> list[int]:
    """Token ids: ``1`` or ``1,2,3`` (one word of ``--ids 1,2 3``)."""
    return _integers(value, "a token id")


def layer_list(value: str) -> list[int]:
    """Layer indices: ``0`` or ``0,2`` (one word of ``--layers 0,2 5``)."""
    return _integers(value, "a layer index")


class Flatten(argparse.Action):
    """Joins the lists of each word (``--ids 1,2 3`` -> ``[1, 2, 3]``)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, [x for v in values for x in v])


def add_ids_argument(p: Any, help: str, default: list[int] | None = None, name: str = "--ids") -> None:
    """``--ids 1 2 3`` / ``--ids 1,2,3``: token ids (``name``: another option with the same form, e.g. --tokens)."""
    p.add_argument(name, type=id_list, nargs="+", action=Flatten, default=default, metavar="ID",
                   help=f"{help} (separated by spaces or commas: 1 2 3 or 1,2,3)")


def add_layers_argument(p: Any, help: str) -> None:
    """``--layers 0 2`` / ``--layers 0,2``; ``--layers`` alone: every layer (an empty list)."""
    p.add_argument("--layers", type=layer_list, nargs="*", action=Flatten, default=None, metavar="LAYER",
                   help=f"{help} (separated by spaces or commas: 0 2 or 0,2; alone: every layer)")


def check_layers(layers: list[int] | None, n_layers: int, what: str = "--layers") -> list[int] | None:
    """``layers`` within a model of ``n_layers`` (None or empty: every layer, returned as None)."""
    if not layers:
        return None
    bad = sorted({i for i in layers if i >= n_layers})
    if bad:
        raise Lfm2npError(f"{what} {','.join(map(str, bad))}: the model has {n_layers} layers (0..{n_layers - 1})")
    return sorted(set(layers))
