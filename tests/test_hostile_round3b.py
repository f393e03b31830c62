"""Hostile inputs, a fresh hunt over every entry point (issue 23's "done when"): the classes it found, each held by
tests of the class.

- values a message shows: nested thousands deep, integers of thousands of digits, megabytes of text, given from
  Python (a config dict, a State, Sampling, the tokenizer): the message itself raised RecursionError or ValueError;
- public functions given what they do not take: a traceback, or a silent wrong result (an embedding row of id -1, a
  layer -1, a negative prefill_chunk leaving logits uninitialised, a glob string read per character);
- outputs that are inputs under another name (a hard link): a trace's summary overwrote the checkpoint's config;
  write_golden into the model's own directory overwrote its weights;
- a MODEL that is empty (the current directory), and files that exist but are not regular files, told as missing.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import lfm2np
import lfm2np.embedded
from lfm2np import Lfm2npError
from lfm2np.cli import main
from lfm2np.state import ConvState, KVState, State
from lfm2np.synthetic import random_params

TINY_DENSE = lfm2np.load_config("tiny-dense")
TINY_MOE = lfm2np.load_config("tiny-moe")


def refused(action, *needles: str) -> str:
    with pytest.raises(Lfm2npError) as err:
        action()
    message = str(err.value)
    assert "\n" not in message, message
    assert len(message) < 1000, message[:2000]
    missing = [n for n in needles if n not in message]
    assert not missing, f"message does not name {missing}: {message}"
    return message


def cli_refuses(capsys, argv: list[str], *needles: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("lfm2np: error: "), err
    assert "Traceback" not in err
    missing = [n for n in needles if n not in lines[-1]]
    assert not missing, f"message does not name {missing}: {lines[-1]}"
    return lines[-1]


def nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


HUGE = 10**5000  # Python refuses to write an integer of more than 4300 digits as text
DEEP = nested(100_000)  # repr recurses past any recursion limit


@functools.lru_cache(maxsize=None)
def moe_model() -> lfm2np.Model:
    return lfm2np.Model(TINY_MOE, random_params(TINY_MOE, seed=3))


# ======================================================================== values a message shows
def test_shown_is_bounded_and_never_raises():
    from lfm2np.errors import shown

    class Broken:
        def __repr__(self):
            raise RuntimeError("no repr")

    for value in (HUGE, -HUGE, DEEP, [HUGE], {"a": DEEP}, "x" * 10**6, Broken(), np.zeros((1000, 1000))):
        text = shown(value)
        assert len(text) <= 80 and "\n" not in text
    assert shown(HUGE) == "<an integer of 5001 digits>"
    assert shown("lfm2") == "'lfm2'" and shown(1.5) == "1.5" and shown(None) == "None"


CONFIG_VALUES = {
    "vocab_size": (HUGE, "vocab_size"), "head_dim": (HUGE, "head_dim"), "num_dense_layers": (HUGE, "num_dense_layers"),
    "num_hidden_layers": (HUGE, "num_hidden_layers"), "eos_token_id": (HUGE, "eos_token_id"),
    "bos_token_id": (HUGE, "bos_token_id"), "pad_token_id": (10**400, "pad_token_id"),
    "model_type": (DEEP, "model_type"), "layer_types": ([DEEP] * 4, "layer_types[0]"),
    "rope_parameters": ({"rope_type": DEEP}, "rope_parameters.rope_type"),
    "full_attn_idxs": ([HUGE], "full_attn_idxs"),
}


@pytest.mark.parametrize("field", list(CONFIG_VALUES))
def test_config_dicts_with_values_no_message_can_write_in_full(field):
    """From Python a config may hold what no JSON file can (JSON stops at 4300 digits and ~1000 levels): the
    message showing it raised ValueError or RecursionError instead of naming the field."""
    value, needle = CONFIG_VALUES[field]
    d = {**TINY_MOE.to_dict(), field: value}
    if field == "full_attn_idxs":
        d.pop("layer_types")
    refused(lambda: lfm2np.load_config(d), needle)


def test_lfm3_rope_entries_and_dtype_spellings_deep_or_huge():
    d = {"model_type": "lfm3", "vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 2,
         "num_key_value_heads": 1, "intermediate_size": 64, "head_dim": 32, "eos_token_id": 2, "bos_token_id": 1,
         "pad_token_id": 0}
    refused(lambda: lfm2np.load_config({**d, "rope_parameters": {"full_attention": DEEP}}),
            "rope_parameters.full_attention")
    refused(lambda: lfm2np.load_config({**d, "rope_parameters": {"full_attention": {"rope_type": DEEP},
                                                                 "sliding_attention": {}}}), "rope_type")
    refused(lambda: lfm2np.load_config({**d, "rope_parameters": {"full_attention": {HUGE: 1},
                                                                 "sliding_attention": {}}}), "full_attention")
    refused(lambda: lfm2np.Model(TINY_DENSE, random_params(TINY_DENSE), dtype=DEEP), "dtype")


def test_sampling_tokenizer_state_and_budget_values_no_message_can_write_in_full(tmp_path):
    from lfm2np.generate import Sampling, generate
    from lfm2np.io.tokenizer import Tokenizer

    model = moe_model()
    for field in ("temperature", "top_k", "seed"):
        refused(lambda: Sampling(**{field: HUGE}), field)
        refused(lambda: Sampling(**{field: DEEP}), field)
    refused(lambda: generate(model, [1, 2], 2, stop_ids=[HUGE]), "stop id")
    refused(lambda: generate(model, [1, 2], 2, stop_ids=DEEP), "stop id")
    tok = Tokenizer.load(lfm2np.embedded.embedded_model_path())
    refused(lambda: tok.decode([HUGE]), "decode")
    refused(lambda: tok.decode(DEEP), "decode")
    refused(lambda: list(tok.stream([HUGE])), "stream")
    refused(lambda: tok.apply_chat_template([{"role": DEEP, "content": "x"}]), "role")
    refused(lambda: tok.apply_chat_template([{"content": DEEP}]), "message 0")
    refused(lambda: tok.apply_chat_template([{"role": HUGE, "content": "x"}]), "role")
    _, state = model.step([1, 2, 3])
    refused(lambda: state.replace(position=HUGE), "position")
    refused(lambda: state.replace(max_rollback=HUGE), "max_rollback")
    refused(lambda: state.rollback(HUGE), "roll back")
    refused(lambda: state.conv_window(HUGE), "layer")
    refused(lambda: lfm2np.load("embedded", memory_budget=HUGE), "memory budget")


# ============================================================================ the Model's and State's API
def test_model_pieces_refuse_what_the_forward_pass_refuses():
    """embed(-1) (now embed_tokens) gave the last row, layer_weights(-1) the last layer, and out-of-range or odd arguments an
    IndexError, a TypeError, a StopIteration (rope of a kind the model lacks) or a ValueError."""
    model = moe_model()
    for embed in (model.embed_tokens, model.embed):  # the token rows, and the pooled embeddings of the same ids
        refused(lambda: embed(np.array([-1])), "token id -1")
        refused(lambda: embed(np.array([10**6])), "token id 1000000")
        refused(lambda: embed(np.array([1.5])), "integers")
        refused(lambda: embed("ab"), "integers")
    np.testing.assert_array_equal(model.embed_tokens([1, 2]), model.params["model.embed_tokens.weight"][[1, 2]])
    for i in (-1, TINY_MOE.num_hidden_layers, 1.5, "1", True):
        refused(lambda: model.layer_weights(i), "layer", f"{TINY_MOE.num_hidden_layers} layers")
    for kind in ("bogus", "conv", None):
        refused(lambda: model.rope(np.arange(3), kind), "rope: kind", "full_attention")
    for positions, needle in ((np.array([-5]), "-5"), (np.array([1.5]), "float64"), ("abc", "positions"),
                              (np.zeros((2, 2), int), "(2, 2)"), ([10**30], "positions"), ([[1], [2, 3]], "positions")):
        refused(lambda: model.rope(positions), needle)
    cos, sin = model.rope(np.arange(4))
    assert cos.shape == sin.shape == (4, TINY_MOE.head_dim)


def test_a_negative_prefill_chunk_is_refused_not_left_uninitialised():
    """prefill_chunk -1 made forward() return np.empty's garbage: range(0, T, -1) ran no chunk."""
    model = lfm2np.Model(TINY_DENSE, random_params(TINY_DENSE, seed=2))
    ids = np.arange(1, 9)
    want = model.forward(ids)
    for chunk in (-1, 2.5, "8", True):
        model.prefill_chunk = chunk
        refused(lambda: model.forward(ids), "prefill_chunk")
    model.prefill_chunk = 3
    np.testing.assert_allclose(model.forward(ids), want, rtol=1e-5, atol=1e-5)


