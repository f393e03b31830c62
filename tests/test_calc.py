"""Parameter, FLOP and memory calculators (lfm2np.calc) and their CLI (lfm2np params / memory).

Expected values come from independent sources: the loader's tensor list (weights.expected_tensors), the
model cards (presets.MODEL_CARD_PARAMS), and laws the numbers must obey (scaling with context, parallel
sequences, layer kinds).
"""

import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lfm2np import Lfm2npError, calc, cli, expected_tensors, load_config, presets
from tools_loader import load_tool
from lfm2np.config import ATTENTION, CONV, Config

ROOT = Path(__file__).resolve().parent.parent


def n_params(c):
    return sum(math.prod(s) for s in expected_tensors(c).values())


# ================================================================================ parameters
@pytest.mark.parametrize("name", presets.names())
def test_total_equals_the_loaders_tensors(name):
    c = load_config(name)
    p = calc.param_counts(c)
    assert p["total"] == n_params(c)
    b = p["breakdown"]
    assert p["total"] == b["embedding"] + b["final_norm"] + b["lm_head"] + b["dense_head"] + sum(
        l["total"] for l in b["layers"]) + b.get("vision_tower", 0) + b.get("projector", 0)  # LFM2-VL: counted apart
    kinds = b["by_kind"]
    assert p["total"] == (b["embedding"] + b["lm_head"] + b["dense_head"] + kinds["conv_mixer"]["params"]
                          + kinds["attention_mixer"]["params"] + kinds["dense_ffn"]["params"]
                          + kinds["moe_ffn"]["params"] + kinds["norms"]["params"]
                          + b.get("vision_tower", 0) + b.get("projector", 0))
    assert (b["dense_head"] == 0) == (not c.dense_out)  # the embedding head's projection (ColBERT: 1024 -> 128)


@pytest.mark.parametrize("name", [n for n, v in presets.MODEL_CARD_PARAMS.items() if isinstance(v, int)])
def test_exact_model_card_counts(name):
    p = calc.param_counts(load_config(name))
    assert p["total"] == presets.MODEL_CARD_PARAMS[name]
    assert p["active"] == p["total"]  # dense: every parameter is active


def test_moe_model_cards_total_and_active():
    p8 = calc.param_counts(load_config("LFM2-8B-A1B"))
    # the card's figures are truncated to one decimal: 8.34B -> "8.3B", 1.558B -> "1.5B"
    assert math.floor(p8["total"] / 1e8) == 83 and math.floor(p8["active"] / 1e8) == 15
    p24 = calc.param_counts(load_config("LFM2-24B-A2B"))
    assert round(p24["total"] / 1e9) == 24 and math.floor(p24["active"] / 1e8) == 23
    assert round(calc.param_counts(load_config("LFM2.5-1.2B"))["total"] / 1e9, 2) == 1.17


def test_active_counts_k_of_e_experts():
    c = load_config("tiny-moe")
    p = calc.param_counts(c)
    per_expert = 3 * c.hidden_size * c.moe_intermediate_size
    idle = (c.num_experts - c.num_experts_per_tok) * per_expert * len(c.moe_layers)
    assert p["total"] - p["active"] == idle
    assert p["active"] - p["active_without_embedding"] == c.vocab_size * c.hidden_size


def test_untied_head_is_counted():
    c = load_config("LFM2-350M").replace(tie_word_embeddings=False)
    p = calc.param_counts(c)
    assert p["total"] == n_params(c) == 354_483_968 + c.vocab_size * c.hidden_size
    assert p["total_without_embedding"] == 354_483_968 - c.vocab_size * c.hidden_size


@st.composite
def configs(draw):
    moe = draw(st.booleans())
    n = draw(st.integers(1, 6))
    heads = draw(st.sampled_from([1, 2, 4]))
    kv = draw(st.sampled_from([g for g in (1, 2, 4) if heads % g == 0]))
    hd = draw(st.sampled_from([2, 4, 8]))
    d = {"model_type": "lfm2_moe" if moe else "lfm2", "vocab_size": draw(st.integers(1, 50)),
         "hidden_size": heads * hd, "num_hidden_layers": n, "num_attention_heads": heads,
         "num_key_value_heads": kv, "intermediate_size": draw(st.integers(3, 40)),
         "layer_types": draw(st.lists(st.sampled_from([CONV, ATTENTION]), min_size=n, max_size=n)),
         "conv_L_cache": draw(st.integers(1, 4)), "conv_bias": draw(st.booleans()),
         "tie_word_embeddings": draw(st.booleans()), "eos_token_id": 0, "bos_token_id": 0, "pad_token_id": 0}
    if moe:
        e = draw(st.integers(1, 5))
        d.update(num_experts=e, num_experts_per_tok=draw(st.integers(1, e)),
                 moe_intermediate_size=draw(st.integers(1, 9)), num_dense_layers=draw(st.integers(0, n)),
                 use_expert_bias=draw(st.booleans()))
    else:
        d.update(block_auto_adjust_ff_dim=draw(st.booleans()), block_multiple_of=draw(st.sampled_from([1, 8])))
    return Config.from_dict(d)


