"""LFM3 (the tri-hybrid) against transformers 5.24's Lfm3ForCausalLM (fixtures from tools/make_lfm3_fixtures.py):
the forward pass, every operator, decoding past the sliding window, the numerics modes, the RoPE label trap,
config validation, presets and calculators."""

from __future__ import annotations

import functools
import json
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import lfm2np
from lfm2np import calc, ops
from lfm2np.layers import Scope, decoder_layer
from lfm2np.numerics import BFLOAT16
from lfm2np.oracle.compare import compare
from lfm2np.oracle.golden import write_golden
from lfm2np.oracle.tolerance import FP32, FP64_VS_FP32, rel_error

from lfm2np.oracle.trace import record

from conftest import ULP_FLIP

GOLDEN = Path(__file__).parent / "golden"
MANIFEST = json.loads((GOLDEN / "lfm3_manifest.json").read_text())
CASES = sorted(MANIFEST["cases"])
#: the trap case is run with rope_reading="transformers", the reading transformers 5.24 applies to it
TRAP = "lfm3-default-label"
READING = {case: "transformers" if case == TRAP else "trained" for case in CASES}


@functools.lru_cache(maxsize=None)
def golden(case: str) -> dict[str, np.ndarray]:
    return load_file(str(GOLDEN / case / "golden.safetensors"))


@functools.lru_cache(maxsize=None)
def model(case: str, dtype: str = "float32", reading: str | None = None) -> lfm2np.Model:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the trap case warns by design (tested below)
        return lfm2np.load(GOLDEN / case, dtype=dtype, rope_reading=reading or READING[case])


def cap(case: str, name: str) -> np.ndarray:
    return golden(case)["capture." + name]


