"""What a backend's image processor gives the diagnosis: a processor dump.

An ``.npz`` file holding any of (N units over all images, I images, P patches per unit, D = 3 p^2)::

    pixel_values          (N, P, D) float   the encoder's input (padding rows allowed; P need not be the budget)
    pixel_attention_mask  (N, P)    bool/0-1 which rows are real patches
    spatial_shapes        (N, 2)    int     patch rows and columns of each unit
    image_tokens          (I,)      int     placeholders the backend wrote for each image
    image_sizes           (I, 2)    int     (height, width) of each image as the backend decoded it
    ids                   (T,)      int     the expanded prompt (markers and placeholders in place)

The arrays transformers' processor returns can be saved as they are (``np.savez("dump.npz", **inputs)``
with ``pixel_values``, ``pixel_attention_mask``, ``spatial_shapes`` and ``input_ids``, which is read as
``ids``). Every problem is an :class:`~lfm2np.errors.Lfm2npError` naming the file and the array.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..errors import Lfm2npError
from .dumps import read_npz

#: the arrays that make an .npz file a processor dump (ids alone do not: a logits dump has them too)
PROCESSOR_KEYS = ("pixel_values", "pixel_attention_mask", "spatial_shapes", "image_tokens", "image_sizes")


@dataclass(frozen=True, eq=False)
class ProcessorDump:
    """A backend's processor output (any subset of the arrays, see the module's doc)."""

    pixel_values: np.ndarray | None = None
    pixel_attention_mask: np.ndarray | None = None
    spatial_shapes: np.ndarray | None = None
    image_tokens: np.ndarray | None = None
    image_sizes: np.ndarray | None = None
    ids: np.ndarray | None = None
    source: str = "dump"

    @property
    def units(self) -> int | None:
        """N, the number of units the dump holds, when it says."""
        for a in (self.spatial_shapes, self.pixel_attention_mask, self.pixel_values):
            if a is not None:
                return len(a)
        return None

    def real_patches(self) -> np.ndarray | None:
        """(N,) the real patches of each unit: from the mask, else the spatial shapes."""
        if self.pixel_attention_mask is not None:
            return self.pixel_attention_mask.sum(axis=1).astype(np.int64)
        if self.spatial_shapes is not None:
            return self.spatial_shapes.prod(axis=1)
        return None


def _ints(a: np.ndarray, what: str, ndim: int, low: int, width: int | None = None) -> np.ndarray:
    if a.dtype == bool or not np.issubdtype(a.dtype, np.integer) and not (
            np.issubdtype(a.dtype, np.floating) and np.all(np.isfinite(a)) and np.all(a == np.round(a))):
        raise Lfm2npError(f"{what} must hold integers; got {a.dtype}")
    if a.ndim != ndim or (width is not None and a.shape[-1] != width) or a.size == 0:
        raise Lfm2npError(f"{what} has shape {list(a.shape)}; expected {'(n,)' if ndim == 1 else f'(n, {width})'}")
    if np.any(a < low) or np.any(np.abs(a.astype(np.float64)) >= 2.0 ** 62):
        raise Lfm2npError(f"{what} holds a value below {low} or too large to be a count")
    return a.astype(np.int64)


def processor_dump(arrays: dict[str, np.ndarray], source: str = "dump") -> ProcessorDump:
    """A :class:`ProcessorDump` from named arrays (``input_ids`` is read as ``ids``), each checked."""
    a = dict(arrays)
    if "input_ids" in a and "ids" not in a:
        a["ids"] = a.pop("input_ids")
    if "ids" in a and np.ndim(a["ids"]) == 2 and np.shape(a["ids"])[0] == 1:
        a["ids"] = np.asarray(a["ids"])[0]  # transformers' batch of one
    out: dict[str, np.ndarray] = {}
    if "pixel_values" in a:
        v = np.asarray(a["pixel_values"])
        if not np.issubdtype(v.dtype, np.floating) or v.ndim != 3 or v.size == 0:
            raise Lfm2npError(f"{source}: pixel_values must be floating point (N, P, D); got {v.dtype} "
                              f"{list(v.shape)}")
        if not np.all(np.isfinite(v)):
            raise Lfm2npError(f"{source}: pixel_values holds NaN or infinity")
        out["pixel_values"] = v.astype(np.float32)
    if "pixel_attention_mask" in a:
        m = np.asarray(a["pixel_attention_mask"])
        if m.ndim != 2 or not (m.dtype == bool or np.isin(m, (0, 1)).all()):
            raise Lfm2npError(f"{source}: pixel_attention_mask must be (N, P) of booleans or 0/1")
        out["pixel_attention_mask"] = m.astype(bool)
    for name, ndim, low, width in (("spatial_shapes", 2, 1, 2), ("image_tokens", 1, 0, None),
                                   ("image_sizes", 2, 1, 2), ("ids", 1, 0, None)):
        if name in a:
            out[name] = _ints(np.asarray(a[name]), f"{source}: {name}", ndim, low, width)
    counts = {k: len(out[k]) for k in ("pixel_values", "pixel_attention_mask", "spatial_shapes") if k in out}
    if len(set(counts.values())) > 1:
        raise Lfm2npError(f"{source}: the unit counts disagree: {counts}")
    if "pixel_values" in out and "pixel_attention_mask" in out and \
            out["pixel_values"].shape[1] != out["pixel_attention_mask"].shape[1]:
        raise Lfm2npError(f"{source}: pixel_values has {out['pixel_values'].shape[1]} rows per unit, the mask "
                          f"{out['pixel_attention_mask'].shape[1]}")
    if "image_tokens" in out and "image_sizes" in out and len(out["image_tokens"]) != len(out["image_sizes"]):
        raise Lfm2npError(f"{source}: image_tokens has {len(out['image_tokens'])} images, image_sizes "
                          f"{len(out['image_sizes'])}")
    if not any(k in out for k in PROCESSOR_KEYS):
        raise Lfm2npError(f"{source}: no processor arrays (one of {', '.join(PROCESSOR_KEYS)})")
    return ProcessorDump(**out, source=source)


def is_processor_dump(arrays: dict[str, np.ndarray]) -> bool:
    """Whether the arrays of a dump file are a processor's (hold one of :data:`PROCESSOR_KEYS`)."""
    return any(k in arrays for k in PROCESSOR_KEYS)


def load_processor_dump(path: "str | os.PathLike[str]") -> ProcessorDump:
    """Read a processor dump (an ``.npz`` file, untrusted: headers checked before any array is read)."""
    return processor_dump(read_npz(path), str(path))
