"""Products with quantised weights as llama.cpp's CPU backend computes them: the activations quantised to the
weight type's dot-product type, integer block dot products, the scales applied in ggml's float order.

Before a product ``y = x W^T`` ggml converts the activation rows ``x`` to the *vec_dot type* of W's type
(``type_traits_cpu[type].vec_dot_type``; :data:`VEC_DOT_TYPE`): Q8_0 for Q8_0 and Q4_0 (blocks of 32, one f16
scale ``d = amax / 127``, ``q = round(x * 127 / amax)``), Q8_K for the k-quants (blocks of 256, a float scale
``d = 1 / iscale`` with ``iscale = -127 / x_max``, x_max the value of largest magnitude, and the sums of each 16
quants), f16 for F16 weights, bf16 for BF16, nothing for F32 (:func:`quantize`). The block products are then
exact integer sums; what remains in float is how the scales meet them, which differs between the kernels the
AVX2 build runs (:func:`product`):

- Q8_0 (``ggml_vec_dot_q8_0_q8_0``, and llamafile's sgemm for prompts, the same order): eight lanes of four
  products per block, ``acc_l = fma(d_w d_x, isum_l, acc_l)`` block after block, :func:`~lfm2np.ggml.hsum8`;
- Q4_0: repacked eight rows at a time when the rows are a multiple of 8 (``ggml_gemv/gemm_q4_0_8x8_q8_0``):
  ``acc = fma(isum_b, d_w d_x, acc)`` per row, block after block; otherwise as Q8_0;
- Q4_K: repacked the same way (``q4_K_8x8``): ``acc = fma(sum_s sc_s isum_s, d_w d_x, acc)`` and
  ``acc_min = fma(sum_s m_s bsum_s, dmin_w d_x, acc_min)`` per block, ``acc - acc_min``; the activation rows
  taken four at a time (``gemm``: all but the last ``T % 4`` of four rows or more, never an expert's) add one
  pair of sub-blocks at a time instead; otherwise, for eight rows of activations or more, the tiled kernel
  (below), else ``ggml_vec_dot_q4_K_q8_K``'s lanes;
- Q6_K: for eight rows of activations or more the tiled kernel (``ggml/src/ggml-cpu/tiled``): per 256-block
  ``res = d_w * isum``, ``out = fma(res, d_x, out)``; fewer rows: ``ggml_vec_dot_q6_K_q8_K``'s eight lanes of
  scaled sums, ``acc_l = fma(d_x d_w, lane_l, acc_l)``, :func:`~lfm2np.ggml.hsum8`;
- F32, F16, BF16: :func:`lfm2np.ggml.dot`, llamafile's sgemm for prompts (two rows or more, weight rows a
  multiple of 4, K a multiple of 8) and ``ggml_vec_dot_*`` otherwise; the experts of a MoE layer
  (``ggml_mul_mat_id``) never take the sgemm.

Block layouts: ggml's ``ggml-common.h`` (Q8_0 34 bytes: f16 d, 32 int8; Q4_0 18: f16 d, 16 bytes of nibbles,
low nibbles the first 16 values, value = q - 8; Q4_K 144: f16 d, f16 dmin, 12 bytes of 6-bit scales and mins, 128
bytes of nibbles; Q6_K 210: 128 bytes of low 4 bits, 64 of high 2 bits, 16 int8 scales, f16 d, value = q - 32).
This module imports nothing from lfm2np but :mod:`lfm2np.ggml` and :mod:`lfm2np.errors`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import Lfm2npError
from .ggml import CHUNK_BYTES, F32, F64, dot, fma, hsum8, to_bf16, to_f16

#: ggml type -> the type its vec_dot converts the activations to (ggml-cpu.c ``type_traits_cpu``)
VEC_DOT_TYPE = {"F32": "F32", "F16": "F16", "BF16": "BF16", "Q8_0": "Q8_0", "Q4_0": "Q8_0", "Q4_K": "Q8_K",
                "Q6_K": "Q8_K"}
#: the weight types this module multiplies (the rest: an error naming the type)
COVERED = tuple(VEC_DOT_TYPE)
BLOCK = {"Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_K": (256, 144), "Q6_K": (256, 210)}  # values, bytes


# ------------------------------------------------------------------------------------- activations
@dataclass(frozen=True)
class Activation:
    """Activation rows as a product reads them: ``kind`` (the vec_dot type), ``values`` (T, K) float32 (the
    quantised values ``d * q``), and for Q8_0 / Q8_K the integers ``q`` (T, nb, block), scales ``d`` (T, nb)
    and (Q8_K) the sums of each 16 quants ``bsums`` (T, nb, 16)."""

    kind: str
    values: np.ndarray
    q: np.ndarray | None = None
    d: np.ndarray | None = None
    bsums: np.ndarray | None = None


def quantize(x: np.ndarray, kind: str) -> Activation:
    """``x`` (T, K) converted to the vec_dot type ``kind`` as ggml's ``from_float`` does (the AVX2 build's
    ``quantize_row_q8_0``: ``d = amax / 127`` stored as f16, ``q = round(x * (127 / amax))``, ties to even;
    ``quantize_row_q8_K``: ``iscale = -127 / x_max``, ``q = min(127, round(iscale * x))``, ``d = 1 / iscale``)."""
    x = np.ascontiguousarray(x, F32)
    if kind == "F32":
        return Activation(kind, x)
    if kind in ("F16", "BF16"):
        return Activation(kind, to_f16(x) if kind == "F16" else to_bf16(x))
    T, K = x.shape
    if kind == "Q8_0":
        b = x.reshape(T, K // 32, 32)
        amax = np.abs(b).max(axis=-1)
        d = to_f16(amax / F32(127))
        with np.errstate(divide="ignore"):
            inv = np.where(amax != 0, F32(127) / amax, F32(0)).astype(F32)
        q = np.rint(b * inv[..., None]).astype(np.int8)
        return Activation(kind, (q * d[..., None]).reshape(T, K), q, d)
    b = x.reshape(T, K // 256, 256)
    first = np.abs(b).argmax(axis=-1)[..., None]  # the first value of largest magnitude
    top = np.take_along_axis(b, first, axis=-1)[..., 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(top != 0, F32(-127) / top, F32(0)).astype(F32)
        d = np.where(top != 0, F32(1) / iscale, F32(0)).astype(F32)
    q = np.minimum(np.rint(b * iscale[..., None]), 127).astype(np.int8)
    bsums = q.reshape(T, K // 256, 16, 16).sum(axis=-1, dtype=np.int64)
    return Activation(kind, (q * d[..., None]).astype(F32).reshape(T, K), q, d, bsums)


# ----------------------------------------------------------------------------------------- weights
@dataclass(frozen=True)
class Blocks:
    """A quantised weight's integers, decoded once: ``q`` (O, nb, block) integer values (Q4_K: 0..15, Q6_K: 0..63
    unsigned, Q8_0 / Q4_0: signed), ``d`` (O, nb) float32 scales; Q4_K: ``dmin``, 6-bit ``sc`` and ``mn``
    (O, nb, 8); Q6_K: int8 ``sc`` (O, nb, 16)."""

    kind: str
    q: np.ndarray
    d: np.ndarray
    dmin: np.ndarray | None = None
    sc: np.ndarray | None = None
    mn: np.ndarray | None = None


def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(F32)


def decode(raw: np.ndarray, kind: str, K: int, where: str = "") -> Blocks:
    """The stored bytes ``raw`` (O, row bytes) of a ``kind`` weight with rows of ``K`` values -> :class:`Blocks`."""
    if kind not in BLOCK:
        raise Lfm2npError(f"{where}: ggml type {kind} is not covered by llama.cpp's CPU arithmetic here "
                          f"(covered: {', '.join(COVERED)})")
    n, size = BLOCK[kind]
    raw = np.ascontiguousarray(raw, np.uint8)
    O = raw.shape[0]
    if raw.size != O * (K // n) * size or K % n:
        raise Lfm2npError(f"{where}: {raw.size} bytes do not hold {O} rows of {K} {kind} values")
    r = raw.reshape(O, K // n, size)
    if kind == "Q8_0":
        return Blocks(kind, r[..., 2:].view(np.int8).astype(np.int16), _f16(r[..., 0:2]))
    if kind == "Q4_0":
        nib = r[..., 2:]
        return Blocks(kind, np.concatenate([nib & 15, nib >> 4], axis=-1).astype(np.int16) - 8, _f16(r[..., 0:2]))
    if kind == "Q4_K":
        low, mid, high = r[..., 4:8], r[..., 8:12], r[..., 12:16]
        sc = np.concatenate([low & 63, (high & 15) | ((low >> 6) << 4)], axis=-1)
        mn = np.concatenate([mid & 63, (high >> 4) | ((mid >> 6) << 4)], axis=-1)
        qs = r[..., 16:].reshape(O, K // n, 4, 1, 32)
        q = np.concatenate([qs & 15, qs >> 4], axis=3).reshape(O, K // n, 256)
        return Blocks(kind, q.astype(np.int16), _f16(r[..., 0:2]), _f16(r[..., 2:4]), sc.astype(np.int64),
                      mn.astype(np.int64))
    ql, qh = r[..., 0:128].reshape(O, K // n, 2, 1, 64), r[..., 128:192].reshape(O, K // n, 2, 1, 32)
    low = np.concatenate([ql & 15, ql >> 4], axis=3).reshape(O, K // n, 2, 4, 32)  # q_v at 32v.. of each half
    high = np.stack([(qh[..., 0, :] >> (2 * v)) & 3 for v in range(4)], axis=3)  # (O, nb, 2, 4, 32)
    q = (low | (high << 4)).reshape(O, K // n, 256)
    return Blocks(kind, q.astype(np.int16), _f16(r[..., 208:210]), sc=r[..., 192:208].view(np.int8).astype(np.int64))


# ----------------------------------------------------------------------------------------- products
def product(a: Activation, w_values: np.ndarray, blocks: Blocks | None, experts: bool = False) -> np.ndarray:
    """``x W^T`` (T, O) for activation rows ``a`` (from :func:`quantize` for W's type) as ggml's CPU backend
    computes it; ``w_values`` W's values (float types), ``blocks`` its decoded blocks (quantised types);
    ``experts``: a MoE layer's expert (``ggml_mul_mat_id``: no sgemm)."""
    T, K = a.values.shape
    if blocks is None:
        O = w_values.shape[0]
        sgemm = not experts and T >= 2 and O % 4 == 0 and K % 8 == 0
        return dot(a.values, w_values, "tinyblas" if sgemm else "vecdot", wide=a.kind != "F32")
    O = blocks.q.shape[0]
    out = np.empty((T, O), F32)
    rows = max(1, CHUNK_BYTES // max(1, 2 * T * K))  # _isum's float64 sums of four: 2 T K bytes per output row
    for o0 in range(0, O, rows):
        part = Blocks(blocks.kind, *(None if f is None else f[o0:o0 + rows]
                                     for f in (blocks.q, blocks.d, blocks.dmin, blocks.sc, blocks.mn)))
        out[:, o0:o0 + rows] = _KERNELS[blocks.kind](a, part, repacked=O % 8 == 0, tiled=T >= 8,
                                                     gemm=0 if experts or T < 4 else T - T % 4)
    return out


def _isum(qa: np.ndarray, qw: np.ndarray, group: int) -> np.ndarray:
    """Exact integer sums of products over consecutive groups of ``group`` values (at most 32 products of at
    most 127 x 127: every partial sum an integer below 2^24, so a float32 product of matrices is exact whatever
    order it adds in), as float64.  (T, nb, n), (O, nb, n) -> (T, O, nb, n // group)"""
    T, nb, n = qa.shape
    O = qw.shape[0]
    G = nb * n // group
    a = np.ascontiguousarray(qa.reshape(T, G, group).transpose(1, 0, 2), dtype=F32)  # (G, T, g)
    w = np.ascontiguousarray(qw.reshape(O, G, group).transpose(1, 2, 0), dtype=F32)  # (G, g, O)
    return np.matmul(a, w).transpose(1, 2, 0).reshape(T, O, nb, n // group).astype(F64)


def _lanes(d: np.ndarray, lanes: np.ndarray) -> np.ndarray:
    """``acc_l = fma(d_b, lane_b,l, acc_l)`` block after block, then :func:`hsum8`.  (T, O, nb), (T, O, nb, 8)"""
    acc = np.zeros(lanes.shape[:2] + (8,), F32)
    lanes = lanes.astype(F32)  # cvtepi32_ps (rounds past 2^24, as the conversion does)
    for b in range(lanes.shape[2]):
        acc = fma(d[:, :, b, None], lanes[:, :, b], acc)
    return hsum8(acc)


def _chain(values: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``acc = fma(value_b, scale_b, acc)`` block after block.  (T, O, nb) x 2 -> (T, O)"""
    acc = np.zeros(values.shape[:2], F32)
    values = values.astype(F32)
    for b in range(values.shape[2]):
        acc = fma(values[:, :, b], scale[:, :, b], acc)
    return acc


def _q8_0(a: Activation, w: Blocks, repacked: bool, tiled: bool, gemm: int) -> np.ndarray:
    d = w.d[None] * a.d[:, None]  # (T, O, nb): d_w * d_x
    if w.kind == "Q4_0" and repacked:
        return _chain(_isum(a.q, w.q, 32)[..., 0], d)
    return _lanes(d, _isum(a.q, w.q, 4))


def _q4_k(a: Activation, w: Blocks, repacked: bool, tiled: bool, gemm: int) -> np.ndarray:
    T, nb = a.d.shape
    sub = _isum(a.q, w.q, 32) * w.sc[None]  # (T, O, nb, 8): per 32-value sub-block, scaled
    mins = w.mn[None] * a.bsums.reshape(T, 1, nb, 8, 2).sum(axis=-1)  # (T, O, nb, 8)
    if repacked:  # q4_K_8x8: acc and acc_min, subtracted at the end; gemm (rows in fours) per pair of sub-blocks
        d, dmin = w.d[None] * a.d[:, None], w.dmin[None] * a.d[:, None]
        out = _chain(sub.sum(axis=-1), d) - _chain(mins.sum(axis=-1), dmin)
        if gemm:
            pairs = lambda v: v[:gemm].reshape(gemm, -1, nb * 4, 2).sum(axis=-1)  # noqa: E731
            each = lambda s: np.repeat(s[:gemm], 4, axis=-1)  # noqa: E731
            out[:gemm] = _chain(pairs(sub), each(d)) - _chain(pairs(mins), each(dmin))
        return out
    if tiled:
        scaled, mins = sub.sum(axis=-1), mins.sum(axis=-1)
        res = fma(-w.dmin[None], mins.astype(F32), w.d[None] * scaled.astype(F32))  # per block
        return _chain(res, np.broadcast_to(a.d[:, None], res.shape))
    four = _isum(a.q, w.q, 4).reshape(T, -1, nb, 8, 8)  # (T, O, nb, sub-block, lane)
    lanes = (four * w.sc[None, :, :, :, None]).sum(axis=3)
    acc = _lanes(a.d[:, None] * w.d[None], lanes)
    dmin = (-a.d)[:, None] * w.dmin[None]
    acc_m = np.zeros((T, acc.shape[1], 4), F32)
    m = mins.reshape(T, -1, nb, 4, 2).sum(axis=-1).astype(F32)  # four lanes of two sub-blocks
    for b in range(nb):
        acc_m = fma(dmin[:, :, b, None], m[:, :, b], acc_m)
    return acc + ((acc_m[..., 0] + acc_m[..., 2]) + (acc_m[..., 1] + acc_m[..., 3]))


def _q6_k(a: Activation, w: Blocks, repacked: bool, tiled: bool, gemm: int) -> np.ndarray:
    T, nb = a.d.shape
    four = _isum(a.q, w.q, 4)  # (T, O, nb, 64): group g = values 4g..4g+3, scale index g // 4, lane g % 8
    pos = four * np.repeat(w.sc, 4, axis=-1)[None]
    sub = 32 * w.sc[None] * a.bsums[:, None]  # (T, O, nb, 16)
    if tiled:
        isum = pos.sum(axis=-1) - sub.sum(axis=-1)
        return _chain(w.d[None] * isum.astype(F32), np.broadcast_to(a.d[:, None], isum.shape))
    lanes = pos.reshape(T, -1, nb, 8, 8).sum(axis=3) - sub.reshape(T, -1, nb, 8, 2).sum(axis=-1)
    return _lanes(a.d[:, None] * w.d[None], lanes)


_KERNELS = {"Q8_0": _q8_0, "Q4_0": _q8_0, "Q4_K": _q4_k, "Q6_K": _q6_k}
