"""The model's own checks: non-finite values named where they first appear, positions beyond the context,
states that belong to another model, argument types of the state's operations."""

from __future__ import annotations

import numpy as np
import pytest

import lfm2np
from lfm2np.oracle.tolerance import FP32, rel_error
from lfm2np.synthetic import random_params


def model_with(config_name: str, broken: str | None = None, where=(3, 4), value=np.nan, **changes):
    c = lfm2np.load_config(config_name)
    if changes:
        c = c.replace(**changes)
    p = random_params(c, seed=1)
    if broken:
        p[broken][where] = value
    return lfm2np.Model(c, p)


@pytest.mark.parametrize("name, value", [
    ("model.layers.1.self_attn.k_proj.weight", np.nan),
    ("model.layers.0.conv.in_proj.weight", np.inf),
    ("model.layers.3.feed_forward.w2.weight", -np.inf),
    ("model.layers.1.ffn_norm.weight", np.nan),
    ("model.embedding_norm.weight", np.nan),
])
def test_a_non_finite_weight_is_named(name, value):
    m = model_with("tiny-dense", name, (3,) if name.endswith("norm.weight") else (3, 4), value)
    with pytest.raises(lfm2np.Lfm2npError, match="non-finite values: they first appear in .*; weight "
                                                 + name.replace(".", r"\.")):
        m.forward([1, 2, 3, 4])


def test_a_recording_forward_names_the_weight_too_and_an_intervention_is_blamed():
    """A trace (a recorder that only looks) is the model's own run: the weight is named as without one. A
    recorder that replaces a value is an intervention: a non-finite value it brings in is put on it."""
    from lfm2np.oracle.trace import record

    name = "model.layers.1.self_attn.k_proj.weight"
    m = model_with("tiny-dense", name, (3, 4), np.nan)
    with pytest.raises(lfm2np.Lfm2npError, match="first appear in model.layers.1.* weight " + name.replace(".", r"\.")):
        record(m, [1, 2, 3, 4])
    fine = model_with("tiny-dense", name, (3, 4), 0.5)

    def poison(n, value):
        return np.full_like(value, np.nan) if n == "model.layers.2" else None

    with pytest.raises(lfm2np.Lfm2npError, match=r"a value returned by record"):
        fine.forward([1, 2, 3, 4], record=poison)


def test_a_broken_expert_is_named_when_it_is_chosen():
    m = model_with("tiny-moe", "model.layers.2.feed_forward.experts.4.w1.weight", (0, 0), np.nan)
    with pytest.raises(lfm2np.Lfm2npError, match=r"experts\.4\.w1\.weight"):
        for token in range(1, 97):  # some token chooses expert 4 (6 experts, top-2)
            m.step([token])


def test_greedy_generation_never_emits_a_token_from_nan_logits():
    from lfm2np.generate import generate

    m = model_with("tiny-dense", "model.layers.1.self_attn.v_proj.weight", (0, 0), np.nan)
    with pytest.raises(lfm2np.Lfm2npError, match="v_proj"):
        generate(m, [1, 2, 3], 4)


def test_an_embedding_row_is_named_only_when_used():
    c = lfm2np.load_config("tiny-dense").replace(tie_word_embeddings=False)
    p = random_params(c, seed=1)
    p["model.embed_tokens.weight"][9] = np.nan
    m = lfm2np.Model(c, p)
    assert np.isfinite(m.forward([1, 2, 3])).all()
    with pytest.raises(lfm2np.Lfm2npError, match=r"first appear in model\.embed_tokens; weight model\.embed_tokens"):
        m.forward([1, 9, 3])


def test_overflow_without_a_bad_weight_says_so():
    m = model_with("tiny-dense")
    m.params["model.layers.0.ffn_norm.weight"][:] = 3e38  # finite weights, overflowing activations
    with pytest.raises(lfm2np.Lfm2npError, match="overflowed or came from the state"):
        m.forward([1, 2, 3])


def test_positions_beyond_the_context_are_refused():
    m = model_with("tiny-dense", max_position_embeddings=8)
    m.forward(list(range(8)))
    with pytest.raises(lfm2np.Lfm2npError, match="max_position_embeddings 8"):
        m.forward(list(range(9)))
    _, s = m.step(list(range(6)))
    m.step([1, 2], s)
    with pytest.raises(lfm2np.Lfm2npError, match=r"positions 6\.\.8"):
        m.step([1, 2, 3], s)


def test_a_state_of_another_conv_kernel_is_refused():
    a = model_with("tiny-dense")
    b = lfm2np.Model(a.config.replace(conv_L_cache=4), random_params(a.config.replace(conv_L_cache=4)))
    _, s = a.step([1, 2, 3])
    with pytest.raises(lfm2np.Lfm2npError, match="conv_L_cache 3, the config has 4"):
        b.step([4], s)


