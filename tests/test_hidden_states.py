"""``hidden_states(model, ids)``: transformers' ``output_hidden_states`` list, checked against the layer outputs
the fixtures recorded from transformers. transformers 5.24 (checked in the reference environment with
``model(ids, output_hidden_states=True)`` on tests/golden/moe-bf16-bias) gives ``num_hidden_layers + 1``
entries: the embeddings, each layer's output, and as the last entry the final norm of the last layer's
output (``capture_outputs`` ties it to ``last_hidden_state``)."""

from __future__ import annotations

import pytest

import lfm2np
from lfm2np.oracle.tolerance import FP32, rel_error
from lfm2np.oracle.trace import hidden_states

from conftest import captured, golden, model


def test_hidden_states_follow_transformers_indexing(case):
    m = model(case)
    ids = golden(case)["capture.ids"]
    states = hidden_states(m, ids)
    n = m.config.num_hidden_layers
    assert len(states) == n + 1
    want = [captured(case, "model.embed_tokens.output"),
            *(captured(case, f"model.layers.{i}.output") for i in range(n - 1)),
            captured(case, "model.embedding_norm.output")]
    for i, (got, ref) in enumerate(zip(states, want)):
        assert got.shape == ref.shape and rel_error(got, ref) <= FP32.op_rel, f"hidden_states[{i}]"
    raw = hidden_states(m, ids, final_norm=False)
    assert rel_error(raw[-1], captured(case, f"model.layers.{n - 1}.output")) <= FP32.op_rel
    assert all((a == b).all() for a, b in zip(raw[:-1], states[:-1]))


def test_hidden_states_take_one_sequence():
    m = model("moe-bf16-bias")
    with pytest.raises(lfm2np.Lfm2npError, match="one sequence"):
        hidden_states(m, [[1, 2], [3, 4]])