@settings(max_examples=60, deadline=None)
@given(configs())
def test_any_config_total_matches_tensors(c):
    p = calc.param_counts(c)
    assert p["total"] == n_params(c)
    assert p["active"] <= p["total"]
    assert (p["active"] == p["total"]) == (not c.moe_layers or c.num_experts_per_tok == c.num_experts)


# ===================================================================================== FLOPs
def _matmul_params(c):
    """Parameters that take part in a matmul for one token (k experts), from the loader's tensor list."""
    total = 0
    for name, shape in expected_tensors(c).items():
        if name.endswith(("norm.weight", "layernorm.weight", "expert_bias")) or "embed_tokens" in name \
                or name.endswith("bias") or name == "lm_head.weight":
            continue
        if ".experts." in name:
            total += math.prod(shape) * c.num_experts_per_tok / c.num_experts
        else:
            total += math.prod(shape)
    return total


@pytest.mark.parametrize("name", ["LFM2-350M", "LFM2-8B-A1B", "tiny-moe"])
def test_decode_flops_are_two_per_weight_plus_attention(name):
    c = load_config(name)
    f = calc.flops(c, 100)["decode"]
    attn = 4 * c.num_attention_heads * c.head_dim * 101 * len(c.attention_layers)
    head = 2 * c.vocab_size * c.hidden_size
    assert f["active"] == 2 * _matmul_params(c) + attn + head


def test_moe_total_flops_run_every_expert():
    c = load_config("LFM2-24B-A2B")
    f = calc.flops(c, 10)["decode"]
    idle = (c.num_experts - c.num_experts_per_tok) * 3 * c.hidden_size * c.moe_intermediate_size
    assert f["total"] - f["active"] == 2 * idle * len(c.moe_layers)
    d = calc.flops(load_config("LFM2-1.2B"), 10)["decode"]
    assert d["total"] == d["active"]


def test_flops_grow_with_context_only_through_attention():
    c = load_config("LFM2-1.2B")
    step = 4 * c.num_attention_heads * c.head_dim * len(c.attention_layers)
    assert calc.flops(c, 201)["decode"]["total"] - calc.flops(c, 200)["decode"]["total"] == step
    # prefill(N) - prefill(N-1) = one more token's matmuls + attention over N positions
    p = {n: calc.flops(c, n)["prefill"]["total"] for n in (99, 100)}
    mm = calc.flops(c, 1)["prefill"]["total"] - step - 2 * c.vocab_size * c.hidden_size
    assert p[100] - p[99] == mm + step * 100
    all_logits = calc.flops(c, 100, logits="all")["prefill"]["total"]
    assert all_logits - p[100] == 99 * 2 * c.vocab_size * c.hidden_size


# ==================================================================================== memory
def test_float_checkpoint_bytes():
    c = load_config("LFM2-350M")
    assert calc.weight_bytes(c, "float32") == 4 * 354_483_968
    assert calc.weight_bytes(c, "bf16") == calc.weight_bytes(c, "float16") == 2 * 354_483_968


@pytest.mark.parametrize("name", presets.RELEASED)
def test_kv_cache_counts_attention_layers_only(name):
    c = load_config(name)
    full = calc.attention_only(c)
    per_tok = calc.kv_bytes_per_token(c, "f16")
    assert per_tok > 0  # the gguf-parser-go bug: zero KV read from conv layer 0
    assert per_tok * c.num_hidden_layers == calc.kv_bytes_per_token(full, "f16") * len(c.full_attention_layers)
    assert per_tok == len(c.full_attention_layers) * 2 * c.num_key_value_heads * c.head_dim * 2
    assert calc.kv_bytes_per_token(c, "f32") == 2 * per_tok
    assert calc.kv_bytes_per_token(c, "q8_0") == per_tok * 34 // 64  # 34 bytes per 32 values


