"""The oracle: traces, the compare tool and its first divergence, golden vectors."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

import lfm2np
from lfm2np import layers as L, ops
from lfm2np.oracle.golden import write_golden
from lfm2np.oracle.compare import compare
from lfm2np.oracle.tolerance import COMPARE_TIERS
from lfm2np.oracle.trace import Trace, from_transformers, llama_cpp_alias, record

from conftest import CASES, GOLDEN, MOE, golden, model


def transformers_trace(case: str) -> Trace:
    g = golden(case)
    return from_transformers({k[len("capture."):]: v for k, v in g.items() if k.startswith("capture.")})


def test_trace_agrees_with_transformers_at_fp32(case):
    _, ours = record(model(case), golden(case)["capture.ids"])
    result = compare(ours, transformers_trace(case), "fp32")
    assert result.ok, result.first_divergence
    c = model(case).config
    # every layer's residual stream and every mixer output were compared
    compared = {d.name for d in result.diffs}
    assert {f"model.layers.{i}" for i in range(c.num_hidden_layers)} <= compared
    assert "lm_head" in compared and "model.embedding_norm" in compared


def test_trace_names_are_complete_and_in_forward_order():
    m = model("moe-bf16-bias")
    logits, trace = record(m, [1, 2, 3])
    names = trace.names()
    assert names == [t.name for t in lfm2np.trace_names(m.config)]  # the schema, in its order
    assert names[:4] == ["model.rotary_emb.full_attention.inv_freq", "model.rotary_emb.full_attention.cos",
                         "model.rotary_emb.full_attention.sin", "model.embed_tokens"]
    assert names[-2:] == ["model.embedding_norm", "lm_head"]
    np.testing.assert_array_equal(trace["lm_head"], logits)
    layer_ends = [names.index(f"model.layers.{i}") for i in range(m.config.num_hidden_layers)]
    assert layer_ends == sorted(layer_ends)
    for step in ("conv.bx", "conv.conv_out", "mixer_residual", "feed_forward.router_logits"):
        assert f"model.layers.1.{step}" in trace
    for step in ("self_attn.q_normed", "self_attn.q_rope", "self_attn.attn_out"):
        assert f"model.layers.2.{step}" in trace
    assert trace["model.layers.1.feed_forward.selected_experts"].dtype.kind == "i"


def test_patterns_filter_and_tracing_does_not_change_logits():
    m = model("dense-legacy")
    ids = golden("dense-legacy")["logits.T13.ids"]
    logits, trace = record(m, ids, ["model.layers.1.*", "lm_head"])
    assert set(trace.names()) == {n for n in trace.names() if n.startswith("model.layers.1.") or n == "lm_head"}
    assert "model.layers.1.self_attn.q_rope" in trace and "model.layers.0.operator_norm" not in trace
    np.testing.assert_array_equal(logits, m.forward(ids))


def test_save_and_load_round_trip(tmp_path):
    _, trace = record(model("moe-top1-nobias"), [4, 5, 6])
    path = trace.save(tmp_path / "t")
    again = Trace.load(path)
    assert again.names() == trace.names()
    for n in trace.names():
        np.testing.assert_array_equal(again[n], trace[n])
    summary = json.loads(path.with_suffix(".json").read_text())
    assert summary["meta"]["ids"] == [4, 5, 6]
    entry = summary["tensors"]["model.layers.0.self_attn.q_normed"]
    assert entry["shape"] == [3, 6, 6] and entry["llama_cpp"] == "model.layers.{}.self_attn.q_layernorm-0"
    assert entry["max_abs"] == pytest.approx(float(np.abs(trace["model.layers.0.self_attn.q_normed"]).max()))


#: Every name lfm2np's aliases use, as they appear in a real llama.cpp dump: llama-cpp-python 0.3.36,
#: tools/dump_llama_cpp_trace.py --ints, the tiny-moe layout at width 256 (layer 0 conv + dense FFN, 1 and 3
#: conv + MoE, 2 attention + MoE), F32 weights. Each of these matched lfm2np's tensor at max_rel <= 2.2e-6
#: (ffn_moe_probs, ffn_moe_probs_biased and ffn_moe_weights, lfm2np's router_scores, biased_scores and topk_scores,
#: checked the same way at max_rel <= 6.2e-7; ffn_moe_weights_norm is topk_normed, at 1.4e-6).
LLAMA_CPP_DUMP_NAMES = [
    "model.embed_tokens",
    "model.layers.{}.operator_norm-0", "model.layers.{}.conv.in_proj-0", "model.layers.{}.conv.conv-0",
    "model.layers.{}.conv.out_proj-0", "model.layers.{}.ffn_out-0", "ffn_gate-0", "ffn_up-0", "ffn_swiglu-0",
    "l_out-0",
    "model.layers.{}.operator_norm-1", "model.layers.{}.conv.in_proj-1", "model.layers.{}.conv.conv-1",
    "model.layers.{}.conv.out_proj-1", "model.layers.{}.ffn_out-1", "ffn_moe_logits-1", "ffn_moe_probs-1",
    "ffn_moe_probs_biased-1", "ffn_moe_topk-1", "ffn_moe_weights-1", "ffn_moe_weights_norm-1", "ffn_moe_out-1", "l_out-1",
    "model.layers.{}.operator_norm-2", "Qcur-2", "Kcur-2", "Vcur-2", "model.layers.{}.self_attn.q_layernorm-2",
    "model.layers.{}.self_attn.k_layernorm-2", "kqv_out-2", "model.layers.{}.self_attn.out_proj-2",
    "model.layers.{}.ffn_out-2", "ffn_moe_logits-2", "ffn_moe_probs-2", "ffn_moe_probs_biased-2", "ffn_moe_topk-2",
    "ffn_moe_weights-2",
    "ffn_moe_weights_norm-2", "ffn_moe_out-2", "l_out-2",
    "model.layers.{}.operator_norm-3", "model.layers.{}.conv.in_proj-3", "model.layers.{}.conv.conv-3",
    "model.layers.{}.conv.out_proj-3", "model.layers.{}.ffn_out-3", "ffn_moe_logits-3", "ffn_moe_probs-3",
    "ffn_moe_probs_biased-3", "ffn_moe_topk-3", "ffn_moe_weights-3", "ffn_moe_weights_norm-3", "ffn_moe_out-3", "l_out-3",
    "result_norm", "result_output",
]


def test_llama_cpp_aliases():
    """llama.cpp's LFM2 graph names tensors "model.layers.{}.<step>" or generically ("Qcur", "ffn_moe_logits",
    "l_out"), and its callback appends "-<layer>". The aliases of a trace of the same layer layout are the
    names seen in a real dump (none missed, and only one that the dump lacks)."""
    from lfm2np.synthetic import random_params

    config = lfm2np.load_config("tiny-moe")
    assert config.layer_types == ("conv", "conv", "full_attention", "conv") and config.num_dense_layers == 1
    _, trace = record(lfm2np.Model(config, random_params(config, seed=1)), [1, 2, 3])
    aliases = [a for a in map(llama_cpp_alias, trace.names()) if a is not None]
    # one alias names a tensor only MoE layers have: a dense layer's FFN output is unnamed in llama.cpp
    assert "ffn_moe_out-0" in aliases and llama_cpp_alias("model.layers.0.feed_forward.output") == "ffn_moe_out-0"
    aliases.remove("ffn_moe_out-0")
    assert aliases == LLAMA_CPP_DUMP_NAMES  # the same names in the same (forward) order
    assert llama_cpp_alias("model.layers.3.conv.conv_out") == "model.layers.{}.conv.conv-3"
    assert llama_cpp_alias("model.layers.12.operator_norm") == "model.layers.{}.operator_norm-12"
    # the FFN norm's output is called ffn_out when it is computed, not ffn_norm
    assert llama_cpp_alias("model.layers.3.ffn_norm") == "model.layers.{}.ffn_out-3"
    assert llama_cpp_alias("model.layers.2.self_attn.q_proj") == "Qcur-2"
    assert llama_cpp_alias("model.layers.3") == "l_out-3"
    assert llama_cpp_alias("lm_head") == "result_output"
    # steps llama.cpp leaves unnamed (node_N) or names only as anonymous views of in_proj
    for step in ("conv.b_gate", "conv.bx", "conv.y", "self_attn.q_rope", "mixer_residual", "feed_forward.w2"):
        assert llama_cpp_alias(f"model.layers.3.{step}") is None


def test_a_dump_with_extra_unit_axes_and_a_wrong_shape():
    """llama.cpp keeps (1, T, n) for conv tensors: unit axes are ignored; a real shape mismatch is a failed
    tensor in the report, not a crash."""
    _, trace = record(model("moe-bf16-bias"), [1, 2, 3])
    dump = {(llama_cpp_alias(n) or n): v[None] for n, v in trace.tensors.items()}
    assert compare(trace, Trace(dump)).ok
    dump["model.layers.{}.conv.conv-0"] = dump["model.layers.{}.conv.conv-0"][..., :5]
    result = compare(trace, Trace(dump))
    assert result.first_divergence.name == "model.layers.0.conv.conv_out"
    assert "shape" in result.first_divergence.problem


def test_a_reference_named_with_llama_cpp_aliases_is_matched():
    _, trace = record(model("moe-bf16-bias"), [1, 2, 3])
    aliased = Trace({(llama_cpp_alias(n) or n): v for n, v in trace.tensors.items()})
    result = compare(trace, aliased)
    assert result.ok and "model.layers.0.conv.conv_out" in {d.name for d in result.diffs}


# ------------------------------------------------------------------------- planted bugs
class ReversedConvTaps(lfm2np.Model):
    """A 'backend' whose short conv in one layer applies its taps in reverse order."""

    def __init__(self, base: lfm2np.Model, layer: int):
        params = {n: base.params[n] for n in base.params}
        name = f"model.layers.{layer}.conv.conv.weight"
        params[name] = params[name][..., ::-1].copy()
        super().__init__(base.config, params, base.dtype)


class SoftmaxRouter(lfm2np.Model):
    """A 'backend' that scores experts with a softmax instead of a sigmoid in one layer (mlx-lm #1883): its
    own routing replaces the chosen experts and weights there (through the forward pass's interventions)."""

    def __init__(self, base: lfm2np.Model, layer: int):
        super().__init__(base.config, base.params, base.dtype)
        self.prefix = f"model.layers.{layer}.feed_forward."

    def forward(self, ids, *, record=None):
        c, held = self.config, {}

        def patch(name, value):
            out = None
            if name == self.prefix + "router_logits":
                probs = ops.softmax(value.astype(np.float64), axis=-1)
                top = np.argsort(-probs, axis=-1, kind="stable")[:, :c.num_experts_per_tok]
                w = np.take_along_axis(probs, top, axis=-1)
                held["probs"] = probs.astype(value.dtype)
                held["experts"], held["weights"] = top, (w / w.sum(-1, keepdims=True)).astype(value.dtype)
            elif name == self.prefix + "router_scores":
                out = held["probs"]
            elif name == self.prefix + "selected_experts":
                out = held["experts"]
            elif name in (self.prefix + "topk_normed", self.prefix + "routing_weights"):
                out = held["weights"]
            if record is not None:
                record(name, value if out is None else out)
            return out

        return super().forward(ids, record=patch)


def first_divergence_of(case: str, broken: type, layer: int):
    """Trace the fixture model and a copy broken in ``layer``; what compare names as the first divergence."""
    good = model(case)
    ids = golden(case)["capture.ids"]
    _, ref = record(good, ids)
    _, bad = record(broken(good, layer), ids)
    return compare(bad, ref).first_divergence


@pytest.mark.parametrize("case", [c for c in CASES if lfm2np.load_config(GOLDEN / c).conv_layers])
def test_compare_names_a_reversed_conv_in_the_right_layer(case):
    layer = model(case).config.conv_layers[-1]
    first = first_divergence_of(case, ReversedConvTaps, layer)
    assert first is not None and first.name == f"model.layers.{layer}.conv.conv_out"


@pytest.mark.parametrize("case", MOE)
def test_compare_names_a_softmax_router_in_the_right_layer(case):
    layer = model(case).config.moe_layers[-1]
    first = first_divergence_of(case, SoftmaxRouter, layer)
    assert first is not None and first.name == f"model.layers.{layer}.feed_forward.router_scores"


def test_compare_command_exit_codes_and_first_divergence(tmp_path):
    good = model("moe-bf16-bias")
    ids = golden("moe-bf16-bias")["capture.ids"]
    _, ref = record(good, ids)
    _, bad = record(ReversedConvTaps(good, 3), ids)
    ref_path, bad_path = ref.save(tmp_path / "ref"), bad.save(tmp_path / "bad")
    run = lambda *a: subprocess.run([sys.executable, "-m", "lfm2np", "compare", *map(str, a)],
                                    capture_output=True, text=True)
    ok = run(ref_path, ref_path)
    assert ok.returncode == 0 and "agree" in ok.stdout
    broken = run(bad_path, ref_path)
    assert broken.returncode == 1
    assert "FIRST DIVERGENCE: model.layers.3.conv.conv_out (layer 3, position 0)" in broken.stdout
    as_json = json.loads(run(bad_path, ref_path, "--json").stdout)
    assert as_json["first_divergence"]["tensor"] == "model.layers.3.conv.conv_out" and not as_json["ok"]
    assert as_json["first_divergence"]["layer"] == 3 and as_json["first_divergence"]["position"] == 0


def test_float64_against_float32_is_measured_by_the_compare_tool(case):
    ids = golden(case)["capture.ids"]
    _, t32 = record(model(case), ids)
    _, t64 = record(model(case, "float64"), ids)
    result = compare(t32, t64, "fp32")
    assert result.ok
    worst = max(d.max_rel for d in result.diffs)
    assert 0 < worst < 1e-5


def test_tiers_are_ordered_from_strict_to_loose():
    tiers = [COMPARE_TIERS[n] for n in ("fp32", "fp16", "bf16", "q8_0", "q4")]
    assert [t.max_rel for t in tiers] == sorted(t.max_rel for t in tiers)
    assert [t.nmse_db for t in tiers] == sorted(t.nmse_db for t in tiers)


# ------------------------------------------------------------------------------ golden
def test_golden_vectors_let_each_operator_be_recomputed_alone(tmp_path):
    case = "moe-bf16-bias"
    m = model(case)
    ids = golden(case)["capture.ids"]
    out = write_golden(m, ids, tmp_path / "g")
    manifest = json.loads((out / "manifest.json").read_text())
    c = lfm2np.Config.from_dict(manifest["config"])
    assert c == m.config and manifest["ids"] == ids.tolist()
    checked = 0
    for op in manifest["operators"]:
        f = load_file(str(out / op["file"]))
        w = {k[len("weight."):]: v for k, v in f.items() if k.startswith("weight.")}
        if op["function"] == "lfm2np.ops.rms_norm":
            y = ops.rms_norm(f["input.x"], next(iter(w.values())), op["params"]["eps"])
            np.testing.assert_array_equal(y, f["output.y"])
        elif op["function"] == "lfm2np.layers.short_conv":
            p = op["name"] + "."
            y, _ = L.short_conv(f["input.x"], L.ConvWeights(w[p + "in_proj.weight"], w[p + "conv.weight"],
                                                             w[p + "out_proj.weight"]))
            np.testing.assert_array_equal(y, f["output.out_proj"])
        elif op["function"] == "lfm2np.layers.moe_block":
            p = op["name"] + "."
            experts = lambda e: L.SwiGLUWeights(*(w[f"{p}experts.{e}.{n}.weight"] for n in ("w1", "w3", "w2")))  # noqa: E731
            y = L.moe_block(f["input.x"], L.MoEWeights(w[p + "gate.weight"], w.get(p + "expert_bias"), experts), c)
            np.testing.assert_array_equal(y, f["output.output"])
            assert set(op["params"]["experts_written"]) == set(f["output.selected_experts"].ravel().tolist())
        else:
            continue
        checked += 1
    assert checked >= 2 * m.config.num_hidden_layers + 1
    final = load_file(str(out / "model.safetensors"))
    np.testing.assert_array_equal(final["logits"], m.forward(ids))


def test_golden_command_and_layer_selection(tmp_path):
    out = tmp_path / "g"
    proc = subprocess.run([sys.executable, "-m", "lfm2np", "golden", str(GOLDEN / "dense-legacy"), "--out", str(out),
                           "--layers", "1", "--ids", "3", "4", "5"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    layer_ops = {op["name"] for op in manifest["operators"] if op["name"].startswith("model.layers.")}
    assert layer_ops == {"model.layers.1.operator_norm", "model.layers.1.self_attn", "model.layers.1.ffn_norm",
                         "model.layers.1.feed_forward", "model.layers.1"}
    bad = subprocess.run([sys.executable, "-m", "lfm2np", "golden", str(GOLDEN / "dense-legacy"), "--out",
                          str(tmp_path / "g2"), "--layers", "9"], capture_output=True, text=True)
    assert bad.returncode == 2 and "layers [9] do not exist" in bad.stderr


@pytest.mark.parametrize("layers, message", [
    ("0,2", "layers is '0,2' (of type str)"), (3, "layers is 3 (of type int)"),
    (np.array(3), "layers is array(3)"), ([0.0, 1.0], "layers holds 0.0 (of type float)"),
    ([True], "layers holds True (of type bool)"), ([1, 2, 1], "layers names layer 1 more than once"),
    ([0, -1], "layers holds -1: layer indices count from 0"), ([0, 9], "layers [9] do not exist"),
    ({0: 1}, "layers is {0: 1} (of type dict)"),
])
def test_golden_layers_are_checked_before_anything_is_computed_or_created(tmp_path, monkeypatch, layers, message):
    import lfm2np.oracle.golden as G

    monkeypatch.setattr(G, "record", lambda *a: pytest.fail("computed before the arguments were checked"))
    with pytest.raises(lfm2np.Lfm2npError, match=re.escape(message)):
        write_golden(model("dense-legacy"), [3, 4, 5], tmp_path / "g", layers)
    assert not (tmp_path / "g").exists()


def test_golden_out_must_be_a_directory(tmp_path, monkeypatch):
    import lfm2np.oracle.golden as G

    monkeypatch.setattr(G, "record", lambda *a: pytest.fail("computed before the arguments were checked"))
    f = tmp_path / "taken"
    f.write_text("keep me")
    for out, message in ((f, f"out {f} is a file"), (f / "g", f"{f} is a file, not a directory"),
                         (5, "out is 5"), ("", "out is ''")):
        with pytest.raises(lfm2np.Lfm2npError, match=re.escape(message)):
            write_golden(model("dense-legacy"), [3, 4, 5], out)
    assert f.read_text() == "keep me"
    with pytest.raises(lfm2np.Lfm2npError, match="model must be an lfm2np Model"):
        write_golden("dense-legacy", [3, 4, 5], tmp_path / "g")
    with pytest.raises(lfm2np.Lfm2npError, match="one sequence of ids"):
        write_golden(model("dense-legacy"), [[3, 4], [5, 6]], tmp_path / "g")
    assert not (tmp_path / "g").exists()


def test_integer_tensors_far_apart_report_their_true_distance():
    # an int64 difference would wrap: 2^64 - 1 against 0 read as a distance of 1
    from lfm2np.oracle.compare import diff_tensors
    from lfm2np.oracle.tolerance import COMPARE_TIERS

    far = diff_tensors("input_ids", np.array([2**64 - 1], np.uint64), np.array([0], np.uint64), COMPARE_TIERS["fp32"])
    assert not far.ok and far.max_abs == float(2**64 - 1)
    extremes = diff_tensors("input_ids", np.array([2**63 - 1], np.int64), np.array([-2**63], np.int64),
                            COMPARE_TIERS["fp32"])
    assert not extremes.ok and extremes.max_abs == float(2**64 - 1)
    same = diff_tensors("input_ids", np.array([2**64 - 1], np.uint64), np.array([2**64 - 1], np.uint64),
                        COMPARE_TIERS["fp32"])
    assert same.ok and same.max_abs == 0.0
