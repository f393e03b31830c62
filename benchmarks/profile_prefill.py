"""Where a prefill's time goes: matrix products (GEMM) against everything else, per operator.

    python benchmarks/profile_prefill.py [--T 512,2048,8192] [--model LFM2-350M] [--threads 2]

Runs ``Model.forward`` on random weights of the preset's shapes (float32, every tensor kept), under
cProfile, and reports, per T: the wall time, the time inside the weight matmuls (``ops.linear``,
``ops.lm_head``) and inside attention's two batched matmuls (``q k^T`` and ``p v``: timed by replaying
each call's shapes), and the rest ("non-GEMM": norms, RoPE, softmax and masking, activations, the conv,
residual adds, copies), with the operators that take it, largest first. Target (issue 15): non-GEMM <= 10%
of the prefill at T >= 512.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def replay_attention_gemm(shapes: list[tuple[int, ...]], dtype) -> float:
    """Seconds of the two batched matmuls of ``ops.attention`` for each recorded (G, R*T, hd, S)."""
    import numpy as np

    rng = np.random.default_rng(0)
    total = 0.0
    for G, rows, hd, S in shapes:
        q, k = rng.standard_normal((G, rows, hd), dtype=dtype), rng.standard_normal((G, S, hd), dtype=dtype)
        p = rng.standard_normal((G, rows, S), dtype=dtype)
        t0 = time.perf_counter()
        _ = q @ k.transpose(0, 2, 1)
        _ = p @ k
        total += time.perf_counter() - t0
    return total


def profile(model, T: int) -> dict:
    import numpy as np

    from lfm2np import ops

    ids = np.random.default_rng(1).integers(0, model.config.vocab_size, size=T)
    model.forward(ids[:8])
    shapes: list[tuple[int, ...]] = []
    real = ops.attention

    def attention(q, k, v, window=None, rnd=ops.exact, start=None):
        G, R = k.shape[1], q.shape[1] // k.shape[1]
        shapes.append((G, R * q.shape[0], q.shape[2], k.shape[0]))
        return real(q, k, v, window, rnd, start)

    ops.attention = attention
    try:
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        model.forward(ids)
        prof.disable()
        wall = time.perf_counter() - t0
    finally:
        ops.attention = real
    stats = pstats.Stats(prof).stats
    own: dict[str, float] = {}
    for (file, _, name), (_, _, tottime, _, _) in stats.items():
        key = f"{Path(file).stem}.{name}" if "lfm2np" in file else name
        own[key] = own.get(key, 0.0) + tottime
    gemm_weights = own.get("ops.linear", 0.0) + own.get("ops.lm_head", 0.0)
    gemm_attention = replay_attention_gemm(shapes, np.float32)
    profiled = sum(own.values())
    scale = wall / profiled if profiled else 1.0  # cProfile's own overhead spread evenly
    gemm = (gemm_weights + gemm_attention) * scale
    rest = {k: v * scale for k, v in own.items() if k not in ("ops.linear", "ops.lm_head")}
    rest["ops.attention"] = max(0.0, rest.get("ops.attention", 0.0) - gemm_attention * scale)
    return {"T": T, "wall_s": wall, "gemm_s": gemm, "non_gemm_s": wall - gemm,
            "non_gemm_share": (wall - gemm) / wall, "top": sorted(rest.items(), key=lambda kv: -kv[1])[:8]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--T", default="512,2048,8192")
    ap.add_argument("--model", default="LFM2-350M")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if os.environ.get("OPENBLAS_NUM_THREADS") != str(args.threads):  # BLAS reads it at import: re-exec
        env = {**os.environ, **{v: str(args.threads) for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                                                              "MKL_NUM_THREADS")}}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    import lfm2np
    from lfm2np.synthetic import random_model

    model = random_model(lfm2np.load_config(args.model), seed=0)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), "?")
    timeout = os.environ.get("OPENBLAS_THREAD_TIMEOUT", "OpenBLAS's default")
    print(f"{args.model}, float32, {args.threads} threads, {cpu}, OPENBLAS_THREAD_TIMEOUT {timeout}")
    for T in (int(x) for x in args.T.split(",")):
        r = profile(model, T)
        print(f"T={T}: {r['wall_s']:.2f} s, GEMM {r['gemm_s']:.2f} s, non-GEMM {r['non_gemm_s']:.2f} s "
              f"({100 * r['non_gemm_share']:.1f}%)")
        print("   " + ", ".join(f"{k} {v:.2f}" for k, v in r["top"] if v >= 0.01))
    return 0


if __name__ == "__main__":
    sys.exit(main())
