#!/usr/bin/env python
"""Dump every intermediate of a llama.cpp forward pass as a safetensors trace, for `lfm2np compare`.

    venv-llama/bin/python tools/dump_llama_cpp_trace.py MODEL.gguf --ids 1 5 17 42 --out llama.safetensors
    lfm2np trace MODEL.gguf --ids 1 5 17 42 --out ours.safetensors
    lfm2np compare ours.safetensors llama.safetensors --tier fp32 --all

Opt-in, not part of CI: needs llama-cpp-python (it compiles llama.cpp, ~10 minutes; see
tools/compare_llama_cpp.py for the venv). The ids are evaluated as one batch (one ubatch, logits at every
position, no BOS added) with an F32 KV cache (``--kv f16``: llama.cpp's default) and without flash attention
(``--flash-attn``: with), through llama-cpp-python's low-level API with an eval callback
(``llama_context_params.cb_eval``): ggml's scheduler asks the callback about every graph node (ask=True;
we say yes to all) and calls it again with the computed tensor (ask=False). Every F32 tensor is copied out
(``ggml_backend_tensor_get``, honouring the strides of views) with ggml's dims reversed, so ``ne = [hd, H, T]``
is ``(T, H, hd)``. Keys are llama.cpp's tensor names (``model.layers.{}.conv.conv-3``, ``ffn_moe_logits-3``,
``result_output``, ...); `lfm2np.oracle.trace.llama_cpp_alias` maps lfm2np's names onto them. A name llama.cpp
gives to several tensors is kept as ``name#1``, ``name#2``, ... and, for the last of them, ``name``.
Non-F32 tensors (I32 expert indices ``ffn_moe_topk-*``) are listed but not written, unless ``--ints``
(then ``compare`` checks the routing too).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
from pathlib import Path

import numpy as np

GGML_MAX_DIMS, GGML_MAX_SRC, GGML_MAX_OP_PARAMS, GGML_MAX_NAME = 4, 10, 64, 64
GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_I32 = 0, 1, 26
_NUMPY = {GGML_TYPE_F32: np.float32, GGML_TYPE_F16: np.float16, GGML_TYPE_I32: np.int32}
_QUIET = None  # the log callback must outlive every llama.cpp call, or llama.cpp calls freed memory


class GgmlTensor(ctypes.Structure):
    """The head of ``struct ggml_tensor`` (ggml.h) up to ``name``: type, ne, nb."""

    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p),
                ("ne", ctypes.c_int64 * GGML_MAX_DIMS), ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
                ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
                ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * GGML_MAX_SRC),
                ("view_src", ctypes.c_void_p), ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p),
                ("name", ctypes.c_char * GGML_MAX_NAME)]


def _ggml():
    """libggml-base from llama-cpp-python's own lib directory (the copy libllama already loaded)."""
    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_get_name.argtypes, lib.ggml_get_name.restype = [ctypes.c_void_p], ctypes.c_char_p
    lib.ggml_nbytes.argtypes, lib.ggml_nbytes.restype = [ctypes.c_void_p], ctypes.c_size_t
    lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    lib.ggml_backend_tensor_get.restype = None
    return lib


