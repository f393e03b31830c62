"""``lfm2np chat``: a conversation on the terminal that keeps the decoding state between turns.

Each turn renders the whole conversation with the checkpoint's chat template and encodes it, exactly as
a from-scratch run would, but feeds the model only the ids its state does not hold yet. LFM2's template
is prefix-stable (the rendering of turns 1..n is a prefix of the rendering of 1..n+1, and the reply's
tokens usually re-encode to themselves), so a turn normally feeds just ``<|im_end|>``, the new user turn
and the assistant header. When the rendering differs from what the state holds (a template that rewrites
earlier turns, e.g. one that strips past thinking, or a reply whose text encodes to other tokens), the
state goes back to the first differing id: by ``State.rollback`` when that is within its rollback
limit, else from the snapshot kept at the start of the last reply, else from the start. Either way the
model sees exactly the ids of the rendered conversation, so a reply equals the one a from-scratch run
on the whole conversation gives (to float rounding).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from typing import Any

import numpy as np

from ..embedded import embedded_model_path
from ..errors import Lfm2npError
from ..generate import Generation, Sampling
from ..processor import ImageBatch
from ..prompting import encode_with_images, placeholders
from ..state import State
from .common import Subparsers, add_sampling_arguments, describe_sampling, generation_defaults_for, \
    load_for_generation, MODEL_HELP, progress, sampling_from, stop_ids_for, utf8_text
from .common import shown
from .options import add_model_argument
from .terminal import ALIASES, HELP, ReplyInterrupt, terminal_lines


def common_prefix(a: list[int], b: list[int]) -> int:
    """The length of the longest common prefix of two id lists."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n


