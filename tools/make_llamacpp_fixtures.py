#!/usr/bin/env python
"""The llama.cpp CPU fixtures: tiny LFM2 and LFM2-MoE models quantised by llama.cpp itself, and llama.cpp's logits
for them, which tests/test_llamacpp_cpu.py holds lfm2np's ``llamacpp-cpu`` mode to.

    python tools/make_llamacpp_fixtures.py --llama vendor/venv-llama/bin/python     # writes tests/golden/llamacpp-cpu
    python tools/make_llamacpp_fixtures.py --llama ... --measure                    # the docs' table (nothing written)

For each model (random weights, random norm weights, every width 256 so every k-quant block fits a row) it writes
an F32 GGUF with lfm2np's writer (:func:`lfm2np.io.gguf_write.write_gguf`, the converter's metadata), quantises it
with ``llama_model_quantize`` (tools/llama_cpp_runs.py in the Python that has llama-cpp-python: llama.cpp's own
per-tensor type rules and quantisers) to Q8_0, Q6_K, Q4_K_M and Q4_0, and runs every file on llama.cpp's CPU
backend: the ids in one batch (``oneshot``), one at a time (``stepwise``), and the first 13 in a batch then one at a
time (``split:13``), with an f16 KV cache (llama.cpp's default) and the one-shot and token-by-token runs again with
an f32 cache. 30 ids: a batch of 30 rows takes the repacked kernels' four-row path for 28 rows and the one-row
path for 2, and the tiled k-quant kernel (8 rows or more).

Written: the quantised files (the F32 ones are rebuilt by the tests from the config and seed with lfm2np's writer,
and checked against the hash of their tensor data kept here), ``logits.safetensors`` (one (T, V) float32 array per
file, KV cache type and run: ``dense-Q4_K_M/f16/oneshot``), and ``manifest.json`` (configs, seeds, ids, hashes,
tensor types, llama-cpp-python's version and CPU features, and the numbers measured here).

``--measure`` prints the table of docs/llamacpp-cpu.md instead: for the models of tools/compare_llama_cpp.py
(4 layers, seeds 7 and 8, 32 ids), llama.cpp's one-shot logits against lfm2np in float32 (exact arithmetic) and in
``llamacpp-cpu``, and against llama.cpp's own token-by-token run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lfm2np  # noqa: E402
from lfm2np.io.gguf_file import GgufFile  # noqa: E402
from lfm2np.io.gguf_write import write_gguf  # noqa: E402
from lfm2np.synthetic import random_params  # noqa: E402

OUT = ROOT / "tests" / "golden" / "llamacpp-cpu"
RUNS = ROOT / "tools" / "llama_cpp_runs.py"
FILE_TYPES = ("F32", "Q8_0", "Q6_K", "Q4_K_M", "Q4_0")
SPLIT = 13
_COMMON = {"vocab_size": 97, "hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
           "intermediate_size": 256, "max_position_embeddings": 512, "norm_eps": 1e-5, "rope_theta": 1e6,
           "conv_L_cache": 3, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 7, "pad_token_id": 0}
#: the fixture models: dense conv / attention / conv; MoE conv (dense FFN) / attention (4 experts, top-3: three
#: slots make the order the experts' outputs are added in matter)
MODELS = {
    "dense": {**_COMMON, "model_type": "lfm2", "num_hidden_layers": 3, "block_auto_adjust_ff_dim": False,
              "layer_types": ["conv", "full_attention", "conv"]},
    "moe": {**_COMMON, "model_type": "lfm2_moe", "num_hidden_layers": 2, "layer_types": ["conv", "full_attention"],
            "num_dense_layers": 1, "num_experts": 4, "num_experts_per_tok": 3, "moe_intermediate_size": 256,
            "use_expert_bias": True, "norm_topk_prob": True, "routed_scaling_factor": 1.0},
}
SEEDS = {"dense": 11, "moe": 12}


def tensor_hash(path: Path) -> str:
    """sha256 of a GGUF file's tensor names, types and bytes, in file order (not of its metadata)."""
    h = hashlib.sha256()
    with GgufFile(path) as f:
        for name, t in f.tensors.items():
            h.update(f"{name}:{t.ggml_type}:".encode())
            h.update(np.ascontiguousarray(f.data(name)).tobytes())
    return h.hexdigest()