def dump(gguf: "str | Path", ids: list[int], threads: int = 2, ints: bool = False, verbose: bool = False,
         kv: str = "f32", flash_attn: bool = False
         ) -> tuple[dict[str, np.ndarray], np.ndarray, list[tuple[str, str, list[int]]]]:
    """Run llama.cpp on ``ids`` (one sequence, one batch). Returns the observed tensors by name (graph order),
    the logits (T, vocab) and the tensors not kept (name, ggml type, shape)."""
    import llama_cpp

    ggml = _ggml()
    seen: list[tuple[str, np.ndarray]] = []
    skipped: list[tuple[str, str, list[int]]] = []

    def observe(t: int, ask: bool, _user: int) -> bool:
        if ask:
            return True  # observe every node (the scheduler then computes node by node)
        try:
            head = GgmlTensor.from_address(t)
            name = ggml.ggml_get_name(t).decode()
            dims = list(head.ne)
            while len(dims) > 1 and dims[-1] == 1:  # ggml_n_dims: trailing unit dims are not dims
                dims.pop()
            shape, strides = tuple(reversed(dims)), tuple(reversed(list(head.nb)[: len(dims)]))
            dtype = _NUMPY.get(head.type)
            if 0 in shape or dtype is None or (dtype is not np.float32 and not ints):
                skipped.append((name, "empty" if 0 in shape else f"ggml type {head.type}", list(shape)))
                return True
            nbytes = ggml.ggml_nbytes(t)  # covers the strided extent of a view
            raw = np.empty(-(-nbytes // np.dtype(dtype).itemsize), dtype=dtype)
            ggml.ggml_backend_tensor_get(t, raw.ctypes.data, 0, nbytes)
            a = np.array(np.lib.stride_tricks.as_strided(raw, shape=shape, strides=strides))
            seen.append((name, a.astype(np.float32) if dtype is np.float16 else a))
        except Exception as e:  # never let an exception unwind through C
            print(f"callback error on a tensor: {type(e).__name__}: {e}", file=sys.stderr)
        return True

    global _QUIET
    callback = llama_cpp.ggml_backend_sched_eval_callback(observe)  # must outlive every llama.cpp call below
    if not verbose:
        _QUIET = _QUIET or llama_cpp.llama_log_callback(lambda *a: None)
        llama_cpp.llama_log_set(_QUIET, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    mparams = llama_cpp.llama_model_default_params()
    mparams.n_gpu_layers = 0
    model = llama_cpp.llama_model_load_from_file(str(gguf).encode(), mparams)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {gguf}")
    T = len(ids)
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx = max(64, T)
    cparams.n_batch = cparams.n_ubatch = T
    cparams.n_seq_max = 1
    cparams.n_threads = cparams.n_threads_batch = threads
    cparams.type_k = cparams.type_v = {"f32": GGML_TYPE_F32, "f16": GGML_TYPE_F16}[kv]
    cparams.flash_attn_type = 1 if flash_attn else 0  # ENABLED, or DISABLED: the plain kq / softmax / kqv graph
    cparams.cb_eval = callback
    cparams.cb_eval_user_data = None
    ctx = llama_cpp.llama_init_from_model(model, cparams)
    if not ctx:
        llama_cpp.llama_model_free(model)
        raise RuntimeError("llama.cpp could not create a context")
    batch = llama_cpp.llama_batch_init(T, 0, 1)
    try:
        for i, tok in enumerate(ids):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, i, 1, 1
            batch.seq_id[i][0] = 0
        batch.n_tokens = T
        seen.clear()  # anything observed while the context was set up is not this pass
        skipped.clear()
        rc = llama_cpp.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(ctx), shape=(T, n_vocab)).copy()
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)
    return _unique(seen), logits, skipped


def _unique(seen: list[tuple[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Keys in graph order. llama.cpp gives some names to several tensors (``Qcur-1`` is the (T, H*hd)
    projection and then its (T, H, hd) view; ``norm-1`` every unweighted RMSNorm): the last one keeps the
    name, the earlier ones are ``name#1``, ``name#2``, ..."""
    total: dict[str, int] = {}
    for name, _ in seen:
        total[name] = total.get(name, 0) + 1
    count: dict[str, int] = {}
    out = {}
    for name, a in seen:
        count[name] = count.get(name, 0) + 1
        out[name if count[name] == total[name] else f"{name}#{count[name]}"] = a
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("gguf")
    p.add_argument("--ids", type=int, nargs="+", required=True)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ints", action="store_true", help="also write I32/F16 tensors (token ids, expert indices)")
    p.add_argument("--list", action="store_true", help="print every tensor name, ggml-reversed shape and kept/not")
    p.add_argument("--verbose", action="store_true", help="keep llama.cpp's log")
    p.add_argument("--kv", default="f32", choices=["f32", "f16"], help="KV cache type (default f32)")
    p.add_argument("--flash-attn", action="store_true", help="flash attention (default off)")
    args = p.parse_args(argv)
    try:
        import llama_cpp
    except ImportError:
        print("needs llama-cpp-python: see this script's docstring", file=sys.stderr)
        return 2
    from safetensors.numpy import save_file

    tensors, logits, skipped = dump(args.gguf, args.ids, args.threads, args.ints, args.verbose, args.kv,
                                    args.flash_attn)
    if "result_output" in tensors and not np.array_equal(tensors["result_output"].reshape(logits.shape), logits):
        print("warning: result_output differs from llama_get_logits", file=sys.stderr)
    path = args.out if args.out.suffix == ".safetensors" else args.out.with_suffix(".safetensors")
    meta = {"source": "llama.cpp", "llama_cpp_python": llama_cpp.__version__, "model": str(args.gguf),
            "ids": args.ids, "kv_cache": args.kv, "flash_attn": args.flash_attn}
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path),
              metadata={"order": json.dumps(list(tensors)), "meta": json.dumps(meta)})
    if args.list:
        for k, v in tensors.items():
            print(f"{k:48s} {str(list(v.shape)):18s} {v.dtype}")
        for name, typ, shape in skipped:
            print(f"{name:48s} {str(shape):18s} {typ} (not written)")
    print(f"wrote {len(tensors)} tensors to {path} ({len(skipped)} non-F32 or empty tensors not written)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
