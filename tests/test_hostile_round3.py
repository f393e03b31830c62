"""Hostile inputs, round three (issue 23): hangs, allocations out of proportion to the input, tracebacks,
silent acceptance, vague errors, and commands that would overwrite their own input.

Whatever may hang or allocate without bound runs in a child process under an address-space limit
(``RLIMIT_AS``) and a time limit, so that a regression fails the test instead of the machine.
"""

from __future__ import annotations

import io
import json
import os
import resource
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np

import pytest
from hypothesis import given, settings, strategies as st

from lfm2np import Lfm2npError
from lfm2np.cli import main
from lfm2np.io.gguf_tokenizer import tokenizer_from_gguf_metadata
from lfm2np.oracle.dumps import Dump, load_dump

from conftest import subprocess_env

ADDRESS_SPACE = 1 << 30  #: a child may map at most 1 GiB


# A child's peak memory is its VmHWM (KiB), not getrusage's ru_maxrss: a forked child keeps its parent's ru_maxrss
# across exec, so it measured the pytest process (over 300 MiB after the cluster and conformance tests), not the child.


def _limit() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def run_bounded(code: str, seconds: float) -> str:
    """Run ``code`` in a child Python under :data:`ADDRESS_SPACE` and ``seconds``; its stdout. A hang or a
    crash (a MemoryError past the limit included) fails the test."""
    try:
        proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                              timeout=seconds, env=subprocess_env(), preexec_fn=_limit)
    except subprocess.TimeoutExpired:
        pytest.fail(f"did not finish within {seconds} s")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def refused(action, *needles: str) -> str:
    with pytest.raises(Lfm2npError) as err:
        action()
    message = str(err.value)
    assert "\n" not in message, message
    missing = [n for n in needles if n not in message]
    assert not missing, f"message does not name {missing}: {message}"
    return message


# ======================================================================= GGUF tokenizers: type patterns
def vocabulary_meta(types: list[int]) -> dict:
    """GGUF tokenizer metadata: three byte-level tokens and a merge, then one token per entry of ``types``
    (3 control ``<|cN|>``, 4 user-defined ``userN``, 1 normal ``nN``, 5 unused ``[PADN]``)."""
    names = {3: "<|c{}|>", 4: "user{}", 1: "n{}", 5: "[PAD{}]"}
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "lfm2",
            "tokenizer.ggml.tokens": ["a", "b", "ab"] + [names[t].format(i) for i, t in enumerate(types)],
            "tokenizer.ggml.token_type": [1, 1, 1] + list(types), "tokenizer.ggml.merges": ["a b"]}


def test_alternating_control_and_user_defined_tokens_build_in_linear_time():
    """65,536 tokens alternating control / user-defined: the added-token matcher was rebuilt once per run
    of one kind (32,768 rebuilds over a growing set: hours); now it is built once."""
    out = run_bounded("""
        import time
        from lfm2np.io.gguf_tokenizer import tokenizer_from_gguf_metadata
        n = 65536
        tokens = ["a", "b", "ab"] + [f"<|c{i}|>" if i % 2 == 0 else f"user{i}" for i in range(n)]
        meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "lfm2", "tokenizer.ggml.tokens": tokens,
                "tokenizer.ggml.token_type": [1, 1, 1] + [3 if i % 2 == 0 else 4 for i in range(n)],
                "tokenizer.ggml.merges": ["a b"]}
        t0 = time.perf_counter()
        tok, _ = tokenizer_from_gguf_metadata(meta)
        decoder = tok.get_added_tokens_decoder()
        assert len(decoder) == n and decoder[3].special and not decoder[4].special
        assert tok.encode("<|c0|>user1ab").ids == [3, 4, 2]
        print(time.perf_counter() - t0)
    """, seconds=60)
    assert float(out) < 30


@settings(max_examples=25, deadline=None)
@given(st.lists(st.sampled_from([1, 3, 4, 5]), min_size=1, max_size=3000))
def test_any_type_pattern_builds_quickly_with_every_id_in_place(types):
    meta = vocabulary_meta(types)
    t0 = time.perf_counter()
    tok, _ = tokenizer_from_gguf_metadata(meta)
    assert time.perf_counter() - t0 < 5  # the old runs-of-one-kind build: ~1 s for 2,000 alternations
    decoder = tok.get_added_tokens_decoder()
    tokens = meta["tokenizer.ggml.tokens"]
    for i, t in enumerate(types, start=3):
        if t in (3, 4):
            assert decoder[i].content == tokens[i] and decoder[i].special == (t == 3)
            assert tok.encode(tokens[i]).ids == [i]
        elif t == 5:
            assert tok.token_to_id(tokens[i]) is None and i not in decoder
        else:
            assert tok.token_to_id(tokens[i]) == i