def test_params_with_odd_keys_or_masks_and_weights_of_another_layout():
    params = random_params(TINY_DENSE, seed=2)
    for key in (5, (1, 2), None):
        refused(lambda: lfm2np.Model(TINY_DENSE, {**params, key: np.zeros(3)}), "params", "key")
    masked = np.ma.masked_array(params["model.embedding_norm.weight"], mask=True)
    refused(lambda: lfm2np.Model(TINY_DENSE, {**params, "model.embedding_norm.weight": masked}),
            "model.embedding_norm.weight", "masked")
    refused(lambda: lfm2np.Model(TINY_DENSE, params, strict="no"), "strict")
    long_name = "x" * 10**6
    message = refused(lambda: lfm2np.Model(TINY_DENSE, {**params, long_name: np.zeros(3)}), "not used")
    assert len(message) < 400
    moe = moe_model()
    refused(lambda: lfm2np.Model(TINY_DENSE, moe.params), "weights", "missing tensor")  # a KeyError in the forward


def test_hand_built_states_are_bounded_and_are_values():
    model = moe_model()
    _, state = model.step([1, 2, 3, 4])
    layers = list(state.layers)
    # conv_window allocated (L-1) x D for any conv_L_cache: 10**12 asked for hundreds of terabytes
    refused(lambda: State(4, layers, 10**12), "conv_L_cache", "1..1024")
    refused(lambda: State(4, layers, 3, numerics=5), "numerics")
    attention = TINY_MOE.attention_layers[0]
    kv = layers[attention]
    refused(lambda: State(4, [*layers[:attention], KVState(kv.keys, kv.values, HUGE), *layers[attention + 1:]], 3),
            "window")
    refused(lambda: State.start(5), "Config")
    refused(lambda: State.start(TINY_MOE, dtype="bogus"), "dtype")
    refused(lambda: State.start(TINY_MOE, dtype=object), "dtype")
    # a state is a value: the caller's arrays, written after it was built, do not change it
    conv = next(i for i, s in enumerate(layers) if isinstance(s, ConvState))
    history = np.array(layers[conv].history)
    built = State(4, [*layers[:conv], ConvState(history), *layers[conv + 1:]], 3)
    want = model.step([5], built)[0]
    history[:] = 1e3
    np.testing.assert_array_equal(model.step([5], built)[0], want)