class Conversation:
    """The messages so far, the ids the decoding state holds (``fed``) and the state itself."""

    def __init__(self, model: Any, tokenizer: Any, system: str | None = None):
        self.model, self.tokenizer, self.system = model, tokenizer, system
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.messages: list[dict[str, Any]] = [{"role": "system", "content": self.system}] if self.system else []
        self.images: list[ImageBatch] = []  # LFM2-VL: the conversation's images, in order, each processed once
        self.pending: list[ImageBatch] = []  # attached with /image to the next message
        self.fed: list[int] = []
        self.state: State | None = None
        self.snapshot: tuple[int, State] | None = None  # (len(fed), state) at the start of the last reply
        self.last: dict[str, int] = {}

    def rendered(self) -> list[int]:
        """The ids of the whole conversation as the chat template renders it, with the assistant header (and each
        image's placeholders expanded)."""
        if not self.images:
            return self.tokenizer.encode_chat(self.messages)
        return encode_with_images(self.model, self.tokenizer, ImageBatch.concat(self.images),
                                  messages=self.messages)[0]

    def attach(self, path: str) -> ImageBatch:
        """``/image FILE``: the image, processed by the model's processor, kept for the next message."""
        if self.model.config.vision is None:
            raise Lfm2npError("this model has no vision tower: /image needs an LFM2-VL checkpoint")
        if self.model.image_processor is None:
            raise Lfm2npError("the model has no image processor settings (processor_config.json)")
        batch = self.model.image_processor([path])
        self.pending.append(batch)
        return batch

    def _new_images(self, ids: list[int]) -> "ImageBatch | None":
        """The images whose placeholders are in ``ids[len(fed):]`` (the state going back to an image's first
        placeholder when it holds only part of them)."""
        if not self.images:
            return None
        slots = np.flatnonzero(np.asarray(ids) == self.model.config.vision.image_token_id)
        starts = np.cumsum([0] + [t for b in self.images for t in b.tokens_per_image])
        while True:
            held = int(np.count_nonzero(slots < len(self.fed)))
            k = int(np.searchsorted(starts, held, side="left"))  # the first image with no placeholder held
            if starts[k] == held:
                break
            self._rewind(int(slots[starts[k - 1]]))  # the state holds part of image k - 1: back before it
        return ImageBatch.concat(self.images[k:]) if k < len(self.images) else None

    def _rewind(self, n: int) -> None:
        """Make the state hold ``fed[:n]`` (or fewer ids: then more are fed next)."""
        back = len(self.fed) - n
        if back == 0:
            return
        self.last["rolled_back"] = back
        if self.state is not None and back <= self.state.rollback_limit:
            self.state = self.state.rollback(back)
        elif self.snapshot is not None and self.snapshot[0] <= n:
            self.last["from_snapshot"] = 1
            self.state = self.snapshot[1]
            n = self.snapshot[0]
        else:
            self.last["from_start"] = 1
            self.state, n = None, 0
        self.fed = self.fed[:n]

    def ask(self, text: str, max_new_tokens: int, sampling: Sampling, stop_ids: set[int],
            rng: np.random.Generator | None = None) -> Generation:
        """Add a user turn and return the Generation of the reply (iterate it, then call :meth:`record`).
        Feeds the rendered conversation's ids the state does not hold, all but the last; the Generation
        feeds that one and samples."""
        pending, self.pending = self.pending, []
        content: Any = text
        if pending and not placeholders(text):  # the images before the text, as parts the template renders
            content = [{"type": "image"} for _ in pending] + [{"type": "text", "text": text}]
        self.messages.append({"role": "user", "content": content})
        self.images += pending
        try:
            ids = self.rendered()
        except Lfm2npError as e:  # the template refused this conversation (a later turn can fail alone), or the
            self.messages.pop()   # message's placeholders do not match its images
            del self.images[len(self.images) - len(pending):]
            self.pending = pending  # still attached, for the next message
            raise TurnRefused(f"{e}; the message was not sent") from None
        context = self.model.config.max_position_embeddings
        if len(ids) >= context:
            self.messages.pop()
            del self.images[len(self.images) - len(pending):]
            raise ContextFull(f"the conversation would be {len(ids)} tokens, the model's context is {context}")
        self.last = {"rendered": len(ids)}
        self._rewind(min(common_prefix(self.fed, ids), len(ids) - 1))
        images = self._new_images(ids)
        self.last["reused"] = len(self.fed)
        new = ids[len(self.fed):]
        self.last["fed"] = len(new)
        if len(new) > 1:
            extra = {} if images is None else {"images": images}  # (a stand-in model need not know the keyword)
            _, self.state = self.model.step(new[:-1], self.state, **extra)
            self.fed = ids[:-1]
        self.snapshot = (len(self.fed), self.state) if self.state is not None else None
        return Generation(self.model, new[-1:], min(max_new_tokens, context - len(ids)), sampling, stop_ids,
                          state=self.state, context_ids=self.fed, rng=rng)

    def record(self, gen: Generation) -> str:
        """After the reply's Generation ran (to its end, or stopped early by Ctrl-C): keep its state and the ids
        it holds, and add the reply, as far as it went, to the messages."""
        held = self.fed + gen.prompt.tolist() + gen.tokens
        self.state = gen.state
        self.fed = held[:0 if self.state is None else self.state.position]  # the ids the state holds: the
        # prompt and every generated id but the last, all of them after a stop id, none with max_new_tokens 0
        reply = self.tokenizer.decode(gen.tokens, skip_special_tokens=True)
        self.messages.append({"role": "assistant", "content": reply})
        return reply

    def saved(self) -> tuple:
        """What :meth:`restore` puts back: the conversation as it is now (states are values: no copy needed)."""
        return list(self.messages), list(self.fed), self.state, self.snapshot, list(self.images), list(self.pending)

    def restore(self, saved: tuple) -> None:
        """The conversation as :meth:`saved` had it (a turn abandoned halfway: its message and ids forgotten)."""
        messages, fed, self.state, self.snapshot, images, pending = saved
        self.messages, self.fed, self.images, self.pending = list(messages), list(fed), list(images), list(pending)


class ContextFull(Lfm2npError):
    """The next turn does not fit the model's context (the chat goes on: /reset starts again)."""


