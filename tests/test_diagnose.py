"""lfm2np diagnose: dumps from independent buggy backends (tests/buggy_backends.py) are diagnosed with the
right catalogue entry first, from logits, traces and token streams, on dense, MoE and LFM3 models; correct
dumps agree; near-ties in token streams are ties; the independent backend is transformers on the LFM3
fixtures; the CLI and the dump files."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import lfm2np
from lfm2np import ops
from lfm2np.cli import main
from lfm2np.config import Rope
from lfm2np.oracle import mistakes as M
from lfm2np.oracle.compare import compare
from lfm2np.oracle.diagnose import diagnose, format_diagnosis
from lfm2np.oracle.dumps import align, load_dump, logits_dump, token_stream, trace_dump
from lfm2np.oracle.tolerance import FP32, rel_error
from lfm2np.oracle.trace import Trace, llama_cpp_alias, record
from lfm2np.synthetic import random_params

from buggy_backends import BUGS, LFM3_BUGS, Backend, transformed_params
from conftest import GOLDEN

COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
              layer_types=["conv", "full_attention", "conv", "full_attention"], rope_theta=1e6,
              max_position_embeddings=256)
CONFIGS = {
    # dense: conv biases, untied head (a tied random model tends to repeat its input token)
    "dense": lfm2np.Config.from_dict(dict(COMMON, model_type="lfm2", intermediate_size=64, conv_bias=True,
                                          tie_word_embeddings=False)),
    # MoE: a dense layer then MoE layers; a routed scaling != 1 and an expert bias that changes choices
    "moe": lfm2np.Config.from_dict(dict(COMMON, model_type="lfm2_moe", intermediate_size=48, num_experts=8,
                                        num_experts_per_tok=2, moe_intermediate_size=16, num_dense_layers=1,
                                        use_expert_bias=True, routed_scaling_factor=2.5)),
    # LFM3: a sliding layer with a window of 4 (< the 12 ids), a full layer whose proportional RoPE (hd 16, 4 of
    # 8 pairs) has a small base, so the pairs it leaves still turn visibly at short positions when a port
    # rotates them; sandwich norms and the output gate; L = 7 (LFM3's default); untied head
    "lfm3": lfm2np.Config.from_dict(dict(
        COMMON, model_type="lfm3", head_dim=16, intermediate_size=64, sliding_window=4, tie_word_embeddings=False,
        layer_types=["conv", "sliding_attention", "conv", "full_attention"], bos_token_id=1, eos_token_id=2,
        pad_token_id=0, rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            "full_attention": {"rope_type": "proportional", "rope_theta": 100.0, "partial_rotary_factor": 0.5}})),
}
#: Seeds whose 16-token greedy streams change under every mistake (tokens can only show a mistake that way).
SEEDS = {"dense": 0, "moe": 2, "lfm3": 0}
IDS = np.array([5, 17, 3, 40, 22, 9, 61, 30, 2, 47, 11, 33])
PREFILL = 7  # the backends prefill 7 ids and decode the other 5 one by one
NEW = 16
KINDS = ("logits", "trace", "tokens")


@functools.lru_cache(maxsize=None)
def setup(name: str):
    c = CONFIGS[name]
    params = random_params(c, seed=SEEDS[name], expert_bias_scale=0.3)
    prompt = np.random.default_rng(100 + SEEDS[name]).integers(0, c.vocab_size, 6)
    return c, params, lfm2np.Model(c, params), prompt


def dump_of(name: str, bugs: tuple[str, ...], kind: str, **backend):
    c, params, _, prompt = setup(name)
    b = Backend(c, params, bugs, **backend)
    if kind == "tokens":
        return token_stream(prompt, b.generate(prompt, NEW))
    logits, trace = b.run(IDS, PREFILL)
    return logits_dump(IDS, logits) if kind == "logits" else trace_dump(Trace(trace), IDS)


CASES = [(name, bug, kind) for name in CONFIGS for bug in BUGS + LFM3_BUGS if M.mistake(bug).applies(CONFIGS[name])
         for kind in KINDS]


@pytest.mark.parametrize("name, bug, kind", CASES, ids=["-".join(c) for c in CASES])
def test_the_mistake_is_named_first(name, bug, kind):
    model = setup(name)[2]
    d = diagnose(model, dump_of(name, (bug,), kind))
    top = d.hypotheses[0]
    assert not d.agrees and top.id == bug and top.reproduces and d.best is top, format_diagnosis(d)
    assert top.visible and top.error <= FP32.logits_rel
    if kind != "tokens":  # logits and traces tell every pair apart on these models
        assert not any(h.reproduces for h in d.hypotheses[1:]), format_diagnosis(d)


def test_every_mistake_is_tested_where_it_applies():
    """The LFM2 mistakes on the MoE model, all but the router on the dense one and on LFM3 (which has no MoE),
    LFM3's own on LFM3 only; the image path's on the LFM2-VL fixtures (tests/test_vision.py); those of llama.cpp's
    CPU arithmetic: tests/test_llamacpp_cpu.py."""
    from test_vision import IMAGE_MISTAKES

    llama = {"activations-unquantised", "kv-cache-f32", "kv-cache-f16"}
    assert {m.id for m in M.CATALOGUE if not m.id.startswith("bidir-")} == set(BUGS) | set(LFM3_BUGS) | {
        m for m, _ in IMAGE_MISTAKES} | llama
    assert {m.id for m in M.CATALOGUE if m.modes} == llama
    # (the bidirectional model's own, on embeddings dumps: tests/test_bidir_diagnose.py)
    assert {bug for name, bug, _ in CASES if name == "moe"} == set(BUGS)
    assert {bug for name, bug, _ in CASES if name == "dense"} == {b for b in BUGS if not b.startswith("router")}
    assert {bug for name, bug, _ in CASES if name == "lfm3"} == {b for b in BUGS + LFM3_BUGS
                                                                 if not b.startswith("router")}


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("kind", KINDS)
def test_a_correct_backend_agrees(name, kind):
    d = diagnose(setup(name)[2], dump_of(name, (), kind), combine=False)
    assert d.agrees and d.first_divergence is None and d.best is None, format_diagnosis(d)
    if kind != "tokens":  # the dump rules out every visible mistake
        assert not any(h.reproduces for h in d.hypotheses if h.visible)


def test_the_wrong_value_is_reported():
    model = setup("moe")[2]
    d = diagnose(model, dump_of("moe", ("rope-theta",), "logits", theta=5e5))
    assert (d.hypotheses[0].id, d.hypotheses[0].switches) == ("rope-theta", {"rope_theta": 5e5})
    for scale, label in ((1.0, "no scale (1)"), (32 ** -0.5, "1/sqrt(D)")):
        d = diagnose(model, dump_of("moe", ("attention-scale",), "trace", scale=scale))
        assert d.hypotheses[0].variant.startswith(label) and d.hypotheses[0].reproduces, format_diagnosis(d)
    # LFM3: one base for every layer type, here the full layers' 100 on the sliding layers too
    d = diagnose(setup("lfm3")[2], dump_of("lfm3", ("rope-theta",), "logits", theta=100.0))
    assert (d.best.id, d.best.switches, d.best.where["tensor"]) == \
        ("rope-theta", {"rope_theta": 100.0}, "model.rotary_emb.sliding_attention.inv_freq"), format_diagnosis(d)


@pytest.mark.parametrize("bug", ["conv-taps-reversed", "conv-gates-swapped", "swiglu-gate-up-swapped"])
def test_weight_conversion_mistakes_are_named_from_a_trace(bug):
    """The same mistakes made by converting the weights wrongly, run by lfm2np's own correct forward: the
    tensors a backend may name differently (in_proj, w1, w3) differ from the reference's and are not used."""
    c, params, model, _ = setup("moe")
    _, theirs = record(lfm2np.Model(c, transformed_params(c, params, bug)), IDS)
    d = diagnose(model, trace_dump(theirs, IDS))
    assert d.hypotheses[0].id == bug and d.hypotheses[0].reproduces, format_diagnosis(d)
    _, ours = record(model, IDS)
    ambiguous = {"conv-gates-swapped": "model.layers.0.conv.in_proj", "swiglu-gate-up-swapped":
                 "model.layers.0.feed_forward.w1", "conv-taps-reversed": "model.layers.0.conv.bx"}[bug]
    assert (np.abs(theirs[ambiguous] - ours[ambiguous]).max() > 1e-3) == (bug != "conv-taps-reversed")


