"""Benchmark lfm2np against transformers on synthetic checkpoints with the released shapes.

One command::

    python benchmarks/bench.py                          # everything, ~30-40 min on 2 cores
    python benchmarks/bench.py --quick                  # smoke run: small T, one repetition, < 3 min
    python benchmarks/bench.py --models 350m,1.2b,8b-cut --checks moe,long,memory
    python benchmarks/bench.py --models '' --checks real,gguf   # the real-scale and GGUF checks only

What it does:

1. Builds synthetic checkpoints (random weights, the real tensor names and shapes, bf16 on disk as the
   models are released; the router's expert_bias stays float32) into a cache directory, default
   ``/tmp/lfm2np-bench``, reused across runs. Tensors are generated and written one at a time, so building
   the 3.3 GB MoE checkpoint needs little memory.

   - ``350m``: LFM2-350M, whole (16 layers).
   - ``1.2b``: LFM2-1.2B, whole (16 layers).
   - ``8b-cut``: LFM2-8B-A1B cut to its first 6 layers (2 dense conv layers, then 1 attention + 3 conv
     layers with 32-expert MoE FFNs, top-4), the layer kinds of the released model's layers 0-5.

2. For each model and framework, in a separate process (so peak RSS is per framework and per run):
   load time, prefill tokens/s at T = 128, 512, 2048, decode tokens/s at a context of 512 (32 single-token
   steps after a 512-token prefill, with lfm2np's State / transformers' cache; prefill up to 512 and decode:
   the best of 3 runs), "ready" time (load, plus
   widening every kept tensor and a 1-token forward: what transformers' load does), peak RSS (VmHWM; it counts
   memory-mapped file pages that were read), checkpoint size. transformers runs in float32 on CPU with the
   same thread count, when torch and transformers are importable in the interpreter given by ``--torch-python``
   (default: this one, else /work/venv-ref/bin/python).

3. Checks of the targets of issues 7 and 15:
   - ``moe``: a one-layer MoE model (8B-A1B widths, attention mixer, vocab 256) with 64 experts vs 8 experts at
     top-4: time ratio for decode and prefill (target <= 1.5x), lfm2np and (randomly initialised)
     transformers.
   - ``long``: an 8K-token prefill of the 350M checkpoint, peak RSS (target: a few GB); one-shot
     ``forward`` and ``step`` in chunks of 512, and transformers for reference.
   - ``memory``: the 8B-A1B(cut) bf16 checkpoint with ``memory_budget=0`` (peak RSS vs file size,
     target <= ~1.25x) next to ``memory_budget="all"`` (``--budgets`` gives other budgets to compare).
   - ``real`` (not in the default list): ``benchmarks/real_scale.py``, LFM2-24B-A2B's shapes in bf16
     (47.7 GB; built once on demand, about 8 minutes and 48 GB of disk), cold page cache, default budget:
     prefill of 64 tokens, decode, peak resident memory (targets of issue 15: <= 70 s, <= 2.5 s/token, <= 6 GB).
   - ``gguf`` (not in the default list): ``benchmarks/gguf_decode.py --against-safetensors``, LFM2-8B-A1B cut to
     4 layers as a Q4_K_M GGUF next to the same weights as bf16 safetensors: decode within 2x (issue 15).

Threads: every child gets OPENBLAS_NUM_THREADS = OMP_NUM_THREADS = MKL_NUM_THREADS = ``--threads``
(default 2) and torch.set_num_threads(threads). ``--unset-coretype`` removes OPENBLAS_CORETYPE and
OPENBLAS_L2_SIZE from the children's environment (never do that in tests or CI). Each child reports the
BLAS library and kernel numpy uses (threadpoolctl, if installed). The children inherit the rest of the
environment: ``OPENBLAS_THREAD_TIMEOUT=4 python benchmarks/bench.py ...`` measures lfm2np with OpenBLAS's
idle workers sleeping at once (docs/performance.md, "Where prefill time goes"); the machine line records it.

Disturbance: other processes on the machine skew timings. For each child the parent measures the CPU time
the rest of the machine used meanwhile (from /proc/stat minus the child's own rusage) and prints it as
"other cores" (average number of cores busy with something else); ``--retry-busy X`` reruns a child (up to
``--retries`` times, default 2) when that exceeds X (default 0.3) and keeps the least disturbed run.

Results are printed as a table and written as JSON to ``--out`` (default ``<cache>/results.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MODELS = {
    # name: (preset, cut to n layers or None)
    "350m": ("LFM2-350M", None),
    "1.2b": ("LFM2-1.2B", None),
    "8b-cut": ("LFM2-8B-A1B", 6),
    "24b": ("LFM2-24B-A2B", None),  # 47.7 GB of bf16: built only when asked for (--checks real)
}
MOE_DECODE_CONTEXT = 128


# ============================================================================ helpers (child and parent)
def vm_hwm() -> int:
    """Peak resident set size of this process in bytes (VmHWM), includes mapped file pages read."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def vm_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def blas_info() -> list[dict]:
    try:
        import threadpoolctl
    except ImportError:
        return [{"note": "threadpoolctl not installed"}]
    keep = ("internal_api", "version", "architecture", "num_threads", "threading_layer", "filepath")
    return [{k: d.get(k) for k in keep} for d in threadpoolctl.threadpool_info()]