def test_an_empty_model_name_is_refused_not_read_as_the_current_directory(tmp_path, capsys, monkeypatch):
    shutil.copytree(lfm2np.embedded.embedded_model_path(), tmp_path / "ck")
    monkeypatch.chdir(tmp_path / "ck")  # an empty name loaded the checkpoint in the current directory
    for name in ("", "  "):
        refused(lambda: lfm2np.load(name), "empty")
        refused(lambda: lfm2np.load_config(name), "empty")
    for argv in (["forward", ""], ["params", ""], ["forward", "-m", ""], ["memory", " "], ["chat", ""],
                 ["perplexity", "", "x.txt"]):
        cli_refuses(capsys, argv, "empty model name")
    assert lfm2np.load(".").config.vocab_size > 0  # the current directory, when that is what is meant


def test_load_flags_are_booleans():
    refused(lambda: lfm2np.load("embedded", strict="yes"), "strict")
    refused(lambda: lfm2np.load("embedded", keep_weights="no"), "keep_weights")  # "no" kept every tensor


# ==================================================================== outputs that are inputs under another name
@pytest.fixture()
def checkpoint(tmp_path) -> Path:
    """A copy of the embedded model (tokenizer included), and its files' fingerprints."""
    path = shutil.copytree(lfm2np.embedded.embedded_model_path(), tmp_path / "ck")
    return path


def fingerprints(directory: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(directory.iterdir()) if f.is_file()}


