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