class TurnRefused(Lfm2npError):
    """The chat template failed on the conversation with the new message (it was not sent). After a turn that
    rendered, the chat goes on without the message (a template may refuse one turn, e.g. two user messages in a
    row after an abandoned reply); on the first turn the template cannot render any conversation: the chat ends."""


#: the longest message a line may hold, in characters (the chat template's output is bounded at 16 MiB)
MAX_MESSAGE = 1 << 20


def piped_lines(stream, out):
    """The messages on ``stream``, a pipe or a file, each echoed as ``user: <line>`` on ``out`` so that it holds
    the transcript (a terminal is read by :func:`lfm2np.cli.terminal.terminal_lines`). ``stream`` is a text
    stream; its bytes are read and decoded here, one line at a time, so a line that is not UTF-8, or longer than :data:`MAX_MESSAGE`, is reported and skipped rather than ending
    the conversation). Reads are bounded: a longer line is never held whole."""
    raw = getattr(stream, "buffer", None)
    source, newline = (stream, "\n") if raw is None else (raw, b"\n")
    limit = 4 * MAX_MESSAGE + 2  # a UTF-8 character takes at most 4 bytes
    number = 0
    while True:
        try:
            line = source.readline(limit)
            too_long = len(line) >= limit and not line.endswith(newline)
            while too_long and line and not line.endswith(newline):  # skip the rest, a bounded piece at a time
                line = source.readline(limit)
        except OSError as e:
            raise Lfm2npError(f"cannot read the messages from standard input ({e.strerror or e})") from None
        if not line:
            return
        number += 1
        try:  # bytes from a terminal or pipe; a text stream's lone surrogates are undecodable bytes too
            text = line if too_long else line.decode("utf-8") if raw is not None else line.encode("utf-8") and line
        except UnicodeError as e:
            progress(f"lfm2np: warning: input line {number} is not valid UTF-8 text (position {e.start}); skipped")
            continue
        if too_long or len(text.rstrip("\r\n")) > MAX_MESSAGE:
            progress(f"lfm2np: warning: input line {number} is longer than {MAX_MESSAGE:,} characters; skipped")
            continue
        text = text.rstrip("\r\n")
        out.write(f"user: {text}\n")
        yield text


def _cmd_chat(args: argparse.Namespace) -> int:
    if sys.stdin is None or sys.stdin.closed:
        raise Lfm2npError("chat reads its messages from standard input, which is closed")
    sampling_from(args)  # validate the options before loading
    model_arg = args.model or str(embedded_model_path())
    model, tokenizer = load_for_generation(model_arg, args)
    defaults = generation_defaults_for(model_arg)
    sampling = sampling_from(args, defaults)
    stop = stop_ids_for(model, tokenizer, defaults)
    rng = np.random.default_rng(sampling.seed)
    conversation = Conversation(model, tokenizer, args.system)
    interactive = sys.stdin.isatty()
    out = sys.stdout
    lines = terminal_lines(out, progress, MAX_MESSAGE) if interactive else piped_lines(sys.stdin, out)
    progress(f"chat: one message per line; /help lists the commands, /exit or "
             f"{'Ctrl-D' if interactive else 'the end of the input'} quits. sampling: {describe_sampling(sampling)}")
    turn = 0
    for line in lines:
        command = line.strip()
        if command.startswith("/") and not command.startswith("//"):
            name = ALIASES.get(command.split()[0], command.split()[0])
            if name == "/exit":
                break
            if name == "/reset":
                conversation.reset()
                turn = 0
                progress("[conversation reset]")
            elif name == "/help":
                progress(HELP)
            elif name == "/image":
                _attach(conversation, line.strip()[len("/image"):].strip())
            else:
                progress(f"lfm2np: unknown command {shown(name, 20)}, not sent to the model: /help lists the "
                         f"commands; start the line with // to send a message that begins with /")
            continue
        if not command:
            continue
        if command.startswith("//"):
            line = line.lstrip()[1:]
        try:
            if _reply(conversation, line, turn + 1, args, sampling, stop, rng, out, interactive):
                turn += 1
        except ContextFull as e:
            progress(f"lfm2np: warning: {e}: /reset to start again")
        except TurnRefused as e:
            if turn == 0:
                raise
            progress(f"lfm2np: warning: {e}; the conversation is as it was (/reset starts again)")
    return 0


