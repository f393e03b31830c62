"""The vision operators of LFM2-VL (the SigLIP2 NaFlex tower and the projector), one small pure function each, as
:mod:`lfm2np.ops` holds the text ones (LayerNorm and GELU-tanh live there; erf and the exact GELU here).

More dimensions (beside :mod:`lfm2np.ops`'s legend): N images, P patches of an image (padded to the batch's P), Dv
the vision width, Hv its heads, Fv its MLP width, G the side of the learned position grid, f the downsample factor,
I image tokens, Hp the projector's width.

Formulas only, like :mod:`lfm2np.ops`: arrays in, arrays out, nothing named.
"""

from __future__ import annotations

import math

import numpy as np

from . import passes
from .ops import Rounding, exact, softmax


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel with parameter a (torch: -0.75 plain, -0.5 antialiased)."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0)).astype(x.dtype)


def resize_matrix(n_out: int, n_in: int, kernel: str = "bilinear", antialias: bool = True,
                  dtype: np.dtype = np.float32) -> np.ndarray:
    """The weights of a 1-D resize from ``n_in`` to ``n_out`` samples (align_corners=False), as torch's
    ``F.interpolate`` computes them: output i reads around ``c_i = (i + 0.5) * n_in/n_out - 0.5``.  -> (n_out, n_in)

    ``bilinear``: the triangle ``max(0, 1 - |j - c_i| / s)`` normalised to sum 1, with support ``s = max(scale, 1)``
    when ``antialias`` (a downscale averages every input it covers) and 1 otherwise (two taps). ``bicubic``:
    antialiased, Keys' kernel (a = -0.5) over ``|j - c_i| / s`` normalised; plain, four taps (a = -0.75) at the
    inputs nearest c_i, clamped to the edge (torch's ``upsample_bicubic2d``)."""
    dtype = np.dtype(dtype)
    scale = dtype.type(n_in) / dtype.type(n_out)
    centre = (np.arange(n_out, dtype=dtype)[:, None] + dtype.type(0.5)) * scale - dtype.type(0.5)  # (n_out, 1)
    source = np.arange(n_in, dtype=dtype)[None, :]
    if kernel == "bilinear":
        support = max(scale, dtype.type(1)) if antialias else dtype.type(1)
        w = np.maximum(dtype.type(1) - np.abs(source - centre) / support, dtype.type(0))
        return w / w.sum(axis=-1, keepdims=True)
    if kernel != "bicubic":
        raise ValueError(f"kernel {kernel!r}")
    if antialias:
        support = max(scale, dtype.type(1))
        w = _cubic((source - centre) / support, -0.5)
        return w / w.sum(axis=-1, keepdims=True)
    w = np.zeros((n_out, n_in), dtype)
    first = np.floor(centre[:, 0]).astype(np.int64) - 1
    for tap in range(4):  # taps outside the input read its edge
        j = first + tap
        np.add.at(w, (np.arange(n_out), np.clip(j, 0, n_in - 1)), _cubic(j - centre[:, 0], -0.75))
    return w


def resize_positions(grid: np.ndarray, h: int, w: int, P: int, kernel: str = "bilinear",
                     antialias: bool = True) -> np.ndarray:
    """The learned G x G position grid resized to an image of h x w patches, one row per patch (row-major), padded
    to P rows that repeat patch (0, 0)'s: each output is the grid weighted by its row's resize weights times its
    column's (:func:`resize_matrix`), as transformers' SigLIP2 computes it.  (G, G, Dv) -> (P, Dv)"""
    G, dt = grid.shape[0], grid.dtype
    rows, cols = resize_matrix(h, G, kernel, antialias, dt), resize_matrix(w, G, kernel, antialias, dt)
    patch = np.arange(P)
    r, c = np.where(patch < h * w, patch // w, 0), np.where(patch < h * w, patch % w, 0)
    weights = (rows[r][:, :, None] * cols[c][:, None, :]).reshape(P, G * G)  # (P, G*G)
    return weights @ grid.reshape(G * G, -1)


def encoder_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, key_mask: np.ndarray,
                      rnd: Rounding = exact) -> np.ndarray:
    """``softmax(q k^T * hd^-0.5 + mask) v`` with every query seeing every key whose ``key_mask`` is 1 (keys
    masked 0 get the dtype's lowest value added, as transformers adds it): bidirectional multi-head attention.
    (P, H, hd), (P, H, hd), (P, H, hd), (P,) -> (P, H * hd)

    One head at a time per thread, so that its P x P scores stay in the cache while the softmax passes over
    them; the heads are shared among the threads of :mod:`lfm2np.passes`, each product on one BLAS thread
    (a head's products are too small for the BLAS to split well: twice as fast on two cores). Always one BLAS
    thread's bits, on any number of threads."""
    P, H, hd = q.shape
    scale = q.dtype.type(hd ** -0.5)
    bias = None if key_mask.all() else np.where(key_mask > 0, 0, np.finfo(q.dtype).min).astype(q.dtype)
    out = np.empty((P, H, hd), q.dtype)

    together = passes.THREADS > 1 and H > 1

    def heads(lo: int, hi: int) -> None:
        for h in range(lo, hi):
            scores = rnd(np.ascontiguousarray(q[:, h]) @ np.ascontiguousarray(k[:, h]).T)  # (P, P)
            scores *= scale
            scores = rnd(scores)
            if bias is not None:
                scores += bias
            probs = rnd(softmax(scores, axis=-1, in_place=True, shared=not together))
            out[:, h] = rnd(probs @ v[:, h])

    passes.shared_products(H, heads, size=H * P * P, per_thread=4)  # whole in this thread when not together
    return out.reshape(P, H * hd)