# ------------------------------------------------------------------------------------- the fixtures
def test_the_fixtures_cover_what_the_issue_lists():
    cfgs = {n: model(n).config for n in CASES}
    assert any(c.sliding_window < MANIFEST["cases"][n]["capture_length"] for n, c in cfgs.items())
    assert {c.rope("full_attention").partial_rotary_factor for c in cfgs.values()} >= {0.5, 0.25, 0.75}
    assert {(c.use_attention_gate, c.use_sandwich_norm) for c in cfgs.values()} == {(True, True), (True, False),
                                                                                     (False, True), (False, False)}
    assert any(c.conv_L_cache != 7 for c in cfgs.values()) and any(c.conv_L_cache == 7 for c in cfgs.values())
    assert any(c.conv_bias for c in cfgs.values()) and any(c.attention_bias for c in cfgs.values())
    assert any(not c.tie_word_embeddings for c in cfgs.values())
    assert any(c.head_dim != c.hidden_size // c.num_attention_heads for c in cfgs.values())
    assert any(MANIFEST["cases"][n]["checkpoint_dtype"] == "bfloat16" for n in CASES)
    assert any(c.num_key_value_heads == 1 for c in cfgs.values())


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(case):
    g = golden(case)
    for key in [k for k in g if k.startswith("logits.T") and not k.endswith(".ids")] + ["batch.logits"]:
        ids = g["batch.ids" if key == "batch.logits" else key + ".ids"]
        out = model(case).forward(ids)
        assert rel_error(out, g[key]) < FP32.logits_rel, key
        np.testing.assert_array_equal(out.argmax(-1), g[key].argmax(-1))


@pytest.mark.parametrize("case", CASES)
def test_each_layer_from_the_reference_input(case):
    m = model(case)
    c = m.config
    T = cap(case, "model.layers.0.input").shape[0]
    for i, kind in enumerate(c.layer_types):
        rope = m.rope(np.arange(T), kind) if kind != "conv" else None
        out, _ = decoder_layer(cap(case, f"model.layers.{i}.input"), m.layer_weights(i), c, rope, None, c.window(i))
        assert rel_error(out, cap(case, f"model.layers.{i}.output")) < FP32.op_rel, f"layer {i}"


@pytest.mark.parametrize("case", CASES)
def test_each_operator(case):
    """QK-norm, RoPE of the layer's type (partial rotation included), the windowed attention core, the
    per-head output gate, the sandwich norms and the conv, each fed transformers' own inputs."""
    m = model(case)
    c, W = m.config, m.params
    T = cap(case, "model.layers.0.input").shape[0]
    for i, kind in enumerate(c.layer_types):
        p = f"model.layers.{i}."
        if kind == "conv":
            z, _ = ops.causal_conv1d(cap(case, p + "conv.bx"), W[p + "conv.conv.weight"][:, 0, :],
                                     W.get(p + "conv.conv.bias"))
            assert rel_error(z, cap(case, p + "conv.conv_out")) < FP32.op_rel
        else:
            a = p + "self_attn."
            q = ops.rms_norm(cap(case, a + "q_norm.input"),
                             W[a + "q_norm.weight"], c.norm_eps)
            assert rel_error(q, cap(case, a + "q_norm.output")) < FP32.op_rel
            cos, sin = m.rope(np.arange(T), kind)
            assert rel_error(ops.apply_rope(cap(case, a + "q_norm.output"), cos, sin), cap(case, a + "q_rope")) \
                < FP32.op_rel
            core = ops.attention(cap(case, a + "q_rope"), cap(case, a + "k_rope"), cap(case, a + "v"), c.window(i))
            assert rel_error(core, cap(case, a + "attn_core")) < FP32.op_rel
            if c.use_attention_gate:
                gate = ops.sigmoid(cap(case, a + "g_proj.output"))
                gated = ops.output_gate(core, gate)
                assert rel_error(gated, cap(case, a + "o_proj.input")) < FP32.op_rel
        if c.use_sandwich_norm:
            for norm in ("post_operator_norm", "post_ffn_norm"):
                y = ops.rms_norm(cap(case, p + norm + ".input"), W[p + norm + ".weight"], c.norm_eps)
                assert rel_error(y, cap(case, p + norm + ".output")) < FP32.op_rel


def test_the_gate_is_read_from_gate_proj_in_the_checkpoint():
    """Checkpoints name the output gate self_attn.gate_proj (transformers renames it g_proj on load)."""
    names = set(lfm2np.expected_tensors(model("lfm3-window").config))
    assert "model.layers.1.self_attn.gate_proj.weight" in names and "model.layers.1.self_attn.o_proj.weight" in names
    assert not any("g_proj" in n or "q_layernorm" in n or "out_proj" in n and "self_attn" in n for n in names)


# --------------------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("case", CASES)
def test_decoding_past_the_window_equals_one_shot_transformers(case):
    g, m = golden(case), model(case)
    ids, ref = g["logits.T40.ids"], g["logits.T40"]
    assert m.config.sliding_window < len(ids)
    a, s = m.step(ids[:7])  # chunked
    b, s = m.step(ids[7:23], s)
    rest = []
    for t in ids[23:]:  # token by token, far past the window
        out, s = m.step([t], s)
        rest.append(out)
    got = np.concatenate([a, b, *rest])
    assert rel_error(got, ref) < FP32.logits_rel
    np.testing.assert_array_equal(got.argmax(-1), ref.argmax(-1))
    # snapshot / restore and rollback reproduce the same rows
    _, snap = m.step(ids[:30])
    again, _ = m.step(ids[30:], snap)
    assert rel_error(again, ref[30:]) < FP32.logits_rel
    back = s.rollback(6)
    redo, _ = m.step(ids[-6:], back)
    assert rel_error(redo, ref[-6:]) < FP32.logits_rel
    # batches of different lengths: each row as its own run
    outs, _ = m.step_batch([ids[:40], ids[:17]], [None, None])
    assert rel_error(outs[0], ref) < FP32.logits_rel and rel_error(outs[1], ref[:17]) < FP32.logits_rel


@pytest.mark.parametrize("case", CASES)
def test_sliding_layers_keep_a_bounded_cache(case):
    m = model(case)
    c = m.config
    state = m.new_state(max_rollback=2)
    for chunk in np.array_split(golden(case)["logits.T40.ids"], 8):
        _, state = m.step(chunk, state)
    for i in range(c.num_hidden_layers):
        if c.window(i) is not None:
            assert state.keys[i].shape[0] == state.values[i].shape[0] == c.window(i) - 1 + 2
        elif c.is_attention(i):
            assert state.keys[i].shape[0] == 40
    assert state.rollback_limit == 2
    with pytest.raises(lfm2np.Lfm2npError, match="roll back 3"):
        state.rollback(3)


def test_a_state_of_another_window_is_refused():
    m = model("lfm3-window")
    _, state = m.step([1, 2, 3])
    other = lfm2np.Model(m.config.replace(sliding_window=5), dict(m.params))
    with pytest.raises(lfm2np.Lfm2npError, match="sliding windows"):
        other.step([4], state)


# ------------------------------------------------------------------------------- numerics modes
@pytest.mark.parametrize("case", CASES)
def test_float64_and_bf16_modes(case):
    g = golden(case)
    ids = g["logits.T13.ids"]
    o32, o64 = model(case).forward(ids), model(case, "float64").forward(ids)
    assert 0 < rel_error(o32, o64) < FP64_VS_FP32.logits_rel
    m16 = model(case, "bfloat16")
    # Bit for bit but for rounding-boundary flips. The float32 sums under each bf16 rounding depend on the BLAS
    # kernel (OpenBLAS sums in another order on AVX-512 machines than on AVX2 ones), so now and then a value
    # lands on the other side of a bf16 boundary: one bf16 ulp (2^-8 of the value) in a few elements of a layer,
    # which later layers carry on. So each layer, fed transformers' own input, agrees in all but a few elements
    # by at most an ulp of the layer's scale, and the logits to a few ulps.
    assert rel_error(m16.forward(g["bf16.ids"]), g["bf16.lm_head.output"]) < 2 * ULP_FLIP
    h = g["bf16.model.embed_tokens.output"]
    for i, kind in enumerate(m16.config.layer_types):
        rope = m16.rope(np.arange(len(ids)), kind) if kind != "conv" else None
        out, _ = decoder_layer(h, m16.layer_weights(i), m16.config, rope, None, m16.config.window(i),
                               Scope(BFLOAT16.round))
        ref = g[f"bf16.model.layers.{i}.output"]
        assert np.mean(out != ref) <= 0.02 and rel_error(out, ref) <= 2.0 ** -8, (case, i)
        h = ref


def test_traces_compare_and_golden_vectors_work_for_lfm3(tmp_path):
    m = model("lfm3-window")
    ids = cap("lfm3-window", "ids")
    _, t32 = record(m, ids)
    _, t16 = record(model("lfm3-window", "bfloat16"), ids)
    for name in ("model.layers.1.self_attn.gate", "model.layers.1.post_operator_norm", "model.layers.2.post_ffn_norm"):
        assert name in t32
    assert t16.names() == t32.names()
    assert compare(t32, t32).ok and not compare(t16, t32).ok  # bf16 rounding is far above the fp32 tier
    out = write_golden(m, ids, tmp_path / "g")
    manifest = json.loads((out / "manifest.json").read_text())
    op = {o["name"]: o for o in manifest["operators"]}
    assert op["model.layers.1.self_attn"]["params"]["window"] == 4  # a sliding layer
    assert op["model.rotary_emb.sliding_attention"]["params"]["rotated_pairs"] is None  # sliding: full rotation
    assert op["model.rotary_emb.full_attention"]["params"]["rotated_pairs"] == 4  # int(0.5 * 16 // 2)
    assert any(op["name"] == "model.layers.0.post_ffn_norm" for op in manifest["operators"])


# ----------------------------------------------------------------------------- the RoPE label trap
def test_proportional_frequencies_are_transformers_numbers():
    """LFM3-1.7B's full-attention table (proportional, 0.5, theta 1e6, hd 128) and sliding table (default,
    theta 1e4), against the values transformers 5.24 computes (Lfm3RotaryEmbedding buffers)."""
    c = lfm2np.load_config("LFM3-1.7B")
    full = ops.rope_frequencies(c.head_dim, c.rope("full_attention").theta, c.rotated_pairs("full_attention"))
    np.testing.assert_allclose(full[:3], [1.0, 0.80584, 0.64938], rtol=1e-5)
    np.testing.assert_allclose(full[30:32], [1.53993e-3, 1.24094e-3], rtol=1e-5)
    assert (full[32:] == 0).all() and (full[:32] > 0).all()
    sliding = ops.rope_frequencies(c.head_dim, c.rope("sliding_attention").theta, c.rotated_pairs("sliding_attention"))
    np.testing.assert_allclose(sliding[[0, 1, 2, 62, 63]], [1.0, 0.86596, 0.74989, 1.33352e-4, 1.15478e-4],
                               rtol=1e-5)


def test_unrotated_dims_pass_through_unchanged():
    """Proportional rotation turns dims i and i + hd/2 for i < rotated pairs and leaves the rest exactly."""
    hd, pairs = 16, 3
    x = np.random.default_rng(0).standard_normal((5, 2, hd)).astype(np.float32)
    cos, sin = ops.rope_tables(np.arange(100, 105), hd, 1e4, rotated=pairs)
    y = ops.apply_rope(x, cos, sin)
    still = [i for i in range(hd) if i % (hd // 2) >= pairs]
    np.testing.assert_array_equal(y[..., still], x[..., still])
    assert not np.allclose(y[..., :pairs], x[..., :pairs])


def test_an_ambiguous_label_warns_and_both_readings_exist():
    d = json.loads((GOLDEN / TRAP / "config.json").read_text())
    with pytest.warns(UserWarning, match="labelled 'default' with partial_rotary_factor 0.5"):
        trained = lfm2np.Config.from_dict(d)
    with pytest.warns(UserWarning, match="as transformers 5.24 reads it"):
        literal = lfm2np.Config.from_dict(d, rope_reading="transformers")
    assert trained.rotated_pairs("full_attention") == 4 and literal.rotated_pairs("full_attention") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # unambiguous labels do not warn
        lfm2np.load_config("LFM3-1.7B")
    with pytest.raises(lfm2np.Lfm2npError, match="rope_reading"):
        lfm2np.Config.from_dict(d, rope_reading="guess")


def test_the_two_readings_first_diverge_at_the_full_layers_rope():
    """transformers' reading of the trap checkpoint reproduces transformers; the trained reading first differs
    at the first full-attention layer's rotated queries, and not before."""
    ids = golden(TRAP)["logits.T13.ids"]
    assert rel_error(model(TRAP, reading="transformers").forward(ids), golden(TRAP)["logits.T13"]) < FP32.logits_rel
    _, literal = record(model(TRAP, reading="transformers"), ids)
    _, trained = record(model(TRAP, reading="trained"), ids)
    first = compare(trained, literal).first_divergence
    assert first.name == "model.rotary_emb.full_attention.inv_freq"  # the frequencies past the rotated pairs
    first = compare(trained, literal, patterns=["model.layers.*"]).first_divergence
    full = model(TRAP).config.full_attention_layers[0]
    assert first.name == f"model.layers.{full}.self_attn.q_rope" and first.max_rel > 1e-2


# ---------------------------------------------------------------------------------- config fields
BASE = json.loads((GOLDEN / "lfm3-window" / "config.json").read_text())


@pytest.mark.parametrize("changes, field", [
    ({"sliding_window": 0}, "sliding_window"),
    ({"sliding_window": "256"}, "sliding_window"),
    ({"sliding_window": 2 ** 40}, "sliding_window"),
    ({"use_sandwich_norm": "yes"}, "use_sandwich_norm"),
    ({"use_attention_gate": 1}, "use_attention_gate"),
    ({"attention_bias": None, "conv_bias": "no"}, "conv_bias"),
    ({"head_dim": 15}, "head_dim"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}, "rope_parameters"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6}}}, "rope_parameters"),
    ({"rope_parameters": {"full_attention": {"rope_type": "yarn"}, "sliding_attention": {}}},
     "rope_parameters.full_attention.rope_type"),
    ({"rope_parameters": {"full_attention": {"rope_type": "proportional", "partial_rotary_factor": 1.5},
                          "sliding_attention": {}}}, "rope_parameters.full_attention.partial_rotary_factor"),
    ({"rope_parameters": {"full_attention": {"rope_theta": "1e6"}, "sliding_attention": {}}},
     "rope_parameters.full_attention.rope_theta"),
    ({"rope_parameters": {"full_attention": [1e6], "sliding_attention": {}}}, "rope_parameters.full_attention"),
    ({"layer_types": ["conv", "sliding", "full_attention", "conv", "sliding_attention", "full_attention"]},
     "layer_types[1]"),
    ({"layer_types": ["conv"] * 5}, "layer_types"),
    ({"eos_token_id": 999}, "eos_token_id"),
])
def test_lfm3_fields_are_validated_by_name(changes, field):
    with pytest.raises(lfm2np.Lfm2npError, match=f"'{field}'" if "[" not in field else field.replace("[", r"\[")):
        lfm2np.Config.from_dict({**BASE, **changes})


