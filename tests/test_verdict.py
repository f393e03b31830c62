"""A verdict a backend author can trust (compare and diagnose): names resolved on both sides, the same run or an
error, coverage part of the verdict, where the divergence begins, routing near-ties told from flips, quantised
runs, and a diagnosis that says when nothing fits.

The buggy traces come from the independent backend of tests/buggy_backends.py (its own forward, not lfm2np's
mutation code), from weights converted wrongly, or from one value changed through the record protocol.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import lfm2np
from lfm2np.io.gguf_write import write_gguf
from lfm2np.oracle.compare import compare
from lfm2np.oracle.diagnose import diagnose, format_diagnosis
from lfm2np.oracle.dumps import trace_dump
from lfm2np.oracle.follow import following
from lfm2np.oracle.trace import Trace, record
from lfm2np.schema import llama_cpp_names, transformers_names
from lfm2np.synthetic import random_params

from buggy_backends import Backend
from conftest import subprocess_env
from test_diagnose import CONFIGS, IDS, setup

MOE = CONFIGS["moe"]


def reference():
    c, params, model, _ = setup("moe")
    return model, record(model, IDS)[1]


def backend(bugs=(), prefill=None) -> Trace:
    c, params, _, _ = setup("moe")
    _, tensors = Backend(c, params, bugs).run(IDS, prefill)
    return Trace(tensors, {"ids": IDS.tolist()})


def spelled(trace: Trace, how) -> Trace:
    """``trace`` with each tensor renamed by ``how(name) -> 0 (lfm2np), 1 (llama.cpp) or 2 (transformers)``,
    when that tool has a name for it."""
    out = {}
    for name, value in trace.tensors.items():
        options = [name, *llama_cpp_names(name)[:1], *transformers_names(name)[:1]]
        out[options[min(how(name), len(options) - 1)]] = value
    return Trace(out, dict(trace.meta))


def verdict(result):
    first = result.first_divergence
    return result.ok, result.enough, None if first is None else (first.name, first.position)


# --------------------------------------------------------------------------------------- symmetric compare
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bug=st.sampled_from([(), ("conv-taps-reversed",), ("router-softmax",), ("rope-interleaved",)]),
       spelling=st.lists(st.integers(0, 2), min_size=200, max_size=200), swap=st.booleans(),
       shuffle=st.randoms(use_true_random=False), duplicate=st.booleans())
def test_no_spelling_order_or_argument_order_changes_a_verdict(bug, spelling, swap, shuffle, duplicate):
    _, ref = reference()
    theirs = backend(bug)
    want = verdict(compare(theirs, ref))
    names = sorted(set(theirs.tensors) | set(ref.tensors))
    how = lambda n: spelling[names.index(n) % len(spelling)]  # noqa: E731
    a, b = spelled(theirs, how), spelled(ref, lambda n: 2 - how(n))
    for t in (a, b):
        items = list(t.tensors.items())
        shuffle.shuffle(items)
        t.tensors = dict(items)
    if duplicate:  # the same value once more under another of its names: allowed, it changes nothing
        name = "model.layers.1.self_attn.q_proj"
        a.tensors["Qcur-1"] = theirs.tensors[name]
        a.tensors[name] = theirs.tensors[name]
    got = compare(b, a) if swap else compare(a, b)
    assert verdict(got) == want


def test_a_llama_cpp_named_backend_is_judged_as_any_other():
    """Reversed conv taps, the backend's trace named as llama.cpp names tensors, given as the trace under test:
    the divergence is found whichever side the names are on (it once passed with 'all 1 tensors agree')."""
    _, ref = reference()
    theirs = spelled(backend(("conv-taps-reversed",)), lambda n: 1)
    for result in (compare(theirs, ref), compare(ref, theirs)):
        assert not result.ok and result.first_divergence.name == "model.layers.0.conv.conv_out"
        assert result.coverage.enough and result.coverage.compared > 40


def test_one_value_under_two_names_must_hold_the_same_numbers():
    _, ref = reference()
    bad = Trace({**ref.tensors, "result_output": ref["lm_head"] + 1}, dict(ref.meta))
    with pytest.raises(lfm2np.Lfm2npError, match="'lm_head' and 'result_output' both name lm_head"):
        compare(ref, bad)
    alias = Trace({"l_out-1": ref["model.layers.1"] * 2, **ref.tensors}, dict(ref.meta))
    with pytest.raises(lfm2np.Lfm2npError, match="'l_out-1' and 'model.layers.1' both name model.layers.1"):
        compare(alias, ref)


def test_a_key_given_twice_in_a_traces_metadata_is_an_error(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "t.safetensors"
    save_file({"lm_head": np.zeros((2, 3), np.float32)}, str(path),
              metadata={"meta": '{"ids": [1, 2], "ids": [1, 3]}'})
    with pytest.raises(lfm2np.Lfm2npError, match="'ids' appears twice"):
        Trace.load(path)


def test_chosen_experts_are_compared_as_numbers_whatever_their_type():
    _, ref = reference()
    name = "model.layers.1.feed_forward.selected_experts"
    a = Trace({**ref.tensors, name: np.full(ref[name].shape, 2**64 - 1, np.uint64)}, dict(ref.meta))
    b = Trace({**ref.tensors, name: np.full(ref[name].shape, -1, np.int64)}, dict(ref.meta))
    result = compare(a, b)
    assert not result.ok and result.first_divergence.name == name


# ------------------------------------------------------------------------------------------ the same run
def test_traces_of_other_inputs_are_refused_with_where_they_differ():
    model, _ = reference()
    a = record(model, [1, 2, 3, 4])[1]
    b = record(model, [1, 2, 3, 5])[1]
    with pytest.raises(lfm2np.Lfm2npError, match=r"ids first differ at position 3 \(A: 4, B: 5\)"):
        compare(a, b)
    longer = record(model, [1, 2, 3, 4, 9, 9])[1]
    with pytest.raises(lfm2np.Lfm2npError, match=r"different lengths \(A: 4 ids, B: 6"):
        compare(a, longer)
    prefix = compare(a, longer, prefix=True)
    assert prefix.ok and all(d.positions == 4 for d in prefix.diffs if d.name == "lm_head")


def test_a_trace_without_ids_gets_a_warning_and_rows_still_count():
    model, ref = reference()
    bare = Trace(dict(ref.tensors))
    result = compare(bare, ref)
    assert result.ok and any("trace A records no ids" in w for w in result.warnings)
    short = Trace({k: v[:5] if v.ndim and v.shape[0] == len(IDS) else v for k, v in ref.tensors.items()})
    with pytest.raises(lfm2np.Lfm2npError, match="different lengths"):
        compare(short, Trace(dict(ref.tensors)))
    assert compare(short, Trace(dict(ref.tensors)), prefix=True).ok


# ----------------------------------------------------------------------------------------------- coverage
def test_too_little_in_common_is_not_a_pass(tmp_path):
    _, ref = reference()
    only_embeddings = Trace({"model.embed_tokens": ref["model.embed_tokens"]}, dict(ref.meta))
    result = compare(only_embeddings, ref)
    assert not result.ok and not result.enough and result.first_divergence is None
    assert result.verdict().startswith("NOT ENOUGH IN COMMON") and "nothing after the embeddings" in result.verdict()
    assert compare(only_embeddings, ref, partial=True).ok
    first_layer = Trace({k: v for k, v in ref.tensors.items() if k.startswith("model.layers.0")}, dict(ref.meta))
    assert not compare(first_layer, ref).ok  # one of four layers
    a = only_embeddings.save(tmp_path / "a")
    b = ref.save(tmp_path / "b")
    run = lambda *args: subprocess.run([sys.executable, "-m", "lfm2np", "compare", str(a), str(b), *args],  # noqa: E731
                                       capture_output=True, text=True, env=subprocess_env())
    assert run().returncode == 1 and "NOT ENOUGH IN COMMON" in run().stdout
    assert run("--partial").returncode == 0


# -------------------------------------------------------------------------------------------------- where
def test_the_first_divergence_names_its_layer_and_first_position():
    """A conv window restarted at the second call: everything agrees before position 7, the first conv layer's
    conv_out differs from there."""
    _, ref = reference()
    result = compare(backend(("conv-state-dropped",), prefill=7), ref)
    first = result.first_divergence
    assert (first.name, first.layer, first.position) == ("model.layers.0.conv.conv_out", 0, 7)
    assert "(layer 0, position 7)" in result.verdict()


# ------------------------------------------------------------------------------------------------ routing
@pytest.fixture(scope="module")
def quantised(tmp_path_factory):
    """A tiny random MoE (every width 256, an expert bias that changes choices) as F32, Q8_0 and Q4_K GGUFs;
    lfm2np's traces of each on the same ids."""
    c = lfm2np.load_config("tiny-moe").replace(hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                                                intermediate_size=256, moe_intermediate_size=256)
    params = random_params(c, seed=3, expert_bias_scale=0.3)
    tmp = tmp_path_factory.mktemp("q")
    ids = np.random.default_rng(0).integers(0, c.vocab_size, 32)
    out = {}
    for qtype in ("F32", "Q8_0", "Q4_K"):
        write_gguf(tmp / f"{qtype}.gguf", c, params, qtype)
        out[qtype] = (lfm2np.load(tmp / f"{qtype}.gguf"), record(lfm2np.load(tmp / f"{qtype}.gguf"), ids)[1])
    return out