@pytest.mark.parametrize("linked", ["config.json", "model.safetensors", "tokenizer.json"])
def test_a_hard_link_to_a_checkpoint_file_is_never_an_output(tmp_path, capsys, checkpoint, linked):
    """`trace CK --out t --force` with t.json a hard link to CK/config.json rewrote the checkpoint's config (the
    paths differ, the file is the same)."""
    before = fingerprints(checkpoint)
    stem = tmp_path / "t"
    target = stem.with_suffix(".json" if linked.endswith(".json") else ".safetensors")
    os.link(checkpoint / linked, target)
    cli_refuses(capsys, ["trace", str(checkpoint), "--out", str(stem), "--force", "--ids", "1", "2"], str(target),
                "reads")
    golden = tmp_path / "golden"
    golden.mkdir()
    os.link(checkpoint / linked, golden / ("manifest.json" if linked.endswith(".json") else "model.safetensors"))
    cli_refuses(capsys, ["golden", str(checkpoint), "--out", str(golden), "--force", "--ids", "1", "2"],
                str(golden), "reads")
    assert fingerprints(checkpoint) == before


def test_write_golden_never_writes_into_the_directory_its_model_reads(tmp_path, checkpoint):
    """write_golden(lfm2np.load(CK), ids, CK) replaced CK/model.safetensors (the weights the model was still reading)
    with the golden logits."""
    from lfm2np.oracle.golden import write_golden

    before = fingerprints(checkpoint)
    holder = tmp_path / "holder"
    holder.mkdir()
    os.link(checkpoint / "model.safetensors", holder / "model.safetensors")  # (before loading: a new link is a change)
    model = lfm2np.load(checkpoint)
    for out in (checkpoint, checkpoint / "golden", tmp_path / "link"):
        if out.name == "link":
            out.symlink_to(checkpoint)
        refused(lambda: write_golden(model, [1, 2], out), "the model reads")
    refused(lambda: write_golden(model, [1, 2], holder), "model.safetensors", "the model reads")
    assert fingerprints(checkpoint) == before
    assert (write_golden(model, [1, 2], tmp_path / "elsewhere") / "manifest.json").is_file()


# ========================================================== traces, sampling, the tokenizer: arguments checked
def test_record_patterns_one_glob_is_one_glob():
    """record(model, ids, "model.layers.0.*") matched per character: its "*" recorded every intermediate."""
    from lfm2np.oracle.trace import record

    model = moe_model()
    _, layer0 = record(model, [1, 2], "model.layers.0.*")
    _, listed = record(model, [1, 2], ["model.layers.0.*"])
    _, everything = record(model, [1, 2])
    assert layer0.names() == listed.names() and 0 < len(layer0) < len(everything)
    assert all(n.startswith("model.layers.0.") for n in layer0.names())
    for patterns, needle in ((5, "patterns is 5"), ([5], "holds 5"), ([None], "holds None"), ([["x"]], "holds")):
        refused(lambda: record(model, [1, 2], patterns), needle)
    refused(lambda: record(5, [1, 2]), "record", "Model")
    from lfm2np.oracle.trace import hidden_states
    refused(lambda: hidden_states(model, [1, 2], final_norm="no"), "final_norm")
    refused(lambda: hidden_states(None, [1, 2]), "hidden_states", "Model")


def test_trace_values_and_paths_refused_before_anything_is_written(tmp_path):
    from lfm2np.oracle.trace import Trace

    for tensors, needle in (({"x": "abc"}, "'x'"), ({"x": np.array([1j])}, "complex"), ({5: np.zeros(2)}, "5"),
                            ({"x": None}, "'x'"), ([1, 2], "dict")):
        refused(lambda: Trace(tensors), needle)
    for meta in ({"a": float("nan")}, {"a": {1}}, {"a": DEEP}):
        out = tmp_path / "t"
        refused(lambda: Trace({"x": np.zeros(2)}, meta).save(out), "meta", "strict JSON")
        assert not list(tmp_path.iterdir())  # a NaN made the summary fail after the tensors were written
    (tmp_path / "s.json").mkdir()
    refused(lambda: Trace({"x": np.zeros(2)}).save(tmp_path / "s"), "s.json", "summary")  # IsADirectoryError
    for path in (5, "", None):
        refused(lambda: Trace({"x": np.zeros(2)}).save(path), "trace path")
        refused(lambda: Trace.load(path), "trace path")
    assert Trace({"x": np.float32(1)}).save(tmp_path / "scalar").is_file()


