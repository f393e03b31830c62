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
- Where an argument sets a result's size, :mod:`lfm2np.io.template_checks` bounds it before it runs.

One environment serves the process and the last compiled templates are kept (a chat renders the same one
every turn); the limits of a rendering are the thread's own (:func:`active`, :func:`now`), so threads may
render at once.

A template that passes a limit raises :class:`Stop` (a BaseException: no ``except Exception`` in jinja2
swallows it); :func:`~lfm2np.io.chat_template.render_template` turns it into an ``Lfm2npError``.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
import threading
import time
import types
from collections import OrderedDict
from typing import Any, Iterator, Sequence

from ..errors import Lfm2npError
from .template_checks import MAX_INT_BITS, Stop, check_binop, check_filter, check_method

__all__ = ["Limits", "Stop", "active", "compiled", "environment", "now", "MAX_INT_BITS", "CACHED"]


_FIELD = re.compile(r"(?:.?[<>=^])?[-+ ]?z?#?0?(\d*)[,_]?(?:\.(\d+))?[a-zA-Z%]?", re.S)  # a str.format spec
CONTAINERS = (list, tuple, dict, set, frozenset, type({}.keys()), type({}.values()), type({}.items()))
TEXT = (str, bytes, bytearray)


class Limits:
    """One rendering's bounds (module docstring): the clock, the size of every value made, the bytes made.

    The *size* of a value is its length written out: a string's length; a list, tuple, dict or set's entries
    plus the sizes of what it holds, counted again for every reference (``[x, x]`` is twice ``x``); an
    integer's digits; a namespace the most it may hold; anything else 24. Every value an operation of the
    template makes is held to ``max_chars``, so that printing, comparing, hashing or serialising any value
    costs at most that, however its references nest."""

    namespace: type = type(None)  #: the environment's namespace class (set when jinja2 is imported)

    def __init__(self, seconds: float, max_chars: int, max_built: int, source: str = "chat template"):
        self.seconds, self.max_chars, self.max_built, self.source = seconds, max_chars, max_built, source
        self.deadline = time.monotonic() + seconds
        self.lines = self.built = 0
        self.known: dict[int, tuple[Any, int, int]] = {}  # id -> (container, size, depth), the object kept alive
        self.held: dict[int, tuple[Any, dict[str, int]]] = {}  # namespace id -> (it, the size of each attribute)

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
        if isinstance(value, TEXT + CONTAINERS):
            self.fits(self.measure(value, keep=True)[0], f"{what} would make a value")
            if not any(value is x for x in inputs):
                self.reserve(sys.getsizeof(value), what)
                self.built += sys.getsizeof(value)
        return value

    def leaf(self, value: Any) -> int | None:
        """The size of a value that is no container (None for a container)."""
        if isinstance(value, TEXT):
            return len(value)
        if isinstance(value, CONTAINERS):
            return None
        if isinstance(value, self.namespace):
            return self.max_chars  # its attributes are held below this as they are set (it may grow later)
        if isinstance(value, int):
            return value.bit_length() * 1233 // 4096 + 2  # decimal digits, and a sign
        return 24

    def size(self, value: Any) -> int:
        return self.measure(value)[0]

    def measure(self, value: Any, keep: bool = False) -> tuple[int, int]:
        """``(size, depth)`` of ``value``, each container measured once (no recursion: depth is unbounded).
        With ``keep`` (a value the template made, which it may reference again), ``value``'s own measure is
        kept for the rest of the rendering when it holds containers or 16 entries or more; what is found on
        the way is forgotten (a generator's transient lists are not kept alive)."""
        leaf = self.leaf(value)
        if leaf is not None:
            return leaf, 0
        local: dict[int, tuple[Any, int, int]] = {}
        known = lambda x: local.get(id(x)) or self.known.get(id(x))  # noqa: E731
        stack, opened, steps = [value], set(), 0
        while stack:
            obj = stack[-1]
            if known(obj):
                stack.pop()
                continue
            entries = list(obj.keys()) + list(obj.values()) if isinstance(obj, dict) else \
                [x for pair in obj for x in pair] if isinstance(obj, type({}.items())) else list(obj)
            todo = [x for x in entries if self.leaf(x) is None and not known(x) and id(x) not in opened]
            if todo and id(obj) not in opened:
                opened.add(id(obj))
                stack.extend(todo)
                continue
            stack.pop()
            opened.discard(id(obj))
            size, depth = len(entries) + 2, 0
            for x in entries:  # an entry still open is a cycle: it prints as '[...]'
                found = known(x)
                s, d = found[1:] if found else (self.leaf(x) or 5, 0)
                size, depth = size + s, max(depth, d)
            local[id(obj)] = (obj, size, depth + 1)
            steps += len(entries) + 1
            if steps > 1 << 16:
                steps = 0
                self.tick()
        found = known(value)
        if keep and id(value) in local and (found[2] > 1 or len(value) >= 16):
            self.known[id(value)] = found
            self.built += 100  # the entry that keeps it
        return found[1:]

    def items(self, iterable: Any, what: str) -> list:
        """``iterable`` as a list, stopped as soon as it holds too much (a string's characters: at once)."""
        if isinstance(iterable, TEXT):
            self.fits(2 * len(iterable), f"{what} would make a list")
            self.reserve(64 * len(iterable), what)
        out, size, nbytes = [], 0, 0
        for x in iterable:
            out.append(x)
            size, nbytes = size + self.size(x) + 1, nbytes + sys.getsizeof(x) + 8
            if not len(out) & 4095 or size > self.max_chars:
                self.fits(size, f"{what} would make a list")
                self.reserve(nbytes, what)
                self.tick()
        self.reserve(nbytes, what)
        self.built += nbytes  # what the list holds counts as made (a generator's items are new)
        return out


