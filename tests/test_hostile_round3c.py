"""Hostile inputs, the last classes of the third round: numbers written in other scripts' digits, a chat template
that refuses a later turn, expert choices a model cannot make in a backend's dump."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from lfm2np.embedded import embedded_model_path

PATH = embedded_model_path()


def run(*argv, stdin=None):
    return subprocess.run([sys.executable, "-m", "lfm2np", *argv], input=stdin, capture_output=True, text=True,
                          cwd="/")


A = "\u0663"    # ARABIC-INDIC DIGIT THREE
F = "\uff11"    # FULLWIDTH DIGIT ONE
D = "\u0967"    # DEVANAGARI DIGIT ONE


ARGVS = [
    ["forward", "embedded", "--ids", "1,{three}"],
    ["forward", "embedded", "--ids", "1", "--top", "{three}"],
    ["generate", "embedded", "--text", "hi", "--max-new-tokens", "{three}"],
    ["generate", "embedded", "--text", "hi", "--max-new-tokens", "2", "--temperature", "0.{one}"],
    ["memory", "LFM2-VL-450M", "--image", "{one}00x660"],
    ["params", "embedded", "--layers", "{one}"],
    ["diagnose", "embedded", "--dump", "{tmp}/none.npz", "--prefill", "{three}"],
]


def cli(capsys, argv):
    from lfm2np.cli import main

    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv", ARGVS, ids=lambda a: " ".join(a[:1] + a[-2:-1]))
def test_digits_of_other_scripts_are_no_number_on_the_command_line(argv, tmp_path, capsys):
    code, _, err = cli(capsys, [a.format(tmp=tmp_path, one="1", three="3") for a in argv])
    # the same command line in ASCII digits passes its arguments (diagnose's missing dump is refused later)
    assert code == 0 or "none.npz" in err, err
    for digit in (A, F, D):
        code, out, err = cli(capsys, [a.format(tmp=tmp_path, one=digit, three=digit) for a in argv])
        assert code == 2 and out == "", err
        assert err.startswith("lfm2np: error: ") and err.count("\n") == 1, err
        assert "none.npz" not in err, err  # refused as an argument, before anything is read


def test_a_template_that_refuses_a_later_turn_skips_that_message_and_the_chat_goes_on(tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(PATH, ck)
    template = (ck / "chat_template.jinja").read_text(encoding="utf-8")
    refusing = ("{% for m in messages %}{% if m['role'] == 'user' and 'forbidden' in m['content'] %}"
                "{{ raise_exception('no forbidden words') }}{% endif %}{% endfor %}") + template
    (ck / "chat_template.jinja").write_text(refusing, encoding="utf-8")
    proc = run("chat", str(ck), "--max-new-tokens", "3", stdin="hello\na forbidden word\nthanks\n")
    assert proc.returncode == 0, proc.stderr
    assert "no forbidden words" in proc.stderr and "the message was not sent" in proc.stderr
    assert proc.stdout.count("assistant: ") == 2  # "hello" and "thanks" answered, the refused turn forgotten
    assert "[turn 2:" in proc.stderr and "[turn 3:" not in proc.stderr


def test_a_template_that_refuses_the_first_turn_ends_the_chat_with_its_error(tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(PATH, ck)
    (ck / "chat_template.jinja").write_text("{{ raise_exception('this template renders nothing') }}",
                                            encoding="utf-8")
    proc = run("chat", str(ck), stdin="hello\nagain\n")
    assert proc.returncode == 2
    assert "this template renders nothing" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout.count("assistant: ") == 0


@pytest.mark.parametrize("chosen", ["beyond", "negative"])
def test_expert_choices_the_model_cannot_make_are_named_not_ranked(chosen):
    import lfm2np
    from lfm2np.oracle.diagnose import diagnose, format_diagnosis
    from lfm2np.oracle.dumps import trace_dump
    from lfm2np.oracle.report import html_report
    from lfm2np.oracle.trace import Trace, record

    model = lfm2np.load(PATH)
    ids = [1, 5, 9, 13, 20, 30]
    _, trace = record(model, ids)
    tensors = dict(trace.tensors)
    name = sorted(n for n in tensors if n.endswith(".selected_experts"))[-1]
    experts = tensors[name].copy()
    experts[3, 1] = model.config.num_experts if chosen == "beyond" else -1
    tensors[name] = experts
    d = diagnose(model, trace_dump(Trace(tensors, trace.meta), ids), only=["router-softmax", "router-no-renorm"])
    assert not d.agrees and d.nothing_reproduces
    assert len(d.impossible) == 1 and d.impossible[0].startswith(f"{name} chooses expert {experts[3, 1]} at position 3")
    assert f"impossible: {d.impossible[0]}" in format_diagnosis(d)
    assert d.to_json()["impossible"] == d.impossible
    assert "IMPOSSIBLE: " in html_report(diagnosis=d.to_json())
    # a dump whose choices are all experts the model has says nothing of the kind
    clean = diagnose(model, trace_dump(trace, ids), only=["router-softmax"])
    assert clean.agrees and clean.impossible == [] and "impossible" not in clean.to_json()


def test_the_tokenizer_loads_from_every_model_name_the_commands_take(tmp_path, monkeypatch):
    from lfm2np.io.tokenizer import Tokenizer

    assert Tokenizer.load("embedded").encode("while x:") == Tokenizer.from_dir(PATH).encode("while x:")
    # "embedded" is the shipped model even where a directory of that name exists, as lfm2np.load reads it;
    # that directory is "./embedded"
    other = tmp_path / "embedded"
    shutil.copytree(PATH, other)
    (other / "chat_template.jinja").write_text("{{ 'another template' }}", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert Tokenizer.load("embedded").source == Tokenizer.from_dir(PATH).source
    assert Tokenizer.load("./embedded").apply_chat_template([{"role": "user", "content": "x"}]) == "another template"