def test_choosing_a_token_from_logits_no_token_can_come_from():
    """sample() with NaN logits chose id 0 (greedy) or raised IndexError; +inf had probability 0; 2-D or empty
    logits an IndexError; a seen id past int64 an OverflowError."""
    from lfm2np.generate import Sampling, probabilities, process_logits, sample, sampling_for

    rng = np.random.default_rng(0)
    for logits, needle in ((np.full(5, np.nan), "nan at id 0"), (np.array([0.0, np.inf, 1.0]), "inf at id 1"),
                           (np.full(5, -np.inf), "-inf everywhere"), (np.zeros((2, 5)), "(2, 5)"),
                           (np.zeros(0), "(0,)"), ("abc", "<U3")):
        for sampling in (Sampling(), Sampling(temperature=1.0)):
            refused(lambda: sample(logits, sampling, rng), needle)
        refused(lambda: probabilities(logits, Sampling(temperature=1.0)), needle)
    z = np.array([0.0, 1.0, -np.inf])
    assert sample(z, Sampling(), rng) == 1 and probabilities(z, Sampling(temperature=1.0))[2] == 0
    assert sample(z, Sampling(repetition_penalty=2.0), rng, seen=[HUGE, 5]) == 1  # ids no row has are not seen
    refused(lambda: process_logits(z, Sampling(repetition_penalty=2.0), seen=["a"]), "seen")
    refused(lambda: process_logits(z, "greedy"), "Sampling")
    refused(lambda: sampling_for([("temperature", 1.0)]), "defaults")


def test_generation_perplexity_and_decode_take_ordered_ids_and_a_model():
    """A set or a dict was taken for a prompt (its keys, in hash order) without a word."""
    from lfm2np.evaluate import perplexity
    from lfm2np.generate import Generation, generate
    from lfm2np.io.tokenizer import Tokenizer

    model = moe_model()
    for ids in ({1, 2}, {1: 2}):
        refused(lambda: generate(model, ids, 2), "no order")
        refused(lambda: Generation(model, [1], 2, context_ids=ids), "no order")
        refused(lambda: perplexity(model, ids), "no order")
    for fn in (lambda: generate(5, [1, 2], 2), lambda: Generation("model", [1], 2), lambda: perplexity(None, [1, 2])):
        refused(fn, "Model")
    tok = Tokenizer.load(lfm2np.embedded.embedded_model_path())
    for ids in ({1, 2}, {1: 2}):
        refused(lambda: tok.decode(ids), "decode")
        refused(lambda: tok.stop_ids(ids), "stop_ids")
    refused(lambda: tok.stop_ids([2**63]), "stop_ids")


def test_the_tokenizer_api_with_values_its_formats_cannot_hold():
    from lfm2np.io.tokenizer import Tokenizer, format_chat

    tok = Tokenizer.load(lfm2np.embedded.embedded_model_path())
    for path in (5, None, ""):
        refused(lambda: Tokenizer.load(path), "Tokenizer.load")
    refused(lambda: tok.token_to_id("\ud800"), "token_to_id", "surrogate")
    user = [{"role": "user", "content": "hi"}]
    for content in ({1, 2}, b"x", object(), DEEP, HUGE, {(1, 2): 3}):  # TypeError, RecursionError, ValueError
        refused(lambda: tok.apply_chat_template([{"role": "user", "content": content}], use_builtin=True),
                "message 0's content", "JSON")
    refused(lambda: tok.apply_chat_template(user, tools=[{"a": {1}}], use_builtin=True), "tools[0]", "JSON")
    for flag in ("add_generation_prompt", "use_builtin"):
        refused(lambda: tok.apply_chat_template(user, **{flag: "no"}), flag)
    refused(lambda: format_chat(user, bos_token=5), "bos_token")
    assert tok.apply_chat_template(user, use_builtin=True) == format_chat(user)


