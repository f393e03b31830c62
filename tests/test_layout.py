"""The package's layout: the import rules of the design, checked by reading every module's imports.

- the core (errors, numerics, config, config_keys, ops, passes, layers, schema, weights, state, model, version,
  and llama.cpp's CPU arithmetic: ggml, ggml_quants, ggml_ops; and the vision tower's vision, vision_config,
  vision_schema, ops_vision) imports only the core, and ops imports nothing from lfm2np but passes, which imports
  nothing from lfm2np:
  the formulas know nothing that names or records a value;
- io/ imports the core and io/; oracle/ and calc/ import the core, io/, processor/ and themselves, never each other;
- processor/ (the image processor: images and prompts to arrays and ids) imports the core, io/ and itself: a leaf
  beside io/, which the oracle (diagnosing a processor dump), the calculators (image tokens) and the middle use;
- the middle (loading, presets, generate, sampling, embedded, synthetic, evaluate, prompting) imports the core, io/,
  processor/ and the middle;
- nothing imports cli/ (but ``__main__``); the package face only re-exports;
- there is no import circle, and imports inside functions are only of optional dependencies;
- outside the core, nothing reaches into another object's private attributes;
- only the config (and the files that map other formats' names to a model type) reads ``model_type``: every
  behaviour is a flag the config derives.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "lfm2np"
CORE = {"errors", "numerics", "config", "config_keys", "ops", "passes", "layers", "schema", "aliases", "weights",
        "state", "model", "embedding", "version", "ggml", "ggml_quants", "ggml_ops", "vision", "vision_config",
        "vision_schema", "ops_vision"}
MIDDLE = {"loading", "presets", "generate", "sampling", "embedded", "synthetic", "evaluate", "cluster", "prompting"}
#: imported inside the functions that need them: gguf (an extra), jinja2 (a dependency, imported when a chat template
#: is first rendered: most commands never render one), readline (in the standard library, but not on every platform),
#: PIL (Pillow, the extra "vision": decoding image files), Dask (the dask extra: --workers, --scheduler), and the
#: backends the conformance kit runs when asked (llama-cpp-python, torch and transformers)
OPTIONAL = {"gguf", "jinja2", "readline", "PIL", "dask", "distributed", "llama_cpp", "torch", "transformers"}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(parts) or "__init__"


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path) -> list[tuple[str, bool, int]]:
    """(lfm2np module imported, or an external top-level name prefixed with '!', inside a function?, line)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    me = module_name(path).split(".")
    package = me if path.name == "__init__.py" else me[:-1]
    if me == ["__init__"]:
        package = []
    out = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    name = alias.name
                    out.append((name[len("lfm2np."):] if name.startswith("lfm2np.") else "!" + name,
                                in_function, child.lineno))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package[: len(package) - (child.level - 1)] if child.level > 1 else package
                    target = ".".join([*base, *(child.module.split(".") if child.module else [])])
                    for alias in child.names:  # "from . import ops" imports a module
                        full = f"{target}.{alias.name}" if target else alias.name
                        out.append((full if full in MODULES else (target or "__init__"), in_function, child.lineno))
                elif child.module == "lfm2np" or child.module.startswith("lfm2np."):
                    target = child.module[len("lfm2np."):] if child.module != "lfm2np" else "__init__"
                    out.append((target, in_function, child.lineno))
                else:
                    out.append(("!" + child.module, in_function, child.lineno))
            visit(child, inner)

    visit(tree, False)
    return out


def group(module: str) -> str:
    top = module.split(".")[0]
    if module in CORE:
        return "core"
    if top in ("io", "oracle", "calc", "cli", "processor"):
        return top
    if module in MIDDLE:
        return "middle"
    return module  # __init__, __main__


ALLOWED = {
    "core": {"core"},
    "io": {"core", "io"},
    "processor": {"core", "io", "processor"},
    "oracle": {"core", "io", "processor", "oracle"},
    "calc": {"core", "io", "processor", "calc"},
    "middle": {"core", "io", "processor", "middle"},
    "cli": {"core", "io", "processor", "oracle", "calc", "middle", "cli"},
    "__init__": {"core", "middle"},
    "__main__": {"cli"},
}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_follow_the_rules(module):
    g = group(module)
    for target, _, line in imports(MODULES[module]):
        if target.startswith("!"):
            continue
        assert target in MODULES, f"{module}:{line} imports unknown lfm2np module {target}"
        assert group(target) in ALLOWED[g], f"{module}:{line} ({g}) must not import {target} ({group(target)})"
        if module in ("ops", "passes") and (module, target) != ("ops", "passes"):
            raise AssertionError(f"{module}:{line} imports {target}: ops imports only passes, passes nothing")


@pytest.mark.parametrize("module", sorted(MODULES))
def test_function_local_imports_are_optional_dependencies(module):
    for target, local, line in imports(MODULES[module]):
        if local:
            assert target.startswith("!") and target[1:].split(".")[0] in OPTIONAL, \
                f"{module}:{line} imports {target.lstrip('!')} inside a function (only optional dependencies may)"


def test_no_import_circle():
    graph = {m: {t for t, _, _ in imports(p) if not t.startswith("!") and t != m} for m, p in MODULES.items()}
    state: dict[str, int] = {}

    def walk(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in graph.get(m, ()):
            if state.get(t) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                walk(t, stack + [t])
        state[m] = 2

    for m in graph:
        if m not in state:
            walk(m, [m])


def test_the_face_only_reexports():
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    for node in tree.body:
        assert isinstance(node, (ast.ImportFrom, ast.Import, ast.Expr, ast.Assign)), ast.dump(node)[:80]
        if isinstance(node, ast.Assign):
            assert [t.id for t in node.targets] == ["__all__"]


@pytest.mark.parametrize("module", sorted(m for m in MODULES if group(m) != "core"))
def test_no_private_access_outside_the_core(module):
    """Nothing outside the core reads another object's ``_private`` attribute (self and cls aside)."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = node.value.id if isinstance(node.value, ast.Name) else None
            assert owner in ("self", "cls"), f"{module}:{node.lineno} reads .{node.attr} of another object"


#: modules that may name a model type: the config derives the flags, presets and GGUF map names to a type
READS_MODEL_TYPE = {"config", "config_keys", "presets", "io.gguf_meta"}


@pytest.mark.parametrize("module", sorted(set(MODULES) - READS_MODEL_TYPE))
def test_only_the_config_tests_a_model_type(module):
    """A behaviour that depends on the model type is a flag derived once in :class:`lfm2np.config.Config`: no
    other module compares ``model_type`` (or a model type's name) to decide what to compute."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for part in ast.walk(node):  # c.model_type == ..., d.get("model_type") in ..., ... == "lfm3"
                named = (isinstance(part, ast.Attribute) and part.attr == "model_type") or \
                    (isinstance(part, ast.Constant) and part.value in ("model_type", "lfm2_moe", "lfm3", "lfm2_vl"))
                assert not named, f"{module}:{node.lineno} tests a model type; derive a flag in Config instead"


def test_modules_stay_small():
    """Split a file when it passes ~400 lines (the bounded GGUF header grammar is one documented exception)."""
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > 450}
    assert set(long) <= {"io.gguf_header"}, long


def test_the_readme_layout_lists_every_module():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Layout"):]
    for module, path in MODULES.items():
        shown = str(path.relative_to(ROOT))
        assert shown in section or (path.name == "__init__.py" and str(path.parent.relative_to(ROOT)) + "/" in section), \
            f"README's layout section does not list {shown}"
