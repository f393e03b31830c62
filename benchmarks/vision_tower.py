"""Benchmark the LFM2-VL vision tower and projector: lfm2np against transformers 5.25, float32, same threads.

One 512 x 512 tile with SigLIP2-400M's shapes (1152 wide, 27 layers, 16 heads, MLP 4304, patch 16: 1024 patches,
no padding) and LFM2-VL-1.6B's projector (pixel unshuffle by 2: 256 tokens of 4608, LayerNorm, 4608 -> 2560 ->
2048). Random weights, written once to a safetensors file that both sides read (``--cache``, default
/tmp/lfm2np-vision-bench); one image's pixel values from a fixed seed.

Each measurement is a separate process (``--side lfm2np`` or ``--side transformers``) that loads the weights,
runs one warm-up pass and then ``--repeat`` timed passes, and prints the best; the parent alternates the two
sides (A, B, A, B, ...) ``--pairs`` times, so both see the same disturbance from other processes, and reports
each side's median of bests and the per-pair ratio. Threads: OPENBLAS_NUM_THREADS = OMP_NUM_THREADS =
MKL_NUM_THREADS = ``--threads`` and torch.set_num_threads(threads).

    python benchmarks/vision_tower.py                 # 3 pairs, 2 threads
    python benchmarks/vision_tower.py --layers 4      # a quicker run on 4 of the 27 layers

transformers runs in ``--torch-python`` (default /work/venv-ref/bin/python) with PYTHONPATH pointing at this
checkout (tools/torchvision_cpu.py first). Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VISION = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, patch_size=16,
              num_patches=256)
TEXT_WIDTH, PROJECTOR_WIDTH, PATCHES = 2048, 2560, 1024  # LFM2-1.2B's width; a 512 x 512 tile: 32 x 32 patches


def config(layers: int) -> dict:
    text = {"model_type": "lfm2", "vocab_size": 512, "hidden_size": TEXT_WIDTH, "num_hidden_layers": 1,
            "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 256,
            "layer_types": ["conv"], "block_auto_adjust_ff_dim": False}
    return {"model_type": "lfm2_vl", "text_config": text, "image_token_id": 396, "downsample_factor": 2,
            "projector_hidden_size": PROJECTOR_WIDTH, "projector_use_layernorm": True, "projector_bias": True,
            "projector_hidden_act": "gelu", "tie_word_embeddings": True,
            "vision_config": {"model_type": "siglip2_vision_model", "vision_use_head": False,
                              "hidden_act": "gelu_pytorch_tanh", **VISION, "num_hidden_layers": layers}}


def build(cache: Path, layers: int) -> Path:
    """The weights (random, the vision tower's and projector's only, plus the tiny text tower), once."""
    import numpy as np
    from safetensors.numpy import save_file

    import lfm2np
    from lfm2np.schema import layout

    directory = cache / f"layers{layers}"
    if (directory / "model.safetensors").is_file():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config(layers)))
    c = lfm2np.load_config(directory)
    rng = np.random.default_rng(0)
    tensors = {}
    for t in layout(c):
        if t.name.endswith(("norm.weight", "layernorm.weight", "norm1.weight", "norm2.weight")):
            tensors[t.name] = (0.5 + rng.random(t.shape)).astype(np.float32)
        else:
            scale = 0.02 if t.name.endswith("bias") or len(t.shape) < 2 else t.shape[-1] ** -0.5
            tensors[t.name] = (rng.standard_normal(t.shape, dtype=np.float32) * scale).astype(np.float32)
    save_file(tensors, str(directory / "model.safetensors"))
    pixels = rng.uniform(-1, 1, (1, PATCHES, 3 * 16 * 16)).astype(np.float32)
    np.save(directory / "pixels.npy", pixels)
    return directory


def side_lfm2np(directory: Path, repeat: int) -> dict:
    from types import SimpleNamespace

    import numpy as np

    import lfm2np
    from lfm2np import vision
    from lfm2np.layers import Scope

    m = lfm2np.load(directory, memory_budget="all")
    pixels = np.load(directory / "pixels.npy")
    batch = SimpleNamespace(pixel_values=pixels, pixel_attention_mask=np.ones(pixels.shape[:2], bool),
                            spatial_shapes=np.array([[32, 32]]))
    px = vision.check_pixels(batch, m.config.vision, np.float32)
    views = m.vision_views()
    times, out = [], None
    for _ in range(repeat + 1):
        t0 = time.perf_counter()
        out = vision.encode(px, *views, m.config.vision, Scope())
        times.append(time.perf_counter() - t0)
    return {"best": min(times[1:]), "times": times, "shape": list(out.shape), "checksum": float(np.abs(out).sum())}


def side_transformers(directory: Path, repeat: int, threads: int) -> dict:
    sys.path.insert(0, str(ROOT / "tools"))
    import torchvision_cpu  # noqa: F401
    import numpy as np
    import torch
    from safetensors.numpy import load_file
    from transformers import Lfm2VlConfig, Lfm2VlForConditionalGeneration

    torch.set_num_threads(threads)
    cfg = Lfm2VlConfig(**{k: v for k, v in config(json.loads((directory / "config.json").read_text())
                                                      ["vision_config"]["num_hidden_layers"]).items()
                          if k != "model_type"}, attn_implementation="sdpa")
    with torch.device("meta"):
        model = Lfm2VlForConditionalGeneration(cfg)
    state = {k.replace("model.vision_tower.vision_model.", "model.vision_tower.").replace(
        "model.layers.", "model.language_model.layers.").replace("model.embed_tokens", "model.language_model.embed_tokens")
        .replace("model.embedding_norm", "model.language_model.embedding_norm"): torch.from_numpy(v)
             for k, v in load_file(str(directory / "model.safetensors")).items()}
    model.load_state_dict(state, strict=False, assign=True)
    model.eval()
    pixels = torch.from_numpy(np.load(directory / "pixels.npy"))
    mask, shapes = torch.ones(pixels.shape[:2], dtype=torch.bool), torch.tensor([[32, 32]])
    times, out = [], None
    with torch.inference_mode():
        for _ in range(repeat + 1):
            t0 = time.perf_counter()
            out = model.model.get_image_features(pixel_values=pixels, spatial_shapes=shapes,
                                                 pixel_attention_mask=mask).pooler_output[0]
            times.append(time.perf_counter() - t0)
    return {"best": min(times[1:]), "times": times, "shape": list(out.shape), "checksum": float(out.abs().sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--side", choices=("lfm2np", "transformers"))
    parser.add_argument("--cache", default="/tmp/lfm2np-vision-bench", type=Path)
    parser.add_argument("--layers", type=int, default=27)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--torch-python", default="/work/venv-ref/bin/python")
    args = parser.parse_args()
    directory = args.cache / f"layers{args.layers}"
    if args.side == "lfm2np":
        print(json.dumps(side_lfm2np(directory, args.repeat)))
        return
    if args.side == "transformers":
        print(json.dumps(side_transformers(directory, args.repeat, args.threads)))
        return
    build(args.cache, args.layers)
    env = {**os.environ, **{k: str(args.threads) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                                                           "MKL_NUM_THREADS")}, "PYTHONPATH": str(ROOT)}
    common = [__file__, "--cache", str(args.cache), "--layers", str(args.layers), "--repeat", str(args.repeat),
              "--threads", str(args.threads)]
    results: dict[str, list[dict]] = {"lfm2np": [], "transformers": []}
    for pair in range(args.pairs):
        for side, python in (("lfm2np", sys.executable), ("transformers", args.torch_python)):
            run = subprocess.run([python, *common, "--side", side], env=env, capture_output=True, text=True)
            if run.returncode:
                sys.exit(f"{side} failed:\n{run.stderr[-3000:]}")
            results[side].append(json.loads(run.stdout.strip().splitlines()[-1]))
            print(f"pair {pair + 1} {side:12s} best {results[side][-1]['best']:.3f} s", flush=True)
    a = [r["best"] for r in results["lfm2np"]]
    b = [r["best"] for r in results["transformers"]]
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"{cpu}, {args.threads} threads, {args.layers} layers, one 512 x 512 tile (1024 patches)")
    print(f"lfm2np       median of bests {statistics.median(a):.3f} s  {a}")
    print(f"transformers median of bests {statistics.median(b):.3f} s  {b}")
    print(f"ratio lfm2np / transformers per pair: {[round(x / y, 3) for x, y in zip(a, b)]}")
    print(f"checksums: {results['lfm2np'][0]['checksum']:.6g} vs {results['transformers'][0]['checksum']:.6g}")


if __name__ == "__main__":
    main()