# ============================================================== calculators, Port, schema and dumps from Python
def test_calculators_refuse_what_is_no_config_size_or_name():
    """Every calculator took anything for a config (AttributeError), a format or a cache type (a str() of it: a
    ValueError for a huge integer, RecursionError for a deep list); max_context compared a str budget (TypeError)
    and took NaN for 0; flops overflowed a float for a huge context; format_bytes raised on NaN or huge integers."""
    from lfm2np import calc

    c = lfm2np.load_config("LFM2-350M")
    for fn in (calc.param_counts, calc.param_breakdown, calc.attention_only, lambda x: calc.flops(x, 10),
               lambda x: calc.memory(x), lambda x: calc.weight_bytes(x), lambda x: calc.kv_cache_bytes(x, 10),
               lambda x: calc.conv_state_bytes(x), lambda x: calc.compute_buffer_bytes(x),
               lambda x: calc.kv_bytes_per_token(x), lambda x: calc.hybrid_savings(x), lfm2np.trace_names,
               lfm2np.expected_tensors):
        for config in (5, None, "LFM2-350M"):
            refused(lambda: fn(config), "Config")
    for value in (HUGE, DEEP, 5, None):
        refused(lambda: calc.weight_bytes(c, value), "format")
        refused(lambda: calc.kv_bytes_per_token(c, value), "KV cache type")
        refused(lambda: calc.parse_bytes(value) if value != 5 else calc.parse_bytes(-5), "not a size")
    for context in (HUGE, 2**63, 0):
        refused(lambda: calc.flops(c, context), "context")
        refused(lambda: calc.memory(c, context=context), "context")
    for budget in ("8G", None, float("nan"), -1, 1.5, [1]):
        refused(lambda: calc.max_context(c, "Q4_K_M", budget), "budget")
    refused(lambda: calc.hybrid_savings(c, 4096), "contexts")
    for n in (float("nan"), "x", None):
        refused(lambda: calc.format_bytes(n), "format_bytes")
    assert calc.format_bytes(HUGE) == "<an integer of 5001 digits> B"
    assert calc.format_bytes(1234567890) == "1.23 GB (1.15 GiB)"


def test_port_switches_are_checked_where_they_silently_did_nothing_or_raised():
    """Port(layers=(99,)) on a 4-layer model, experts=(99,), output_gate='no' (true) and router_scaling=None (false)
    ran silently; rope_theta='x', attention_scale='x' and conv_restart=1.5 raised TypeError or ValueError."""
    from lfm2np.oracle.port import Port, run

    model = moe_model()
    for switches, needle in (({"rope_theta": "x"}, "rope_theta"), ({"rope_theta": -1.0}, "rope_theta"),
                             ({"attention_scale": float("inf")}, "attention_scale"),
                             ({"conv_restart": 1.5}, "conv_restart"), ({"conv_restart": 0}, "conv_restart"),
                             ({"output_gate": "no"}, "output_gate"), ({"router_scaling": None}, "router_scaling")):
        refused(lambda: Port(**switches), needle)
    for switches, needle in (({"layers": (99,)}, "Port.layers names 99"), ({"experts": (99,)}, "Port.experts"),
                             ({"layers": (HUGE,)}, "Port.layers")):
        refused(lambda: run(model, [1, 2], Port(**switches)), needle)
    refused(lambda: run(model, [1, 2], "softmax"), "Port")
    assert run(model, [1, 2], Port(layers=(0,))).shape == (2, TINY_MOE.vocab_size)


def test_load_dump_checks_its_path_and_the_ids_it_is_given(tmp_path):
    from lfm2np.oracle.dumps import load_dump

    path = tmp_path / "d.npz"
    np.savez(path, ids=np.array([1, 2, 3]), logits=np.zeros((3, 97), np.float32))
    for bad in (5, None, ""):
        refused(lambda: load_dump(bad), "dump")
    refused(lambda: load_dump(path, ids=[-1, 2, 3], vocab_size=97), str(path), "ids given", "-1")
    assert load_dump(path, ids=[4, 5, 6], vocab_size=97).ids.tolist() == [4, 5, 6]


# =================================================== files that are there but are no files: never told as missing
def _replace_with(path: Path, kind: str) -> None:
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "device":
        path.symlink_to("/dev/zero")
    else:  # a loop of links
        path.symlink_to(path.name + ".loop")
        (path.parent / (path.name + ".loop")).symlink_to(path.name)