def test_kv_cache_scales_with_context_and_parallel():
    c = load_config("LFM2-8B-A1B")
    one = calc.kv_cache_bytes(c, 1000, 1)
    assert calc.kv_cache_bytes(c, 4000, 3) == 12 * one == 12 * 1000 * calc.kv_bytes_per_token(c)


def test_conv_state_is_l_minus_1_columns_and_constant_in_context():
    c = load_config("LFM2-1.2B")
    assert calc.conv_state_bytes(c) == len(c.conv_layers) * (c.conv_L_cache - 1) * c.hidden_size * 4
    assert calc.conv_state_bytes(c, 5) == 5 * calc.conv_state_bytes(c)
    assert calc.conv_state_bytes(calc.attention_only(c)) == 0
    a, b = (calc.memory(c, "Q8_0", context=n)["conv_state_bytes"] for n in (10, 100_000))
    assert a == b


def test_hybrid_savings_at_4k_32k_128k():
    c = load_config("LFM2-24B-A2B")
    rows = calc.hybrid_savings(c)
    assert [r["context"] for r in rows] == [4096, 32768, 131072]
    for r in rows:
        assert r["attention_only_bytes"] == r["context"] * 40 * 2 * 8 * 64 * 2
        assert r["saved_bytes"] == r["attention_only_bytes"] - r["hybrid_bytes"] > 0
    assert rows[-1]["ratio"] > rows[0]["ratio"]  # the constant conv state matters less at long context


def test_compute_buffer_estimate_grows_with_chunk_and_without_flash_attention():
    c = load_config("LFM2-1.2B")
    a = calc.compute_buffer_bytes(c, 256, 4096)
    assert calc.compute_buffer_bytes(c, 512, 4096) > a
    no_fa = calc.compute_buffer_bytes(c, 256, 4096, flash_attention=False)
    assert no_fa - a >= 4 * 256 * c.num_attention_heads * 4096 - 4 * 256 * 3 * c.ffn_dim


def test_memory_total_and_budget():
    c = load_config("LFM2-24B-A2B")
    m = calc.memory(c, "Q4_K_M", context=32768, budget=calc.parse_bytes("32GB"))
    assert m["total_bytes"] == m["weights_bytes"] + m["kv_cache_bytes"] + m["conv_state_bytes"] + m["compute_bytes"]
    assert m["fits"] is True
    assert calc.memory(c, "F16", context=4096, budget=32 * 10**9)["fits"] is False
    assert calc.memory(c, "Q4_0")["fits"] is None


def test_max_context_is_the_boundary():
    c = load_config("LFM2-350M")
    budget = 400 * 10**6
    n = calc.max_context(c, "Q8_0", budget)
    assert calc.memory(c, "Q8_0", context=n)["total_bytes"] <= budget
    assert calc.memory(c, "Q8_0", context=n + 1)["total_bytes"] > budget
    assert calc.max_context(c, "F16", budget) == 0


def test_parse_bytes_units():
    assert calc.parse_bytes("32GB") == 32 * 10**9
    assert calc.parse_bytes("32 GiB") == 32 * 2**30
    assert calc.parse_bytes("1.5tb") == 1_500_000_000_000
    assert calc.parse_bytes("123") == 123
    with pytest.raises(Lfm2npError, match="32 GX"):
        calc.parse_bytes("32 GX")


@pytest.mark.parametrize("call, bad", [
    (lambda c: calc.kv_bytes_per_token(c, "q3"), "q3"),
    (lambda c: calc.weight_bytes(c, "int4"), "int4"),
    (lambda c: calc.kv_cache_bytes(c, 0), "context"),
    (lambda c: calc.conv_state_bytes(c, -1), "parallel"),
])
def test_errors_name_the_bad_value(call, bad):
    with pytest.raises(Lfm2npError, match=bad):
        call(load_config("tiny-dense"))


# ======================================================================================= CLI
def run(capsys, *argv):
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_params_table(capsys):
    code, out, _ = run(capsys, "params", "LFM2-350M")
    assert code == 0
    assert "354,483,968" in out and "conv mixers (10 layers)" in out and "attention mixers (6 layers)" in out