def test_conv_state_dropped_is_found_at_the_second_call():
    model = setup("dense")[2]
    dump = dump_of("dense", ("conv-state-dropped",), "logits")
    inferred = diagnose(model, dump)
    assert (inferred.prefill, inferred.prefill_from) == (PREFILL, "first divergence")
    assert inferred.first_divergence["position"] == PREFILL
    assert inferred.hypotheses[0].where == {"tensor": "model.layers.0.conv.conv_out", "position": PREFILL}
    assert diagnose(model, dump, prefill=PREFILL).hypotheses[0].reproduces
    wrong = diagnose(model, dump, prefill=PREFILL + 2, only=["conv-state-dropped"])
    assert not wrong.hypotheses[0].reproduces and wrong.hypotheses[0].explained == PREFILL
    # a dump that agrees gives no position to test it at
    ok = diagnose(model, dump_of("dense", (), "logits"), only=["conv-state-dropped"])
    assert ok.hypotheses == [] and "second call" in ok.not_applicable[0]["reason"]


def test_a_second_prefill_that_loses_the_conv_state():
    """transformers#42017: a follow-up question prefilled on an existing cache, its conv window from zeros."""
    c, params, model, prompt = setup("dense")
    b = Backend(c, params, ("conv-state-dropped",), drop_on="multi-token")
    first = b.generate(prompt, 5)
    follow = [7, 8, 9, 10]
    logits = b.feed([first[-1], *follow])  # the second prefill
    answer = [int(np.argmax(logits[-1]))]
    while len(answer) < NEW:
        answer.append(int(np.argmax(b.feed([answer[-1]])[-1])))
    context = np.concatenate([prompt, first, follow])
    second = len(prompt) + len(first) - 1
    d = diagnose(model, token_stream(context, answer, prefill=second))
    assert not d.agrees and d.best.id == "conv-state-dropped", format_diagnosis(d)
    assert d.best.where["position"] == second