KIND_WORDS = {"fifo": "FIFO", "directory": "a directory", "device": "character device", "loop": "loop of symbolic"}


@pytest.mark.parametrize("kind", list(KIND_WORDS))
@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json", "generation_config.json",
                                  "tokenizer_config.json", "chat_template.jinja"])
def test_a_checkpoint_file_that_is_no_file_is_named_as_what_it_is(capsys, checkpoint, name, kind):
    """model.safetensors as a FIFO, a directory or a loop of links was "no model.safetensors"; config.json and
    tokenizer.json alike; a generation_config.json that is a FIFO or /dev/zero was skipped as absent (the sampling
    defaults silently lost)."""
    _replace_with(checkpoint / name, kind)
    cli_refuses(capsys, ["generate", str(checkpoint), "--chat", "hi", "-n", "1"], str(checkpoint / name),
                KIND_WORDS[kind])


def test_a_perplexity_file_that_is_no_file_is_named_as_what_it_is(tmp_path):
    from lfm2np.evaluate import read_text

    os.mkfifo(tmp_path / "fifo")
    refused(lambda: read_text(tmp_path / "fifo"), "FIFO")
    refused(lambda: read_text(tmp_path), "a directory")
    refused(lambda: read_text(tmp_path / "none"), "no such file")


def test_an_empty_perplexity_file_and_doubled_template_names_are_named(tmp_path, capsys, checkpoint):
    text = tmp_path / "empty.txt"
    text.write_text("")
    cli_refuses(capsys, ["perplexity", str(checkpoint), str(text)], str(text), "at least 2 tokens")
    (checkpoint / "chat_template.jinja").unlink()  # (it wins over chat_template.json)
    named = [{"name": "default", "template": "x"}, {"name": "default", "template": "y"}]
    (checkpoint / "chat_template.json").write_text(json.dumps({"chat_template": named}))
    cli_refuses(capsys, ["generate", str(checkpoint), "--chat", "hi", "-n", "1"], "chat_template.json",
                "two templates 'default'")


