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

from . import calc_cli
from .errors import Lfm2npError


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
    p.add_argument("model", help="checkpoint directory (config.json + model.safetensors or a sharded set)")
    p.add_argument("--ids", type=int, nargs="+", default=[1, 2, 3, 4], help="token ids (default: 1 2 3 4)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="compute dtype")
    p.add_argument("--top", type=int, default=3, help="how many top logits to show per position")
    p.set_defaults(func=_cmd_forward)


#: Modules (or functions) that add subcommands: each is called with the subparsers object.
REGISTRARS: list[Callable[[argparse._SubParsersAction], None]] = [_register_forward, calc_cli.register]


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


if __name__ == "__main__":
    sys.exit(main())