# ======================================================================= chat templates: time and size
#: each loops inside a filter, a global or a method, where the old line tracer (the template's own lines
#: only) never looked: hours, or gigabytes before an error
LOOPS_OUTSIDE_THE_TEMPLATE = [
    "{{ range(100000)|slice(10**9)|list|length }}",
    "{{ range(100000)|slice(10**9)|map('first')|select|first }}",
    "{{ (range(100000)|list)|batch(1)|map('join', 'x' * 100000)|join|length }}",
    "{{ range(100000)|map('string')|map('center', 10**5)|join|length }}",
    "{{ (range(100000)|list)|select('in', range(100000)|list)|list|length }}",
    "{{ (range(30000)|list)|unique|map('string')|map('replace', '', 'xyz' * 300)|join|length }}",
]
#: each asks for a value of gigabytes in one operation (the old code allocated 1-2 GB or more)
BOMBS = [
    "{{ 'a'|center(10**9) }}", "{{ 'a'.center(10**9) }}", "{{ 'a'.ljust(10**9) }}", "{{ 'a'.rjust(10**9) }}",
    "{{ '1'.zfill(10**9) }}", "{{ '{:>1000000000}'.format(1) }}", "{{ '{0:{1}}'.format('a', 10**9) }}",
    "{{ '%(a)999999999s' % {'a': 1} }}", "{{ '%999999999d' % 1 }}", "{{ '%.999999999f' % 1.5 }}",
    "{{ '%s'|format('x'|center(10**7)) ~ ('x'|center(10**7)) }}", "{{ 'a'|indent(10**9, true) }}",
    "{{ ('a\\n' * 1000)|indent('x' * 10**6) }}", "{{ ['a', 'b']|join('x' * 10**7) ~ ['a', 'b']|join('x' * 10**7) }}",
    "{{ ('x' * 10**6)|wordwrap(1, wrapstring='y' * 10**6) }}", "{{ ('x' * 10**6).replace('', 'yy' * 10**6) }}",
    "{{ ('\\t' * 10**6).expandtabs(10**6) }}", "{{ range(10)|batch(10**9, 'x')|list }}",
    "{{ 'x'|tojson(indent=10**9) }}", "{{ [1, [2]]|tojson(indent=10**7) }}", "{{ 5|round(-10**9) }}",
    "{% set x = 'x' * 10**7 %}{{ [x, x, x] }}", "{% set x = 'x' * 10**6 %}{% set y = [x] * 10 %}{{ [y, y, y] }}",
    "{% set x = 'x' * 10**7 %}{{ x ~ x }}", "{% set x = 'x' * 10**7 %}{{ x + x }}", "{{ ['x' * 10**7] * 2 }}",
    "{% macro m(s) %}{{ s }}{{ s }}{% endmacro %}{{ m('x' * 10**7) }}",
    "{% set ns = namespace(a='') %}{% for i in range(100) %}{% set ns.a = ns.a ~ ('x' * 10**6) %}{% endfor %}",
    "{% set ns = namespace() %}{% for i in range(40) %}{% set ns.a = 'x' * 10**6 ~ i %}{% set ns.b = ns.a ~ ns.a %}"
    "{% set ns.c = ns.b ~ ns.b %}{% set ns.d = ns.c ~ ns.c %}{% set ns.e = ns.d ~ ns.d %}{% endfor %}",
    "{{ range(1000)|map('center', 10**7)|list|length }}", "{{ (range(1000)|map('center', 10**6)|list)|sum(start='') }}",
    "{{ ('ab ' * 5000000).split()|length }}", "{{ ('a\\n' * 8000000).splitlines()|length }}",
    "{{ 'ab'.translate({97: 'x' * 10**7, 98: 'y' * 10**7}) }}", "{{ (2**4000) * (2**4000) * (2**4000) }}",
    "{{ 10 ** 1000000 }}", "{{ 'x' * 10**9 }}", "{{ [1] * 10**9 }}",
    "{% autoescape ('a'|center(10**9)) %}x{% endautoescape %}",
    # filters that split a long text into a list of pieces first (about 50 bytes each)
    "{{ ('ab ' * 5000000)|title|length }}", "{{ ('ab ' * 5000000)|wordwrap(3)|length }}",
    "{{ ('ab ' * 5000000)|urlize|length }}", "{{ ('\u0101' * 16000000)|sort|length }}",
    "{{ ('x' * 16000000)|list|length }}", "{{ ('a\n' * 5000000)|indent|length }}",
]


def test_the_template_time_limit_holds_for_filters_globals_and_methods():
    """Each template loops inside jinja2's filters or Python's methods: stopped at the limit (here 1 s)
    naming the template, all within a generous bound (the old tracer timed the template's own lines only)."""
    out = run_bounded(f"""
        import json, time
        from lfm2np import Lfm2npError
        from lfm2np.io.chat_template import render_template
        for i, t in enumerate({LOOPS_OUTSIDE_THE_TEMPLATE!r}):
            t0 = time.perf_counter()
            try:
                render_template(t, [{{"role": "user", "content": "hi"}}], source=f"T{{i}}.jinja", max_seconds=1)
                result = "rendered"
            except Lfm2npError as e:
                result = str(e)
            print(json.dumps([result, time.perf_counter() - t0]))
    """, seconds=120)
    for template, line in zip(LOOPS_OUTSIDE_THE_TEMPLATE, out.splitlines()):
        message, seconds = json.loads(line)
        assert seconds < 6, (template, seconds)
        assert message.startswith(f"T{LOOPS_OUTSIDE_THE_TEMPLATE.index(template)}.jinja: chat template stopped: "), \
            (template, message)


