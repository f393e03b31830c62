"""Numerics modes: the dtype the forward pass computes in, and where it rounds.

A mode is a small policy plugged into the one forward pass (:mod:`lfm2np.layers`, :mod:`lfm2np.ops`),
never a second copy of it:

- ``float32`` (the default) and ``float64`` (the oracle mode) compute in that dtype and round nowhere
  beyond what the dtype itself does;
- ``bfloat16`` emulates a bf16 backend. NumPy has no bfloat16, so arrays stay float32 and hold bf16
  values: :func:`to_bf16` rounds (to nearest, ties to even, as torch does) wherever a bf16 backend
  stores a result, and every weight is rounded once when it is first used (the router's
  ``expert_bias`` stays float32, as transformers keeps it). The operators mark those points with their
  ``rnd`` argument; where they are, measured against transformers run in bfloat16, is in
  docs/numerics.md.

This module is also the one place that knows dtype names: :func:`canonical_dtype` maps every spelling
(``fp32``, ``bf16``, ``half``...) to ``float64``, ``float32``, ``float16`` or ``bfloat16``, and the
bf16 bit conversions live here (storage formats and the emulation share them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .errors import Lfm2npError, shown
from .ops import exact

#: Every accepted spelling of a float dtype -> its canonical name. ("F32"/"F16" are not here: they are
#: llama.cpp's GGUF type names, which the calculators read as GGUF file types.)
DTYPE_ALIASES = {
    "float64": "float64", "fp64": "float64", "double": "float64",
    "float32": "float32", "fp32": "float32", "float": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}
#: Bytes per element of each canonical float dtype.
DTYPE_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}


def canonical_dtype(name: Any) -> str | None:
    """The canonical name of a float dtype spelling (``"bf16"`` -> ``"bfloat16"``), or None if unknown.
    NumPy dtypes are accepted too (``np.float32`` -> ``"float32"``)."""
    if isinstance(name, str):
        return DTYPE_ALIASES.get(name.strip().lower())
    try:
        return DTYPE_ALIASES.get(np.dtype(name).name) if name is not None else None
    except Exception:  # TypeError; a nested list can even make np.dtype recurse too deeply
        return None


# ------------------------------------------------------------------------------ bfloat16 bits
def bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest, ties to even, as torch does.
    NaN stays NaN (quiet); infinities stay infinite."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    nan = np.isnan(x)
    if nan.any():
        rounded = np.where(nan, (bits >> np.uint32(16)) | np.uint32(0x40), rounded)
    return rounded.astype(np.uint16)


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32, exactly: the 16 bits become the high half."""
    wide = bits.astype(np.uint32)  # one new array, shifted in place: no second temporary
    wide <<= 16
    return wide.view(np.float32)


def to_bf16(x: np.ndarray) -> np.ndarray:
    """Round float values to the nearest bfloat16 (ties to even); the result is a float32 array."""
    return bfloat16_to_float32(bfloat16_bits(np.asarray(x, dtype=np.float32)))


# ------------------------------------------------------------------------------------- modes
@dataclass(frozen=True)
class Numerics:
    """A numerics mode: ``dtype`` of every array, ``round`` applied where a backend stores a result, and
    whether weights are rounded the same way once when first used (``round_weights``)."""

    name: str
    dtype: np.dtype
    round: Callable[[np.ndarray], np.ndarray]
    round_weights: bool = False

    def weight(self, name: str, w: np.ndarray) -> np.ndarray:
        """Weight ``name`` as this mode computes with it (the expert bias is never rounded)."""
        w = np.asarray(w).astype(self.dtype, copy=False)
        if self.round_weights and not name.endswith("expert_bias"):
            return self.round(w)
        return w

    def __repr__(self) -> str:
        return f"Numerics({self.name})"


FLOAT32 = Numerics("float32", np.dtype(np.float32), exact)
FLOAT64 = Numerics("float64", np.dtype(np.float64), exact)
BFLOAT16 = Numerics("bfloat16", np.dtype(np.float32), to_bf16, round_weights=True)
MODES = {m.name: m for m in (FLOAT32, FLOAT64, BFLOAT16)}


def numerics(mode: Any = "float32") -> Numerics:
    """The numerics mode called ``mode``: a :class:`Numerics`, a name (``"float32"``, ``"float64"``,
    ``"bfloat16"`` or an alias such as ``"bf16"``) or a NumPy float dtype."""
    if isinstance(mode, Numerics):
        return mode
    name = canonical_dtype(mode)
    if name not in MODES:
        raise Lfm2npError(f"dtype {shown(mode)} is not supported; expected one of {', '.join(MODES)}")
    return MODES[name]
