"""bfloat16 emulation: the forward pass rounded where a bfloat16 backend rounds.

NumPy has no bfloat16, so values are kept in float32 arrays and rounded to the nearest bfloat16
(ties to even) with :func:`to_bf16` wherever a bf16 backend stores a result. The reference for where
that happens is transformers running the model with ``dtype=torch.bfloat16`` on CPU:

- weights are bf16 (the router's ``expert_bias`` stays float32, as transformers keeps it);
- every matmul accumulates in float32 and rounds its output once (bias included);
- every elementwise product, sum, activation and residual add rounds its result;
- RMSNorm takes its statistics in float32, rounds the normalised value, then rounds ``w * x``;
- RoPE angles are float32, cos and sin are rounded, then each product and the sum;
- attention scores are rounded, scaled and rounded, the softmax is float32 and rounded after;
- the router's sigmoid scores are bf16; adding the float32 expert bias promotes the selection score to
  float32; the top-k weights, their sum, the ``+ 1e-6``, the division and the scaling each round;
- each expert's contribution is added into the bf16 output in increasing expert order.

The embedding, the layer loop and the state are the float32 model's; ``_layer`` and ``_head`` mirror
:meth:`lfm2np.model.Model._layer` and ``_head`` step for step; with rounding switched off
(``Bf16Model(..., rounding=False)``) it equals the float32 model, which the tests check, so the two
cannot drift apart silently. How close it comes to transformers in bf16 is measured in docs/numerics.md.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from . import ops
from .config import Config
from .model import LazyParams, Model
from .ops import Recorder
from .weights import bfloat16_bits


def to_bf16(x: np.ndarray) -> np.ndarray:
    """Round float values to the nearest bfloat16 (ties to even); the result is float32."""
    return (bfloat16_bits(np.asarray(x, dtype=np.float32)).astype(np.uint32) << 16).view(np.float32)


class _RoundedParams(LazyParams):
    """Weights rounded to bf16 on use (the expert bias stays float32); rounded copies are kept unless the
    underlying parameters were loaded with ``keep_weights=False``."""

    def __init__(self, params: Mapping[str, np.ndarray], rounding: bool):
        super().__init__(list(params), getattr(params, "keep", True))
        self.params, self.rounding = params, rounding

    def _load(self, name: str) -> np.ndarray:
        return self._round(name, self.params[name])

    def _load_rows(self, name: str, index: np.ndarray) -> np.ndarray:
        p = self.params
        return self._round(name, p.rows(name, index) if isinstance(p, LazyParams) else p[name][index])

    def _round(self, name: str, w: np.ndarray) -> np.ndarray:
        w = np.asarray(w, dtype=np.float32)
        return to_bf16(w) if self.rounding and not name.endswith("expert_bias") else w


class Bf16Model(Model):
    """A :class:`Model` whose forward pass emulates bfloat16 (see the module docstring). Arrays are float32
    holding bf16 values; the decoding state works as for float32."""

    def __init__(self, config: Config, params: Mapping[str, np.ndarray], rounding: bool = True):
        super().__init__(config, _RoundedParams(params, rounding), "float32")
        self.rounding = rounding

    def __repr__(self) -> str:
        return super().__repr__().replace("dtype=float32", "dtype=bfloat16 (emulated)")

    # rounding helpers -----------------------------------------------------------------
    def r(self, x: np.ndarray) -> np.ndarray:
        return to_bf16(x) if self.rounding else x

    def linear(self, x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
        return self.r(ops.linear(x, w, b))

    def rms_norm(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        inv_rms = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(self.config.norm_eps))
        return self.r(w * self.r(x * inv_rms))

    def rope(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        r = self.r
        return r(r(x * r(cos)[:, None, :]) + r(ops.rotate_half(x) * r(sin)[:, None, :]))

    def swiglu(self, x: np.ndarray, w1: np.ndarray, w3: np.ndarray, w2: np.ndarray) -> np.ndarray:
        r = self.r
        return self.linear(r(r(ops.silu(self.linear(x, w1))) * self.linear(x, w3)), w2)

    def attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        r = self.r
        T, H, hd = q.shape
        S, G, _ = k.shape
        R = H // G
        qg = q.reshape(T, G, R, hd).transpose(1, 2, 0, 3).reshape(G, R * T, hd)
        kg, vg = k.transpose(1, 0, 2), v.transpose(1, 0, 2)
        scores = r(r(qg @ kg.transpose(0, 2, 1)) * np.float32(hd ** -0.5)).reshape(G, R, T, S)
        scores[..., np.arange(S)[None, :] > (S - T + np.arange(T))[:, None]] = -np.inf
        probs = r(ops.softmax(scores, axis=-1)).reshape(G, R * T, S)
        out = r(probs @ vg).reshape(G, R, T, hd)
        return out.transpose(2, 0, 1, 3).reshape(T, H * hd)

    # the forward pass ---------------------------------------------------------------------
    def _head(self, h: np.ndarray, record: Recorder | None) -> np.ndarray:
        c, W = self.config, self.params
        h = self.rms_norm(h, W["model.embedding_norm.weight"])
        logits = self.linear(h, W["model.embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight"])
        if record:
            record("model.embedding_norm", h)
            record("lm_head", logits)
        return logits

    def _layer(self, i: int, h: np.ndarray, cos: np.ndarray, sin: np.ndarray, past: Any,
               record: Recorder | None) -> tuple[np.ndarray, Any]:
        c, W, r = self.config, self.params, self.r
        p = f"model.layers.{i}."
        x = self.rms_norm(h, W[p + "operator_norm.weight"])
        if record:
            record(p + "operator_norm", x)
        if c.is_attention(i):
            a = p + "self_attn."
            T, hd = x.shape[0], c.head_dim
            q = self.linear(x, W[a + "q_proj.weight"]).reshape(T, -1, hd)
            k = self.linear(x, W[a + "k_proj.weight"]).reshape(T, -1, hd)
            v = self.linear(x, W[a + "v_proj.weight"]).reshape(T, -1, hd)
            q = self.rope(self.rms_norm(q, W[a + "q_layernorm.weight"]), cos, sin)
            k = self.rope(self.rms_norm(k, W[a + "k_layernorm.weight"]), cos, sin)
            if past is not None:
                k, v = np.concatenate([past[0], k]), np.concatenate([past[1], v])
            y = self.linear(self.attention(q, k, v), W[a + "out_proj.weight"])
            state: Any = (k, v)
        else:
            b = p + "conv."
            bias = (lambda n: W[b + n + ".bias"]) if c.conv_bias else (lambda n: None)
            b_gate, c_gate, xs = np.split(self.linear(x, W[b + "in_proj.weight"], bias("in_proj")), 3, axis=-1)
            z, state = ops.causal_conv1d(r(b_gate * xs), W[b + "conv.weight"][:, 0, :], bias("conv"), past)
            y = self.linear(r(c_gate * r(z)), W[b + "out_proj.weight"], bias("out_proj"))
        h = r(h + y)
        x = self.rms_norm(h, W[p + "ffn_norm.weight"])
        if record:
            record(p + "mixer_residual", h)
            record(p + "ffn_norm", x)
        f = p + "feed_forward."
        if c.is_moe_layer(i):
            y = self._moe(x, f, record)
        else:
            y = self.swiglu(x, W[f + "w1.weight"], W[f + "w3.weight"], W[f + "w2.weight"])
        h = r(h + y)
        if record:
            record(f"model.layers.{i}", h)
        return h, state

    def _moe(self, x: np.ndarray, f: str, record: Recorder | None) -> np.ndarray:
        c, W, r = self.config, self.params, self.r
        logits = self.linear(x, W[f + "gate.weight"])
        scores = r(ops.sigmoid(logits))
        selection = scores + W[f + "expert_bias"] if c.use_expert_bias else scores  # float32 once the bias is added
        experts = ops.top_k_experts(selection, c.num_experts_per_tok)
        weights = np.take_along_axis(scores, experts, axis=-1)
        if c.norm_topk_prob:
            weights = r(weights / r(r(weights.sum(axis=-1, keepdims=True)) + np.float32(ops.ROUTER_NORM_EPS)))
        weights = r(weights * np.float32(c.routed_scaling_factor))
        if record:
            record(f + "router_logits", logits)
            record(f + "selected_experts", experts)
            record(f + "routing_weights", weights)
        out = np.zeros_like(x)
        for e in np.unique(experts):
            tokens, slot = np.nonzero(experts == e)
            y = self.swiglu(x[tokens], W[f"{f}experts.{e}.w1.weight"], W[f"{f}experts.{e}.w3.weight"],
                            W[f"{f}experts.{e}.w2.weight"])
            out[tokens] = r(out[tokens] + r(y * weights[tokens, slot][:, None]))
        return out


def emulate_bf16(model: Model, rounding: bool = True) -> Bf16Model:
    """The bf16 emulation of a loaded float32 model (same config and weights)."""
    return Bf16Model(model.config, model.params, rounding)
