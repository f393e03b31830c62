"""What each operation of a chat template may make, checked before it runs (for
:mod:`lfm2np.io.template_sandbox`): where an argument sets the size of the result -- a width, a count, a
separator, a fill, an indent, a repetition, a precision, the values of a format -- the size is bounded from
the arguments and refused beyond the limit, so that nothing too large is ever allocated. ``limits`` is the
rendering's :class:`~lfm2np.io.template_sandbox.Limits` (its ``size``, ``fits``, ``reserve`` and ``items``).
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping, Sequence

MAX_INT_BITS = 4096  #: limit on an integer a template computes
TEXT = (str, bytes, bytearray)

__all__ = ["Stop", "check_binop", "check_method", "check_filter", "MAX_INT_BITS"]


class Stop(BaseException):
    """A template ran past a limit. A BaseException, so that no ``except Exception`` inside jinja2 (its
    compile-time folding, ``Template.generate``) can swallow it."""


_PERCENT = re.compile(r"%(?:\(([^)]*)\))?[-+ #0]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?(.?)", re.S)  # a %-conversion
#: the characters str / bytes ``splitlines`` breaks at, and ``split()`` splits at (``str.isspace``)
_BREAKS = {str: "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029", bytes: b"\n\r"}
_SPACES = {str: "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007"
                "\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000", bytes: b" \t\n\r\x0b\x0c"}
#: filters that split a string into a list first, and the characters they split at (None: every character)
_PIECES = {"title": _SPACES[str] + "-({[<", "urlize": _SPACES[str], "wordwrap": _SPACES[str] + "-",
           "indent": _BREAKS[str], "sort": None, "slice": None, "groupby": None, "unique": None, "dictsort": None}


def _count(text: Any, chars: Any) -> int:
    """How many characters of ``text`` are among ``chars`` (an upper bound on the pieces it splits into, counted
    without making them: a regular expression's ``subn`` keeps every piece between its matches)."""
    return sum(text.count(c) for c in chars)


def _arg(args: Sequence[Any], kwargs: Mapping[str, Any], i: int, name: str, default: Any = None) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _percent_size(limits: Any, fmt: str, args: Any) -> int:
    """An upper bound on ``len(fmt % args)``: the text, and per conversion the larger of its width or
    precision and the size of its value."""
    values = iter(args if isinstance(args, tuple) else (args,))
    total = len(fmt)
    for m in _PERCENT.finditer(fmt):
        key, width, precision, conversion = m.groups()
        if "*" in (width, precision):
            raise Stop("it formats with a '*' width or precision")
        if conversion != "%":
            value = args.get(key) if key is not None and isinstance(args, Mapping) else next(values, None)
            total += max(int(width or 0), int(precision or 0)) + limits.size(value)
    return total


def check_binop(limits: Any, operator: str, left: Any, right: Any) -> None:
    """Refuse a ``*``, ``**``, ``+`` or ``%`` whose result would be too large, before computing it."""
    if operator == "*":
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, TEXT + (list, tuple)) and _int(n) and n > 0 and limits.size(seq) * n > limits.max_chars:
                raise Stop(f"it repeats a {type(seq).__name__} of {len(seq)} {n} times (more than "
                            f"{limits.max_chars} characters or items)")
        if _int(left) and _int(right) and left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise Stop(f"it multiplies into an integer of more than {MAX_INT_BITS} bits")
    elif operator == "**":
        if _int(left) and _int(right) and right > 0 and abs(left) > 1 and right * math.log2(abs(left)) > MAX_INT_BITS:
            raise Stop(f"it computes {left} ** {right}, an integer of more than {MAX_INT_BITS} bits")
    elif operator == "+":
        if isinstance(left, TEXT + (list, tuple)) and isinstance(right, TEXT + (list, tuple)):
            limits.fits(limits.size(left) + limits.size(right), "'+' would make a value")
    elif operator == "%" and isinstance(left, str):
        limits.fits(_percent_size(limits, left, right), "'%' formatting would make a string")


def check_method(limits: Any, s: Any, name: str, args: tuple, kwargs: Mapping[str, Any]) -> tuple:
    """Refuse a string method whose result would be too large, before calling it; the arguments to call it with
    (an iterable joined is made a list first)."""
    what, kind = f"{type(s).__name__}.{name}()", str if isinstance(s, str) else bytes
    if name in ("center", "ljust", "rjust", "zfill") and _int(_arg(args, kwargs, 0, "width")):
        limits.fits(max(len(s), args[0]), f"{what} would make a string")
    elif name == "expandtabs" and _int(tab := _arg(args, kwargs, 0, "tabsize", 8)):
        limits.fits(len(s) + s.count(kind("\t", "ascii") if kind is bytes else "\t") * max(tab, 0),
                    f"{what} would make a string")
    elif name == "replace" and len(args) >= 2 and all(isinstance(a, type(s)) for a in args[:2]):
        old, new, count = args[0], args[1], _arg(args, kwargs, 2, "count", -1)
        n = s.count(old) if old else len(s) + 1
        n = min(n, count) if _int(count) and count >= 0 else n
        limits.fits(len(s) + n * max(0, len(new) - len(old)), f"{what} would make a string")
    elif name == "join" and args:
        items = limits.items(args[0], what)
        limits.fits(sum(map(limits.size, items)) + len(s) * max(len(items) - 1, 0), f"{what} would make a string")
        args = (items, *args[1:])
    elif name == "translate" and args and isinstance(args[0], Mapping):
        longest = max((len(v) for v in args[0].values() if isinstance(v, str)), default=1)
        limits.fits(len(s) * max(longest, 1), f"{what} would make a string")
    elif name in ("split", "rsplit", "splitlines"):
        sep, most = (None, -1) if name == "splitlines" else \
            (_arg(args, kwargs, 0, "sep"), _arg(args, kwargs, 1, "maxsplit", -1))
        chars = (_BREAKS if name == "splitlines" else _SPACES)[kind]
        pieces = s.count(sep) + 1 if isinstance(sep, TEXT) and sep else _count(s, chars) + 1
        pieces = min(pieces, most + 1) if _int(most) and most >= 0 else pieces
        limits.fits(len(s) + 3 * pieces, f"{what} would make a list")
        limits.reserve(pieces * 64 + len(s), what)
    return args