def f32_file(path: Path, config: dict, seed: int) -> Path:
    """The F32 source file of a fixture model (what the tests rebuild)."""
    c = lfm2np.load_config(config)
    write_gguf(path, c, random_params(c, seed=seed), "F32")
    return path


def ids_for(seed: int, n: int = 30) -> list[int]:
    return [int(i) for i in np.random.default_rng(seed).integers(0, 97, n)]


def llama(python: str, *args: str) -> None:
    subprocess.run([python, str(RUNS), *args], check=True)


def runs(python: str, path: Path, ids: list[int], kv: str, which: str, tmp: Path) -> dict:
    out = tmp / f"{path.stem}-{kv}.npz"
    llama(python, "logits", str(path), "--ids", *map(str, ids), "--runs", which, "--kv", kv, "--out", str(out))
    return dict(np.load(out))


def nmse(a: np.ndarray, ref: np.ndarray) -> float:
    a64, r64 = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(((a64 - r64) ** 2).sum() / (r64 ** 2).sum())


def ours(path: Path, ids: list[int], dtype: str, run: str) -> np.ndarray:
    """lfm2np's logits for a run (as the llama.cpp runs feed the ids)."""
    m = lfm2np.load(path, dtype=dtype)
    cut = {"oneshot": len(ids), "stepwise": 1}.get(run) or int(run.split(":")[1])
    logits, state = m.step(ids[:cut])
    rows = [logits]
    for i in ids[cut:]:
        logits, state = m.step([i], state)
        rows.append(logits)
    return np.concatenate(rows)


def make(python: str, out: Path) -> None:
    from safetensors.numpy import save_file

    out.mkdir(parents=True, exist_ok=True)
    arrays, manifest = {}, {"llama_cpp_python": None, "system_info": None, "split": SPLIT, "models": {}}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for kind, config in MODELS.items():
            seed = SEEDS[kind]
            ids = ids_for(seed)
            src = f32_file(tmp / f"{kind}-F32.gguf", config, seed)
            entry = {"config": config, "seed": seed, "ids": ids, "files": {}}
            for ftype in FILE_TYPES:
                path = src if ftype == "F32" else tmp / f"{kind}-{ftype}.gguf"
                if ftype != "F32":
                    llama(python, "quantize", str(src), str(path), ftype)
                    shutil.copy(path, out / path.name)
                with GgufFile(path) as f:
                    types = sorted({t.ggml_type for t in f.tensors.values()})
                file_entry = {"tensor_sha256": tensor_hash(path), "types": types,
                              "file": None if ftype == "F32" else path.name, "runs": {}}
                for kv, which in (("f16", f"oneshot,stepwise,split:{SPLIT}"), ("f32", "oneshot,stepwise")):
                    got = runs(python, path, ids, kv, which, tmp)
                    manifest["llama_cpp_python"] = str(got.pop("version"))
                    manifest["system_info"] = str(got.pop("system_info")).strip()
                    for run, logits in got.items():
                        arrays[f"{kind}-{ftype}/{kv}/{run}"] = logits
                    mode = "llamacpp-cpu" if kv == "f16" else "llamacpp-cpu-kv-f32"
                    one = got["oneshot"]
                    file_entry["runs"][kv] = {
                        "self_nmse": nmse(got["stepwise"], one),
                        "self_argmax_diff": int((got["stepwise"].argmax(-1) != one.argmax(-1)).sum()),
                        "exact_nmse": nmse(ours(path, ids, "float32", "oneshot"), one),
                        "mode_nmse": {run: nmse(ours(path, ids, mode, run), got[run]) for run in got}}
                    print(kind, ftype, kv, json.dumps(file_entry["runs"][kv]))
                entry["files"][ftype] = file_entry
            manifest["models"][kind] = entry
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(out / "logits.safetensors"))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out}")


