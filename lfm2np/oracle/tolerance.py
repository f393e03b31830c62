"""Tolerance tiers: how close two computations of the same thing must be, named in one place.

Used by the tests, by ``lfm2np compare`` and by ``lfm2np diagnose`` alike.

Errors are measured relative to the scale of the reference: ``max|a - ref| / max|ref|``. A per-element
relative error would blow up on values near zero, which carry no information about correctness.

Tier ``fp32`` (float32 against a float32 reference): each operator within 1e-5 of its scale, whole-model
logits within 1e-4 of theirs. Where these come from: float32 has a unit roundoff of 6e-8; a matmul
over D terms with different summation orders (BLAS blocking, torch vs NumPy) drifts by a few times
sqrt(D) * 6e-8, about 1e-6 for the widths of the released models, and the error grows with depth. The
fixtures measure ~1e-6 per model (see docs/numerics.md), leaving a factor of ten of headroom before a
real mistake (a wrong eps, a missing norm weight, a swapped gate), which shows up at 1e-3 or more.
Integer outputs (token ids, chosen experts) must match exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import Lfm2npError, shown


@dataclass(frozen=True)
class Tier:
    name: str
    op_rel: float  # one operator, relative to the scale of its output
    logits_rel: float  # whole-model logits, relative to their scale


FP32 = Tier("fp32", op_rel=1e-5, logits_rel=1e-4)
#: float64 against float32 of the same computation: the float32 rounding itself is what differs.
FP64_VS_FP32 = Tier("fp64-vs-fp32", op_rel=1e-5, logits_rel=1e-4)

TIERS = {t.name: t for t in (FP32, FP64_VS_FP32)}


def default_tier(mode: str | None) -> str:
    """The compare tier for a reference computed in numerics ``mode``: ``llamacpp-cpu`` for llama.cpp's CPU
    arithmetic, else ``fp32``."""
    return "llamacpp-cpu" if mode in ("llamacpp-cpu", "llamacpp-cpu-kv-f32") else "fp32"


def rel_error(a: np.ndarray, ref: np.ndarray) -> float:
    """``max|a - ref| / max|ref|`` in float64: the one relative-error measure of lfm2np. 0 when both are
    all zeros; ``inf`` when the reference is all zeros and ``a`` is not, or when either holds a NaN or an
    infinity where the other does not."""
    a64 = np.asarray(a, dtype=np.float64)
    r64 = np.asarray(ref, dtype=np.float64)
    if a64.shape != r64.shape:
        raise ValueError(f"shapes differ: {a64.shape} vs {r64.shape}")
    if not r64.size:
        return 0.0
    finite = np.isfinite(a64) & np.isfinite(r64)
    if not finite.all():
        same = (a64 == r64) | (np.isnan(a64) & np.isnan(r64))
        if not same[~finite].all():
            return math.inf
        a64, r64 = a64[finite], r64[finite]
        if not r64.size:
            return 0.0
    scale = float(np.max(np.abs(r64)))
    diff = float(np.max(np.abs(a64 - r64)))
    if scale == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / scale


# ------------------------------------------------------------------------ compare tiers
@dataclass(frozen=True)
class CompareTier:
    """When two traces agree. ``max_rel`` bounds ``max|a - b| / max|b|`` per tensor; ``nmse_db`` bounds the
    normalised mean squared error ``10 log10(sum (a-b)^2 / sum b^2)``; ``exact_routing`` requires identical
    chosen experts."""

    name: str
    max_rel: float
    nmse_db: float
    exact_routing: bool
    why: str


COMPARE_TIERS = {t.name: t for t in (
    CompareTier("fp32", 1e-4, -70.0, True,
                "float32 vs float32 (other summation orders): measured 2e-7..1e-6 on the fixtures; "
                "1e-4 is the whole-model logits tier of lfm2np.oracle.tolerance.FP32"),
    CompareTier("fp16", 2e-2, -40.0, False,
                "float16 activations: unit roundoff 4.9e-4, grown by depth and by softmax/normalisation"),
    CompareTier("bf16", 8e-2, -30.0, False,
                "bfloat16 activations and weights: unit roundoff 3.9e-3 (8 significant bits), grown by depth"),
    # the quantised tiers: a correct run on Q* weights against the original weights, every tensor, worst case of
    # tools/measure_tiers.py (12 tiny random LFM2 / LFM2-MoE models, lfm2np and llama.cpp runs; docs/oracle.md)
    # llama.cpp's CPU arithmetic (dtype llamacpp-cpu) against llama.cpp: the same bits measured on every fixture
    # file and run (tools/make_llamacpp_fixtures.py --tiers; docs/llamacpp-cpu.md)
    CompareTier("llamacpp-cpu", 2e-3, -60.0, False,
                "llama.cpp's CPU arithmetic (dtype llamacpp-cpu) against llama.cpp: measured bit-identical; other "
                "summation orders with f16 attention inputs rounding the other way up to 6e-4 / -65 dB (flash "
                "attention, F32 files); one quantised activation rounded the other way moves its product by ~1e-2 "
                "of scale and fails it, as f32 activations (7e-3 / -44 dB at the first product) do"),
    CompareTier("q8_0", 1.5e-1, -20.0, False,
                "Q8_0 weights against the original ones: worst correct run measured 0.088 / -25.2 dB (tiny random "
                "MoE, llama.cpp); a trained model's logits 0.02 / -34 dB"),
    CompareTier("q6_k", 4e-1, -12.0, False,
                "Q6_K weights against the original ones: worst correct run measured 0.26 / -16.3 dB"),
    CompareTier("q5_k", 6e-1, -7.0, False,
                "Q5_K weights against the original ones: worst correct run measured 0.37 / -11.1 dB"),
    CompareTier("q4", 1.0, -2.0, False,
                "Q4_0 / Q4_K weights against the original ones: worst correct run measured 0.77 / -5.0 dB on tiny "
                "random models (a trained model's logits 0.19 / -15.5 dB): only a broken run fails it"),
)}


#: One operator of a float32 backend against the reference's (inputs given, the kernel alone): FP32.op_rel, and the
#: NMSE bound the fp32 compare tier keeps relative to its max_rel (-70 dB at 1e-4: -90 dB at 1e-5).
FP32_OPERATOR = CompareTier("fp32-op", FP32.op_rel, -90.0, True,
                            "one float32 operator on the reference's inputs: each within 1e-5 of its scale "
                            "(lfm2np.oracle.tolerance.FP32.op_rel)")


def operator_tier(tier: CompareTier) -> CompareTier:
    """The tier one operator is judged at where a whole model is judged at ``tier``: the fp32 tier's operators at
    :data:`FP32_OPERATOR`; a lower precision's (bf16, a quantised file) at the model's own tier, since one kernel's
    rounding there is of the same order as the model's."""
    return FP32_OPERATOR if tier.name == "fp32" else tier


def compare_tier(tier: Any) -> CompareTier:
    """A tier given by name (``"fp32"``, ``"q8_0"``...) or as a :class:`CompareTier`; an :class:`Lfm2npError`
    naming the argument otherwise."""
    if isinstance(tier, CompareTier):
        return tier
    if isinstance(tier, str) and tier in COMPARE_TIERS:
        return COMPARE_TIERS[tier]
    raise Lfm2npError(f"unknown tier {shown(tier)}; expected one of {', '.join(COMPARE_TIERS)} or a CompareTier")
