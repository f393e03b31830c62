"""llama.cpp's CPU arithmetic, element by element: the float operations of ggml's CPU backend as the llama.cpp in
llama-cpp-python 0.3.36 computes them when built for x86-64 with AVX2, FMA and F16C (its default build: no
AVX-512), in NumPy. The numerics mode ``llamacpp-cpu`` (:mod:`lfm2np.ggml_ops`) composes these into the forward.

Where a result depends on the order of float operations, the order here is ggml's, lane by lane:

- :func:`fma`: one rounding of ``a * b + c`` (the product is exact in float64; the float64 sum is rounded once
  more, which differs from a true fused multiply-add only when it lands on a float32 tie, about 2^-29 of cases);
- :func:`hsum8`: the horizontal sum of eight float32 lanes, ``((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7))``;
- :func:`dot`: float32 dot products as llamafile's tinyBLAS (one accumulator of eight lanes, fused multiply-adds
  eight elements at a time, prompts of two tokens or more) or ``ggml_vec_dot_f32/f16`` (four accumulators, 32
  elements a step, then a tree; one token at a time) compute them;
- :func:`expf`: ``ggml_v_expf``, the polynomial exponential of the AVX2 build (up to 1.5 ulp from the true
  value) that its SiLU (:func:`silu`) and softmax (:func:`softmax`) use on every full group of eight; the few
  elements past the last group, and the sigmoid, use the C library's ``expf`` (:func:`expf_libm`);
- :func:`expf_libm`, :func:`sincosf`: the C library's functions, glibc's (2.28 and later), which are not
  correctly rounded (``sincosf`` in about 1% of arguments): reproduced from their algorithms;
- :func:`rms_norm`: the sum of squares in double precision, element after element;
- :func:`conv`: the short convolution's taps accumulated with fused multiply-adds (the compiled loop);
- :func:`rope_tables` / :func:`apply_rope`: angles by repeated multiplication, ``sincosf``, and the rotation's
  products fused as the compiler fuses them.

Every function takes and returns float32 arrays. This module imports nothing from lfm2np.
"""

from __future__ import annotations

from decimal import Decimal, localcontext
from fractions import Fraction

import numpy as np

F32, F64 = np.float32, np.float64


def to_f16(x: np.ndarray) -> np.ndarray:
    """Round to float16 (to nearest, ties to even, as F16C's ``vcvtps2ph`` does), held in float32."""
    return np.asarray(x, F32).astype(np.float16).astype(F32)


def to_bf16(x: np.ndarray) -> np.ndarray:
    """Round to bfloat16 (to nearest, ties to even: ``GGML_FP32_TO_BF16``), held in float32."""
    bits = np.ascontiguousarray(x, F32).view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)) << 16
    nan = np.isnan(x)
    if nan.any():
        rounded = np.where(nan, (bits | np.uint32(0x400000)) & np.uint32(0xFFFF0000), rounded)
    return rounded.astype(np.uint32).view(F32)


