"""The house: one trace schema that the forward emits exactly, operators without names, one loading path.

- the forward pass names exactly :func:`lfm2np.trace_names` (names, order, shapes, integer or float) for every
  fixture config (LFM2, LFM2-MoE, LFM3) and every numerics mode, from a checkpoint or a GGUF file, whole or in a
  decoding step;
- every consumer derives from the schema: golden vectors, the llama.cpp and transformers names, the port's
  handlers (a handler for a name outside the schema cannot be registered);
- ops.py is formulas: nothing that names or records, and no operator or block takes more than eight
  parameters;
- nothing outside the config tests a model type;
- a model reads its weights through one interface, loading computes the tensor layout once, and weights given
  as arrays are checked against it.
"""

from __future__ import annotations

import ast
import json
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest

import lfm2np
from lfm2np import layers, schema
from lfm2np.oracle import port
from lfm2np.oracle.trace import from_transformers, record
from lfm2np.synthetic import random_params

from conftest import GOLDEN

ROOT = Path(__file__).resolve().parent.parent
LFM3_CASES = sorted(json.loads((GOLDEN / "lfm3_manifest.json").read_text())["cases"])
BIDIR_CASES = sorted(json.loads((GOLDEN / "bidir_manifest.json").read_text())["cases"])
ALL_CASES = sorted(json.loads((GOLDEN / "manifest.json").read_text())["cases"]) + LFM3_CASES + BIDIR_CASES
IDS = np.array([3, 1, 4, 1, 5, 9, 2, 6])


def load(case: str, dtype: str = "float32") -> lfm2np.Model:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the LFM3 label trap warns by design
        return lfm2np.load(GOLDEN / case, dtype=dtype)


def emitted(model: lfm2np.Model, ids: np.ndarray, state=None) -> list[tuple[str, tuple[int, ...], str]]:
    out = []
    model.step(ids, state, record=lambda n, v: out.append((n, v.shape, v.dtype.kind))) if state is not None else \
        model.forward(ids, record=lambda n, v: out.append((n, v.shape, v.dtype.kind)))
    return out


def expected(config: lfm2np.Config, T: int, inputs: bool = False) -> list[tuple[str, tuple[int, ...], str]]:
    return [(t.name, t.shape_for(T), "i" if t.integer else "f") for t in lfm2np.trace_names(config, inputs=inputs)]


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16", "llamacpp-cpu"])
@pytest.mark.parametrize("case", ALL_CASES)
def test_the_forward_emits_exactly_the_schema(case, dtype):
    m = load(case, dtype)
    ids = IDS % m.config.vocab_size
    inputs = m.numerics.names_inputs  # llama.cpp's CPU arithmetic also names what each product reads
    assert inputs == (dtype == "llamacpp-cpu")
    assert emitted(m, ids) == expected(m.config, len(ids), inputs)
    if m.config.causal:  # (a bidirectional model has no decoding state)
        _, state = m.step(ids[:5])
        assert emitted(m, ids[5:], state) == expected(m.config, 3, inputs)  # a decoding step names the same values


def test_a_gguf_model_emits_the_schema_too(tmp_path):
    """Through the GGUF tensor source (a fused attn_qkv, Q8_0 blocks) the same names come out."""
    from lfm2np.io.gguf_write import write_gguf

    m = load("moe-bf16-bias")
    path = tmp_path / "m.gguf"
    write_gguf(path, m.config, m.params, "Q8_0", fuse_qkv=True)
    g = lfm2np.load(path)
    assert emitted(g, IDS) == expected(g.config, len(IDS))


def test_the_schema_has_each_name_once_and_steps_it_declares():
    for case in ALL_CASES:
        c = load(case).config
        names = [t.name for t in lfm2np.trace_names(c)]
        assert len(names) == len(set(names))
        for t in lfm2np.trace_names(c):
            assert schema.is_trace_name(t.name), t.name
            if t.layer is not None:
                assert t.step in schema.STEPS, t.name


def test_transformers_and_llama_cpp_names_come_from_the_schema():
    c = lfm2np.load_config("tiny-moe")
    by_name = {t.name: t for t in lfm2np.trace_names(c)}
    assert by_name["model.layers.2.self_attn.q_proj"].llama_cpp == ("Qcur-2", "model.layers.{}.self_attn.q_proj-2")
    assert by_name["model.layers.1.feed_forward.router_scores"].llama_cpp == ("ffn_moe_probs-1",)
    assert by_name["model.layers.0.feed_forward.output"].llama_cpp == ()  # a dense FFN's output is unnamed there
    assert by_name["model.layers.1.feed_forward.output"].llama_cpp == ("ffn_moe_out-1",)
    # every capture key the schema lists maps back to its name, and nothing else does
    captured = {key: np.zeros(1) for t in by_name.values() for key in t.transformers}
    assert set(from_transformers(captured).names()) == {n for n, t in by_name.items() if t.transformers}
    lfm3 = load("lfm3-window").config
    q = next(t for t in lfm2np.trace_names(lfm3) if t.name.endswith("1.self_attn.q_normed"))
    assert q.transformers == ("model.layers.1.self_attn.q_norm.output",) and q.llama_cpp == ()


