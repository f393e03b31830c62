#!/usr/bin/env python
"""Opt-in check against llama.cpp itself (not part of CI): the same tiny GGUF, the same token ids, logits
from llama.cpp (through llama-cpp-python) and from lfm2np, and their difference.

Needs llama-cpp-python, which compiles llama.cpp (about 10 minutes on 2 cores), in its own venv::

    python -m venv venv-llama
    CMAKE_ARGS="-DGGML_NATIVE=OFF" venv-llama/bin/pip install llama-cpp-python numpy gguf safetensors
    venv-llama/bin/python tools/compare_llama_cpp.py            # every case below
    venv-llama/bin/python tools/compare_llama_cpp.py --types F32,Q8_0 --kinds moe --keep /tmp/gguf

For each case it builds a tiny random LFM2 (``lfm2``) or LFM2-MoE (``lfm2moe``) model, writes it with
:func:`lfm2np.io.gguf_write.write_gguf` (gguf-py's writer, the metadata ``convert_hf_to_gguf.py`` writes), loads the
file back with lfm2np (so both sides run on exactly the stored, dequantised values) and with llama.cpp,
evaluates the same ids in one batch, and prints per case: max |difference| over all positions, that max
relative to max |logit|, the worst position's cosine, and whether the argmax agrees at every position.

lfm2np computes in float64 here (the oracle mode); ``--dtype float32`` compares float32 to float32.
Sizes: every width is 256 so every ggml type (block 32 or 256) fits the rows; llama.cpp additionally needs
``H * head_dim == D`` (its attn_output is [D, D]) and an expert bias on MoE layers.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lfm2np  # noqa: E402
from lfm2np.io import gguf as G  # noqa: E402
from lfm2np.io import gguf_write as W  # noqa: E402
from lfm2np.synthetic import random_params  # noqa: E402

TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q6_K", "Q5_K", "Q4_K"]
_QUIET = None
IDS = [1, 5, 17, 42, 3, 96, 0, 64, 7, 11, 2, 30, 77, 8, 50, 19]


def config_for(kind: str, width: int) -> lfm2np.Config:
    """tiny-dense / tiny-moe with every width = ``width`` (layer pattern, vocab 97 and head count kept)."""
    if kind == "dense":
        c = lfm2np.load_config("tiny-dense")
        return c.replace(hidden_size=width, num_attention_heads=4, num_key_value_heads=2, intermediate_size=width,
                         tie_word_embeddings=True)
    c = lfm2np.load_config("tiny-moe")
    return c.replace(hidden_size=width, num_attention_heads=4, num_key_value_heads=2, intermediate_size=width,
                     moe_intermediate_size=width, num_experts=4, tie_word_embeddings=True)


def llama_cpp_logits(path: Path, ids: list[int], threads: int, kv: str) -> np.ndarray:
    """All positions' logits from llama.cpp for ``ids`` evaluated as one batch (no BOS added)."""
    import llama_cpp

    kv_type = {"f32": 0, "f16": 1}[kv]  # GGML_TYPE_F32, GGML_TYPE_F16 (llama.cpp's default cache type)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=max(64, len(ids)), n_batch=len(ids), n_ubatch=len(ids),
                          logits_all=True, n_threads=threads, verbose=False, type_k=kv_type, type_v=kv_type)
    llm.eval(ids)
    n_vocab = llm.n_vocab()
    out = np.array(llm.scores[: len(ids), :n_vocab], dtype=np.float64)
    del llm
    return out


def compare(kind: str, qtype: str, width: int, dtype: str, seed: int, directory: Path, threads: int,
            kv: str = "f32", router_scale: float = 1.0) -> dict:
    config = config_for(kind, width)
    params = random_params(config, seed=seed)
    for name in params:  # a larger scale spreads router logits (fewer near-ties, but saturated sigmoids)
        if name.endswith("feed_forward.gate.weight"):
            params[name] = params[name] * router_scale
    path = directory / f"lfm2np-{kind}-{qtype}.gguf"
    W.write_gguf(path, config, params, qtype)
    ids = [i % config.vocab_size for i in IDS]
    ours = lfm2np.load(path, dtype=dtype).forward(ids).astype(np.float64)
    theirs = llama_cpp_logits(path, ids, threads, kv)
    diff = np.abs(ours - theirs)
    cos = (ours * theirs).sum(-1) / (np.linalg.norm(ours, axis=-1) * np.linalg.norm(theirs, axis=-1))
    return {"kind": kind, "type": qtype, "max_abs": float(diff.max()), "max_rel": float(diff.max() / np.abs(ours).max()),
            "min_cos": float(cos.min()), "argmax_agree": bool((ours.argmax(-1) == theirs.argmax(-1)).all()),
            "scale": float(np.abs(ours).max())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kinds", default="dense,moe")
    p.add_argument("--types", default=",".join(TYPES))
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kv", default="f32", choices=["f32", "f16"], help="llama.cpp's KV cache type")
    p.add_argument("--router-scale", type=float, default=1.0, help="multiply the random router weights")
    p.add_argument("--keep", type=Path, help="write the GGUF files here (default: a temporary directory)")
    args = p.parse_args(argv)
    try:
        import llama_cpp
    except ImportError:
        print("needs llama-cpp-python: see this script's docstring", file=sys.stderr)
        return 2
    global _QUIET  # the ctypes callback must outlive every llama.cpp call, or llama.cpp calls freed memory
    _QUIET = llama_cpp.llama_log_callback(lambda *a: None)
    llama_cpp.llama_log_set(_QUIET, ctypes.c_void_p(0))
    print(f"llama-cpp-python {llama_cpp.__version__}, lfm2np {lfm2np.__version__}, lfm2np dtype {args.dtype}, "
          f"llama.cpp KV cache {args.kv}, router scale {args.router_scale}, width {args.width}, seed {args.seed}")
    directory = args.keep or Path(tempfile.mkdtemp(prefix="lfm2np-llama-"))
    directory.mkdir(parents=True, exist_ok=True)
    print(f"{'model':6} {'type':5} {'max|diff|':>10} {'rel':>9} {'min cos':>12} argmax  (max|logit|)")
    failed = 0
    for kind in args.kinds.split(","):
        for qtype in args.types.split(","):
            try:
                r = compare(kind, qtype, args.width, args.dtype, args.seed, directory, args.threads, args.kv,
                            args.router_scale)
            except Exception as e:  # report and go on: one type llama.cpp refuses should not hide the rest
                print(f"{kind:6} {qtype:5} FAILED: {type(e).__name__}: {e}")
                failed += 1
                continue
            print(f"{r['kind']:6} {r['type']:5} {r['max_abs']:10.3e} {r['max_rel']:9.2e} {r['min_cos']:12.9f} "
                  f"{'same' if r['argmax_agree'] else 'DIFF':6}  ({r['scale']:.2f})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