def fma(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``a * b + c`` rounded once to float32 (a fused multiply-add)."""
    return (np.asarray(a, F64) * b + c).astype(F32)


def hsum8(lanes: np.ndarray) -> np.ndarray:
    """The sum of the last axis's eight float32 lanes as ggml's ``hsum_float_8`` adds them (and llamafile's
    ``hsum``, and the softmax's per-group sum): the high half onto the low, then pairs.  (..., 8) -> (...)"""
    h = lanes[..., 4:] + lanes[..., :4]
    h = h[..., :2] + h[..., 2:]
    return h[..., 0] + h[..., 1]


def reduce4x8(acc: np.ndarray) -> np.ndarray:
    """``GGML_F32x8_REDUCE`` of four eight-lane accumulators: (a0 + a2) + (a1 + a3), then the lanes through two
    ``hadd``.  (..., 4, 8) -> (...)"""
    s = (acc[..., 0, :] + acc[..., 2, :]) + (acc[..., 1, :] + acc[..., 3, :])
    t = s[..., :4] + s[..., 4:]
    return (t[..., 0] + t[..., 1]) + (t[..., 2] + t[..., 3])


# ---------------------------------------------------------------------------------------- float products
#: bytes of float64 temporaries a product may hold at once (it runs a few output rows at a time past that)
CHUNK_BYTES = 64 << 20


def dot(x: np.ndarray, w: np.ndarray, path: str, wide: bool = False) -> np.ndarray:
    """``x w^T`` in float32 as ggml's CPU backend adds it up.  (T, K), (O, K) -> (T, O)

    ``path`` "tinyblas": llamafile's sgemm (each output one accumulator of eight lanes, a fused multiply-add per
    eight elements, then :func:`hsum8`); "vecdot": ``ggml_vec_dot_f32`` / ``_f16`` (four accumulators over steps
    of 32, :func:`reduce4x8`, the elements past the last step added one by one: in float32, or in double with
    ``wide``, as the f16 kernel does, the result rounded to float32 at the end). Inputs hold float32 values
    (f16 or bf16 values exactly)."""
    x, w = np.asarray(x, F32), np.asarray(w, F32)
    T, K = x.shape
    O = w.shape[0]
    out = np.empty((T, O), F32)
    rows = max(1, CHUNK_BYTES // max(1, T * K * 8))
    for o0 in range(0, O, rows):
        out[:, o0:o0 + rows] = _dot(x, w[o0:o0 + rows], path, wide)
    return out


def _dot(x: np.ndarray, w: np.ndarray, path: str, wide: bool) -> np.ndarray:
    T, K = x.shape
    O = w.shape[0]
    if path == "tinyblas":  # (matmul needs K % 8 == 0: the caller checks)
        xs, ws = x.reshape(T, 1, K // 8, 8).astype(F64), w.reshape(1, O, K // 8, 8)
        acc = np.zeros((T, O, 8), F32)
        for step in range(K // 8):
            acc = (xs[:, :, step] * ws[:, :, step] + acc).astype(F32)
        return hsum8(acc)
    full = K - K % 32
    xs, ws = x[:, :full].reshape(T, 1, full // 32, 4, 8).astype(F64), w[:, :full].reshape(1, O, full // 32, 4, 8)
    acc = np.zeros((T, O, 4, 8), F32)
    for step in range(full // 32):
        acc = (xs[:, :, step] * ws[:, :, step] + acc).astype(F32)
    total = reduce4x8(acc).astype(F64 if wide else F32)
    for k in range(full, K):  # the leftovers, one product at a time (float32 products, exact for f16 values)
        prod = (x[:, None, k] * w[None, :, k]).astype(total.dtype)
        total = (total + prod) if wide else fma(x[:, None, k], w[None, :, k], total)
    return total.astype(F32)


# ------------------------------------------------------------------------------------------- functions
_EXP_C = tuple(F32(float.fromhex(h)) for h in ("0x1.8p23", "0x1.715476p+0", "0x1.7f7d1cp-20", "0x1.62e4p-1",
                                               "0x1.0e4020p-7", "0x1.573e2ep-5", "0x1.555e66p-3",
                                               "0x1.fffdb6p-2", "0x1.ffffecp-1"))


def expf(x: np.ndarray) -> np.ndarray:
    """``exp(x)`` as ``ggml_v_expf`` computes it on AVX2 with FMA (a polynomial after a reduction by ln 2,
    within 1.5 ulp; +inf past 88.38, 0 below -103.97)."""
    r, log2e, ln2_lo, ln2_hi, c5, c4, c3, c2, c1 = _EXP_C
    x = np.asarray(x, F32)
    with np.errstate(over="ignore", invalid="ignore"):
        z = fma(x, log2e, r)
        n = z - r
        b = fma(-n, ln2_lo, fma(-n, ln2_hi, x))
        e = z.view(np.uint32) << np.uint32(23)
        k = (e + F32(1).view(np.uint32)).view(F32)
        u = b * b
        j = fma(fma(fma(c5, b, c4), u, fma(c3, b, c2)), u, c1 * b)
        out = fma(j, k, k)
        far = np.abs(n) > F32(126)
        if far.any():
            g = np.where(n <= 0, np.uint32(0x82000000), np.uint32(0))
            s1 = (g + np.uint32(0x7F000000)).view(F32)
            s2 = (e - g).view(F32)
            scaled = fma(s2, j, s2) * s1
            out = np.where(np.abs(n) > F32(192), s1 * s1, np.where(far, scaled, out))
    return out.astype(F32)


# The C library's expf and sincosf, which ggml calls outside its SIMD loops: glibc's (2.28 and later, measured
# with 2.36), whose float functions compute in double (a table of 2^(i/32) and a cubic for expf; a reduction by
# pi/2 and two short polynomials for sincosf) and round once; reproduced here operation for operation.
_H = float.fromhex
_EXP_SHIFT, _EXP_INV_LN2 = _H("0x1.8p+52"), _H("0x1.71547652b82fep+0") * 32
_EXP_POLY = (_H("0x1.c6af84b912394p-5") / 32 ** 3, _H("0x1.ebfce50fac4f3p-3") / 32 ** 2,
             _H("0x1.62e42ff0c52d6p-1") / 32)


def _exp2_table() -> np.ndarray:
    """bits(2^(i/32)) - (i << 47), i < 32: 2^(i/32) correctly rounded (computed in decimal, 40 digits)."""
    with localcontext() as ctx:
        ctx.prec = 40
        values = [float(Fraction(Decimal(2) ** (Decimal(i) / 32))) for i in range(32)]
    return np.array(values, F64).view(np.uint64) - (np.arange(32, dtype=np.uint64) << np.uint64(47))


_EXP2_TABLE = _exp2_table()


def expf_libm(x: np.ndarray) -> np.ndarray:
    """The C library's ``expf`` (glibc): ``z = x 32/ln2``, ``k = round(z)``, ``2^(k/32)`` from a table,
    ``(c0 r^3 + c1 r^2 + c2 r + 1) 2^(k/32)`` in double, rounded to float32 (overflow +inf, underflow 0)."""
    xd = np.asarray(x, F32).astype(F64)
    with np.errstate(over="ignore", invalid="ignore"):
        z = _EXP_INV_LN2 * xd
        kd = z + _EXP_SHIFT
        ki = kd.view(np.uint64)
        r = z - (kd - _EXP_SHIFT)
        scale = (_EXP2_TABLE[ki % np.uint64(32)] + (ki << np.uint64(47))).view(F64)
        c0, c1, c2 = _EXP_POLY
        y = ((c0 * r + c1) * (r * r) + (c2 * r + 1)) * scale
        out = y.astype(F32)
        out = np.where(xd > _H("0x1.62e42ep6"), F32(np.inf), out)
        out = np.where(xd < _H("-0x1.9fe368p6"), F32(0), out)
        return np.where(np.isnan(xd), F32(np.nan), out).astype(F32)


_SINCOS_C = (1.0, _H("-0x1.ffffffd0c621cp-2"), _H("0x1.55553e1068f19p-5"), _H("-0x1.6c087e89a359dp-10"),
             _H("0x1.99343027bf8c3p-16"))  # cosine, c0 + c1 x^2 + ... + c4 x^8
_SINCOS_S = (_H("-0x1.555545995a603p-3"), _H("0x1.1107605230bc4p-7"), _H("-0x1.994eb3774cf24p-13"))  # sine, x^3..x^7
_HPI_INV, _HPI, _PI63 = _H("0x1.45F306DC9C883p+23"), _H("0x1.921FB54442D18p0"), _H("0x1.921FB54442D18p-62")
def _inv_pio4() -> np.ndarray:
    """Word i = floor(4/pi 2^(8i+7)) mod 2^32, i < 24: 4/pi to 192 bits, eight new bits a word (pi from Machin's
    formula in 80-digit decimal)."""
    with localcontext() as ctx:
        ctx.prec = 80

        def atan_inv(n: int) -> Decimal:  # arctan(1/n)
            total, term, k = Decimal(0), Decimal(1) / n, 0
            while term > Decimal(10) ** -78:
                total += term / (2 * k + 1) * (-1 if k % 2 else 1)
                term /= n * n
                k += 1
            return total

        four_over_pi = 1 / (4 * atan_inv(5) - atan_inv(239))
        return np.array([int(four_over_pi * 2 ** (8 * i + 7)) & 0xFFFFFFFF for i in range(24)], np.uint64)


_INV_PIO4 = _inv_pio4()


def _reduce_large(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """glibc's reduction of |y| >= 120 by pi/2: the 24-bit mantissa times 96 bits of 4/pi in fixed point, the
    quadrant from the top two bits.  -> (quadrant n, reduced argument in double)"""
    xi = y.view(np.uint32).astype(np.uint64)
    table = _INV_PIO4
    at = (xi >> np.uint64(26)) & np.uint64(15)
    m = (((xi & np.uint64(0xFFFFFF)) | np.uint64(0x800000)) << ((xi >> np.uint64(23)) & np.uint64(7))) \
        & np.uint64(0xFFFFFFFF)
    with np.errstate(over="ignore"):
        low = (m * table[at]) & np.uint64(0xFFFFFFFF)  # (a 32-bit product)
        acc = ((m * table[at + np.uint64(8)]) >> np.uint64(32)) | (low << np.uint64(32))
        acc = acc + m * table[at + np.uint64(4)]
        n = (acc + (np.uint64(1) << np.uint64(61))) >> np.uint64(62)
        acc = acc - (n << np.uint64(62))
    return n.astype(np.int64), acc.view(np.int64).astype(F64) * _PI63


def _top12(y: np.ndarray) -> np.ndarray:
    return (np.asarray(y, F32).view(np.uint32) >> np.uint32(20)) & np.uint32(0x7FF)


def sincosf(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The C library's ``sincosf`` (glibc): in double, the argument reduced by pi/2 (one multiply-subtract below
    120, a 4/pi table past it), odd and even polynomials of the reduced argument with the quadrant's signs,
    rounded to float32.  -> (sin, cos)"""
    y = np.asarray(x, F32)
    xd = y.astype(F64)
    top = _top12(y)
    small = top < _top12(F32(_H("0x1.921FB54442D18p-1")))
    mid = ~small & (top < _top12(F32(120)))
    big = ~small & ~mid
    n = np.zeros(y.shape, np.int64)  # the quadrant (swaps sin and cos when odd)
    signed = np.zeros(y.shape, np.int64)  # the quadrant the signs come from
    r = xd.copy()
    if mid.any():
        q = (np.trunc(xd[mid] * _HPI_INV).astype(np.int64) + 0x800000) >> 24
        n[mid], signed[mid], r[mid] = q, q, xd[mid] - q * _HPI
    if big.any():
        q, r[big] = _reduce_large(y[big])
        n[big], signed[big] = q, q + (y[big].view(np.uint32) >> np.uint32(31))
    sign = np.where(((signed & 3) == 1) | ((signed & 3) == 2), -1.0, 1.0)
    neg = np.where(signed & 2, -1.0, 1.0)  # the second polynomial table: the cosine negated
    c0, c1, c2, c3, c4 = (neg * c for c in _SINCOS_C)
    s1c, s2c, s3c = _SINCOS_S
    v = r * sign
    x2 = r * r
    x4, x3 = x2 * x2, x2 * v
    s_out = (v + x3 * s1c) + (x3 * x2) * (s2c + x2 * s3c)
    c_out = ((c0 + x2 * c1) + x4 * c2) + (x4 * x2) * (c3 + x2 * c4)
    odd = (n & 1).astype(bool)
    s_out, c_out = np.where(odd, c_out, s_out), np.where(odd, s_out, c_out)
    tiny = small & (top < _top12(F32(2.0 ** -12)))
    return np.where(tiny, xd, s_out).astype(F32), np.where(tiny, 1.0, c_out).astype(F32)


def _by_groups(x: np.ndarray, vector, scalar) -> np.ndarray:
    """``vector`` on every full group of eight along the last axis, ``scalar`` on the elements past them (ggml's
    SIMD loops and their scalar tails)."""
    x = np.asarray(x, F32)
    n = x.shape[-1]
    full = n - n % 8
    if full == n:
        return vector(x)
    return np.concatenate([vector(x[..., :full]), scalar(x[..., full:])], axis=-1)


def silu(x: np.ndarray) -> np.ndarray:
    """``x / (1 + exp(-x))`` as ``ggml_v_silu`` (with :func:`expf`) on full groups of eight, the C library's
    ``expf`` past them.  (..., n) -> (..., n)"""
    with np.errstate(over="ignore"):
        return _by_groups(x, lambda v: v / (F32(1) + expf(F32(0) - v)),
                          lambda v: v / (F32(1) + expf_libm(-v)))


def sigmoid(x: np.ndarray) -> np.ndarray:
    """``1 / (1 + expf(-x))``, ggml's scalar sigmoid (the C library's ``expf``)."""
    with np.errstate(over="ignore"):
        return (F32(1) / (F32(1) + expf_libm(-np.asarray(x, F32)))).astype(F32)


def softmax(scores: np.ndarray, scale: float, hidden: np.ndarray | None = None) -> np.ndarray:
    """``ggml_soft_max_ext`` over the last axis: ``w = scores * scale`` (-inf where ``hidden``), ``e = exp(w -
    max w)`` (:func:`expf` on full groups of eight, the C library's past them), ``sum`` in double, group sums
    first (:func:`hsum8`), then ``e * float(1 / sum)``.  (..., S) -> (..., S)"""
    w = np.asarray(scores, F32) * F32(scale)
    if hidden is not None:
        w = np.where(hidden, F32(-np.inf), w)
    m = w.max(axis=-1, keepdims=True)
    n = w.shape[-1]
    full = n - n % 8
    with np.errstate(invalid="ignore"):
        e = np.concatenate([expf(w[..., :full] - m), expf_libm(w[..., full:] - m)], axis=-1)
    groups = hsum8(e[..., :full].reshape(*e.shape[:-1], full // 8, 8)).astype(F64)
    total = np.cumsum(np.concatenate([groups, e[..., full:].astype(F64)], axis=-1), axis=-1)[..., -1:]
    return (e * (1.0 / total).astype(F32)).astype(F32)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """``ggml_rms_norm`` then the weight: ``sum`` of the float32 squares in double, element after element;
    ``mean = float(sum / n)``; ``scale = 1 / sqrtf(mean + eps)``; ``(x * scale) * w``.  (..., N) -> (..., N)"""
    x = np.asarray(x, F32)
    sq = (x * x).astype(F64)
    mean = (np.cumsum(sq, axis=-1)[..., -1:] / x.shape[-1]).astype(F32)
    scale = F32(1) / np.sqrt(mean + F32(eps))
    return (x * scale) * weight


def conv(u: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The depthwise causal convolution of ``ggml_ssm_conv``: per channel, ``z = u_0 w_0``, then ``z = fma(u_j,
    w_j, z)`` tap after tap (the compiled loop fuses them).  (L-1+T, D) padded inputs, (D, L) -> (T, D)"""
    L = w.shape[1]
    T = u.shape[0] - (L - 1)
    z = u[0:T] * w[:, 0]
    for j in range(1, L):
        z = fma(u[j:j + T], w[:, j], z)
    return z


def theta_scale(theta: float, head_dim: int) -> np.float32:
    """``powf(base, -2 / hd)``: the factor between the angles of consecutive RoPE pairs (``powf`` correctly
    rounded here)."""
    return F32(np.power(F64(F32(theta)), F64(F32(-2.0) / F32(head_dim))))


def rope_tables(positions: np.ndarray, scale: float, pairs: int, rotated: int | None = None) \
        -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of split-half RoPE as ``ggml_rope_cache_init`` makes them: per position p the angle starts at
    p and is multiplied by ``scale`` (:func:`theta_scale`) pair after pair, in float32; :func:`sincosf`. Pairs
    past ``rotated`` are not turned (cos 1, sin 0).  (T,) -> (T, 2 pairs) x 2"""
    angle = np.asarray(positions).astype(F32)
    angles = np.empty((angle.shape[0], pairs), F32)
    for i in range(pairs):
        angles[:, i] = angle
        angle = angle * F32(scale)
    sin, cos = sincosf(angles)
    if rotated is not None:
        cos[:, rotated:], sin[:, rotated:] = 1, 0
    return np.concatenate([cos, cos], axis=-1), np.concatenate([sin, sin], axis=-1)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """ggml's NeoX rotation of each pair (i, i + hd/2), ``x0' = x0 cos - x1 sin``, ``x1' = x0 sin + x1 cos``,
    with one product of each fused as the compiled loop fuses it (``fma(x0, cos, -(x1 sin))``,
    ``fma(x0, sin, x1 cos)``).  (T, n, hd), (T, hd), (T, hd) -> (T, n, hd)"""
    half = x.shape[-1] // 2
    x0, x1 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :half], sin[:, None, :half]
    return np.concatenate([fma(x0, c, -(x1 * s)), fma(x0, s, x1 * c)], axis=-1)
