"""Every operator of lfm2np.ops and block of lfm2np.layers against the inputs and outputs captured from the
transformers modules.

Inputs are the reference's own intermediates, so each operator is checked in isolation: an error here
points at the operator, not at something upstream.
"""

from __future__ import annotations

import numpy as np
import pytest

from lfm2np import ops
from lfm2np import layers as L
from lfm2np.oracle.tolerance import FP32, rel_error

from conftest import CASES, GOLDEN as GOLDEN_DIR, MOE, captured, golden, model

TOL = FP32.op_rel


def layers(case, kind=None):
    c = model(case).config
    for i in range(c.num_hidden_layers):
        if kind is None or (kind == "attention") == c.is_attention(i):
            yield i, c


def assert_close(out, ref, what, tol=TOL):
    assert out.shape == ref.shape, f"{what}: shape {out.shape} vs reference {ref.shape}"
    err = rel_error(out, ref)
    assert err < tol, f"{what}: relative error {err:.2e} exceeds {tol:.0e}"


def test_embedding(case):
    W = model(case).params
    out = ops.embed(captured(case, "model.embed_tokens.input"), W["model.embed_tokens.weight"])
    np.testing.assert_array_equal(out, captured(case, "model.embed_tokens.output"))


def test_rms_norm_residual_stream(case):
    W, c = model(case).params, model(case).config
    checked = 0
    for i, _ in layers(case):
        for norm in ("operator_norm", "ffn_norm"):
            name = f"model.layers.{i}.{norm}"
            out = ops.rms_norm(captured(case, name + ".input"), W[name + ".weight"], c.norm_eps)
            assert_close(out, captured(case, name + ".output"), name)
            checked += 1
    name = "model.embedding_norm"
    assert_close(ops.rms_norm(captured(case, name + ".input"), W[name + ".weight"], c.norm_eps),
                 captured(case, name + ".output"), name)
    assert checked == 2 * c.num_hidden_layers


def test_rope_tables(case):
    c = model(case).config
    key = "model.rotary_emb" if "capture.model.rotary_emb.cos" in golden(case) else "model.pos_emb"
    T = captured(case, "model.embed_tokens.input").shape[0]
    cos, sin = ops.rope_tables(np.arange(T), c.head_dim, c.rope_theta)
    assert_close(cos, captured(case, key + ".cos"), "cos")
    assert_close(sin, captured(case, key + ".sin"), "sin")


def test_attention_pieces(case):
    """Per-head QK norm, RoPE application and the attention core, each on the reference's inputs."""
    W = model(case).params
    checked = 0
    for i, c in layers(case, "attention"):
        a = f"model.layers.{i}.self_attn."
        T = captured(case, a + "q_layernorm.input").shape[0]
        cos, sin = ops.rope_tables(np.arange(T), c.head_dim, c.rope_theta)
        for qk in ("q", "k"):
            normed = ops.rms_norm(captured(case, a + f"{qk}_layernorm.input"), W[a + f"{qk}_layernorm.weight"],
                                  c.norm_eps)
            assert_close(normed, captured(case, a + f"{qk}_layernorm.output"), a + f"{qk}_layernorm")
            rotated = ops.apply_rope(captured(case, a + f"{qk}_layernorm.output"), cos, sin)
            assert_close(rotated, captured(case, a + f"{qk}_rope"), a + f"{qk}_rope")
        out = ops.attention(captured(case, a + "q_rope"), captured(case, a + "k_rope"), captured(case, a + "v"))
        assert_close(out, captured(case, a + "attn_out"), a + "attn_out")
        checked += 1
    assert checked == len(model(case).config.attention_layers)


def test_attention_block(case):
    W = model(case).params
    for i, c in layers(case, "attention"):
        a = f"model.layers.{i}.self_attn."
        x = captured(case, a + "input")
        cos, sin = ops.rope_tables(np.arange(x.shape[0]), c.head_dim, c.rope_theta)
        w = L.AttentionWeights(W[a + "q_proj.weight"], W[a + "k_proj.weight"], W[a + "v_proj.weight"],
                               W[a + "out_proj.weight"], W[a + "q_layernorm.weight"], W[a + "k_layernorm.weight"])
        out, (k, v) = L.attention_block(x, w, (cos, sin), eps=c.norm_eps)
        assert_close(out, captured(case, a + "output"), a + "output")
        assert_close(k, captured(case, a + "k_rope"), a + "returned keys")
        assert_close(v, captured(case, a + "v"), a + "returned values")


def test_short_conv_pieces(case):
    W = model(case).params
    for i, c in layers(case, "conv"):
        p = f"model.layers.{i}.conv."
        bias = W[p + "conv.bias"] if c.conv_bias else None
        z, history = ops.causal_conv1d(captured(case, p + "bx"), W[p + "conv.weight"][:, 0, :], bias)
        assert_close(z, captured(case, p + "conv_out"), p + "conv_out")
        np.testing.assert_array_equal(history, captured(case, p + "bx"))


def test_short_conv_block(case):
    W = model(case).params
    n = 0
    for i, c in layers(case, "conv"):
        p = f"model.layers.{i}.conv."
        b = (lambda k: W[p + k + ".bias"]) if c.conv_bias else (lambda k: None)
        w = L.ConvWeights(W[p + "in_proj.weight"], W[p + "conv.weight"], W[p + "out_proj.weight"], b("in_proj"),
                          b("conv"), b("out_proj"))
        out, _ = L.short_conv(captured(case, p + "input"), w)
        assert_close(out, captured(case, p + "output"), p + "output")
        n += 1
    assert n == len(model(case).config.conv_layers)