def check_filter(limits: Any, name: str, args: tuple, kwargs: Mapping[str, Any]) -> tuple:
    """Refuse a filter call whose result would be too large, before running it (``args`` are its arguments
    after the context jinja2 passes to some); the arguments to run it with (iterables made lists first)."""
    what = f"filter {name!r}"
    value, size = (args[0], limits.size(args[0])) if args else (None, 0)
    if isinstance(value, str) and name in _PIECES:  # the filter splits the text into a list first
        chars = _PIECES[name]
        limits.reserve(64 * (len(value) if chars is None else 2 * _count(value, chars) + 2),
                       f"{what} would split the text into pieces that")
    first = _arg(args, kwargs, 1, {"center": "width", "indent": "width", "wordwrap": "width", "replace": "old",
                                   "join": "d", "batch": "linecount", "slice": "slices", "sum": "attribute",
                                   "round": "precision", "urlize": "trim_url_limit"}.get(name, ""))
    if name == "center" and _int(first):
        limits.fits(max(size, first), f"{what} would make a string")
    elif name == "indent":
        width = first if first is not None else 4
        per_line = width if _int(width) else len(width) if isinstance(width, str) else 0
        lines = value.count("\n") + 1 if isinstance(value, str) else size
        limits.fits(size + lines * per_line, f"{what} would make a string")
    elif name == "wordwrap":
        wrap = _arg(args, kwargs, 3, "wrapstring")
        lines = 2 * size // max(first if _int(first) else 79, 1) + (value.count("\n") if isinstance(value, str) else 0)
        limits.fits(size + (lines + 2) * (len(wrap) if isinstance(wrap, str) else 2), f"{what} would make a string")
    elif name == "replace" and isinstance(value, str) and isinstance(first, str):
        new, count = _arg(args, kwargs, 2, "new"), _arg(args, kwargs, 3, "count")
        n = value.count(first) if first else len(value) + 1
        n = min(n, count) if _int(count) and count >= 0 else n
        limits.fits(len(value) + n * max(0, len(str(new)) - len(first)), f"{what} would make a string")
    elif name in ("list", "join") and args:
        items = limits.items(value, what)
        sep = len(first) if isinstance(first, str) else 0
        limits.fits(sum(map(limits.size, items)) + sep * max(len(items) - 1, 0), f"{what} would make a value")
        args = (items, *args[1:])
    elif name == "format" and isinstance(value, str):
        limits.fits(_percent_size(limits, value, dict(kwargs) or tuple(args[1:])), f"{what} would make a string")
    elif name == "batch" and _int(first) and _arg(args, kwargs, 2, "fill_with") is not None:
        limits.fits(first * (limits.size(_arg(args, kwargs, 2, "fill_with")) + 1), f"{what} would fill a list")
    elif name == "slice" and _int(first):
        limits.fits(3 * first + size, f"{what} would make lists")
        limits.reserve(64 * first, what)
    elif name == "sum" and isinstance(_arg(args, kwargs, 2, "start", 0), TEXT + (list, tuple)) and args:
        items = limits.items(value, what)
        total = limits.size(_arg(args, kwargs, 2, "start")) + sum(map(limits.size, items))
        limits.fits(total, f"{what} would make a value")
        if total * len(items) > 1 << 30:  # each step copies what was summed so far
            raise Stop(f"{what} of {len(items)} sequences would copy more than {1 << 30} items")
        args = (items, *args[1:])
    elif name == "round" and _int(first) and abs(first) * math.log2(10) > MAX_INT_BITS:
        raise Stop(f"{what} to {first} digits computes an integer of more than {MAX_INT_BITS} bits")
    elif name == "urlize":
        extra = sum(len(_arg(args, kwargs, i, k) or "") for i, k in ((3, "target"), (4, "rel")))
        limits.fits(size * (3 + extra), f"{what} would make a string")
    elif name in ("tojson", "pprint"):
        indent = _arg(args, kwargs, 1, "indent") if name == "tojson" else 1
        seps = _arg(args, kwargs, 2, "separators") or (", ", ": ")
        per_level = indent if _int(indent) else len(indent) if isinstance(indent, str) else 0
        total, depth = limits.measure(value)
        limits.fits(total * (1 + sum(len(str(s)) for s in seps) + per_level * depth) + per_level,
                    f"{what} would make a string")
    return args