_HERE = Limits.tick.__code__.co_filename
_WORD = re.compile(r"\w+")  # a word, as jinja2's wordcount counts them


def _build() -> Any:
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
            self.total += max((int(g) for g in (m.groups() if m else ()) if g), default=0) + now().size(value)
            now().fits(self.total, "str.format() would make a string")
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
            held = now().held[id(self)] = (self, {k: now().size(k) + now().size(v) for k, v in attrs.items()})
            now().fits(sum(held[1].values()), "namespace() would hold values")
            Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            sizes = now().held[id(self)][1]  # (a namespace from another rendering is unknown here: KeyError)
            held = dict(sizes, **{name: now().size(name) + now().size(value)})
            now().fits(sum(held.values()), f"setting namespace attribute {name!r:.40} would make it hold values")
            sizes.update(held)
            Namespace.__setitem__(self, name, value)

    Limits.namespace = LimitedNamespace

    class Environment(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "+", "%"})
        code_generator_class = Generator

        @staticmethod
        def concat(parts: Any) -> str:  # the text of a macro, a {% set %} block, a {% filter %} block
            parts = list(parts)
            now().fits(sum(map(len, parts)), "a block would make a string")
            return now().made("".join(parts), "a block")

        def lfm2np_made(self, value: Any) -> Any:
            return now().made(value, "a literal")

        def lfm2np_concat(self, join: Any, parts: tuple) -> Any:
            now().fits(sum(map(now().size, parts)), "'~' would make a string")
            return now().made(join(parts), "'~'", parts)

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            check_binop(now(), operator, left, right)
            return now().made(super().call_binop(context, operator, left, right), f"'{operator}'", (left, right))

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
            now().tick()
            owner, name = getattr(__obj, "__self__", None), getattr(__obj, "__name__", "a function")
            if isinstance(owner, TEXT):
                args = check_method(now(), owner, name, args, kwargs)
            return now().made(super().call(__context, __obj, *args, **kwargs), f"{name}()", (owner, *args))

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
            now().tick()
            args = (*args[:skip], *check_filter(now(), name, args[skip:], kwargs))
            return now().made(function(*args, **kwargs), f"filter {name!r}", args)
        if passed is not None:
            filtered.jinja_pass_arg = passed  # type: ignore[attr-defined]
        return filtered

    def raise_exception(message: str) -> None:
        raise Lfm2npError(f"{now().source}: chat template: {message}")

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    # optimized=False and a finalize that needs the context: nothing is evaluated while compiling (jinja2 would
    # fold constant filters and concatenations then, outside every check)
    env = Environment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"],
                      optimized=False, finalize=pass_context(lambda context, value: value))
    env.filters["tojson"] = tojson
    env.filters["wordcount"] = lambda s: sum(1 for _ in _WORD.finditer(str(s)))  # jinja2's lists every word first
    env.filters = {name: bounded(name, f) for name, f in env.filters.items()}
    env.globals.update(raise_exception=raise_exception, namespace=LimitedNamespace)
    lipsum = env.globals.get("lipsum")
    if lipsum is not None:
        env.globals["lipsum"] = lambda n=5, html=True, min=20, max=100: \
            lipsum(_capped(n), html, _capped(min, 99), _capped(max))  # paragraphs, words in each: 100 at most
    return env


def _capped(n: Any, most: int = 100) -> int:
    return max(1, min(int(n), most))


_active = threading.local()
_lock = threading.Lock()
_built: list[Any] = []  # the one environment, built on first use
_compiled: "OrderedDict[str, Any]" = OrderedDict()
CACHED = 16  #: compiled templates kept (a chat renders the same template every turn)


def now() -> Limits:
    """The limits of the rendering running in this thread."""
    return _active.limits


@contextlib.contextmanager
def active(limits: Limits) -> Iterator[None]:
    """Run the block under ``limits``: its clock (a tracer over every Python frame of this thread) and its
    sizes, for the environment's checks; both restored afterwards."""
    previous, tracer = getattr(_active, "limits", None), sys.gettrace()
    _active.limits = limits
    sys.settrace(limits)
    try:
        yield
    finally:
        sys.settrace(tracer)
        _active.limits = previous


def environment() -> Any:
    """The sandbox (one for the process; each rendering's limits are :func:`now`'s)."""
    with _lock:
        if not _built:
            _built.append(_build())
        return _built[0]


def compiled(template: str) -> Any:
    """``template`` compiled in the sandbox, under the active limits; the last :data:`CACHED` (of at most 1 Mi
    characters) are kept."""
    with _lock:
        if template in _compiled:
            _compiled.move_to_end(template)
            return _compiled[template]
    result = environment().from_string(template)
    if len(template) > 1 << 20:  # a huge template is not kept
        return result
    with _lock:
        _compiled[template] = result
        while len(_compiled) > CACHED:
            _compiled.popitem(last=False)
    return result
