"""llama.cpp's per-tensor GGUF types for LFM2 (lfm2np.quant): one test per rule, and real file sizes.

Independent sources for the expected values: gguf-py's GGML_QUANT_SIZES (block sizes), src/llama-quant.cpp
(the rules, applied by hand to small cases below) and the sizes of published GGUF files.
"""

import math

import pytest

from lfm2np import Lfm2npError, load_config, presets
from lfm2np.calc import quant
from lfm2np.calc.published import PUBLISHED_GGUF_SIZES
from lfm2np.io.gguf_names import gguf_tensors
from lfm2np.config import ATTENTION


def types(model, ftype, **kw):
    return quant.tensor_types(load_config(model) if isinstance(model, str) else model, ftype, **kw)


# ------------------------------------------------------------------------------ block sizes
def test_block_sizes_are_gguf_py_values():
    # (block, bytes) as printed by gguf-py's GGML_QUANT_SIZES with QK_K = 256
    expected = {"F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "Q4_0": (32, 18), "Q4_1": (32, 20),
                "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34), "Q2_K": (256, 84), "Q3_K": (256, 110),
                "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210)}
    assert quant.GGML_BLOCK == expected


def test_tensor_bytes_counts_whole_blocks_per_row():
    assert quant.tensor_bytes("Q4_K", (512, 3)) == 3 * 2 * 144
    assert quant.tensor_bytes("Q8_0", (64, 2, 5)) == 10 * 2 * 34
    with pytest.raises(Lfm2npError, match="100"):
        quant.row_bytes("Q4_0", 100)


# --------------------------------------------------------------------------- GGUF tensor list
@pytest.mark.parametrize("name", presets.names())
def test_gguf_tensors_hold_every_parameter(name):
    """Every parameter of the text model (LFM2-VL: the vision tower and projector are the mmproj file's)."""
    c = load_config(name)
    from lfm2np import calc
    counts = calc.param_counts(c)
    assert sum(t.n_elements for t in gguf_tensors(c)) == counts.get("text", counts["total"])
    if "text" in counts:
        assert counts["text"] + counts["vision_tower"] + counts["projector"] == counts["total"]


def test_gguf_tensor_shapes_follow_the_conversion():
    t = {x.name: x.ne for x in gguf_tensors(load_config("LFM2-8B-A1B"))}
    assert t["blk.0.shortconv.conv.weight"] == (3, 2048)  # [D, 1, L] squeezed, ggml order
    assert t["blk.3.ffn_gate_exps.weight"] == (2048, 1792, 32)  # experts stacked
    assert t["blk.3.ffn_down_exps.weight"] == (1792, 2048, 32)
    assert t["blk.3.exp_probs_b.bias"] == (32,)
    assert "blk.0.ffn_gate_exps.weight" not in t and t["blk.0.ffn_down.weight"] == (7168, 2048)
    assert "output.weight" not in t  # tied


# ------------------------------------------------------------------- rule 1: never quantised
@pytest.mark.parametrize("ftype", ["Q4_0", "Q4_K_M", "Q8_0", "F16", "BF16"])
def test_norms_conv_kernel_router_and_bias_stay_f32(ftype):
    ty = types("LFM2-8B-A1B", ftype)
    for name in ("token_embd_norm.weight", "blk.0.attn_norm.weight", "blk.2.attn_q_norm.weight",
                 "blk.0.shortconv.conv.weight", "blk.3.ffn_gate_inp.weight", "blk.3.exp_probs_b.bias"):
        assert ty[name] == "F32", name


# --------------------------------------------------------------- rule 2: tied embedding/output
def test_tied_embedding_takes_the_output_rule():
    assert types("LFM2-350M", "Q4_0")["token_embd.weight"] == "Q6_K"
    assert types("LFM2-350M", "Q4_K_M")["token_embd.weight"] == "Q6_K"
    assert types("LFM2-350M", "Q8_0")["token_embd.weight"] == "Q8_0"  # Q8_0 default is kept
    assert types("LFM2-350M", "F16")["token_embd.weight"] == "F16"  # float file: no mixture rules


def test_untied_model_quantises_output_not_embedding():
    c = load_config("LFM2-350M").replace(tie_word_embeddings=False)
    ty = quant.tensor_types(c, "Q4_K_M")
    assert ty["output.weight"] == "Q6_K" and ty["token_embd.weight"] == "Q4_K"


def test_output_rule_uses_q8_0_when_rows_do_not_fill_default_blocks():
    c = load_config("tiny-dense").replace(hidden_size=96, num_attention_heads=6, intermediate_size=256)
    assert quant.tensor_types(c, "Q4_K_M")["token_embd.weight"] == "Q8_0"  # 96 % 256 != 0
    # Q4_0's block (32) divides 96: Q6_K is chosen, then the shape fallback turns it into Q8_0
    assert quant.tensor_types(c, "Q4_0")["token_embd.weight"] == "Q8_0"


# ------------------------------------------------------------------------ rule 3: attn_v
def test_use_more_bits_matches_llama_cpp_formula():
    # i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2, evaluated by hand from llama-quant.cpp
    assert [i for i in range(16) if quant.use_more_bits(i, 16)] == [0, 1, 4, 7, 10, 13, 14, 15]
    assert [i for i in range(6) if quant.use_more_bits(i, 6)] == [2, 5]


def test_attn_v_more_bits_counts_attention_layers_only():
    # LFM2-350M attention layers 2,5,8,10,12,14 -> attn_v #2 and #5 (layers 8 and 14) get Q6_K
    for ftype, base in (("Q4_K_M", "Q4_K"), ("Q5_K_M", "Q5_K")):
        ty = types("LFM2-350M", ftype)
        got = {i: ty[f"blk.{i}.attn_v.weight"] for i in (2, 5, 8, 10, 12, 14)}
        assert got == {2: base, 5: base, 8: "Q6_K", 10: base, 12: base, 14: "Q6_K"}


def test_attn_v_q3_k_m_and_q4_k_s_favour_the_first_layers():
    ty = types("LFM2-350M", "Q3_K_M")
    assert [ty[f"blk.{i}.attn_v.weight"] for i in (2, 5, 8)] == ["Q5_K", "Q5_K", "Q4_K"]
    ty = types("LFM2-350M", "Q4_K_S")
    assert [ty[f"blk.{i}.attn_v.weight"] for i in (2, 5, 8, 10, 12, 14)] == ["Q5_K"] * 4 + ["Q4_K"] * 2


def test_q2_k_attn_v_reads_n_gqa_from_layer_zero():
    # LFM2-1.2B has H/G = 4, but layer 0 is a conv layer: llama.cpp's n_gqa() is 0 -> Q3_K
    assert types("LFM2-1.2B", "Q2_K")["blk.2.attn_v.weight"] == "Q3_K"
    c = load_config("LFM2-1.2B")
    all_attn = c.replace(layer_types=tuple(ATTENTION for _ in range(c.num_hidden_layers)))
    assert quant.tensor_types(all_attn, "Q2_K")["blk.2.attn_v.weight"] == "Q4_K"


def test_eight_experts_bump_attn_v_and_attn_k_to_q8_0():
    c = load_config("tiny-moe").replace(hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                                        num_experts=8, moe_intermediate_size=256, intermediate_size=256)
    ty = quant.tensor_types(c, "Q4_K_M")
    assert ty["blk.2.attn_v.weight"] == "Q8_0" and ty["blk.2.attn_k.weight"] == "Q8_0"
    assert ty["blk.2.attn_output.weight"] == "Q5_K"
    ty6 = quant.tensor_types(c.replace(num_experts=6), "Q4_K_M")
    assert ty6["blk.2.attn_k.weight"] == "Q4_K" and ty6["blk.2.attn_output.weight"] == "Q4_K"


# ----------------------------------------------------------------------- rule 4: ffn_down
def test_ffn_down_more_bits_by_layer_index():
    ty = types("LFM2-350M", "Q4_K_M")
    six = [i for i in range(16) if ty[f"blk.{i}.ffn_down.weight"] == "Q6_K"]
    assert six == [0, 1, 4, 7, 10, 13, 14, 15]
    assert all(ty[f"blk.{i}.ffn_gate.weight"] == "Q4_K" for i in range(16))


def test_moe_ffn_down_index_comes_from_the_block_number():
    # 24 layers: more bits for 0,1,2, 5,8,...,20, 21,22,23; dense (0,1) and expert tensors alike
    ty = types("LFM2-8B-A1B", "Q5_K_M")
    expected = [i for i in range(24) if i < 3 or i >= 21 or (i - 3) % 3 == 2]
    got = [i for i in range(24)
           if ty.get(f"blk.{i}.ffn_down_exps.weight", ty.get(f"blk.{i}.ffn_down.weight")) == "Q6_K"]
    assert got == expected
    assert ty["blk.3.ffn_down_exps.weight"] == "Q5_K" and ty["blk.5.ffn_up_exps.weight"] == "Q5_K"


def test_ffn_down_for_low_k_quants():
    assert types("LFM2-350M", "Q2_K")["blk.7.ffn_down.weight"] == "Q3_K"
    ty = types("LFM2-350M", "Q3_K_M")  # Q5_K below n/16 = 1, else Q4_K
    assert ty["blk.0.ffn_down.weight"] == "Q5_K" and ty["blk.1.ffn_down.weight"] == "Q4_K"
    ty = types("LFM2-350M", "Q4_K_S")  # Q5_K below n/8 = 2
    assert [ty[f"blk.{i}.ffn_down.weight"] for i in range(3)] == ["Q5_K", "Q5_K", "Q4_K"]


def test_imatrix_guards_first_ffn_down_layers_of_q4_0_and_q5_0():
    assert types("LFM2-350M", "Q4_0")["blk.0.ffn_down.weight"] == "Q4_0"
    ty = types("LFM2-350M", "Q4_0", imatrix=True)
    assert [ty[f"blk.{i}.ffn_down.weight"] for i in range(3)] == ["Q4_1", "Q4_1", "Q4_0"]
    assert types("LFM2-350M", "Q5_0", imatrix=True)["blk.1.ffn_down.weight"] == "Q5_1"


# ------------------------------------------------------------------- rule 5: attn_output
def test_attn_output_for_low_k_quants():
    assert types("LFM2-350M", "Q2_K")["blk.2.attn_output.weight"] == "Q3_K"
    assert types("LFM2-350M", "Q3_K_M")["blk.2.attn_output.weight"] == "Q4_K"
    assert types("LFM2-350M", "Q3_K_L")["blk.2.attn_output.weight"] == "Q5_K"
    assert types("LFM2-350M", "Q4_K_M")["blk.2.attn_output.weight"] == "Q4_K"


# ---------------------------------------------------------------- rule 6: shape fallbacks
def test_k_quant_fallbacks_when_rows_are_not_multiples_of_256():
    # D = 96 (multiple of 32, not of 256); F = 80 (not even a multiple of 32)
    c = load_config("tiny-dense").replace(hidden_size=96, num_attention_heads=6, intermediate_size=80)
    assert quant.tensor_types(c, "Q4_K_M")["blk.0.shortconv.in_proj.weight"] == "Q5_0"
    assert quant.tensor_types(c, "Q5_K_M")["blk.0.shortconv.in_proj.weight"] == "Q5_1"
    assert quant.tensor_types(c, "Q6_K")["blk.0.shortconv.in_proj.weight"] == "Q8_0"
    assert quant.tensor_types(c, "Q4_K_M")["blk.0.ffn_down.weight"] == "F16"  # 80 % 32 != 0 either


def test_no_fallback_for_32_element_types_is_an_error():
    c = load_config("tiny-dense")  # D = 48
    with pytest.raises(Lfm2npError, match="48"):
        quant.tensor_types(c, "Q4_0")


def test_unknown_file_type_is_named():
    with pytest.raises(Lfm2npError, match="Q4_K_Q"):
        quant.tensor_types(load_config("LFM2-350M"), "Q4_K_Q")


# ------------------------------------------------------------------- real GGUF files
def test_exact_published_files_differ_by_one_constant_metadata_block():
    """Four real files (three models, three file types): the only bytes not modelled are the KV metadata
    (tokenizer etc.), which must be the same few MB in each; any wrong tensor type would shift one file by
    tens of KB or more."""
    diffs = [r["value"] - quant.gguf_file_bytes(load_config(r["model"]), r["quant"])
             for r in PUBLISHED_GGUF_SIZES if r["kind"] == "file_bytes"]
    assert len(diffs) == 4
    assert all(1_000_000 < d < 3_500_000 for d in diffs)
    assert max(diffs) - min(diffs) < 4096


def test_rounded_published_files_within_metadata_and_rounding():
    for r in PUBLISHED_GGUF_SIZES:
        if r["kind"] == "file_MB":
            mine = quant.gguf_file_bytes(load_config(r["model"]), r["quant"]) / 1e6
            assert 1.0 < r["value"] - mine < 3.5, r


def test_llama_bench_model_sizes():
    for r in PUBLISHED_GGUF_SIZES:
        if r["kind"] == "data_GiB":
            mine = quant.gguf_weight_bytes(load_config(r["model"]), r["quant"]) / 2**30
            assert round(mine, 2) == r["value"], r


def test_nominal_bits_per_weight_would_be_wrong():
    # the calculator is not params * 4.5 bits: the Q6_K embedding and F32 tensors add visibly
    c = load_config("LFM2-350M")
    nominal = sum(t.n_elements for t in gguf_tensors(c)) * 18 / 32
    assert quant.gguf_weight_bytes(c, "Q4_0") > nominal * 1.05


def test_float_file_keeps_f32_for_unquantisable_tensors():
    c = load_config("LFM2-350M")
    summary = quant.type_summary(c, "F16")
    assert set(summary) == {"F16", "F32"}
    assert summary["F16"]["bytes"] == 2 * summary["F16"]["elements"]
    assert summary["F32"]["bytes"] == 4 * summary["F32"]["elements"]
    n_conv = len(c.conv_layers)
    f32_elems = (2 * 16 + 1) * c.hidden_size + n_conv * 3 * c.hidden_size + 2 * 6 * c.head_dim
    assert summary["F32"]["elements"] == f32_elems
    assert math.isclose(summary["F16"]["elements"] + f32_elems, 354_483_968)
