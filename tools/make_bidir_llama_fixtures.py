#!/usr/bin/env python
"""Regenerate llama.cpp's side of the bidirectional fixtures: GGUF files made by llama.cpp's own converter from the
tiny checkpoints of tools/make_bidir_fixtures.py, and the embeddings llama.cpp computes from them.

    tools/setup_llama_cpp.sh --build     # the llama.cpp sources and llama-cpp-python 0.3.36 under vendor/
    python tools/make_bidir_llama_fixtures.py [--ref-python PY] [--llama-python PY] [--llama DIR]

For each case (bidir-cls: Lfm2BidirectionalModel with a CLS Pooling module; bidir-colbert: Lfm2BidirectionalModel
with a PyLate Dense and a conv of 5 taps; causal-colbert: the causal Lfm2Model with its Dense, LFM2-ColBERT-350M's
layout) it

1. runs ``convert_hf_to_gguf.py --outtype f32`` in the reference environment (torch), with the tokenizer
   pre-hash patched as tools/check_llama_cpp_converter.py does, into ``tests/golden/<case>/model-f32.gguf``: the
   converter writes ``lfm2.attention.causal`` false for the bidirectional ones, ``lfm2.pooling_type`` from
   1_Pooling, and the 1_Dense weight as ``dense_2.weight`` with ``lfm2.embedding_length_out``;
2. checks lfm2np's own writer (lfm2np.io.gguf_write) gives the same metadata and tensors, and that lfm2np reads the
   file as the checkpoint (the same config but conv_zero_padding, which a GGUF does not carry, and the same
   embeddings, bit for bit);
3. evaluates the sequences of the transformers fixture with llama-cpp-python (``embeddings=True``, an F32 KV cache,
   flash attention off -- its CPU kernel rounds to F16, which alone moves these vectors by 3e-4 of their scale --,
   one sequence per decode, the context's pooling type set to none, mean, cls and last in turn; the output width
   read with ``llama_model_n_embd_out``, since ``Llama.embed`` reads ``n_embd`` values) and stores llama.cpp's
   raw, unnormalised vectors in ``tests/golden/<case>/llama.safetensors``: ``{pooling}.{k}`` (E,) per sequence and
   ``none.{k}`` (T, E) per token.

llama-cpp-python and the converter are never needed by the tests.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import lfm2np  # noqa: E402
from check_llama_cpp_converter import RUNNER, same_file  # noqa: E402
from lfm2np.io.gguf_write import write_gguf  # noqa: E402

CASES = ("bidir-cls", "bidir-colbert", "causal-colbert")
GOLDEN = ROOT / "tests" / "golden"
POOLINGS = {"none": 0, "mean": 1, "cls": 2, "last": 3}

#: Run with llama-cpp-python: each sequence decoded alone under each pooling type; raw vectors saved.
CHILD = """
import ctypes, json, sys
import numpy as np
import llama_cpp
quiet = llama_cpp.llama_log_callback(lambda *a: None)
llama_cpp.llama_log_set(quiet, ctypes.c_void_p(0))
path, work = sys.argv[1], sys.argv[2]
seqs = json.load(open(work + "/seqs.json"))
llama_cpp.llama_backend_init()
model = llama_cpp.llama_model_load_from_file(path.encode(), llama_cpp.llama_model_default_params())
n_out = llama_cpp.llama_model_n_embd_out(model)
out = {}
for name, pooling in json.load(open(work + "/poolings.json")).items():
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx = cp.n_batch = cp.n_ubatch = 64
    cp.n_seq_max = 1
    cp.embeddings = True
    cp.pooling_type = pooling
    cp.type_k = cp.type_v = 0  # F32 KV cache
    cp.flash_attn_type = 0  # disabled: the CPU flash-attention kernel rounds to F16 (3e-4 of scale here)
    cp.n_threads = cp.n_threads_batch = 1
    ctx = llama_cpp.llama_init_from_model(model, cp)
    batch = llama_cpp.llama_batch_init(64, 0, 1)
    for k, seq in enumerate(seqs):
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        batch.n_tokens = len(seq)
        for i, t in enumerate(seq):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, i, 1, 1
            batch.seq_id[i][0] = 0
        assert llama_cpp.llama_decode(ctx, batch) == 0
        if pooling:
            out[f"{name}.{k}"] = np.array(llama_cpp.llama_get_embeddings_seq(ctx, 0)[:n_out], np.float32)
        else:
            out[f"{name}.{k}"] = np.array([llama_cpp.llama_get_embeddings_ith(ctx, i)[:n_out]
                                           for i in range(len(seq))], np.float32)
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
np.savez(work + "/out.npz", **out)
"""


def sequences(case: str) -> list[list[int]]:
    g = load_file(str(GOLDEN / case / "golden.safetensors"))
    return [g["capture.ids"].tolist()] + [g[f"alone.{i}.ids"].tolist() for i in range(3)]


def convert(ref_python: str, llama: Path, checkpoint: Path, out: Path) -> None:
    argv = [ref_python, "-c", RUNNER, str(llama), str(checkpoint), "--outfile", str(out), "--outtype", "f32"]
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"convert_hf_to_gguf.py failed on {checkpoint}:\n{result.stderr[-3000:]}")


def check(case: str, gguf: Path, work: Path) -> None:
    """lfm2np's writer gives the converter's file; lfm2np reads it as the checkpoint (step 2 of the docstring)."""
    checkpoint = lfm2np.load(GOLDEN / case)
    model = lfm2np.load(gguf)
    ours = work / f"{case}-lfm2np.gguf"
    write_gguf(ours, checkpoint.config, dict(checkpoint.params), "F32", tokenizer=GOLDEN / case)
    problems = same_file(gguf, ours)
    if model.config != checkpoint.config.replace(conv_zero_padding=False, max_position_embeddings=model.config.
                                                 max_position_embeddings):
        problems.append(f"config {model.config} != {checkpoint.config}")
    for seq in sequences(case):
        if not np.array_equal(model.embed(seq), checkpoint.embed(seq)):
            problems.append("embeddings")
    if problems:
        raise SystemExit(f"{case}: {', '.join(problems[:6])}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ref-python", default=str(ROOT / ".venv-ref" / "bin" / "python"),
                   help="a Python with torch and transformers, for the converter (default .venv-ref)")
    p.add_argument("--llama-python", default=str(ROOT / "vendor" / "venv-llama" / "bin" / "python"),
                   help="a Python with llama-cpp-python 0.3.36 (default vendor/venv-llama)")
    p.add_argument("--llama", type=Path, default=ROOT / "vendor" / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp",
                   help="the llama.cpp sources (convert_hf_to_gguf.py)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "poolings.json").write_text(json.dumps(POOLINGS))
        for case in CASES:
            gguf = GOLDEN / case / "model-f32.gguf"
            convert(args.ref_python, args.llama, GOLDEN / case, gguf)
            check(case, gguf, work)
            (work / "seqs.json").write_text(json.dumps(sequences(case)))
            result = subprocess.run([args.llama_python, "-c", CHILD, str(gguf), str(work)], capture_output=True,
                                    text=True)
            if result.returncode:
                raise SystemExit(f"{case}: llama-cpp-python failed:\n{result.stderr[-3000:]}")
            with np.load(work / "out.npz") as f:
                out = {k: f[k] for k in f.files}
            save_file(out, str(GOLDEN / case / "llama.safetensors"),
                      metadata={"generator": "tools/make_bidir_llama_fixtures.py", "llama-cpp-python": "0.3.36"})
            print(f"{case}: ok ({gguf.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