@pytest.mark.parametrize("bad", [1.5, "2", None, True, [1]])
def test_state_arguments_are_checked(bad):
    m = model_with("tiny-dense")
    _, s = m.step([1, 2, 3])
    with pytest.raises(lfm2np.Lfm2npError, match="rollback takes"):
        s.rollback(bad)
    with pytest.raises(lfm2np.Lfm2npError, match="max_rollback"):
        m.new_state(max_rollback=bad)
    with pytest.raises(lfm2np.Lfm2npError, match="layer"):
        s.conv_window(bad)


def test_step_batch_and_step_arguments():
    m = model_with("tiny-dense")
    with pytest.raises(lfm2np.Lfm2npError, match="list of id sequences"):
        m.step_batch("abc", [None])
    with pytest.raises(lfm2np.Lfm2npError, match="State"):
        m.step([1], state={"position": 0})
    with pytest.raises(lfm2np.Lfm2npError, match="rectangular"):
        m.forward([[1, 2], [3]])
    with pytest.raises(lfm2np.Lfm2npError, match="record traces one sequence"):
        m.forward([[1, 2], [3, 4]], record=lambda n, v: None)


def test_a_replacement_of_the_wrong_shape_is_refused():
    m = model_with("tiny-dense")
    with pytest.raises(lfm2np.Lfm2npError, match="replacement for model.layers.0.conv.bx has shape"):
        m.forward([1, 2, 3], record=lambda n, v: np.zeros(3) if n.endswith("conv.bx") else None)


BX = "model.layers.0.conv.bx"
EXPERTS = "model.layers.1.feed_forward.selected_experts"


@pytest.mark.parametrize("name, replace, message", [
    (BX, lambda v: v + 1j, "holds complex64 values; expected real floating-point numbers"),
    (BX, lambda v: np.full(v.shape, None, object), "holds object values"),
    (BX, lambda v: v.astype(object), "holds object values"),
    (BX, lambda v: np.ones(v.shape, np.int64), "holds int64 values; expected real floating-point numbers"),
    (BX, lambda v: np.ones(v.shape, bool), "holds bool values"),
    (BX, lambda v: np.full(v.shape, "1.5"), "holds <U3 values"),
    (BX, lambda v: [[1.0], [2.0, 3.0]], "is not an array"),
    (EXPERTS, lambda v: v.astype(np.float64) + 0.7, "holds float64 values; expected integers, as the value it "
                                                    "replaces (int64)"),
    (EXPERTS, lambda v: v.astype(np.float32), "holds float32 values; expected integers"),
    (EXPERTS, lambda v: v + 1j, "holds complex128 values; expected integers"),
    (EXPERTS, lambda v: v + 99, "; the layer has experts 0..5"),
    (EXPERTS, lambda v: v - 10, "holds expert -"),
    (EXPERTS, lambda v: np.full(v.shape, 2**64 - 1, np.uint64), "holds expert -1"),
])
def test_a_replacement_of_another_kind_of_number_is_refused_naming_the_value(name, replace, message):
    """A cast would drop an imaginary part, make NaN of an object, truncate a float into an expert index: refused."""
    m = model_with("tiny-moe")
    with pytest.raises(lfm2np.Lfm2npError) as e:
        m.forward([1, 2, 3], record=lambda n, v: replace(v) if n == name else None)
    assert str(e.value).startswith(f"the replacement for {name} ") and message in str(e.value), str(e.value)


def test_replacements_of_the_same_kind_of_number_are_taken():
    m = model_with("tiny-moe")
    plain = m.forward([1, 2, 3])
    same = m.forward([1, 2, 3], record=lambda n, v: v.astype(np.float64) if n == BX else None)
    np.testing.assert_array_equal(same, plain)
    flipped = m.forward([1, 2, 3], record=lambda n, v: (v[:, ::-1] + 1).astype(np.uint8) % 6 if n == EXPERTS else None)
    assert not np.array_equal(flipped, plain)


def test_long_prompts_run_in_chunks_with_the_same_rows():
    """forward() splits a prompt longer than prefill_chunk; the rows equal transformers' one-shot logits."""
    from conftest import CASES, golden, model

    for case in CASES:
        g, m = golden(case), lfm2np.load(model(case).config.source.rsplit("/", 1)[0])
        m.prefill_chunk = 4
        out = m.forward(g["logits.T13.ids"])
        assert rel_error(out, g["logits.T13"]) < FP32.logits_rel, case
        seen = []
        m.forward(g["logits.T13.ids"],
                  record=lambda name, value: seen.append(value.shape[0]) if name == "lm_head" else None)
        assert seen == [13]  # recording runs one pass, so each name is seen once with every position


def test_progress_is_reported_after_each_layer_and_each_chunk():
    m = model_with("tiny-moe")
    m.prefill_chunk = 50
    seen = []
    m.forward(np.arange(1, 121) % 97, progress=lambda done, total: seen.append((done, total)))
    L = m.config.num_hidden_layers
    assert seen == [(d, 3 * L) for d in range(1, 3 * L + 1)]  # 3 chunks
    seen.clear()
    m.step([1, 2], progress=lambda done, total: seen.append((done, total)))
    assert seen == [(d, L) for d in range(1, L + 1)]