def test_choices_after_a_near_tie_are_judged_on_their_scores():
    """Layer 1 near-ties at position 6 in both runs (the best expert not chosen set 1e-6 above the last chosen in
    the backend, 1e-6 below in the reference); the backend's layer 2 then chooses another expert at position 3
    with its scores unchanged. Positions before the near-tie are still judged, and layer 2's choice there is a
    flip measured on its scores, not one "without router scores"."""
    model, _ = reference()
    E, k = model.config.num_experts, model.config.num_experts_per_tok

    def run(sign: float, flip: bool) -> Trace:
        kept = {}

        def patch(name, value):
            v = value.copy()
            if name == "model.layers.1.feed_forward.biased_scores":  # what the choice is made on
                ranked = np.argsort(-v[6], kind="stable")
                v[6, ranked[k]] = v[6, ranked[k - 1]] + sign * 1e-6
            elif flip and name == "model.layers.2.feed_forward.selected_experts":
                v[3, 0] = next(e for e in range(E) if e not in v[3])
            else:
                return None
            kept[name] = v
            return v

        def keep(name, value):
            out = patch(name, value)
            if out is None:
                kept[name] = np.array(value)
            return out

        model.forward(IDS, record=keep)
        return Trace(kept, {"ids": IDS.tolist()})

    result = compare(run(+1, flip=True), run(-1, flip=False))
    (tie,) = [f for f in result.flips if f.near_tie]
    (flip,) = [f for f in result.flips if not f.near_tie]
    assert (tie.layer, tie.position, flip.layer, flip.position) == (1, 6, 2, 3)
    assert flip.margin is not None and flip.margin > flip.tolerance
    first = result.first_divergence
    assert first.name == "model.layers.2.feed_forward.selected_experts" and "router scores" not in first.problem