def test_a_port_handler_outside_the_schema_cannot_be_registered():
    with pytest.raises(lfm2np.Lfm2npError, match="'conv.b_gates', which is not in the trace schema"):
        port._on("conv.b_gates")
    with pytest.raises(lfm2np.Lfm2npError, match="not in the trace schema"):
        port._on("conv.bx", reads=("self_attn.q_ropes",))
    port._on("model.rotary_emb.{kind}.inv_freq", reads=("conv.bx",))  # schema names register


def test_golden_vectors_list_the_schema_values_of_each_block(tmp_path):
    from lfm2np.oracle.golden import write_golden

    m = load("lfm3-window")
    out = write_golden(m, IDS % m.config.vocab_size, tmp_path / "g")
    ops_ = json.loads((out / "manifest.json").read_text())["operators"]
    written = {f"{op['name']}.{o}" for op in ops_ for o in op["outputs"]
               if op["function"].startswith("lfm2np.layers.") and op["function"] != "lfm2np.layers.decoder_layer"}
    names = {t.name for t in lfm2np.trace_names(m.config)}
    blocks = {n for n in names if ".self_attn." in n or ".conv." in n or ".feed_forward." in n or "rotary" in n}
    assert written == blocks


# ----------------------------------------------------------------------------------------- the code
def _functions(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]


def test_ops_is_formulas_only():
    """ops.py names nothing and records nothing: no tap, record, scope or name argument, no trace names."""
    tree = ast.parse((ROOT / "lfm2np" / "ops.py").read_text(encoding="utf-8"))
    for fn in _functions(ROOT / "lfm2np" / "ops.py"):
        params = {a.arg for a in fn.args.args + fn.args.kwonlyargs}
        assert not params & {"tap", "record", "s", "scope", "name", "prefix"}, fn.name
    words = {getattr(n, "id", getattr(n, "attr", None)) for n in ast.walk(tree) if isinstance(n, (ast.Name, ast.Attribute))}
    assert not words & {"tap", "Tap", "Scope", "record", "prefixed", "untapped", "trace_names"}
    strings = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    assert not any(v.startswith(("model.", "self_attn", "conv.", "feed_forward")) for v in strings)


@pytest.mark.parametrize("module", ["ops", "layers"])
def test_no_operator_or_block_takes_more_than_eight_parameters(module):
    for fn in _functions(ROOT / "lfm2np" / f"{module}.py"):
        n = len(fn.args.args) + len(fn.args.kwonlyargs) - (fn.args.args[:1] and fn.args.args[0].arg == "self")
        assert n <= 8, (fn.name, n)


def test_nothing_outside_the_config_tests_a_model_type():
    """Behaviour flags are derived once in the config (rope_in_float32, attention_spelling, ...); other modules
    read the flags, never ``model_type``, in a comparison."""
    allowed = {"config.py", "config_keys.py"}
    for path in sorted((ROOT / "lfm2np").rglob("*.py")):
        if path.name in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Compare):
                parts = [node.left, *node.comparators]
                named = [p for p in parts if isinstance(p, (ast.Attribute, ast.Name))
                         and (getattr(p, "attr", None) == "model_type" or getattr(p, "id", None) == "model_type")]
                assert not named, f"{path.relative_to(ROOT)}:{node.lineno} compares model_type"


def test_the_forward_reaches_attention_in_few_hops():
    """Model.forward -> Model.run -> layers.decoder_layer -> layers.attention_block -> ops.attention -> ops.attend:
    the call chain a reader follows to the attention formula."""
    chain = [("model.py", "forward", "run"), ("model.py", "run", "decoder_layer"),
             ("layers.py", "decoder_layer", "attention_block"), ("layers.py", "attention_block", "attention"),
             ("ops.py", "attention", "attend")]
    for file, caller, callee in chain:
        fn = next(f for f in _functions(ROOT / "lfm2np" / file) if f.name == caller)
        calls = {getattr(c.func, "attr", getattr(c.func, "id", None)) for c in ast.walk(fn) if isinstance(c, ast.Call)}
        assert callee in calls, (caller, callee)


