"""The conformance kit: ``lfm2np conformance make | check | run`` on the embedded model.

A pack made from the embedded model passes against its own reference (lfm2np as the backend, float32 and
float64), against llama.cpp's run of the same model in F32 (results committed by
tools/make_conformance_fixtures.py: no llama.cpp here), and against an independent NumPy backend
(tests/buggy_backends.py); it fails that backend with a bug, naming the bug (router-softmax, a conv state lost on
a continued prefill, a kernel with reversed conv taps). The files llama.cpp's model-conversion scripts read are
in their formats. A pack changed by hand, results for another model, a results folder missing cases or feeds are
refused or failed, each with one clear line.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

import lfm2np
from lfm2np.cli import main
from lfm2np.embedded import embedded_model_path
from lfm2np.io.tokenizer import Tokenizer
from lfm2np.oracle import mistakes as M
from lfm2np.oracle.conformance import Pack, config_hash
from lfm2np.oracle.conformance_cases import BUILTIN_PROMPTS, play
from lfm2np.oracle.golden import save_arrays

from buggy_backends import Backend
from conftest import GOLDEN
from test_hostile import cli_refuses

PROMPTS = Path(__file__).parent / "data" / "conformance_prompts.json"
LLAMA = GOLDEN / "conformance-llama.cpp"
LLAMA_CASES = ["oneshot-text", "oneshot-chat", "decode-*", "llama.cpp"]


def run_cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    status = main(argv)
    out = capsys.readouterr()
    return status, out.out, out.err


refused = cli_refuses  # ``lfm2np argv`` exits 2 with one ``lfm2np: error:`` line naming what it is given


@pytest.fixture(scope="module")
def pack(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("conformance") / "pack"
    assert main(["conformance", "make", "embedded", "--prompts", str(PROMPTS), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def own(pack, tmp_path_factory) -> Path:
    """lfm2np's own results (float32) on the pack."""
    out = tmp_path_factory.mktemp("conformance") / "own"
    assert main(["conformance", "run", str(pack), "--backend", "lfm2np", "embedded", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def params() -> dict[str, np.ndarray]:
    model = lfm2np.load("embedded", memory_budget="all")
    return {name: np.asarray(model.params[name], np.float32) for name in model.params}


def copy_results(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------------------------- the pack
def test_manifest_describes_the_model_the_prompts_and_every_file(pack):
    m = json.loads((pack / "manifest.json").read_text())
    assert m["format"] == "lfm2np-conformance" and m["lfm2np"] == lfm2np.__version__
    config = lfm2np.load_config("embedded")
    assert m["model"]["config"] == config.to_dict() and m["model"]["config_hash"] == config_hash(config)
    assert m["model"]["name"] == "tiny-lfm2-moe" and m["model"]["format"] == "safetensors"
    # the inventory: every tensor of the file, its shape, stored type and the SHA-256 of its bytes, computed here
    # from the file's own header
    raw = (embedded_model_path() / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    listed = {t["name"]: t for t in m["model"]["tensors"]}
    assert set(listed) == set(header)
    for name, entry in header.items():
        a, b = entry["data_offsets"]
        assert listed[name]["shape"] == entry["shape"] and listed[name]["type"] == entry["dtype"]
        assert listed[name]["sha256"] == hashlib.sha256(raw[8 + n + a: 8 + n + b]).hexdigest(), name
    for rel, digest in m["files"].items():
        assert hashlib.sha256((pack / rel).read_bytes()).hexdigest() == digest, rel
    assert {c["kind"] for c in m["cases"]} == {"oneshot", "decode", "operator", "llama.cpp"}
    assert {"fp32", "fp32-op"} <= set(m["tiers"]) and all(c["tier"] in m["tiers"] for c in m["cases"])
    assert all(c["proves"] for c in m["cases"])
    # the prompts: as text (a conversation as the template renders it, the tool call too) and as ids
    prompts = {p["id"]: p for p in json.loads((pack / "prompts.json").read_text())}
    tok = Tokenizer.load(embedded_model_path())
    assert prompts["text"]["token_ids"] == tok.encode(prompts["text"]["text"], add_bos=True)
    tool = prompts["tool"]
    assert "<|tool_list_start|>" in tool["rendered"] and "<|tool_call_start|>[now()]" in tool["rendered"]
    assert tool["token_ids"] == tok.encode(tool["rendered"])


def test_the_default_prompts_hold_a_text_a_chat_and_a_tool_call():
    kinds = {p.id: p.kind for p in BUILTIN_PROMPTS}
    assert kinds == {"text": "text", "chat": "chat", "tool": "chat"}
    tool = next(p for p in BUILTIN_PROMPTS if p.id == "tool")
    assert tool.tools and any("<|tool_call_start|>" in m["content"] for m in tool.messages)
    assert any(m["role"] == "tool" for m in tool.messages)


def test_decoding_scenarios_and_their_references(pack):
    """Each scenario's steps do what its name says, and every feed's reference is the one-shot forward pass of its
    sequence (the rows a cache-free reference gives)."""
    p = Pack.open(pack)
    model = lfm2np.load("embedded")
    steps = {c["id"]: c["steps"] for c in p.cases if c["kind"] == "decode"}
    assert all(len(s["ids"]) == 1 for s in steps["decode-tokenwise"])
    assert [s["op"] for s in steps["decode-rollback"]] == ["feed", "feed", "rollback", "feed", "feed"]
    assert len(steps["decode-chunked"]) == 3 and all(len(s["ids"]) > 1 for s in steps["decode-chunked"])
    second = steps["decode-second-prefill"]
    assert len(second[0]["ids"]) > 1 and len(second[1]["ids"]) == 1 and len(second[-1]["ids"]) > 1
    batch = steps["decode-batch"][0]["feeds"]
    assert steps["decode-batch"][0]["op"] == "batch" and len({len(e["ids"]) for e in batch}) == len(batch) > 1
    for case in p.cases:
        if case["kind"] not in ("decode", "oneshot"):
            continue
        ref = p.reference(case)
        for f in play(case["steps"]):
            whole = model.forward(list(f.sequence))
            np.testing.assert_allclose(ref[f"logits.{f.index}"], whole[f.start:f.start + len(f.ids)], rtol=0,
                                       atol=1e-5 * np.abs(whole).max())


def test_llama_cpp_scripts_read_the_files(pack):
    """The files of llama.cpp's examples/model-conversion, as its check-nmse.py and compare-logits.py read them:
    data/pytorch-<model>.bin float32 logits (np.fromfile), -tokens.bin int32, .txt "i: value" lines, -prompt.txt."""
    data = pack / "llama.cpp" / "data"
    logits = np.fromfile(data / "pytorch-tiny-lfm2-moe.bin", dtype=np.float32)
    p = Pack.open(pack)
    text_case = p.by_id["oneshot-text"]
    assert np.array_equal(logits, p.reference(text_case)["logits.0"][-1].astype(np.float32))
    tokens = np.fromfile(data / "pytorch-tiny-lfm2-moe-tokens.bin", dtype=np.int32)
    assert tokens.tolist() == text_case["feeds"][0]["ids"]
    lines = (data / "pytorch-tiny-lfm2-moe.txt").read_text().splitlines()
    assert len(lines) == logits.size and lines[7] == f"7: {logits[7]:.6f}"
    assert np.allclose([float(x.split(":")[1]) for x in lines], logits, atol=5e-7)
    prompt = (data / "pytorch-tiny-lfm2-moe-prompt.txt").read_text().splitlines()
    assert prompt[0] == 'prompt: The "for" statement' and prompt[1] == f"n_tokens: {tokens.size}"
    # check-nmse.py's measure on llama.cpp's own run of the same prompt (the committed fixture): essentially identical
    theirs = np.fromfile(LLAMA / "data" / "llamacpp-tiny-lfm2-moe.bin", dtype=np.float32)
    assert np.fromfile(LLAMA / "data" / "llamacpp-tiny-lfm2-moe-tokens.bin", dtype=np.int32).tolist() == tokens.tolist()
    nmse = np.mean((theirs - logits) ** 2) / np.var(logits)
    assert theirs.shape == logits.shape and nmse < 1e-6


# -------------------------------------------------------------------------------------------- check
def test_the_pack_passes_against_its_own_reference(pack, own, capsys, tmp_path):
    status, out, _ = run_cli(capsys, ["conformance", "check", str(pack), "--results", str(own)])
    assert status == 0, out
    assert "PASS: 27 of 28 cases pass, 1 skipped" in out  # llama.cpp's files: not this backend's
    status, out, _ = run_cli(capsys, ["conformance", "check", str(pack), "--results", str(own), "--json"])
    data = json.loads(out)
    assert status == 0 and data["ok"] and data["counts"] == {"pass": 27, "fail": 0, "skip": 1}
    oneshot = next(c for c in data["cases"] if c["id"] == "oneshot-chat")
    assert oneshot["comparison"]["compared"] > 20  # its intermediates judged too (hidden states, routing, ...)
    f64 = tmp_path / "f64"
    assert main(["conformance", "run", str(pack), "--backend", "lfm2np", "embedded", "--dtype", "float64",
                 "--out", str(f64)]) == 0
    assert main(["conformance", "check", str(pack), "--results", str(f64)]) == 0


def test_llama_cpp_results_pass(pack, capsys):
    """llama.cpp's run of the embedded model converted to an F32 GGUF (F32 KV cache), through the adapter, committed:
    every oneshot and decoding case (rollback included) and llama.cpp's own file within the fp32 tier."""
    status, out, _ = run_cli(capsys, ["conformance", "check", str(pack), "--results", str(LLAMA), "--json",
                                      "--cases", *LLAMA_CASES])
    data = json.loads(out)
    assert status == 0 and data["counts"] == {"pass": 8, "fail": 0, "skip": 0}, out
    assert data["backend"].startswith("llama.cpp")
    rows = [p for c in data["cases"] for p in c["parts"]]
    assert all(p["max_rel"] < 2e-6 for p in rows), max(p["max_rel"] for p in rows)
    assert any(p["rows_given"] == 1 and p["positions"][1] - p["positions"][0] > 1 for p in rows)  # last rows only
    # every case is required: the operators, which llama.cpp cannot run alone, fail as not written
    status, out, _ = run_cli(capsys, ["conformance", "check", str(pack), "--results", str(LLAMA), "--diagnose",
                                      "none"])
    assert status == 1 and "op-003-model.layers.0.conv" in out and "no results for this case" in out


def play_backend(make, steps):
    """tests/buggy_backends.Backend as a backend of the kit: one instance per sequence; a rollback feeds the kept
    tokens again into a fresh instance."""
    backends, held, out = {}, {}, {}
    for step in steps:
        if step["op"] == "rollback":
            held[step["seq"]] = held[step["seq"]][:-step["n"]]
            backends[step["seq"]] = b = make()
            b.feed(held[step["seq"]])
            continue
        for e in step["feeds"] if step["op"] == "batch" else [step]:
            b = backends.setdefault(e["seq"], make())
            out[f"logits.{len(out)}"] = b.feed(e["ids"])
            held[e["seq"]] = held.get(e["seq"], []) + list(e["ids"])
    return out


def write_backend_results(pack: Path, out: Path, make, cases: list[str]) -> Path:
    p = Pack.open(pack)
    (out / "cases").mkdir(parents=True)
    for c in p.cases:
        if c["id"] in cases:
            save_arrays(play_backend(make, c["steps"]), out / "cases" / f"{c['id']}.npz")
    return out


def test_an_independent_backend_passes_and_its_bugs_are_named(pack, params, capsys, tmp_path):
    config = lfm2np.load_config("embedded")
    cases = ["oneshot-text", "decode-chunked"]
    good = write_backend_results(pack, tmp_path / "good", lambda: Backend(config, params), cases)
    status, out, _ = run_cli(capsys, ["conformance", "check", str(pack), "--results", str(good), "--cases", *cases])
    assert status == 0, out
    bad = write_backend_results(pack, tmp_path / "softmax", lambda: Backend(config, params, ["router-softmax"]),
                                cases[:1])
    status, out, _ = run_cli(capsys, ["conformance", "check", str(pack), "--results", str(bad), "--cases",
                                      cases[0], "--json"])
    data = json.loads(out)
    assert status == 1 and data["cases"][0]["status"] == "fail"
    assert data["cases"][0]["diagnosis"]["best"] == "router-softmax", data["cases"][0]["diagnosis_text"]
    lost = write_backend_results(pack, tmp_path / "lost",
                                 lambda: Backend(config, params, ["conv-state-dropped"], drop_on="multi-token"), cases)
    status, out, _ = run_cli(capsys, ["conformance", "check", str(pack), "--results", str(lost), "--cases", *cases,
                                      "--json"])
    verdicts = {c["id"]: c for c in json.loads(out)["cases"]}
    assert status == 1 and verdicts["oneshot-text"]["ok"]  # one call: nothing to lose
    chunked = verdicts["decode-chunked"]
    assert not chunked["ok"] and chunked["parts"][0]["ok"] and not chunked["parts"][1]["ok"]
    assert chunked["diagnosis"]["best"] == "conv-state-dropped", chunked["diagnosis_text"]
    assert chunked["diagnosis"]["prefill"] == chunked["parts"][1]["positions"][0]


def test_an_operator_bug_is_named_with_its_layer(pack, own, capsys, tmp_path):
    """A conv kernel with reversed taps, given the reference's inputs: the operator case fails and the diagnosis
    names the mistake in that layer."""
    results = copy_results(own, tmp_path / "r")
    p = Pack.open(pack)
    case = p.by_id["op-003-model.layers.0.conv"]
    model = lfm2np.load("embedded")
    values = {}
    M.run(model, case["ids"], M.port_of(model.config, "conv-taps-reversed"),
          observe=lambda name, value: values.__setitem__(name, np.array(value)))
    save_arrays({f"output.{k}": values[n] for k, n in case["outputs"].items()}, results / case["file"])
    status, out, _ = run_cli(capsys, ["conformance", "check", str(pack), "--results", str(results), "--cases",
                                      "op-00*", "--json"])
    data = {c["id"]: c for c in json.loads(out)["cases"]}
    assert status == 1 and [k for k, v in data.items() if not v["ok"]] == [case["id"]]
    bad = data[case["id"]]
    assert bad["tier"] == "fp32-op" and "conv.conv_out" in bad["detail"]
    assert bad["diagnosis"]["best"] == "conv-taps-reversed", bad["diagnosis_text"]


def test_html_page(pack, own, capsys, tmp_path):
    results = copy_results(own, tmp_path / "r")
    arrays = dict(np.load(results / "cases" / "oneshot-chat.npz"))
    arrays["logits.0"] = arrays["logits.0"] * 1.01
    save_arrays(arrays, results / "cases" / "oneshot-chat.npz")
    page = tmp_path / "report.html"
    status, out, _ = run_cli(capsys, ["conformance", "check", str(pack), "--results", str(results), "--html",
                                      str(page), "--diagnose", "none"])
    html = page.read_text()
    assert status == 1 and html.startswith("<!DOCTYPE html>") and "<script" not in html
    assert 'id="case-oneshot-chat"' in html and "FAIL: 1 of 28 cases fail" in html
    assert 'id="map"' in html  # the failed oneshot's comparison, drawn as compare --html draws it
    assert "tiny-lfm2-moe" in html and Pack.open(pack).config_hash in html


# ------------------------------------------------------------------------------------------ bad input
def test_a_pack_edited_by_hand_is_refused_naming_the_file(pack, own, capsys, tmp_path):
    edited = copy_results(pack, tmp_path / "pack")
    arrays = dict(np.load(edited / "cases" / "decode-chunked.npz"))
    arrays["logits.1"] = arrays["logits.1"] + 1
    save_arrays(arrays, edited / "cases" / "decode-chunked.npz")
    refused(capsys, ["conformance", "check", str(edited), "--results", str(own)], "decode-chunked.npz", "SHA-256",
            "changed after it was made")
    (edited / "cases" / "decode-chunked.npz").unlink()
    refused(capsys, ["conformance", "check", str(edited), "--results", str(own)], "decode-chunked.npz", "missing")
    m = json.loads((edited / "manifest.json").read_text())
    m["cases"][0]["tier"] = "fp32-op"  # a looser tier, by hand: the manifest's own digest no longer matches
    (edited / "manifest.json").write_text(json.dumps(m))
    refused(capsys, ["conformance", "check", str(edited), "--results", str(own)], "manifest.json", "edited after")
    m["version"] = 99
    (edited / "manifest.json").write_text(json.dumps(m))
    refused(capsys, ["conformance", "check", str(edited), "--results", str(own)], "manifest.json", "version 99")
    (edited / "manifest.json").write_text("{")
    refused(capsys, ["conformance", "check", str(edited), "--results", str(own)], "manifest.json")
    refused(capsys, ["conformance", "check", str(tmp_path / "nothing"), "--results", str(own)], "not a directory")


def test_results_for_another_model_are_refused(pack, own, capsys, tmp_path):
    results = copy_results(own, tmp_path / "r")
    meta = json.loads((results / "results.json").read_text())
    (results / "results.json").write_text(json.dumps({**meta, "config_hash": "sha256:" + "0" * 64}))
    refused(capsys, ["conformance", "check", str(pack), "--results", str(results)], "config_hash",
            "another model than tiny-lfm2-moe")
    other = lfm2np.load(GOLDEN / "moe-bf16-bias")  # a model of another config runs no case of this pack
    refused(capsys, ["conformance", "run", str(pack), "--backend", "lfm2np", str(GOLDEN / "moe-bf16-bias"), "--out",
                     str(tmp_path / "x")], "config hash", config_hash(other.config))


def test_missing_cases_and_feeds_fail(pack, own, capsys, tmp_path):
    results = copy_results(own, tmp_path / "r")
    (results / "cases" / "decode-batch.npz").unlink()
    arrays = dict(np.load(results / "cases" / "decode-rollback.npz"))
    del arrays["logits.2"]
    save_arrays(arrays, results / "cases" / "decode-rollback.npz")
    arrays = dict(np.load(results / "cases" / "decode-chunked.npz"))
    arrays["logits.1"] = arrays["logits.1"][:, :-1]
    save_arrays(arrays, results / "cases" / "decode-chunked.npz")
    status, out, _ = run_cli(capsys, ["conformance", "check", str(pack), "--results", str(results), "--diagnose",
                                      "none", "--json"])
    data = {c["id"]: c for c in json.loads(out)["cases"]}
    assert status == 1 and [k for k, v in data.items() if not v["ok"]] == ["decode-chunked", "decode-rollback",
                                                                          "decode-batch"]
    assert "no results for this case" in data["decode-batch"]["detail"]
    assert "no logits.2 in the results" in data["decode-rollback"]["detail"]
    assert "logits.1 has shape" in data["decode-chunked"]["detail"]
    empty = tmp_path / "empty"
    empty.mkdir()
    status, out, _ = run_cli(capsys, ["conformance", "check", str(pack), "--results", str(empty), "--diagnose", "none"])
    assert status == 1 and "FAIL: 0 of 28 cases pass, 1 skipped" in out
    refused(capsys, ["conformance", "check", str(pack), "--results", str(tmp_path / "none")], "no such results")
    refused(capsys, ["conformance", "check", str(pack), "--results", str(own), "--cases", "nope*"], "nope*",
            "matches none")


def test_bad_prompts_files_are_refused(capsys, tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"text": "a"}\n{"messages": 3}\n')
    refused(capsys, ["conformance", "make", "embedded", "--prompts", str(bad), "--out", str(tmp_path / "o")],
            "p.jsonl:2", "messages")
    bad.write_text('{"text": "a", "id": "x"}\n{"ids": [1], "id": "x"}\n')
    refused(capsys, ["conformance", "make", "embedded", "--prompts", str(bad), "--out", str(tmp_path / "o")],
            "p.jsonl:2", "'x' is already")
    big = tmp_path / "big.json"
    big.write_text(json.dumps([{"ids": [4000]}]))
    refused(capsys, ["conformance", "make", "embedded", "--prompts", str(big), "--out", str(tmp_path / "o")],
            "4000", "outside the vocabulary")


def test_backends_that_are_not_installed_or_not_given_what_they_run(pack, capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "llama_cpp", None)  # as if llama-cpp-python were not installed
    monkeypatch.setitem(__import__("sys").modules, "torch", None)
    gguf = GOLDEN / "nothing.gguf"
    refused(capsys, ["conformance", "run", str(pack), "--backend", "llama.cpp", "embedded", "--out",
                     str(tmp_path / "a")], "llama.cpp backend runs a .gguf file")
    refused(capsys, ["conformance", "run", str(pack), "--backend", "llama.cpp", str(gguf), "--out",
                     str(tmp_path / "b")], "needs llama-cpp-python")
    refused(capsys, ["conformance", "run", str(pack), "--backend", "transformers", "embedded", "--out",
                     str(tmp_path / "c")], "needs torch and transformers")
    refused(capsys, ["conformance", "run", str(pack), "--backend", "lfm2np", "embedded", "--out",
                     str(tmp_path / "d"), "--cases", "zzz"], "--cases zzz matches none")
    refused(capsys, ["conformance"], "conformance", "required")


def test_llama_cpp_files_of_the_wrong_size_or_tokens_fail(pack, capsys, tmp_path):
    results = tmp_path / "r"
    (results / "data").mkdir(parents=True)
    (results / "data" / "llamacpp-x.bin").write_bytes(b"\0" * 12)
    status, out, _ = run_cli(capsys, ["conformance", "check", str(pack), "--results", str(results), "--cases",
                                      "llama.cpp", "--json"])
    case = json.loads(out)["cases"][0]
    assert status == 1 and "12 bytes" in case["detail"] and "3072 float32 values" in case["detail"]
    shutil.copyfile(LLAMA / "data" / "llamacpp-tiny-lfm2-moe.bin", results / "data" / "llamacpp-x.bin")
    np.asarray([1, 2, 3], np.int32).tofile(results / "data" / "llamacpp-x-tokens.bin")
    status, out, _ = run_cli(capsys, ["conformance", "check", str(pack), "--results", str(results), "--cases",
                                      "llama.cpp", "--json"])
    case = json.loads(out)["cases"][0]
    assert status == 1 and "llama.cpp tokenized the prompt as [1, 2, 3]" in case["detail"]
    (results / "data" / "llamacpp-x-tokens.bin").unlink()
    assert main(["conformance", "check", str(pack), "--results", str(results), "--cases", "llama.cpp"]) == 0
    (results / "llamacpp-y.bin").write_bytes(b"")
    refused(capsys, ["conformance", "check", str(pack), "--results", str(results)], "2 llama.cpp logits files")


def test_outputs_never_land_in_the_pack_or_the_results_they_read(pack, own, capsys, tmp_path):
    """``run --out PACK --force`` wrote its results over the pack's references (cases/*.npz), ``check --html
    PACK/manifest.json --force`` over its manifest: both are refused before anything is written, whatever name
    leads there (a link)."""
    before = {f: f.read_bytes() for f in sorted(pack.rglob("*")) if f.is_file()}
    (tmp_path / "link").symlink_to(pack)
    for out in (pack, pack / "cases", tmp_path / "link" / "cases"):
        refused(capsys, ["conformance", "run", str(pack), "--backend", "lfm2np", "embedded", "--out", str(out),
                         "--force"], str(out), "is inside the pack", "choose an output outside it")
    for html, where in ((pack / "manifest.json", "the pack"), (own / "results.json", "the results directory"),
                        (tmp_path / "link" / "report.html", "the pack")):
        refused(capsys, ["conformance", "check", str(pack), "--results", str(own), "--html", str(html), "--force"],
                str(html), f"is inside {where}")
    assert {f: f.read_bytes() for f in sorted(pack.rglob("*")) if f.is_file()} == before
    for name in ("a/../../b", "", "..", "x\x1by"):  # --name makes file names: pytorch-<name>.bin
        refused(capsys, ["conformance", "make", "embedded", "--out", str(tmp_path / "o"), "--name", name],
                "--name", "no path separator or control character")
    assert not (tmp_path / "o").exists()
