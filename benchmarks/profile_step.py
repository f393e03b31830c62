"""Where lfm2np spends its time: cProfile of decode steps or of a prefill on a benchmark checkpoint.

    python benchmarks/profile_step.py /tmp/lfm2np-bench/350m                      # 8 decode steps @512
    python benchmarks/profile_step.py /tmp/lfm2np-bench/350m --prefill 512        # one 512-token prefill
    python benchmarks/profile_step.py /tmp/lfm2np-bench/8b-cut --memory-budget 0
    python benchmarks/profile_step.py moe64 --prefill 128                         # one-layer 64-expert model

Checkpoints are the ones ``benchmarks/bench.py`` builds. Set OPENBLAS_NUM_THREADS=2 as the benchmark does.
Prints the functions with the most own time (numpy ufuncs and BLAS calls show as built-in methods,
e.g. ``numpy.ndarray.astype`` or ``{built-in method numpy...}``; ``matmul`` is ``x @ w.T`` in ops.linear).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

import lfm2np  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint", help="a checkpoint directory, or moe8 / moe64 (one-layer MoE in memory)")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--prefill", type=int, default=0, help="profile one prefill of this length instead")
    ap.add_argument("--memory-budget", default=None, help="e.g. 0, 2GiB, all (default: lfm2np's default)")
    ap.add_argument("--top", type=int, default=18)
    args = ap.parse_args()

    if args.checkpoint.startswith("moe"):
        from lfm2np.synthetic import random_model

        E = int(args.checkpoint[3:])
        config = lfm2np.load_config("LFM2-8B-A1B").replace(
            num_hidden_layers=1, layer_types=("full_attention",), num_dense_layers=0, num_experts=E, vocab_size=256)
        model = random_model(config)
    else:
        model = lfm2np.load(args.checkpoint, memory_budget=args.memory_budget)
    V = model.config.vocab_size
    rng = np.random.default_rng(0)
    ids = rng.integers(0, V, size=max(args.context, args.prefill, 1))
    model.forward(ids[:1])  # widen / touch weights outside the profile
    prof = cProfile.Profile()
    if args.prefill:
        model.forward(ids[: args.prefill])  # warm
        t0 = time.perf_counter()
        prof.enable()
        model.forward(ids[: args.prefill])
        prof.disable()
        what = f"prefill T={args.prefill}"
        n = args.prefill
    else:
        _, state = model.step(ids[: args.context])
        _, state = model.step([1], state)  # warm
        t0 = time.perf_counter()
        prof.enable()
        for tok in rng.integers(0, V, size=args.steps):
            _, state = model.step([int(tok)], state)
        prof.disable()
        what = f"{args.steps} decode steps @ctx {args.context}"
        n = args.steps
    wall = time.perf_counter() - t0
    print(f"{model!r}\n{what}: {wall:.3f} s ({n / wall:.2f} tok/s, profiled)")
    pstats.Stats(prof).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
