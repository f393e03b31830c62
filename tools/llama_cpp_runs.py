#!/usr/bin/env python
"""llama.cpp's side of the llama.cpp CPU fixtures (tools/make_llamacpp_fixtures.py): quantise a GGUF with
llama.cpp's own quantiser and run a GGUF on llama.cpp's CPU backend, through llama-cpp-python's C API.

It imports only llama_cpp and numpy, so it runs in the Python that has llama-cpp-python (the build
tools/setup_llama_cpp.sh --build makes) without lfm2np::

    venv-llama/bin/python tools/llama_cpp_runs.py quantize F32.gguf Q4_K_M.gguf Q4_K_M
    venv-llama/bin/python tools/llama_cpp_runs.py logits MODEL.gguf --ids 1 5 17 --out runs.npz

``logits`` runs the ids on fresh contexts in the ways asked (``--runs``): ``oneshot`` (every id in one batch,
logits at every position), ``stepwise`` (one id per llama_decode call, as a generation loop feeds them) and
``split:N`` (the first N ids in one batch, then one at a time). The context is what llama-cpp-python's
``Llama`` makes by default: KV cache f16 (``--kv``), flash attention off (``--flash-attn``), no eval callback
(a callback makes the scheduler run node by node). ``--threads`` threads. The npz holds one (T, V) float32
array per run and ``system_info`` (llama.cpp's own description of the CPU build).
"""

from __future__ import annotations

import argparse
import ctypes
import sys

import numpy as np

FTYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 7, "Q4_K_M": 15, "Q6_K": 18}
KV_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 8}  # GGML_TYPE_*
_LOG = None  # the log callback must outlive every llama.cpp call


def _init(verbose: bool = False):
    import llama_cpp

    global _LOG
    if not verbose and _LOG is None:
        _LOG = llama_cpp.llama_log_callback(lambda *a: None)
        llama_cpp.llama_log_set(_LOG, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    return llama_cpp


def quantize(src: str, dst: str, ftype: str, threads: int = 1) -> None:
    """``llama_model_quantize(src, dst)`` to file type ``ftype`` (its per-tensor type rules, its quantisers)."""
    llama_cpp = _init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype]
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {ftype}) returned {rc}")


def logits(path: str, ids: list[int], runs: list[str], kv: str = "f16", flash_attn: bool = False,
           threads: int = 1, n_ctx: int = 256) -> dict[str, np.ndarray]:
    """Logits (T, V) of ``ids`` for each run in ``runs`` ("oneshot", "stepwise", "split:N"), each on a fresh
    context."""
    llama_cpp = _init()
    mparams = llama_cpp.llama_model_default_params()
    mparams.n_gpu_layers = 0
    model = llama_cpp.llama_model_load_from_file(path.encode(), mparams)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {path}")
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    out = {}
    try:
        for run in runs:
            cut = {"oneshot": len(ids), "stepwise": 1}.get(run) or int(run.split(":")[1])
            chunks = [ids[:cut]] + [[i] for i in ids[cut:]]
            cparams = llama_cpp.llama_context_default_params()
            cparams.n_ctx = n_ctx
            cparams.n_batch = cparams.n_ubatch = max(len(c) for c in chunks)
            cparams.n_seq_max = 1
            cparams.n_threads = cparams.n_threads_batch = threads
            cparams.type_k = cparams.type_v = KV_TYPES[kv]
            cparams.flash_attn_type = 1 if flash_attn else 0  # LLAMA_FLASH_ATTN_TYPE_ENABLED / _DISABLED
            ctx = llama_cpp.llama_init_from_model(model, cparams)
            if not ctx:
                raise RuntimeError("llama.cpp could not create a context")
            rows = []
            try:
                pos = 0
                for chunk in chunks:
                    batch = llama_cpp.llama_batch_init(len(chunk), 0, 1)
                    try:
                        for i, tok in enumerate(chunk):
                            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, pos + i, 1, 1
                            batch.seq_id[i][0] = 0
                        batch.n_tokens = len(chunk)
                        rc = llama_cpp.llama_decode(ctx, batch)
                        if rc != 0:
                            raise RuntimeError(f"llama_decode returned {rc}")
                        got = llama_cpp.llama_get_logits(ctx)
                        rows.append(np.ctypeslib.as_array(got, shape=(len(chunk), n_vocab)).copy())
                    finally:
                        llama_cpp.llama_batch_free(batch)
                    pos += len(chunk)
            finally:
                llama_cpp.llama_free(ctx)
            out[run] = np.concatenate(rows).astype(np.float32)
    finally:
        llama_cpp.llama_model_free(model)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize")
    q.add_argument("src")
    q.add_argument("dst")
    q.add_argument("ftype", choices=sorted(FTYPES))
    r = sub.add_parser("logits")
    r.add_argument("gguf")
    r.add_argument("--ids", type=int, nargs="+", required=True)
    r.add_argument("--runs", default="oneshot,stepwise")
    r.add_argument("--kv", default="f16", choices=sorted(KV_TYPES))
    r.add_argument("--flash-attn", action="store_true")
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--n-ctx", type=int, default=256)
    r.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.command == "quantize":
        quantize(args.src, args.dst, args.ftype)
        return 0
    runs = logits(args.gguf, args.ids, args.runs.split(","), args.kv, args.flash_attn, args.threads, args.n_ctx)
    import llama_cpp

    np.savez(args.out, **runs, system_info=np.array(llama_cpp.llama_print_system_info().decode()),
             version=np.array(llama_cpp.__version__))
    return 0


if __name__ == "__main__":
    sys.exit(main())