@pytest.mark.parametrize("qtype, tier", [("Q8_0", "q8_0"), ("Q4_K", "q4")])
def test_a_correct_quantised_run_passes_its_tier_with_its_near_ties_listed(quantised, qtype, tier):
    f32_model, f32 = quantised["F32"]
    _, run = quantised[qtype]
    result = compare(run, f32, tier)
    assert result.ok, result.verdict()
    assert not [f for f in result.flips if not f.near_tie]
    followed = following(f32_model, run, tier)
    on_equal_routing = compare(run, followed, tier)
    assert on_equal_routing.ok and all(d.positions is None for d in on_equal_routing.diffs)
    assert len(followed.meta["followed"]) == len(result.near_ties) or result.near_ties
    # other weights than the run's: the report says which reference answers which question
    assert any(f"ran a GGUF (its weights are {qtype}" in n and "F32.gguf" in n for n in result.notes)
    if qtype == "Q4_K":
        assert result.near_ties  # this model has near-ties at 4 bits: they are listed, not failed


def test_a_router_bug_still_fails_at_a_loose_tier(quantised):
    _, f32 = quantised["F32"]
    model, _ = quantised["Q8_0"]
    ids = np.array(f32.meta["ids"])
    broken: dict = {}

    def softmax_router(name, value):  # the backend scores experts with a softmax, and chooses on that
        out = None
        if name.endswith("router_scores"):
            logits = broken[name.replace("router_scores", "router_logits")].astype(np.float64)
            e = np.exp(logits - logits.max(-1, keepdims=True))
            out = (e / e.sum(-1, keepdims=True)).astype(value.dtype)
        broken[name] = np.array(value if out is None else out)
        return out

    model.forward(ids, record=softmax_router)
    result = compare(Trace(broken, {"ids": ids.tolist()}), f32, "q8_0")
    assert not result.ok and result.first_divergence.name.endswith("router_scores")


def test_a_quantised_run_against_the_original_weights_says_which_reference_answers(tmp_path, quantised):
    _, q8 = quantised["Q8_0"]
    model, _ = reference()
    ref = Trace(dict(q8.tensors), {**q8.meta, "weights": {"format": "safetensors", "path": "/somewhere"}})
    result = compare(q8, ref, "fp32")
    assert any("ran a GGUF (its weights are Q8_0)" in n and "same GGUF" in n for n in result.notes)


