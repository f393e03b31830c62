#!/usr/bin/env python
"""Decode speed from a Q4_K_M GGUF file of a real shape, for one or two lfm2np source trees.

    python benchmarks/gguf_decode.py                                # this tree
    git worktree add /tmp/before 2d9c3d7                            # an older tree to compare with
    python benchmarks/gguf_decode.py --before /tmp/before --steps 16
    python benchmarks/gguf_decode.py --against-safetensors          # the GGUF next to bf16 safetensors

1. Writes (once, cached in ``--dir``, default ``/tmp/lfm2np-bench``) LFM2-8B-A1B cut to its first ``--layers``
   layers (default 4: two conv layers with dense FFNs, then an attention and a conv layer with 32-expert MoE
   FFNs, top-4; the full 65536 x 2048 tied embedding) with random weights, every tensor in the type
   llama-quantize gives it in a Q4_K_M file (:func:`lfm2np.calc.quant.tensor_types`), by this tree's
   :func:`lfm2np.io.gguf_write.write_gguf`.
2. For each tree (``PYTHONPATH`` = the tree, a fresh process each, ``--threads`` BLAS threads) and each
   memory budget of ``--budget`` ("all": every converted tensor kept; "0": none; or a size): load the
   file, prefill 8 tokens with ``model.step`` (it dequantises what it touches first), then time ``--steps`` single-token greedy steps ("cold": new experts are dequantised as
   the steps choose them). With kept weights, then dequantise every remaining tensor and time ``--steps``
   more ("warm": the steady state, median step). Reports load time, prefill, first step, cold tokens/s
   (steps / total time), the rest's dequantisation, warm tokens/s and peak RSS: the best of ``--repeat``
   interleaved runs (the machine may be shared: the load average is printed).
3. ``--against-safetensors``: the same random weights (before quantisation) are also written once as a bf16
   safetensors checkpoint, measured the same way in the same interleaved rounds, and the GGUF's rates are
   given as a ratio of the safetensors' (issue 15's target: decode within 2x, a ratio >= 0.5); with
   ``--before``, the older tree's bf16 safetensors runs are measured too ("before st").

Only ``lfm2np.load(path, memory_budget=...)`` (``keep_weights=`` in trees older than the budget) and
``Model.step(ids, state)`` are used.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
PROMPT = [1, 422, 1119, 7, 33, 9021, 64, 12000]


def _cut_config(layers: int):
    sys.path.insert(0, str(HERE))
    import lfm2np

    c = lfm2np.load_config("LFM2-8B-A1B")
    return c.replace(num_hidden_layers=layers, layer_types=tuple(c.layer_types[:layers]))


def make_file(path: Path, layers: int) -> None:
    """The cut LFM2-8B-A1B as a Q4_K_M GGUF (this tree's writer and type rules)."""
    from lfm2np.calc import quant
    from lfm2np.io.gguf_write import write_gguf
    from lfm2np.synthetic import random_params

    c = _cut_config(layers)
    t0 = time.perf_counter()
    params = random_params(c, seed=0)
    types = quant.tensor_types(c, "Q4_K_M")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    write_gguf(tmp, c, params, types)
    os.replace(tmp, path)
    print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB, {sorted(set(types.values()))}) in "
          f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)


