"""What `lfm2np memory` and `lfm2np params` print for a person sizing a deployment: budgets with their unit,
llama-quantize's names, llama.cpp's limits said where they apply, verdicts that cannot be read two ways, and
lines within 100 columns."""

from __future__ import annotations

import json

import pytest

from lfm2np import calc, cli, load_config
from lfm2np.embedded import embedded_model_path


def run(capsys, *argv):
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def memory_json(capsys, *argv):
    code, out, err = run(capsys, "memory", *argv, "--json")
    assert code == 0, err
    return json.loads(out)


@pytest.mark.parametrize("text, bytes_", [("8G", 8 * 2**30), ("8g", 8 * 2**30), ("8GiB", 8 * 2**30),
                                          ("8 gib", 8 * 2**30), ("8GB", 8 * 10**9), ("512M", 512 * 2**20),
                                          ("1.5T", int(1.5 * 2**40))])
def test_a_budget_is_read_with_its_unit(capsys, text, bytes_):
    for option in ("--budget", "--memory-budget"):
        assert memory_json(capsys, "LFM2-350M", option, text)["budget_bytes"] == bytes_
    code, out, _ = run(capsys, "memory", "LFM2-350M", "--budget", text)
    assert f"budget {text.strip()} = {calc.format_bytes(bytes_)}" in out  # the reading is shown


@pytest.mark.parametrize("text", ["8", "32", "0.5", " 8 "])
def test_a_bare_number_is_refused_naming_both_readings(capsys, text):
    code, out, err = run(capsys, "memory", "LFM2-350M", "--budget", text)
    assert code == 2 and out == ""
    assert "has no unit, so it could be bytes or GiB" in err and f"{text.strip()}G" in err and "GB" in err


@pytest.mark.parametrize("alias, means", [("Q4_K", "Q4_K_M"), ("q5_k", "Q5_K_M"), ("Q3_K", "Q3_K_M")])
def test_llama_quantizes_aliases_are_its_mixtures(capsys, alias, means):
    c = load_config("LFM2-1.2B")
    d = memory_json(capsys, "LFM2-1.2B", "--quant", alias)
    assert d["quant"] == means and d["weights_bytes"] == calc.weight_bytes(c, means)
    assert calc.weight_bytes(c, alias) == calc.weight_bytes(c, means)
    assert any(f"alias of {means}" in n for n in d["notes"])


@pytest.mark.parametrize("name", ["IQ4_XS", "iq2_xxs", "TQ1_0"])
def test_a_type_lfm2np_cannot_size_is_refused_by_name_with_the_list(capsys, name):
    code, out, err = run(capsys, "memory", "LFM2-350M", "--quant", name)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert f"'{name}' is a llama-quantize type lfm2np cannot size" in err
    assert "Q4_K_M" in err and "Q4_K (= Q4_K_M)" in err


def test_a_quantised_v_cache_without_flash_attention_is_noted(capsys):
    def notes(*argv):
        return [n for n in memory_json(capsys, "LFM2-1.2B", *argv)["notes"] if "flash attention" in n]

    assert notes("--kv-type", "q8_0", "--no-flash-attn") and notes("--kv-type", "q4_0", "--no-flash-attn")
    assert not notes("--kv-type", "q8_0") and not notes("--kv-type", "f16", "--no-flash-attn")
    code, out, _ = run(capsys, "memory", "LFM2-1.2B", "--kv-type", "q8_0", "--no-flash-attn")
    assert "note: llama.cpp refuses a quantised V cache (q8_0) without flash attention" in out


def test_lfm3_gguf_sizes_say_llama_cpp_has_no_lfm3(capsys):
    gguf = memory_json(capsys, "LFM3-1.7B", "--quant", "Q4_K_M")["notes"]
    assert any("llama.cpp has no LFM3 architecture yet" in n and "0.3.36" in n for n in gguf)
    assert not any("LFM3" in n for n in memory_json(capsys, "LFM3-1.7B", "--quant", "bfloat16")["notes"])
    assert not any("LFM3" in n for n in memory_json(capsys, "LFM2-1.2B", "--quant", "Q4_K_M")["notes"])


