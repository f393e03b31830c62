"""The sandbox chat templates render in (:func:`lfm2np.io.chat_template.render_template`): jinja2's immutable
sandbox, configured as transformers configures it, in which every operation that can make a value is bounded
before it runs, and everything the template runs (its own code, filters, tests, globals, methods) is on one
clock.

- Time: a line tracer over every Python frame while the template compiles and renders (jinja2's filters
  and tests are Python) checks the clock every 1024 lines, and every bounded operation checks it too.
- Size: the *size* of a value is its length written out (:class:`Limits`). Every value an operation of the
  template makes -- a filter, a method call, ``*`` ``**`` ``+`` ``%``, ``~``, a list, tuple or dict literal,
  the text of a macro or a ``{% set %}`` block, a namespace's attributes -- is held to ``max_chars``: where
  an argument sets the size (a width, a count, a separator, a fill, an indent, a repetition, a precision)
  the result's size is bounded before it is computed; otherwise it is measured when made. So printing,
  comparing, hashing or serialising any value costs at most that, however the template nests references.
- Memory: the bytes of all the values one rendering makes are counted (``sys.getsizeof``), whether kept or
  not, and held to ``max_built``.
- Nothing is evaluated while compiling (no constant folding), so no filter runs outside these checks.

A template that passes a limit raises :class:`Stop` (a BaseException: no ``except Exception`` in jinja2
swallows it); :func:`~lfm2np.io.chat_template.render_template` turns it into an ``Lfm2npError``.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
import types
from typing import Any, Mapping, Sequence

from ..errors import Lfm2npError

MAX_INT_BITS = 4096  #: limit on an integer a template computes

__all__ = ["Limits", "Stop", "environment", "MAX_INT_BITS"]


class Stop(BaseException):
    """A template ran past a limit. A BaseException, so that no ``except Exception`` inside jinja2 (its
    compile-time folding, ``Template.generate``) can swallow it."""


_FIELD = re.compile(r"(?:.?[<>=^])?[-+ ]?z?#?0?(\d*)[,_]?(?:\.(\d+))?[a-zA-Z%]?", re.S)  # a str.format spec
_PERCENT = re.compile(r"%(?:\(([^)]*)\))?[-+ #0]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?(.?)", re.S)  # a %-conversion
_BREAKS = {str: re.compile("[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]"), bytes: re.compile(b"[\n\r]")}
_SPACES = {str: re.compile(r"\s+"), bytes: re.compile(rb"\s+")}
_CONTAINERS = (list, tuple, dict, set, frozenset, type({}.keys()), type({}.values()), type({}.items()))
_TEXT = (str, bytes, bytearray)


class Limits:
    """One rendering's bounds (module docstring): the clock, the size of every value made, the bytes made.

    The *size* of a value is its length written out: a string's length; a list, tuple, dict or set's entries
    plus the sizes of what it holds, counted again for every reference (``[x, x]`` is twice ``x``); an
    integer's digits; a namespace the most it may hold; anything else 24. Every value an operation of the
    template makes is held to ``max_chars``, so that printing, comparing, hashing or serialising any value
    costs at most that, however its references nest."""

    def __init__(self, seconds: float, max_chars: int, max_built: int):
        self.seconds, self.max_chars, self.max_built = seconds, max_chars, max_built
        self.deadline = time.monotonic() + seconds
        self.lines = self.built = 0
        self.known: dict[int, tuple[Any, int, int]] = {}  # id -> (container, size, depth), the object kept alive
        self.namespace: type = type(None)  # the environment's namespace class (set when jinja2 is imported)

    def __call__(self, frame: Any, event: str, arg: Any) -> Any:  # sys.settrace: every frame but this module's
        return None if frame.f_code.co_filename == _HERE else self.line

    def line(self, frame: Any, event: str, arg: Any) -> Any:
        if event == "line":
            self.lines += 1
            if not self.lines & 1023:
                self.tick()
        return self.line

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise Stop(f"it ran for more than {self.seconds:g} s ({self.lines} lines of template and filter code "
                        "executed): an endless or nested loop?")

    def fits(self, size: int, what: str) -> None:
        if size > self.max_chars:
            raise Stop(f"{what} of {size} characters or items, more than the limit of {self.max_chars}")

    def reserve(self, nbytes: int, what: str) -> None:
        if self.built + nbytes > self.max_built:
            raise Stop(f"{what}: the values the template made would take more than {self.max_built} bytes")

    def made(self, value: Any, what: str, inputs: Sequence[Any] = ()) -> Any:
        """``value``, just made by ``what``: held to the size limit; a new one counts towards the bytes made."""
        self.tick()
        if isinstance(value, _TEXT + _CONTAINERS):
            self.fits(self.size(value), f"{what} would make a value")
            if not any(value is x for x in inputs):
                self.reserve(sys.getsizeof(value), what)
                self.built += sys.getsizeof(value)
        return value

    def leaf(self, value: Any) -> int | None:
        """The size of a value that is no container (None for a container)."""
        if isinstance(value, _TEXT):
            return len(value)
        if isinstance(value, _CONTAINERS):
            return None
        if isinstance(value, self.namespace):
            return self.max_chars  # its attributes are held below this as they are set (it may grow later)
        if isinstance(value, int):
            return value.bit_length() * 1233 // 4096 + 2  # decimal digits, and a sign
        return 24

    def size(self, value: Any) -> int:
        return self.measure(value)[0]

    def measure(self, value: Any) -> tuple[int, int]:
        """``(size, depth)`` of ``value``, each container measured once (no recursion: depth is unbounded)."""
        leaf = self.leaf(value)
        if leaf is not None:
            return leaf, 0
        stack, opened, steps = [value], set(), 0
        while stack:
            obj = stack[-1]
            if id(obj) in self.known:
                stack.pop()
                continue
            entries = list(obj.keys()) + list(obj.values()) if isinstance(obj, dict) else \
                [x for pair in obj for x in pair] if isinstance(obj, type({}.items())) else list(obj)
            todo = [x for x in entries if self.leaf(x) is None and id(x) not in self.known and id(x) not in opened]
            if todo and id(obj) not in opened:
                opened.add(id(obj))
                stack.extend(todo)
                continue
            stack.pop()
            opened.discard(id(obj))
            size, depth = len(entries) + 2, 0
            for x in entries:  # an entry still open is a cycle: it prints as '[...]'
                s, d = self.known[id(x)][1:] if id(x) in self.known else (self.leaf(x) or 5, 0)
                size, depth = size + s, max(depth, d)
            self.known[id(obj)] = (obj, size, depth + 1)
            steps += len(entries) + 1
            if steps > 1 << 16:
                steps = 0
                self.tick()
        return self.known[id(value)][1:]

    def items(self, iterable: Any, what: str) -> list:
        """``iterable`` as a list, stopped as soon as it holds too much."""
        out, size, nbytes = [], 0, 0
        for x in iterable:
            out.append(x)
            size, nbytes = size + self.size(x) + 1, nbytes + sys.getsizeof(x) + 8
            if not len(out) & 4095 or size > self.max_chars:
                self.fits(size, f"{what} would make a list")
                self.reserve(nbytes, what)
                self.tick()
        self.reserve(nbytes, what)
        return out


_HERE = Limits.tick.__code__.co_filename


def _arg(args: Sequence[Any], kwargs: Mapping[str, Any], i: int, name: str, default: Any = None) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _percent_size(limits: Limits, fmt: str, args: Any) -> int:
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


def _check_binop(limits: Limits, operator: str, left: Any, right: Any) -> None:
    """Refuse a ``*``, ``**``, ``+`` or ``%`` whose result would be too large, before computing it."""
    if operator == "*":
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, _TEXT + (list, tuple)) and _int(n) and n > 0 and limits.size(seq) * n > limits.max_chars:
                raise Stop(f"it repeats a {type(seq).__name__} of {len(seq)} {n} times (more than "
                            f"{limits.max_chars} characters or items)")
        if _int(left) and _int(right) and left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise Stop(f"it multiplies into an integer of more than {MAX_INT_BITS} bits")
    elif operator == "**":
        if _int(left) and _int(right) and right > 0 and abs(left) > 1 and right * math.log2(abs(left)) > MAX_INT_BITS:
            raise Stop(f"it computes {left} ** {right}, an integer of more than {MAX_INT_BITS} bits")
    elif operator == "+":
        if isinstance(left, _TEXT + (list, tuple)) and isinstance(right, _TEXT + (list, tuple)):
            limits.fits(limits.size(left) + limits.size(right), "'+' would make a value")
    elif operator == "%" and isinstance(left, str):
        limits.fits(_percent_size(limits, left, right), "'%' formatting would make a string")


def _check_method(limits: Limits, s: Any, name: str, args: tuple, kwargs: Mapping[str, Any]) -> tuple:
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
        pattern = (_BREAKS if name == "splitlines" else _SPACES)[kind]
        pieces = s.count(sep) + 1 if isinstance(sep, _TEXT) and sep else pattern.subn(kind(), s)[1] + 1
        pieces = min(pieces, most + 1) if _int(most) and most >= 0 else pieces
        limits.fits(len(s) + 3 * pieces, f"{what} would make a list")
        limits.reserve(pieces * 64 + len(s), what)
    return args


def _filter_check(limits: Limits, name: str, args: tuple, kwargs: Mapping[str, Any]) -> tuple:
    """Refuse a filter call whose result would be too large, before running it (``args`` are its arguments
    after the context jinja2 passes to some); the arguments to run it with (iterables made lists first)."""
    what = f"filter {name!r}"
    value, size = (args[0], limits.size(args[0])) if args else (None, 0)
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
    elif name == "sum" and isinstance(_arg(args, kwargs, 2, "start", 0), _TEXT + (list, tuple)) and args:
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


def environment(limits: Limits, source: str) -> Any:
    """jinja2's immutable sandbox, as transformers configures it, with every operation that makes a value bounded
    (the module docstring): filters, methods, ``*`` ``**`` ``+`` ``%``, ``~``, literals, blocks, namespaces."""
    from jinja2 import nodes
    from jinja2.compiler import CodeGenerator
    from jinja2.runtime import Markup
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedEscapeFormatter, SandboxedFormatter
    from jinja2.utils import Namespace, pass_context

    class Fields:
        """str.format: each field's width and value counted before it is formatted."""
        def __init__(self, env: Any, total: int, **kwargs: Any):
            super().__init__(env, **kwargs)
            self.total = total

        def format_field(self, value: Any, spec: str) -> Any:
            m = _FIELD.fullmatch(spec)
            self.total += max((int(g) for g in (m.groups() if m else ()) if g), default=0) + limits.size(value)
            limits.fits(self.total, "str.format() would make a string")
            return super().format_field(value, spec)

    class Formatter(Fields, SandboxedFormatter):
        pass

    class EscapeFormatter(Fields, SandboxedEscapeFormatter):
        pass

    class Generator(CodeGenerator):
        """Literals and ``~`` go through the environment's checks (jinja2 writes them as Python displays)."""
        def wrapped(self, visit: Any, node: Any, frame: Any, call: str = "environment.lfm2np_made(") -> None:
            self.write(call)
            visit(node, frame)
            self.write(")")

        def visit_List(self, node: Any, frame: Any) -> None:
            self.wrapped(super().visit_List, node, frame)

        def visit_Dict(self, node: Any, frame: Any) -> None:
            self.wrapped(super().visit_Dict, node, frame)

        def visit_Tuple(self, node: Any, frame: Any) -> None:
            if node.ctx == "load":
                self.wrapped(super().visit_Tuple, node, frame)
            else:
                super().visit_Tuple(node, frame)

        def visit_Concat(self, node: Any, frame: Any) -> None:
            join = "(markup_join if context.eval_ctx.volatile else str_join)" if frame.eval_ctx.volatile else \
                "markup_join" if frame.eval_ctx.autoescape else "str_join"
            self.write(f"environment.lfm2np_concat({join}, (")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

        def visit_EvalContextModifier(self, node: Any, frame: Any) -> None:
            if not all(isinstance(k.value, nodes.Const) for k in node.options):  # else evaluated while compiling
                self.fail("lfm2np renders {% autoescape %} with a constant only", node.lineno)
            super().visit_EvalContextModifier(node, frame)

    class LimitedNamespace(Namespace):
        """``namespace()``: its attributes together held to the size limit as they are set."""
        def __init__(*args: Any, **kwargs: Any) -> None:
            self, attrs = args[0], dict(*args[1:], **kwargs)
            sizes[id(self)] = (self, {k: limits.size(k) + limits.size(v) for k, v in attrs.items()})
            limits.fits(sum(sizes[id(self)][1].values()), "namespace() would hold values")
            Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            held = dict(sizes[id(self)][1], **{name: limits.size(name) + limits.size(value)})
            limits.fits(sum(held.values()), f"setting namespace attribute {name!r:.40} would make it hold values")
            sizes[id(self)][1].update(held)
            Namespace.__setitem__(self, name, value)

    sizes: dict[int, tuple[Any, dict[str, int]]] = {}
    limits.namespace = LimitedNamespace

    class Environment(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "+", "%"})
        code_generator_class = Generator

        @staticmethod
        def concat(parts: Any) -> str:  # the text of a macro, a {% set %} block, a {% filter %} block
            parts = list(parts)
            limits.fits(sum(map(len, parts)), "a block would make a string")
            return limits.made("".join(parts), "a block")

        def lfm2np_made(self, value: Any) -> Any:
            return limits.made(value, "a literal")

        def lfm2np_concat(self, join: Any, parts: tuple) -> Any:
            limits.fits(sum(map(limits.size, parts)), "'~' would make a string")
            return limits.made(join(parts), "'~'", parts)

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            _check_binop(limits, operator, left, right)
            return limits.made(super().call_binop(context, operator, left, right), f"'{operator}'", (left, right))

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
            limits.tick()
            owner, name = getattr(__obj, "__self__", None), getattr(__obj, "__name__", "a function")
            if isinstance(owner, _TEXT):
                args = _check_method(limits, owner, name, args, kwargs)
            return limits.made(super().call(__context, __obj, *args, **kwargs), f"{name}()", (owner, *args))

        def wrap_str_format(self, value: Any) -> Any:
            if not isinstance(value, (types.MethodType, types.BuiltinMethodType)) \
                    or value.__name__ not in ("format", "format_map") or not isinstance(value.__self__, str):
                return None
            text, as_map = value.__self__, value.__name__ == "format_map"

            def format(*args: Any, **kwargs: Any) -> str:
                if as_map and (kwargs or len(args) != 1):
                    raise TypeError("format_map() takes exactly one mapping argument")
                args, kwargs = ((), args[0]) if as_map else (args, kwargs)
                formatter = EscapeFormatter(self, len(text), escape=text.escape) if isinstance(text, Markup) \
                    else Formatter(self, len(text))
                return type(text)(formatter.vformat(text, args, kwargs))
            return format

    def bounded(name: str, function: Any) -> Any:
        passed = getattr(function, "jinja_pass_arg", None)  # a context / eval context / environment comes first
        skip = 0 if passed is None else 1

        def filtered(*args: Any, **kwargs: Any) -> Any:
            limits.tick()
            args = (*args[:skip], *_filter_check(limits, name, args[skip:], kwargs))
            return limits.made(function(*args, **kwargs), f"filter {name!r}", args)
        if passed is not None:
            filtered.jinja_pass_arg = passed  # type: ignore[attr-defined]
        return filtered

    def raise_exception(message: str) -> None:
        raise Lfm2npError(f"{source}: chat template: {message}")

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    # optimized=False and a finalize that needs the context: nothing is evaluated while compiling (jinja2 would
    # fold constant filters and concatenations then, outside every check)
    env = Environment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"],
                      optimized=False, finalize=pass_context(lambda context, value: value))
    env.filters["tojson"] = tojson
    env.filters = {name: bounded(name, f) for name, f in env.filters.items()}
    env.globals.update(raise_exception=raise_exception, namespace=LimitedNamespace)
    lipsum = env.globals.get("lipsum")
    if lipsum is not None:
        env.globals["lipsum"] = lambda n=5, html=True, lo=20, hi=100: lipsum(min(int(n), 100), html, lo, hi)
    return env