# ================================================================ one line, whatever a name holds
@pytest.mark.parametrize("char", ["\x0b", "\x0c", "\x1c", "\x1e", "\x85", "\u2028", "\u2029", "\x00", "\x1b"])
def test_a_message_stays_one_line_whatever_character_a_name_holds(tmp_path, capsys, char):
    """Only \\n and \\r were escaped: a file name with a vertical tab, a form feed, U+2028 ... printed a message that
    str.splitlines() (and a terminal) breaks into several lines; a NUL or an escape sequence went out raw."""
    name = str(tmp_path / f"a{char}b")
    assert main(["forward", name]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("lfm2np: error: "), ascii(err)
    assert char not in err and "Traceback" not in err


def test_a_nul_in_an_output_name_is_an_argument_error(capsys):
    """main() given a NUL in --out (only Python can pass one) raised ValueError from os.path.realpath."""
    for argv in (["trace", "embedded", "--out", "x\0y"], ["golden", "embedded", "--out", "x\0y"]):
        cli_refuses(capsys, argv, "--out", "NUL")


@pytest.mark.parametrize("kind", list(KIND_WORDS))
def test_a_gguf_or_input_path_that_is_no_file_is_named_as_what_it_is(tmp_path, capsys, kind):
    """A .gguf MODEL that is a FIFO was 'no such GGUF file'; an input file that is a loop of links 'no such file'."""
    path = tmp_path / "m.gguf"
    path.write_bytes(b"")
    _replace_with(path, kind)
    for argv in (["forward", str(path)], ["memory", str(path)], ["perplexity", "embedded", str(path)],
                 ["compare", str(path), str(path)]):
        cli_refuses(capsys, argv, str(path), KIND_WORDS[kind])


def test_the_writing_helpers_refuse_what_they_cannot_write_back(tmp_path):
    """save_checkpoint(shards=0) wrote an index of no shard (nothing reads it back), shards=10**6 a million files;
    a file in the way was a FileExistsError; random_params(seed=-1) a ValueError from numpy."""
    from lfm2np.io.safetensors import save_checkpoint

    params = random_params(TINY_DENSE, seed=1)
    for shards in (0, -1, 10**6, 1.5, True):
        refused(lambda: save_checkpoint(tmp_path / "s", TINY_DENSE, params, shards=shards), "shards")
    assert not (tmp_path / "s").exists()
    (tmp_path / "file").write_text("x")
    refused(lambda: save_checkpoint(tmp_path / "file", TINY_DENSE, params), "file", "cannot create")
    refused(lambda: save_checkpoint(5, TINY_DENSE, params), "directory")
    from lfm2np.io.safetensors import Checkpoint
    for bad in (5, None, ""):
        refused(lambda: Checkpoint(bad), "checkpoint", "directory")
    path = save_checkpoint(tmp_path / "ok", TINY_DENSE, params, shards=len(params))
    assert lfm2np.load(path).forward([1, 2]).shape == (2, TINY_DENSE.vocab_size)
    for seed in (-1, "x", 1.5):
        refused(lambda: random_params(TINY_DENSE, seed=seed), "seed")
    refused(lambda: random_params(TINY_MOE, expert_bias_scale=float("nan")), "expert_bias_scale")


def test_compare_patterns_are_globs_whatever_calls_the_matcher():
    """compare(a, b, patterns=...) goes through the same matcher: one string is one glob (its "*" matched every
    name, per character), anything else an error (a TypeError from fnmatch)."""
    from lfm2np.oracle.compare import compare
    from lfm2np.oracle.trace import record

    _, trace = record(moe_model(), [1, 2, 3])
    one = compare(trace, trace, patterns="model.layers.0.*", partial=True)
    assert one.diffs and all(d.name.startswith("model.layers.0.") for d in one.diffs)
    for patterns, needle in ((5, "patterns is 5"), ([5], "holds 5")):
        refused(lambda: compare(trace, trace, patterns=patterns), needle)


def test_a_prompt_past_the_context_is_refused_before_its_logits_are_allocated():
    """forward() of a million ids allocated the (T, V) logits of its chunked prefill before run() refused the
    positions: a MemoryError (11 GiB for the embedded model) instead of the error naming the context."""
    model = lfm2np.load("embedded")
    context = model.config.max_position_embeddings
    for T in (context + 1, 10**6):
        ids = np.ones(T, np.int64)
        tracemalloc.start()
        try:
            refused(lambda: model.forward(ids), f"go past max_position_embeddings {context}")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 64 << 20, peak  # (numpy reports its allocations, even untouched ones, to tracemalloc)


TRACE_META = {"start": ("x", "'start'"), "dtype": (5, "'dtype'"), "model_type": (["x"], "'model_type'"),
              "weights": (5, "'weights'"), "weights.path": ({"format": "gguf", "path": 5}, "'weights.path'"),
              "weights.types": ({"format": "gguf", "types": 7}, "'weights.types'")}


@pytest.mark.parametrize("field", list(TRACE_META))
def test_a_trace_file_whose_metadata_fields_have_the_wrong_type(tmp_path, capsys, field):
    """compare of a trace whose metadata says weights.types is 7 raised TypeError ('int' object is not iterable);
    a start of 'x' was ignored, of -5 reported as another run."""
    from safetensors.numpy import save_file

    value, needle = TRACE_META[field]
    meta = {"ids": [1, 2, 3], field.split(".")[0]: value}
    path = tmp_path / "a.safetensors"
    tensors = {"model.layers.0": np.zeros((3, TINY_MOE.hidden_size), np.float32)}
    save_file(tensors, str(path), metadata={"order": json.dumps(list(tensors)), "meta": json.dumps(meta)})
    cli_refuses(capsys, ["compare", str(path), str(path)], str(path), needle)


def test_a_directory_in_the_place_of_a_trace_summary_is_refused_before_anything_is_written(tmp_path, capsys):
    """trace --out t --force with t.json a directory wrote t.safetensors, then failed on the summary."""
    (tmp_path / "t.json").mkdir()
    cli_refuses(capsys, ["trace", "embedded", "--out", str(tmp_path / "t"), "--force", "--ids", "1", "2"],
                "t.json", "is a directory")
    assert not (tmp_path / "t.safetensors").exists()
