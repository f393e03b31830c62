"""Config parsing: both model types, legacy keys, presets, derived values and every rejection."""

from __future__ import annotations

import json

import pytest

import lfm2np
from lfm2np import presets
from lfm2np.config import Config, effective_ffn_dim

from conftest import GOLDEN, MANIFEST


def base_dense(**changes):
    d = {"model_type": "lfm2", "vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 3,
         "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 24,
         "layer_types": ["conv", "full_attention", "conv"], "block_auto_adjust_ff_dim": False}
    d.update(changes)
    return d


def base_moe(**changes):
    d = {"model_type": "lfm2_moe", "vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 3,
         "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 24,
         "moe_intermediate_size": 8, "num_experts": 4, "num_experts_per_tok": 2, "num_dense_layers": 1,
         "layer_types": ["conv", "full_attention", "conv"]}
    d.update(changes)
    return d


# ------------------------------------------------------------------ the FFN width rule
@pytest.mark.parametrize("given, width", [(6656, 4608), (10240, 6912), (12288, 8192)])
def test_ffn_width_of_the_released_models(given, width):
    """The examples in the facts sheet (model cards' widths)."""
    assert effective_ffn_dim(given, True, 1.0, 256) == width


def test_ffn_width_rule_details():
    assert effective_ffn_dim(100, True, 1.5, 16) == 112  # int(200/3)=66, int(99)=99, up to 112
    assert effective_ffn_dim(90, True, None, 256) == 60  # no multiplier: no rounding either
    assert effective_ffn_dim(10752, False, 1.0, 256) == 10752  # auto-adjust off: as is
    cfg = lfm2np.load_config(base_moe(intermediate_size=7168))
    assert cfg.ffn_dim == 7168  # lfm2_moe dense layers use intermediate_size as is


def test_fixture_widths_match_the_checkpoints(case):
    """The derived width equals what transformers built (the w1 rows in the written checkpoint)."""
    m = lfm2np.load(GOLDEN / case)
    c = m.config
    for i in range(c.num_hidden_layers):
        if not c.is_moe_layer(i):
            assert m.params[f"model.layers.{i}.feed_forward.w1.weight"].shape == (c.ffn_dim, c.hidden_size)


# ------------------------------------------------------------------------ legacy keys
def test_legacy_keys_equal_their_modern_spelling():
    modern = base_dense(intermediate_size=30, rope_theta=5000.0, tie_word_embeddings=False)
    legacy = base_dense(block_ff_dim=30, theta=5000.0, tie_embedding=False)
    del legacy["layer_types"]
    legacy["full_attn_idxs"] = [1]
    del legacy["intermediate_size"]
    assert Config.from_dict(legacy) == Config.from_dict(modern)
    via_rope_parameters = base_dense(intermediate_size=30, tie_word_embeddings=False,
                                     rope_parameters={"rope_type": "default", "rope_theta": 5000.0})
    assert Config.from_dict(via_rope_parameters) == Config.from_dict(modern)


def test_legacy_keys_win_over_modern_ones_as_in_transformers():
    c = Config.from_dict(base_dense(block_ff_dim=40, intermediate_size=24, tie_embedding=False,
                                    tie_word_embeddings=True, theta=5e5, rope_theta=2e4))
    assert c.intermediate_size == 40 and c.tie_word_embeddings is False
    assert c.rope_theta == 5e5  # transformers 4.x: kwargs.get("theta", kwargs.get("rope_theta"))


def test_fixture_configs_parse_to_the_reference_config(case):
    """Each fixture's config.json (legacy spellings included) means what transformers was built with."""
    ref = dict(MANIFEST["cases"][case]["reference_config"])
    c = lfm2np.load_config(GOLDEN / case / "config.json")
    kinds = ref.get("layer_types") or ["full_attention"] * ref["num_hidden_layers"]
    assert c.layer_types == tuple(kinds)
    assert c.rope_theta == ref["rope_theta"]
    assert c.tie_word_embeddings == ref["tie_word_embeddings"]
    assert c.intermediate_size == ref["intermediate_size"]
    assert c.norm_eps == ref["norm_eps"]
    assert c.conv_bias == ref["conv_bias"]


def test_no_layer_kinds_means_every_layer_is_attention():
    d = base_dense()
    del d["layer_types"]
    assert Config.from_dict(d).attention_layers == (0, 1, 2)


def test_derived_values():
    c = Config.from_dict(base_moe())
    assert c.head_dim == 4 and c.kv_groups == 2
    assert c.attention_layers == (1,) and c.conv_layers == (0, 2)
    assert c.moe_layers == (1, 2) and not c.is_moe_layer(0)
    assert c.eos_token_id == (2,)  # transformers' default when the config has none
    assert Config.from_dict(base_moe(eos_token_id=[7, 2])).eos_token_id == (7, 2)


def test_unknown_keys_are_tolerated():
    c = Config.from_dict(base_dense(torch_dtype="bfloat16", architectures=["Lfm2ForCausalLM"], foo={"x": 1}))
    assert c.hidden_size == 16


def test_to_dict_round_trips(case):
    c = lfm2np.load_config(GOLDEN / case)
    assert Config.from_dict(c.to_dict()) == c


