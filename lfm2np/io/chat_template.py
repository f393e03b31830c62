"""Chat templates: reading them from a checkpoint's files and rendering them, bounded, as transformers does.

Where a template comes from (transformers' order): ``chat_template.jinja`` if present, else
``chat_template.json`` (``{"chat_template": ...}``), else ``tokenizer_config.json``'s ``chat_template``;
a GGUF file's is ``tokenizer.chat_template``. A template is a string, or the named-templates list
``[{"name": ..., "template": ...}, ...]``, of which ``"default"`` is used (none: an error naming the names).

Rendering (:func:`render_template`) uses jinja2 (a dependency of lfm2np, imported when a template is first
rendered) the way transformers does: an immutable sandbox with ``trim_blocks`` and ``lstrip_blocks``, the
loop-controls extension, ``tojson`` without escaping or sorting, and ``raise_exception``. A template is
code from a file, so rendering is bounded (:mod:`lfm2np.io.template_sandbox` has the details), and every
failure is an :class:`~lfm2np.errors.Lfm2npError` naming where the template came from:

- the sandbox forbids attribute access to internals (jinja2's own guarantee); ``range`` stops at 100,000
  items (jinja2's ``MAX_RANGE``);
- time: compiling and rendering stop after :data:`MAX_SECONDS` of wall-clock time, whatever runs: the
  template's own code, or the filters, tests, globals and methods it calls (``range(10**5)|slice(10**9)``,
  a ``select`` over a long list); recursion stops at Python's recursion limit;
- size: no value the template makes may exceed :data:`MAX_CHARS` (16 Mi) characters or items, counted as
  written out (a list of 1,000 references to a 1,000-character string is 1,002,002); an operation whose
  arguments set the size (``center``, ``ljust``, ``format``, ``%``, ``join``, ``*``, ``indent``,
  ``wordwrap``, ``replace``, ``slice``, ``batch``, ``round`` ...) is refused before it runs; the output
  stops at :data:`MAX_CHARS` characters; an integer may not pass 4096 bits;
- memory: the values one rendering makes take at most :data:`MAX_BUILT` (256 MiB) in all, kept or not;
- any exception inside the template (an undefined variable used as a value, a ``TypeError``, a division by
  zero, a syntax error, a sandbox violation) becomes ``Lfm2npError("<source>: chat template ...")``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import Lfm2npError, shown
from .files import parse_json
from .template_sandbox import Limits, Stop, active, compiled

MAX_SECONDS = 10.0  #: wall-clock limit of one rendering
MAX_CHARS = 1 << 24  #: limit on the output and on the size of any one value a template makes (16 Mi)
MAX_BUILT = 1 << 28  #: limit on the bytes of all the values one rendering makes (256 MiB)
MAX_BYTES = 1 << 26  #: largest template or tokenizer_config.json file read (64 MiB)

__all__ = ["render_template", "template_from_value", "read_text", "read_json_object", "have_jinja2",
           "MAX_SECONDS", "MAX_CHARS", "MAX_BUILT"]


def have_jinja2() -> bool:
    """Whether jinja2 can be imported (it is a dependency of lfm2np: False only in a broken installation)."""
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
        raise Lfm2npError(f"{path}: not UTF-8 text (byte {e.start}: {shown(data[e.start:e.start + 1])})") from None


def read_json_object(path: Path, what: str = "JSON file") -> dict[str, Any]:
    """A JSON file whose top level is an object (``tokenizer_config.json``, ``chat_template.json``,
    ``generation_config.json``): :func:`read_text`'s bounds, then the one strict JSON reader
    (:func:`lfm2np.io.files.parse_json`: no key twice in one object, nesting the parser can follow); every error
    names the file (and ``what`` it is)."""
    value = parse_json(read_text(path, what), str(path), what)
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
        seen: set[str] = set()
        twice = next((n for n in names if n in seen or seen.add(n)), None)  # linear: the list may be long
        if twice is not None:  # which of the two would transformers use? neither is certainly meant
            raise Lfm2npError(f"{where} names two templates {shown(twice)}; expected each name once")
        for entry in value:
            if entry["name"] == "default":
                return entry["template"]
        raise Lfm2npError(f"{where} is a list of named templates without 'default' (names: "
                          f"{', '.join(repr(n) for n in names) or 'none'}); lfm2np uses 'default'")
    raise Lfm2npError(f"{where} is a {type(value).__name__} ({_short(value)}); expected a string or a list of "
                      "{'name', 'template'} objects")


def _short(value: Any) -> str:
    return shown(value, 60)


# ---------------------------------------------------------------------------------------- rendering
def render_template(template: str, messages: Sequence[Mapping[str, Any]], tools: Sequence[Any] | None = None,
                    add_generation_prompt: bool = True, *, source: str = "chat template",
                    max_seconds: float | None = None, max_chars: int | None = None, **special_tokens: str) -> str:
    """Render a Jinja chat template as transformers does, bounded (see the module docstring; the limits
    default to :data:`MAX_SECONDS`, :data:`MAX_CHARS` and :data:`MAX_BUILT`). ``source`` names the template in
    error messages (a file, or a file and key)."""
    try:
        import jinja2
    except ImportError:
        raise Lfm2npError("rendering a checkpoint's chat template needs jinja2, a dependency of lfm2np that is "
                          "missing from this installation: pip install jinja2") from None
    limits = Limits(MAX_SECONDS if max_seconds is None else max_seconds,
                    MAX_CHARS if max_chars is None else max_chars, MAX_BUILT, source)
    pieces: list[str] = []
    length = 0
    try:
        with active(limits):  # compiling and rendering, filters and methods included, run on the clock
            try:
                template_code = compiled(template)
            except jinja2.TemplateSyntaxError as e:
                raise Lfm2npError(f"{source}: chat template syntax error at line {e.lineno}: {e.message}") from None
            except (jinja2.TemplateError, RecursionError, MemoryError) as e:
                raise Lfm2npError(f"{source}: chat template does not compile ({type(e).__name__}: {e})") from None
            for piece in template_code.generate(messages=list(messages), tools=list(tools) if tools else None,
                                                add_generation_prompt=add_generation_prompt, **special_tokens):
                length += len(piece)
                if length > limits.max_chars:
                    raise Stop(f"it produced more than {limits.max_chars} characters")
                pieces.append(piece)
    except Lfm2npError:
        raise
    except Stop as e:
        raise Lfm2npError(f"{source}: chat template stopped: {e}") from None
    except RecursionError:
        raise Lfm2npError(f"{source}: chat template recursed too deeply (past Python's recursion limit "
                          f"{sys.getrecursionlimit()})") from None
    except MemoryError:
        raise Lfm2npError(f"{source}: chat template ran out of memory") from None
    except jinja2.TemplateError as e:
        raise Lfm2npError(f"{source}: chat template failed ({type(e).__name__}: {e})") from None
    except Exception as e:  # TypeError, ZeroDivisionError, OverflowError, ... raised by the template's own code
        raise Lfm2npError(f"{source}: chat template failed while rendering ({type(e).__name__}: {e})") from None
    return "".join(pieces)
