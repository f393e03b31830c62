"""The ``lfm2np`` command.

One module per command group registers its subcommands (``register(subparsers)``), so each capability
keeps its command line beside its code; :mod:`lfm2np.cli.common` holds what they share. Bad input prints
one line on stderr and exits 2; no traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from ..errors import Lfm2npError
from ..version import __version__
from . import calc, demo, oracle, run
from .common import Subparsers

#: Modules that add subcommands: each ``register`` is called with the subparsers object.
REGISTRARS: list[Callable[[Subparsers], None]] = [run.register, demo.register, calc.register,
                                                                   oracle.register]


def build_parser() -> argparse.ArgumentParser:
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


if __name__ == "__main__":
    sys.exit(main())
