"""The chat on a terminal, as llama-cli behaves: line editing and history (the standard library's ``readline``
where Python has it), Ctrl-C that stops a reply and keeps the conversation, Ctrl-C at the prompt that says how
to quit (twice in a row quits), Ctrl-D that ends the chat on a new line.

Only when standard input is a terminal; messages from a pipe are read by :func:`lfm2np.cli.chat.piped_lines`
and Ctrl-C then ends the program, as it ends any command.
"""

from __future__ import annotations

import signal
from typing import Callable, Iterator, TextIO

#: the chat's commands: a line that starts with "/" is one of these, never a message (help text per name)
COMMANDS = {"/help": "this list",
            "/reset": "forget the conversation and start again (the --system message stays)",
            "/image": "/image FILE: LFM2-VL: attach an image to your next message (before its text, or at each "
                      "<image> it holds; repeat for several)",
            "/exit": "end the chat (also /quit; Ctrl-D or the end of the input do too)"}
ALIASES = {"/quit": "/exit"}

HELP = "\n".join(
    ["commands (a line that starts with / is a command and is not sent to the model; start it with // to send "
     "a message that begins with /):"]
    + [f"  {name:8s} {what}" for name, what in COMMANDS.items()]
    + ["keys on a terminal: Ctrl-C stops a reply (the part already shown stays in the conversation); at the "
       "prompt Ctrl-C clears the line and, twice in a row, quits; Ctrl-D quits; the arrow keys edit the line "
       "and recall earlier messages (when Python has readline)"])

#: the hint after a Ctrl-C at the prompt
QUIT_HINT = "(Ctrl-C again, Ctrl-D or /exit quits; /help lists the commands)"


class ReplyInterrupt:
    """While a reply streams: the first Ctrl-C (SIGINT) only sets :attr:`stopped`, and the reply stops at the
    next token, which keeps the decoding state and the history in step; a second Ctrl-C before that (a long
    prefill) raises KeyboardInterrupt at once, and the caller abandons the turn. The previous handler is
    restored on exit."""

    def __init__(self) -> None:
        self.stopped = False
        self._previous: object = None

    def __enter__(self) -> "ReplyInterrupt":
        self.stopped = False
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.stopped:
            raise KeyboardInterrupt
        self.stopped = True

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self._previous)  # type: ignore[arg-type]


def enable_line_editing() -> bool:
    """Line editing and an in-session history for :func:`input` (no history file is read or written); False
    where Python has no ``readline`` (it is optional, e.g. on Windows)."""
    try:
        import readline  # noqa: F401  (importing it is what gives input() editing and history)
    except ImportError:
        return False
    return True


def terminal_lines(out: TextIO, warn: Callable[[str], None], max_chars: int,
                   prompt: str = "user: ") -> Iterator[str]:
    """The messages typed at the terminal, one per line, read with :func:`input` (so with readline's editing).
    Ctrl-C at the prompt clears the line and prints :data:`QUIT_HINT`; a second Ctrl-C in a row ends the
    chat, as Ctrl-D does (after a newline, so the shell's prompt starts on its own line). A line that is not
    UTF-8 or longer than ``max_chars`` is reported and skipped."""
    enable_line_editing()
    asked_to_quit = False
    number = 0
    while True:
        try:
            line = input(prompt)
        except KeyboardInterrupt:
            out.write("\n")
            out.flush()
            if asked_to_quit:
                return
            asked_to_quit = True
            warn(QUIT_HINT)
            continue
        except EOFError:  # Ctrl-D
            out.write("\n")
            out.flush()
            return
        except UnicodeDecodeError as e:
            number += 1
            asked_to_quit = False
            warn(f"lfm2np: warning: input line {number} is not valid UTF-8 text (position {e.start}); skipped")
            continue
        number += 1
        asked_to_quit = False
        try:
            line.encode("utf-8")  # undecodable bytes arrive as lone surrogates under some locales
        except UnicodeEncodeError as e:
            warn(f"lfm2np: warning: input line {number} is not valid UTF-8 text (position {e.start}); skipped")
            continue
        if len(line) > max_chars:
            warn(f"lfm2np: warning: input line {number} is longer than {max_chars:,} characters; skipped")
            continue
        yield line
