"""lfm2np.io.gguf_tokenizer: an LFM2 tokenizer rebuilt from GGUF metadata encodes and decodes exactly
like the tokenizer.json it was converted from.

A byte-level BPE tokenizer of realistic size (32768 tokens, tests/tokenizer_fixture.py) trained in LFM2's
tokenizer.json layout is exported to GGUF metadata the way llama.cpp's converter does it
(lfm2np.io.gguf_vocab), written to a real GGUF file with gguf-py, read back with GGUFReader and rebuilt.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from lfm2np.errors import Lfm2npError
from lfm2np.io.gguf_tokenizer import tokenizer_from_gguf_metadata
from lfm2np.io.gguf_vocab import tokenizer_metadata

from tokenizer_fixture import (BOS_ID, EMOJI, TEXTS, IM_END_ID, PAD_ID, PUNCT, SPACES, SPECIAL_TOKENS, TEMPLATE,
                               TOKENIZER_CONFIG, VOCAB_SIZE, trained_tokenizer)

ROOT = Path(__file__).resolve().parent.parent
TINY_TOKENIZER = ROOT / "lfm2np" / "data" / "tiny-lfm2-moe" / "tokenizer.json"


def gguf_tokenizer_metadata(tok_json: dict, tok_config: dict, vocab_size: int | None = None) -> dict:
    """The tokenizer keys llama.cpp's converter writes (lfm2np.io.gguf_vocab's port of _set_vocab_gpt2 /
    SpecialVocab; the chat template taken from tok_config as SpecialVocab does)."""
    return tokenizer_metadata(tok_json, tok_config, vocab_size=vocab_size)


def write_gguf(path: Path, meta: dict) -> None:
    w = gguf.GGUFWriter(str(path), "lfm2")
    w.add_tokenizer_model(meta["tokenizer.ggml.model"])
    w.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
    w.add_token_list(meta["tokenizer.ggml.tokens"])
    w.add_token_types(meta["tokenizer.ggml.token_type"])
    w.add_token_merges(meta["tokenizer.ggml.merges"])
    w.add_bos_token_id(meta["tokenizer.ggml.bos_token_id"])
    w.add_eos_token_id(meta["tokenizer.ggml.eos_token_id"])
    w.add_pad_token_id(meta["tokenizer.ggml.padding_token_id"])
    w.add_add_bos_token(meta["tokenizer.ggml.add_bos_token"])
    w.add_add_eos_token(meta["tokenizer.ggml.add_eos_token"])
    w.add_chat_template(meta["tokenizer.chat_template"])
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def read_gguf_metadata(path: Path) -> dict:
    reader = gguf.GGUFReader(str(path))
    return {name: field.contents() for name, field in reader.fields.items() if name.startswith("tokenizer.")}


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def original() -> Tokenizer:
    return trained_tokenizer()


@pytest.fixture(scope="module")
def converted(original, tmp_path_factory):
    tok_json = json.loads(original.to_str())
    tok_config = dict(TOKENIZER_CONFIG, chat_template=TEMPLATE.read_text())
    written = gguf_tokenizer_metadata(tok_json, tok_config)
    path = tmp_path_factory.mktemp("gguf") / "tokenizer.gguf"
    write_gguf(path, written)
    meta = read_gguf_metadata(path)
    rebuilt, extras = tokenizer_from_gguf_metadata(meta, source=str(path))
    return meta, rebuilt, extras




# ---------------------------------------------------------------------------------------------- tests
def test_metadata_is_what_the_converter_writes(converted, original):
    meta, rebuilt, extras = converted
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == original.get_vocab_size(with_added_tokens=True) == VOCAB_SIZE + 3  # "python" reused
    assert tokens[: len(SPECIAL_TOKENS)] == SPECIAL_TOKENS and set(types[: len(SPECIAL_TOKENS)]) == {3}
    assert types[tokens.index("python")] == 4 and tokens.index("python") < VOCAB_SIZE
    assert [types[tokens.index(t)] for t in ("<think>", "</think>", "<|cot_start|>")] == [4, 4, 3]
    merges = meta["tokenizer.ggml.merges"]
    assert len(merges) == len(json.loads(original.to_str())["model"]["merges"])
    assert all(m.count(" ") == 1 for m in merges)


def test_vocabulary_and_added_tokens_identical(converted, original):
    _, rebuilt, _ = converted
    assert rebuilt.get_vocab(with_added_tokens=True) == original.get_vocab(with_added_tokens=True)
    want = {i: (a.content, a.special) for i, a in original.get_added_tokens_decoder().items()}
    got = {i: (a.content, a.special) for i, a in rebuilt.get_added_tokens_decoder().items()}
    assert got == want
    for i, t in enumerate(SPECIAL_TOKENS):
        assert rebuilt.token_to_id(t) == i


def test_extras(converted):
    _, _, extras = converted
    assert extras == {
        "pre": "lfm2", "bos_token_id": BOS_ID, "bos_token": "<|startoftext|>", "eos_token_id": IM_END_ID,
        "eos_token": "<|im_end|>", "pad_token_id": PAD_ID, "pad_token": "<|pad|>", "add_bos_token": True,
        "add_eos_token": False, "chat_template": TEMPLATE.read_text(),
    }


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_encode_decode_identical(converted, original, text):
    _, rebuilt, extras = converted
    assert rebuilt.pre_tokenizer.pre_tokenize_str(text) == original.pre_tokenizer.pre_tokenize_str(text)
    want = original.encode(text, add_special_tokens=False)
    got = rebuilt.encode(text, add_special_tokens=False)
    assert got.ids == want.ids
    assert got.tokens == want.tokens
    assert got.offsets == want.offsets
    # The original's post-processor adds BOS; the rebuilt one leaves that to the caller (extras).
    assert [extras["bos_token_id"]] * extras["add_bos_token"] + got.ids == original.encode(text).ids
    for skip in (False, True):
        assert rebuilt.decode(got.ids, skip_special_tokens=skip) == original.decode(want.ids, skip_special_tokens=skip)
    assert rebuilt.decode(got.ids, skip_special_tokens=False) == text  # byte-level BPE is lossless


def test_batch_and_special_tokens_are_used(converted, original):
    _, rebuilt, _ = converted
    ids = rebuilt.encode("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False).ids
    assert ids[0] == 6 and ids[-1] == IM_END_ID
    assert [e.ids for e in rebuilt.encode_batch(TEXTS, add_special_tokens=False)] == \
        [e.ids for e in original.encode_batch(TEXTS, add_special_tokens=False)]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text())
def test_random_text_identical(converted, original, text):
    _, rebuilt, _ = converted
    want = original.encode(text, add_special_tokens=False).ids
    assert rebuilt.encode(text, add_special_tokens=False).ids == want
    assert rebuilt.decode(want, skip_special_tokens=False) == original.decode(want, skip_special_tokens=False) == text


FRAGMENTS = SPECIAL_TOKENS + ["<think>", "</think>", "python", "<|cot_start|>", "<|", "|>", "'s", "'LL", "ſ"] \
    + SPACES + EMOJI + PUNCT + [t[:12] for t in TEXTS]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=6)), max_size=20))
def test_random_mixtures_identical(converted, original, parts):
    """Special-token strings, added words, whitespace runs, emoji and random text glued together."""
    _, rebuilt, _ = converted
    text = "".join(parts)
    want = original.encode(text, add_special_tokens=False).ids
    assert rebuilt.encode(text, add_special_tokens=False).ids == want
    for skip in (False, True):
        assert rebuilt.decode(want, skip_special_tokens=skip) == original.decode(want, skip_special_tokens=skip)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.integers(0, VOCAB_SIZE + 2), max_size=40), skip=st.booleans())
def test_random_ids_decode_identical(converted, original, ids, skip):
    _, rebuilt, _ = converted
    assert rebuilt.decode(ids, skip_special_tokens=skip) == original.decode(ids, skip_special_tokens=skip)


def test_embedded_tiny_lfm2_tokenizer_round_trip():
    """The real-layout tokenizer shipped in lfm2np/data (no GGUF file needed: metadata in memory)."""
    tok_json = json.loads(TINY_TOKENIZER.read_text(encoding="utf-8"))
    original = Tokenizer.from_str(json.dumps(tok_json))
    meta = gguf_tokenizer_metadata(tok_json, {"bos_token": "<|startoftext|>", "eos_token": "<|im_end|>",
                                              "pad_token": "<|pad|>", "add_bos_token": True})
    rebuilt, extras = tokenizer_from_gguf_metadata(meta)
    assert rebuilt.get_vocab(with_added_tokens=True) == original.get_vocab(with_added_tokens=True)
    assert extras["chat_template"] is None and extras["add_eos_token"] is False
    for text in TEXTS:
        ids = original.encode(text, add_special_tokens=False).ids
        assert rebuilt.encode(text, add_special_tokens=False).ids == ids
        assert rebuilt.decode(ids, skip_special_tokens=False) == original.decode(ids, skip_special_tokens=False)


# ---------------------------------------------------------------- small hand-made vocabularies
def small_meta() -> dict:
    """A valid byte-level vocabulary with a hole (unused [PAD8]) and a user-defined token in the middle."""
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "lfm2",
        "tokenizer.ggml.tokens": ["<|pad|>", "<|startoftext|>", "<|im_end|>", "a", "b", "ab", "Ġ", "Ġab",
                                  "[PAD8]", "hi there", "c"],
        "tokenizer.ggml.token_type": [3, 3, 3, 1, 1, 1, 1, 1, 5, 4, 1],
        "tokenizer.ggml.merges": ["a b", "Ġ ab"],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.padding_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.chat_template": "{{ messages }}",
    }


def test_small_vocabulary_ids_and_holes():
    tok, extras = tokenizer_from_gguf_metadata(small_meta())
    assert tok.encode("ab ab", add_special_tokens=False).ids == [5, 7]
    assert tok.encode("<|startoftext|>hi there c", add_special_tokens=False).ids == [1, 9, 6, 10]
    assert tok.token_to_id("[PAD8]") is None and tok.id_to_token(10) == "c"
    assert tok.decode([1, 5, 8, 9, 7], skip_special_tokens=True) == "abhi there ab"
    assert tok.get_added_tokens_decoder()[9].special is False
    assert extras["bos_token"] == "<|startoftext|>" and extras["chat_template"] == "{{ messages }}"


def test_defaults_when_optional_keys_are_missing():
    meta = small_meta()
    for k in ("tokenizer.ggml.add_bos_token", "tokenizer.ggml.padding_token_id", "tokenizer.chat_template"):
        del meta[k]
    _, extras = tokenizer_from_gguf_metadata(meta)
    assert extras["add_bos_token"] is True  # llama.cpp's default for this pre-tokenizer
    assert extras["pad_token_id"] is None and extras["pad_token"] is None and extras["chat_template"] is None
    del meta["tokenizer.ggml.bos_token_id"]
    assert tokenizer_from_gguf_metadata(meta)[1]["add_bos_token"] is False
    del meta["tokenizer.ggml.token_type"]
    with pytest.warns(UserWarning, match="token_type is missing"):
        tok, _ = tokenizer_from_gguf_metadata(meta)
    assert tok.encode("<|im_end|>", add_special_tokens=False).ids != [2]


def test_special_looking_non_special_token_comes_back_special():
    """The converter marks a non-special '<|...|>' added token CONTROL: encoding is unchanged, only the
    special flag (skip_special_tokens) differs — GGUF cannot tell."""
    meta = small_meta()
    meta["tokenizer.ggml.tokens"][9] = "<|note|>"
    meta["tokenizer.ggml.token_type"][9] = 3
    tok, _ = tokenizer_from_gguf_metadata(meta)
    assert tok.encode("a<|note|>b", add_special_tokens=False).ids == [3, 9, 4]
    assert tok.get_added_tokens_decoder()[9].special is True


@pytest.mark.parametrize("pre", ["llama-bpe", "llama3", "llama-v3"])
def test_equivalent_pre_names_accepted_with_warning(converted, original, pre):
    meta = dict(converted[0], **{"tokenizer.ggml.pre": pre})
    with pytest.warns(UserWarning, match="exactly the regex it uses for 'lfm2'"):
        tok, extras = tokenizer_from_gguf_metadata(meta)
    assert extras["pre"] == pre
    for text in TEXTS[8:20]:
        assert tok.encode(text, add_special_tokens=False).ids == original.encode(text, add_special_tokens=False).ids


def test_lfm2_pre_gives_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenizer_from_gguf_metadata(small_meta())


@pytest.mark.parametrize("pre", ["qwen2", "gpt-2", "default", "falcon3", "LFM2", "pixtral"])
def test_unknown_pre_refused(pre):
    meta = dict(small_meta(), **{"tokenizer.ggml.pre": pre})
    with pytest.raises(Lfm2npError, match="tokenizer.ggml.pre") as e:
        tokenizer_from_gguf_metadata(meta, source="x.gguf")
    assert repr(pre) in str(e.value) and "'lfm2'" in str(e.value) and "x.gguf" in str(e.value)


def _set(key, value):
    def f(m):
        m[key] = value
    return f


def _item(key, i, value):
    def f(m):
        m[key][i] = value
    return f


def _drop(key):
    def f(m):
        del m[key]
    return f


T, TT, M = "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"
HOSTILE = {
    "model missing": (_drop("tokenizer.ggml.model"), ["tokenizer.ggml.model", "missing"]),
    "model llama": (_set("tokenizer.ggml.model", "llama"), ["tokenizer.ggml.model", "'llama'"]),
    "pre missing": (_drop("tokenizer.ggml.pre"), ["tokenizer.ggml.pre", "missing"]),
    "pre not str": (_set("tokenizer.ggml.pre", 3), ["tokenizer.ggml.pre", "string"]),
    "tokens missing": (_drop(T), [T, "missing"]),
    "tokens a string": (_set(T, "abc"), [T, "list"]),
    "tokens empty": (_set(T, []), [T, "empty"]),
    "token not str": (_item(T, 4, b"b"), [T, "[4]", "bytes"]),
    "token empty": (_item(T, 4, ""), [T, "[4]", "empty"]),
    "token duplicate": (_item(T, 10, "a"), [T, "[10]", "[3]", "duplicates"]),
    "token surrogate": (_item(T, 10, "\ud800"), [T, "[10]", "surrogate"]),
    "types wrong length": (lambda m: m[TT].pop(), [TT, "10 entries", "11"]),
    "types not a list": (_set(TT, "3"), [TT, "list"]),
    "type not int": (_item(TT, 3, "1"), [TT, "[3]", "int"]),
    "type bool": (_item(TT, 3, True), [TT, "[3]", "int"]),
    "type 0": (_item(TT, 3, 0), [TT, "[3]", "not a GGUF token type"]),
    "type 7": (_item(TT, 3, 7), [TT, "[3]", "not a GGUF token type"]),
    "type byte": (_item(TT, 3, 6), [TT, "[3]", "byte"]),
    "type unknown": (_item(TT, 3, 2), [TT, "[3]", "unknown"]),
    "merges missing": (_drop(M), [M, "missing"]),
    "merges a string": (_set(M, "a b"), [M, "list"]),
    "merge not str": (_item(M, 1, ("Ġ", "ab")), [M, "[1]", "tuple"]),
    "merge no space": (_item(M, 1, "Ġab"), [M, "[1]", "one space"]),
    "merge two spaces": (_item(M, 1, "Ġ a b"), [M, "[1]", "one space"]),
    "merge leading space": (_item(M, 1, " ab"), [M, "[1]", "one space"]),
    "merge unknown part": (_item(M, 1, "Ġ x"), [M, "[1]", "right part", "'x'"]),
    "merge unknown left": (_item(M, 0, "z b"), [M, "[0]", "left part", "'z'"]),
    "merge result missing": (_item(M, 1, "b a"), [M, "[1]", "merged token", "'ba'"]),
    "merge of unused token": (_item(M, 1, "[PAD8] a"), [M, "[1]", "unused"]),
    "merge duplicate": (lambda m: m[M].append("a b"), [M, "[2]", "[0]", "duplicates"]),
    "bos out of range": (_set("tokenizer.ggml.bos_token_id", 11), ["tokenizer.ggml.bos_token_id", "11", "outside"]),
    "eos negative": (_set("tokenizer.ggml.eos_token_id", -1), ["tokenizer.ggml.eos_token_id", "-1", "outside"]),
    "pad not int": (_set("tokenizer.ggml.padding_token_id", "0"), ["tokenizer.ggml.padding_token_id", "int"]),
    "bos float": (_set("tokenizer.ggml.bos_token_id", 1.0), ["tokenizer.ggml.bos_token_id", "int"]),
    "bos unused": (_set("tokenizer.ggml.bos_token_id", 8), ["tokenizer.ggml.bos_token_id", "unused"]),
    "add_bos not bool": (_set("tokenizer.ggml.add_bos_token", 1), ["tokenizer.ggml.add_bos_token", "bool"]),
    "add_bos without bos": (_drop("tokenizer.ggml.bos_token_id"), ["tokenizer.ggml.add_bos_token", "bos_token_id"]),
    "add_eos not bool": (_set("tokenizer.ggml.add_eos_token", "yes"), ["tokenizer.ggml.add_eos_token", "bool"]),
    "template not str": (_set("tokenizer.chat_template", ["a"]), ["tokenizer.chat_template", "string"]),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_metadata_refused(case):
    mutate, needles = HOSTILE[case]
    meta = copy.deepcopy(small_meta())
    mutate(meta)
    with pytest.raises(Lfm2npError) as e:
        tokenizer_from_gguf_metadata(meta, source="bad.gguf")
    msg = str(e.value)
    assert msg.startswith("bad.gguf: ")
    for needle in needles:
        assert needle in msg, (needle, msg)


def test_not_a_mapping_refused():
    with pytest.raises(Lfm2npError, match="mapping"):
        tokenizer_from_gguf_metadata([("tokenizer.ggml.model", "gpt2")])