# ----------------------------------------------------------------------------- presets
@pytest.mark.parametrize("name", presets.names())
def test_every_preset_parses(name):
    c = lfm2np.load_config(name)
    assert c.source == name
    released = presets.canonical(name) in presets.RELEASED
    assert c.head_dim == (128 if c.model_type == "lfm3" else 64 if released else c.hidden_size // c.num_attention_heads)


@pytest.mark.parametrize("spelling", ["LFM2-350M", "lfm2-350m", "LiquidAI/LFM2-350M", "liquidai/lfm2-350m",
                                      "  LFM2-350m "])
def test_preset_names_ignore_case_and_prefix(spelling):
    assert lfm2np.load_config(spelling) == lfm2np.load_config("LFM2-350M")


def test_released_family_shapes():
    """Layer patterns and widths stated in the model cards and the facts sheet."""
    c = lfm2np.load_config("LFM2-350M")
    assert (c.hidden_size, c.num_hidden_layers, c.ffn_dim, c.attention_layers) == \
        (1024, 16, 4608, (2, 5, 8, 10, 12, 14))
    c = lfm2np.load_config("LFM2-2.6B")
    assert (c.ffn_dim, len(c.attention_layers), len(c.conv_layers)) == (10752, 8, 22)
    c = lfm2np.load_config("LFM2-8B-A1B")
    assert (c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size, c.moe_layers[0]) == (32, 4, 1792, 2)
    assert len(c.attention_layers) == 6
    c = lfm2np.load_config("LFM2-24B-A2B")
    assert (c.num_hidden_layers, len(c.attention_layers), c.num_experts) == (40, 10, 64)


def test_unconfirmed_values_name_real_fields():
    fields = set(Config.__dataclass_fields__)
    for name, keys in presets.UNCONFIRMED.items():
        assert name in presets.PRESETS or name in presets.ALIASES
        assert set(keys) <= fields, keys


# ----------------------------------------------------------------------- rejections
@pytest.mark.parametrize("changes, field", [
    ({"model_type": "llama"}, "model_type"),
    ({"num_attention_heads": 5}, "num_attention_heads"),  # 16 % 5
    ({"num_key_value_heads": 3}, "num_key_value_heads"),  # 4 % 3
    ({"layer_types": ["conv", "full_attention"]}, "layer_types"),  # wrong length
    ({"layer_types": ["conv", "sliding_attention", "conv"]}, "layer_types[1]"),
    ({"hidden_size": -16}, "hidden_size"),
    ({"vocab_size": "50"}, "vocab_size"),
    ({"norm_eps": 0}, "norm_eps"),
    ({"conv_bias": "yes"}, "conv_bias"),
    ({"full_attn_idxs": [7], "layer_types": None}, "full_attn_idxs"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_parameters.rope_type"),
    ({"eos_token_id": "x"}, "eos_token_id"),
    ({"hidden_size": 12, "num_attention_heads": 4}, "num_attention_heads"),  # odd head_dim 3
])
def test_bad_dense_configs_name_the_field(changes, field):
    with pytest.raises(lfm2np.Lfm2npError, match=f"'{field.replace('[', '.').replace(']', '.')}"):
        Config.from_dict(base_dense(**changes), source="cfg.json")


@pytest.mark.parametrize("changes, field", [
    ({"num_experts_per_tok": 5}, "num_experts_per_tok"),
    ({"num_dense_layers": 4}, "num_dense_layers"),
    ({"num_experts": 0}, "num_experts"),
    ({"routed_scaling_factor": -1.0}, "routed_scaling_factor"),
])
def test_bad_moe_configs_name_the_field(changes, field):
    with pytest.raises(lfm2np.Lfm2npError, match=f"'{field}'"):
        Config.from_dict(base_moe(**changes))


@pytest.mark.parametrize("missing", ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                     "num_key_value_heads", "intermediate_size", "model_type"])
def test_missing_dense_fields_are_named(missing):
    d = base_dense()
    del d[missing]
    with pytest.raises(lfm2np.Lfm2npError, match=f"'{missing}'.*missing"):
        Config.from_dict(d)


@pytest.mark.parametrize("missing", ["num_experts", "num_experts_per_tok", "moe_intermediate_size"])
def test_missing_moe_fields_are_named(missing):
    d = base_moe()
    del d[missing]
    with pytest.raises(lfm2np.Lfm2npError, match=f"'{missing}'.*missing"):
        Config.from_dict(d)


def test_errors_name_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(base_dense(num_attention_heads=5)))
    with pytest.raises(lfm2np.Lfm2npError, match=str(path)):
        lfm2np.load_config(path)
    path.write_text("{not json")
    with pytest.raises(lfm2np.Lfm2npError, match="corrupt JSON config"):
        lfm2np.load_config(path)
    with pytest.raises(lfm2np.Lfm2npError, match="no config.json"):
        lfm2np.load_config(_empty(tmp_path))
    with pytest.raises(lfm2np.Lfm2npError, match="neither a config.json.*presets: LFM2-350M"):
        lfm2np.load_config("LFM3-1T")


def _empty(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    return d


def test_replace_revalidates():
    c = Config.from_dict(base_dense())
    assert c.replace(num_key_value_heads=1).kv_groups == 4
    with pytest.raises(lfm2np.Lfm2npError, match="num_key_value_heads"):
        c.replace(num_key_value_heads=3)


def test_configs_are_frozen():
    c = Config.from_dict(base_dense())
    with pytest.raises(AttributeError):
        c.hidden_size = 32  # type: ignore[misc]