def test_the_mlx_router_is_three_mistakes_at_once():
    """ml-explore/mlx-lm#1883: softmax scores, the bias in the weights and no routed scaling, all three."""
    model = setup("moe")[2]
    bugs = ("router-softmax", "router-bias-in-weights", "router-no-scaling")
    for kind in ("logits", "trace"):
        d = diagnose(model, dump_of("moe", bugs, kind, router_eps=1e-20))
        assert d.best.id == "+".join(bugs) and d.best.size == 3, format_diagnosis(d)
        assert not any(h.reproduces for h in d.hypotheses if h.size == 1)
    assert not diagnose(model, dump_of("moe", bugs, "logits"), combine=False).best


def near_tie_model():
    """The dense model with the head row of the runner-up token made 1e-5 (relative) short of the top one at
    step 3 of the greedy stream: a near-tie float32 implementations may break either way."""
    c, params, model, prompt = setup("dense")
    stream = Backend(c, params).generate(prompt, 8)
    row = model.forward(np.concatenate([prompt, stream[:3]]))[-1]
    top, other = int(np.argmax(row)), int(np.argsort(-row)[5])
    head = params["lm_head.weight"].copy()
    head[other] = head[top] * (1 - 1e-5 * np.sign(row[top]))
    tied = dict(params, **{"lm_head.weight": head})
    return c, tied, lfm2np.Model(c, tied), prompt, other


def test_a_near_tie_in_a_token_stream_is_a_tie():
    c, params, model, prompt, other = near_tie_model()
    b = Backend(c, params)
    stream = b.generate(prompt, 3)
    logits = b.feed(stream[-1:])
    stream.append(other)  # the backend broke the tie the other way, then went on greedily
    for _ in range(6):
        stream.append(int(np.argmax(b.feed(stream[-1:])[-1])))
    d = diagnose(model, token_stream(prompt, stream), combine=False)
    f = d.first_divergence
    assert d.agrees and f["step"] == 3 and f["near_tie"] and f["first_deviation"] is None, format_diagnosis(d)
    assert f["token"] == other and f["reference_top"][0]["id"] != other and 0 < f["margin"] <= f["tolerance"]
    assert "a near-tie" in format_diagnosis(d)