def _attach(conversation: Conversation, path: str) -> None:
    """``/image FILE``: one line saying what was attached, or why not (the chat goes on)."""
    if not path:
        progress("lfm2np: /image needs a file: /image FILE")
        return
    try:
        batch = conversation.attach(path)
    except Lfm2npError as e:
        progress(f"lfm2np: error: /image: {e}; nothing attached")
        return
    layout = batch.layouts[0]
    progress(f"[image {shown(path)}: {layout.height}x{layout.width}, {batch.tokens_per_image[0]} image tokens; "
             f"attached to your next message ({len(conversation.pending)} waiting)]")


def _reply(conversation: Conversation, line: str, turn: int, args: argparse.Namespace, sampling: Sampling,
           stop: frozenset[int], rng: np.random.Generator, out, interactive: bool) -> bool:
    """One turn: the reply streamed to ``out``, then a line on stderr. On a terminal the first Ctrl-C stops
    the reply at the next token (the part shown stays in the conversation, and the decoding state holds
    exactly its ids); a second one before that abandons the turn (the conversation as before the message).
    Returns whether the turn was kept."""
    saved = conversation.saved()
    t0 = time.perf_counter()
    first = None
    try:
        with ReplyInterrupt() if interactive else contextlib.nullcontext() as interrupt:
            gen = conversation.ask(line, args.max_new_tokens, sampling, stop, rng)
            out.write("assistant: ")
            out.flush()

            def tokens():
                nonlocal first
                for token in gen:
                    first = first or time.perf_counter()
                    yield token
                    if interrupt is not None and interrupt.stopped:
                        gen.stop()
                        return

            for piece in conversation.tokenizer.stream(tokens()):
                out.write(piece)
                out.flush()
            out.write("\n")
            out.flush()
    except KeyboardInterrupt:  # on a terminal, the second Ctrl-C, in the middle of a step
        if not interactive:  # from a pipe Ctrl-C ends the program, as it ends every command
            raise
        conversation.restore(saved)
        out.write("\n")
        out.flush()
        progress("[reply abandoned: the conversation is as it was before this message]")
        return False
    end = time.perf_counter()
    conversation.record(gen)
    s = conversation.last
    how = ""
    if s.get("rolled_back"):
        how = (f", went back {s['rolled_back']} tokens " +
               ("from the start" if s.get("from_start") else "to the last reply's start"
                if s.get("from_snapshot") else "by rollback"))
    finish = gen.finish_reason
    if finish == "interrupted":
        finish = "stopped by Ctrl-C; the partial reply stays in the conversation"
    n = len(gen.tokens)
    progress(f"[turn {turn}: conversation {s['rendered']} tokens, {s['reused']} reused from the state, "
             f"{s['fed']} fed{how}; generated {n} tokens in {end - t0:.2f} s "
             f"({max(n - 1, 0) / max(end - (first or end), 1e-9):.1f} tokens/s); finish: {finish}]")
    return True


def register(sub: Subparsers) -> None:
    p = sub.add_parser("chat", help="a conversation on the terminal (keeps the decoding state between turns)",
                       description="Chat with a model, one message per line on stdin (a terminal or a pipe: "
                                   "printf 'hi\\n/exit\\n' | lfm2np chat). Each turn feeds only the new ids of "
                                   "the conversation rendered with the checkpoint's chat template; the decoding "
                                   "state is kept between turns. /help lists the commands; on a terminal, Ctrl-C "
                                   "stops a reply and keeps the conversation (docs/cli.md).")
    add_model_argument(p, MODEL_HELP + " (the default)", required=False)
    p.add_argument("--system", type=utf8_text, help="a system message")
    add_sampling_arguments(p)
    p.set_defaults(func=_cmd_chat)