def test_templates_that_would_build_huge_values_are_refused_before_they_do():
    """Each is refused naming the template and the operation, in a child limited to 1 GiB of address space,
    whose peak memory stays far below what the old code allocated (1-2 GB, or a MemoryError)."""
    out = run_bounded(f"""
        import json, resource
        from lfm2np import Lfm2npError
        from lfm2np.io.chat_template import render_template
        for i, t in enumerate({BOMBS!r}):
            try:
                render_template(t, [{{"role": "user", "content": "hi"}}], source=f"T{{i}}.jinja", max_seconds=20)
                result = "rendered"
            except Lfm2npError as e:
                result = str(e)
            print(json.dumps(result))
        print(int(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:'))))
    """, seconds=120)
    *lines, peak_kib = out.splitlines()
    for i, (template, line) in enumerate(zip(BOMBS, lines)):
        message = json.loads(line)
        assert message.startswith(f"T{i}.jinja: chat template "), (template, message)
        assert "more than" in message or "constant only" in message, (template, message)
        assert "MemoryError" not in message and "out of memory" not in message, (template, message)
    assert len(lines) == len(BOMBS)
    assert int(peak_kib) < 600 * 1024, f"peak {int(peak_kib) // 1024} MiB"


def test_wordcount_counts_without_listing_every_word():
    out = run_bounded("""
        import resource
        from lfm2np.io.chat_template import render_template
        print(render_template("{{ ('ab ' * 5000000)|wordcount }}", [{"role": "user", "content": "hi"}]))
        print(int(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:'))))
    """, seconds=60)
    count, peak_kib = map(int, out.split())
    assert count == 5000000 and peak_kib < 300 * 1024, peak_kib


def test_lipsum_is_capped_in_paragraphs_and_words():
    """lipsum's words per paragraph were not capped (10**9 each: a hang, then gigabytes)."""
    out = run_bounded("""
        from lfm2np.io.chat_template import render_template
        text = render_template("{{ lipsum(10**9, false, 10**9, 10**9) }}", [{"role": "user", "content": "hi"}])
        print(text.count("\\n\\n"), len(text.split()))
    """, seconds=60)
    paragraphs, words = map(int, out.split())
    assert paragraphs < 100 and words <= 100 * 100


