"""One vocabulary of options across the commands: each alias gives exactly what its long spelling gives
(MODEL or -m, --text/-p/--prompt, id and layer lists with spaces or commas, -n, -c, --memory-budget/--budget),
and generate, chat and demo share one default --max-new-tokens."""

from __future__ import annotations

import json
import re

import pytest

from lfm2np.cli import build_parser, main
from lfm2np.embedded import embedded_model_path
from lfm2np.io.tokenizer import Tokenizer

TEXT = 'The "for" statement'


def out_of(capsys, argv):
    status = main(argv)
    captured = capsys.readouterr()
    assert status == 0, captured.err
    return re.sub(r"[0-9.]+ (s|tokens/s)\b", "", captured.out)  # forward prints its speed


def refused(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lfm2np: error:")
    return err[0]


@pytest.mark.parametrize("spelling", ["--text", "-p", "--prompt"])
def test_text_is_one_option_with_its_aliases(capsys, spelling):
    want = out_of(capsys, ["generate", "embedded", "--text", TEXT, "-n", "8"])
    assert out_of(capsys, ["generate", "embedded", spelling, TEXT, "--max-new-tokens", "8"]) == want
    assert out_of(capsys, ["demo", spelling, TEXT, "-n", "8", "--no-walk"]).endswith(want.splitlines()[-1] + "\n")
    ids = Tokenizer.from_dir(embedded_model_path()).encode(TEXT, add_bos=True)
    forward = out_of(capsys, ["forward", "embedded", "--ids", *map(str, ids)])
    assert out_of(capsys, ["forward", "embedded", spelling, TEXT]) == forward


def test_id_lists_take_spaces_and_commas(capsys):
    want = out_of(capsys, ["forward", "embedded", "--ids", "1", "5", "9", "42"])
    for ids in (["1,5,9,42"], ["1,5", "9", "42"], ["1, 5,9", "42"]):
        assert out_of(capsys, ["forward", "embedded", "--ids", *ids]) == want
    assert "'x' is not an integer" in refused(capsys, ["forward", "embedded", "--ids", "1,x"])
    assert "--ids" in refused(capsys, ["forward", "embedded", "--ids", "1,-2"])


def test_golden_layers_take_spaces_and_commas(capsys, tmp_path):
    def written(*layers):
        out = tmp_path / "-".join(layers or ("all",)).replace(",", "_")
        assert main(["golden", "embedded", "--ids", "1,5,9", "--out", str(out), "--layers", *layers]) == 0
        capsys.readouterr()
        return json.loads((out / "manifest.json").read_text())["layers"]

    assert written("0,2") == written("0", "2") == [0, 2]
    assert written() == list(range(6))  # --layers alone: every layer


@pytest.mark.parametrize("argv", [["forward", "{}", "--ids", "1", "2"], ["params", "{}"], ["memory", "{}", "--json"],
                                  ["diagnose", "{}", "--catalogue"]])
def test_m_is_the_model_as_an_option(capsys, argv):
    model = "embedded" if argv[0] != "memory" else "LFM2-350M"
    positional = [model if a == "{}" else a for a in argv]
    option = [a for a in argv if a != "{}"] + ["-m", model]
    assert out_of(capsys, option) == out_of(capsys, positional)
    assert out_of(capsys, [a for a in argv if a != "{}"] + ["--model", model]) == out_of(capsys, positional)
    assert "the model is given twice" in refused(capsys, positional + ["-m", "LFM2-1.2B"])
    assert "required: model" in refused(capsys, [a for a in argv if a != "{}"])


def test_generate_chat_and_demo_share_one_default_and_n(capsys):
    parser = build_parser()
    defaults = {name: parser.commands[name].get_default("max_new_tokens") for name in ("generate", "chat", "demo")}
    assert len(set(defaults.values())) == 1 and defaults["generate"] == 256
    assert out_of(capsys, ["generate", "embedded", "-p", TEXT, "-n", "5"]) == \
        out_of(capsys, ["generate", "embedded", "-p", TEXT, "--max-new-tokens", "5"])


def test_c_is_the_context_for_memory_and_the_window_for_perplexity(capsys, tmp_path):
    assert out_of(capsys, ["memory", "LFM2-350M", "-c", "8192"]) == \
        out_of(capsys, ["memory", "LFM2-350M", "--context", "8192"])
    text = tmp_path / "t.txt"
    text.write_text('The "for" statement is used to iterate over the elements of a sequence.\n' * 3)
    want = out_of(capsys, ["perplexity", "embedded", str(text), "--window", "16", "--json", "--quiet"])
    assert json.loads(want)["window"] == 16
    assert out_of(capsys, ["perplexity", "embedded", str(text), "-c", "16", "--json", "--quiet"]) == want


def test_memory_budget_is_one_spelling_everywhere(capsys):
    assert out_of(capsys, ["memory", "LFM2-350M", "--budget", "8G", "--json"]) == \
        out_of(capsys, ["memory", "LFM2-350M", "--memory-budget", "8G", "--json"])
    want = out_of(capsys, ["forward", "embedded", "--ids", "1", "2"])
    for budget in ("1G", "1g", "0", "all", "500MB"):
        assert out_of(capsys, ["forward", "embedded", "--ids", "1", "2", "--memory-budget", budget]) == want
    assert "has no unit" in refused(capsys, ["forward", "embedded", "--memory-budget", "8"])