def model_config(name: str):
    import lfm2np

    preset, cut = MODELS[name]
    config = lfm2np.load_config(preset)
    if cut is not None:
        config = config.replace(num_hidden_layers=cut, layer_types=tuple(config.layer_types[:cut]))
    return config


# ============================================================================ building checkpoints
def _random_tensor(rng, name: str, shape: tuple[int, ...]):
    """The scales of lfm2np.synthetic.random_params (activations of order one), drawn in float32."""
    import numpy as np

    if name.endswith(("norm.weight", "layernorm.weight")):
        return (0.5 + rng.random(shape, dtype=np.float32)).astype(np.float32)
    if name.endswith("expert_bias"):
        return (0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
    if name.endswith(".bias"):
        return (0.3 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return rng.standard_normal(shape, dtype=np.float32)
    if name.endswith("conv.conv.weight"):
        return (0.6 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
    x = rng.standard_normal(shape, dtype=np.float32)
    x *= np.float32(1.0 / np.sqrt(shape[-1]))
    return x


def write_streaming_checkpoint(directory: Path, config, seed: int = 0) -> None:
    """config.json + model.safetensors in bf16 (expert_bias float32), generating one tensor at a time.

    Same format as lfm2np.io.safetensors.save_checkpoint: 8-byte header length, JSON header (data offsets
    relative to the data section, padded to 8 bytes with spaces), raw little-endian data.
    """
    import numpy as np

    from lfm2np.numerics import bfloat16_bits
    from lfm2np.schema import expected_tensors

    directory.mkdir(parents=True, exist_ok=True)
    expected = expected_tensors(config)
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in expected.items():
        code = "F32" if name.endswith("expert_bias") else "BF16"
        nbytes = int(np.prod(shape)) * (4 if code == "F32" else 2)
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    rng = np.random.default_rng(seed)
    tmp = directory / "model.safetensors.partial"
    with open(tmp, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for name, shape in expected.items():
            arr = _random_tensor(rng, name, shape)
            data = arr if name.endswith("expert_bias") else bfloat16_bits(arr)
            f.write(np.ascontiguousarray(data).tobytes())
    d = config.to_dict()
    d["torch_dtype"] = "bfloat16"
    (directory / "config.json").write_text(json.dumps(d, indent=2) + "\n")
    tmp.rename(directory / "model.safetensors")


def ensure_checkpoint(cache: Path, name: str) -> Path:
    config = model_config(name)
    directory = cache / name
    stamp = json.dumps(config.to_dict(), sort_keys=True)
    done = directory / "bench-config.json"
    if done.is_file() and done.read_text() == stamp and (directory / "model.safetensors").is_file():
        return directory
    print(f"[build] {name}: writing {directory} ...", flush=True)
    t0 = time.perf_counter()
    write_streaming_checkpoint(directory, config)
    done.write_text(stamp)
    size = (directory / "model.safetensors").stat().st_size
    print(f"[build] {name}: {size / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s", flush=True)
    return directory


# ============================================================================ children
def _timeit(fn, reps: int) -> float:
    """Best wall time of ``reps`` calls (the least disturbed one)."""
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _lfm2np_decode_seconds(model, ctx_ids, steps) -> float:
    """Prefill ``ctx_ids`` (untimed), then the seconds taken by one ``model.step`` per token of ``steps``."""
    _, state = model.step(ctx_ids)
    t0 = time.perf_counter()
    for tok in steps:
        _, state = model.step([int(tok)], state)
    return time.perf_counter() - t0


def child_run(spec: dict) -> dict:
    """One framework on one checkpoint: load, prefill at each T, decode at a context."""
    import numpy as np

    fw = spec["framework"]
    directory = Path(spec["dir"])
    V = json.loads((directory / "config.json").read_text())["vocab_size"]
    rng = np.random.default_rng(1234)
    prompt = rng.integers(0, V, size=max(spec["prefill"] + [spec["decode_context"]]))
    decode_tokens = rng.integers(0, V, size=spec["decode_steps"])
    res: dict = {"framework": fw, "rss_start": vm_rss()}
    if fw == "lfm2np":
        import lfm2np

        res["blas"] = blas_info()
        t0 = time.perf_counter()
        model = lfm2np.load(directory, memory_budget=spec.get("memory_budget"))
        res["load_s"] = time.perf_counter() - t0
        report = model.memory_report()
        res["budget_bytes"] = report["budget_bytes"]
        t0 = time.perf_counter()
        if report["budget_bytes"] is None or report["budget_bytes"] >= (report["all_tensors_bytes"] or 0):
            for name in model.params:  # widen and keep every tensor now (a 1-token forward skips experts)
                model.params[name]
        model.forward(prompt[:1])  # first use: bf16 tensors are widened (and kept, within the budget)
        res["first_call_s"] = time.perf_counter() - t0
        prefill = lambda ids: model.forward(ids)

        def decode(ctx_ids, steps):
            return _lfm2np_decode_seconds(model, ctx_ids, steps)
    else:
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(spec["threads"])
        res["torch"] = torch.__version__
        import transformers

        res["transformers"] = transformers.__version__
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        res["load_s"] = time.perf_counter() - t0
        res["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
        import inspect

        cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        with torch.inference_mode():
            t0 = time.perf_counter()
            model(torch.as_tensor(prompt[:1])[None])
            res["first_call_s"] = time.perf_counter() - t0

        def prefill(ids):
            with torch.inference_mode():
                return model(torch.as_tensor(ids)[None], use_cache=False).logits

        def decode(ctx_ids, steps):
            with torch.inference_mode():
                out = model(torch.as_tensor(ctx_ids)[None], use_cache=True)
                cache = getattr(out, "cache", None) or out.past_key_values
                t0 = time.perf_counter()
                for tok in steps:
                    out = model(torch.tensor([[int(tok)]]), use_cache=True, **{cache_kw: cache})
                    cache = getattr(out, "cache", None) or out.past_key_values
                return time.perf_counter() - t0

    res["prefill"] = {}
    for T in spec["prefill"]:
        reps = spec["reps"] if T <= 512 else 1
        ids = prompt[:T]
        t = _timeit(lambda: prefill(ids), reps)
        res["prefill"][str(T)] = {"s": t, "tok_s": T / t, "reps": reps}
    if spec["decode_steps"]:  # the best of reps runs, as for prefill (decode reads every weight per token:
        # the memory bandwidth other machines on the host share moves it most)
        t = min(decode(prompt[: spec["decode_context"]], decode_tokens) for _ in range(spec["reps"]))
        res["decode"] = {"context": spec["decode_context"], "steps": spec["decode_steps"], "s": t,
                         "tok_s": spec["decode_steps"] / t, "reps": spec["reps"]}
    res["peak_rss"] = vm_hwm()
    return res


def child_long(spec: dict) -> dict:
    """A long prefill of one checkpoint: peak RSS and time, one-shot forward or step in chunks."""
    import numpy as np

    fw, T, chunk = spec["framework"], spec["T"], spec.get("chunk")
    directory = Path(spec["dir"])
    V = json.loads((directory / "config.json").read_text())["vocab_size"]
    ids = np.random.default_rng(7).integers(0, V, size=T)
    res: dict = {"framework": fw, "T": T, "chunk": chunk}
    if fw == "lfm2np":
        import lfm2np

        model = lfm2np.load(directory)
        model.forward(ids[:1])
        res["rss_after_load"] = vm_rss()
        t0 = time.perf_counter()
        if chunk:
            state = None
            for s in range(0, T, chunk):
                logits, state = model.step(ids[s:s + chunk], state)
            res["state_bytes"] = state.nbytes
        else:
            logits = model.forward(ids)
        res["s"] = time.perf_counter() - t0
        res["logits_bytes"] = int(logits.nbytes)
    else:
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(spec["threads"])
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        res["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
        with torch.inference_mode():
            model(torch.as_tensor(ids[:1])[None])
            res["rss_after_load"] = vm_rss()
            t0 = time.perf_counter()
            logits = model(torch.as_tensor(ids)[None], use_cache=False).logits
            res["s"] = time.perf_counter() - t0
        res["logits_bytes"] = int(logits.numel() * logits.element_size())
    res["tok_s"] = T / res["s"]
    res["peak_rss"] = vm_hwm()
    return res


def child_moe(spec: dict) -> dict:
    """A one-layer MoE model (conv mixer + MoE FFN, small vocab) with ``experts`` experts at top-k:
    decode step time at a context, prefill time at each T."""
    import numpy as np

    import lfm2np
    from lfm2np.synthetic import random_model

    base = lfm2np.load_config("LFM2-8B-A1B")
    # an attention mixer: transformers' hybrid cache fails on a model without attention layers
    config = base.replace(num_hidden_layers=1, layer_types=("full_attention",), num_dense_layers=0,
                          num_experts=spec["experts"], vocab_size=256)
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 256, size=max(spec["prefill"] + [spec["context"]]))
    steps = rng.integers(0, 256, size=spec["steps"])
    fw = spec.get("framework", "lfm2np")
    res: dict = {"framework": fw, "experts": spec["experts"], "top_k": config.num_experts_per_tok, "prefill": {}}
    if fw == "lfm2np":
        model = random_model(config, seed=0)  # float32 weights in memory (the keep_weights=True situation)
        prefill = model.forward

        def decode():
            return _lfm2np_decode_seconds(model, ids[: spec["context"]], steps)
    else:
        import inspect

        import torch
        import transformers

        torch.set_num_threads(spec["threads"])
        torch.manual_seed(0)
        hf_config = transformers.AutoConfig.for_model(**config.to_dict())
        model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
        cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

        def prefill(x):
            with torch.inference_mode():
                return model(torch.as_tensor(x)[None], use_cache=False).logits

        def decode():
            with torch.inference_mode():
                out = model(torch.as_tensor(ids[: spec["context"]])[None], use_cache=True)
                cache = getattr(out, "cache", None) or out.past_key_values
                t0 = time.perf_counter()
                for tok in steps:
                    out = model(torch.tensor([[int(tok)]]), use_cache=True, **{cache_kw: cache})
                    cache = getattr(out, "cache", None) or out.past_key_values
                return time.perf_counter() - t0
    prefill(ids[:8])
    for T in spec["prefill"]:
        t = _timeit(lambda: prefill(ids[:T]), spec["reps"])
        res["prefill"][str(T)] = {"s": t, "tok_s": T / t}
    res["decode"] = {"s_per_step": decode() / spec["steps"], "context": spec["context"]}
    res["peak_rss"] = vm_hwm()
    return res


CHILDREN = {"run": child_run, "long": child_long, "moe": child_moe}


# ============================================================================ parent
def _cpu_busy_ticks() -> int:
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in parts[:8])
    return user + nice + system + irq + softirq + steal


def run_child(kind: str, spec: dict, python: str, threads: int, unset_coretype: bool,
              retry_busy: float, retries: int) -> dict:
    env = dict(os.environ)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    if unset_coretype:
        env.pop("OPENBLAS_CORETYPE", None)
        env.pop("OPENBLAS_L2_SIZE", None)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    spec = {**spec, "threads": threads}
    hz = os.sysconf("SC_CLK_TCK")
    best = None
    for attempt in range(1, retries + 2):
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        busy0, t0 = _cpu_busy_ticks(), time.perf_counter()
        proc = subprocess.run([python, __file__, "--child", kind, json.dumps(spec)], env=env,
                              capture_output=True, text=True)
        wall = time.perf_counter() - t0
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        busy = (_cpu_busy_ticks() - busy0) / hz
        own = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        if proc.returncode != 0:
            return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1], "stderr": proc.stderr[-3000:],
                    "spec": spec}
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        res["wall_s"] = wall
        res["other_cores"] = max(0.0, (busy - own) / wall)
        res["child_maxrss"] = ru1.ru_maxrss * 1024  # max over all children so far (cross-check)
        res["attempt"] = attempt
        if best is None or res["other_cores"] < best["other_cores"]:
            best = res
        if res["other_cores"] <= retry_busy or attempt == retries + 1:
            break
        print(f"  (other processes used {res['other_cores']:.2f} cores meanwhile; rerunning)", flush=True)
        time.sleep(10)
    return best


def torch_python(requested: str | None) -> str | None:
    candidates = [requested] if requested else [sys.executable, "/work/venv-ref/bin/python"]
    for py in candidates:
        if py and Path(py).exists():
            ok = subprocess.run([py, "-c", "import torch, transformers"], capture_output=True).returncode == 0
            if ok:
                return py
    return None


def machine_info(python: str) -> dict:
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    probe = subprocess.run(
        [python, "-B", "-c", "import json, numpy, sys; sys.path.insert(0, %r); import bench; "
                       "print(json.dumps({'numpy': numpy.__version__, 'python': sys.version.split()[0], "
                       "'blas': bench.blas_info()}))" % str(HERE)],
        capture_output=True, text=True, env={**os.environ, "OPENBLAS_NUM_THREADS": "2"})
    info = {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(mem / 2**30, 1),
            "platform": platform.platform(), "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
            "OPENBLAS_L2_SIZE": os.environ.get("OPENBLAS_L2_SIZE"),
            "OPENBLAS_THREAD_TIMEOUT": os.environ.get("OPENBLAS_THREAD_TIMEOUT"),
            "loadavg_start": open("/proc/loadavg").read().split()[:3]}
    if probe.returncode == 0:
        info.update(json.loads(probe.stdout.strip().splitlines()[-1]))
    return info


def gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def fmt_ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def print_table(results: dict) -> None:
    if results["runs"]:
        print_runs(results)
    print_checks(results)


def print_runs(results: dict) -> None:
    print("\n## lfm2np vs transformers (float32 compute, tokens/s; ratio = lfm2np / transformers, >1 is faster)")
    head = "| model | file GB | framework | load s | ready s | " + " | ".join(
        f"prefill T={T}" for T in results["params"]["prefill"]) + " | decode @ctx | peak RSS GB | other cores |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for name, entry in results["runs"].items():
        rows = entry["rows"]
        ref = rows.get("transformers")
        for fw, r in rows.items():
            if "error" in r:
                print(f"| {name} | | {fw} | error: {r['error']} |")
                continue
            cells = [f"{r['load_s']:.2f}", f"{r['load_s'] + r['first_call_s']:.2f}"]
            for T in results["params"]["prefill"]:
                p = r["prefill"].get(str(T))
                cells.append(f"{p['tok_s']:.1f}" if p else "-")
            cells.append(f"{r['decode']['tok_s']:.2f}" if "decode" in r else "-")
            cells.append(gb(r["peak_rss"]))
            print(f"| {name} | {gb(entry['file_bytes'])} | {fw} | " + " | ".join(cells)
                  + f" | {r['other_cores']:.2f} |")
        if ref and "error" not in ref:
            for fw, r in rows.items():
                if fw == "transformers" or "error" in r:
                    continue
                cells = [fmt_ratio(ref["load_s"], r["load_s"]),
                         fmt_ratio(ref["load_s"] + ref["first_call_s"], r["load_s"] + r["first_call_s"])]
                for T in results["params"]["prefill"]:
                    a, b = r["prefill"].get(str(T)), ref["prefill"].get(str(T))
                    cells.append(fmt_ratio(a and a["tok_s"], b and b["tok_s"]))
                cells.append(fmt_ratio(r.get("decode", {}).get("tok_s"), ref.get("decode", {}).get("tok_s")))
                cells.append(fmt_ratio(r["peak_rss"], ref["peak_rss"]) + " (mem)")
                print(f"| {name} | | **{fw} / transformers** | " + " | ".join(cells) + " | |")


def print_checks(results: dict) -> None:
    if results.get("moe"):
        m = results["moe"]
        print("\n## MoE scaling: one-layer model (8B-A1B widths, attention + MoE FFN, vocab 256), 64 vs 8 experts, top-4 (target: ratio <= 1.5)")
        print("| measurement | 8 experts | 64 experts | ratio 64/8 |")
        print("|---|---|---|---|")
        for fw, prefix in (("lfm2np", ""), ("transformers", "transformers ")):
            a, b = m.get(prefix + "8"), m.get(prefix + "64")
            if a is None or b is None:
                continue
            if "error" in a or "error" in b:
                print(f"| {fw}: error | {a.get('error', '')} | {b.get('error', '')} | |")
                continue
            da, db = a["decode"]["s_per_step"], b["decode"]["s_per_step"]
            print(f"| {fw} decode step @ctx {a['decode']['context']} (ms) | {da * 1e3:.2f} | {db * 1e3:.2f} | "
                  f"{db / da:.2f} |")
            for T in a["prefill"]:
                ta, tb = a["prefill"][T]["s"], b["prefill"][T]["s"]
                print(f"| {fw} prefill T={T} (ms) | {ta * 1e3:.1f} | {tb * 1e3:.1f} | {tb / ta:.2f} |")
    if results.get("long"):
        print("\n## Long prompt: 350M-shaped model (target: peak RSS a few GB)")
        print("| run | T | s | tok/s | RSS after load GB | peak RSS GB | logits GB | other cores |")
        print("|---|---|---|---|---|---|---|---|")
        for label, r in results["long"].items():
            if "error" in r:
                print(f"| {label} | error: {r['error']} |")
                continue
            print(f"| {label} | {r['T']} | {r['s']:.1f} | {r['tok_s']:.1f} | {gb(r['rss_after_load'])} | "
                  f"{gb(r['peak_rss'])} | {gb(r['logits_bytes'])} | {r['other_cores']:.2f} |")
    if results.get("memory"):
        print("\n## 8B-A1B(cut) bf16 checkpoint: peak RSS vs file size (target <= ~1.25x with memory_budget=0)")
        print("| run | file GB | peak RSS GB | RSS / file | decode tok/s | prefill tok/s (largest T) |")
        print("|---|---|---|---|---|---|")
        for label, r in results["memory"].items():
            if "error" in r:
                print(f"| {label} | error: {r['error']} |")
                continue
            p = list(r["prefill"].values())[-1]
            print(f"| {label} | {gb(r['file_bytes'])} | {gb(r['peak_rss'])} | {r['peak_rss'] / r['file_bytes']:.2f} | "
                  f"{r['decode']['tok_s']:.2f} | {p['tok_s']:.1f} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="350m,1.2b,8b-cut", help="comma list of " + ", ".join(MODELS))
    ap.add_argument("--frameworks", default="lfm2np,transformers")
    ap.add_argument("--checks", default="moe,long,memory", help="comma list of moe, long, memory, real, gguf ('' for none; real and gguf run their "
                    "own scripts: benchmarks/real_scale.py, benchmarks/gguf_decode.py)")
    ap.add_argument("--quick", action="store_true", help="smoke run: T=32,128, decode 4 steps @64, 1 rep, long T=1024")
    ap.add_argument("--cache", default="/tmp/lfm2np-bench")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--torch-python", default=None, help="interpreter with torch+transformers")
    ap.add_argument("--python", default=None, help="interpreter for lfm2np children (default: --torch-python "
                                                    "if found, so both use one numpy, else this one)")
    ap.add_argument("--unset-coretype", action="store_true", help="drop OPENBLAS_CORETYPE/L2_SIZE in children")
    ap.add_argument("--retry-busy", type=float, default=0.3,
                    help="rerun a child when other processes used more cores than this meanwhile")
    ap.add_argument("--retries", type=int, default=2, help="reruns at most (the least disturbed run is kept)")
    ap.add_argument("--long-T", type=int, default=None)
    ap.add_argument("--budgets", default="0,all", help="memory budgets of the memory check (e.g. 0,1GiB,4GiB,all)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        kind, spec = args.child
        print(json.dumps(CHILDREN[kind](json.loads(spec))))
        return 0

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    models = [m for m in args.models.split(",") if m]
    for m in models:
        if m not in MODELS:
            ap.error(f"unknown model {m!r}; expected one of {', '.join(MODELS)}")
    checks = {c for c in args.checks.split(",") if c}
    frameworks = [f for f in args.frameworks.split(",") if f]
    tpy = torch_python(args.torch_python) if "transformers" in frameworks else None
    if "transformers" in frameworks and tpy is None:
        print("transformers/torch not importable: lfm2np only")
        frameworks = [f for f in frameworks if f != "transformers"]
    npy = args.python or tpy or sys.executable

    if args.quick:
        params = {"prefill": [32, 128], "decode_context": 64, "decode_steps": 4, "reps": 1}
        moe = {"prefill": [128], "context": 32, "steps": 4, "reps": 1, "experts": [8, 64]}
        long_T = args.long_T or 1024
    else:
        params = {"prefill": [128, 512, 2048], "decode_context": 512, "decode_steps": 32, "reps": 3}
        moe = {"prefill": [128, 512], "context": MOE_DECODE_CONTEXT, "steps": 16, "reps": 3, "experts": [8, 64]}
        long_T = args.long_T or 8192

    results: dict = {"command": " ".join([Path(sys.executable).name] + sys.argv), "params": params,
                     "machine": machine_info(npy), "python_lfm2np": npy, "python_transformers": tpy,
                     "unset_coretype": args.unset_coretype, "runs": {}}
    print(json.dumps(results["machine"], indent=1), flush=True)
    child = lambda kind, spec, py: run_child(kind, spec, py, args.threads, args.unset_coretype, args.retry_busy,
                                               args.retries)

    dirs = {m: ensure_checkpoint(cache, m) for m in set(models) | ({"350m"} if "long" in checks else set())
            | ({"8b-cut"} if "memory" in checks else set())}
    for m in models:
        d = dirs[m]
        entry = results["runs"][m] = {"dir": str(d), "file_bytes": (d / "model.safetensors").stat().st_size,
                                      "rows": {}}
        for fw in frameworks:
            print(f"[run] {m} / {fw} ...", flush=True)
            r = child("run", {"framework": fw, "dir": str(d), **params}, npy if fw == "lfm2np" else tpy)
            entry["rows"][fw] = r
            if "error" in r:
                print(f"  error: {r['error']}\n{r.get('stderr', '')}", flush=True)
            else:
                print(f"  load {r['load_s']:.2f}s ready {r['load_s'] + r['first_call_s']:.2f}s prefill "
                      + ", ".join(f"T={T}: {p['tok_s']:.1f}" for T, p in r["prefill"].items())
                      + f" decode {r['decode']['tok_s']:.2f} tok/s peak RSS {gb(r['peak_rss'])} GB"
                      + f" (other cores {r['other_cores']:.2f})", flush=True)

    if "moe" in checks:
        results["moe"] = {}
        for fw in frameworks:
            for E in moe["experts"]:
                print(f"[moe] {fw} {E} experts ...", flush=True)
                r = child("moe", {**moe, "experts": E, "framework": fw}, npy if fw == "lfm2np" else tpy)
                results["moe"][str(E) if fw == "lfm2np" else f"{fw} {E}"] = r
                if "error" in r:
                    print(f"  error: {r['error']}\n{r.get('stderr', '')}", flush=True)

    if "long" in checks:
        results["long"] = {}
        d = str(dirs["350m"])
        runs = [("lfm2np forward", "lfm2np", None), ("lfm2np step, chunks of 512", "lfm2np", 512)]
        if tpy:
            runs.append(("transformers forward", "transformers", None))
        for label, fw, chunk in runs:
            print(f"[long] {label} T={long_T} ...", flush=True)
            r = child("long", {"framework": fw, "dir": d, "T": long_T, "chunk": chunk},
                      npy if fw == "lfm2np" else tpy)
            results["long"][label] = r
            if "error" in r:
                print(f"  error: {r['error']}\n{r.get('stderr', '')}", flush=True)

    if "memory" in checks:
        results["memory"] = {}
        d = dirs["8b-cut"]
        size = (d / "model.safetensors").stat().st_size
        mem_params = {**params, "prefill": [p for p in params["prefill"] if p <= 512], "reps": 1}
        for budget in args.budgets.split(","):
            label = f"memory_budget={budget}"
            print(f"[memory] 8b-cut {label} ...", flush=True)
            r = child("run", {"framework": "lfm2np", "dir": str(d), "memory_budget": budget, **mem_params}, npy)
            r["file_bytes"] = size
            results["memory"][label] = r
            if "error" in r:
                print(f"  error: {r['error']}\n{r.get('stderr', '')}", flush=True)

    for check, script, extra in (("real", "real_scale.py", []), ("gguf", "gguf_decode.py", ["--against-safetensors"])):
        if check in checks:  # scripts of their own (their own checkpoints, their own processes)
            print(f"[{check}] benchmarks/{script} ...", flush=True)
            env = {**os.environ, "OPENBLAS_NUM_THREADS": str(args.threads), "OMP_NUM_THREADS": str(args.threads),
                   "MKL_NUM_THREADS": str(args.threads)}
            proc = subprocess.run([npy, str(HERE / script), *extra, "--threads", str(args.threads)]
                                  + (["--cache", str(cache)] if check == "real" else ["--dir", str(cache)]),
                                  env=env, capture_output=True, text=True)
            print(proc.stdout, proc.stderr[-3000:] if proc.returncode else "", flush=True)
            results[check] = {"returncode": proc.returncode, "stdout": proc.stdout}

    results["machine"]["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    out = Path(args.out) if args.out else cache / ("results-quick.json" if args.quick else "results.json")
    out.write_text(json.dumps(results, indent=1) + "\n")
    print_table(results)
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
