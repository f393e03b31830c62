"""Hostile inputs, round three (issue 23): hangs, allocations out of proportion to the input, tracebacks,
silent acceptance, vague errors, and commands that would overwrite their own input.

Whatever may hang or allocate without bound runs in a child process under an address-space limit
(``RLIMIT_AS``) and a time limit, so that a regression fails the test instead of the machine.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import textwrap
import time

import pytest
from hypothesis import given, settings, strategies as st

from lfm2np import Lfm2npError
from lfm2np.io.gguf_tokenizer import tokenizer_from_gguf_metadata

from conftest import subprocess_env

ADDRESS_SPACE = 1 << 30  #: a child may map at most 1 GiB


def _limit() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def run_bounded(code: str, seconds: float) -> str:
    """Run ``code`` in a child Python under :data:`ADDRESS_SPACE` and ``seconds``; its stdout. A hang or a
    crash (a MemoryError past the limit included) fails the test."""
    try:
        proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                              timeout=seconds, env=subprocess_env(), preexec_fn=_limit)
    except subprocess.TimeoutExpired:
        pytest.fail(f"did not finish within {seconds} s")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def refused(action, *needles: str) -> str:
    with pytest.raises(Lfm2npError) as err:
        action()
    message = str(err.value)
    assert "\n" not in message, message
    missing = [n for n in needles if n not in message]
    assert not missing, f"message does not name {missing}: {message}"
    return message


# ======================================================================= GGUF tokenizers: type patterns
def vocabulary_meta(types: list[int]) -> dict:
    """GGUF tokenizer metadata: three byte-level tokens and a merge, then one token per entry of ``types``
    (3 control ``<|cN|>``, 4 user-defined ``userN``, 1 normal ``nN``, 5 unused ``[PADN]``)."""
    names = {3: "<|c{}|>", 4: "user{}", 1: "n{}", 5: "[PAD{}]"}
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "lfm2",
            "tokenizer.ggml.tokens": ["a", "b", "ab"] + [names[t].format(i) for i, t in enumerate(types)],
            "tokenizer.ggml.token_type": [1, 1, 1] + list(types), "tokenizer.ggml.merges": ["a b"]}


def test_alternating_control_and_user_defined_tokens_build_in_linear_time():
    """65,536 tokens alternating control / user-defined: the added-token matcher was rebuilt once per run
    of one kind (32,768 rebuilds over a growing set: hours); now it is built once."""
    out = run_bounded("""
        import time
        from lfm2np.io.gguf_tokenizer import tokenizer_from_gguf_metadata
        n = 65536
        tokens = ["a", "b", "ab"] + [f"<|c{i}|>" if i % 2 == 0 else f"user{i}" for i in range(n)]
        meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "lfm2", "tokenizer.ggml.tokens": tokens,
                "tokenizer.ggml.token_type": [1, 1, 1] + [3 if i % 2 == 0 else 4 for i in range(n)],
                "tokenizer.ggml.merges": ["a b"]}
        t0 = time.perf_counter()
        tok, _ = tokenizer_from_gguf_metadata(meta)
        decoder = tok.get_added_tokens_decoder()
        assert len(decoder) == n and decoder[3].special and not decoder[4].special
        assert tok.encode("<|c0|>user1ab").ids == [3, 4, 2]
        print(time.perf_counter() - t0)
    """, seconds=60)
    assert float(out) < 30


@settings(max_examples=25, deadline=None)
@given(st.lists(st.sampled_from([1, 3, 4, 5]), min_size=1, max_size=3000))
def test_any_type_pattern_builds_quickly_with_every_id_in_place(types):
    meta = vocabulary_meta(types)
    t0 = time.perf_counter()
    tok, _ = tokenizer_from_gguf_metadata(meta)
    assert time.perf_counter() - t0 < 5  # the old runs-of-one-kind build: ~1 s for 2,000 alternations
    decoder = tok.get_added_tokens_decoder()
    tokens = meta["tokenizer.ggml.tokens"]
    for i, t in enumerate(types, start=3):
        if t in (3, 4):
            assert decoder[i].content == tokens[i] and decoder[i].special == (t == 3)
            assert tok.encode(tokens[i]).ids == [i]
        elif t == 5:
            assert tok.token_to_id(tokens[i]) is None and i not in decoder
        else:
            assert tok.token_to_id(tokens[i]) == i