def test_dense_ffn(case):
    W = model(case).params
    for i, c in layers(case):
        if c.is_moe_layer(i):
            continue
        f = f"model.layers.{i}.feed_forward."
        out = L.swiglu(captured(case, f + "input"), L.SwiGLUWeights(W[f + "w1.weight"], W[f + "w3.weight"],
                                                                  W[f + "w2.weight"]))
        assert_close(out, captured(case, f + "output"), f + "output")


@pytest.mark.parametrize("case", MOE)
def test_router(case):
    W = model(case).params
    n = 0
    for i, c in layers(case):
        if not c.is_moe_layer(i):
            continue
        f = f"model.layers.{i}.feed_forward."
        bias = W[f + "expert_bias"] if c.use_expert_bias else None
        logits, experts, weights = L.route(captured(case, f + "gate.input"), W[f + "gate.weight"], bias,
                                           c.num_experts_per_tok, c.norm_topk_prob, c.routed_scaling_factor)
        assert_close(logits, captured(case, f + "gate.router_logits"), f + "router_logits")
        ref_experts = captured(case, f + "gate.selected_experts")
        ref_weights = captured(case, f + "gate.routing_weights")
        # transformers' topk orders by the selection score too; compare per token as sets with weights
        for t in range(experts.shape[0]):
            assert sorted(experts[t]) == sorted(ref_experts[t]), f"{f} token {t}: experts differ"
        order = np.argsort(experts, axis=-1)
        ref_order = np.argsort(ref_experts, axis=-1)
        assert_close(np.take_along_axis(weights, order, -1), np.take_along_axis(ref_weights, ref_order, -1),
                     f + "routing_weights")
        n += 1
    assert n == len(model(case).config.moe_layers)


@pytest.mark.parametrize("case", MOE)
def test_moe_combination(case):
    W = model(case).params
    for i, c in layers(case):
        if not c.is_moe_layer(i):
            continue
        f = f"model.layers.{i}.feed_forward."
        expert = model(case).layer_weights(i).ffn.expert
        out = L.mixture(captured(case, f + "experts.input"), captured(case, f + "experts.selected_experts"),
                        captured(case, f + "experts.routing_weights"), expert)
        assert_close(out, captured(case, f + "experts.output"), f + "experts.output")
        # the whole MoE block: router then experts
        x = captured(case, f + "input")
        block = L.moe_block(x, model(case).layer_weights(i).ffn, c)
        assert_close(block, captured(case, f + "output"), f + "output")


def test_lm_head(case):
    m = model(case)
    name = "model.embed_tokens.weight" if m.config.tie_word_embeddings else "lm_head.weight"
    out = ops.lm_head(captured(case, "lm_head.input"), m.params[name])
    assert_close(out, captured(case, "lm_head.output"), "lm_head")


def test_each_decoder_layer(case):
    """Each whole layer, from the reference's input to that layer: localises a model-level mismatch."""
    m = model(case)
    c = m.config
    T = captured(case, "model.layers.0.input").shape[0]
    rope = ops.rope_tables(np.arange(T), c.head_dim, c.rope_theta)
    for i in range(c.num_hidden_layers):
        out, _ = L.decoder_layer(captured(case, f"model.layers.{i}.input"), m.layer_weights(i), c,
                                 rope if c.is_attention(i) else None)
        assert_close(out, captured(case, f"model.layers.{i}.output"), f"model.layers.{i}")


def test_fixture_cases_cover_the_switches():
    """The fixture set exercises every switch the issue names (guards against a generator edit losing one)."""
    from conftest import MANIFEST

    cfgs = {n: model(n).config for n in CASES}
    stored = {n: MANIFEST["cases"][n]["checkpoint_dtype"] for n in CASES}
    dense = [c for c in cfgs.values() if not c.is_moe]
    moe = [c for c in cfgs.values() if c.is_moe]
    assert len(dense) >= 3 and len(moe) >= 3
    assert any(c.conv_bias for c in cfgs.values())
    assert any(not c.tie_word_embeddings for c in cfgs.values())
    assert any(c.num_key_value_heads == 1 for c in cfgs.values())
    assert any(1 < c.num_key_value_heads < c.num_attention_heads for c in cfgs.values())
    assert any(c.block_auto_adjust_ff_dim and c.block_ffn_dim_multiplier not in (None, 1.0) for c in dense)
    assert any(not c.use_expert_bias for c in moe)
    assert any(not c.norm_topk_prob for c in moe)
    assert any(c.routed_scaling_factor != 1 for c in moe)
    assert any(c.num_dense_layers == 0 for c in moe)
    assert any(c.num_experts_per_tok == 1 for c in moe)
    assert any(c.num_experts_per_tok == c.num_experts for c in moe)
    assert "bfloat16" in stored.values() and "float16" in stored.values()
    assert any(MANIFEST["cases"][n]["shards"] > 1 for n in CASES)
    # an expert bias that changes which experts are chosen (selection on s + bias vs on s alone)
    changed = False
    for n in MOE:
        c, W = cfgs[n], model(n).params
        if not c.use_expert_bias or c.num_experts_per_tok == c.num_experts:
            continue
        for i in c.moe_layers:
            f = f"model.layers.{i}.feed_forward."
            logits = captured(n, f + "gate.router_logits")
            plain = np.sort(ops.top_k_experts(ops.sigmoid(logits), c.num_experts_per_tok), -1)
            biased = np.sort(captured(n, f + "gate.selected_experts"), -1)
            changed |= bool((plain != biased).any())
    assert changed
    raw = {n: (GOLDEN_DIR / n / "config.json").read_text() for n in CASES}
    for legacy in ('"block_ff_dim"', '"full_attn_idxs"', '"tie_embedding"', '"theta"'):
        assert any(legacy in text for text in raw.values()), legacy