def test_ordinary_templates_render_as_before():
    """The bounds change nothing for what real chat templates do: the same text as jinja2's own immutable
    sandbox configured as transformers configures it (the reference), over namespaces, formatting, joins,
    literals, slices and filters."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from lfm2np.io.chat_template import render_template

    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": " 2 + 2? "},
            {"role": "assistant", "content": "4"}]
    template = ("{% set ns = namespace(sys='') %}{% for m in messages %}{% if m.role == 'system' %}"
                "{% set ns.sys = m.content %}{% endif %}{% endfor %}{{ bos_token }}[{{ ns.sys|upper }}]"
                "{% for m in messages[1:] %}<{{ m.role }}>{{ m.content|trim }}{{ '%-4s|%5.2f' % (m.role, 1.5) }}"
                "{{ '{:>6}'.format(loop.index) }}{{ [m.role, m.content]|join(',') }}{{ (m|tojson)[:12] }}"
                "{{ 'x' * 3 ~ ([1, 2] + [3]) }}{{ {'a': 1}|items|list }}{{ m.content.split('+')|map('trim')|list }}"
                "{% macro tag(s) %}<{{ s|center(7) }}>{% endmacro %}{{ tag(m.role) }}{% set block %}"
                "{{ m.content.strip().ljust(5, '.') }}{% endset %}{{ block ~ (m.content|wordwrap(3)) }}"
                "{% endfor %}{{ range(3)|batch(2, 0)|list }}{{ range(5)|slice(2)|list }}{{ 12345.678|round(1) }}"
                "{{ messages|map(attribute='role')|unique|sort|join(' ') }}{{ (messages|last).content|indent(2) }}"
                "{{ messages|selectattr('role', 'eq', 'user')|list|length }}{{ ('a', 'b') }}{{ 2 ** 10 }}")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)  # transformers'
    reference = env.from_string(template).render(messages=chat, bos_token="<s>", add_generation_prompt=True,
                                                 tools=None)
    assert render_template(template, chat, bos_token="<s>") == reference


def test_templates_render_in_threads_each_on_its_own_limits():
    """One compiled template, one environment, four threads: each rendering has its own clock and sizes (a
    looping one stops alone; the others render exactly what one thread renders)."""
    from lfm2np.io.chat_template import render_template

    template = ("{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
                "{{ m.content|center(9) ~ ns.n }}{% endfor %}")
    chats = [[{"role": "user", "content": f"t{i}-{j}"} for j in range(200)] for i in range(4)]
    expected = [render_template(template, chat) for chat in chats]
    results: dict = {}

    def run(i: int) -> None:
        try:
            if i == 4:
                render_template("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                                chats[0], source="loop.jinja", max_seconds=0.5)
            for _ in range(5):
                results[i] = render_template(template, chats[i])
        except Lfm2npError as e:
            results[i] = str(e)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [results.get(i) for i in range(4)] == expected
    assert results[4].startswith("loop.jinja: chat template stopped: it ran for more than 0.5 s"), results[4]


# ----------------------------------------------------------------------------------- the template fuzzer
NUMBERS = ["0", "1", "3", "-2", "7.5", "10**9", "2**40", "-10**9", "100000", "4096", "10**7"]
TEXTS = ["'a'", "'x' * 1000", "'a b\\tc\\nd'", "messages[0].content", "''", "'%s%d'", "'{}{:>9}'", "'%(k)5s'",
         "'y' * 10**6", "'<|im_end|>'"]
OTHERS = ["range(100000)", "range(10)", "messages", "[1, 2]", "{'k': 'v'}", "(1, 'b')", "none", "true"]
FILTERS = {"center": 1, "indent": 1, "wordwrap": 1, "replace": 2, "join": 1, "list": 0, "format": 1, "batch": 2,
           "slice": 1, "sum": 0, "round": 1, "tojson": 0, "first": 0, "select": 0, "unique": 0, "sort": 0,
           "length": 0, "string": 0, "trim": 0, "upper": 0, "truncate": 1, "reverse": 0, "int": 0, "default": 1,
           "pprint": 0, "items": 0, "urlize": 0, "dictsort": 0, "min": 0, "max": 0, "striptags": 0}
METHODS = {"center": 1, "ljust": 1, "zfill": 1, "expandtabs": 1, "replace": 2, "join": 1, "split": 0,
           "splitlines": 0, "format": 2, "upper": 0, "strip": 0, "count": 1, "rjust": 2, "translate": 1}
OPERATORS = ["*", "+", "%", "**", "~", "//", "-", "in"]


def _expressions():
    atoms = st.sampled_from(NUMBERS + TEXTS + OTHERS)

    def extend(inner):
        value = st.one_of(st.sampled_from(NUMBERS + TEXTS), inner)  # arguments: mostly numbers and strings
        text = st.one_of(st.sampled_from(TEXTS), inner)

        def filtered(draw_value, name, args):
            return f"({draw_value})|{name}" + (f"({', '.join(args)})" if args else "")
        return st.one_of(
            st.sampled_from(sorted(FILTERS)).flatmap(
                lambda name: st.builds(filtered, inner, st.just(name), st.lists(value, min_size=FILTERS[name],
                                                                                max_size=FILTERS[name]))),
            st.sampled_from(sorted(METHODS)).flatmap(
                lambda name: st.builds(lambda v, args: f"({v}).{name}({', '.join(args)})", text,
                                       st.lists(value, min_size=0, max_size=METHODS[name]))),
            st.builds(lambda a, op, b: f"({a} {op} {b})", inner, st.sampled_from(OPERATORS), inner),
            st.builds(lambda items: f"[{', '.join(items)}]", st.lists(inner, min_size=1, max_size=4)),
            st.builds(lambda k, v: f"{{{k}: {v}}}", inner, inner),
            st.builds(lambda v, f: f"({v})|map('{f}')|list", inner, st.sampled_from(["string", "upper", "length"])))
    return st.recursive(atoms, extend, max_leaves=6)


def _templates():
    e = _expressions()
    return st.one_of(
        st.builds(lambda a: f"{{{{ {a} }}}}", e),
        st.builds(lambda a, b: f"{{% set v = {a} %}}{{{{ v ~ v }}}}{{{{ [v, v, {b}] }}}}", e, e),
        st.builds(lambda a, b: f"{{% for x in {a} %}}{{{{ x ~ {b} }}}}{{% endfor %}}", e, e),
        st.builds(lambda a, b: f"{{% set ns = namespace(v={a}) %}}{{% for i in range(100) %}}"
                               f"{{% set ns.v = ns.v ~ {b} %}}{{% endfor %}}{{{{ ns.v|length }}}}", e, e),
        st.builds(lambda a: f"{{% macro m(s) %}}{{{{ s }}}}{{{{ s }}}}{{% endmacro %}}{{{{ m(m(m({a}))) }}}}", e))


RENDER_WORKER = """
import json, resource, sys, time
from lfm2np import Lfm2npError
from lfm2np.io.chat_template import render_template
out = []
for t in json.loads(sys.stdin.read()):
    t0 = time.perf_counter()
    try:
        render_template(t, [{"role": "user", "content": "hi"}], source="fuzzed.jinja", max_seconds=0.3)
        kind = "rendered"
    except Lfm2npError as e:
        kind = "out of memory" if "MemoryError" in str(e) or "out of memory" in str(e) else "refused"
        kind = kind if str(e).startswith("fuzzed.jinja: ") and "\\n" not in str(e) else "unnamed: " + str(e)
    except BaseException as e:
        kind = f"{type(e).__name__}: {e}"
    out.append([t, kind, time.perf_counter() - t0])
