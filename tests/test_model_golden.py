"""The whole model against transformers: logits, argmax and chosen experts, float32 and float64."""

from __future__ import annotations

import numpy as np
import pytest

from lfm2np.oracle.tolerance import FP32, FP64_VS_FP32, rel_error

from conftest import MANIFEST, MOE, captured, golden, model


@pytest.mark.parametrize("T", MANIFEST["cases"][next(iter(MANIFEST["cases"]))]["seq_lengths"])
def test_logits_match_reference(case, T):
    g = golden(case)
    out = model(case).forward(g[f"logits.T{T}.ids"])
    ref = g[f"logits.T{T}"]
    assert out.shape == ref.shape == (T, model(case).config.vocab_size)
    assert out.dtype == np.float32
    assert rel_error(out, ref) < FP32.logits_rel
    np.testing.assert_array_equal(out.argmax(-1), ref.argmax(-1))


def test_batch_of_two_matches_reference(case):
    g = golden(case)
    out = model(case).forward(g["batch.ids"])
    assert out.shape == g["batch.logits"].shape
    assert rel_error(out, g["batch.logits"]) < FP32.logits_rel
    np.testing.assert_array_equal(out.argmax(-1), g["batch.logits"].argmax(-1))


@pytest.mark.parametrize("case", MOE)
def test_chosen_experts_match_reference(case):
    m = model(case)
    seen = {}
    m.forward(captured(case, "model.embed_tokens.input"), record=lambda name, value: seen.__setitem__(name, value))
    for i in m.config.moe_layers:
        f = f"model.layers.{i}.feed_forward."
        ours = np.sort(seen[f + "selected_experts"], axis=-1)
        ref = np.sort(captured(case, f + "gate.selected_experts"), axis=-1)
        np.testing.assert_array_equal(ours, ref, err_msg=f"layer {i}")
    assert len(m.config.moe_layers) > 0


def test_float64_mode_agrees_with_float32(case):
    g = golden(case)
    ids = g["logits.T13.ids"]
    out64 = model(case, "float64").forward(ids)
    out32 = model(case).forward(ids)
    assert out64.dtype == np.float64
    err = rel_error(out32, out64)
    assert err < FP64_VS_FP32.logits_rel
    # float64 is not float32 in disguise: the two differ by float32 rounding, not by zero
    assert err > 0
    # and float64 is as close to the float32 reference as our float32 is
    assert rel_error(out64, g["logits.T13"]) < FP32.logits_rel