def test_sliding_layers_belong_to_lfm3():
    d = json.loads((GOLDEN / "dense-legacy" / "config.json").read_text())
    d["full_attn_idxs"], d["layer_types"] = None, ["conv", "sliding_attention", "conv", "conv", "full_attention"]
    with pytest.raises(lfm2np.Lfm2npError, match=r"layer_types\[1\]"):
        lfm2np.Config.from_dict(d)


def test_lfm3_defaults_follow_transformers():
    """Missing keys take Lfm3Config's defaults: the i % 4 pattern, head_dim 128, window 256, L = 7, both
    sandwich norms and the gate, proportional RoPE 0.5 on full layers; a flat rope_theta is ignored."""
    c = lfm2np.Config.from_dict({"model_type": "lfm3", "vocab_size": 128000, "hidden_size": 2048,
                                 "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 4,
                                 "intermediate_size": 7680, "rope_theta": 5e5})
    assert c == lfm2np.load_config("LFM3-1.7B").replace(max_position_embeddings=128_000)
    assert (len(c.conv_layers), len(c.sliding_layers), len(c.full_attention_layers)) == (13, 5, 6)
    assert c.layer_pattern() == "CCACSCACSCACSCACSCACSCAC"


# ------------------------------------------------------------------------------ presets, calculators
def test_lfm3_preset_counts_and_memory():
    c = lfm2np.load_config("LFM3-1.7B")
    assert calc.param_counts(c)["total"] == 1_728_801_536 == sum(int(np.prod(s)) for s in
                                                                 lfm2np.expected_tensors(c).values())
    m = calc.memory(c, "bfloat16", context=131072, kv_type="f16")
    # 6 full layers x (K + V) x 4 KV heads x 128 x 2 bytes per token, the 5 sliding layers at their 256 positions
    assert m["kv_bytes_per_token"] == 6 * 2 * 4 * 128 * 2
    assert m["kv_cache_bytes"] == 12_288 * 131072 + 5 * 2 * 4 * 128 * 2 * 256
    assert 1.6e9 < m["kv_cache_bytes"] < 1.62e9  # "about 1.6 GB", not the ~2.9 GB of all 11 as full layers
    assert m["conv_state_bytes"] == 13 * 6 * 2048 * 4  # L - 1 = 6 columns, float32
    assert calc.kv_cache_bytes(c, 100) == 12_288 * 100 + 5 * 2 * 4 * 128 * 2 * 100  # context below the window