def make_safetensors(directory: Path, layers: int) -> None:
    """The same cut, the same random weights (seed 0, before quantisation), as a bf16 safetensors checkpoint."""
    import shutil

    from lfm2np.io.safetensors import save_checkpoint
    from lfm2np.synthetic import random_params

    c = _cut_config(layers)
    tmp = directory.with_name(directory.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    save_checkpoint(tmp, c, random_params(c, seed=0), dtype="bfloat16")
    os.replace(tmp, directory)
    print(f"wrote {directory} ({(directory / 'model.safetensors').stat().st_size / 1e9:.2f} GB)", file=sys.stderr)


def _decode(model, state, token, steps):
    import numpy as np

    wall, cpu, tokens = [], [], []
    for _ in range(steps):
        s, c = time.perf_counter(), time.process_time()
        logits, state = model.step(np.array([token]), state)
        wall.append(time.perf_counter() - s)
        cpu.append(time.process_time() - c)
        token = int(np.argmax(logits[-1]))
        tokens.append(token)
    return wall, cpu, state, tokens


def _load(path: Path, budget: str):
    """lfm2np.load with the memory budget ``budget`` ("all", "0" or a size); trees older than the budget had
    the keep_weights switch (True for any budget but 0)."""
    import inspect

    import lfm2np

    if "memory_budget" in inspect.signature(lfm2np.load).parameters:
        return lfm2np.load(path, memory_budget=budget)
    return lfm2np.load(path, keep_weights=budget != "0")


def measure(path: Path, budget: str, steps: int) -> dict:
    """Run in the child: load, prefill, timed decode steps (cold: right after the prefill, dequantising the
    experts the steps choose; warm, with kept weights: after every tensor was dequantised once). Rates by
    wall clock and by this process's CPU time (all threads), which a busy machine disturbs less."""
    import numpy as np

    import lfm2np

    t0 = time.perf_counter()
    model = _load(path, budget)
    keep = budget == "all"
    t1 = time.perf_counter()
    logits, state = model.step(np.array(PROMPT))
    t2 = time.perf_counter()
    wall, cpu, state, tokens = _decode(model, state, int(np.argmax(logits[-1])), steps)
    out = {"lfm2np": str(Path(lfm2np.__file__).parent), "memory_budget": budget, "load_s": t1 - t0,
           "prefill_s": t2 - t1, "cold_tok_s": steps / sum(wall), "cold_cpu_tok_s": steps / sum(cpu),
           "first_step_s": wall[0], "tokens": tokens}
    if keep:
        t3 = time.perf_counter()
        for name in model.params:  # every tensor dequantised (and kept) once
            model.params[name]
        out["dequantise_rest_s"] = time.perf_counter() - t3
        wall, cpu, state, more = _decode(model, state, tokens[-1], steps)
        out["warm_tok_s"] = float(1 / np.median(wall))
        out["warm_cpu_tok_s"] = float(1 / np.median(cpu))
        out["tokens"] += more
    with open("/proc/self/status") as f:
        out["peak_rss_gb"] = next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM")), 0) / 1e9
    return out


def run_tree(tree: Path, path: Path, budget: str, steps: int, threads: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, __file__, "--child", str(path), "--budget", budget, "--steps", str(steps)],
                         env=env, cwd="/", capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{tree}: the measurement failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if not result["lfm2np"].startswith(str(tree.resolve())):
        raise SystemExit(f"{tree}: the child imported lfm2np from {result['lfm2np']}")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3, help="runs per tree and setting (the best is shown)")
    p.add_argument("--dir", type=Path, default=Path("/tmp/lfm2np-bench"))
    p.add_argument("--before", type=Path, help="another lfm2np source tree to measure too (e.g. a git worktree)")
    p.add_argument("--against-safetensors", action="store_true",
                   help="also measure the same weights as bf16 safetensors, and give the GGUF's ratio")
    p.add_argument("--budget", default="all,0",
                   help="comma list of memory budgets: all (every converted tensor kept; also times the warm "
                        "state), 0 (none), or a size such as 1GiB (default: all,0)")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.budget, args.steps)))
        return
    path = args.dir / f"lfm2-8b-a1b-{args.layers}l-Q4_K_M.gguf"
    if not path.is_file():
        make_file(path, args.layers)
    subjects = [("before", args.before, path)] if args.before else []
    subjects.append(("gguf" if args.against_safetensors else "after", HERE, path))
    if args.against_safetensors:
        st = args.dir / f"lfm2-8b-a1b-{args.layers}l-bf16"
        if not (st / "model.safetensors").is_file():
            make_safetensors(st, args.layers)
        subjects.append(("bf16 st", HERE, st))
        if args.before:  # the bf16 path of the older tree too
            subjects.insert(1, ("before st", args.before, st))
    budgets = [b for b in args.budget.split(",") if b]
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.strip()
    print(f"{path.name}: {path.stat().st_size / 1e9:.2f} GB; {' '.join(cpu.split())}; {args.threads} threads; "
          f"{args.steps} steps; load average {os.getloadavg()[0]:.2f} at the start")
    print(f"{'run':8} {'budget':7} {'load s':>7} {'prefill s':>9} {'cold tok/s':>10} {'(CPU)':>7} "
          f"{'rest deq. s':>11} {'warm tok/s':>10} {'(CPU)':>7} {'peak RSS GB':>11}")
    for budget in budgets:
        keep = budget == "all"
        runs: dict[str, list[dict]] = {label: [] for label, _, _ in subjects}
        for _ in range(args.repeat):  # interleaved, so a burst of load elsewhere hits every subject alike
            for label, tree, target in subjects:
                runs[label].append(run_tree(tree, target, budget, args.steps, args.threads))
        best = {}
        for label, _, _ in subjects:
            r = best[label] = {k: (max if k.endswith("tok_s") else min)(x[k] for x in runs[label])
                               for k in runs[label][0] if isinstance(runs[label][0][k], float)}
            rest = f"{r['dequantise_rest_s']:11.2f}" if keep else f"{'-':>11}"
            warm = f"{r['warm_tok_s']:10.2f} {r['warm_cpu_tok_s']:7.2f}" if keep else f"{'-':>10} {'-':>7}"
            print(f"{label:8} {budget:7} {r['load_s']:7.2f} {r['prefill_s']:9.2f} "
                  f"{r['cold_tok_s']:10.2f} {r['cold_cpu_tok_s']:7.2f} {rest} {warm} {r['peak_rss_gb']:11.2f}",
                  flush=True)
        # the same file gives the same tokens in every run and tree (the GGUF's differ from bf16's: quantised)
        for target in dict.fromkeys(t for _, _, t in subjects):
            tokens = {tuple(r["tokens"]) for label, _, t in subjects if t == target for r in runs[label]}
            print(f"  {target.name}: generated tokens {'identical in every run' if len(tokens) == 1 else 'DIFFER'}")
        if args.against_safetensors:
            g, b = best["gguf"], best["bf16 st"]
            ratios = [f"cold {g['cold_tok_s'] / b['cold_tok_s']:.2f}x"]
            if keep:
                ratios.append(f"warm {g['warm_tok_s'] / b['warm_tok_s']:.2f}x")
            print(f"  GGUF / bf16 safetensors decode rate: {', '.join(ratios)} (target >= 0.5x: within 2x)")
    print(f"best of {args.repeat} runs per row (max rate, min time); load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