# ------------------------------------------------------------------------------------- diagnose: no fit
def test_a_mistake_made_in_one_layer_is_named_with_its_layer():
    """A weight converter exchanged w1 and w3 in one MoE layer's experts only (not in the catalogue as such)."""
    c, params, model, _ = setup("moe")
    layer = c.moe_layers[-1]
    converted = dict(params)
    for e in range(c.num_experts):
        p = f"model.layers.{layer}.feed_forward.experts.{e}."
        converted[p + "w1.weight"], converted[p + "w3.weight"] = params[p + "w3.weight"], params[p + "w1.weight"]
    _, trace = record(lfm2np.Model(c, converted), IDS)
    d = diagnose(model, trace_dump(trace, IDS))
    assert d.best is not None and d.best.id == "swiglu-gate-up-swapped"
    assert d.best.switches["layers"] == (layer,) and f"layer {layer}" in d.best.variant


def test_nothing_reproduces_a_mistake_outside_the_catalogue(tmp_path):
    """One conv output scaled by 1.001: the first line says no catalogued mistake reproduces the dump, the
    divergence is named, mistakes acting before it are contradicted and ranked last, best is null, exit 1."""
    c, params, model, _ = setup("moe")
    conv = c.conv_layers[1]
    values = {}

    def scaled(name, value):
        out = value * np.float32(1.001) if name == f"model.layers.{conv}.conv.conv_out" else None
        values[name] = np.array(value if out is None else out)
        return out

    model.forward(IDS, record=scaled)
    d = diagnose(model, trace_dump(Trace(values), IDS))
    report = format_diagnosis(d)
    assert report.splitlines()[0] == (f"no catalogued mistake reproduces this dump: the divergence begins at "
                                      f"model.layers.{conv}.conv.conv_out (layer {conv}, position 0)")
    assert d.best is None and d.nothing_reproduces and d.to_json()["best"] is None
    contradicted = [h for h in d.hypotheses if h.contradicted]
    assert contradicted and all(h.where is not None for h in contradicted)
    ranks = [h.contradicted for h in d.hypotheses]
    assert ranks == sorted(ranks)  # every contradicted hypothesis below every other one
    assert "conv-taps-reversed" in {h.id for h in contradicted}  # it acts at layer 0, which the dump shows intact
    lines = report.splitlines()  # the reference itself ranks above the contradicted mistakes
    baseline = next(n for n, line in enumerate(lines) if "(no mistake)" in line)
    assert "ruled out" in lines[baseline + 1] and "contradicted" in lines[baseline + 2]
    assert d.to_json()["no_mistake"]["explained"] == d.no_mistake.explained > 0
    assert d.comparison["ids"] == IDS.tolist() and not [w for w in d.comparison["warnings"] if "ids" in w]
    from lfm2np.io.safetensors import save_checkpoint

    path = Trace(values, {"ids": IDS.tolist()}).save(tmp_path / "scaled")
    save_checkpoint(tmp_path / "ck", c, params)
    check = subprocess.run([sys.executable, "-m", "lfm2np", "diagnose", str(tmp_path / "ck"), "--dump", str(path),
                            "--json"], capture_output=True, text=True, env=subprocess_env())
    assert check.returncode == 1, check.stderr
    assert json.loads(check.stdout)["nothing_reproduces"] is True


# --------------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("call, words", [
    (lambda ref: compare({"x": 1}, ref), "a must be a Trace"),
    (lambda ref: compare(ref, None), "b must be a Trace"),
    (lambda ref: compare(ref, ref, 5), "unknown tier 5"),
    (lambda ref: compare(ref, ref, "fp33"), "unknown tier 'fp33'"),
    (lambda ref: compare(ref, ref, prefix="no"), "prefix must be True or False"),
    (lambda ref: compare(ref, ref, partial=1), "partial must be True or False"),
    (lambda ref: compare(ref, ref, patterns=5), "patterns"),
])
def test_compare_names_a_wrong_argument(call, words):
    _, ref = reference()
    with pytest.raises(lfm2np.Lfm2npError, match=words):
        call(ref)


def test_diagnose_names_a_wrong_argument():
    model, ref = reference()
    dump = trace_dump(ref, IDS)
    for kwargs, words in [({"tier": 5}, "unknown tier"), ({"prefill": "x"}, "prefill must be an integer"),
                          ({"prefill": 1.5}, "prefill must be an integer"), ({"prefill": True}, "prefill must be"),
                          ({"prefill": 0}, "prefill must be"), ({"combine": "no"}, "combine must be")]:
        with pytest.raises(lfm2np.Lfm2npError, match=words):
            diagnose(model, dump, **kwargs)
    with pytest.raises(lfm2np.Lfm2npError, match="model must be an lfm2np Model"):
        diagnose(object(), dump)
    with pytest.raises(lfm2np.Lfm2npError, match="dump must be a Dump"):
        diagnose(model, ref)
    one = diagnose(model, dump, only="rope-interleaved")  # one id, not its characters
    assert [h.id for h in one.hypotheses] == ["rope-interleaved"] and one.agrees
