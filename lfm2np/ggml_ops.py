"""The numerics mode ``llamacpp-cpu``: the forward pass computing as llama.cpp's CPU backend computes a GGUF file
(llama-cpp-python 0.3.36, x86-64 with AVX2/FMA/F16C), as a set of operators the one forward pass
(:mod:`lfm2np.layers`) runs with in place of :mod:`lfm2np.ops`: :class:`LlamaCppCpu`.

What changes (docs/llamacpp-cpu.md has the why and the measurements):

- every product with a weight (:meth:`LlamaCppCpu.linear`): the activation rows converted to the weight type's
  dot-product type first (Q8_0, Q8_K, f16, bf16: :func:`lfm2np.ggml_quants.quantize`), named
  ``{product}.input``, then the product from the stored blocks (:func:`lfm2np.ggml_quants.product`);
- the KV cache holds f16 (or f32: ``llamacpp-cpu-kv-f32``), and the query is converted to the cache's type for
  the q.k product (:meth:`LlamaCppCpu.kv`: ``self_attn.q_input``, ``k_cache``, ``v_cache``); the attention's
  softmax weights are converted to f16 for the product with V, inside the attention;
- RMSNorm, the short convolution, RoPE, SiLU, the sigmoid, the softmax and the renormalisation of the routing
  weights as ggml computes them (:mod:`lfm2np.ggml`).

Weights keep their values (dequantised, float32) for everything that is not a product (the embedding lookup,
the norms); a product weight additionally carries its ggml type and, when quantised, its decoded blocks
(:class:`GgmlWeight`, made by :meth:`LlamaCppCpu.weight`). Weights given as arrays are F32 tensors (float16
arrays F16); a safetensors checkpoint's are its stored types (F32, F16, BF16), as a GGUF converted from it with
``--outtype auto`` would hold them.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from . import ggml, ops
from .errors import Lfm2npError
from .ggml_quants import COVERED, VEC_DOT_TYPE, Blocks, decode, product, quantize

#: the products whose input the mode names, ``{product}.input`` (steps below ``model.layers.{i}.``; and ``lm_head``),
#: and the attention's inputs in the KV cache's type: the trace names it adds (:func:`lfm2np.schema.trace_names`)
PRODUCTS = ("conv.in_proj", "conv.out_proj", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
            "self_attn.gate", "self_attn.out_proj", "feed_forward.router_logits", "feed_forward.w1", "feed_forward.w3",
            "feed_forward.w2")
KV_STEPS = ("self_attn.q_input", "self_attn.k_cache", "self_attn.v_cache")
INPUT_STEPS = (*(f"{p}.input" for p in PRODUCTS), *KV_STEPS)


def with_inputs(config: Any, steps: Any) -> Any:
    """A layer's ``(step, shape)`` list with the names this mode adds: each product's input (the shape of what it
    multiplies) before it, and after ``self_attn.k_rope`` the query, keys and values in the KV cache's type;
    ``config`` None: ``steps`` are names, and so is the result (a tuple)."""
    if config is None:
        return tuple(n for n, _ in with_inputs(False, [(step, ()) for step in steps]))
    c = config
    width = {"conv.out_proj": c.hidden_size, "self_attn.out_proj": c.num_attention_heads * c.head_dim,
             "feed_forward.w2": c.ffn_dim} if c else {}
    kv = [(s, ("T", c.num_attention_heads if s.endswith("q_input") else c.num_key_value_heads, c.head_dim) if c
           else ()) for s in KV_STEPS]
    return [named for step, shape in steps for named in ([(f"{step}.input", ("T", width.get(step, c.hidden_size))
            if c else ())] if step in PRODUCTS else []) + [(step, shape)] + (kv if step == "self_attn.k_rope" else [])]


#: KV cache types the mode emulates (llama.cpp's ``type_k`` / ``type_v``), and how values are stored in them
KV_TYPES: dict[str, Callable[[np.ndarray], np.ndarray]] = {"f16": ggml.to_f16, "f32": ops.exact}
#: the smallest sum ggml divides the routing weights by (``ggml_clamp(sum, 6.103515625e-5, inf)``)
ROUTER_SUM_MIN = 6.103515625e-5


class GgmlWeight(np.ndarray):
    """A weight's values (float32, dequantised) that also knows its ggml type and, quantised, its decoded
    :class:`~lfm2np.ggml_quants.Blocks`. Anything derived from it (a slice, a transpose) is a plain array of
    values: only the weight itself multiplies as llama.cpp does."""

    ggml_type: str | None
    blocks: Blocks | None

    def __array_finalize__(self, obj: Any) -> None:
        self.ggml_type, self.blocks = None, None


class LlamaCppCpu:
    """llama.cpp's CPU arithmetic: the operators :mod:`lfm2np.layers` calls through its scope (``s.ops``), the
    same names and arguments as :mod:`lfm2np.ops`, with ``kv`` the KV cache's type ("f16" or "f32"); with
    ``quantised`` False the products read their activations in float32 (a backend that skips the activation
    quantisation: the porting mistake ``activations-unquantised`` of :mod:`lfm2np.oracle.mistakes`)."""

    def __init__(self, kv: str = "f16", quantised: bool = True):
        self.kv_type, self.quantised = kv, quantised
        self._store = KV_TYPES[kv]

    def __repr__(self) -> str:
        return f"LlamaCppCpu(kv={self.kv_type}{'' if self.quantised else ', unquantised'})"

    def variant(self, kv: str | None = None, quantised: bool | None = None) -> "LlamaCppCpu":
        """These operators with another KV cache type or activation quantisation."""
        return LlamaCppCpu(self.kv_type if kv is None else kv, self.quantised if quantised is None else quantised)

    # ------------------------------------------------------------------------------------ weights
    def weight(self, name: str, w: np.ndarray, stored: "tuple[str, Callable[[], np.ndarray]] | None") -> np.ndarray:
        """Weight ``name`` for the mode: float32 values; a 2-D weight (a product's) as a :class:`GgmlWeight` of
        its stored type (``stored``: the type and a function giving its bytes; None: arrays, F32 or F16)."""
        values = np.asarray(w).astype(np.float32, copy=False)
        if values.ndim != 2:
            return values
        kind = stored[0] if stored is not None else ("F16" if np.asarray(w).dtype == np.float16 else "F32")
        if kind not in COVERED:
            raise Lfm2npError(f"tensor {name!r} is stored as {kind}, which llama.cpp's CPU arithmetic "
                              f"(dtype llamacpp-cpu) does not cover here; covered: {', '.join(COVERED)}")
        out = values.view(GgmlWeight)
        out.ggml_type = kind
        if kind not in ("F32", "F16", "BF16"):
            out.blocks = decode(stored[1](), kind, values.shape[1], name)
        return out

    @staticmethod
    def check(weights: Any) -> None:
        """Every product weight (2-D tensor) of ``weights`` is stored in a type this mode multiplies: otherwise an
        :class:`Lfm2npError` naming the tensor and the type, before any is read."""
        for t in weights.layout:
            kind = weights.stored_type(t.name) if len(t.shape) == 2 else "F32"
            if kind not in COVERED and kind != "?":
                raise Lfm2npError(f"tensor {t.name!r} is stored as {kind}, which llama.cpp's CPU arithmetic "
                                  f"(dtype llamacpp-cpu) does not cover here; covered: {', '.join(COVERED)}")

    # ----------------------------------------------------------------------------------- products
    def linear(self, s: Any, name: str, x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
        """``x W^T + b`` as llama.cpp multiplies: ``x`` converted to W's dot-product type and named
        ``{name}.input`` (a recorder that replaces it gets a float product of its values instead), then the
        product (as ``ggml_mul_mat_id`` on a scope of experts)."""
        kind = (getattr(w, "ggml_type", None) or "F32") if self.quantised else "F32"
        a = quantize(x.reshape(-1, x.shape[-1]), VEC_DOT_TYPE[kind])
        seen = s(f"{name}.input", a.values)
        if seen is not a.values or not self.quantised:  # replaced, or not quantised: a float product
            y = ops.linear(np.asarray(seen, np.float32), np.asarray(w))
        else:
            y = product(a, np.asarray(w), getattr(w, "blocks", None), s.experts)
        if b is not None:
            y = y + b
        return y.reshape(*x.shape[:-1], -1)

    def kv(self, x: np.ndarray) -> np.ndarray:
        """``x`` as the attention reads it: in the KV cache's type (keys, values; the query is converted to the
        same type for the q.k product)."""
        return self._store(x)

    # ---------------------------------------------------------------------------------- operators
    @staticmethod
    def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float, rnd: ops.Rounding = ops.exact) -> np.ndarray:
        """:func:`lfm2np.ggml.rms_norm`."""
        return ggml.rms_norm(x, weight, eps)

    @staticmethod
    def causal_conv1d(u: np.ndarray, w: np.ndarray, b: np.ndarray | None = None,
                      window: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """:func:`lfm2np.ops.causal_conv1d` with ggml's fused taps (:func:`lfm2np.ggml.conv`); a bias added after."""
        T, D = u.shape
        L = w.shape[1]
        history = np.zeros((0, D), dtype=u.dtype) if window is None else window
        past = history[history.shape[0] - min(L - 1, history.shape[0]):]
        padded = np.concatenate([np.zeros((L - 1 - past.shape[0], D), dtype=u.dtype), past, u])
        z = ggml.conv(padded, w)
        return (z if b is None else z + b), np.concatenate([history, u])

    @staticmethod
    def gated_silu(gate: np.ndarray, up: np.ndarray, rnd: ops.Rounding = ops.exact,
                   out: np.ndarray | None = None) -> np.ndarray:
        """``ggml_swiglu``: :func:`lfm2np.ggml.silu` of the gate times the up projection."""
        return ggml.silu(gate) * up

    @staticmethod
    def sigmoid(x: np.ndarray) -> np.ndarray:
        """:func:`lfm2np.ggml.sigmoid`."""
        return ggml.sigmoid(x)

    @staticmethod
    def normalise_weights(weights: np.ndarray, rnd: ops.Rounding = ops.exact) -> np.ndarray:
        """``w / max(sum(w), 6.1e-5)`` per token, the sum in double (``ggml_sum_rows``, ``ggml_clamp``,
        ``ggml_div``): llama.cpp's renormalisation, not transformers' ``w / (sum + 1e-6)``."""
        total = np.cumsum(weights.astype(np.float64), axis=-1)[..., -1:].astype(np.float32)
        return weights / np.maximum(total, np.float32(ROUTER_SUM_MIN))

    #: each token's weighted expert outputs added in its top-k order (``ggml_add`` of the slots' views)
    MIXTURE_ORDER = "slot"
    top_k_experts = staticmethod(ops.top_k_experts)
    output_gate = staticmethod(ops.output_gate)

    @staticmethod
    def rope_frequencies(head_dim: int, theta: float, rotated: int | None = None,
                         dtype: np.dtype = np.float32) -> np.ndarray:
        """ggml's angle factors of position 1: ``theta_scale = powf(theta, -2/hd)`` multiplied up pair after
        pair from 1; pairs past ``rotated`` 0.  -> (hd/2,)"""
        scale = ggml.theta_scale(theta, head_dim)
        out = np.empty(head_dim // 2, np.float32)
        f = np.float32(1)
        for i in range(head_dim // 2):
            out[i], f = f, f * scale
        if rotated is not None:
            out[rotated:] = 0
        return out

    @staticmethod
    def rope_cos_sin(positions: np.ndarray, inv_freq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """cos and sin as ``ggml_rope_cache_init`` makes them from ``theta_scale`` (``inv_freq[1]``): each
        position's angle multiplied up pair after pair (:func:`lfm2np.ggml.rope_tables`); the pairs whose
        frequency is 0 not turned.  (T,), (hd/2,) -> (T, hd) x 2"""
        pairs = inv_freq.shape[0]
        turned = int(np.count_nonzero(inv_freq))
        scale = inv_freq[1] if pairs > 1 else np.float32(1)
        return ggml.rope_tables(positions, scale, pairs, turned if turned < pairs else None)

    @staticmethod
    def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, rnd: ops.Rounding = ops.exact,
                   wide: bool = False) -> np.ndarray:
        """:func:`lfm2np.ggml.apply_rope`."""
        return ggml.apply_rope(x, cos, sin)

    def attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, window: int | None = None,
                  rnd: ops.Rounding = ops.exact) -> np.ndarray:
        """llama.cpp's attention without flash attention: ``kq = k . q`` (q, k and v as the KV cache holds them),
        ``ggml_soft_max_ext`` with the scale ``hd^-0.5`` and the causal (and window) mask, the weights converted
        to the V cache's type, then ``v . kq``. Which kernel adds up each product: llamafile's sgemm for two
        query rows or more, ``ggml_vec_dot_*`` for one; with an f32 cache the q.k product never takes the sgemm
        (its query rows are a strided view, and no conversion makes them contiguous).
        (T, H, hd), (S, G, hd), (S, G, hd) -> (T, H * hd)"""
        T, H, hd = q.shape
        S, G, _ = k.shape
        R = H // G
        f16 = self.kv_type == "f16"
        kq = "tinyblas" if f16 and T >= 2 and hd % 8 == 0 else "vecdot"  # (the sgemm needs K % 8, rows % 4)
        kqv = "tinyblas" if T >= 2 and hd % 4 == 0 else "vecdot"
        pad = -S % 32  # keys past S: empty cache cells (zeros), which change no sum
        out = np.empty((T, H, hd), np.float32)
        pos = S - T + np.arange(T)[:, None]
        key = np.arange(S + pad)[None, :]
        hidden = (key > pos) | (key >= S)
        if window is not None:
            hidden |= key <= pos - window
        for g in range(G):
            kg = np.concatenate([k[:, g], np.zeros((pad, hd), np.float32)])
            vg = np.concatenate([v[:, g], np.zeros((pad, hd), np.float32)]).T  # (hd, S + pad)
            for r in range(R):
                h = g * R + r
                scores = ggml.dot(q[:, h], kg, kq, wide=f16)  # (T, S + pad)
                probs = self._store(ggml.softmax(scores, hd ** -0.5, hidden))
                out[:, h] = ggml.dot(probs, vg, kqv, wide=f16)
        return out.reshape(T, H * hd)


MODES = {"llamacpp-cpu": LlamaCppCpu("f16"), "llamacpp-cpu-kv-f32": LlamaCppCpu("f32")}
