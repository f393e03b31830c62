"""Tolerance tiers: how close two computations of the same thing must be, named in one place.

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

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tier:
    name: str
    op_rel: float  # one operator, relative to the scale of its output
    logits_rel: float  # whole-model logits, relative to their scale


FP32 = Tier("fp32", op_rel=1e-5, logits_rel=1e-4)
#: float64 against float32 of the same computation: the float32 rounding itself is what differs.
FP64_VS_FP32 = Tier("fp64-vs-fp32", op_rel=1e-5, logits_rel=1e-4)

TIERS = {t.name: t for t in (FP32, FP64_VS_FP32)}


def rel_error(a: np.ndarray, ref: np.ndarray) -> float:
    """``max|a - ref| / max|ref|`` in float64 (0 when both are all zeros)."""
    a64 = np.asarray(a, dtype=np.float64)
    r64 = np.asarray(ref, dtype=np.float64)
    if a64.shape != r64.shape:
        raise ValueError(f"shapes differ: {a64.shape} vs {r64.shape}")
    scale = np.max(np.abs(r64)) if r64.size else 0.0
    diff = np.max(np.abs(a64 - r64)) if r64.size else 0.0
    if scale == 0.0:
        return float(diff)
    return float(diff / scale)
