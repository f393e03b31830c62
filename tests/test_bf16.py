"""The bfloat16 emulation against transformers run in bfloat16 (fixtures); it is the float32 forward pass
with a rounding policy, so it records the same trace and decodes with the same state."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file

import lfm2np
from lfm2np import ops
from lfm2np import layers
from lfm2np.numerics import BFLOAT16, FLOAT32, Numerics, to_bf16
from lfm2np.oracle.tolerance import rel_error
from lfm2np.oracle.trace import record

from conftest import CASES, GOLDEN, ULP_FLIP, golden, model



def test_without_rounding_it_is_the_float32_model(case):
    """The emulation is the float32 forward pass with a rounding policy: with the identity rounding it is
    the float32 model bit for bit, and its trace has exactly the float32 trace's names."""
    ids = golden(case)["bf16.ids"]
    unrounded = Numerics("bfloat16-unrounded", np.dtype(np.float32), lambda x: x, round_weights=True)
    m32 = model(case)
    np.testing.assert_array_equal(lfm2np.Model(m32.config, dict(m32.params), unrounded).forward(ids),
                                  m32.forward(ids))
    _, t32 = record(m32, ids)
    _, t16 = record(model(case, "bfloat16"), ids)
    assert t16.names() == t32.names() and len(t32) > 40
    for name in t32.names():
        assert t16[name].shape == t32[name].shape, name


def test_bf16_decoding_equals_bf16_forward(case):
    """step in the emulation (chunked and token by token) gives the bf16 forward's logits (to a few bf16
    ulps: BLAS sums a one-row matmul in another order, and a float32 difference can cross a bf16 boundary)."""
    m = model(case, "bfloat16")
    ids = golden(case)["bf16.ids"]
    full = m.forward(ids)
    a, s = m.step(ids[:5])
    rest = []
    for t in ids[5:]:
        out, s = m.step([t], s)
        rest.append(out)
    assert rel_error(np.concatenate([a, *rest]), full) < ULP_FLIP


def test_bf16_long_prompt_uses_blocked_attention():
    """A prompt longer than the attention block runs blocked in the emulation too, with the same result."""
    m = model("moe-bf16-bias", "bfloat16")
    ids = np.arange(1, 301) % m.config.vocab_size
    seen = {}
    full = m.forward(ids, record=lambda n, v: seen.__setitem__(n, v.shape) if n.endswith("attn_out") else None)
    assert seen and all(shape[0] == 300 for shape in seen.values())
    np.testing.assert_array_equal(full[:50], m.forward(ids[:50]))


def test_rounding_matches_torch():
    ref = load_file(str(GOLDEN / "bf16_rounding.safetensors"))
    x = ref["float32"]
    expected = (ref["bfloat16_bits"].astype(np.uint16).astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(to_bf16(x), expected)


def bf16_tie_at_selection(m: lfm2np.Model, layer: int, seen: dict) -> bool:
    """Whether two experts tie exactly at the top-k boundary of the bf16 router scores."""
    c, W, f = m.config, m.params, f"model.layers.{layer}.feed_forward."
    if not c.is_moe_layer(layer) or c.num_experts_per_tok == c.num_experts:
        return False
    scores = to_bf16(ops.sigmoid(seen[f + "router_logits"]))
    if c.use_expert_bias:
        scores = scores + W[f + "expert_bias"]
    s = -np.sort(-scores, axis=-1)
    k = c.num_experts_per_tok
    return bool((s[:, k - 1] == s[:, k]).any())


def test_each_layer_against_transformers_bf16():
    """Each layer, fed transformers' own bf16 input, gives transformers' bf16 output bit for bit, except
    for single-ulp flips (float32 exp/sum differences landing on a bf16 rounding boundary) and exact bf16
    ties in the router, where torch.topk's tie order is unspecified."""
    exact = total = 0
    for case in CASES:
        g = golden(case)
        m = model(case, "bfloat16")
        c = m.config
        ids = g["bf16.ids"]
        rope = m.rope(np.arange(len(ids)))
        np.testing.assert_array_equal(m.embed_tokens(ids), g["bf16.model.embed_tokens.output"])
        h = g["bf16.model.embed_tokens.output"]
        for i in range(c.num_hidden_layers):
            ref = g[f"bf16.model.layers.{i}.output"]
            seen: dict = {}

            def tap(name, value):
                seen["model.layers.{}.".format(i) + name] = value
                return value

            kind_rope = rope if c.is_attention(i) else None
            out, _ = layers.decoder_layer(h, m.layer_weights(i), c, kind_rope, None, None, layers.Scope(BFLOAT16.round, tap))
            err = rel_error(out, ref)
            total += 1
            exact += err == 0
            if err > ULP_FLIP:
                assert bf16_tie_at_selection(m, i, seen), f"{case} layer {i}: {err:.2e} with no router tie"
            h = ref
    assert exact >= 0.8 * total, f"only {exact} of {total} layers bit-identical"


def test_load_bfloat16_and_decode():
    m = lfm2np.load(GOLDEN / "moe-bf16-bias", dtype="bfloat16")
    assert m.numerics is BFLOAT16 and m.dtype == np.float32 and "bfloat16 (emulated)" in repr(m)
    ids = golden("moe-bf16-bias")["bf16.ids"]
    full = m.forward(ids)
    np.testing.assert_array_equal(full, to_bf16(full))  # logits are bf16 values
    # (transformers' bf16 logits to a few ulps: test_each_layer_against_transformers_bf16 says why not bit for bit)
    assert rel_error(full, golden("moe-bf16-bias")["bf16.lm_head.output"]) < ULP_FLIP
    a, s = m.step(ids[:5])
    b, _ = m.step(ids[5:], s)
    assert rel_error(np.concatenate([a, b]), full) < ULP_FLIP


@pytest.mark.parametrize("case", CASES)
def test_bf16_is_further_from_float32_than_float32_is(case):
    """The emulation really rounds: its distance to the float32 reference is bf16-sized, not 1e-6."""
    g = golden(case)
    err = rel_error(lfm2np.load(GOLDEN / case, dtype="bfloat16").forward(g["logits.T13.ids"]), g["logits.T13"])
    assert 1e-3 < err < 1.0
