"""The bfloat16 emulation against transformers run in bfloat16 (fixtures), and against itself unrounded."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file

import lfm2np
from lfm2np import ops
from lfm2np.bf16 import Bf16Model, emulate_bf16, to_bf16
from lfm2np.tolerance import rel_error

from conftest import CASES, GOLDEN, golden, model

ULP_FLIP = 1e-2  # a few bf16 ulps (2^-8 = 3.9e-3) relative to the layer's scale


def test_without_rounding_it_is_the_float32_model(case):
    """The emulation's composition is the float32 forward pass step for step."""
    ids = golden(case)["bf16.ids"]
    np.testing.assert_array_equal(emulate_bf16(model(case), rounding=False).forward(ids), model(case).forward(ids))


def test_rounding_matches_torch():
    ref = load_file(str(GOLDEN / "bf16_rounding.safetensors"))
    x = ref["float32"]
    expected = (ref["bfloat16_bits"].astype(np.uint16).astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(to_bf16(x), expected)


def bf16_tie_at_selection(m: Bf16Model, layer: int, seen: dict) -> bool:
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
        m = emulate_bf16(model(case))
        c = m.config
        ids = g["bf16.ids"]
        cos, sin = ops.rope_tables(np.arange(len(ids)), c.head_dim, c.rope_theta)
        np.testing.assert_array_equal(ops.embed(ids, m.params["model.embed_tokens.weight"]),
                                      g["bf16.model.embed_tokens.output"])
        h = g["bf16.model.embed_tokens.output"]
        for i in range(c.num_hidden_layers):
            ref = g[f"bf16.model.layers.{i}.output"]
            seen: dict = {}
            out, _ = m._layer(i, h, cos, sin, None, seen.__setitem__)
            err = rel_error(out, ref)
            total += 1
            exact += err == 0
            if err > ULP_FLIP:
                assert bf16_tie_at_selection(m, i, seen), f"{case} layer {i}: {err:.2e} with no router tie"
            h = ref
    assert exact >= 0.8 * total, f"only {exact} of {total} layers bit-identical"


def test_load_bfloat16_and_decode():
    m = lfm2np.load(GOLDEN / "moe-bf16-bias", dtype="bfloat16")
    assert isinstance(m, Bf16Model) and "bfloat16 (emulated)" in repr(m)
    ids = golden("moe-bf16-bias")["bf16.ids"]
    full = m.forward(ids)
    np.testing.assert_array_equal(full, to_bf16(full))  # logits are bf16 values
    np.testing.assert_array_equal(full, golden("moe-bf16-bias")["bf16.lm_head.output"])
    a, s = m.step(ids[:5])
    b, _ = m.step(ids[5:], s)
    assert rel_error(np.concatenate([a, b]), full) < ULP_FLIP


@pytest.mark.parametrize("case", CASES)
def test_bf16_is_further_from_float32_than_float32_is(case):
    """The emulation really rounds: its distance to the float32 reference is bf16-sized, not 1e-6."""
    g = golden(case)
    err = rel_error(lfm2np.load(GOLDEN / case, dtype="bfloat16").forward(g["logits.T13.ids"]), g["logits.T13"])
    assert 1e-3 < err < 1.0
