"""A GGUF file of a real model's shapes in llama.cpp's type mix, from random blocks, written one tensor at a time.

    python benchmarks/random_gguf.py /tmp/lfm2np-bench/24b-Q4_K_M.gguf [--model 24b] [--type Q4_K_M]

Every tensor gets the type llama-quantize gives it in a file of that type (:func:`lfm2np.calc.quant.tensor_types`:
for Q4_K_M, Q4_K with Q6_K for the tied embedding and the ``use_more_bits`` ffn_down / attn_v tensors, F32
for norms, the router and the conv kernel). Quantised tensors are random bytes with their scales (the f16
``d`` / ``dmin`` of each block) set so the values have about the spread of the bf16 benchmarks' random weights
(``1/sqrt(in)``, the embedding 1); F32 tensors are drawn as those are. Writing holds one tensor at a time
(:func:`lfm2np.io.gguf_write.write_gguf_tensors`: the largest, a stacked expert tensor, is ~170 MB), never
the file; LFM2-24B-A2B's 14.4 GB take a couple of minutes, most of it the disk.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

#: spread of the values per unit of ``d``: Q4_K ``d*sc*q`` (sc, q uniform 0..63, 0..15), Q6_K ``d*sc*(q-32)``
#: (sc uniform int8, q 0..63), Q8_0 ``d*q`` (q uniform int8), Q4_0 ``d*(q-8)``
_SPREAD = {"Q4_K": 36.4 * 4.6, "Q5_K": 36.4 * 9.2, "Q6_K": 73.9 * 18.5, "Q8_0": 73.9, "Q4_0": 4.6}
#: (block bytes, byte offsets of the f16 scales: d first, then dmin when the type has one)
_LAYOUT = {"Q4_K": (144, (0, 2)), "Q5_K": (176, (0, 2)), "Q6_K": (210, (208,)), "Q8_0": (34, (0,)),
           "Q4_0": (18, (0,))}


def random_blocks(rng: np.random.Generator, kind: str, shape: tuple[int, ...], std: float) -> np.ndarray:
    """Random ``kind`` blocks for a tensor of numpy ``shape``, values of about ``std``: uint8 (rows, row bytes)."""
    block_bytes, scales = _LAYOUT[kind]
    n = int(np.prod(shape)) // (256 if kind.endswith("_K") else 32)
    raw = rng.integers(0, 1 << 63, (n * block_bytes + 7) // 8, dtype=np.int64).view(np.uint8)[:n * block_bytes]
    blocks = raw.reshape(n, block_bytes)
    d = (std / _SPREAD[kind]) * rng.uniform(0.5, 1.5, n).astype(np.float32)
    for i, at in enumerate(scales):  # dmin: about centres a Q4_K / Q5_K sub-block (mean of sc*q = mean of m*7.5)
        value = d if i == 0 else d * (7.5 if kind == "Q4_K" else 15.5)
        blocks[:, at:at + 2] = value.astype(np.float16).view(np.uint8).reshape(n, 2)
    return blocks.reshape(*shape[:-1], -1)


def build(path: Path, config, file_type: str = "Q4_K_M", seed: int = 0) -> dict[str, str]:
    """Write ``config``'s tensors as random ``file_type`` blocks to ``path`` (through a ``.partial`` file)."""
    import bench

    from lfm2np.calc import quant
    from lfm2np.io.gguf import gguf_layout
    from lfm2np.io.gguf_write import write_gguf_tensors

    rng = np.random.default_rng(seed)
    holds = {g.name: g for g in gguf_layout(config)}

    def produce(gname: str, kind: str) -> np.ndarray:
        g = holds[gname]
        shape, first = tuple(reversed(g.ne)), g.holds[0]
        if kind == "F32":  # norms, router, conv kernel, expert bias: as the bf16 benchmark draws them
            return np.stack([bench._random_tensor(rng, t.name, t.shape) for t in g.holds]).reshape(shape)
        std = 1.0 if first.name in ("model.embed_tokens.weight", "lm_head.weight") else shape[-1] ** -0.5
        return random_blocks(rng, kind, shape, std)

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    types = write_gguf_tensors(partial, config, produce, quant.tensor_types(config, file_type),
                               name=f"random {file_type}")
    os.replace(partial, path)
    return types


def main(argv: list[str] | None = None) -> int:
    import bench

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("path", type=Path)
    ap.add_argument("--model", default="24b", help=f"one of {', '.join(bench.MODELS)} (default 24b)")
    ap.add_argument("--type", default="Q4_K_M", help="llama.cpp file type (default Q4_K_M)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    types = build(args.path, bench.model_config(args.model), args.type)
    print(f"{args.path}: {args.path.stat().st_size / 1e9:.2f} GB, {len(types)} tensors "
          f"({', '.join(sorted(set(types.values())))}) in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
