"""Rebuild an LFM2 ``tokenizers.Tokenizer`` from the tokenizer metadata of a GGUF file (what
:meth:`lfm2np.io.tokenizer.Tokenizer.from_gguf` uses; the converter's side, tokenizer.json to metadata, is
:mod:`lfm2np.io.gguf_vocab`).

What llama.cpp writes and reads (details and more references: ``/work/notes/gguf-tokenizer.md``;
line numbers are ggml-org/llama.cpp master of 2026-08, commit 3f545bec; in older trees the converter
code is in ``convert_hf_to_gguf.py`` instead of ``conversion/base.py``):

* Writer: LFM2's converter classes (``conversion/lfm2.py``) keep ``TextModel.set_vocab`` →
  ``_set_vocab_gpt2`` (``conversion/base.py:1237``, ``:1786-1794``). ``get_vocab_base`` (``:1415-1457``)
  writes every id ``0..vocab_size-1`` in order: ids missing from the HF vocabulary become ``[PAD{i}]``
  with type 5 (UNUSED); HF *added* tokens are written as their raw content (not byte-level encoded)
  with type 3 (CONTROL) when ``special`` **or** when they look special (``<|...|>``, ``<pad>``,
  ``<unused...>``: ``does_token_look_special``, ``:1391-1412``), otherwise type 4 (USER_DEFINED,
  ``▁`` replaced by a space); all other tokens are type 1 (NORMAL), byte-level strings. Types 2
  (UNKNOWN) and 6 (BYTE) are never written for a gpt2 vocabulary. Merges come from gguf-py
  ``SpecialVocab`` as ``"a b"`` strings (list-of-pairs merges are joined with one space, a space inside
  a part written as ``Ġ``: ``gguf-py/gguf/vocab.py:189-214``); ``bos/eos/padding_token_id``,
  ``add_bos_token``/``add_eos_token`` and ``chat_template`` also come from it.
* ``tokenizer.ggml.pre``: the converter names LFM2 tokenizers ``"lfm2"`` (chkhsh lines ``:1537`` and
  ``:1693``, since PR #14620). There never was a ``LLAMA_VOCAB_PRE_TYPE_LFM2``: ``src/llama-vocab.cpp``
  maps ``llama3``, ``llama-v3``, ``llama-bpe``, ``falcon3``, ``falcon-h1``, ``pixtral``, ``midm-2.0``,
  ``lfm2``, ``jina-v5-nano`` to ``LLAMA_VOCAB_PRE_TYPE_LLAMA3`` (``:2147-2159``, with ``ignore_merges``
  and ``add_bos`` true), whose one regex (``:283-291``) is the Llama-3 ``tokenizer.json`` split written
  with ASCII-only contractions; that original regex is character for character LFM2's split. Ollama's
  converter writes ``"llama-bpe"`` for any tokenizer.json whose split regex hashes to the Llama-3 one
  (ollama ``convert/tokenizer.go``), i.e. for LFM2 tokenizers too.
* Reader: with ``parse_special`` false llama.cpp skips only CONTROL/UNKNOWN tokens when splitting
  special text; USER_DEFINED tokens are always matched (``src/llama-vocab.cpp:3208-3220``) — HF's rule
  for non-special added tokens.

Decisions: ``"lfm2"`` is accepted; ``"llama-bpe"``, ``"llama3"`` and ``"llama-v3"`` (the same
pre-tokenizer in llama.cpp, and the Llama-3 regex equals LFM2's) are accepted with a warning; every other
name is refused. The rebuilt tokenizer uses HF's regex (its ``(?i:...)`` contractions case-fold, e.g.
``'ſ`` matches ``'s``, which llama.cpp's ASCII rewrite does not) and ``ignore_merges=False`` as in
LFM2's tokenizer.json (llama.cpp uses ``ignore_merges=true`` for this group; GGUF does not record it).
CONTROL → special added token, USER_DEFINED → non-special added token (``normalized=True``, the HF
default for non-special tokens), UNUSED → no token at that id (as in the HF original). A non-special HF
token that looks special comes back special: GGUF cannot tell (this only changes
``decode(..., skip_special_tokens=True)``).
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping

import numpy as np

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from ..errors import Lfm2npError

__all__ = ["tokenizer_from_gguf_metadata", "LFM2_SPLIT_REGEX", "SUPPORTED_PRE", "EQUIVALENT_PRE"]

# The Split pattern of LFM2's tokenizer.json (also Llama-3's; llama-vocab.cpp:286 quotes it).
LFM2_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

SUPPORTED_PRE = ("lfm2",)
# Mapped by llama.cpp to the same LLAMA_VOCAB_PRE_TYPE_LLAMA3 split as "lfm2"; the Llama-3 regex is LFM2's.
EQUIVALENT_PRE = ("llama-bpe", "llama3", "llama-v3")

K_MODEL = "tokenizer.ggml.model"
K_PRE = "tokenizer.ggml.pre"
K_TOKENS = "tokenizer.ggml.tokens"
K_TYPES = "tokenizer.ggml.token_type"
K_MERGES = "tokenizer.ggml.merges"
K_BOS = "tokenizer.ggml.bos_token_id"
K_EOS = "tokenizer.ggml.eos_token_id"
K_PAD = "tokenizer.ggml.padding_token_id"
K_ADD_BOS = "tokenizer.ggml.add_bos_token"
K_ADD_EOS = "tokenizer.ggml.add_eos_token"
K_TEMPLATE = "tokenizer.chat_template"

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
TYPE_NAMES = {1: "normal", 2: "unknown", 3: "control", 4: "user-defined", 5: "unused", 6: "byte"}


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_bool(v: Any) -> bool:
    return isinstance(v, (bool, np.bool_))


def _tname(v: Any) -> str:
    return type(v).__name__


class _Checker:
    def __init__(self, source: str):
        self.source = source

    def error(self, key: str, msg: str) -> Lfm2npError:
        return Lfm2npError(f"{self.source}: {key} {msg}")


def tokenizer_from_gguf_metadata(meta: Mapping[str, Any],
                                 source: str = "GGUF") -> tuple[Tokenizer, dict]:
    """The ``tokenizers.Tokenizer`` an LFM2 GGUF file's metadata describes, and its extras.

    ``meta`` maps GGUF keys to Python values (arrays as lists of ``str``/``int``). Needs
    ``tokenizer.ggml.model == "gpt2"``, ``tokenizer.ggml.pre`` ``"lfm2"`` (or, with a warning, one of
    :data:`EQUIVALENT_PRE`), ``tokenizer.ggml.tokens`` and ``tokenizer.ggml.merges``; reads
    ``tokenizer.ggml.token_type``, ``bos/eos/padding_token_id``, ``add_bos_token``, ``add_eos_token`` and
    ``tokenizer.chat_template`` when present. Everything is validated before anything is built; any
    violation raises :class:`~lfm2np.errors.Lfm2npError` naming ``source``, the key and the index.

    The tokenizer is LFM2's tokenizer.json layout: BPE (no byte fallback, no unk, no dropout) over the
    Split regex :data:`LFM2_SPLIT_REGEX` (isolated) + ByteLevel (no prefix space, no regex), ByteLevel
    decoder, no normalizer and no post-processor (callers add BOS: see ``extras["add_bos_token"]``).
    Control tokens are special added tokens, user-defined tokens non-special added tokens, all at the
    ids the file gives; unused tokens (``[PAD{i}]`` holes) are left out.

    Returns ``(tokenizer, extras)``; ``extras`` has ``bos_token_id``, ``bos_token``, ``eos_token_id``,
    ``eos_token``, ``pad_token_id``, ``pad_token`` (``None`` when absent), ``add_bos_token``
    (``tokenizer.ggml.add_bos_token``; when absent, llama.cpp's default for this pre-tokenizer: true if
    there is a BOS id), ``add_eos_token`` (default false), ``chat_template`` (``str`` or ``None``) and
    ``pre`` (the ``tokenizer.ggml.pre`` value).
    """
    c = _Checker(source)
    if not isinstance(meta, Mapping):
        raise Lfm2npError(f"{source}: tokenizer metadata must be a mapping of GGUF keys, got {_tname(meta)}")

    # --- tokenizer.ggml.model / .pre
    model = meta.get(K_MODEL)
    if model is None:
        raise c.error(K_MODEL, "is missing: the file carries no tokenizer")
    if model != "gpt2":
        raise c.error(K_MODEL, f"is {model!r}; only 'gpt2' (byte-level BPE, what llama.cpp's converter "
                               "writes for LFM2) is supported")
    pre = meta.get(K_PRE)
    supported = ", ".join(repr(p) for p in SUPPORTED_PRE + EQUIVALENT_PRE)
    if pre is None:
        raise c.error(K_PRE, f"is missing (llama.cpp would fall back to its 'default' split); "
                             f"supported: {supported}")
    if not isinstance(pre, str):
        raise c.error(K_PRE, f"must be a string, got {_tname(pre)}")
    if pre in EQUIVALENT_PRE:
        warnings.warn(f"{source}: {K_PRE} is {pre!r}, not 'lfm2': llama.cpp splits text for {pre!r} with "
                      "exactly the regex it uses for 'lfm2' (LLAMA_VOCAB_PRE_TYPE_LLAMA3; Ollama writes "
                      "'llama-bpe' for LFM2 tokenizers), so the tokenizer is rebuilt with LFM2's split",
                      UserWarning, stacklevel=2)
    elif pre not in SUPPORTED_PRE:
        raise c.error(K_PRE, f"is {pre!r}, a pre-tokenizer lfm2np does not know the exact split of; "
                             f"supported: {supported} (the last {len(EQUIVALENT_PRE)} are llama.cpp names "
                             "for the same split as 'lfm2')")

    # --- tokens
    tokens = meta.get(K_TOKENS)
    if tokens is None:
        raise c.error(K_TOKENS, "is missing")
    if not isinstance(tokens, (list, tuple)):
        raise c.error(K_TOKENS, f"must be a list of strings, got {_tname(tokens)}")
    n = len(tokens)
    if n == 0:
        raise c.error(K_TOKENS, "is empty")
    index: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if not isinstance(t, str):
            raise c.error(K_TOKENS, f"[{i}] is {_tname(t)}, expected str (decode GGUF strings as UTF-8)")
        if not t:
            raise c.error(K_TOKENS, f"[{i}] is an empty string")
        j = index.setdefault(t, i)
        if j != i:
            raise c.error(K_TOKENS, f"[{i}] {t!r} duplicates [{j}]")
        try:
            t.encode("utf-8")
        except UnicodeEncodeError:
            raise c.error(K_TOKENS, f"[{i}] {t!r} is not valid Unicode text (lone surrogate)") from None

    # --- token types
    types = meta.get(K_TYPES)
    if types is None:
        warnings.warn(f"{source}: {K_TYPES} is missing: every token is treated as normal, so no special "
                      "token is recognised in text (llama.cpp does the same)", UserWarning, stacklevel=2)
        types = [NORMAL] * n
    else:
        if not isinstance(types, (list, tuple, np.ndarray)):
            raise c.error(K_TYPES, f"must be a list of ints, got {_tname(types)}")
        if len(types) != n:
            raise c.error(K_TYPES, f"has {len(types)} entries but {K_TOKENS} has {n}")
        out = []
        for i, v in enumerate(types):
            if not _is_int(v):
                raise c.error(K_TYPES, f"[{i}] is {_tname(v)} {v!r}, expected an int")
            v = int(v)
            if v not in TYPE_NAMES:
                raise c.error(K_TYPES, f"[{i}] is {v}, not a GGUF token type (1 normal, 2 unknown, 3 control, "
                                       "4 user-defined, 5 unused, 6 byte)")
            if v in (UNKNOWN, BYTE):
                raise c.error(K_TYPES, f"[{i}] is {v} ({TYPE_NAMES[v]}) for {tokens[i]!r}: llama.cpp's gpt2 "
                                       "export writes only 1 normal, 3 control, 4 user-defined and 5 unused, "
                                       "so this is not a byte-level BPE vocabulary lfm2np can rebuild exactly")
            out.append(v)
        types = out

    def _live(key: str, tok: str, what: str) -> int:
        j = index.get(tok)
        if j is None:
            raise c.error(key, f"{what} {tok!r} is not in {K_TOKENS}")
        if types[j] == UNUSED:
            raise c.error(key, f"{what} {tok!r} is {K_TOKENS}[{j}], an unused (type 5) token")
        return j

    # --- merges
    merges = meta.get(K_MERGES)
    if merges is None:
        raise c.error(K_MERGES, "is missing (llama.cpp: 'cannot find tokenizer merges in model file')")
    if not isinstance(merges, (list, tuple)):
        raise c.error(K_MERGES, f"must be a list of 'a b' strings, got {_tname(merges)}")
    pairs: list[tuple[str, str]] = []
    seen_merges: dict[str, int] = {}
    key = K_MERGES
    for i, m in enumerate(merges):
        if not isinstance(m, str):
            raise c.error(key, f"[{i}] is {_tname(m)}, expected an 'a b' string")
        # llama.cpp splits at the first space after position 0 (llama-vocab.cpp:2004); byte-level parts
        # never hold a space (it is 'Ġ'), so exactly one space is required.
        sp = m.find(" ", 1)
        if m.count(" ") != 1 or sp == -1 or sp == len(m) - 1:
            raise c.error(key, f"[{i}] {m!r} is not two tokens separated by one space")
        j = seen_merges.setdefault(m, i)
        if j != i:
            raise c.error(key, f"[{i}] {m!r} duplicates [{j}]")
        a, b = m[:sp], m[sp + 1:]
        _live(key, a, f"[{i}] {m!r}: left part")
        _live(key, b, f"[{i}] {m!r}: right part")
        _live(key, a + b, f"[{i}] {m!r}: merged token")
        pairs.append((a, b))

    # --- special ids
    extras: dict[str, Any] = {"pre": pre}
    for name, key in (("bos", K_BOS), ("eos", K_EOS), ("pad", K_PAD)):
        v = meta.get(key)
        if v is None:
            extras[f"{name}_token_id"] = extras[f"{name}_token"] = None
            continue
        if not _is_int(v):
            raise c.error(key, f"is {_tname(v)} {v!r}, expected an int token id")
        v = int(v)
        if not 0 <= v < n:
            raise c.error(key, f"is {v}, outside the vocabulary (0..{n - 1})")
        if types[v] == UNUSED:
            raise c.error(key, f"is {v}, an unused (type 5) token {tokens[v]!r}")
        extras[f"{name}_token_id"], extras[f"{name}_token"] = v, tokens[v]

    for key, name in ((K_ADD_BOS, "add_bos_token"), (K_ADD_EOS, "add_eos_token")):
        v = meta.get(key)
        if v is not None and not _is_bool(v):
            raise c.error(key, f"is {_tname(v)} {v!r}, expected a bool")
        extras[name] = None if v is None else bool(v)
    if extras["add_bos_token"] is None:
        # llama-vocab.cpp:2159: add_bos = true for this pre-tokenizer group, unless the file says otherwise.
        extras["add_bos_token"] = extras["bos_token_id"] is not None
    elif extras["add_bos_token"] and extras["bos_token_id"] is None:
        raise c.error(K_ADD_BOS, f"is true but {K_BOS} is missing")
    if extras["add_eos_token"] is None:
        extras["add_eos_token"] = False
    elif extras["add_eos_token"] and extras["eos_token_id"] is None:
        raise c.error(K_ADD_EOS, f"is true but {K_EOS} is missing")

    template = meta.get(K_TEMPLATE)
    if template is not None and not isinstance(template, str):
        raise c.error(K_TEMPLATE, f"is {_tname(template)}, expected a string")
    extras["chat_template"] = template

    return _build(tokens, types, pairs, source), extras


def _build(tokens: list[str], types: list[int], pairs: list[tuple[str, str]],
           source: str) -> Tokenizer:
    # Every live token goes into the BPE vocabulary under its GGUF id, added tokens included: an added
    # token already in the vocabulary keeps that id, whereas a new one would get len(vocab) and could
    # collide with a real id when the ids have holes.
    vocab = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty != UNUSED}
    tok = Tokenizer(models.BPE(vocab, pairs, byte_fallback=False, ignore_merges=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LFM2_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()

    # Every added token in ONE call: each add_tokens / add_special_tokens call rebuilds the matcher over all
    # the added tokens so far, so adding them in runs of one kind costs (runs x tokens), hours for a 65k
    # vocabulary whose types alternate. One call honours each AddedToken's own ``special`` flag (what
    # add_special_tokens would set), and since every token is already in the vocabulary, order cannot
    # change an id.
    added = [(i, t, ty == CONTROL) for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (CONTROL, USER_DEFINED)]
    tok.add_tokens([AddedToken(t, single_word=False, lstrip=False, rstrip=False, normalized=not special,
                               special=special) for _, t, special in added])

    # The ids must be exactly the file's.
    decoder = tok.get_added_tokens_decoder()
    for i, t, special in added:
        got = decoder.get(i)
        if got is None or got.content != t or got.special != special:
            raise Lfm2npError(f"{source}: {K_TOKENS}[{i}] {t!r} did not land at id {i} in the rebuilt tokenizer")
    if tok.get_vocab_size(with_added_tokens=True) != len(vocab) or len(decoder) != len(added):
        raise Lfm2npError(f"{source}: the rebuilt tokenizer has {tok.get_vocab_size(with_added_tokens=True)} "
                          f"tokens, expected {len(vocab)}")
    return tok