def pixel_unshuffle(x: np.ndarray, h: int, w: int, f: int) -> np.ndarray:
    """Each f x f block of an image's h x w grid of patch features becomes one token: the block's features
    concatenated row by row (patch (i, j) of the block at ``(i f + j) Dv``); tokens in row-major order over the
    (h/f) x (w/f) blocks (rows and columns past a multiple of f are dropped).  (h*w, Dv) -> ((h/f)*(w/f), f*f*Dv)"""
    Dv = x.shape[-1]
    grid = x[:h * w].reshape(h, w, Dv)[:h // f * f, :w // f * f]
    blocks = grid.reshape(h // f, f, w // f, f, Dv).transpose(0, 2, 1, 3, 4)  # (h/f, w/f, f, f, Dv)
    return blocks.reshape((h // f) * (w // f), f * f * Dv)


# ------------------------------------------------------------------ erf and the exact GELU (the projector)
_TWO_OVER_SQRT_PI, _ONE_OVER_SQRT_PI = 2 / math.sqrt(math.pi), 1 / math.sqrt(math.pi)


def erf(x: np.ndarray) -> np.ndarray:
    """``erf(x) = 2/sqrt(pi) * integral_0^x exp(-t^2) dt``, computed in float64 and returned in x's dtype: within
    5 ulp of a correctly rounded float64 erf (0.24 ulp on average over [-7, 7]), so correctly rounded in float32.

    |x| < 1: the Taylor series ``2/sqrt(pi) sum (-1)^n x^(2n+1) / (n! (2n+1))``; 1 <= |x| < 2: the series of
    positive terms ``2/sqrt(pi) exp(-x^2) sum 2^n x^(2n+1) / (1*3*...*(2n+1))``, summed with compensation; 2 <= |x|
    < 6: ``1 - erfc(x)`` with erfc's continued fraction ``exp(-x^2)/sqrt(pi) / (x + (1/2)/(x + 1/(x + (3/2)/(x +
    ...))))`` (45 terms); beyond 6, 1 (erfc(6) = 2e-17). Odd: erf(-x) = -erf(x)."""
    x64 = np.asarray(x, dtype=np.float64)
    flat = np.ascontiguousarray(x64).reshape(-1)
    out = np.empty(flat.shape, np.float64)

    def piece(lo: int, hi: int) -> None:  # elementwise: the same values whatever the split among threads
        out[lo:hi] = _erf_magnitude(np.abs(flat[lo:hi]))

    passes.in_parallel(flat.size, piece)
    out = np.copysign(out, flat).reshape(x64.shape)
    return out.astype(np.asarray(x).dtype if np.asarray(x).dtype.kind == "f" else np.float64, copy=False)


def _erf_magnitude(a: np.ndarray) -> np.ndarray:
    """erf(a) for a >= 0 (float64), by :func:`erf`'s three formulas; NaN stays NaN."""
    out = np.ones_like(a)
    part = a < 1
    s = a[part]
    s2, term = s * s, s.copy()
    total = s.copy()
    for n in range(1, 28):
        term *= -s2 / n
        total += term / (2 * n + 1)
    out[part] = _TWO_OVER_SQRT_PI * total
    part = (a >= 1) & (a < 2)
    s = a[part]
    s2, term, total, lost = s * s, s.copy(), s.copy(), np.zeros_like(s)
    for n in range(40):  # Kahan summation: the terms rise before they fall
        term *= 2 * s2 / (2 * n + 3)
        y = term - lost
        t = total + y
        lost = (t - total) - y
        total = t
    out[part] = _TWO_OVER_SQRT_PI * np.exp(-s2) * total
    part = (a >= 2) & (a < 6)
    s = a[part]
    fraction = s.copy()
    for k in range(45, 0, -1):  # the continued fraction, evaluated from its far end
        fraction = s + (k / 2) / fraction
    out[part] = 1 - _ONE_OVER_SQRT_PI * np.exp(-s * s) / fraction
    out[np.isnan(a)] = np.nan
    return out


def gelu(x: np.ndarray, rnd: Rounding = exact) -> np.ndarray:
    """``x * 0.5 * (1 + erf(x / sqrt(2)))``, GELU in its exact erf form (the projector's ``gelu``), computed in
    float64 and stored in x's dtype (a bf16 backend: stored once)."""
    x64 = x.astype(np.float64, copy=False)
    return rnd((x64 * 0.5 * (1.0 + erf(x64 * math.sqrt(0.5)))).astype(x.dtype, copy=False))
