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
  docs/numerics.md;
- ``llamacpp-cpu`` (and ``llamacpp-cpu-kv-f32``) computes as llama.cpp's CPU backend computes a GGUF file: the
  activations quantised before each product with a quantised weight, integer block products, an f16 (f32)
  KV cache, ggml's own exp, SiLU, softmax and RMSNorm. Its operators replace :mod:`lfm2np.ops` in the forward
  pass (``ops``: :class:`lfm2np.ggml_ops.LlamaCppCpu`); docs/llamacpp-cpu.md.

This module is also the one place that knows dtype names: :func:`canonical_dtype` maps every spelling
(``fp32``, ``bf16``, ``half``...) to ``float64``, ``float32``, ``float16`` or ``bfloat16``, and the
bf16 bit conversions live here (storage formats and the emulation share them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .errors import Lfm2npError, shown
from .ggml_ops import MODES as _LLAMACPP
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
    """A numerics mode: ``dtype`` of every array, ``round`` applied where a backend stores a result, whether
    weights are rounded the same way once when first used (``round_weights``), and the operators the forward
    pass computes with when they are not :mod:`lfm2np.ops` (``ops``: llama.cpp's CPU arithmetic)."""

    name: str
    dtype: np.dtype
    round: Callable[[np.ndarray], np.ndarray]
    round_weights: bool = False
    ops: Any = None

    @property
    def names_inputs(self) -> bool:
        """Whether the forward pass names what each product and the attention read (llama.cpp's CPU arithmetic:
        :func:`lfm2np.schema.trace_names` with ``inputs``)."""
        return self.ops is not None

    @property
    def reads_blocks(self) -> bool:
        """Whether the mode computes products from the weights' stored blocks (it is told how each is stored)."""
        return self.ops is not None

    def weight(self, name: str, w: np.ndarray, stored: Any = None) -> np.ndarray:
        """Weight ``name`` as this mode computes with it (the expert bias is never rounded). ``stored``: how it
        is stored (its ggml type and a function giving its bytes), for a mode that :attr:`reads_blocks`."""
        if self.ops is not None:
            return self.ops.weight(name, w, stored)
        w = np.asarray(w).astype(self.dtype, copy=False)
        if self.round_weights and not name.endswith("expert_bias"):
            return self.round(w)
        return w

    def __repr__(self) -> str:
        return f"Numerics({self.name})"


FLOAT32 = Numerics("float32", np.dtype(np.float32), exact)
FLOAT64 = Numerics("float64", np.dtype(np.float64), exact)
BFLOAT16 = Numerics("bfloat16", np.dtype(np.float32), to_bf16, round_weights=True)
LLAMACPP_CPU = Numerics("llamacpp-cpu", np.dtype(np.float32), exact, ops=_LLAMACPP["llamacpp-cpu"])
LLAMACPP_CPU_KV_F32 = Numerics("llamacpp-cpu-kv-f32", np.dtype(np.float32), exact,
                               ops=_LLAMACPP["llamacpp-cpu-kv-f32"])
MODES = {m.name: m for m in (FLOAT32, FLOAT64, BFLOAT16, LLAMACPP_CPU, LLAMACPP_CPU_KV_F32)}
#: other spellings of the modes that are not a float dtype
MODE_ALIASES = {"llama.cpp-cpu": "llamacpp-cpu", "ggml-cpu": "llamacpp-cpu", "llamacpp-cpu-kv-f16": "llamacpp-cpu",
                "llama.cpp-cpu-kv-f32": "llamacpp-cpu-kv-f32", "ggml-cpu-kv-f32": "llamacpp-cpu-kv-f32"}


def numerics(mode: Any = "float32") -> Numerics:
    """The numerics mode called ``mode``: a :class:`Numerics`, a name (``"float32"``, ``"float64"``,
    ``"bfloat16"``, ``"llamacpp-cpu"``, ``"llamacpp-cpu-kv-f32"`` or an alias such as ``"bf16"``) or a NumPy
    float dtype."""
    if isinstance(mode, Numerics):
        return mode
    if isinstance(mode, str) and mode.strip().lower() in {**MODES, **MODE_ALIASES}:
        key = mode.strip().lower()
        return MODES[MODE_ALIASES.get(key, key)]
    name = canonical_dtype(mode)
    if name not in MODES:
        raise Lfm2npError(f"dtype {shown(mode)} is not supported; expected one of {', '.join(MODES)}")
    return MODES[name]
