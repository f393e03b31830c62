"""Prompts files: many prompts for one command (``trace``, ``golden``, ``conformance make`` over a corpus).

A prompts file is one of

- ``.txt``: one prompt per line (UTF-8; empty lines skipped), each a plain text tokenized with BOS first;
- ``.json``: a list of prompts; ``.jsonl``: one prompt per line (empty lines skipped).

A JSON prompt is a string (a plain text) or an object with exactly one of ``"text"`` (a plain text),
``"messages"`` (a conversation rendered by the checkpoint's chat template, with optional ``"tools"``; the
template emits its own BOS) or ``"ids"`` (token ids, as given), and optionally ``"id"``, the prompt's name (letters,
digits, ``-``, ``_`` and ``.``; by default ``p0``, ``p1``, ...), unique in the file.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import Lfm2npError
from .files import parse_json

#: the largest prompts file read (a corpus of prompts, not a corpus of text: perplexity reads those)
MAX_BYTES = 256 << 20
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class Prompt:
    """One prompt: its ``id``, its ``kind`` ("text", "chat" or "ids") and what it is made of."""

    id: str
    kind: str
    text: str | None = None
    messages: tuple[dict[str, Any], ...] | None = None
    tools: tuple[Any, ...] | None = None
    ids: tuple[int, ...] | None = field(default=None)

    def encode(self, tokenizer: Any) -> list[int]:
        """The prompt's token ids: a text with BOS first, a conversation through the chat template, ids as given."""
        if self.kind == "ids":
            return list(self.ids or ())
        if tokenizer is None:
            raise Lfm2npError(f"prompt {self.id!r} is {self.kind}: it needs the model's tokenizer, and this model "
                              f"has none (give token ids instead: {{\"ids\": [...]}})")
        if self.kind == "chat":
            return tokenizer.encode_chat(list(self.messages or ()), list(self.tools) if self.tools else None)
        return tokenizer.encode(self.text, add_bos=True)

    def rendered(self, tokenizer: Any) -> str | None:
        """The text the model reads (a conversation as its template renders it), or None for ids."""
        if self.kind == "chat":
            return tokenizer.apply_chat_template(list(self.messages or ()), list(self.tools) if self.tools else None)
        return self.text

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "kind": self.kind}
        for key in ("text", "messages", "tools", "ids"):
            value = getattr(self, key)
            if value is not None:
                out[key] = list(value) if isinstance(value, tuple) else value
        return out


def prompt_from(item: Any, where: str, default_id: str) -> Prompt:
    """One prompt of a file (see the module docstring); ``where`` names it in errors."""
    if isinstance(item, str):
        item = {"text": item}
    if not isinstance(item, dict):
        raise Lfm2npError(f"{where}: a prompt is a string or an object; got a JSON {type(item).__name__}")
    unknown = sorted(set(item) - {"id", "text", "messages", "tools", "ids"})
    if unknown:
        raise Lfm2npError(f"{where}: unknown key {unknown[0]!r}; a prompt has one of text, messages (with tools) "
                          f"or ids, and optionally an id")
    given = [k for k in ("text", "messages", "ids") if k in item]
    if len(given) != 1:
        raise Lfm2npError(f"{where}: a prompt has exactly one of text, messages or ids; got "
                          f"{', '.join(given) or 'none'}")
    name = item.get("id", default_id)
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise Lfm2npError(f"{where}: id {name!r:.60} is not a name (letters, digits, '-', '_', '.'; at most 64)")
    if "tools" in item and "messages" not in item:
        raise Lfm2npError(f"{where}: tools go with messages (a conversation)")
    if "text" in item:
        if not isinstance(item["text"], str) or not item["text"]:
            raise Lfm2npError(f"{where}: text must be a non-empty string")
        return Prompt(name, "text", text=item["text"])
    if "ids" in item:
        ids = item["ids"]
        if not isinstance(ids, list) or not ids or any(type(i) is not int or i < 0 for i in ids):
            raise Lfm2npError(f"{where}: ids must be a non-empty list of token ids (integers >= 0)")
        return Prompt(name, "ids", ids=tuple(ids))
    messages, tools = item["messages"], item.get("tools")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise Lfm2npError(f"{where}: messages must be a non-empty list of objects (role, content)")
    if tools is not None and not isinstance(tools, list):
        raise Lfm2npError(f"{where}: tools must be a list")
    return Prompt(name, "chat", messages=tuple(messages), tools=tuple(tools) if tools else None)


def read_prompts(path: "str | os.PathLike[str]") -> list[Prompt]:
    """The prompts of a prompts file (see the module docstring); an :class:`Lfm2npError` names the file and the
    line or item at fault."""
    path = Path(path)
    if not path.is_file():
        raise Lfm2npError(f"{path}: no such prompts file")
    if path.stat().st_size > MAX_BYTES:
        raise Lfm2npError(f"{path}: {path.stat().st_size} bytes; a prompts file may hold at most {MAX_BYTES >> 20} MiB")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise Lfm2npError(f"{path}: not UTF-8 text ({e})") from None
    except OSError as e:
        raise Lfm2npError(f"{path}: cannot read it ({e.strerror or e})") from None
    suffix = path.suffix.lower()
    if suffix == ".json":
        items = parse_json(text, str(path), "prompts file")
        if not isinstance(items, list):
            raise Lfm2npError(f"{path}: a .json prompts file holds a list of prompts; got a JSON "
                              f"{type(items).__name__}")
        places = [f"{path}: prompt {n}" for n in range(len(items))]
    else:
        lines = [(n, line) for n, line in enumerate(text.replace("\r\n", "\n").split("\n"), 1) if line.strip()]
        places = [f"{path}:{n}" for n, _ in lines]
        if suffix == ".jsonl":
            items = [parse_json(line, place, "prompt") for (_, line), place in zip(lines, places)]
        else:
            items = [line for _, line in lines]
    prompts = [prompt_from(item, place, f"p{n}") for n, (item, place) in enumerate(zip(items, places))]
    if not prompts:
        raise Lfm2npError(f"{path}: holds no prompt")
    seen: dict[str, str] = {}
    for p, place in zip(prompts, places):
        if p.id in seen:
            raise Lfm2npError(f"{place}: id {p.id!r} is already the id of {seen[p.id]}")
        seen[p.id] = place
    return prompts


def prompts_json(prompts: "list[Prompt]") -> str:
    """The prompts as a ``.json`` prompts file (read back by :func:`read_prompts`)."""
    return json.dumps([p.to_json() for p in prompts], indent=1, ensure_ascii=False) + "\n"
