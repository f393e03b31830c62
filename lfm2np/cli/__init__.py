"""The ``lfm2np`` command.

One module per command group registers its subcommands (``register(subparsers)``), so each capability
keeps its command line beside its code; :mod:`lfm2np.cli.common` holds what they share.

Bad input prints one line on stderr and exits 2, never a traceback: ``lfm2np: error: <message>``, the
message naming the file, tensor, field or argument at fault. That holds for usage errors too (an unknown
option, a missing or out-of-range argument: the range checks are the argparse ``type=`` functions of
:mod:`lfm2np.cli.common`), which print ``lfm2np: error: <command>: <argparse's message> (see 'lfm2np
<command> --help')`` instead of argparse's usage block; for an error writing an output (permission
denied, disk full: an ``OSError``) and for running out of memory.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Callable, NoReturn, Sequence

from safetensors import SafetensorError

from ..errors import Lfm2npError
from ..version import __version__
from . import calc, chat, conformance, demo, diagnose, embed, evaluate, oracle, run
from .common import Subparsers
from .options import resolve_model

#: Modules that add subcommands: each ``register`` is called with the subparsers object.
REGISTRARS: list[Callable[[Subparsers], None]] = [run.register, chat.register, demo.register,
                                                   evaluate.register, calc.register, oracle.register,
                                                   diagnose.register, embed.register,
                                                   conformance.register]


#: what a message must not hold as such: every character ``str.splitlines`` breaks a line at (\v, \f, \x1c..\x1e,
#: \x85, U+2028, U+2029 besides \n and \r) and the other control characters (a NUL, an escape sequence that moves a
#: terminal's cursor): each written as its escape, ``\n`` -> ``\\n``
_ESCAPED = {c: repr(chr(c))[1:-1] for c in (*range(0x20), 0x7F, 0x85, 0x2028, 0x2029) if c != 0x09}


def one_line(message: str) -> str:
    """A message with its line breaks and control characters escaped (a file name may hold one), so it stays one
    line, and its lone surrogates (command-line bytes that are not UTF-8) escaped, so that any stream can print
    it."""
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return message.translate(_ESCAPED)


class Parser(argparse.ArgumentParser):
    """argparse's parser, except that a usage error is one line on stderr (argparse prints the usage first,
    several lines for the larger commands) with exit status 2, as every other error."""

    def error(self, message: str) -> NoReturn:
        command = self.prog[len("lfm2np"):].strip()
        where = f"{command}: " if command else ""
        self.exit(2, f"lfm2np: error: {where}{one_line(message)} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="lfm2np", description="NumPy reference interpreter for Liquid AI's LFM2, LFM2.5 and LFM3 "
                                                "models. MODEL 'embedded' is the tiny model shipped inside lfm2np.")
    parser.add_argument("--version", action="version", version=f"lfm2np {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for register in REGISTRARS:
        register(sub)
    parser.commands = sub.choices  # type: ignore[attr-defined]
    return parser


def fail(message: str) -> int:
    """Print ``lfm2np: error: <message>`` as one line on stderr; the exit status of bad input, 2."""
    print(f"lfm2np: error: {one_line(message)}", file=sys.stderr)
    return 2


def _warning_line(message, category, filename, lineno, line=None) -> str:
    """A warning as the commands print it: one line naming what it is about, no source file or code."""
    return f"lfm2np: warning: {one_line(str(message))}\n"


def main(argv: Sequence[str] | None = None) -> int:
    shown_as = warnings.formatwarning
    warnings.formatwarning = _warning_line  # type: ignore[assignment]
    try:
        return _main(argv)
    finally:
        warnings.formatwarning = shown_as


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    try:
        try:
            args, extra = parser.parse_known_args(argv)
            command = parser.commands.get(args.command, parser)
            if extra:  # said by the command's own parser, so the message names the command
                command.error(f"unrecognized arguments: {' '.join(extra)}")
            resolve_model(command, args)  # MODEL as the positional or -m
        except SystemExit as e:  # a usage error, already printed as one line by Parser.error: its status
            if e.code == 2:
                return 2
            raise  # --help, --version
        status = args.func(args)
        sys.stdout.flush()  # a full disk behind stdout fails here, in the handlers below, not at exit
        return status
    except Lfm2npError as e:
        return fail(str(e))
    except KeyboardInterrupt:
        print("lfm2np: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        _silence_stdout()
        return 0
    except OSError as e:  # writing an output: permission denied, disk full, a directory in the way
        _stdout_failed()
        where = f"{e.filename}: " if e.filename else "cannot write the output: "
        return fail(f"{where}{e.strerror or e}")
    except MemoryError:
        return fail("out of memory (fewer tokens, a smaller --memory-budget or a smaller model may fit)")
    except UnicodeEncodeError as e:  # printing a name that is not UTF-8 to a strict stream
        return fail(f"cannot print {e.object[max(0, e.start - 20):e.end + 20]!r}: not valid UTF-8")
    except SafetensorError as e:  # the safetensors library writing an output (a directory in the way, a full disk)
        return fail(f"writing safetensors: {e}")


def _stdout_failed() -> bool:
    """Whether stdout still cannot be flushed (then it is silenced, so that the flush at exit cannot fail)."""
    try:
        sys.stdout.flush()
        return False
    except (OSError, ValueError):
        _silence_stdout()
        return True


def _silence_stdout() -> None:
    """Point stdout at the null device, so that flushing it at exit cannot fail again."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout is not a real file (a test's capture)
        pass


if __name__ == "__main__":
    sys.exit(main())
