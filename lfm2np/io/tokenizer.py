"""The tokenizer (a ``tokenizers`` wrapper) and the LFM2 chat format.

A checkpoint directory holds ``tokenizer.json`` (byte-level BPE), usually ``tokenizer_config.json``
(special tokens, often the ``chat_template``) and sometimes ``chat_template.jinja`` (which wins, as in
transformers).

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
jinja2 (an optional dependency, ``pip install 'lfm2np[chat]'``) the way transformers does, and falls back
to the built-in format only when jinja2 is missing.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from tokenizers import Tokenizer as Backend

from ..errors import Lfm2npError

BOS, EOS_TEXT, IM_START, IM_END = "<|startoftext|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"
TOOL_LIST_START, TOOL_LIST_END = "<|tool_list_start|>", "<|tool_list_end|>"
TOOL_RESPONSE_START, TOOL_RESPONSE_END = "<|tool_response_start|>", "<|tool_response_end|>"
ROLES = ("system", "user", "assistant", "tool")

Message = Mapping[str, Any]


def _tojson(value: Any) -> str:
    """JSON as transformers' chat templates write it (``tojson``): no ASCII escaping, no key sorting,
    ``", "`` and ``": "`` separators."""
    return json.dumps(value, ensure_ascii=False)


def format_chat(messages: Sequence[Message], tools: Sequence[Any] | None = None,
                add_generation_prompt: bool = True, bos_token: str = BOS) -> str:
    """The LFM2 chat format (the template LFM2 checkpoints ship, written out in Python).

    A leading system message becomes the system turn; ``tools`` (JSON objects or strings) are listed
    in it between ``<|tool_list_start|>`` and ``<|tool_list_end|>``; ``tool`` messages are wrapped in
    ``<|tool_response_start|>``/``<|tool_response_end|>``; non-string content is written as JSON.
    """
    _check_messages(messages)
    system, rest = "", list(messages)
    if rest and rest[0]["role"] == "system":
        system, rest = rest[0]["content"], rest[1:]
    if tools:
        listed = ", ".join(t if isinstance(t, str) else _tojson(t) for t in tools)
        system = system + ("\n" if system else "") + f"List of tools: {TOOL_LIST_START}[{listed}]{TOOL_LIST_END}"
    out = [bos_token]
    if system:
        out.append(f"{IM_START}system\n{system}{IM_END}\n")
    for m in rest:
        content = m["content"] if isinstance(m["content"], str) else _tojson(m["content"])
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
            raise Lfm2npError(f"message {i} must have 'role' and 'content'; got {m!r}")
        if m["role"] not in ROLES:
            raise Lfm2npError(f"message {i} has role {m['role']!r}; expected one of {', '.join(ROLES)}")
    if messages and messages[0]["role"] == "system" and not isinstance(messages[0]["content"], str):
        raise Lfm2npError("message 0: a system message's content must be a string")


def render_template(template: str, messages: Sequence[Message], tools: Sequence[Any] | None = None,
                    add_generation_prompt: bool = True, **special_tokens: str) -> str:
    """Render a Jinja chat template as transformers does: a sandboxed environment with ``trim_blocks`` and
    ``lstrip_blocks``, the loop-controls extension, ``tojson`` without escaping or sorting, and
    ``raise_exception``. Needs jinja2."""
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise Lfm2npError("rendering a checkpoint's chat template needs jinja2: pip install 'lfm2np[chat]'") from None

    def raise_exception(message: str) -> None:
        raise Lfm2npError(f"chat template: {message}")

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    try:
        compiled = env.from_string(template)
        return compiled.render(messages=list(messages), tools=list(tools) if tools else None,
                               add_generation_prompt=add_generation_prompt, **special_tokens)
    except jinja2.TemplateError as e:
        raise Lfm2npError(f"chat template: {e}") from None


class Tokenizer:
    """A checkpoint's tokenizer: encode/decode with special tokens, and its chat format."""

    def __init__(self, backend: Any, chat_template: str | None = None, special: Mapping[str, str] | None = None,
                 source: str | None = None):
        self.backend = backend
        self.chat_template = chat_template
        self.special = dict(special or {})
        self.source = source
        self.special.setdefault("bos_token", BOS)

    @classmethod
    def from_dir(cls, path: "str | os.PathLike[str]") -> "Tokenizer":
        """Load ``tokenizer.json`` and, when present, ``tokenizer_config.json`` and ``chat_template.jinja``."""
        directory = Path(path)
        file = directory / "tokenizer.json"
        if not file.is_file():
            raise Lfm2npError(f"{directory}: no tokenizer.json")
        try:
            backend = Backend.from_file(str(file))
        except Exception as e:  # the tokenizers library raises its own exception types
            raise Lfm2npError(f"{file}: not a readable tokenizer ({e})") from None
        special: dict[str, str] = {}
        template = None
        config_file = directory / "tokenizer_config.json"
        if config_file.is_file():
            try:
                config = json.loads(config_file.read_text(encoding="utf-8"))
            except ValueError as e:
                raise Lfm2npError(f"{config_file}: not valid JSON ({e})") from None
            for key in ("bos_token", "eos_token", "pad_token"):
                value = config.get(key)
                if isinstance(value, Mapping):
                    value = value.get("content")
                if isinstance(value, str):
                    special[key] = value
            template = config.get("chat_template")
            if isinstance(template, list):  # the named-templates form: take "default"
                template = next((t["template"] for t in template if t.get("name") == "default"), None)
        jinja_file = directory / "chat_template.jinja"
        if jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        return cls(backend, template, special, str(directory))

    # ------------------------------------------------------------------ tokens
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of ``text``; special-token strings in it become their ids. BOS only when asked
        (the tokenizer's own post-processor is never applied, so nothing is added behind your back)."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_bos:
            bos = self.token_to_id(self.special["bos_token"])
            if bos is None:
                raise Lfm2npError(f"the tokenizer has no BOS token {self.special['bos_token']!r}")
            ids = [bos, *ids]
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(int(i) for i in ids), skip_special_tokens=skip_special_tokens)

    def stop_ids(self, extra: Iterable[int] = ()) -> set[int]:
        """Ids that end a reply: ``<|im_end|>``, ``<|endoftext|>``, the configured EOS, and ``extra``
        (e.g. the model config's ``eos_token_id``)."""
        names = {IM_END, EOS_TEXT, self.special.get("eos_token", IM_END)}
        ids = {self.token_to_id(n) for n in names}
        return {i for i in ids if i is not None} | set(extra)

    def stream(self, ids: Iterable[int], skip_special_tokens: bool = True) -> Iterator[str]:
        """Text pieces as ``ids`` arrive. A piece is released only once its bytes form whole characters,
        so a multi-byte character split across tokens is never shown half-decoded."""
        seen: list[int] = []
        shown = ""
        text = ""
        for i in ids:
            seen.append(int(i))
            text = self.decode(seen, skip_special_tokens=skip_special_tokens)
            if text.endswith("\ufffd"):
                continue  # an incomplete UTF-8 sequence: wait for the next token
            if text.startswith(shown):
                piece, shown = text[len(shown):], text
                if piece:
                    yield piece
        if text != shown:  # the end: release what was held back (a dangling byte shows as U+FFFD)
            yield text[len(shown):] if text.startswith(shown) else text

    # -------------------------------------------------------------------- chat
    def apply_chat_template(self, messages: Sequence[Message], tools: Sequence[Any] | None = None,
                            add_generation_prompt: bool = True, use_builtin: bool | None = None) -> str:
        """The conversation as text. The checkpoint's own template when it has one (rendered with jinja2);
        the built-in LFM2 format when it has none, when jinja2 is missing, or when ``use_builtin``."""
        _check_messages(messages)
        if use_builtin is None:
            use_builtin = self.chat_template is None or not _have_jinja2()
        if use_builtin:
            return format_chat(messages, tools, add_generation_prompt, self.special["bos_token"])
        if self.chat_template is None:
            raise Lfm2npError(f"{self.source}: the tokenizer has no chat template")
        return render_template(self.chat_template, messages, tools, add_generation_prompt, **self.special)

    def encode_chat(self, messages: Sequence[Message], tools: Sequence[Any] | None = None,
                    add_generation_prompt: bool = True, use_builtin: bool | None = None) -> list[int]:
        """Token ids of the rendered conversation (it carries its own BOS)."""
        return self.encode(self.apply_chat_template(messages, tools, add_generation_prompt, use_builtin))


def _have_jinja2() -> bool:
    return importlib.util.find_spec("jinja2") is not None