def test_a_real_deviation_is_not_a_tie():
    c, params, model, prompt = setup("dense")
    stream = Backend(c, params).generate(prompt, 6)
    row = model.forward(np.concatenate([prompt, stream[:2]]))[-1]
    stream[2] = int(np.argmin(row))
    d = diagnose(model, token_stream(prompt, stream), combine=False)
    f = d.first_divergence
    assert not d.agrees and f["step"] == 2 and not f["near_tie"] and f["margin"] > f["tolerance"]
    assert [t["id"] for t in f["reference_top"][:1]] == [int(np.argmax(row))]
    assert "a real deviation" in format_diagnosis(d)


def test_what_does_not_apply_is_reported_with_the_reason():
    d = diagnose(setup("dense")[2], dump_of("dense", ("no-qk-norm",), "logits"))
    reasons = {n["id"]: n["reason"] for n in d.not_applicable}
    llama = {"activations-unquantised", "kv-cache-f32", "kv-cache-f16"}  # (a reference in llamacpp-cpu only)
    images = {m for m in reasons if m.startswith("vl-")}
    assert {r for r in reasons if not r.startswith("bidir-")} == {b for b in BUGS if b.startswith("router")} | \
        set(LFM3_BUGS) | images | llama
    assert "bidirectional" in reasons["bidir-causal-mask"] and "embedding head" in reasons["bidir-wrong-pooling"]
    assert "MoE" in reasons["router-softmax"] and "LFM3" in reasons["lfm3-window-ignored"]
    assert images and all("LFM2-VL" in reasons[m] for m in images), reasons
    assert "llamacpp-cpu" in reasons["kv-cache-f32"]
    attn_only = lfm2np.load(GOLDEN / "dense-attn-only")
    d = diagnose(attn_only, logits_dump([1, 2, 3, 4], attn_only.forward([1, 2, 3, 4])))
    assert {n["id"] for n in d.not_applicable} >= {"conv-taps-reversed", "conv-gates-swapped", "conv-state-dropped"}
    no_scale = lfm2np.load(GOLDEN / "moe-bf16-bias")  # routed_scaling_factor 1
    assert not M.mistake("router-no-scaling").applies(no_scale.config)
    assert M.mistake("router-softmax").applies(no_scale.config)
    plain = lfm2np.load(GOLDEN / "lfm3-plain-bf16").config  # no gate, no sandwich norms
    assert [b for b in LFM3_BUGS if M.mistake(b).applies(plain)] == ["lfm3-rope-full", "lfm3-window-ignored"]


def test_mistakes_a_single_position_cannot_show_are_not_visible():
    model = setup("moe")[2]
    d = diagnose(model, logits_dump(IDS[:1], model.forward(IDS[:1])))
    invisible = {h.id for h in d.hypotheses if not h.visible}
    assert {"rope-interleaved", "rope-theta", "qk-norm-after-rope", "attention-scale"} <= invisible
    assert d.agrees and all(h.reproduces == (not h.visible) for h in d.hypotheses)


def test_a_mutation_that_overflows_reproduces_nothing():
    """Huge q/k projections are tamed by the QK norms; without them the scores overflow float32."""
    c, params, _, _ = setup("dense")
    huge = dict(params, **{f"model.layers.1.self_attn.{n}.weight": params[f"model.layers.1.self_attn.{n}.weight"]
                           * np.float32(1e20) for n in ("q_proj", "k_proj")})
    model = lfm2np.Model(c, huge)
    d = diagnose(model, logits_dump(IDS, model.forward(IDS)), only=["no-qk-norm"])
    h = d.hypotheses[0]
    assert d.agrees and not h.reproduces and h.error == np.inf and "non-finite" in h.first_disagreement["problem"]
    assert json.loads(json.dumps(d.to_json(), allow_nan=False))["hypotheses"][0]["error"] is None


# ------------------------------------------------------------------------------------------- LFM3
LFM3_CASES = ("lfm3-window", "lfm3-bias-mqa", "lfm3-plain-bf16", "lfm3-default-label")


