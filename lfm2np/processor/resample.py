"""Resizing uint8 images as torch computes it on CPU: separable, in fixed point, exact to the bit.

``out[i] = clamp((sum_j w16[i, j] * src[xmin_i + j] + 2^(s-1)) >> s, 0, 255)`` along the width, then along the
height (the intermediate rounded to uint8 too), where ``w16 = round(w * 2^s)`` are the filter weights in int16
and ``s`` the largest precision (at most 22) that keeps the largest weight of the axis below 2^15.

The float weights follow PIL's antialiased resampling, in float64: output pixel i covers source positions around
``center = (i + 0.5) * in / out``; with ``scale = in / out``, the filter (triangle for bilinear, Keys' cubic with
a = -0.5 for bicubic) is stretched by ``max(scale, 1)`` (the antialiasing: every source pixel under the footprint
contributes when downscaling), evaluated at ``(xmin + j - center + 0.5) / max(scale, 1)`` for the source pixels
``xmin .. xmin + n - 1`` within ``center -+ support * max(scale, 1)``, and normalised to sum to 1. Without
antialiasing (``antialias=False``) the footprint is never stretched: the 2 (bilinear) or 4 (bicubic, a = -0.75)
neighbours of ``(i + 0.5) * scale - 0.5``, with the taps beyond the border folded onto the edge pixel.

This is what transformers' Lfm2VlImageProcessor gets from torchvision on uint8 input (``_upsample_bilinear2d_aa``,
the AVX2 kernel and the generic separable kernel share these integer weights and this arithmetic). Pillow's own
resize uses other fixed-point rounding and misses it by one level here and there; torch on non-x86 CPUs resizes in
float32 and rounds, which can differ by one level too.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import Lfm2npError

FILTERS = ("bilinear", "bicubic")


def _triangle(x: float) -> float:
    x = abs(x)
    return 1.0 - x if x < 1.0 else 0.0


def _keys(a: float):
    def cubic(x: float) -> float:  # torch's cubic_convolution1 / cubic_convolution2, in their operation order
        x = abs(x)
        if x < 1.0:
            return ((a + 2) * x - (a + 3)) * x * x + 1
        if x < 2.0:
            return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
        return 0.0
    return cubic


def _antialiased(n_in: int, n_out: int, taps: int, fn) -> tuple[np.ndarray, np.ndarray, float]:
    scale = n_in / n_out
    support = taps * 0.5 * scale if scale >= 1.0 else taps * 0.5
    width = int(math.ceil(support)) * 2 + 1
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    starts, weights, wt_max = np.zeros(n_out, np.int64), np.zeros((n_out, width)), 0.0
    for i in range(n_out):
        center = scale * (i + 0.5)
        xmin = max(int(center - support + 0.5), 0)  # C++ casts truncate toward zero
        size = min(max(min(int(center + support + 0.5), n_in) - xmin, 0), width)
        w = [fn((j + xmin - center + 0.5) * invscale) for j in range(size)]
        total = 0.0
        for v in w:  # summed in order, as the C++ loop does
            total += v
        if total != 0.0:
            w = [v / total for v in w]
            wt_max = max([wt_max, *w])
        starts[i], weights[i, :size] = xmin, w
    return starts, weights, wt_max


def _plain(n_in: int, n_out: int, taps: int, fn) -> tuple[np.ndarray, np.ndarray, float]:
    scale, support = n_in / n_out, taps // 2
    starts, weights, wt_max = np.zeros(n_out, np.int64), np.zeros((n_out, taps)), 0.0
    for i in range(n_out):
        real = scale * (i + 0.5) - 0.5
        real = 0.0 if taps == 2 and real < 0 else real  # the source index is clamped at 0 for linear, not cubic
        index = min(math.floor(float(np.float32(real))), n_in - 1)  # floorf: the index is rounded to float first
        lam = min(max(real - index, 0.0), 1.0)
        lo = index - support + 1
        start = max(lo, 0)
        size = min(max(min(index + support + 1, n_in) - start, 0), taps)
        k = 0
        for j in range(taps):  # taps beyond either border accumulate onto the edge pixel
            k = 0 if lo + j <= 0 else (size - 1 if lo + j >= n_in - 1 else k)
            weights[i, k] += fn(j + 1 - support - lam)
            wt_max = max(wt_max, weights[i, k])
            k += 1
        starts[i] = start
    return starts, weights, wt_max


def axis_weights(n_in: int, n_out: int, filter: str = "bilinear", antialias: bool = True) \
        -> tuple[np.ndarray, np.ndarray, int]:
    """One axis's resampling in fixed point: ``(starts (out,), int16 weights (out, taps) as int64, precision)``."""
    starts, weights, wt_max = float_weights(n_in, n_out, filter, antialias)
    precision = 0
    while precision < 22 and int(0.5 + wt_max * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    scaled = weights * (1 << precision)
    return starts, np.where(scaled < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5)).astype(np.int64), precision


