"""The real-scale check: LFM2-24B-A2B's shapes on this machine, as bf16 safetensors (47.7 GB, one file, as
released) or as a Q4_K_M GGUF (14.4 GB, llama.cpp's type mix), the GGUF next to llama.cpp in the same run.

    python benchmarks/real_scale.py [--cache /tmp/lfm2np-bench] [--decode 8] [--warm] [--budget 6GiB]
    python benchmarks/real_scale.py --gguf [FILE] [--pairs 2] [--profile] [--llama-python PY]

bf16 (the default): builds the synthetic checkpoint once (random weights, the real tensor names and shapes;
about 8 minutes and 48 GB of disk; reused afterwards), then, in a fresh process: drops the page cache first
when it can (root; ``--warm`` keeps it), loads with the default memory budget (or ``--budget``), prefills 64
tokens, decodes ``--decode`` tokens one at a time, and reports the seconds, the budget and what was resident,
and the peak resident memory of the process (lfm2np reads with pread: no file is mapped, so this is anonymous
memory). Targets (issue 15): prefill of 64 tokens <= 70 s, decode <= 2.5 s per token, peak <= 6 GB.

``--gguf``: takes FILE, or builds ``<cache>/24b-Q4_K_M.gguf`` once from random blocks
(:mod:`random_gguf`, one tensor at a time: a couple of minutes, 14.4 GB of disk), reads it once so the page
cache is warm, then runs the same measurement with lfm2np and, when llama-cpp-python is installed (``--llama-python``,
by default the project's ``vendor/venv-llama``), with llama.cpp (``Llama.eval`` of the same 64 ids, then one
token at a time; 2 threads, as lfm2np's BLAS and passes), and with lfm2np from each ``--before`` tree (an
A/B against older code), taking turns ``--pairs`` times, each in a fresh process, and prints each one's best
and median run and the ratio. llama.cpp maps the file, so its peak
resident memory counts file pages; its anonymous memory is given apart. ``--profile`` adds where lfm2np's
time goes, per stage (reading blocks, dequantising, the matrix products, the rest). Targets (issue 29):
prefill <= 12 s, decode <= 0.7 s per token, peak anonymous memory <= 6 GB.
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
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
LLAMA_PYTHON = HERE.parent / "vendor" / "venv-llama" / "bin" / "python"
PROMPT = [i % 65536 for i in range(1, 65)]


def _decode_ids(k: int, vocab: int) -> int:
    return (7 * k + 3) % vocab


def _memory() -> dict:
    with open("/proc/self/status") as f:
        status = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f
                  if line.startswith(("VmHWM", "VmRSS", "RssAnon", "RssFile"))}
    return {"peak_rss_bytes": status.get("VmHWM"), "rss_anon_end_bytes": status.get("RssAnon"),
            "rss_file_end_bytes": status.get("RssFile")}


def child(path: str, decode: int, budget: str | None, profile: bool = False, tree: str = "") -> dict:
    if tree:  # an older source tree's lfm2np (--before)
        sys.path.insert(0, tree)
    import numpy as np

    import lfm2np

    stages = _profile_stages() if profile else None
    t0, c0 = time.perf_counter(), time.process_time()
    model = lfm2np.load(path, memory_budget=budget)
    res = {"load_s": time.perf_counter() - t0}
    ids = np.asarray(PROMPT) % model.config.vocab_size
    t0, c0 = time.perf_counter(), time.process_time()
    _, state = model.step(ids)
    res["prefill_64_s"], res["prefill_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
    if stages is not None:
        res["prefill_stages_s"] = {k: round(v, 3) for k, v in stages.items()}
        stages.update(dict.fromkeys(stages, 0.0))
    steps, cpu = [], []
    for k in range(decode):
        t0, c0 = time.perf_counter(), time.process_time()
        _, state = model.step([_decode_ids(k, model.config.vocab_size)], state)
        steps.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    if stages is not None and decode:
        res["decode_stages_s"] = {k: round(v / decode, 3) for k, v in stages.items()}
    res["decode_s"], res["decode_cpu_s"] = steps, cpu
    res["decode_median_s"] = sorted(steps)[len(steps) // 2] if steps else None
    res["memory"] = model.memory_report()
    return {**res, **_memory()}


def _profile_stages() -> dict:
    """Seconds spent reading tensor bytes, dequantising and in the matrix products (wall time, summed over the
    threads that call them), and the CPU time of the calling thread in each (``*_cpu``: all of it when the
    passes and the BLAS run on one thread)."""
    from lfm2np import ops
    from lfm2np.io import files, kquants

    stages = {f"{stage}{cpu}": 0.0 for stage in ("read", "dequantize", "products") for cpu in ("", "_cpu")}

    def timed(owner, name: str, stage: str) -> None:
        inner = getattr(owner, name)

        def wrapper(*args, **kwargs):
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                return inner(*args, **kwargs)
            finally:
                stages[stage] += time.perf_counter() - t0
                stages[stage + "_cpu"] += time.thread_time() - c0

        setattr(owner, name, wrapper)

    timed(files.CheckedFile, "read_runs", "read")
    timed(files.CheckedFile, "read_into", "read")
    timed(kquants, "dequantize", "dequantize")
    timed(ops, "linear", "products")
    return stages


def llama_child(path: str, decode: int, threads: int) -> dict:
    """llama.cpp (llama-cpp-python) on the same file: 64 ids as one batch, then one token at a time."""
    import llama_cpp

    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=path, n_ctx=256, n_batch=64, n_ubatch=64, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    res = {"load_s": time.perf_counter() - t0}
    vocab = llm.n_vocab()
    t0, c0 = time.perf_counter(), time.process_time()
    llm.eval([i % vocab for i in PROMPT])
    res["prefill_64_s"], res["prefill_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
    steps, cpu = [], []
    for k in range(decode):
        t0, c0 = time.perf_counter(), time.process_time()
        llm.eval([_decode_ids(k, vocab)])
        steps.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    res["decode_s"], res["decode_cpu_s"] = steps, cpu
    res["decode_median_s"] = sorted(steps)[len(steps) // 2] if steps else None
    return {**res, **_memory()}


def drop_page_cache() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def warm(path: Path) -> float:
    """Read the file once, 64 MiB at a time, so its pages are cached; returns the seconds taken."""
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(64 << 20)
        while f.readinto(buf):
            pass
    return time.perf_counter() - t0


def _run(cmd: list[str], env: dict) -> dict:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), "?")
    return {"cpu": cpu, "loadavg": open("/proc/loadavg").read().split()[:3]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", default="/tmp/lfm2np-bench")
    ap.add_argument("--decode", type=int, default=8)
    ap.add_argument("--warm", action="store_true", help="bf16: keep the page cache (default: drop it first)")
    ap.add_argument("--budget", default=None, help="memory budget (default: lfm2np's default rule)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gguf", nargs="?", const="", default=None, metavar="FILE",
                    help="the Q4_K_M GGUF (default: build <cache>/24b-Q4_K_M.gguf)")
    ap.add_argument("--llama-python", default=str(LLAMA_PYTHON), help="a Python with llama_cpp ('' to skip)")
    ap.add_argument("--pairs", type=int, default=1, help="--gguf: lfm2np / llama.cpp rounds, alternating")
    ap.add_argument("--profile", action="store_true", help="lfm2np: seconds per stage")
    ap.add_argument("--before", action="append", default=[], metavar="TREE",
                    help="--gguf: also lfm2np from an older source tree, taking turns with this one (repeatable)")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    ap.add_argument("--llama-child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        path, decode, budget, profile, tree = args.child
        print(json.dumps(child(path, int(decode), None if budget == "-" else budget, profile == "1", tree)))
        return 0
    if args.llama_child:
        path, decode, threads = args.llama_child
        print(json.dumps(llama_child(path, int(decode), int(threads))))
        return 0
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(args.threads)
    lfm2np_cmd = lambda path, tree="": [sys.executable, __file__, "--child", str(path),  # noqa: E731
                                        str(args.decode), args.budget or "-", "1" if args.profile else "0", tree]
    if args.gguf is not None:
        return gguf_main(args, env, lfm2np_cmd)

    import bench

    directory = bench.ensure_checkpoint(Path(args.cache), "24b")
    cold = False if args.warm else drop_page_cache()
    t0 = time.perf_counter()
    res = _run(lfm2np_cmd(directory), env)
    res.update(cold_page_cache=cold, wall_s=time.perf_counter() - t0, **machine(),
               file_bytes=(directory / "model.safetensors").stat().st_size)
    print(json.dumps(res, indent=1))
    mem = res["memory"]
    print(f"\n{res['cpu']}; page cache {'dropped' if cold else 'warm'}; budget {mem['budget_bytes'] / 1e9:.2f} GB")
    print(f"prefill 64 tokens: {res['prefill_64_s']:.1f} s (target <= 70)")
    if res["decode_median_s"] is not None:
        print(f"decode: median {res['decode_median_s']:.2f} s/token over {args.decode} (target <= 2.5)")
    print(f"peak resident: {res['peak_rss_bytes'] / 1e9:.2f} GB (target <= 6)")
    return 0


def gguf_main(args: argparse.Namespace, env: dict, lfm2np_cmd) -> int:
    """The GGUF run: lfm2np and llama.cpp on the same Q4_K_M file, alternating, printed side by side."""
    path = Path(args.gguf) if args.gguf else Path(args.cache) / "24b-Q4_K_M.gguf"
    if not path.is_file():
        import bench
        import random_gguf

        print(f"[build] {path} ...", flush=True)
        t0 = time.perf_counter()
        random_gguf.build(path, bench.model_config("24b"))
        print(f"[build] {path.stat().st_size / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"[warm] {path}: read in {warm(path):.1f} s", flush=True)
    llama = args.llama_python if args.llama_python and Path(args.llama_python).is_file() else None
    if llama is None:
        print(f"[llama.cpp] skipped: no Python at --llama-python {args.llama_python!r}", flush=True)
    commands = {"lfm2np": lfm2np_cmd(path)}
    commands.update({f"lfm2np before ({tree})": lfm2np_cmd(path, str(Path(tree).resolve())) for tree in args.before})
    if llama:
        commands["llama.cpp"] = [llama, __file__, "--llama-child", str(path), str(args.decode), str(args.threads)]
    runs: dict[str, list[dict]] = {name: [] for name in commands}
    for _ in range(args.pairs):
        for name, cmd in commands.items():
            runs[name].append(_run(cmd, env))
            print(f"[{name}] {_line(runs[name][-1])}", flush=True)
    info = {**machine(), "file": str(path), "file_bytes": path.stat().st_size, "threads": args.threads}
    print(json.dumps({**info, "runs": runs}, indent=1))
    print(f"\n{info['cpu']}, {os.cpu_count()} cores; page cache warm; load average {' '.join(info['loadavg'])}")
    print(_table(runs))
    return 0


def _line(r: dict) -> str:
    mem = f"peak RSS {r['peak_rss_bytes'] / 1e9:.2f} GB, anonymous at the end {r['rss_anon_end_bytes'] / 1e9:.2f} GB"
    stages = {k: r[k] for k in ("prefill_stages_s", "decode_stages_s") if k in r}
    decode = "-" if r["decode_median_s"] is None else f"{r['decode_median_s']:.3f}"
    steps = sorted(r.get("decode_cpu_s") or [0.0])
    cpu = f" (CPU time of the process: {r['prefill_cpu_s']:.1f} s, {steps[len(steps) // 2]:.2f} s/token)"
    return f"prefill {r['prefill_64_s']:.2f} s, decode {decode} s/token{cpu}, {mem} {stages or ''}"


def _table(runs: dict[str, list[dict]]) -> str:
    """Per configuration: prefill and decode, the best run and the median one (each on its own), the largest
    peak RSS and anonymous memory at the end; then lfm2np / llama.cpp on the best runs."""
    def best_median(values: list[float]) -> tuple[float, float]:
        values = sorted(values)
        return values[0], values[len(values) // 2]

    rows = {name: (best_median([r["prefill_64_s"] for r in rs]), best_median([r["decode_median_s"] or 0 for r in rs]),
                   max(r["peak_rss_bytes"] for r in rs), max(r["rss_anon_end_bytes"] for r in rs))
            for name, rs in runs.items() if rs}
    lines = ["| | prefill 64 tokens, best (median) | decode, best (median) | peak RSS | anonymous at the end |",
             "|---|---|---|---|---|"]
    for name, ((p, pm), (d, dm), peak, anon) in rows.items():
        lines.append(f"| {name} | {p:.2f} s ({pm:.2f}) | {d:.3f} s/token ({dm:.3f}) | {peak / 1e9:.2f} GB | "
                     f"{anon / 1e9:.2f} GB |")
    if "lfm2np" in rows and "llama.cpp" in rows:
        (p1, _), (d1, _) = rows["lfm2np"][:2]
        (p2, _), (d2, _) = rows["llama.cpp"][:2]
        lines.append(f"| lfm2np / llama.cpp | {p1 / p2:.1f}x | {d1 / d2 if d2 else float('nan'):.1f}x | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
