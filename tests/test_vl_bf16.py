"""LFM2-VL's vision tower and projector in the bfloat16 emulation against transformers run in bfloat16.

Fixture: tests/golden/vl-layernorm/reference-bf16.safetensors (tools/make_vl_fixtures.py, step 5): the committed
checkpoint loaded by transformers 5.25 with ``dtype=torch.bfloat16`` (eager attention) on the pixel batch and ids of
``reference.safetensors`` (four images, eight tiles, 124 positions), its values stored as bf16 bits. Run with ``-s``
to see the measured errors.

Fed transformers' own bf16 input, each stage (an encoder layer, the post-layernorm, the projector's LayerNorm, its
first Linear, its GELU and second Linear) gives transformers' bits, but for flips of one ulp in a few values out of
a thousand (a float32 sum or tanh that differs in its last bit between NumPy and torch and lands on a bf16
boundary); end to end those flips spread, as they do between any two bf16 backends.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import numpy as np
from safetensors.numpy import load_file

import lfm2np
from lfm2np.numerics import bfloat16_to_float32
from lfm2np.oracle.tolerance import rel_error
from lfm2np.vision_schema import PROJECTOR, TOWER

from conftest import GOLDEN

CASE = GOLDEN / "vl-layernorm"
#: the stages transformers' bf16 run recorded, each fed by the one before (the logits by the image features)
STAGES = (TOWER + "embeddings", TOWER + "encoder.layers.0", TOWER + "encoder.layers.1", TOWER + "post_layernorm",
          PROJECTOR + "layer_norm", PROJECTOR + "linear_1", PROJECTOR + "linear_2", "logits")
#: end to end, max|lfm2np - transformers bf16| / max|transformers bf16| per stage: measured 0 (the tower's input),
#: 4.7e-3 (its output), 6.4e-3 (the image features), 1.6e-2 (logits); the float32 model is 8.5e-3, 9.5e-3 and
#: 3.0e-2 from the same run. The bound: one bf16 ulp (2^-8 relative) a stage, eight stages to the features,
#: and the logits' three text layers on top of them.
END_TO_END = {TOWER + "embeddings": 0.0, TOWER + "post_layernorm": 8e-3, PROJECTOR + "linear_2": 1e-2,
              "logits": 2.5e-2}


@functools.lru_cache(maxsize=None)
def references() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    bits = load_file(str(CASE / "reference-bf16.safetensors"))
    return load_file(str(CASE / "reference.safetensors")), {k: bfloat16_to_float32(v) for k, v in bits.items()}


@functools.lru_cache(maxsize=None)
def model(dtype: str) -> lfm2np.Model:
    return lfm2np.load(CASE, dtype=dtype)


def run(dtype: str, feed: bool) -> dict[str, np.ndarray]:
    """lfm2np's value of each stage; with ``feed``, every stage after the first computed from transformers' bf16
    value of the stage before (the recorded value replaced as the forward pass goes)."""
    r, bf16 = references()
    seen: dict[str, np.ndarray] = {}

    def record(name: str, value: np.ndarray) -> np.ndarray | None:
        if name in bf16:
            seen[name] = value.copy()
            return bf16[name] if feed else None
        return None

    images = SimpleNamespace(pixel_values=r["pixel_values"], pixel_attention_mask=r["pixel_attention_mask"] > 0,
                             spatial_shapes=r["spatial_shapes"])
    seen["logits"] = model(dtype).forward(r["ids"], images=images, record=record)
    assert sorted(seen) == sorted(STAGES)
    return seen


def top_ulp(x: np.ndarray) -> float:
    """One bf16 ulp at the largest magnitude of ``x`` (8 significant bits)."""
    return 2.0 ** (np.floor(np.log2(np.abs(x).max())) - 7)


def test_each_stage_fed_transformers_bf16_input_gives_its_bits():
    """Measured, of the values of each stage: 0 (tower input, post-layernorm, linear_1, linear_2), 0.17% and
    0.34% (the two encoder layers), 0.014% (the projector's LayerNorm) and 1.2% (logits from transformers' image
    features) differ, none by more than one bf16 ulp of the stage's largest value."""
    _, bf16 = references()
    seen = run("bfloat16", feed=True)
    for name in STAGES:
        ours, theirs = seen[name], bf16[name]
        flips = (ours != theirs).mean()
        print(f"{name}: {flips:.2%} of the values differ, at most {np.abs(ours - theirs).max() / top_ulp(theirs)} "
              f"ulp of the largest")
        assert np.abs(ours - theirs).max() <= top_ulp(theirs) and flips <= (0.02 if name == "logits" else 0.005), name
    assert np.array_equal(seen[TOWER + "embeddings"], bf16[TOWER + "embeddings"])  # the pixels rounded first


def test_end_to_end_within_the_measured_bf16_spread():
    _, bf16 = references()
    ours, f32 = run("bfloat16", feed=False), run("float32", feed=False)
    for name, bound in END_TO_END.items():
        error, float32 = rel_error(ours[name], bf16[name]), rel_error(f32[name], bf16[name])
        print(f"{name}: bf16 emulation {error:.1e}, float32 {float32:.1e}")
        assert error <= bound and error < float32, name
    agree = (ours["logits"].argmax(-1) == bf16["logits"].argmax(-1)).mean()  # measured 99% (float32: 96%)
    assert agree >= (f32["logits"].argmax(-1) == bf16["logits"].argmax(-1)).mean() and agree >= 0.98