def lfm3_golden(case: str, reading: str = "trained", dtype: str = "float32"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the trap case's label warns by design
        model = lfm2np.load(GOLDEN / case, rope_reading=reading, dtype=dtype)
    return model, load_file(str(GOLDEN / case / "golden.safetensors"))


@pytest.mark.parametrize("case", LFM3_CASES)
def test_the_independent_backend_is_transformers_on_lfm3(case):
    """The buggy backends' own LFM3 forward, no bug set, gives transformers 5.24's logits (one call, and a
    prefill then one token per call, past the window) and every intermediate lfm2np traces. On the label
    trap, transformers is the backend with lfm3-rope-full; without it the backend is lfm2np's trained reading."""
    model, g = lfm3_golden(case)
    params = {n: model.params[n] for n in model.params}
    bugs = ("lfm3-rope-full",) if case == "lfm3-default-label" else ()
    for key in ("logits.T13", "logits.T40"):
        ids = g[key + ".ids"]
        assert model.config.sliding_window < len(ids)
        for prefill in (None, 6):
            logits, _ = Backend(model.config, params, bugs).run(ids, prefill)
            assert rel_error(logits, g[key]) < FP32.logits_rel, (key, prefill)
    ids = g["logits.T13.ids"]
    _, theirs = Backend(model.config, params).run(ids, 6)
    _, ours = record(model, ids)
    assert set(theirs) == set(ours.names()) and compare(Trace(theirs), ours).ok


def test_a_transformers_lfm3_run_agrees_and_the_router_does_not_apply():
    model, g = lfm3_golden("lfm3-window")
    d = diagnose(model, logits_dump(g["logits.T40.ids"], g["logits.T40"]), prefill=7)
    assert d.agrees and d.best is None, format_diagnosis(d)
    images = {m.id for m in M.CATALOGUE if m.id.startswith("vl-")}  # LFM2-VL's own
    assert {n["id"] for n in d.not_applicable} == {b for b in BUGS if b.startswith("router")} | images | {
        m.id for m in M.CATALOGUE if m.id.startswith("bidir-")} | {  # (LFM3 has no bidirectional variant)
        "activations-unquantised", "kv-cache-f32", "kv-cache-f16"}  # (llama.cpp's arithmetic: not this reference)
    assert {h.id for h in d.hypotheses} == {b for b in BUGS + LFM3_BUGS if not b.startswith("router")}


def test_transformers_reading_of_the_label_is_lfm3_rope_full():
    """transformers 5.24 on the trap checkpoint (full layers labelled "default" with a factor of 0.5) is
    diagnosed, from its own logits, as lfm3-rope-full; the mutation is lfm2np's rope_reading="transformers"
    bit for bit, in every numerics mode, and does not apply to a model loaded in that reading."""
    trained, g = lfm3_golden("lfm3-default-label")
    d = diagnose(trained, logits_dump(g["logits.T40.ids"], g["logits.T40"]))
    assert d.best.id == "lfm3-rope-full" and d.best.where["tensor"] == "model.rotary_emb.full_attention.inv_freq", \
        format_diagnosis(d)
    ids = g["logits.T40.ids"]
    for dtype in ("float32", "bfloat16", "float64"):
        mutated = M.run(lfm3_golden("lfm3-default-label", dtype=dtype)[0], ids,
                        M.port_of(trained.config, "lfm3-rope-full"))
        literal = lfm3_golden("lfm3-default-label", "transformers", dtype)[0]
        np.testing.assert_array_equal(mutated, literal.forward(ids))
    assert not M.mistake("lfm3-rope-full").applies(literal.config)


def test_lfm3_mistakes_act_where_the_docs_say():
    """Each LFM3 mistake's first changed intermediate, from a trace of the independent backend; a dump no
    longer than the window cannot show the window ignored."""
    c, params, model, _ = setup("lfm3")
    where = {"lfm3-gate-missing": ("model.layers.1.self_attn.gate", 0),
             "lfm3-sandwich-norms-missing": ("model.layers.0.post_operator_norm", 0),
             "lfm3-rope-full": ("model.rotary_emb.full_attention.inv_freq", None),
             "lfm3-window-ignored": ("model.layers.1.self_attn.attention", c.sliding_window)}
    for bug, (tensor, position) in where.items():
        d = diagnose(model, dump_of("lfm3", (bug,), "trace"), only=[bug])
        assert d.best.where == {"tensor": tensor, "position": position}, bug
    W = c.sliding_window
    logits, _ = Backend(c, params, ("lfm3-window-ignored",)).run(IDS[:W])
    d = diagnose(model, logits_dump(IDS[:W], logits), only=["lfm3-window-ignored"])
    assert d.agrees and not d.hypotheses[0].visible


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_recomputed_operators_are_the_layers_own(dtype):
    """A handler that recomputes RoPE or attention does it as the layer does: with the reference's own
    values (the scale hd^-0.5; a single base that is every type's) the mutated pass is the forward pass bit
    for bit, on LFM3 (tables per layer type with the partial rotation, float32 cos/sin, the window, the gate)."""
    c, params, _, _ = setup("lfm3")
    same = c.replace(rope_parameters=tuple(Rope(r.kind, r.rope_type, 1e4, r.partial_rotary_factor)
                                           for r in c.rope_parameters))
    model = lfm2np.Model(same, params, dtype)
    want = model.forward(IDS)
    for port in (M.Port(attention_scale=c.head_dim ** -0.5), M.Port(rope_theta=1e4)):
        np.testing.assert_array_equal(M.run(model, IDS, port), want)
    assert not np.array_equal(M.run(model, IDS, M.Port(rope_theta=1e4, partial_rotation=False)), want)


# ------------------------------------------------------------------------------------ the port
def test_the_reference_port_is_the_forward():
    c, _, model, _ = setup("moe")
    seen = []
    np.testing.assert_array_equal(M.run(model, IDS, M.Port(), observe=lambda n, v: seen.append(n)),
                                  model.forward(IDS))
    assert seen == record(model, IDS)[1].names() == [t.name for t in lfm2np.trace_names(c)]


def test_ports_compose_and_conflicts_are_errors():
    c = setup("moe")[0]
    p = M.port_of(c, "router-softmax", "rope-interleaved", "conv-state-dropped", prefill=4)
    assert p.changes() == {"router_scores": "softmax", "rope_pairs": "interleaved", "conv_restart": 4}
    for bad, message in ((("no-qk-norm", "qk-norm-after-rope"), "cannot be both"), (("nope",), "unknown mistake"),
                         (("conv-state-dropped",), "pass prefill")):
        with pytest.raises(lfm2np.Lfm2npError, match=message):
            M.port_of(c, *bad)
    with pytest.raises(lfm2np.Lfm2npError, match="needs a MoE model"):
        M.port_of(CONFIGS["dense"], "router-softmax")
    with pytest.raises(lfm2np.Lfm2npError, match="qk_norm"):
        M.Port(qk_norm="sometimes")


# ------------------------------------------------------------------------------------ dump files
def test_other_tools_trace_names_are_understood():
    c, params, model, _ = setup("moe")
    _, trace = Backend(c, params, ("router-softmax",)).run(IDS)
    llama = {llama_cpp_alias(n): v for n, v in trace.items() if llama_cpp_alias(n)}
    d = diagnose(model, trace_dump(Trace(llama), IDS))
    assert d.best.id == "router-softmax" and not d.skipped, format_diagnosis(d)
    hooks = {f"model.layers.{i}.output": trace[f"model.layers.{i}"] for i in range(c.num_hidden_layers)}
    hooks["lm_head.output"] = trace["lm_head"][None]  # a batch axis of 1
    hooks["blk.0.mystery"] = np.zeros(3)
    tensors, skipped = align(Trace(hooks), record(model, IDS)[1].tensors)
    assert list(tensors) == [f"model.layers.{i}" for i in range(4)] + ["lm_head"] and list(skipped) == ["blk.0.mystery"]


def test_dump_files_round_trip(tmp_path):
    c, params, model, prompt = setup("moe")
    logits, trace = Backend(c, params, ("no-qk-norm",)).run(IDS, PREFILL)
    np.savez(tmp_path / "l.npz", ids=IDS, logits=logits, prefill=PREFILL)
    save_file({"ids": IDS, "logits": logits}, str(tmp_path / "l.safetensors"))
    np.savez(tmp_path / "t.npz", ids=prompt, tokens=[1, 2, 3])
    path = Trace(trace, {"ids": IDS.tolist()}).save(tmp_path / "trace")
    assert load_dump(tmp_path / "l.npz").prefill == PREFILL
    assert load_dump(tmp_path / "l.safetensors").kind == "logits"
    assert load_dump(tmp_path / "t.npz").tokens.tolist() == [1, 2, 3]
    d = load_dump(path)
    assert d.kind == "trace" and d.ids.tolist() == IDS.tolist() and len(d.trace) == len(trace)
    assert diagnose(model, d).best.id == "no-qk-norm"


@pytest.mark.parametrize("content, message", [
    (None, "no such dump file"),
    (b"not a zip", "not a readable .npz"),
    ({"ids": [1, 2], "logits": np.zeros(3)}, "logits must have shape \\(T, V\\)"),
    ({"ids": [1.5, 2], "logits": np.zeros((2, 64))}, "ids must hold integers"),
    ({"logits": np.zeros((2, 64))}, "needs 'ids'"),
    ({"ids": [1, 2], "logits": np.zeros((2, 64)), "prefill": 0}, "prefill must be one integer >= 1"),
    ({"ids": [1, 2], "tokens": np.zeros((2, 2), int)}, "tokens must have 1 non-empty axis"),
    ({"model.layers.0": np.zeros((2, 32))}, "does not say which ids"),
])
def test_bad_dump_files_name_the_file_and_the_field(tmp_path, content, message):
    path = tmp_path / "bad.npz"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        np.savez(path, **content)
    with pytest.raises(lfm2np.Lfm2npError, match=message) as e:
        load_dump(path)
    assert "bad.npz" in str(e.value)


def test_a_dump_is_checked_from_its_headers_before_anything_is_read(tmp_path, monkeypatch):
    import tracemalloc
    import zipfile

    import lfm2np.oracle.dumps as dumps

    # 3 x 40M zeros: 480 MB of logits in a file of under 1 MB; refused from the headers, before inflating
    bomb = tmp_path / "bomb.npz"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("ids.npy", _npy(np.array([1, 2, 3])))
        with zf.open("logits.npy", "w", force_zip64=True) as f:
            f.write(_npy_header((3, 40_000_000)))
            zero = bytes(1 << 22)
            for _ in range(480_000_000 // len(zero) + 1):
                f.write(zero)
    assert bomb.stat().st_size < 2_000_000
    tracemalloc.start()
    with pytest.raises(lfm2np.Lfm2npError, match="would inflate its .* stored bytes to at least 480000024"):
        load_dump(bomb, vocab_size=64)
    assert tracemalloc.get_traced_memory()[1] < 50_000_000
    tracemalloc.stop()
    # the width against the model's vocabulary, and the memory available, before reading
    np.savez(tmp_path / "wide.npz", ids=[1, 2, 3], logits=np.ones((3, 100), np.float32))
    with pytest.raises(lfm2np.Lfm2npError, match="100 columns; the model's vocabulary is 64"):
        load_dump(tmp_path / "wide.npz", vocab_size=64)
    monkeypatch.setattr(dumps, "available_memory", lambda: 1000)
    with pytest.raises(lfm2np.Lfm2npError, match="more than the memory available"):
        load_dump(tmp_path / "wide.npz")
    monkeypatch.undo()
    # numbers only: strings, booleans, complex logits; float ids that would wrap
    for bad, message in (({"ids": [1, 2], "logits": np.array([["a"] * 64] * 2)}, "'logits' has dtype kind 'U'"),
                         ({"ids": [1, 2], "logits": np.ones((2, 64), complex)}, "'logits' has dtype kind 'c'"),
                         ({"ids": [True, False], "logits": np.ones((2, 64))}, "'ids' has dtype kind 'b'"),
                         ({"model.layers.0": np.array(["abc"] * 3), "ids": [1]}, "'model.layers.0' has dtype"),
                         ({"ids": [1e30, 2], "logits": np.ones((2, 64))}, "1e\\+30 is no token id")):
        np.savez(tmp_path / "bad.npz", **bad)
        with pytest.raises(lfm2np.Lfm2npError, match=message):
            load_dump(tmp_path / "bad.npz")
    # object arrays (pickles) and members that are not arrays
    with zipfile.ZipFile(tmp_path / "obj.npz", "w") as zf:
        zf.writestr("ids.npy", _npy_header((2,), "|O"))
    with pytest.raises(lfm2np.Lfm2npError, match="holds Python objects"):
        load_dump(tmp_path / "obj.npz")
    with zipfile.ZipFile(tmp_path / "odd.npz", "w") as zf:
        zf.writestr("readme.txt", "hello")
    with pytest.raises(lfm2np.Lfm2npError, match="is not an .npy array"):
        load_dump(tmp_path / "odd.npz")
    # rows against ids, from the headers
    np.savez(tmp_path / "rows.npz", ids=[1, 2, 3], logits=np.zeros((2, 64), np.float32))
    with pytest.raises(lfm2np.Lfm2npError, match="logits have 2 rows but ids has shape \\[3\\]"):
        load_dump(tmp_path / "rows.npz")
    # tensors the diagnosis does not read may be integers (llama.cpp's argsort, an attention mask)
    np.savez(tmp_path / "extra.npz", ids=[1, 2], logits=np.ones((2, 64), np.float16),
             **{"ffn_moe_argsort-0": np.zeros((2, 4), np.int32), "attention_mask": np.ones(2, bool)})
    assert load_dump(tmp_path / "extra.npz", vocab_size=64).kind == "logits"
    # a safetensors dump is read as a trace is: its metadata checked, no memory map
    save_file({"ids": IDS, "logits": np.zeros((len(IDS), 64), np.float32)}, str(tmp_path / "o.safetensors"),
              metadata={"order": '["logits"]'})
    with pytest.raises(lfm2np.Lfm2npError, match="leaves out tensor 'ids'"):
        load_dump(tmp_path / "o.safetensors")
    save_file({"ids": IDS, "logits": np.zeros((len(IDS), 65), np.float32)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(lfm2np.Lfm2npError, match="65 columns; the model's vocabulary is 64"):
        load_dump(tmp_path / "w.safetensors", vocab_size=64)


def _npy_header(shape, descr="<f4") -> bytes:
    head = repr({"descr": descr, "fortran_order": False, "shape": tuple(shape)}).encode("latin1")
    head += b" " * (63 - (10 + len(head)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(head).to_bytes(2, "little") + head


def _npy(a: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def test_the_json_is_strict():
    model = setup("moe")[2]
    bad = model.forward(IDS)
    bad[3, 5] = np.inf
    report = diagnose(model, logits_dump(IDS, bad), combine=False).to_json()
    text = json.dumps(report, allow_nan=False)
    assert report["agrees"] is False and report["first_divergence"]["position"] == 3
    assert json.loads(text)["hypotheses"][0]["error"] is None  # infinite: null


# -------------------------------------------------------------------------------------------- CLI
CASE = GOLDEN / "moe-allk-convbias"


def golden_backend(bugs=()):
    model = lfm2np.load(CASE)
    return model, Backend(model.config, {n: model.params[n] for n in model.params}, bugs)


def test_cli_diagnoses_a_dump_and_a_token_stream(tmp_path, capsys):
    model, b = golden_backend(("router-no-renorm",))
    logits, _ = b.run(IDS, PREFILL)
    np.savez(tmp_path / "dump.npz", ids=IDS, logits=logits)
    assert main(["diagnose", str(CASE), "--dump", str(tmp_path / "dump.npz"), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["best"] == "router-no-renorm" and report["agrees"] is False and report["kind"] == "logits"
    assert set(report["hypotheses"][0]) >= {"id", "reproduces", "error", "where"}
    tokens = golden_backend(("conv-taps-reversed",))[1].generate(IDS[:5], 8)
    assert main(["diagnose", str(CASE), "--ids", *map(str, IDS[:5]), "--tokens", *map(str, tokens)]) == 1
    out = capsys.readouterr().out
    assert out.splitlines()[3].split()[1] == "conv-taps-reversed" and "REPRODUCES" in out.splitlines()[3]
    ok = golden_backend()[1].generate(IDS[:5], 8)
    assert main(["diagnose", str(CASE), "--ids", *map(str, IDS[:5]), "--tokens", *map(str, ok), "--json",
                 "--only", "router-softmax"]) == 0
    assert json.loads(capsys.readouterr().out)["agrees"] is True
    assert main(["diagnose", str(CASE), "--catalogue"]) == 0
    assert capsys.readouterr().out.count("shipped by:") == len(M.CATALOGUE)


@pytest.mark.parametrize("argv, message", [
    (["diagnose", str(CASE)], "exactly one of --dump"),
    (["diagnose", str(CASE), "--tokens", "1", "2"], "--tokens needs --ids"),
    (["diagnose", str(CASE), "--ids", "1", "900", "--tokens", "2"], "token id 900"),
    (["diagnose", str(CASE), "--ids", "1", "2", "--tokens", "2", "--prefill", "9"], "prefill 9 is outside"),
    (["diagnose", str(CASE), "--dump", "/nonexistent.npz"], "no such dump file"),
])
def test_cli_bad_input_is_one_line_and_exit_2(argv, message):
    proc = subprocess.run([sys.executable, "-m", "lfm2np", *argv], capture_output=True, text=True)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr
