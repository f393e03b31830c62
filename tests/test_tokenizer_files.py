"""Hostile tokenizer and chat-template files (issue 11): every malformed tokenizer.json, tokenizer_config.json,
chat_template.jinja / .json, every template that fails or runs away while rendering, and a tokenizer larger than
the model, is an Lfm2npError naming the file (and the key), and the CLI prints one line and exits 2.

The base is a copy of the embedded tiny LFM2-MoE checkpoint (lfm2np/data/tiny-lfm2-moe: a real-layout
tokenizer.json of 3072 tokens, its tokenizer_config.json and chat_template.jinja); each case breaks one thing.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

import lfm2np
from lfm2np.cli import main
from lfm2np.embedded import embedded_model_path
from lfm2np.io import chat_template
from lfm2np.io.chat_template import render_template
from lfm2np.io.tokenizer import Tokenizer

CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("base") / "model"
    shutil.copytree(embedded_model_path(), path)
    (path / "generation_config.json").unlink()
    return path


@pytest.fixture
def checkpoint(base, tmp_path) -> Path:
    path = tmp_path / "model"
    shutil.copytree(base, path)
    return path


def _config(path: Path) -> dict:
    return json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))


def _set(key, value):
    def write(path: Path) -> None:
        c = _config(path)
        c[key] = value
        (path / "tokenizer_config.json").write_text(json.dumps(c), encoding="utf-8")
    return write


def _write(name: str, content: "str | bytes"):
    def write(path: Path) -> None:
        (path / name).unlink(missing_ok=True)
        if isinstance(content, bytes):
            (path / name).write_bytes(content)
        else:
            (path / name).write_text(content, encoding="utf-8")
    return write


def _mkdir(name: str):
    def write(path: Path) -> None:
        (path / name).unlink()
        (path / name).mkdir()
    return write


def _template(text: str):
    """The checkpoint's template replaced by ``text`` (chat_template.jinja wins over tokenizer_config.json)."""
    return _write("chat_template.jinja", text)


def _bigger_vocabulary(path: Path) -> None:
    tok = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
    tok["added_tokens"].append({"id": 5000, "content": "<|far|>", "single_word": False, "lstrip": False,
                                "rstrip": False, "normalized": False, "special": True})
    tok["model"]["vocab"]["<|far|>"] = 5000
    (path / "tokenizer.json").write_text(json.dumps(tok), encoding="utf-8")


