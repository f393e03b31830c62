"""The tokenizer metadata llama.cpp's converter writes into a GGUF file for an LFM2 ``tokenizer.json``:
a port of ``convert_hf_to_gguf.py``'s ``TextModel._set_vocab_gpt2`` / ``get_vocab_base`` and gguf-py's
``SpecialVocab``, used by :func:`lfm2np.io.gguf_write.write_gguf` (the reverse, GGUF metadata back to a
tokenizer, is :mod:`lfm2np.io.gguf_tokenizer`).

Sources (llama.cpp as vendored in llama-cpp-python 0.3.36, 2026-10; line numbers drift between trees):
``conversion/lfm2.py`` (LFM2Model, LFM2MoeModel keep the base ``set_vocab``), ``conversion/base.py``
(``_set_vocab_gpt2``, ``get_vocab_base``, ``does_token_look_special``, ``get_vocab_base_pre``: LFM2's
tokenizers hash to ``"lfm2"``), ``gguf-py/gguf/vocab.py`` (``SpecialVocab._try_load_from_tokenizer_json``:
merges, special ids, add_bos/add_eos, the chat template; ``_try_load_from_config_json``: config.json ids).
/work/notes/gguf-tokenizer.md has the details.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from tokenizers import Tokenizer

from ..errors import Lfm2npError
from .gguf_tokenizer import LFM2_SPLIT_REGEX

__all__ = ["tokenizer_metadata", "tokenizer_metadata_from_dir", "does_token_look_special"]


def does_token_look_special(token: str) -> bool:
    """llama.cpp ``TextModel.does_token_look_special`` (``conversion/base.py``): added tokens the converter
    types CONTROL even when they are not marked special."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
            or (token.startswith("<unused") and token.endswith(">")))


def _lfm2_pre_tokenizer(tok_json: Mapping[str, Any]) -> bool:
    """Whether a tokenizer.json splits text as LFM2's does: Split(LFM2's regex, isolated) then ByteLevel
    without its own regex -- the tokenizers llama.cpp's converter recognises (by a hash of their ids on a
    check text) as ``tokenizer.ggml.pre = "lfm2"``."""
    pre = tok_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if not isinstance(parts, list) or len(parts) != 2:
        return False
    split, byte_level = parts
    return (split.get("type") == "Split" and split.get("pattern") == {"Regex": LFM2_SPLIT_REGEX}
            and split.get("behavior") == "Isolated" and not split.get("invert")
            and byte_level.get("type") == "ByteLevel" and byte_level.get("add_prefix_space") is False
            and byte_level.get("use_regex") is False)


def _add_flags(tok_json: Mapping[str, Any], tok_config: Mapping[str, Any]) -> dict[str, bool]:
    """add_bos / add_eos / add_sep as gguf-py's SpecialVocab derives them: from the post-processor (ByteLevel:
    bos and eos false unless set; a TemplateProcessing whose single template starts with the BOS token:
    add_bos, ends with the EOS token: add_eos; its pair template ``A [x] B``: add_sep when x is the SEP or EOS
    token), then tokenizer_config's ``add_*_token`` for what is still unset."""
    flags: dict[str, bool] = {}
    bos, eos, sep = (_content(tok_config.get(f"{t}_token")) for t in ("bos", "eos", "sep"))
    post = tok_json.get("post_processor") or {}
    for proc in post.get("processors", [post]) if isinstance(post, Mapping) else []:
        if proc.get("type") == "ByteLevel":
            flags.setdefault("bos", False)
            flags.setdefault("eos", False)
        elif proc.get("type") == "TemplateProcessing":
            single, pair = proc.get("single", []), proc.get("pair", [])
            first = last = None
            if len(single) > 1:
                first = single[0].get("SpecialToken", {}).get("id")
                if first:
                    flags["bos"] = first == bos
                last = single[-1].get("SpecialToken", {}).get("id")
                if last:
                    flags["eos"] = last == eos
            if pair:  # "A [sep] [eos] B": add_sep when the middle special token is the SEP or EOS token
                start = 1 if first and pair[0].get("SpecialToken", {}).get("id") == first else 0
                stop = -1 if last and pair[-1].get("SpecialToken", {}).get("id") == last else None
                middle = pair[start:stop]
                if middle and middle[0].get("Sequence", {}).get("id") == "A" \
                        and middle[-1].get("Sequence", {}).get("id") == "B" and middle[1:-1]:
                    marks = [m.get("SpecialToken", {}).get("id") for m in middle[1:-1][:2]]
                    flags["sep"] = (marks[0] in (sep, eos) and not last) or (len(marks) == 2 and marks[1] in (sep, eos))
    for t in ("bos", "eos"):
        value = tok_config.get(f"add_{t}_token")
        if isinstance(value, bool):
            flags.setdefault(t, value)
    return flags


def _content(entry: Any) -> str | None:
    if isinstance(entry, Mapping):
        entry = entry.get("content")
    return entry if isinstance(entry, str) else None