def test_cli_params_json(capsys, tmp_path):
    code, out, _ = run(capsys, "params", "LFM2-8B-A1B", "--json")
    d = json.loads(out)
    p = calc.param_counts(load_config("LFM2-8B-A1B"))
    for key in ("total", "active", "active_without_embedding", "embedding", "breakdown"):
        assert d[key] == p[key]
    # a config.json path works the same as the preset
    path = tmp_path / "config.json"
    path.write_text(json.dumps(presets.PRESETS["LFM2-8B-A1B"]))
    code, out, _ = run(capsys, "params", str(path), "--json")
    assert json.loads(out)["total"] == p["total"]
    code, out, _ = run(capsys, "params", str(tmp_path), "--layers")
    assert code == 0 and "full_attention +moe" in out


def test_cli_memory_json(capsys):
    code, out, _ = run(capsys, "memory", "LFM2-24B-A2B", "--quant", "q8_0", "--context", "8192",
                       "--parallel", "2", "--kv-type", "q8_0", "--budget", "32GB", "--json")
    d = json.loads(out)
    c = load_config("LFM2-24B-A2B")
    assert d["quant"] == "Q8_0"
    assert d["weights_bytes"] == calc.weight_bytes(c, "Q8_0")
    assert d["kv_bytes_per_token"] == calc.kv_bytes_per_token(c, "q8_0")
    assert d["kv_cache_bytes"] == 8192 * 2 * d["kv_bytes_per_token"]
    assert d["conv_state_bytes"] == 2 * calc.conv_state_bytes(c)
    assert d["total_bytes"] >= d["weights_bytes"] + d["kv_cache_bytes"] + d["conv_state_bytes"]
    assert d["fits"] is True


def test_cli_memory_table(capsys):
    code, out, _ = run(capsys, "memory", "LFM2-24B-A2B", "--quant", "F16", "--budget", "32GiB")
    assert code == 0
    assert "does NOT fit" in out and "KV cache" in out and "conv state" in out and "all-attention" in out


def test_the_supported_context_is_the_cards_not_the_configs(capsys):
    # LFM2-24B-A2B: its config allows 128,000 positions, its card supports 32,768; in 32 GB, memory alone
    # would allow far more than either
    c = load_config("LFM2-24B-A2B")
    assert presets.supported_context(c) == (32_768, "model card")
    assert calc.max_context(c, "Q4_K_M", 32 * 10**9) > 128_000
    assert calc.max_context(c, "Q4_K_M", 32 * 10**9, limit=32_768) == 32_768
    assert calc.max_context(c, "F16", 32 * 10**9, limit=32_768) == 0
    code, out, _ = run(capsys, "memory", "LFM2-24B-A2B", "--budget", "32GB", "--context", "131072", "--json")
    d = json.loads(out)
    assert (d["supported_context"], d["supported_context_from"], d["max_context"]) == (32_768, "model card", 32_768)
    code, out, _ = run(capsys, "memory", "LFM2-24B-A2B", "--budget", "32GB", "--context", "131072")
    assert "beyond the 32,768 tokens the model card gives as supported" in out
    # the requested 131,072 fits the budget, and the longest context is said to be the supported one, not a
    # contradiction of it
    assert "at the requested context (131,072 tokens x 1 sequence): fits," in out
    assert "longest supported context that fits: 32,768 tokens (the whole supported context)" in out
    code, out, _ = run(capsys, "params", "LFM2-24B-A2B")
    assert "supported context: 32,768 tokens (model card; the config allows 128,000 positions)" in out
    # the longest context that fits is one the same command then says fits (fused QKV counted too)
    small = load_config("LFM2-1.2B")
    for fuse in (False, True):
        budget = calc.memory(small, "Q4_K_M", context=20_000, fuse_qkv=fuse)["total_bytes"]
        n = calc.max_context(small, "Q4_K_M", budget, fuse_qkv=fuse, limit=32_768)
        assert n == 20_000 and calc.memory(small, "Q4_K_M", context=n + 1, fuse_qkv=fuse)["total_bytes"] > budget
    # a checkpoint's own config: its max_position_embeddings, said to come from the config
    assert presets.supported_context(load_config("tiny-dense").replace(source="x/config.json")) == (512, "config")


