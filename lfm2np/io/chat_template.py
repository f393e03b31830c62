"""Chat templates: reading them from a checkpoint's files and rendering them, bounded, as transformers does.

Where a template comes from (transformers' order): ``chat_template.jinja`` if present, else
``chat_template.json`` (``{"chat_template": ...}``), else ``tokenizer_config.json``'s ``chat_template``;
a GGUF file's is ``tokenizer.chat_template``. A template is a string, or the named-templates list
``[{"name": ..., "template": ...}, ...]``, of which ``"default"`` is used (none: an error naming the names).

Rendering (:func:`render_template`) uses jinja2 (an optional dependency, ``pip install 'lfm2np[chat]'``)
the way transformers does: an immutable sandbox with ``trim_blocks`` and ``lstrip_blocks``, the
loop-controls extension, ``tojson`` without escaping or sorting, and ``raise_exception``. A template is
code from a file, so rendering is bounded, and every failure is an :class:`~lfm2np.errors.Lfm2npError`
naming where the template came from:

- the sandbox forbids attribute access to internals (jinja2's own guarantee); ``range`` stops at 100,000
  items (jinja2's ``MAX_RANGE``);
- time: the template's own code runs under a line tracer that stops it after :data:`MAX_SECONDS` (a loop
  nested in a loop, a long ``range``); recursion stops at Python's recursion limit;
- size: ``*`` (repetition), ``**`` and string ``%`` formatting refuse results beyond :data:`MAX_CHARS`
  characters / 4096-bit integers before computing them, ``lipsum`` is capped, and the output stops at
  :data:`MAX_CHARS` characters;
- any exception inside the template (an undefined variable used as a value, a ``TypeError``, a division by
  zero, a syntax error, a sandbox violation) becomes ``Lfm2npError("<source>: chat template ...")``.

Not bounded: memory a template builds by repeated concatenation (``~``) within the time limit.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import Lfm2npError
from .safetensors_file import no_duplicate_keys

MAX_SECONDS = 10.0  #: wall-clock limit of one rendering
MAX_CHARS = 1 << 24  #: limit on the output and on any one repeated / formatted string (16 Mi characters)
MAX_BYTES = 1 << 26  #: largest template or tokenizer_config.json file read (64 MiB)

__all__ = ["render_template", "template_from_value", "read_text", "read_json_object", "have_jinja2",
           "MAX_SECONDS", "MAX_CHARS"]


def have_jinja2() -> bool:
    return importlib.util.find_spec("jinja2") is not None


# ------------------------------------------------------------------------------------------ files
def read_text(path: Path, what: str = "file") -> str:
    """A UTF-8 text file, or an error naming it (not a file, unreadable, too large, not UTF-8)."""
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise Lfm2npError(f"{path}: not a regular file")
        if size > MAX_BYTES:
            raise Lfm2npError(f"{path}: {size} bytes; a {what} of more than {MAX_BYTES} bytes is refused")
        data = path.read_bytes()
    except OSError as e:
        raise Lfm2npError(f"{path}: cannot read the {what} ({e.strerror or e})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Lfm2npError(f"{path}: not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r})") from None


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file whose top level is an object (``tokenizer_config.json``, ``chat_template.json``)."""
    text = read_text(path, "JSON file")
    try:
        value = json.loads(text, object_pairs_hook=no_duplicate_keys)
    except (ValueError, RecursionError) as e:
        raise Lfm2npError(f"{path}: not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(value, dict):
        raise Lfm2npError(f"{path}: the top level is a JSON {type(value).__name__}; expected an object")
    return value


def template_from_value(value: Any, where: str) -> str | None:
    """A ``chat_template`` value as found in a file: a string, None, or the named-templates list (its
    ``"default"`` entry). Anything else is an error naming ``where`` (e.g. ``tokenizer_config.json:
    chat_template``)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        names = []
        for i, entry in enumerate(value):
            if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str) \
                    or not isinstance(entry.get("template"), str):
                raise Lfm2npError(f"{where}[{i}] must be an object with string 'name' and 'template'; "
                                  f"got {_short(entry)}")
            names.append(entry["name"])
        for entry in value:
            if entry["name"] == "default":
                return entry["template"]
        raise Lfm2npError(f"{where} is a list of named templates without 'default' (names: "
                          f"{', '.join(repr(n) for n in names) or 'none'}); lfm2np uses 'default'")
    raise Lfm2npError(f"{where} is a {type(value).__name__} ({_short(value)}); expected a string or a list of "
                      "{'name', 'template'} objects")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---------------------------------------------------------------------------------------- rendering
class _Stop(Exception):
    """Raised inside a template that ran past its limits."""


class _Budget:
    """A line tracer for the template's own code (jinja2 compiles it under the file name ``<template>``):
    every 1024 lines it checks the clock and stops the rendering past the deadline."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds
        self.seconds = seconds
        self.lines = 0

    def __call__(self, frame: Any, event: str, arg: Any) -> Any:
        return self.line if frame.f_code.co_filename == "<template>" else None

    def line(self, frame: Any, event: str, arg: Any) -> Any:
        if event == "line":
            self.lines += 1
            if not self.lines & 1023 and time.monotonic() > self.deadline:
                raise _Stop(f"ran for more than {self.seconds:g} s ({self.lines} template lines executed): an "
                            "endless or nested loop?")
        return self.line


_WIDTH = re.compile(r"%[-+ #0]*(\*|\d+)?(?:\.(\*|\d+))?")


def _check_binop(operator: str, left: Any, right: Any) -> None:
    """Refuse a ``*``, ``**`` or ``%`` whose result would be huge, before computing it."""
    if operator == "*":
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_CHARS:
                raise _Stop(f"repeats a {type(seq).__name__} of {len(seq)} {n} times (more than {MAX_CHARS})")
    elif operator == "**":
        if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1 \
                and right * math.log2(abs(left)) > 4096:
            raise _Stop(f"computes {left} ** {right}, an integer of more than 4096 bits")
    elif operator == "%" and isinstance(left, str):
        for m in _WIDTH.finditer(left):
            widths = [w for w in m.groups() if w]
            if "*" in widths or any(int(w) > MAX_CHARS for w in widths):
                raise _Stop("formats with a width or precision beyond the output limit (or '*')")


def render_template(template: str, messages: Sequence[Mapping[str, Any]], tools: Sequence[Any] | None = None,
                    add_generation_prompt: bool = True, *, source: str = "chat template",
                    max_seconds: float | None = None, max_chars: int | None = None, **special_tokens: str) -> str:
    """Render a Jinja chat template as transformers does, bounded (see the module docstring; the limits
    default to :data:`MAX_SECONDS` and :data:`MAX_CHARS`). ``source`` names the template in error messages
    (a file, or a file and key)."""
    max_seconds = MAX_SECONDS if max_seconds is None else max_seconds
    max_chars = MAX_CHARS if max_chars is None else max_chars
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise Lfm2npError("rendering a checkpoint's chat template needs jinja2: pip install 'lfm2np[chat]'") from None

    class Environment(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "%"})

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            _check_binop(operator, left, right)
            return super().call_binop(context, operator, left, right)

    def raise_exception(message: str) -> None:
        raise Lfm2npError(f"{source}: chat template: {message}")

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = Environment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    lipsum = env.globals.get("lipsum")
    if lipsum is not None:
        env.globals["lipsum"] = lambda n=5, html=True, lo=20, hi=100: lipsum(min(int(n), 100), html, lo, hi)
    try:
        compiled = env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise Lfm2npError(f"{source}: chat template syntax error at line {e.lineno}: {e.message}") from None
    except (jinja2.TemplateError, RecursionError, MemoryError) as e:
        raise Lfm2npError(f"{source}: chat template does not compile ({type(e).__name__}: {e})") from None

    budget = _Budget(max_seconds)
    pieces: list[str] = []
    length = 0
    previous = sys.gettrace()
    sys.settrace(budget)
    try:
        for piece in compiled.generate(messages=list(messages), tools=list(tools) if tools else None,
                                       add_generation_prompt=add_generation_prompt, **special_tokens):
            length += len(piece)
            if length > max_chars:
                raise _Stop(f"produced more than {max_chars} characters")
            pieces.append(piece)
    except Lfm2npError:
        raise
    except _Stop as e:
        raise Lfm2npError(f"{source}: chat template stopped: it {e}") from None
    except RecursionError:
        raise Lfm2npError(f"{source}: chat template recursed too deeply (past Python's recursion limit "
                          f"{sys.getrecursionlimit()})") from None
    except jinja2.TemplateError as e:
        raise Lfm2npError(f"{source}: chat template failed ({type(e).__name__}: {e})") from None
    except Exception as e:  # TypeError, ZeroDivisionError, OverflowError, ... raised by the template's own code
        raise Lfm2npError(f"{source}: chat template failed while rendering ({type(e).__name__}: {e})") from None
    finally:
        sys.settrace(previous)
    return "".join(pieces)
