"""The tokenizer (a ``tokenizers`` wrapper) and the LFM2 chat format.

A checkpoint directory holds ``tokenizer.json`` (byte-level BPE), usually ``tokenizer_config.json``
(special tokens, often the ``chat_template``) and sometimes ``chat_template.jinja`` (which wins, as in
transformers): :meth:`Tokenizer.from_dir`. A GGUF file carries the same tokenizer as metadata:
:meth:`Tokenizer.from_gguf` rebuilds it (:mod:`lfm2np.io.gguf_tokenizer`) with its ``tokenizer.chat_template``.
:meth:`Tokenizer.load` takes any model argument (a directory, a cached repo id, a ``.gguf`` file, ``"embedded"``). Every
malformed file, field or template is an :class:`~lfm2np.errors.Lfm2npError` naming the file and the field.

The LFM2 chat format is built in (:func:`format_chat`)::

    <|startoftext|><|im_start|>system
    {system}[\\nList of tools: <|tool_list_start|>[{tool}, {tool}]<|tool_list_end|>]<|im_end|>
    <|im_start|>user
    {text}<|im_end|>
    <|im_start|>tool
    <|tool_response_start|>{result}<|tool_response_end|><|im_end|>
    <|im_start|>assistant

The format emits BOS itself: its output is encoded without adding another. When a checkpoint ships its
own template, that template is the authority: :meth:`Tokenizer.apply_chat_template` renders it with
jinja2 (a dependency of lfm2np) the way transformers does; only in an installation where jinja2 is missing
does the built-in format stand in, with a warning.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import AbstractSet, Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
from tokenizers import Tokenizer as Backend
from tokenizers.decoders import DecodeStream

from ..errors import Lfm2npError, shown
from . import hub
from .chat_template import have_jinja2, read_json_object, read_text, render_template, template_from_value
from .files import present
from .gguf_file import GgufFile
from .gguf_tokenizer import tokenizer_from_gguf_metadata

BOS, EOS_TEXT, IM_START, IM_END = "<|startoftext|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"
TOOL_LIST_START, TOOL_LIST_END = "<|tool_list_start|>", "<|tool_list_end|>"
TOOL_RESPONSE_START, TOOL_RESPONSE_END = "<|tool_response_start|>", "<|tool_response_end|>"
ROLES = ("system", "user", "assistant", "tool")

Message = Mapping[str, Any]


def _tojson(value: Any, what: str = "a value") -> str:
    """JSON as transformers' chat templates write it (``tojson``): no ASCII escaping, no key sorting,
    ``", "`` and ``": "`` separators. A value JSON cannot write (a set, bytes, an object, nesting too deep, an
    integer of thousands of digits) is an error naming ``what``."""
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError) as e:
        raise Lfm2npError(f"{what} cannot be written as JSON ({str(e)[:100]})") from None


def format_chat(messages: Sequence[Message], tools: Sequence[Any] | None = None,
                add_generation_prompt: bool = True, bos_token: str = BOS) -> str:
    """The LFM2 chat format (the template LFM2 checkpoints ship, written out in Python).

    A leading system message becomes the system turn; ``tools`` (JSON objects or strings) are listed
    in it between ``<|tool_list_start|>`` and ``<|tool_list_end|>``; ``tool`` messages are wrapped in
    ``<|tool_response_start|>``/``<|tool_response_end|>``; non-string content is written as JSON.
    """
    _check_messages(messages)
    _check_tools(tools)
    _check_flag(add_generation_prompt, "add_generation_prompt")
    if not isinstance(bos_token, str):
        raise Lfm2npError(f"bos_token must be a token string; got {_what(bos_token)}")
    system, rest = "", list(messages)
    if rest and rest[0]["role"] == "system":
        system, rest = rest[0]["content"], rest[1:]
    if tools:
        listed = ", ".join(t if isinstance(t, str) else _tojson(t, f"tools[{i}]") for i, t in enumerate(tools))
        system = system + ("\n" if system else "") + f"List of tools: {TOOL_LIST_START}[{listed}]{TOOL_LIST_END}"
    out = [bos_token]
    if system:
        out.append(f"{IM_START}system\n{system}{IM_END}\n")
    for i, m in enumerate(rest, start=len(messages) - len(rest)):
        content = m["content"] if isinstance(m["content"], str) else _tojson(m["content"], f"message {i}'s content")
        if m["role"] == "tool":
            content = f"{TOOL_RESPONSE_START}{content}{TOOL_RESPONSE_END}"
        out.append(f"{IM_START}{m['role']}\n{content}{IM_END}\n")
    if add_generation_prompt:
        out.append(f"{IM_START}assistant\n")
    return "".join(out)


def _check_messages(messages: Sequence[Message]) -> None:
    if not isinstance(messages, (list, tuple)):
        raise Lfm2npError(f"messages must be a list of {{'role', 'content'}} objects; got {type(messages).__name__}")
    if not messages:
        raise Lfm2npError("messages is empty: a conversation needs at least one message")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise Lfm2npError(f"message {i} must have 'role' and 'content'; got {shown(m)}")
        if m["role"] not in ROLES:
            raise Lfm2npError(f"message {i} has role {shown(m['role'])}; expected one of {', '.join(ROLES)}")
    if messages and messages[0]["role"] == "system" and not isinstance(messages[0]["content"], str):
        raise Lfm2npError("message 0: a system message's content must be a string")


def _check_tools(tools: Any) -> None:
    if tools is None:
        return
    if not isinstance(tools, (list, tuple)):
        raise Lfm2npError(f"tools must be a list of tool descriptions (JSON objects or strings); got {_what(tools)}")
    for i, tool in enumerate(tools):
        if not isinstance(tool, (str, Mapping)):
            raise Lfm2npError(f"tools[{i}] must be a JSON object or a string; got {_what(tool)}")


def _what(value: Any) -> str:
    """A wrong value for a message: its type and a short repr."""
    return f"{type(value).__name__} {_clip(value)}"


def _clip(value: Any) -> str:
    return shown(value, 40)


def _check_text(text: Any, what: str) -> None:
    if not isinstance(text, str):
        raise Lfm2npError(f"{what} takes text (a str); got {_what(text)}"
                          + (" (decode bytes first)" if isinstance(text, (bytes, bytearray)) else ""))
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise Lfm2npError(f"{what}: the text holds a lone surrogate {text[e.start]!r} at position {e.start}, which "
                          f"is not Unicode text (no UTF-8 bytes to tokenize)") from None


def _check_flag(value: Any, name: str) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise Lfm2npError(f"{name} must be True or False; got {_what(value)}")


def _id_sequence(ids: Any, what: str) -> Iterable[Any]:
    """``ids`` as an iterable of ids (a sequence, an array with an axis, an iterator); never text, bytes or a
    single number."""
    zero_d = isinstance(ids, np.ndarray) and ids.ndim == 0
    unordered = isinstance(ids, (AbstractSet, Mapping))  # no order of ids (or keys taken for ids)
    if isinstance(ids, (str, bytes, bytearray)) or zero_d or unordered or not isinstance(ids, Iterable):
        raise Lfm2npError(f"{what} takes a sequence of token ids; got {_what(ids)}")
    return ids


def _special_token(value: Any, where: str) -> str | None:
    """A special token of tokenizer_config.json: a string, an AddedToken object ``{"content": ...}``, or
    absent (None)."""
    if isinstance(value, Mapping):
        value = value.get("content")
        if not isinstance(value, str):
            raise Lfm2npError(f"{where} is an object whose 'content' is {type(value).__name__}; expected a string")
    if value is not None and not isinstance(value, str):
        raise Lfm2npError(f"{where} is a {type(value).__name__} ({str(value)[:40]}); expected a token string or "
                          "an {\"content\": ...} object")
    if value == "":
        raise Lfm2npError(f"{where} is an empty string; expected a token")
    return value


class Tokenizer:
    """A checkpoint's tokenizer: encode/decode with special tokens, and its chat format."""

    def __init__(self, backend: Any, chat_template: str | None = None, special: Mapping[str, str] | None = None,
                 source: str | None = None, *, template_source: str | None = None):
        self.backend = backend
        self.chat_template = chat_template
        self.special = dict(special or {})
        self.source = source
        #: where the chat template came from (a file, or a file and key), for error messages
        self.template_source = template_source or source
        self.special.setdefault("bos_token", BOS)
        self._said_builtin = False  # warned that jinja2 is missing and the built-in format stands in
        self._id_space: int | None = None  # vocab_size, computed once (it walks the vocabulary)

    @classmethod
    def load(cls, model: "str | os.PathLike[str]") -> "Tokenizer":
        """The tokenizer of any model argument: a ``.gguf`` file (the tokenizer it carries), a checkpoint
        directory, a repo id in the local Hugging Face cache, or ``"embedded"`` (the shipped tiny model)."""
        if not isinstance(model, (str, os.PathLike)) or not str(model).strip():
            raise Lfm2npError(f"Tokenizer.load takes a checkpoint directory, a cached repo id, a .gguf file or "
                              f"'embedded'; got {_what(model)}")
        if str(model).lower().endswith(".gguf"):
            return cls.from_gguf(model)
        return cls.from_dir(hub.resolve(model))

    @classmethod
    def from_gguf(cls, path: "str | os.PathLike[str]") -> "Tokenizer":
        """The tokenizer a GGUF file carries (``tokenizer.ggml.*``), rebuilt for ``tokenizers`` so that it
        encodes and decodes as the ``tokenizer.json`` the file was converted from, with the file's
        ``tokenizer.chat_template`` and its BOS / EOS / padding tokens. A file whose pre-tokenizer is not
        LFM2's is refused (``"llama-bpe"``, ``"llama3"``, ``"llama-v3"`` -- the same split -- warn)."""
        path = Path(path)
        if not present(path, "a GGUF file"):
            raise Lfm2npError(f"{path}: no such GGUF file")
        with GgufFile(path) as f:
            metadata = f.metadata
        backend, extras = tokenizer_from_gguf_metadata(metadata, str(path))
        special = {k: extras[k] for k in ("bos_token", "eos_token", "pad_token") if extras[k] is not None}
        return cls(backend, extras["chat_template"], special, str(path),
                   template_source=f"{path}: tokenizer.chat_template")

    @classmethod
    def from_dir(cls, path: "str | os.PathLike[str]") -> "Tokenizer":
        """Load ``tokenizer.json`` and, when present, ``tokenizer_config.json`` (``bos_token``, ``eos_token``,
        ``pad_token``: a string or an ``{"content": ...}`` object, each a token of tokenizer.json;
        ``chat_template``), ``chat_template.json`` and ``chat_template.jinja`` (the template's sources in
        increasing priority)."""
        directory = Path(path)
        file = directory / "tokenizer.json"
        if not present(file, "the checkpoint's tokenizer.json"):
            raise Lfm2npError(f"{directory}: no tokenizer.json")
        text = read_text(file, "tokenizer.json")
        try:
            backend = Backend.from_str(text)
        except Exception as e:  # the tokenizers library raises its own exception types
            raise Lfm2npError(f"{file}: not a readable tokenizer ({str(e)[:200]})") from None
        special: dict[str, str] = {}
        template, template_source = None, None
        config_file = directory / "tokenizer_config.json"
        if present(config_file, "the tokenizer config (JSON)"):
            config = read_json_object(config_file, "tokenizer config")
            for key in ("bos_token", "eos_token", "pad_token"):
                value = _special_token(config.get(key), f"{config_file}: {key}")
                if value is not None and backend.token_to_id(value) is None:
                    raise Lfm2npError(f"{config_file}: {key} {shown(value)} is not a token of {file.name}")
                if value is not None:
                    special[key] = value
            where = f"{config_file}: chat_template"
            template = template_from_value(config.get("chat_template"), where)
            template_source = where if template is not None else None
        json_file = directory / "chat_template.json"
        if present(json_file, "the chat template file (JSON)"):
            where = f"{json_file}: chat_template"
            holder = read_json_object(json_file, "chat template file")
            value = template_from_value(holder.get("chat_template"), where)
            if value is not None:
                template, template_source = value, where
        jinja_file = directory / "chat_template.jinja"
        if present(jinja_file, "the chat template (a Jinja text file)"):
            template, template_source = read_text(jinja_file, "chat template"), str(jinja_file)
        return cls(backend, template, special, str(directory), template_source=template_source)

    # ------------------------------------------------------------------ tokens
    @property
    def vocab_size(self) -> int:
        """The size of the id space: the largest token id + 1 (ids a vocabulary leaves unused count too, so a
        model's vocabulary must be at least this large)."""
        vocab = self.backend.get_vocab(with_added_tokens=True)
        return max(vocab.values()) + 1 if vocab else 0

    def token_to_id(self, token: str) -> int | None:
        """The id of ``token`` (a string), or None when it is not a token."""
        if not isinstance(token, str):
            raise Lfm2npError(f"token_to_id takes a token string; got {_what(token)}")
        _check_text(token, "token_to_id")  # a lone surrogate: no UTF-8 bytes to look up
        return self.backend.token_to_id(token)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of ``text``; special-token strings in it become their ids. BOS only when asked
        (the tokenizer's own post-processor is never applied, so nothing is added behind your back).
        ``text`` must be a ``str`` of valid Unicode (no lone surrogate: it has no UTF-8 bytes to tokenize)."""
        _check_text(text, "encode")
        _check_flag(add_bos, "add_bos")
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_bos:
            bos = self.token_to_id(self.special["bos_token"])
            if bos is None:
                raise Lfm2npError(f"the tokenizer has no BOS token {shown(self.special['bos_token'])}")
            ids = [bos, *ids]
        return ids

    def checked_id(self, i: Any, what: str = "decode") -> int:
        """``i`` as a token id: an integer (not a bool, not a float) in ``0 .. vocab_size - 1``; ids a vocabulary
        leaves unused inside that range decode as no text."""
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
            raise Lfm2npError(f"{what}: token id {_what(i)} is not an integer")
        if self._id_space is None:
            self._id_space = self.vocab_size
        if not 0 <= int(i) < self._id_space:
            raise Lfm2npError(f"{what}: token id {_clip(int(i))} is outside the vocabulary (0..{self._id_space - 1})")
        return int(i)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """The text of ``ids`` (a sequence of token ids, each checked by :meth:`checked_id`)."""
        _check_flag(skip_special_tokens, "skip_special_tokens")
        return self.backend.decode([self.checked_id(i) for i in _id_sequence(ids, "decode")],
                                   skip_special_tokens=skip_special_tokens)

    def stop_ids(self, extra: "int | Iterable[int]" = ()) -> set[int]:
        """Ids that end a reply: ``<|im_end|>``, ``<|endoftext|>``, the configured EOS, and ``extra`` (an id or
        several, e.g. the model config's ``eos_token_id``)."""
        extra = [extra] if isinstance(extra, (int, np.integer)) and not isinstance(extra, (bool, np.bool_)) else \
            _id_sequence(extra, "stop_ids")
        for i in extra:
            if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)) or not 0 <= i < 2**63:
                raise Lfm2npError(f"stop_ids: {_what(i)} is not a token id (an integer in 0 .. 2**63 - 1)")
        names = {IM_END, EOS_TEXT, self.special.get("eos_token", IM_END)}
        ids = {self.token_to_id(n) for n in names}
        return {i for i in ids if i is not None} | {int(i) for i in extra}

    def stream(self, ids: Iterable[int], skip_special_tokens: bool = True) -> Iterator[str]:
        """Text pieces as ``ids`` arrive. A piece is released only once its bytes form whole characters,
        so a multi-byte character split across tokens is never shown half-decoded; the pieces joined are
        ``decode(ids)``. Linear in the number of ids: ``tokenizers``' ``DecodeStream`` decodes each new id
        against a short window of the previous ones, never the whole prefix again."""
        _check_flag(skip_special_tokens, "skip_special_tokens")
        stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        seen: list[int] = []
        shown: list[str] = []
        pending = False  # ids fed since the last piece (an incomplete character, or nothing to show yet)
        for i in _id_sequence(ids, "stream"):
            seen.append(self.checked_id(i, "stream"))
            piece = stream.step(self.backend, seen[-1])
            pending = piece is None
            if piece:
                shown.append(piece)
                yield piece
        if pending:  # the end: release what was held back (a dangling byte shows as U+FFFD)
            text, head = self.decode(seen, skip_special_tokens=skip_special_tokens), "".join(shown)
            tail = text[len(head):] if text.startswith(head) else ""
            if tail:
                yield tail

    # -------------------------------------------------------------------- chat
    def apply_chat_template(self, messages: Sequence[Message], tools: Sequence[Any] | None = None,
                            add_generation_prompt: bool = True, use_builtin: bool | None = None) -> str:
        """The conversation as text. The checkpoint's own template when it has one (rendered with jinja2);
        the built-in LFM2 format when it has none, when ``use_builtin``, or (with a warning) when jinja2, a
        dependency, is missing from the installation."""
        _check_messages(messages)
        _check_tools(tools)
        _check_flag(add_generation_prompt, "add_generation_prompt")
        if use_builtin is not None:
            _check_flag(use_builtin, "use_builtin")
        if use_builtin is None:
            use_builtin = self.chat_template is None or not have_jinja2()
            if self.chat_template is not None and use_builtin and not self._said_builtin:
                self._said_builtin = True  # once per tokenizer: a chat would say it every turn
                warnings.warn(f"{self.template_source or self.source}: the checkpoint has its own chat template, "
                              f"but jinja2, a dependency of lfm2np, is missing from this installation: the "
                              f"built-in LFM2 format is used instead (pip install jinja2 to render the "
                              f"checkpoint's)", stacklevel=2)
        if use_builtin:
            return format_chat(messages, tools, add_generation_prompt, self.special["bos_token"])
        if self.chat_template is None:
            raise Lfm2npError(f"{self.source}: the tokenizer has no chat template")
        return render_template(self.chat_template, messages, tools, add_generation_prompt,
                               source=self.template_source or str(self.source), **self.special)

    def encode_chat(self, messages: Sequence[Message], tools: Sequence[Any] | None = None,
                    add_generation_prompt: bool = True, use_builtin: bool | None = None) -> list[int]:
        """Token ids of the rendered conversation (it carries its own BOS)."""
        ids = self.encode(self.apply_chat_template(messages, tools, add_generation_prompt, use_builtin))
        if not ids:
            raise Lfm2npError(f"{self.template_source or self.source}: the chat template renders this conversation "
                              f"as no text at all")
        return ids