def test_the_verdict_at_the_requested_context_and_the_longest_context_are_told_apart(capsys):
    c = load_config("LFM2-1.2B")
    budget = calc.memory(c, "Q4_K_M", context=20_000)["total_bytes"]
    code, out, _ = run(capsys, "memory", "LFM2-1.2B", "--context", "30000", "--budget", f"{budget}B")
    assert "at the requested context (30,000 tokens x 1 sequence): does NOT fit," in out
    assert "longest supported context that fits: 20,000 tokens (of the 32,768 supported)" in out
    code, out, _ = run(capsys, "memory", "LFM2-1.2B", "--context", "10000", "--budget", f"{budget}B")
    assert "at the requested context (10,000 tokens x 1 sequence): fits," in out


def test_when_no_context_fits_it_says_what_does_not(capsys):
    code, out, _ = run(capsys, "memory", "LFM2-24B-A2B", "--quant", "F16", "--budget", "32GiB")
    assert code == 0 and "0 tokens" not in out
    w = calc.weight_bytes(load_config("LFM2-24B-A2B"), "F16")
    assert f"no context fits the budget: the weights alone ({calc.format_bytes(w)}) are " \
           f"{calc.format_bytes(w - 32 * 2**30)} over it" in " ".join(out.split())
    # weights within the budget, the rest not: named as such
    c = load_config("LFM2-350M")
    budget = calc.weight_bytes(c, "Q8_0") + 1000
    code, out, _ = run(capsys, "memory", "LFM2-350M", "--quant", "Q8_0", "--budget", f"{budget}B")
    assert "no context fits the budget: the weights, conv state and compute buffer need" in " ".join(out.split())


@pytest.mark.parametrize("argv", [
    ["memory", "LFM3-1.7B", "--context", "131072", "--parallel", "2", "--quant", "F16", "--budget", "8G"],
    ["memory", "LFM2-24B-A2B", "--quant", "F16", "--budget", "32GiB", "--kv-type", "q8_0", "--no-flash-attn"],
    ["memory", "LFM2-24B-A2B", "--context", "128000", "--budget", "32GB"],
    ["params", "LFM2-24B-A2B", "--layers"], ["params", "LFM2.5-350M"], ["params", "embedded", "--layers"]])
def test_lines_stay_within_100_columns(capsys, argv):
    code, out, _ = run(capsys, *argv)
    assert code == 0 and out.count("\n") > 8
    assert max(len(line) for line in out.splitlines()) <= 100, max(out.splitlines(), key=len)


def test_params_of_the_embedded_model_shows_its_name_and_counts_in_the_singular(capsys):
    code, out, _ = run(capsys, "params", "embedded")
    assert code == 0
    assert out.startswith("embedded tiny-lfm2-moe (lfm2_moe): 6 layers") and str(embedded_model_path()) not in out
    assert "dense FFN (1 layer)" in out and "(1 layers)" not in out
    assert "MoE FFN (5 layers)" in out


def test_params_layers_takes_a_list_like_golden(capsys):
    def rows(*layers):
        code, out, err = run(capsys, "params", "LFM2-350M", "--layers", *layers)
        assert code == 0, err
        table = out.split("\n\n")[1].splitlines()
        assert table[0].split()[0] == "layer"
        return [int(r.split()[0]) for r in table[1:]]

    assert rows() == list(range(16))  # --layers alone: every layer, as before
    assert rows("0,2") == rows("0", "2") == rows("2", "0") == [0, 2]
    assert rows("3,1", "15") == [1, 3, 15]
    code, out, err = run(capsys, "params", "LFM2-350M", "--layers", "16")
    assert code == 2 and "--layers 16: the model has 16 layers (0..15)" in err
