"""Every ```python block in README.md and docs/*.md runs against lfm2np as `pip install .` installs it, from an
empty directory outside the checkout (so the examples work from anywhere, and none reaches into tests/):
README.md's each on its own (a reader copies one), a docs page's in order in one namespace (a page reads as
one session); the first commands a user runs print no warning; the questions the docs ask the embedded model
are ones it answers; and the numbers and tables in the docs that come from code are current."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(path: Path) -> list[str]:
    return BLOCK.findall(path.read_text(encoding="utf-8"))


def _package_data() -> list[str]:
    """The package-data patterns pyproject.toml ships besides the modules (``py.typed``, ``data/*/*``)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        return ["py.typed", "data/*/*"]
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["setuptools"]["package-data"]["lfm2np"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """What a non-editable install puts in site-packages, outside the checkout: the modules of every lfm2np
    package and the package data pyproject.toml names, copied as a wheel would hold them; and the
    environment that imports lfm2np from there (the checkout's own copy is not on the path)."""
    site = tmp_path_factory.mktemp("site-packages")
    for source in (ROOT / "lfm2np").rglob("*.py"):
        target = site / source.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    for pattern in _package_data():
        for source in (ROOT / "lfm2np").glob(pattern):
            if source.is_file():
                target = site / source.relative_to(ROOT)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONDONTWRITEBYTECODE": "1"}
    cwd = tmp_path_factory.mktemp("elsewhere")
    where = subprocess.run([sys.executable, "-c", "import lfm2np; print(lfm2np.__file__)"], env=env, cwd=cwd,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(site), where  # the copy, not the checkout, is what the examples import
    return {"env": env, "cwd": cwd}


def run_python(installed, code: str, *flags: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *flags, "-c", code], env=installed["env"], cwd=installed["cwd"],
                          capture_output=True, text=True, timeout=timeout)


PAGE = """
import sys
blocks, fresh = {blocks!r}, {fresh!r}
namespace = {{"__name__": "__docs__"}}
for i, block in enumerate(blocks):
    if fresh:
        namespace = {{"__name__": "__docs__"}}
    exec(compile(block, f"{name}[block {{i}}]", "exec"), namespace)
"""


@pytest.mark.parametrize("path", [p for p in DOCS if python_blocks(p)], ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run_from_anywhere_against_the_installed_package(installed, path):
    code = PAGE.format(blocks=python_blocks(path), fresh=path.name == "README.md", name=path.name)
    proc = run_python(installed, code)
    assert proc.returncode == 0, f"{path.relative_to(ROOT)}:\n{proc.stderr[-3000:]}"


def test_the_first_commands_print_no_warning(installed):
    """jinja2 is a dependency: `lfm2np demo` and the README's ten-line example render the checkpoint's own
    template, with warnings turned into errors."""
    import tomllib

    with open(ROOT / "pyproject.toml", "rb") as f:
        dependencies = tomllib.load(f)["project"]["dependencies"]
    assert any(re.match(r"jinja2\b", d) for d in dependencies)
    demo = subprocess.run([sys.executable, "-W", "error", "-m", "lfm2np", "demo"], env=installed["env"],
                          cwd=installed["cwd"], capture_output=True, text=True, timeout=300)
    assert demo.returncode == 0 and "warning" not in demo.stderr.lower(), demo.stderr
    assert 'assistant: The "while" statement is used' in demo.stdout
    ten_lines = python_blocks(ROOT / "README.md")[0]
    assert "encode_chat" in ten_lines
    proc = run_python(installed, ten_lines, "-W", "error")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def _questions() -> list[tuple[str, list[str], str | None]]:
    """The messages the docs send to the embedded model, as (where, [messages of one conversation], system):
    `--chat '...'` on a line that names `embedded` or runs `lfm2np demo`, and `printf '...' | lfm2np chat`
    without a model (the embedded one is the default)."""
    found = []
    for path in DOCS:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            where = f"{path.relative_to(ROOT)}:{number}"
            chat = re.search(r"--chat '([^']+)'", line)
            if chat and ("embedded" in line or "lfm2np demo" in line):
                system = re.search(r"--system '([^']+)'", line)
                found.append((where, [chat.group(1)], system.group(1) if system else None))
            piped = re.search(r"printf '([^']+)' \| lfm2np chat(?: -|`|;|$| +#| +\))", line)
            if piped:
                lines = piped.group(1).encode().decode("unicode_escape").splitlines()
                found.append((where, [m for m in lines if m and not m.startswith("/")], None))
    return found


def test_the_docs_ask_the_embedded_model_what_it_answers():
    """Each question names a Python statement in quotes, and the greedy reply is about that statement."""
    import lfm2np
    from lfm2np.embedded import embedded_model_path
    from lfm2np.generate import Generation, Sampling
    from lfm2np.io.tokenizer import Tokenizer

    questions = _questions()
    assert len(questions) >= 3 and any(len(q[1]) > 1 for q in questions)
    model, tok = lfm2np.load(embedded_model_path()), Tokenizer.from_dir(embedded_model_path())
    stop = tok.stop_ids(model.config.eos_token_id)
    for where, messages, system in questions:
        history = [{"role": "system", "content": system}] if system else []
        for message in messages:
            subject = re.search(r'"(\w+)"', message)
            assert subject, f"{where}: {message!r} names no statement in quotes"
            history.append({"role": "user", "content": message})
            reply = tok.decode(list(Generation(model, tok.encode_chat(history), 256, Sampling(), stop)),
                               skip_special_tokens=True)
            assert re.search(rf"\b{subject.group(1)}\b", reply), f"{where}: {message!r} -> {reply!r}"
            history.append({"role": "assistant", "content": reply})


def test_the_readme_has_python_examples():
    assert len(python_blocks(ROOT / "README.md")) >= 3


def test_numerics_tables_are_current():
    """docs/numerics.md's tables are what tools/fixture_report.py prints today (measured errors within a
    factor of 3, everything else identical)."""
    import json
    import subprocess
    import sys

    cases = set(json.loads((ROOT / "tests" / "golden" / "manifest.json").read_text())["cases"])
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "fixture_report.py")], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    doc = (ROOT / "docs" / "numerics.md").read_text(encoding="utf-8")

    def rows(text):
        return [r.split("|")[1:-1] for r in text.splitlines()
                if r.startswith("| ") and r.split("|")[1].strip() in cases]

    ours, theirs = rows(out), rows(doc)
    assert ours and len(ours) == len(theirs), "docs/numerics.md is stale: run tools/fixture_report.py"
    for row, doc_row in zip(ours, theirs):
        for a, b in zip(row, doc_row):
            a, b = a.strip(), b.strip()
            if re.fullmatch(r"[0-9.]+e[-+]\d+", a) and float(a) and float(b):  # measured: same magnitude
                assert 1 / 3 < float(a) / float(b) < 3, f"docs/numerics.md is stale ({a} vs {b})"
            else:
                assert a == b, f"docs/numerics.md is stale ({a!r} vs {b!r}): run tools/fixture_report.py"


def test_generated_sections_are_current():
    """The generated parts of the docs (layer patterns, ...) are what tools/make_docs.py writes, and its generators
    and the docs' sections match one to one: no section without a generator, no generator without a section."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_docs", ROOT / "tools" / "make_docs.py")
    make_docs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_docs)
    sections = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        sections += re.findall(r"<!-- generated:([\w-]+) -->", text)
        assert set(sections) <= set(make_docs.GENERATED), f"{path.name}: a section tools/make_docs.py cannot write"
        assert make_docs.render(text) == text, f"{path.name} is stale: run python tools/make_docs.py"
    assert sorted(sections) == sorted(make_docs.GENERATED), "tools/make_docs.py: a generator with no section (or two)"
    assert "<!-- generated:layer-patterns -->" in (ROOT / "docs" / "architecture.md").read_text()


def test_relative_links_resolve():
    for path in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text(encoding="utf-8")):
            if "://" in target:
                continue
            assert (path.parent / target).exists(), f"{path.relative_to(ROOT)} links to missing {target}"


def test_the_options_table_is_current():
    """docs/cli.md's table of options and the usages are what the parsers give today."""
    import cli_reference

    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert cli_reference.render(text) == text, "docs/cli.md is stale: run python tests/cli_reference.py docs/cli.md"
    table = [line for line in text.splitlines() if line.startswith("| `")]
    names = [re.match(r"\| `([^` ]+)", line).group(1) for line in table]
    assert len(names) == len(set(names)) > 30  # each option once
    assert "`-p`, `--prompt`" in next(line for line in table if line.startswith("| `--text"))