TC, CT, TJ = "tokenizer_config.json", "chat_template.jinja", "tokenizer.json"
#: case -> (break the checkpoint, what the message must contain; "{path}" is the checkpoint directory)
FILE_CASES = {
    "config not JSON": (_write(TC, "{"), [TC, "corrupt tokenizer config (Expecting"]),
    "config with a key twice": (_write(TC, '{"bos_token": "<|startoftext|>", "bos_token": "<|im_end|>"}'),
                                [TC, "key 'bos_token' appears twice"]),
    "config not UTF-8": (_write(TC, b'{"bos_token": "\xff"}'), [TC, "not UTF-8"]),
    "config a list": (_write(TC, "[]"), [TC, "the top level is a JSON list; expected an object"]),
    "config a number": (_write(TC, "5"), [TC, "the top level is a JSON int"]),
    "config a string": (_write(TC, '"x"'), [TC, "the top level is a JSON str"]),
    "config nested too deep": (_write(TC, "[" * 100000), [TC, "corrupt tokenizer config: JSON nested too deeply"]),
    "config a directory": (_mkdir(TC), [TC, "not a regular file"]),
    "bos_token a number": (_set("bos_token", 5), [TC, "bos_token is a int (5)"]),
    "eos_token a list": (_set("eos_token", ["<|im_end|>"]), [TC, "eos_token is a list"]),
    "pad_token content not str": (_set("pad_token", {"content": 3}), [TC, "pad_token is an object whose 'content' is int"]),
    "bos_token empty": (_set("bos_token", ""), [TC, "bos_token is an empty string"]),
    "bos_token unknown": (_set("bos_token", "<|nope|>"), [TC, "bos_token '<|nope|>' is not a token of tokenizer.json"]),
    "template a number": (_set("chat_template", 42), [TC, "chat_template is a int (42)"]),
    "template a dict": (_set("chat_template", {"default": "x"}), [TC, "chat_template is a dict"]),
    "template list of strings": (_set("chat_template", ["{{ x }}"]), [TC, "chat_template[0] must be an object"]),
    "template list entry without template": (_set("chat_template", [{"name": "default"}]),
                                             [TC, "chat_template[0] must be an object with string 'name' and 'template'"]),
    "template list entry template not str": (_set("chat_template", [{"name": "default", "template": 1}]),
                                             [TC, "chat_template[0]"]),
    "template list without default": (_set("chat_template", [{"name": "tool_use", "template": "a"},
                                                             {"name": "rag", "template": "b"}]),
                                      [TC, "without 'default' (names: 'tool_use', 'rag')"]),
    "jinja not UTF-8": (_write(CT, b"{{ bos_token }}\xc3\x28"), [CT, "not UTF-8 text"]),
    "jinja a directory": (_mkdir(CT), [CT, "not a regular file"]),
    "chat_template.json not an object": (_write("chat_template.json", "[1]"), ["chat_template.json", "the top level"]),
    "chat_template.json template a number": (_write("chat_template.json", '{"chat_template": 3}'),
                                             ["chat_template.json: chat_template is a int"]),
    "tokenizer.json not JSON": (_write(TJ, "{nope"), [TJ, "not a readable tokenizer"]),
    "tokenizer.json not a tokenizer": (_write(TJ, '{"a": 1}'), [TJ, "not a readable tokenizer"]),
    "tokenizer.json not UTF-8": (_write(TJ, b"\xff\xfe{}"), [TJ, "not UTF-8"]),
    "tokenizer.json missing": (lambda p: (p / TJ).unlink(), ["no tokenizer.json"]),
    "tokenizer.json a directory": (_mkdir(TJ), [TJ, "is a directory"]),  # (it said "no tokenizer.json")
    # templates that fail while rendering
    "template renders nothing": (_template("{# nothing #}"), [CT, "renders this conversation as no text at all"]),
    "template syntax error": (_template("{% if %}"), [CT, "chat template syntax error at line 1"]),
    "template undefined": (_template("{{ nothing.here }}"), [CT, "UndefinedError", "'nothing' is undefined"]),
    "template TypeError": (_template("{{ 1 + 'a' }}"), [CT, "TypeError"]),
    "template division by zero": (_template("{{ 1 // 0 }}"), [CT, "ZeroDivisionError"]),
    "template raise_exception": (_template("{{ raise_exception('no system role') }}"), [CT, "no system role"]),
    "template deep recursion": (_template("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}"),
                                [CT, "recursed too deeply"]),
    "template range too big": (_template("{% for i in range(10**9) %}x{% endfor %}"), [CT, "OverflowError"]),
    "template huge repetition": (_template("{{ 'x' * 10**9 }}"), [CT, "repeats a str of 1 1000000000 times"]),
    "template huge power": (_template("{{ 10 ** 1000000 }}"), [CT, "an integer of more than 4096 bits"]),
    "template huge printf width": (_template("{{ '%999999999d' % 1 }}"), [CT, "'%' formatting would make a string"]),
    "template mutates messages": (_template("{{ messages.append(1) }}"), [CT, "SecurityError"]),
    "template reads internals": (_template("{{ ''.__class__.__mro__[1].__subclasses__() }}"),
                                 [CT, "SecurityError: access to attribute '__class__'"]),
    "tokenizer larger than the model": (_bigger_vocabulary, ["the tokenizer has 5001 tokens but the model's "
                                                             "vocabulary is 3072"]),
}
def _load_and_chat(path: Path) -> None:
    tok = Tokenizer.from_dir(path)
    tok.encode_chat(CHAT)
    model = lfm2np.load(path)
    if tok.vocab_size > model.config.vocab_size:  # what the CLI checks before generating
        raise lfm2np.Lfm2npError(f"{path}: the tokenizer has {tok.vocab_size} tokens but the model's vocabulary is "
                                 f"{model.config.vocab_size}")