# -------------------------------------------------------------------------------------------- weights
def test_loading_computes_the_layout_once(monkeypatch):
    calls = []
    real = schema.layout
    monkeypatch.setattr(schema, "layout", lambda c: (calls.append(1), real(c))[1])
    import lfm2np.loading as loading
    monkeypatch.setattr(loading, "layout", schema.layout)
    lfm2np.load(GOLDEN / "moe-bf16-bias").forward([1, 2, 3])
    assert len(calls) == 1


def test_one_weights_interface_for_every_source(tmp_path):
    from lfm2np.io.gguf_write import write_gguf
    from lfm2np.weights import Weights

    m = load("dense-untied-mqa-f16")
    write_gguf(tmp_path / "m.gguf", m.config, m.params, "F32")
    for model in (m, lfm2np.load(tmp_path / "m.gguf"), lfm2np.Model(m.config, dict(m.params))):
        assert isinstance(model.params, Weights) and model.params.mode == "float32"
        assert model.memory_report()["resident_bytes"] >= 0
        np.testing.assert_array_equal(model.embed_tokens(np.array([2, 3])), model.params["model.embed_tokens.weight"][[2, 3]])


@pytest.mark.parametrize("change, needle", [
    (lambda p: p.pop("model.layers.0.ffn_norm.weight"), "missing tensor model.layers.0.ffn_norm.weight"),
    (lambda p: p.__setitem__("model.layers.0.ffn_norm.weight", np.ones(5, np.float32)),
     "'model.layers.0.ffn_norm.weight' has shape [5]; the config expects [48]"),
    (lambda p: p.__setitem__("lm_head.weight", np.ones((97, 48), np.float32)), "lm_head.weight is not used"),
    (lambda p: p.__setitem__("model.embedding_norm.weight", "ones"), "'model.embedding_norm.weight' is a str"),
    (lambda p: p.__setitem__("model.embedding_norm.weight", None), "expected an array of real numbers"),
])
def test_weights_given_as_arrays_are_checked(change, needle):
    c = lfm2np.load_config("tiny-dense")
    params = random_params(c, seed=1)
    change(params)
    with pytest.raises(lfm2np.Lfm2npError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        lfm2np.Model(c, params)


def test_an_unused_tensor_is_allowed_when_not_strict():
    c = lfm2np.load_config("tiny-dense")
    params = {**random_params(c, seed=1), "extra": np.zeros(3)}
    with pytest.warns(UserWarning, match="extra is not used"):
        m = lfm2np.Model(c, params, strict=False)
    assert "extra" not in m.params


def test_threads_may_share_a_lazily_loaded_moe_model():
    """Four threads read experts of one lazily loaded MoE model whose budget holds six of its 24, so the cache
    evicts on nearly every read (the expert cache once had no lock: "OrderedDict mutated during iteration");
    then four threads run forward passes with it: each gets what it gets alone."""
    full = lfm2np.load(GOLDEN / "moe-allk-convbias")
    experts = [n for n in full.params if ".experts." in n]
    budget = full.memory_report()["every_token"]["needed_bytes"] + 6 * full.params[experts[0]].nbytes
    m = lfm2np.load(GOLDEN / "moe-allk-convbias", memory_budget=int(budget))
    seqs = [np.array([1 + t, 7, 3 + t, 9, 2]) for t in range(4)]
    want = [m.forward(s) for s in seqs]  # (the every-token tensors now take their share of the budget)
    np.testing.assert_array_equal(want[0], full.forward(seqs[0]))
    got, errors = [None] * 4, []

    def run(t):
        try:
            rng = np.random.default_rng(t)
            read = [m.params[experts[e]] for e in rng.integers(len(experts), size=20000)]
            for e in range(len(experts)):
                np.testing.assert_array_equal(m.params[experts[e]], full.params[experts[e]])
            got[t] = m.forward(seqs[t])
            assert len(read) == 20000
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads take turns as often as the interpreter allows: races show
    try:
        threads = [threading.Thread(target=run, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        sys.setswitchinterval(switch)
    assert not errors, errors
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    assert m.memory_report()["experts"]["evictions"] > 10000


def test_a_scope_names_below_its_prefix_and_rounds_with_the_mode():
    seen = []
    s = layers.Scope(lambda x: np.round(x), lambda n, v: (seen.append(n), v)[1], "model.layers.3.")
    assert s.at("conv.")("bx", np.ones(2)) is not None and seen == ["model.layers.3.conv.bx"]
    assert layers.QUIET.at("anything.") is layers.QUIET and layers.QUIET.quiet