print(json.dumps([out, int(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')))]))
"""


@settings(max_examples=int(__import__("os").environ.get("LFM2NP_FUZZ_EXAMPLES", 3)), deadline=None)
@given(st.lists(_templates(), min_size=20, max_size=20))
def test_fuzzed_templates_render_or_are_refused_in_bounded_time_and_memory(templates):
    """Random compositions of filters, methods, operators, literals, loops, namespaces and macros over small
    and huge numbers and strings: each renders or is refused (Lfm2npError naming the template), within the
    time limit (0.3 s) and a little, in a child whose address space is 1 GiB and whose peak stays far below."""
    try:
        proc = subprocess.run([sys.executable, "-c", RENDER_WORKER], input=json.dumps(templates), capture_output=True,
                              text=True, timeout=60, env=subprocess_env(), preexec_fn=_limit)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the batch did not finish within 60 s: {templates}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results, peak_kib = json.loads(proc.stdout)
    for template, kind, seconds in results:
        assert kind in ("rendered", "refused"), (template, kind)
        assert seconds < 3, (template, seconds)
    assert peak_kib < 700 * 1024, f"peak {peak_kib // 1024} MiB"


# ======================================================================================= backend dumps
def npy_header(shape, descr: str = "<f4") -> bytes:
    head = repr({"descr": descr, "fortran_order": False, "shape": tuple(shape)}).encode("latin1")
    head += b" " * (63 - (10 + len(head)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(head).to_bytes(2, "little") + head


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def write_npz(path: Path, members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, data in members.items():
            zf.writestr(name + ".npy", data)
    return path


@pytest.mark.parametrize("compression", [zipfile.ZIP_BZIP2, zipfile.ZIP_DEFLATED, zipfile.ZIP_LZMA])
def test_an_npz_of_many_small_bombs_is_refused_before_anything_is_inflated(tmp_path, compression):
    """Three members, each declaring 16 MiB of zeros (each within the old per-member allowance, a few hundred
    bytes stored): the total is bounded by the file's size, before any member is inflated; bzip2 and lzma
    members, which zipfile inflates without bounding the output (the header alone would inflate a block),
    are refused by their method."""
    path = tmp_path / "bombs.npz"
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        zf.writestr("ids.npy", npy(np.arange(3)))
        for i in range(3):
            with zf.open(f"model.layers.{i}.conv.conv_out.npy", "w") as f:
                f.write(npy_header((1 << 22,)))
                f.write(bytes(16 << 20))
    assert path.stat().st_size < 200_000
    needles = ["would inflate", "stored bytes", "100 times its size"] if compression == zipfile.ZIP_DEFLATED else \
        ["member 'ids.npy' is compressed with method", "stored or deflated"]  # zipfile inflates these unbounded
    tracemalloc.start()
    try:
        refused(lambda: load_dump(path), str(path), *needles)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak


def test_dump_kinds_are_never_mixed_and_logits_keep_their_range(tmp_path):
    ids, logits = npy(np.array([1, 2])), npy(np.zeros((2, 5), np.float32))
    both = write_npz(tmp_path / "both.npz", {"ids": ids, "logits": logits, "tokens": npy(np.array([3, 4]))})
    refused(lambda: load_dump(both), str(both), "both 'logits' and 'tokens'")
    huge = np.zeros((2, 5))
    huge[1, 3] = -1e300
    wide = write_npz(tmp_path / "wide.npz", {"ids": ids, "logits": npy(huge)})
    refused(lambda: load_dump(wide), str(wide), "'logits'", "-1e+300", "[1, 3]", "float32 range")
    fine = np.zeros((2, 5))
    fine[0, 0] = np.inf  # the backend's own infinity stays one
    ok = write_npz(tmp_path / "ok.npz", {"ids": ids, "logits": npy(fine)})
    assert load_dump(ok).logits[0, 0] == np.inf
    outside = write_npz(tmp_path / "outside.npz", {"ids": npy(np.array([1, 99])), "tokens": npy(np.array([3]))})
    refused(lambda: load_dump(outside, vocab_size=50), str(outside), "ids holds 99", "0..49")
    late = write_npz(tmp_path / "late.npz", {"ids": ids, "logits": logits, "prefill": npy(np.array(2))})
    refused(lambda: load_dump(late), str(late), "prefill 2 is outside the positions of the dump (1 .. 1)")
    refused(lambda: load_dump(ok, prefill=5), str(ok), "prefill 5")


@pytest.mark.parametrize("shape", [[0, 2**62], [2**62, 2**62, 0], [0, 2**64], [2**40, 0, 2**30]])
@pytest.mark.parametrize("name", ["model.layers.0.conv.conv_out", "logits", "ids", "tokens"])
def test_zero_size_arrays_with_huge_dimensions_are_named(tmp_path, shape, name):
    """numpy refuses such a shape even though it holds nothing: a ValueError out of the trace reader."""
    header = json.dumps({name: {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}}).encode()
    path = tmp_path / "zero.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    refused(lambda: load_dump(path, ids=[1]), str(path), repr(name), "beyond what an array can hold")
    npz = write_npz(tmp_path / "zero.npz", {"ids": npy(np.array([1])), name: npy_header(shape)})
    refused(lambda: load_dump(npz), str(npz), repr(name), "beyond what an array can hold")


def test_a_dump_path_that_is_no_file_says_what_it_is(tmp_path):
    loop = tmp_path / "loop.npz"
    loop.symlink_to(loop)
    fifo = tmp_path / "pipe.npz"
    os.mkfifo(fifo)
    cases = {tmp_path: "is a directory", loop: "a loop of symbolic links", fifo: "is a FIFO",
             tmp_path / "missing.npz": "no such dump file"}
    for path, needle in cases.items():
        outcome: list = []
        worker = threading.Thread(target=lambda p=path: outcome.append(_message(lambda: load_dump(p))), daemon=True)
        worker.start()
        worker.join(10)
        assert outcome, f"{path}: load_dump blocked"
        assert outcome[0].startswith(str(path)) and needle in outcome[0], outcome[0]


def test_the_cli_names_what_a_dump_path_is(tmp_path, capsys):
    assert main(["diagnose", "embedded", "--dump", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"lfm2np: error: {tmp_path}: is a directory; a dump is an .npz or a .safetensors file", err


def _message(action) -> str:
    with pytest.raises(Lfm2npError) as e:
        action()
    return str(e.value)


NAMES = ["ids", "logits", "tokens", "prefill", "model.layers.0.conv.conv_out", "model.embed_tokens", "x"]
DTYPES = ["<f4", "<f8", "<f2", "<i8", "<i4", "|u1", "|b1", "<c8", "<U3", "|O", "<M8[s]", "|V4"]


@st.composite
def npy_members(draw):
    """An .npy member: a real array, or a header alone (any shape, huge or zero dimensions) with some data."""
    name = draw(st.sampled_from(NAMES))
    shape = tuple(draw(st.lists(st.sampled_from([0, 1, 2, 3, 5, 2**31, 2**40, 2**62]), max_size=3)))
    descr = draw(st.sampled_from(DTYPES))
    if draw(st.booleans()) and descr not in ("|O", "|V4") and all(n < 8 for n in shape):
        with np.errstate(all="ignore"):  # 1e300 as an integer or a float16 is whatever numpy makes of it
            data = npy(np.full(shape, draw(st.sampled_from([0, 1, 7, 1e300])), np.float64).astype(descr))
    else:
        data = npy_header(shape, descr) + bytes(draw(st.integers(0, 64)))
    return name, data


@settings(max_examples=int(os.environ.get("LFM2NP_FUZZ_EXAMPLES", 25)), deadline=None)
@given(st.lists(npy_members(), max_size=4),
       st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA]),
       st.sampled_from([None, 50]), st.sampled_from([None, [1, 2]]))
def test_fuzzed_npz_dumps_load_or_are_refused_naming_the_file(tmp_path_factory, members, compression, vocab, ids):
    path = write_npz(tmp_path_factory.mktemp("npz") / "dump.npz", dict(members), compression)
    tracemalloc.start()
    try:
        dump = load_dump(path, ids=ids, vocab_size=vocab)
    except Lfm2npError as e:
        assert str(e).startswith(str(path)) and "\n" not in str(e), str(e)
    else:
        assert isinstance(dump, Dump) and dump.kind in ("logits", "trace", "tokens")
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 64 << 20, peak


# ================================================================== numbers too large for a float, rope keys
HUGE = st.integers(min_value=2**1024, max_value=10**600) | st.integers(min_value=-10**600, max_value=-(2**1024))
FLOAT_PATHS = {"lfm2": [("norm_eps",), ("rope_theta",), ("block_ffn_dim_multiplier",),
                        ("rope_parameters", "rope_theta")],
               "lfm2_moe": [("norm_eps",), ("rope_theta",), ("routed_scaling_factor",), ("theta",)],
               "lfm3": [("norm_eps",), ("rms_norm_eps",), ("rope_parameters", "full_attention", "rope_theta"),
                        ("rope_parameters", "full_attention", "partial_rotary_factor"),
                        ("rope_parameters", "sliding_attention", "rope_theta"), ("partial_rotary_factor",)]}
PRESETS = {"lfm2": "tiny-dense", "lfm2_moe": "tiny-moe", "lfm3": "LFM3-1.7B"}


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([(t, p) for t, paths in FLOAT_PATHS.items() for p in paths]), HUGE)
def test_json_integers_too_large_for_a_float_are_named(where, value):
    import lfm2np

    model_type, path = where
    d = lfm2np.load_config(PRESETS[model_type]).to_dict()
    if path == ("rms_norm_eps",):
        d.pop("norm_eps", None)
    if path == ("partial_rotary_factor",):
        d["rope_parameters"]["sliding_attention"].pop("partial_rotary_factor", None)
    if path[0] == "rope_parameters" and model_type == "lfm2":
        d["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6}
    target = d
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    message = refused(lambda: lfm2np.Config.from_dict(d), "too large for a float")
    assert path[-1] in message or (path[-1] == "theta" and "rope_theta" in message) \
        or (path[-1] == "rms_norm_eps" and "norm_eps" in message), message


def test_an_lfm3_rope_entry_with_an_unknown_key_is_refused():
    """A misspelt partial_rotary_factor used to be dropped: the whole head rotated."""
    import lfm2np

    d = lfm2np.load_config("LFM3-1.7B").to_dict()
    entry = d["rope_parameters"]["full_attention"]
    entry["partial_rotary_fator"] = entry.pop("partial_rotary_factor")
    refused(lambda: lfm2np.Config.from_dict(d, "cfg.json"), "rope_parameters.full_attention.partial_rotary_fator",
            "cfg.json", "not a key of an LFM3 RoPE entry")


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(["temperature", "top_k", "top_p", "min_p", "repetition_penalty"]), HUGE)
def test_sampling_and_generation_config_numbers_too_large_for_a_float_are_named(tmp_path_factory, field, value):
    from lfm2np.generate import Sampling, generation_defaults, sampling_for

    refused(lambda: Sampling(**{field: value}), f"{field} is ")
    folder = tmp_path_factory.mktemp("gen")
    (folder / "generation_config.json").write_text(f'{{"do_sample": true, "{field}": {value}}}')
    message = refused(lambda: sampling_for(generation_defaults(folder)), "generation_config.json", f"{field} is ")
    assert len(message) < 300, message  # the 300-digit number is not printed whole


# ============================================================================ the tokenizer API's arguments
def _tokenizers():
    from lfm2np.embedded import embedded_model_path
    from lfm2np.io.tokenizer import Tokenizer

    backend, extras = tokenizer_from_gguf_metadata(vocabulary_meta([3, 4, 1, 5]))  # a GGUF tokenizer too
    return [Tokenizer.load(embedded_model_path()), Tokenizer(backend, None, {"eos_token": "<|c0|>"}, "gguf")]


TOKENIZERS = _tokenizers()
NOT_AN_ID = st.one_of(st.integers(max_value=-1), st.integers(min_value=3072), st.floats(), st.text(max_size=3),
                      st.none(), st.booleans(), st.binary(max_size=2), st.lists(st.integers(0, 5), max_size=2))
NOT_IDS = st.one_of(st.none(), st.integers(), st.floats(), st.text(max_size=3), st.binary(max_size=3))
NOT_TEXT = st.one_of(st.none(), st.integers(), st.binary(max_size=4), st.lists(st.text(max_size=2), max_size=2),
                     st.text(max_size=3).map(lambda t: t + "\ud800"), st.floats())


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(TOKENIZERS), st.lists(st.integers(0, 5), max_size=3), NOT_AN_ID, st.integers(0, 3))
def test_decode_and_stream_refuse_what_is_not_a_token_id(tok, good, bad, at):
    ids = good[:at] + [bad] + good[at:]
    for action in (lambda: tok.decode(ids), lambda: list(tok.stream(ids)), lambda: tok.decode(iter(ids))):
        refused(action, "token id", repr(bad)[:10] if not isinstance(bad, int) or isinstance(bad, bool) else str(bad))


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(TOKENIZERS), NOT_IDS, NOT_TEXT)
def test_the_tokenizer_refuses_arguments_of_the_wrong_kind(tok, not_ids, not_text):
    if not isinstance(not_ids, int) or isinstance(not_ids, bool):  # stop_ids takes one id as well as several
        refused(lambda: tok.stop_ids(not_ids), "stop_ids")
    refused(lambda: tok.decode(not_ids), "decode takes a sequence of token ids")
    refused(lambda: list(tok.stream(not_ids)), "stream takes a sequence of token ids")
    refused(lambda: tok.encode(not_text), "encode")
    if not isinstance(not_text, str):
        refused(lambda: tok.token_to_id(not_text), "token_to_id takes a token string")
    chat = [{"role": "user", "content": "hi"}]
    for builtin in (True, False):
        refused(lambda: tok.encode_chat(chat, tools=not_ids or 5, use_builtin=builtin), "tools")


def test_the_tokenizer_accepts_what_it_documents():
    tok = TOKENIZERS[0]
    assert tok.stop_ids(5) == tok.stop_ids([5]) == tok.stop_ids(np.array([5])) and 5 in tok.stop_ids(5)
    ids = tok.encode("hello world")
    assert tok.decode(np.array(ids)) == tok.decode(iter(ids)) == "".join(tok.stream(ids)) == "hello world"
    assert tok.token_to_id("not a token at all") is None
    refused(lambda: tok.encode("x", add_bos=1), "add_bos must be True or False")


# ===================================================================================== GGUF metadata
@pytest.fixture(scope="module")
def gguf_writer(tmp_path_factory):
    import lfm2np
    from lfm2np.io.gguf_write import write_gguf
    from lfm2np.synthetic import random_params

    config = lfm2np.load_config("tiny-dense")
    params = random_params(config)
    folder = tmp_path_factory.mktemp("gguf")

    def write(name: str, metadata: dict) -> Path:
        path = folder / name
        write_gguf(path, config, params, metadata=metadata)
        return path
    return write


@pytest.mark.parametrize("value, needle", [("3", "split.count is a string '3'"), (2.0, "split.count is a float 2.0"),
                                           (True, "split.count is a bool True"), (0, "split.count is 0; expected 1"),
                                           (4, "a split GGUF")])
def test_gguf_split_count_must_be_one_integer(gguf_writer, value, needle):
    """A split.count that is not an integer was ignored (the file read as if whole)."""
    import lfm2np

    path = gguf_writer(f"split-{value!r}.gguf", {"split.count": value})
    refused(lambda: lfm2np.load(path), str(path), needle)


def test_gguf_vocab_size_against_the_embedding_warns_naming_the_key(gguf_writer):
    import lfm2np

    path = gguf_writer("vocab.gguf", {"lfm2.vocab_size": 5})
    with pytest.warns(UserWarning, match=r"lfm2\.vocab_size is 5 but token_embd\.weight has 97 rows"):
        assert lfm2np.load(path).config.vocab_size == 97
    proc = subprocess.run([sys.executable, "-m", "lfm2np", "forward", str(path), "--ids", "1", "2"],
                          capture_output=True, text=True, timeout=120, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr
    assert "lfm2np: warning: " in proc.stderr and "lfm2.vocab_size is 5 but token_embd.weight has 97" in proc.stderr


TOKEN_FIELDS = {"tokenizer.ggml.tokens": st.one_of(st.lists(st.sampled_from(["a", "b", "ab", "", "<|x|>", "a b", 1]),
                                                            max_size=6), st.integers(), st.text(max_size=3)),
                "tokenizer.ggml.token_type": st.one_of(st.lists(st.integers(-1, 7) | st.booleans() | st.floats(),
                                                                max_size=6), st.none()),
                "tokenizer.ggml.merges": st.one_of(st.lists(st.sampled_from(["a b", "ab", "a  b", " a", "x y", 3]),
                                                            max_size=3), st.none()),
                "tokenizer.ggml.bos_token_id": st.one_of(st.none(), st.integers(-2, 8), st.booleans(),
                                                         st.text(max_size=1)),
                "tokenizer.ggml.add_bos_token": st.one_of(st.none(), st.booleans(), st.integers(0, 1)),
                "tokenizer.ggml.pre": st.sampled_from(["lfm2", "llama-bpe", "qwen2", 5, None]),
                "tokenizer.chat_template": st.one_of(st.none(), st.text(max_size=5), st.integers())}


@settings(max_examples=150, deadline=None)
@given(st.fixed_dictionaries({}, optional=TOKEN_FIELDS))
def test_fuzzed_gguf_tokenizer_metadata_builds_or_is_refused(fields):
    import warnings

    meta = {**vocabulary_meta([3, 4, 1, 5]), **fields}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            tok, extras = tokenizer_from_gguf_metadata(meta, source="f.gguf")
        except Lfm2npError as e:
            assert str(e).startswith("f.gguf: ") and "\n" not in str(e), str(e)
            return
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    for i, t in enumerate(tokens):  # what was built holds every live token at its id
        if types[i] != 5:
            assert tok.token_to_id(t) == i


# =============================================================================== outputs never overwrite inputs
def _digest(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def checkpoint(tmp_path) -> Path:
    import shutil

    from lfm2np.embedded import embedded_model_path

    ck = Path(shutil.copytree(embedded_model_path(), tmp_path / "CK"))
    (ck / "sub").mkdir()
    return ck


def _cli_refuses(argv: list[str], capsys, *needles: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lfm2np: error: ") and "Traceback" not in err, err
    assert all(n in lines[0] for n in needles), (needles, lines[0])
    return lines[0]


@pytest.mark.parametrize("out", ["CK", "CK/config", "CK/model.safetensors", "CK/tokenizer.safetensors",
                                 "CK/sub/x", "CK/../CK/x", "link/x", "./CK//x.safetensors", "link"])
def test_trace_and_golden_never_write_into_the_checkpoint_they_read(checkpoint, capsys, monkeypatch, out):
    monkeypatch.chdir(checkpoint.parent)
    (checkpoint.parent / "link").symlink_to(checkpoint)
    before = _digest(checkpoint)
    for force in ([], ["--force"]):
        if out not in ("CK", "link"):  # a directory is no trace file name (refused by --out's type)
            _cli_refuses(["trace", str(checkpoint), "--out", out, *force], capsys, str(Path(out)), "this command reads")
        if out.endswith(("CK", "link", "x")):
            _cli_refuses(["golden", "CK", "--out", out, *force], capsys, str(Path(out)), "this command reads")
    assert _digest(checkpoint) == before


def test_a_gguf_and_its_json_sibling_are_never_outputs(tmp_path, capsys, gguf_writer):
    gguf = gguf_writer("m.gguf", {})
    (gguf.parent / "m.json").write_text("{}")
    for out in [gguf.parent / "m", gguf.parent / "m.safetensors"]:  # the summary would be m.json
        _cli_refuses(["trace", str(gguf), "--out", str(out), "--force"], capsys, "is a file this command reads")
    _cli_refuses(["trace", str(gguf), "--out", str(gguf)], capsys, "not '.gguf'")
    assert (gguf.parent / "m.json").read_text() == "{}"


def test_existing_outputs_are_replaced_only_with_force(tmp_path, capsys):
    out = tmp_path / "t.safetensors"
    out.write_bytes(b"mine")
    _cli_refuses(["trace", "embedded", "--out", str(out)], capsys, str(out), "exists; give --force")
    assert out.read_bytes() == b"mine"
    (tmp_path / "t2.json").write_text("mine")  # the summary's name is taken: refused too
    _cli_refuses(["trace", "embedded", "--out", str(tmp_path / "t2")], capsys, "t2.json: exists")
    assert main(["trace", "embedded", "--out", str(out), "--force", "--ids", "1", "2"]) == 0
    assert out.read_bytes()[:8] != b"mine"
    full = tmp_path / "golden"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    _cli_refuses(["golden", "embedded", "--out", str(full)], capsys, str(full), "not empty; give --force")
    assert main(["golden", "embedded", "--out", str(full), "--force", "--ids", "1", "2", "--layers", "0"]) == 0
    assert (full / "manifest.json").is_file() and (full / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("suffix", [".npz", ".json", ".SAFETENSORS", ".st", ".gguf"])
def test_a_trace_output_with_another_suffix_is_refused(tmp_path, capsys, suffix):
    """Trace.save writes NAME.safetensors whatever the suffix: t.npz silently became t.safetensors."""
    _cli_refuses(["trace", "embedded", "--out", str(tmp_path / f"t{suffix}")], capsys, f"t{suffix}", repr(suffix))
    assert not list(tmp_path.iterdir())


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from([".", "..", "CK", "link", "sub", ""]), min_size=1, max_size=5),
       st.sampled_from(["config", "model", "tokenizer", "chat_template", "x"]))
def test_any_spelling_of_a_path_into_the_checkpoint_is_refused(tmp_path_factory, parts, name):
    """Relative names, '..', '.', doubled separators and links: resolved before comparing. An output that
    resolves inside the checkpoint is refused; any other is not refused for being inside it."""
    import io as _io
    import shutil
    from contextlib import redirect_stderr

    from lfm2np.embedded import embedded_model_path

    root = tmp_path_factory.mktemp("spell")
    ck = Path(shutil.copytree(embedded_model_path(), root / "CK"))
    (ck / "sub").mkdir()
    (root / "link").symlink_to(ck)
    (root / "sub").mkdir()
    out = root.joinpath(*[p for p in parts if p]) / name if parts != [""] else root / name
    spelled = str(out).replace(str(root), str(root) + "//" + "./", 1)
    if not out.parent.is_dir():
        return  # the folder does not exist: refused by --out's type for another reason
    err = _io.StringIO()
    with redirect_stderr(err):
        status = main(["trace", str(ck), "--out", spelled, "--ids", "1"])
    inside = Path(os.path.realpath(out)).is_relative_to(os.path.realpath(ck))
    assert (status == 2 and "this command reads" in err.getvalue()) == inside, (spelled, err.getvalue())
