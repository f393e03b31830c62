"""The embedded tiny model: tokenizer, chat format and generation against what transformers produced
when it was trained (lfm2np/data/tiny-lfm2-moe/training.json), and the demo / generate commands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import lfm2np
from lfm2np.embedded import embedded_model_path, layer_walk
from lfm2np.generate import Generation, Sampling
from lfm2np.io.tokenizer import Tokenizer, format_chat
from lfm2np.oracle.trace import record

PATH = embedded_model_path()
TRAINING = json.loads((PATH / "training.json").read_text())
SAMPLES = TRAINING["samples"]


@pytest.fixture(scope="module")
def model():
    return lfm2np.load(PATH)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir(PATH)


def test_it_is_small_and_an_lfm2_moe(model):
    c = model.config
    assert c.is_moe and c.conv_layers and c.attention_layers and c.moe_layers
    size = sum(p.stat().st_size for p in PATH.iterdir())
    assert size < 8 * 2**20
    assert TRAINING["results"]  # the training run recorded its losses


def test_load_takes_the_name_embedded_as_every_command_does(model, tmp_path, monkeypatch):
    """``lfm2np.load("embedded")`` and ``load_config("embedded")`` mean the shipped model, as MODEL does on the
    command line; a path object or ``./embedded`` stays a path (a directory of that name is still reachable)."""
    ids = [1, 6, 42, 7]
    np.testing.assert_array_equal(lfm2np.load("embedded").forward(ids), model.forward(ids))
    assert lfm2np.load_config("embedded").to_dict() == model.config.to_dict()
    monkeypatch.chdir(tmp_path)
    for path in (Path("embedded"), "./embedded"):
        with pytest.raises(lfm2np.Lfm2npError, match="embedded"):
            lfm2np.load(path)


def test_special_tokens_are_lfm2s(tok):
    expected = ["<|pad|>", "<|startoftext|>", "<|endoftext|>", "<|fim_pre|>", "<|fim_mid|>", "<|fim_suf|>",
                "<|im_start|>", "<|im_end|>", "<|tool_list_start|>", "<|tool_list_end|>", "<|tool_call_start|>",
                "<|tool_call_end|>", "<|tool_response_start|>", "<|tool_response_end|>"]
    assert [tok.token_to_id(t) for t in expected] == list(range(14))
    assert tok.stop_ids() == {7, 2}


@pytest.mark.parametrize("text", ["The while statement.", "naïve café — ünïcode ✓ 日本語", "  spaces\n\ttabs\n",
                                  "<|im_start|>user\nhi<|im_end|>"])
def test_encode_decode_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode(text, add_bos=True) == [1, *ids]


def test_special_tokens_in_text_become_their_ids(tok):
    assert tok.encode("<|im_start|>user")[0] == 6


@pytest.mark.parametrize("sample", [s for s in SAMPLES if s["kind"] == "chat"], ids=lambda s: s["mode"])
def test_chat_prompt_equals_what_transformers_rendered(tok, sample):
    messages = []
    body = sample["prompt"]
    assert body.startswith("<|startoftext|>")
    for turn in body[len("<|startoftext|>"):].split("<|im_start|>")[1:]:
        role, _, content = turn.partition("\n")
        if content:
            messages.append({"role": role, "content": content.removesuffix("<|im_end|>\n")})
    assert tok.apply_chat_template(messages) == sample["prompt"]  # the checkpoint's own template (jinja2)
    assert tok.apply_chat_template(messages, use_builtin=True) == sample["prompt"]  # the built-in format
    assert format_chat(messages) == sample["prompt"]
    assert tok.encode_chat(messages) == sample["prompt_ids"]


@pytest.mark.parametrize("sample", [s for s in SAMPLES if s["mode"] == "greedy"],
                         ids=lambda s: f"{s['kind']}-{s['prompt'][-20:]!r}")
def test_greedy_generation_equals_transformers(model, tok, sample):
    ids = tok.encode(sample["prompt"], add_bos=sample["kind"] == "plain")
    assert ids == sample["prompt_ids"]
    gen = Generation(model, ids, len(sample["new_ids"]), Sampling(), tok.stop_ids(model.config.eos_token_id))
    out = list(gen)
    ref = sample["new_ids"]
    if ref[-1] in tok.stop_ids():
        assert out == ref[:-1] and gen.finish_reason == "stop" and gen.stop_id == ref[-1]
    else:
        assert out == ref and gen.finish_reason == "length"
    assert tok.decode(ref) == sample["text"]


def test_streaming_text_equals_the_decoded_whole(tok):
    ids = tok.encode("naïve café — ünïcode ✓ 日本語 and more")
    pieces = list(tok.stream(ids))
    assert "".join(pieces) == tok.decode(ids)
    assert all("\ufffd" not in p for p in pieces)


def test_layer_walk_names_each_layer_and_the_chosen_experts(model, tok):
    ids = tok.encode("The for statement", add_bos=True)
    table = layer_walk(model, tok, ids)
    lines = table.splitlines()
    assert len(lines) == 2 + len(ids)
    assert "L2 attn" in lines[0] and "L0 conv" in lines[0] and "MoE" in lines[1] and "dense" in lines[1]
    _, trace = record(model, ids)
    first_moe = model.config.moe_layers[0]
    chosen = ",".join(str(e) for e in sorted(trace[f"model.layers.{first_moe}.feed_forward.selected_experts"][-1]))
    assert chosen in lines[-1].split()
    # showing fewer rows still runs the whole sequence: the experts are those chosen in context
    assert layer_walk(model, tok, ids, last=2).splitlines()[2:] == lines[-2:]


def run(*args):
    return subprocess.run([sys.executable, "-m", "lfm2np", *args], capture_output=True, text=True)


def test_demo_command():
    proc = run("demo")
    assert proc.returncode == 0, proc.stderr
    chat = next(s for s in SAMPLES if s["kind"] == "chat" and s["mode"] == "greedy" and "while" in s["prompt"])
    assert f"assistant: {chat['text'].removesuffix('<|im_end|>')}" in proc.stdout
    assert "the walk through the layers" in proc.stdout and "L2 attn" in proc.stdout
    assert "tokens/s" in proc.stderr and "finish: stop" in proc.stderr


def test_generate_command_with_a_prompt_and_with_chat():
    plain = next(s for s in SAMPLES if s["kind"] == "plain" and s["mode"] == "greedy")
    proc = run("generate", str(PATH), "--prompt", plain["prompt"], "--max-new-tokens", str(len(plain["new_ids"])))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip("\n") == plain["text"].rstrip("\n") or proc.stdout.startswith(plain["text"][:40])
    proc = run("generate", str(PATH), "--chat", 'Tell me about the "for" statement.', "--system",
               "You are a helpful assistant that explains the Python language.")
    chat = next(s for s in SAMPLES if s["kind"] == "chat" and s["mode"] == "greedy" and "for" in s["prompt"])
    assert proc.stdout.strip() == chat["text"].removesuffix("<|im_end|>").strip()
    sampled = [run("generate", str(PATH), "--prompt", "The", "--temperature", "1.0", "--seed", str(s),
                   "--max-new-tokens", "12").stdout for s in (5, 5, 6)]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]


@pytest.mark.parametrize("argv, message", [
    (["generate", "/nonexistent", "--prompt", "x"], "not a checkpoint directory"),
    (["generate", str(PATH), "--prompt", "x", "--top-p", "0"], "top_p"),
    (["generate", "org/not-cached", "--prompt", "x"], "not in the Hugging Face cache"),
])
def test_generate_errors_are_one_line(argv, message):
    proc = run(*argv)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_the_embedded_model_agrees_with_its_bf16_emulation_argmax(model, tok):
    """The checkpoint is bf16: float32 and the bf16 emulation pick the same greedy tokens on a chat prompt."""
    ids = tok.encode_chat([{"role": "user", "content": 'What is the "while" statement?'}])
    b = lfm2np.load(PATH, dtype="bfloat16")
    assert (np.argmax(b.forward(ids), -1) == np.argmax(model.forward(ids), -1)).mean() > 0.8