def float_weights(n_in: int, n_out: int, filter: str = "bilinear", antialias: bool = True) \
        -> tuple[np.ndarray, np.ndarray, float]:
    """One axis's resampling in float64: ``(starts (out,), weights (out, taps), the largest weight torch sees)``,
    before the fixed point."""
    if filter not in FILTERS:
        raise Lfm2npError(f"resize filter {filter!r}: one of {', '.join(FILTERS)}")
    taps = 2 if filter == "bilinear" else 4
    fn = _triangle if taps == 2 else _keys(-0.5 if antialias else -0.75)
    return (_antialiased if antialias else _plain)(n_in, n_out, taps, fn)


def resize_float(image: np.ndarray, height: int, width: int, filter: str = "bilinear", antialias: bool = True) \
        -> np.ndarray:
    """The same resampling in floating point, rounded (half to even) once at the end: torch's float path (what
    torchvision runs off x86, or on a GPU), a port's plain float resize; within a level of :func:`resize`."""
    out = image.astype(np.float64)
    for axis, n_out in ((1, width), (0, height)):
        if out.shape[axis] != n_out:
            starts, weights, _ = float_weights(out.shape[axis], n_out, filter, antialias)
            index = np.minimum(starts[:, None] + np.arange(weights.shape[1]), out.shape[axis] - 1)
            src = np.moveaxis(out, axis, 0)
            acc = sum(src[index[:, j]] * weights[:, j].reshape(-1, *(1,) * (src.ndim - 1))
                      for j in range(weights.shape[1]))
            out = np.moveaxis(acc, 0, axis)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def resize_axis(image: np.ndarray, n_out: int, axis: int, filter: str = "bilinear", antialias: bool = True) \
        -> np.ndarray:
    """``image`` (uint8, any shape) resized along ``axis`` to ``n_out``, in torch's fixed point."""
    n_in = image.shape[axis]
    if n_in == n_out:
        return image
    starts, weights, precision = axis_weights(n_in, n_out, filter, antialias)
    index = np.minimum(starts[:, None] + np.arange(weights.shape[1]), n_in - 1)  # past the end: weight 0
    shape = list(image.shape)
    shape[axis] = n_out
    # int32 holds every sum: |w16| < 2^15 summed to about 2^s <= 2^22, times pixels <= 255
    acc = np.full(shape, 1 << (precision - 1), np.int32)
    term = np.empty_like(acc)
    along = [1] * image.ndim
    along[axis] = n_out
    w32 = weights.astype(np.int32)
    for j in range(weights.shape[1]):
        if w32[:, j].any():
            np.multiply(np.take(image, index[:, j], axis=axis), w32[:, j].reshape(along), out=term)
            acc += term
    np.right_shift(acc, precision, out=acc)
    np.maximum(acc, 0, out=acc)
    np.minimum(acc, 255, out=acc)
    return acc.astype(np.uint8)


def resize(image: np.ndarray, height: int, width: int, filter: str = "bilinear", antialias: bool = True) -> np.ndarray:
    """out = resize_h(resize_w(image)): a uint8 (H, W, C) image to (height, width, C), as torch resizes uint8
    images on CPU (``F.interpolate(..., mode=filter, antialias=antialias, align_corners=False)``)."""
    return resize_axis(resize_axis(image, width, 1, filter, antialias), height, 0, filter, antialias)
