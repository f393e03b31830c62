"""``lfm2np chat``: a conversation through a pipe that keeps the decoding state between turns and answers
exactly as a from-scratch run on the whole conversation; the template's prefix stability and the fallback
when a template rewrites earlier turns; streaming detokenisation (linear, multi-byte safe)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

import lfm2np
from lfm2np.cli.chat import Conversation, common_prefix
from lfm2np.embedded import embedded_model_path
from lfm2np.generate import Generation, Sampling
from lfm2np.io.tokenizer import Tokenizer, render_template

PATH = embedded_model_path()
LFM2_TEMPLATE = (Path(__file__).parent / "data" / "lfm2_chat_template.jinja").read_text(encoding="utf-8")
QUESTIONS = ['What is the "while" statement?', 'What is the "for" statement?', "And the if statement?"]


@pytest.fixture(scope="module")
def model():
    return lfm2np.load(PATH)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir(PATH)


def from_scratch(model, tok, messages, max_new_tokens=64):
    """The reply of a run that reads the whole conversation again (no state kept)."""
    gen = Generation(model, tok.encode_chat(messages), max_new_tokens, Sampling(),
                     tok.stop_ids(model.config.eos_token_id))
    return tok.decode(list(gen), skip_special_tokens=True)


def converse(conversation, questions, max_new_tokens=64):
    stop = conversation.tokenizer.stop_ids(conversation.model.config.eos_token_id)
    replies, stats = [], []
    for q in questions:
        gen = conversation.ask(q, max_new_tokens, Sampling(), stop)
        list(gen)
        replies.append(conversation.record(gen))
        stats.append(dict(conversation.last))
    return replies, stats


def test_chat_through_a_pipe():
    stdin = "\n".join([QUESTIONS[0], QUESTIONS[1], "/reset", QUESTIONS[2], "/exit", "never read"]) + "\n"
    proc = subprocess.run([sys.executable, "-m", "lfm2np", "chat", "--max-new-tokens", "40"], input=stdin,
                          capture_output=True, text=True, cwd="/")
    assert proc.returncode == 0, proc.stderr
    replies = [line.removeprefix("assistant: ") for line in proc.stdout.splitlines() if line.startswith("assistant: ")]
    model, tok = lfm2np.load(PATH), Tokenizer.from_dir(PATH)
    first = [{"role": "user", "content": QUESTIONS[0]}]
    want0 = from_scratch(model, tok, first, 40)
    second = first + [{"role": "assistant", "content": want0}, {"role": "user", "content": QUESTIONS[1]}]
    want = [want0, from_scratch(model, tok, second, 40),
            from_scratch(model, tok, [{"role": "user", "content": QUESTIONS[2]}], 40)]  # after /reset
    assert replies == want and "while" in want[0]
    assert "never read" not in proc.stdout
    turns = [line for line in proc.stderr.splitlines() if line.startswith("[turn")]
    assert len(turns) == 3 and "[conversation reset]" in proc.stderr
    assert " 0 reused" in turns[0] and " 0 reused" not in turns[1] and " 0 reused" in turns[2]


def test_each_turn_feeds_only_the_new_ids_and_answers_as_from_scratch(model, tok):
    fed = []

    class Counting:  # the model, counting the ids each step feeds
        config = model.config

        def __getattr__(self, name):
            return getattr(model, name)

        def step(self, ids, state=None):
            fed.append(len(ids))
            return model.step(ids, state)

    conversation = Conversation(Counting(), tok, system="You explain the Python language.")
    replies, stats = converse(conversation, QUESTIONS)
    messages = [{"role": "system", "content": "You explain the Python language."}]
    for q, reply in zip(QUESTIONS, replies):
        messages.append({"role": "user", "content": q})
        assert reply == from_scratch(model, tok, messages)
        messages.append({"role": "assistant", "content": reply})
    assert all("rolled_back" not in s for s in stats)  # LFM2's template and these replies: nothing re-fed
    # every id the model saw was fed once: the final conversation, not the sum of every turn's rendering
    assert sum(fed) == len(conversation.fed) + (1 if conversation.state.position != len(conversation.fed) else 0)
    assert sum(fed) < sum(s["rendered"] for s in stats)
    assert conversation.fed == tok.encode_chat(messages)[:len(conversation.fed)]


@pytest.mark.parametrize("template", ["embedded", "lfm2"])
def test_lfm2s_template_is_prefix_stable(tok, template):
    """Rendering turns 1..n (with the assistant header) is a prefix of rendering 1..n+1, text and ids."""
    source = tok.chat_template if template == "embedded" else LFM2_TEMPLATE
    messages = [{"role": "system", "content": "Be brief."}]
    previous = None
    for q, a in [("hi", "Hello! How can I help?"), ("what is 2+2?", "4."), ("naïve café?", "✓ 日本語")]:
        messages.append({"role": "user", "content": q})
        text = render_template(source, messages, bos_token="<|startoftext|>")
        ids = tok.encode(text)
        if previous is not None:
            assert text.startswith(previous[0]) and ids[:len(previous[1])] == previous[1]
        previous = (text, ids)
        messages.append({"role": "assistant", "content": a})


def test_a_template_that_rewrites_earlier_turns_falls_back_and_still_answers_as_from_scratch(model, tok):
    """A template that rewrites every earlier reply (as thinking templates strip past reasoning): the state
    goes back to the first id that differs (by rollback, or from the snapshot at the last reply's start),
    and each reply still equals the from-scratch one."""
    rewriting = tok.chat_template.replace(
        '{%- set content = message["content"] -%}',
        '{%- set content = "(a reply)" if message["role"] == "assistant" else message["content"] -%}')
    assert rewriting != tok.chat_template
    other = Tokenizer(tok.backend, rewriting, tok.special, "rewriting template")
    conversation = Conversation(model, other)
    replies, stats = converse(conversation, QUESTIONS, max_new_tokens=40)
    messages = []
    for q, reply in zip(QUESTIONS, replies):
        messages.append({"role": "user", "content": q})
        assert reply == from_scratch(model, other, messages, 40)
        messages.append({"role": "assistant", "content": reply})
    assert all(s["rolled_back"] > 0 and "from_start" not in s for s in stats[1:])
    assert any(s.get("from_snapshot") for s in stats[1:])  # a reply longer than the rollback limit
    prompt = other.encode_chat(messages[:-1])  # the last turn's rendering: the state holds it, then the reply
    assert conversation.fed[:len(prompt)] == prompt


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0 and common_prefix([7], [8]) == 0


def test_a_full_context_is_reported_and_the_chat_goes_on(tmp_path):
    import shutil

    small = tmp_path / "small"
    shutil.copytree(PATH, small)
    config = (small / "config.json").read_text().replace('"max_position_embeddings": 2048',
                                                         '"max_position_embeddings": 24')
    (small / "config.json").write_text(config)
    stdin = "What is " + "the for statement and " * 8 + "the rest?\n/reset\nhi\n"
    proc = subprocess.run([sys.executable, "-m", "lfm2np", "chat", str(small), "--max-new-tokens", "4"],
                          input=stdin, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "lfm2np: warning: the conversation would be" in proc.stderr
    assert "the model's context is 24: /reset to start again" in proc.stderr
    assert proc.stdout.count("assistant: ") == 1  # "hi" was answered


def test_a_line_that_is_not_utf8_is_named_and_skipped_and_the_chat_goes_on():
    stdin = b"\xff\xfe hi\nWhat is a list?\n/exit\n"
    proc = subprocess.run([sys.executable, "-m", "lfm2np", "chat", "--max-new-tokens", "4"], input=stdin,
                          capture_output=True)
    err = proc.stderr.decode()
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert "lfm2np: warning: input line 1 is not valid UTF-8 text" in err
    assert proc.stdout.decode().count("assistant: ") == 1


@pytest.mark.parametrize("length", [(1 << 20) + 1, 5 << 20])  # over the limit; over what one read takes
def test_a_line_too_long_to_be_a_message_is_named_and_skipped(length):
    stdin = b"x" * length + b"\nWhat is a list?\n"
    proc = subprocess.run([sys.executable, "-m", "lfm2np", "chat", "--max-new-tokens", "2"], input=stdin,
                          capture_output=True)
    err = proc.stderr.decode()
    assert proc.returncode == 0 and "lfm2np: warning: input line 1 is longer than 1,048,576 characters" in err
    assert proc.stdout.decode().count("assistant: ") == 1


def test_chat_without_a_standard_input_is_one_line():
    proc = subprocess.run([sys.executable, "-m", "lfm2np", "chat"], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, preexec_fn=lambda: __import__("os").close(0))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == \
        "lfm2np: error: chat reads its messages from standard input, which is closed"


@pytest.mark.parametrize("argv, message", [
    (["chat", "--system", "caf\udce9"], "--system: not valid UTF-8"),
    (["chat", "--top-p", "0"], "--top-p"),
    (["chat", "--min-p", "1.5"], "--min-p"),
    (["chat", "--repetition-penalty", "0"], "--repetition-penalty"),
    (["chat", "/nonexistent"], "not a checkpoint directory"),
])
def test_chat_errors_exit_2_naming_the_argument(argv, message):
    proc = subprocess.run([sys.executable, "-m", "lfm2np", *argv], input="hi\n", capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("lfm2np") and "error:" in last and message in last


# ------------------------------------------------------------------ streaming detokenisation
def test_stream_pieces_join_to_the_decoded_ids_with_characters_split_across_tokens(tok):
    text = "naïve café — ünïcode ✓ 日本語 🙂 <|im_end|> done"
    ids = tok.encode(text)
    split = [i for i in ids if tok.decode([i]).count("\ufffd")]  # tokens that hold part of a character
    assert split, "the text must split characters across tokens"
    for skip in (True, False):
        pieces = list(tok.stream(ids, skip_special_tokens=skip))
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)
        assert all("\ufffd" not in p for p in pieces)
    dangling = tok.encode("ok 🙂")[:-1]  # ends inside the emoji: released at the end, as decode shows it
    assert "".join(tok.stream(dangling)) == tok.decode(dangling)


def test_streaming_is_linear(tok):
    """20k tokens stream in well under a few seconds (re-decoding every prefix took minutes)."""
    ids = tok.encode("The for statement iterates over a sequence: naïve café 日本語 🙂\n" * 700)[:20_000]
    assert len(ids) == 20_000
    t0 = time.perf_counter()
    text = "".join(tok.stream(ids))
    elapsed = time.perf_counter() - t0
    assert text == tok.decode(ids, skip_special_tokens=True)
    assert elapsed < 2.0, f"streaming 20k tokens took {elapsed:.2f} s"