def measure(python: str) -> None:
    """The docs' table: per file type, dense and MoE, max rel / NMSE / argmax agreement of llama.cpp's one-shot
    logits against lfm2np exact (float32) and llamacpp-cpu, and llama.cpp's own token-by-token run."""
    sys.path.insert(0, str(ROOT / "tools"))
    from compare_llama_cpp import config_for

    rows: dict = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for kind in ("dense", "moe"):
            for seed in (7, 8):
                c = config_for(kind, 256)
                src = tmp / f"{kind}-{seed}-F32.gguf"
                write_gguf(src, c, random_params(c, seed=seed), "F32")
                ids = [int(i) for i in np.random.default_rng(seed).integers(0, 97, 32)]
                for ftype in FILE_TYPES:
                    path = src if ftype == "F32" else tmp / f"{kind}-{seed}-{ftype}.gguf"
                    if ftype != "F32":
                        llama(python, "quantize", str(src), str(path), ftype)
                    got = runs(python, path, ids, "f16", "oneshot,stepwise", tmp)
                    one = got["oneshot"]
                    for who, logits in (("exact", ours(path, ids, "float32", "oneshot")),
                                        ("llamacpp-cpu", ours(path, ids, "llamacpp-cpu", "oneshot")),
                                        ("llama.cpp token by token", got["stepwise"])):
                        r = rows.setdefault((ftype, who, kind), [])
                        r.append((float(np.abs(logits - one).max() / np.abs(one).max()), nmse(logits, one),
                                  float((logits.argmax(-1) == one.argmax(-1)).mean())))
    print("| file type | against llama.cpp's one-shot run | dense: max rel / NMSE / argmax agreement | "
          "MoE: max rel / NMSE / argmax agreement |")
    print("|---|---|---|---|")
    for ftype in FILE_TYPES:
        for who in ("exact", "llamacpp-cpu", "llama.cpp token by token"):
            cells = []
            for kind in ("dense", "moe"):
                r = rows[(ftype, who, kind)]
                cells.append(f"{max(x[0] for x in r):.2g} / {max(x[1] for x in r):.2g} / "
                             f"{100 * min(x[2] for x in r):.0f}%")
            print(f"| {ftype} | {who} | {cells[0]} | {cells[1]} |")


def _tensors(trace) -> dict:
    return {n: trace[n] for n in trace.names()}


def _worst(theirs: dict, model, ids: list[int]) -> tuple[float, float, str]:
    """The worst tensor of ``theirs`` (lfm2np or llama.cpp names) against lfm2np's trace of ``model`` (following
    their expert choices at near-ties, as compare --model does): (max_rel, NMSE dB, which)."""
    from lfm2np.oracle.compare import compare
    from lfm2np.oracle.follow import following
    from lfm2np.oracle.trace import Trace

    trace = Trace(theirs, {"ids": list(ids)})
    result = compare(trace, following(model, trace, "q4", ids), "q4", partial=True)
    diffs = [d for d in result.diffs if d.routing_agreement is None and np.isfinite(d.max_rel)]
    rel, db = max(diffs, key=lambda d: d.max_rel), max(diffs, key=lambda d: d.nmse_db)
    return rel.max_rel, db.nmse_db, f"{rel.name} / {db.name}"


def kernel_bug(model) -> None:
    """A kernel that is off, in place in the model's decoded weights of the first layer: Q4_K with the mins of
    sub-blocks 0 and 1 exchanged, Q6_K with their scales exchanged, Q8_0 / Q4_0 with the scales of blocks 0 and 1
    exchanged."""
    import dataclasses

    for name in model.params:
        w = model.params[name]
        blocks = getattr(w, "blocks", None)
        if blocks is not None and name.startswith("model.layers.0."):
            field = {"Q4_K": "mn", "Q6_K": "sc"}.get(blocks.kind, "d")
            values = getattr(blocks, field).copy()
            values[..., [0, 1]] = values[..., [1, 0]]  # (sub-blocks, or blocks for d)
            w.blocks = dataclasses.replace(blocks, **{field: values})