@pytest.mark.parametrize("case", sorted(FILE_CASES))
def test_broken_tokenizer_files_are_named(checkpoint, case):
    breaks, needles = FILE_CASES[case]
    breaks(checkpoint)
    with pytest.raises(lfm2np.Lfm2npError) as e:
        _load_and_chat(checkpoint)
    message = str(e.value)
    assert message.startswith(str(checkpoint)), message
    for needle in needles:
        assert needle in message, (needle, message)


@pytest.mark.parametrize("case", sorted(FILE_CASES))
def test_the_cli_prints_one_line_and_exits_2(checkpoint, case, capsys):
    breaks, needles = FILE_CASES[case]
    breaks(checkpoint)
    code = main(["generate", str(checkpoint), "--chat", "hi", "--max-new-tokens", "1"])
    out = capsys.readouterr()
    assert code == 2, out
    errors = [line for line in out.err.splitlines() if line.startswith("lfm2np: error: ")]
    assert len(errors) == 1 and out.err.splitlines()[-1] == errors[0] and "Traceback" not in out.err, out.err
    assert needles[-1] in errors[0]


def test_the_checkpoint_itself_is_fine(checkpoint):
    """The base the cases break: loads, chats, and its template is the file's."""
    tok = Tokenizer.from_dir(checkpoint)
    assert tok.template_source == str(checkpoint / "chat_template.jinja")
    assert tok.apply_chat_template(CHAT).startswith("<|startoftext|><|im_start|>user\nhi<|im_end|>")


def test_named_templates_pick_default(checkpoint):
    _set("chat_template", [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ bos_token }}"}])(checkpoint)
    (checkpoint / CT).unlink()
    tok = Tokenizer.from_dir(checkpoint)
    assert tok.apply_chat_template(CHAT) == "D<|startoftext|>"
    assert tok.template_source.endswith("tokenizer_config.json: chat_template")


def test_an_added_token_object_is_a_special_token(checkpoint):
    _set("eos_token", {"__type": "AddedToken", "content": "<|endoftext|>"})(checkpoint)
    assert Tokenizer.from_dir(checkpoint).special["eos_token"] == "<|endoftext|>"


def test_a_template_that_loops_long_is_stopped(monkeypatch):
    """Nested loops of 10^10 iterations: stopped at the time limit, naming the template."""
    t0 = time.perf_counter()
    with pytest.raises(lfm2np.Lfm2npError, match=r"my\.jinja: chat template stopped: it ran for more than 0\.3 s"):
        render_template("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", CHAT,
                        source="my.jinja", max_seconds=0.3)
    assert time.perf_counter() - t0 < 3
    monkeypatch.setattr(chat_template, "MAX_SECONDS", 0.2)  # the default limit is read at each call
    with pytest.raises(lfm2np.Lfm2npError, match="ran for more than 0.2 s"):
        render_template("{% for i in range(100000) %}{% for j in range(100000) %}{{ '' }}{% endfor %}{% endfor %}", CHAT)


def test_a_template_whose_output_runs_away_is_stopped():
    with pytest.raises(lfm2np.Lfm2npError, match="produced more than 1000 characters"):
        render_template("{% for i in range(100000) %}xxxxxxxxxx{% endfor %}", CHAT, max_chars=1000)


def test_rendering_leaves_no_tracer_behind():
    import sys

    assert sys.gettrace() is None
    render_template("{{ bos_token }}", CHAT, bos_token="<s>")
    with pytest.raises(lfm2np.Lfm2npError):
        render_template("{{ 1 // 0 }}", CHAT)
    assert sys.gettrace() is None