def test_unconfirmed_fields_are_shown_aliases_included(capsys):
    code, out, _ = run(capsys, "params", "LFM2-2.6B-Exp", "--json")
    d = json.loads(out)
    assert "hidden_size" in d["unconfirmed"] and d["total"] == calc.param_counts(load_config("LFM2-2.6B"))["total"]
    assert d["model_card"] == presets.MODEL_CARD_PARAMS["LFM2-2.6B"]
    # LFM2.5-2.6B is not LFM2-2.6B with new weights: its own vocabulary, RoPE base and ids, all unconfirmed
    d = json.loads(run(capsys, "params", "LFM2.5-2.6B", "--json")[1])
    assert {"vocab_size", "rope_theta", "bos_token_id"} <= set(d["unconfirmed"])
    assert d["total"] - calc.param_counts(load_config("LFM2-2.6B"))["total"] == (128_000 - 65_536) * 2048
    code, out, _ = run(capsys, "params", "LFM2-24B-A2B")
    assert "unconfirmed (third-party copies of the config): layer_types" in out
    assert json.loads(run(capsys, "params", "LFM2-350M", "--json")[1])["unconfirmed"] == []


def _continuation(lines, at):
    """The lines that continue table row ``at`` (its last column wrapped): they start with spaces."""
    out = []
    for x in lines[at + 1:]:
        if not x.startswith(" "):
            break
        out.append(x)
    return out


def test_the_kv_line_of_a_sliding_model_multiplies_out(capsys):
    c = load_config("LFM3-1.7B")
    code, out, _ = run(capsys, "memory", "LFM3-1.7B", "--context", "131072", "--parallel", "2")
    lines = out.splitlines()
    at = next(i for i, x in enumerate(lines) if x.startswith("KV cache"))
    line = " ".join([lines[at].rstrip()] + [x.strip() for x in _continuation(lines, at)])  # the row, unwrapped
    per_token = calc.kv_bytes_per_token(c)
    row = per_token // len(c.full_attention_layers)
    assert (f"{per_token:,} B/token ({len(c.full_attention_layers)} full-attention layers) x 131,072 + "
            f"{len(c.sliding_layers)} sliding layers x {c.sliding_window:,} positions x {row:,} B x 2 sequences") in line
    assert f"{(per_token * 131072 + len(c.sliding_layers) * c.sliding_window * row) * 2:,}" in line


@pytest.mark.parametrize("argv, bad", [
    (["memory", "LFM2-350M", "--quant", "Q4_K_X"], "Q4_K_X"),
    (["memory", "LFM2-350M", "--budget", "lots"], "lots"),
    (["memory", "LFM2-350M", "--kv-type", "q2"], "q2"),
    (["memory", "LFM2-350M", "--context", "0"], "context"),
    (["params", "no-such-model"], "no-such-model"),
])
def test_cli_errors_print_one_line_and_exit_2(capsys, argv, bad):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and bad in err


# ================================================================================= the docs
def test_family_table_is_up_to_date():
    committed = (ROOT / "docs" / "family.md").read_text(encoding="utf-8")
    assert committed == load_tool("make_family_table").family_markdown(), "docs/family.md is stale: run python tools/make_family_table.py"


def test_numpy_integers_are_accepted_where_ints_are():
    """Calculators are called from notebooks with NumPy arrays of contexts."""
    import numpy as np

    c = load_config("LFM2-350M")
    assert calc.kv_cache_bytes(c, np.int64(4096), np.int32(2), "f16") == calc.kv_cache_bytes(c, 4096, 2, "f16")
    with pytest.raises(Lfm2npError, match="context"):
        calc.kv_cache_bytes(c, np.float64(4096.0), 1, "f16")


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("name", ["tiny-moe", "tiny-dense"])
def test_float_weight_bytes_equal_a_written_checkpoint(tmp_path, name, dtype):
    """Exact against the bytes lfm2np writes (the expert bias stays float32, as in released checkpoints)."""
    from lfm2np.synthetic import random_params
    from lfm2np.io.safetensors import Checkpoint, save_checkpoint

    c = load_config(name)
    path = save_checkpoint(tmp_path / name, c, random_params(c), dtype=dtype)
    assert calc.weight_bytes(c, dtype) == Checkpoint(path).nbytes()


def test_parameter_totals_equal_the_fixture_checkpoints_on_disk():
    """For every fixture checkpoint (written by transformers' state dict): the calculator's total equals the
    number of values actually stored in its safetensors files."""
    import json
    import math

    from lfm2np.io.safetensors import Checkpoint

    golden = Path(__file__).parent / "golden"
    cases = json.loads((golden / "manifest.json").read_text())["cases"]
    assert len(cases) >= 6
    for case in cases:
        stored = sum(math.prod(info.shape) for info in Checkpoint(golden / case).tensors.values())
        assert calc.param_counts(load_config(golden / case))["total"] == stored, case