def tokenizer_metadata(tok_json: Mapping[str, Any], tok_config: Mapping[str, Any] | None = None, *,
                       vocab_size: int | None = None, token_ids: Mapping[str, int | None] | None = None,
                       chat_template: str | None = None, pre: str | None = None) -> dict[str, Any]:
    """The ``tokenizer.*`` keys llama.cpp's converter writes for an LFM2 ``tokenizer.json`` (parsed), its
    ``tokenizer_config.json`` (parsed) and, when the config has no ``chat_template``, ``chat_template``
    (``chat_template.jinja``'s text).

    A port of ``TextModel._set_vocab_gpt2`` (LFM2's converter classes keep the base ``set_vocab``):
    ``get_vocab_base`` writes every id ``0..vocab_size-1`` (``vocab_size``: config.json's, else the vocabulary's
    size); an id with no token becomes ``[PAD{i}]``, type 5 (UNUSED); an added token is written as its content
    (a non-normalized one first passed through decode(encode(.)), as the converter does), type 3 (CONTROL) when
    special or when it looks special, else type 4 (USER_DEFINED, U+2581 -> space); every other token type 1
    (NORMAL). gguf-py's ``SpecialVocab`` gives the merges (pairs joined by one space, a space inside a part
    written U+0120), the bos/eos/pad ids (the first added token whose content is tokenizer_config's
    ``{bos,eos,pad}_token``, else ``token_ids``: config.json's), add_bos/add_eos (:func:`_add_flags`) and the
    chat template. ``tokenizer.ggml.pre`` is ``"lfm2"`` -- what the converter's hash of LFM2's tokenizer gives --
    when the pre-tokenizer is LFM2's (``pre`` overrides it, e.g. ``"llama-bpe"`` as Ollama writes it); any
    other pre-tokenizer is refused, as the converter refuses a hash it does not know.
    """
    tok_config = dict(tok_config or {})
    if pre is None:
        if not _lfm2_pre_tokenizer(tok_json):
            raise Lfm2npError("tokenizer.json: its pre-tokenizer is not LFM2's (Split on LFM2's regex, then ByteLevel "
                              "without regex); llama.cpp's converter would not recognise it (pass pre= to force a name)")
        pre = "lfm2"
    model = tok_json.get("model") or {}
    if model.get("type") != "BPE":
        raise Lfm2npError(f"tokenizer.json: model type {model.get('type')!r}; LFM2 tokenizers are byte-level BPE")
    try:
        hf = Tokenizer.from_str(json.dumps(tok_json))
    except Exception as e:  # the tokenizers library raises its own exception types
        raise Lfm2npError(f"tokenizer.json: not a readable tokenizer ({e})") from None
    vocab = hf.get_vocab(with_added_tokens=True)
    added = {a["content"]: a for a in tok_json.get("added_tokens", [])}
    reverse = {i: t for t, i in vocab.items()}
    n = vocab_size if vocab_size is not None else max(vocab.values()) + 1
    if max(vocab.values()) >= n:  # get_vocab_base: assert max(tokenizer.vocab.values()) < vocab_size
        raise Lfm2npError(f"tokenizer.json has token id {max(vocab.values())}, outside vocab_size {n}")
    tokens, types = [], []
    for i in range(n):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(5)  # UNUSED
            continue
        token = reverse[i]
        if token in added:
            info = added[token]
            if not info.get("normalized", True):  # "pre-normalize" non-normalized added tokens
                token = hf.decode(hf.encode(token, add_special_tokens=False).ids, skip_special_tokens=False)
            if info.get("special") or does_token_look_special(token):
                types.append(3)  # CONTROL
            else:
                token = token.replace("\u2581", " ")
                types.append(4)  # USER_DEFINED
        else:
            types.append(1)  # NORMAL
        tokens.append(token)

    merges = model.get("merges") or []
    if merges and not isinstance(merges[0], str):  # pairs (transformers >= 4.45): join, a space inside -> U+0120
        merges = [" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in pair)
                  for pair in merges]
    meta: dict[str, Any] = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
                            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
                            "tokenizer.ggml.merges": list(merges)}
    for typ, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id")):
        content = _content(tok_config.get(f"{typ}_token"))
        ids = [a["id"] for a in tok_json.get("added_tokens", []) if a.get("content") == content]
        value = ids[0] if ids else (token_ids or {}).get(f"{typ}_token_id")
        if isinstance(value, int) and 0 <= value < n:
            meta[f"tokenizer.ggml.{key}"] = value
    for typ, value in _add_flags(tok_json, tok_config).items():
        meta[f"tokenizer.ggml.add_{typ}_token"] = value
    template = tok_config.get("chat_template", chat_template)
    if isinstance(template, list):  # named templates: the writer keeps "default" under tokenizer.chat_template
        template = next((t.get("template") for t in template if isinstance(t, Mapping) and t.get("name") == "default"),
                        None)
    if isinstance(template, str):
        meta["tokenizer.chat_template"] = template
    return meta


def tokenizer_metadata_from_dir(directory: "str | os.PathLike[str]", vocab_size: int | None = None,
                                token_ids: Mapping[str, int | None] | None = None,
                                pre: str | None = None) -> dict[str, Any]:
    """:func:`tokenizer_metadata` of a checkpoint directory's ``tokenizer.json``, ``tokenizer_config.json``
    and ``chat_template.jinja``, read as gguf-py's SpecialVocab reads them."""
    d = Path(directory)

    def load(name: str) -> Any:
        try:
            return json.loads((d / name).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise Lfm2npError(f"{d / name}: not readable JSON ({e})") from None

    if not (d / "tokenizer.json").is_file():
        raise Lfm2npError(f"{d}: no tokenizer.json to write into the GGUF file")
    tok_config = load("tokenizer_config.json") if (d / "tokenizer_config.json").is_file() else {}
    jinja = d / "chat_template.jinja"
    template = jinja.read_text(encoding="utf-8") if jinja.is_file() else None
    return tokenizer_metadata(load("tokenizer.json"), tok_config, vocab_size=vocab_size, token_ids=token_ids,
                              chat_template=template, pre=pre)