def test_lfm25_presets():
    assert calc.param_counts(lfm2np.load_config("LFM2.5-230M"))["total"] == 229_693_184
    for name in ("LFM2.5-1.2B-Base", "LFM2.5-1.2B-Instruct", "LFM2.5-1.2B-Thinking", "LFM2.5-1.2B-JP"):
        c = lfm2np.load_config(name)
        assert c.source == name and c == lfm2np.load_config("LFM2.5-1.2B")
    assert lfm2np.load_config("LFM2.5-350M") == lfm2np.load_config("LFM2-350M")
    assert lfm2np.load_config("lfm2-2.6b-exp") == lfm2np.load_config("LFM2-2.6B")
    # LFM2.5-2.6B is not LFM2-2.6B with new weights: LFM2.5's vocabulary and ids, another RoPE base and context
    c, old = lfm2np.load_config("LFM2.5-2.6B"), lfm2np.load_config("LFM2-2.6B")
    assert (c.vocab_size, c.rope_theta, c.max_position_embeddings, c.bos_token_id, c.eos_token_id, c.pad_token_id) \
        == (128_000, 1e7, 131_072, 124894, (124900,), 124893)
    assert (c.hidden_size, c.layer_types, c.ffn_dim) == (old.hidden_size, old.layer_types, old.ffn_dim)


def test_flops_count_the_window():
    c = lfm2np.load_config("LFM3-1.7B")
    f_short, f_long = calc.flops(c, 256), calc.flops(c, 8192)
    per_key = 4 * c.num_attention_heads * c.head_dim
    # one decode step at 8192: full layers read 8193 keys, sliding layers 256
    dense = calc.flops(c.replace(layer_types=tuple("conv" if k == "conv" else "full_attention"
                                                   for k in c.layer_types)), 8192)
    assert dense["decode"]["total"] - f_long["decode"]["total"] == 5 * per_key * (8193 - 256)
    assert f_short["decode"]["total"] < f_long["decode"]["total"]


def test_golden_fixture_files_are_complete():
    for case in CASES:
        d = GOLDEN / case
        assert {p.name for p in d.iterdir()} == {"config.json", "model.safetensors", "golden.safetensors"}
    with tempfile.TemporaryDirectory():
        pass


def test_every_fixture_is_described_in_the_docs():
    text = (GOLDEN.parent.parent / "docs" / "fixtures.md").read_text(encoding="utf-8")
    assert all(f"| {case} |" in text for case in CASES), [c for c in CASES if f"| {case} |" not in text]