def tiers(python: str) -> None:
    """The figures behind the compare tier llamacpp-cpu: per scenario the worst tensor (max_rel, NMSE) of a run
    against lfm2np's llamacpp-cpu trace of the same file, over the fixture models and tools/compare_llama_cpp.py's
    (f16 KV cache, one-shot traces; llama.cpp's through tools/dump_llama_cpp_trace.py)."""
    from safetensors.numpy import load_file

    from lfm2np.oracle.mistakes import port_of
    from lfm2np.oracle.port import run as port_run
    from lfm2np.oracle.trace import Trace, record

    sys.path.insert(0, str(ROOT / "tools"))
    from compare_llama_cpp import config_for

    worst: dict[str, list] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        models = [(k, MODELS[k], SEEDS[k], ids_for(SEEDS[k])) for k in MODELS]
        models += [(f"{k}4", config_for(k, 256).to_dict(), 7, ids_for(7, 32)) for k in ("dense", "moe")]
        for kind, config, seed, ids in models:
            src = f32_file(tmp / f"{kind}-F32.gguf", config, seed)
            for ftype in FILE_TYPES:
                path = src if ftype == "F32" else tmp / f"{kind}-{ftype}.gguf"
                if ftype != "F32":
                    llama(python, "quantize", str(src), str(path), ftype)
                model = lfm2np.load(path, dtype="llamacpp-cpu")
                runs_: dict[str, dict] = {}
                state, parts = None, {}
                for i in ids:  # token by token: llama.cpp's own other kernels (vec_dot, gemv), bit for bit
                    _, state = model.step([i], state, record=lambda n, v: parts.setdefault(n, []).append(v))
                runs_["llama.cpp token by token"] = {n: np.concatenate(v) for n, v in parts.items()
                                                     if not n.endswith("inv_freq")}
                for label, fa in (("llama.cpp flash attention", True), ("llama.cpp as emulated", False)):
                    out = tmp / f"{kind}-{ftype}-{fa}.safetensors"
                    subprocess.run([python, str(ROOT / "tools" / "dump_llama_cpp_trace.py"), str(path), "--ids",
                                    *map(str, ids), "--out", str(out), "--kv", "f16", "--threads", "1", "--ints"]
                                   + (["--flash-attn"] if fa else []), check=True, capture_output=True)
                    runs_[label] = load_file(str(out))
                for mistake in ("activations-unquantised", "kv-cache-f32"):
                    values: dict = {}
                    port_run(model, ids, port_of(model.config, mistake, mode="llamacpp-cpu"),
                             observe=lambda n, v: values.__setitem__(n, v))
                    runs_[mistake] = values
                runs_["exact arithmetic (float32)"] = _tensors(record(lfm2np.load(path), ids)[1])
                if ftype != "F32":
                    buggy = lfm2np.load(path, dtype="llamacpp-cpu")
                    kernel_bug(buggy)
                    runs_["a kernel off (first layer)"] = _tensors(record(buggy, ids)[1])
                for label, theirs in runs_.items():
                    worst.setdefault(label, []).append((*_worst(theirs, model, ids), f"{kind} {ftype}"))
    print("| run against lfm2np llamacpp-cpu | closest file: worst tensor max_rel / NMSE dB | "
          "farthest: max_rel (where) | NMSE dB (where) |")
    print("|---|---|---|---|")
    for label, rows in worst.items():
        rel, db = max(rows, key=lambda r: r[0]), max(rows, key=lambda r: r[1])
        best = min(rows, key=lambda r: r[0])
        print(f"| {label} | {best[0]:.2g} / {best[1]:.1f} ({best[3]}) | {rel[0]:.2g} ({rel[3]}: {rel[2]}) | "
              f"{db[1]:.1f} ({db[3]}: {db[2]}) |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llama", required=True, help="a Python with llama-cpp-python (tools/setup_llama_cpp.sh --build)")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--measure", action="store_true", help="print the docs' table instead of writing fixtures")
    p.add_argument("--tiers", action="store_true", help="print the figures behind the compare tier llamacpp-cpu")
    args = p.parse_args(argv)
    if args.tiers:
        tiers(args.llama)
    elif args.measure:
        measure(args.llama)
    else:
        make(args.llama, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
