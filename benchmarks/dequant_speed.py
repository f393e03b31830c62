"""How fast lfm2np dequantises GGUF blocks: billions of weights per second, per type, on one thread and on all.

    python benchmarks/dequant_speed.py                              # Q4_K Q5_K Q6_K Q8_0 Q4_0, 5 rounds
    python benchmarks/dequant_speed.py --types Q4_K,Q6_K --rounds 9 --before /tmp/before   # against an older tree

Each type's random blocks (finite f16 scales, every other bit random) hold one expert matrix of LFM2-24B-A2B
(1536 x 2048 weights, ``--values``), and are dequantised into one float32 buffer, as a product reads them
(:func:`lfm2np.io.kquants.dequantize` with ``out=``; a tree without ``out`` gets a copy into it, and a type
its ``kquants`` lacks goes through gguf-py, as that tree did). Every
configuration (this tree on all threads and on one, ``--before`` trees) runs in its own process, the
configurations taking turns, ``--rounds`` times (several helpers may share the machine: paired, alternating
runs, and the load average printed). A process times each type ``--repeat`` times and keeps its best; the
table gives the best and the median over the rounds, in 10^9 weights per second of wall time, and the rate
per second of CPU time of the process (all its threads). The goal (issue 29): >= 2 for Q4_K and Q6_K.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TYPES = ("Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0")


def child(types: list[str], values: int, repeat: int, threads: int) -> dict:
    import numpy as np

    from lfm2np import passes
    from lfm2np.io import kquants

    if threads:
        passes.THREADS = threads
    random_gguf = _random_gguf()
    rng = np.random.default_rng(0)
    out = np.empty(values, np.float32)
    runs = {}
    for kind in types:
        raw = random_gguf.random_blocks(rng, kind, (values // 2048, 2048), 0.02)
        if kind not in kquants.DEQUANTIZERS:  # a tree that left this type to gguf-py
            import gguf

            qtype = gguf.GGMLQuantizationType[kind]
            run = lambda raw=raw, qtype=qtype: np.copyto(  # noqa: E731
                out, gguf.quants.dequantize(raw, qtype).reshape(-1))
        else:
            try:
                run = lambda raw=raw, kind=kind: kquants.dequantize(raw, kind, out=out)  # noqa: E731
                run()
            except TypeError:  # a tree from before out=
                run = lambda raw=raw, kind=kind: np.copyto(out, kquants.dequantize(raw, kind))  # noqa: E731
        runs[kind] = run
    for run in runs.values():  # once each, untimed: the first calls of a process pay its allocator's page faults
        run()
    res = {}
    for kind, run in runs.items():
        best, best_cpu = float("inf"), float("inf")
        for _ in range(repeat):
            t0, c0 = time.perf_counter(), time.process_time()
            run()
            best, best_cpu = min(best, time.perf_counter() - t0), min(best_cpu, time.process_time() - c0)
        res[kind] = {"gw_s": values / best / 1e9, "gw_cpu_s": values / best_cpu / 1e9}
    return res


def _random_gguf():
    sys.path.insert(0, str(HERE))
    import random_gguf

    return random_gguf


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--values", type=int, default=1536 * 2048)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--before", action="append", default=[], help="an older source tree (repeatable)")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        types, values, repeat, threads = args.child
        print(json.dumps(child(types.split(","), int(values), int(repeat), int(threads))))
        return 0
    types = args.types.split(",")
    configs = [("this tree, all threads", HERE.parent, 0), ("this tree, 1 thread", HERE.parent, 1)]
    configs += [(f"before ({tree})", Path(tree), 0) for tree in args.before]
    results: dict[str, list[dict]] = {name: [] for name, _, _ in configs}
    loads = []
    for _ in range(args.rounds):
        loads.append(float(open("/proc/loadavg").read().split()[0]))
        for name, tree, threads in configs:
            env = {**os.environ, "PYTHONPATH": str(tree)}
            proc = subprocess.run([sys.executable, __file__, "--child", ",".join(types), str(args.values),
                                   str(args.repeat), str(threads)], env=env, capture_output=True, text=True)
            if proc.returncode:
                print(proc.stderr[-2000:], file=sys.stderr)
                return 1
            results[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               "?")
    print(f"{cpu}, {os.cpu_count()} cores; {args.values} weights per tensor, into one float32 buffer; "
          f"{args.rounds} rounds, load average {min(loads):.1f}-{max(loads):.1f}")
    print("\n10^9 weights/s: best of the rounds (median) [per CPU-second, best]\n")
    print("| | " + " | ".join(types) + " |")
    print("|---" * (len(types) + 1) + "|")
    for name, rounds in results.items():
        cells = []
        for kind in types:
            rates = sorted(r[kind]["gw_s"] for r in rounds)
            cpu_rate = max(r[kind]["gw_cpu_s"] for r in rounds)
            cells.append(f"{rates[-1]:.2f} ({rates[len(rates) // 2]:.2f}) [{cpu_rate:.2f}]")
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
