"""``lfm2np chat`` on a terminal, as a person uses it: through a pseudo-terminal (the process's controlling
terminal, so Ctrl-C is the terminal's own SIGINT), with readline's line editing, /help and an unknown command
kept from the model, Ctrl-C that stops a streaming reply and keeps the conversation, Ctrl-C at the prompt
that says how to quit, and Ctrl-D that ends the chat on a new line. In process: the decoding state after a
stopped reply is the state of the history, and a second Ctrl-C abandons the turn."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import termios
import threading
import time

import numpy as np
import pytest
from safetensors.numpy import save_file

import lfm2np
from lfm2np.cli import chat as chat_cli
from lfm2np.cli.chat import Conversation
from lfm2np.cli.terminal import QUIT_HINT
from lfm2np.embedded import embedded_model_path
from lfm2np.generate import Generation, Sampling
from lfm2np.io.tokenizer import Tokenizer

PATH = embedded_model_path()
FOR = 'What is the "for" statement?'
WHILE = 'What is the "while" statement?'


@pytest.fixture(scope="module")
def never_stopping(tmp_path_factory):
    """The embedded model with an untied head whose end-of-turn rows are zero: its greedy replies are the
    embedded model's until it would stop, then go on to --max-new-tokens (a reply long enough to interrupt)."""
    copy = tmp_path_factory.mktemp("never-stopping") / "model"
    shutil.copytree(PATH, copy)
    config = json.loads((copy / "config.json").read_text())
    tok = Tokenizer.from_dir(PATH)
    params = lfm2np.load(PATH).params  # float32, widened from the shipped bf16
    weights = {name: np.ascontiguousarray(params[name]) for name in params}
    head = weights["model.embed_tokens.weight"].copy()
    head[sorted(tok.stop_ids([config["eos_token_id"]]))] = 0.0  # logit 0, below every greedy choice
    save_file({**weights, "lm_head.weight": head}, copy / "model.safetensors")
    (copy / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    return copy


class Terminal:
    """A process on a pseudo-terminal: its stdin, stdout and stderr, and its controlling terminal."""

    def __init__(self, argv: list[str]):
        master, slave = os.openpty()
        env = {**os.environ, "TERM": "dumb", "INPUTRC": os.devnull, "PYTHONIOENCODING": "utf-8"}

        def controlling_terminal():  # after start_new_session's setsid: this terminal's SIGINT reaches us
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True,
                                     start_new_session=True, preexec_fn=controlling_terminal)
        os.close(slave)
        self.master, self.raw, self.lock = master, b"", threading.Lock()
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:  # keep reading, so a long reply never blocks on a full terminal buffer
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:
                return
            if not data:
                return
            with self.lock:
                self.raw += data

    @property
    def text(self) -> str:
        with self.lock:
            raw = self.raw.decode("utf-8", "replace")
        return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[=>]|\r", "", raw)

    def wait_for(self, pattern: str, after: int = 0, timeout: float = 60.0) -> int:
        """The end of the first match of ``pattern`` (a regex) in the output past ``after``."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            m = re.compile(pattern).search(self.text, after)
            if m:
                return m.end()
            if self.proc.poll() is not None and not re.search(pattern, self.text[after:]):
                time.sleep(0.2)  # what is left to read
                m = re.compile(pattern).search(self.text, after)
                if m:
                    return m.end()
                raise AssertionError(f"exited ({self.proc.returncode}) without {pattern!r}:\n{self.text[after:]}")
            time.sleep(0.02)
        raise AssertionError(f"no {pattern!r} within {timeout} s:\n{self.text[after:][-3000:]}")

    def type(self, keys: str) -> None:
        os.write(self.master, keys.encode("utf-8"))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)


def test_chat_on_a_terminal(never_stopping):
    tok = Tokenizer.from_dir(PATH)
    term = Terminal([sys.executable, "-m", "lfm2np", "chat", str(never_stopping), "-n", "1900"])
    try:
        at = term.wait_for(r"/help lists the commands")
        at = term.wait_for(r"user: ", at)
        term.type("/help\r")  # listed, not sent
        at = term.wait_for(r"/reset +forget the conversation", at)
        at = term.wait_for(r"user: ", at)
        term.type("/nonsense words\r")  # refused with a hint, not sent
        at = term.wait_for(r"unknown command '/nonsense', not sent to the model: /help lists the commands", at)
        at = term.wait_for(r"user: ", at)
        assert "assistant:" not in term.text
        # readline's editing: the first letter typed last, after Ctrl-A took the cursor to the start
        term.type(FOR[1:] + "\x01" + FOR[0] + "\r")
        at = term.wait_for(r'assistant: The "for" statement is used to iterate', at)
        term.type("\x03")  # Ctrl-C while the reply streams: it stops, the chat goes on
        at = term.wait_for(r"\[turn 1: conversation (\d+) tokens.*finish: stopped by Ctrl-C; the partial reply "
                           r"stays in the conversation\]", at)
        turn1 = re.findall(r"\[turn 1: conversation (\d+) tokens.*generated (\d+) tokens", term.text)[0]
        assert int(turn1[0]) == len(tok.encode_chat([{"role": "user", "content": FOR}]))  # the edited message
        assert 0 < int(turn1[1]) < 1900  # stopped well before --max-new-tokens
        at = term.wait_for(r"user: ", at)
        term.type(WHILE + "\r")  # the conversation is kept: its ids come from the state
        at = term.wait_for(r"assistant: ", at)
        term.type("\x03")
        at = term.wait_for(r"\[turn 2: conversation (\d+) tokens, (\d+) reused from the state", at)
        turn2 = re.findall(r"\[turn 2: conversation (\d+) tokens, (\d+) reused", term.text)[0]
        assert int(turn2[1]) >= int(turn1[0]) + int(turn1[1]) - 1  # the first turn and its partial reply
        at = term.wait_for(r"user: ", at)
        term.type("\x03")  # Ctrl-C at the prompt: says how to quit, and does not
        at = term.wait_for(re.escape(QUIT_HINT), at)
        at = term.wait_for(r"user: ", at)
        assert term.proc.poll() is None
        term.type("\x04")  # Ctrl-D: ends the chat, on a new line
        assert term.proc.wait(timeout=30) == 0
        time.sleep(0.2)
        assert re.search(r"user: \n?$", term.text) and term.text.endswith("\n"), repr(term.text[-80:])
    finally:
        term.close()


def test_ctrl_c_twice_in_a_row_at_the_prompt_quits():
    term = Terminal([sys.executable, "-m", "lfm2np", "chat"])
    try:
        at = term.wait_for(r"user: ", term.wait_for(r"/help lists the commands"))
        term.type("half a mess")
        term.type("\x03")
        at = term.wait_for(re.escape(QUIT_HINT), at)
        term.wait_for(r"user: ", at)
        term.type("\x03")
        assert term.proc.wait(timeout=30) == 0
    finally:
        term.close()


# ------------------------------------------------------------------------------------- in process
class Interrupting:
    """The model, raising SIGINT (as Ctrl-C does) ``times`` times during its ``at``-th step."""

    def __init__(self, model, at: int, times: int = 1):
        self.model, self.config, self.at, self.times, self.calls = model, model.config, at, times, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def step(self, ids, state=None, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            for _ in range(self.times):
                signal.raise_signal(signal.SIGINT)
        return self.model.step(ids, state, **kwargs)


def _turn(conversation, text, capsys, max_new_tokens=60):
    args = type("Args", (), {"max_new_tokens": max_new_tokens})()
    stop = frozenset(conversation.tokenizer.stop_ids(conversation.model.config.eos_token_id))
    kept = chat_cli._reply(conversation, text, 1, args, Sampling(), stop, np.random.default_rng(0),
                           sys.stdout, interactive=True)
    return kept, capsys.readouterr()


def from_scratch(model, tok, messages, max_new_tokens=60):
    gen = Generation(model, tok.encode_chat(messages), max_new_tokens, Sampling(),
                     tok.stop_ids(model.config.eos_token_id))
    return tok.decode(list(gen), skip_special_tokens=True)


def test_a_stopped_reply_stays_in_the_history_and_the_state_holds_exactly_its_ids(capsys):
    model, tok = lfm2np.load(PATH), Tokenizer.from_dir(PATH)
    slow = Interrupting(model, at=6)  # the prefill, then the 5th token's step
    conversation = Conversation(slow, tok)
    kept, out = _turn(conversation, FOR, capsys)
    assert kept and "stopped by Ctrl-C" in out.err
    partial = conversation.messages[-1]["content"]
    full = from_scratch(model, tok, [{"role": "user", "content": FOR}])
    assert partial and full.startswith(partial) and len(partial) < len(full)
    # the state holds the prompt and every generated id but the last (generated, not yet fed)
    prompt = tok.encode_chat(conversation.messages[:1])
    n = int(re.search(r"generated (\d+) tokens", out.err).group(1))
    assert conversation.state.position == len(conversation.fed) == len(prompt) + n - 1
    assert conversation.fed[:len(prompt)] == prompt and partial.startswith(tok.decode(conversation.fed[len(prompt):]))
    # the next reply is the one a from-scratch run on the history (partial reply included) gives
    slow.at = 0
    kept, out = _turn(conversation, WHILE, capsys)
    messages = [{"role": "user", "content": FOR}, {"role": "assistant", "content": partial},
                {"role": "user", "content": WHILE}]
    assert conversation.messages[-1]["content"] == from_scratch(model, tok, messages)
    assert "while" in conversation.messages[-1]["content"]


def test_a_second_ctrl_c_abandons_the_turn(capsys):
    model, tok = lfm2np.load(PATH), Tokenizer.from_dir(PATH)
    conversation = Conversation(Interrupting(model, at=10**9), tok)
    kept, _ = _turn(conversation, FOR, capsys)
    before = conversation.saved()
    conversation.model.at, conversation.model.calls = 3, 0  # a second Ctrl-C during one step
    conversation.model.times = 2
    kept, out = _turn(conversation, WHILE, capsys)
    assert not kept and "[reply abandoned: the conversation is as it was before this message]" in out.err
    after = conversation.saved()
    assert after[0] == before[0] and after[1] == before[1] and after[2] is before[2]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back


def test_terminal_lines_skip_what_cannot_be_a_message_and_end_on_ctrl_d(monkeypatch):
    import io

    from lfm2np.cli.terminal import terminal_lines

    typed = iter([KeyboardInterrupt, "x" * 11, "caf\udce9", "hello", KeyboardInterrupt, "again", EOFError])

    def fake_input(prompt):
        key = next(typed)
        if isinstance(key, type) and issubclass(key, BaseException):
            raise key
        return key

    monkeypatch.setattr("builtins.input", fake_input)
    out, warned = io.StringIO(), []
    assert list(terminal_lines(out, warned.append, max_chars=10)) == ["hello", "again"]
    assert warned[0] == QUIT_HINT and warned[3] == QUIT_HINT  # Ctrl-C once at a time: a hint, not the end
    assert "input line 1 is longer than 10 characters" in warned[1]
    assert "input line 2 is not valid UTF-8 text" in warned[2]
    assert out.getvalue() == "\n\n\n"  # after each Ctrl-C, and after Ctrl-D: the shell's prompt on its own line


def test_from_a_pipe_ctrl_c_ends_the_chat():
    model, tok = lfm2np.load(PATH), Tokenizer.from_dir(PATH)
    conversation = Conversation(Interrupting(model, at=3), tok)
    args = type("Args", (), {"max_new_tokens": 60})()
    stop = frozenset(tok.stop_ids(model.config.eos_token_id))
    with pytest.raises(KeyboardInterrupt):
        chat_cli._reply(conversation, FOR, 1, args, Sampling(), stop, np.random.default_rng(0), sys.stdout,
                        interactive=False)
