"""The decoder layers, as pure functions over explicit weights: the whole LFM2 and LFM3 layer, one screen each.

An LFM2 / LFM2-MoE layer is pre-norm residual (:func:`lfm2_layer`)::

    h = h + mixer(operator_norm(h))      # gated short conv or GQA attention, by layer_types[i]
    h = h + ffn(ffn_norm(h))             # SwiGLU, or router + experts on MoE layers

An LFM3 layer adds a norm after each block, the "sandwich" (:func:`lfm3_layer`)::

    h = h + post_operator_norm(mixer(operator_norm(h)))   # conv, sliding-window or full attention
    h = h + post_ffn_norm(ffn(ffn_norm(h)))               # SwiGLU

LFM3's attention also multiplies each head's output by a sigmoid gate before the output projection, and
its RoPE differs per layer type (the ``rope`` tables a layer receives are those of its type).

The weights of one layer come as a :class:`LayerWeights` view (built by :meth:`lfm2np.Model.layer_weights`
from the checkpoint, names in :mod:`lfm2np.tensors`), so nothing here builds a tensor name. ``rnd`` is the
numerics mode's rounding (identity but in the bf16 emulation) and ``tap`` sees each named intermediate
(the names are the Hugging Face module path below ``model.layers.{i}.``), as in :mod:`lfm2np.ops`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from . import ops
from .config import Config
from .ops import Rounding, Tap, prefixed, untapped


@dataclass(frozen=True)
class ConvWeights:
    """The gated short conv: ``in_proj (3D, D)``, ``conv (D, 1, L)``, ``out_proj (D, D)``, biases when conv_bias."""

    in_proj: np.ndarray
    conv: np.ndarray
    out_proj: np.ndarray
    in_proj_bias: np.ndarray | None = None
    conv_bias: np.ndarray | None = None
    out_proj_bias: np.ndarray | None = None


@dataclass(frozen=True)
class AttentionWeights:
    """GQA attention: ``q_proj (H*hd, D)``, ``k_proj``/``v_proj (G*hd, D)``, ``out_proj (D, H*hd)``, and the
    per-head RMSNorm weights ``q_norm``/``k_norm (hd,)`` (``q_layernorm``/``k_layernorm`` in LFM2 checkpoints,
    ``o_proj`` for out_proj in LFM3's). LFM3 only: the output gate ``gate_proj (H, D)`` and, with
    ``attention_bias``, biases of the four projections."""

    q_proj: np.ndarray
    k_proj: np.ndarray
    v_proj: np.ndarray
    out_proj: np.ndarray
    q_norm: np.ndarray
    k_norm: np.ndarray
    gate_proj: np.ndarray | None = None
    biases: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None  # q, k, v, out


@dataclass(frozen=True)
class SwiGLUWeights:
    """A SwiGLU FFN: ``w1`` (gate) and ``w3`` (up) ``(F, D)``, ``w2`` (down) ``(D, F)``."""

    w1: np.ndarray
    w3: np.ndarray
    w2: np.ndarray


@dataclass(frozen=True)
class MoEWeights:
    """A mixture of experts: the router ``gate (E, D)``, the selection-only ``expert_bias (E,)`` (or None),
    and ``expert(e)`` giving expert e's :class:`SwiGLUWeights` when it is first chosen; ``prefetch``, when
    given, is told which experts were chosen, before the first is asked for (an I/O hint, no numbers)."""

    gate: np.ndarray
    expert_bias: np.ndarray | None
    expert: Callable[[int], SwiGLUWeights]
    prefetch: Callable[[np.ndarray], None] | None = None


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer: its norms, its mixer and its FFN (LFM3's sandwich norms None when absent)."""

    operator_norm: np.ndarray
    mixer: ConvWeights | AttentionWeights
    ffn_norm: np.ndarray
    ffn: SwiGLUWeights | MoEWeights
    post_operator_norm: np.ndarray | None = None
    post_ffn_norm: np.ndarray | None = None


# ------------------------------------------------------------------------------------- layers
RopeTables = tuple[np.ndarray, np.ndarray]  # (cos, sin), each (T, hd)


def lfm2_layer(h: np.ndarray, w: LayerWeights, c: Config, rope: RopeTables, past: Any, rnd: Rounding = ops.exact,
               tap: Tap = untapped, window: int | None = None) -> tuple[np.ndarray, Any]:
    """One LFM2 / LFM2-MoE decoder layer.  (T, D) -> (T, D), and the layer's state for the next call.

    ``rope`` is the (cos, sin) pair of the T new positions; ``past`` is what the previous call returned
    for this layer (None at the start of a sequence): the conv inputs so far, or the K and V cache.
    """
    x = tap("operator_norm", ops.rms_norm(h, w.operator_norm, c.norm_eps, rnd))
    y, past = mixer(x, w.mixer, c, rope, past, window, rnd, tap)
    h = tap("mixer_residual", rnd(h + y))
    x = tap("ffn_norm", ops.rms_norm(h, w.ffn_norm, c.norm_eps, rnd))
    y = tap("feed_forward.output", ffn(x, w.ffn, c, rnd, tap))
    return rnd(h + y), past


def lfm3_layer(h: np.ndarray, w: LayerWeights, c: Config, rope: RopeTables, past: Any, rnd: Rounding = ops.exact,
               tap: Tap = untapped, window: int | None = None) -> tuple[np.ndarray, Any]:
    """One LFM3 decoder layer: :func:`lfm2_layer` with a sandwich norm after the mixer and after the FFN
    (skipped when ``use_sandwich_norm`` is off). ``window`` is the sliding window of a sliding layer."""
    x = tap("operator_norm", ops.rms_norm(h, w.operator_norm, c.norm_eps, rnd))
    y, past = mixer(x, w.mixer, c, rope, past, window, rnd, tap)
    if w.post_operator_norm is not None:
        y = tap("post_operator_norm", ops.rms_norm(y, w.post_operator_norm, c.norm_eps, rnd))
    h = tap("mixer_residual", rnd(h + y))
    x = tap("ffn_norm", ops.rms_norm(h, w.ffn_norm, c.norm_eps, rnd))
    y = tap("feed_forward.output", ffn(x, w.ffn, c, rnd, tap))
    if w.post_ffn_norm is not None:
        y = tap("post_ffn_norm", ops.rms_norm(y, w.post_ffn_norm, c.norm_eps, rnd))
    return rnd(h + y), past


LAYERS = {"lfm2": lfm2_layer, "lfm2_moe": lfm2_layer, "lfm3": lfm3_layer}


def mixer(x: np.ndarray, w: ConvWeights | AttentionWeights, c: Config, rope: RopeTables, past: Any,
          window: int | None, rnd: Rounding, tap: Tap) -> tuple[np.ndarray, Any]:
    """The layer's mixer: attention (names ``self_attn.*``) or the gated short conv (``conv.*``)."""
    if isinstance(w, AttentionWeights):
        return attention_mixer(x, w, c, rope, past, rnd, prefixed(tap, "self_attn."), window)
    return conv_mixer(x, w, past, rnd, prefixed(tap, "conv."))


def ffn(x: np.ndarray, w: SwiGLUWeights | MoEWeights, c: Config, rnd: Rounding, tap: Tap) -> np.ndarray:
    """The layer's FFN: a mixture of experts or one SwiGLU (names ``feed_forward.*``)."""
    if isinstance(w, MoEWeights):
        return moe_ffn(x, w, c, rnd, prefixed(tap, "feed_forward."))
    return ops.swiglu(x, w.w1, w.w3, w.w2, prefixed(tap, "feed_forward."), rnd)


# ------------------------------------------------------------------------------------- mixers
def conv_mixer(x: np.ndarray, w: ConvWeights, past: np.ndarray | None, rnd: Rounding = ops.exact,
               tap: Tap = untapped) -> tuple[np.ndarray, np.ndarray]:
    """The gated short conv (:func:`lfm2np.ops.short_conv`); ``past`` is the history of its inputs ``b*x``.
    (T, D) -> (T, D), (n + T, D)"""
    return ops.short_conv(x, w.in_proj, w.conv, w.out_proj, w.in_proj_bias, w.conv_bias, w.out_proj_bias,
                          window=past, tap=tap, rnd=rnd)


def attention_mixer(x: np.ndarray, w: AttentionWeights, c: Config, rope: RopeTables,
                    past: tuple[np.ndarray, np.ndarray] | None, rnd: Rounding = ops.exact,
                    tap: Tap = untapped, window: int | None = None) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """QK-normed, rotated GQA attention (:func:`lfm2np.ops.attention_block`); ``past`` is the (K, V) cache
    (for a sliding layer, at least its last W - 1 positions).  (T, D) -> (T, D), ((S, G, hd), (S, G, hd))"""
    past_k, past_v = past if past is not None else (None, None)
    q_bias, k_bias, v_bias, out_bias = w.biases if w.biases is not None else (None, None, None, None)
    y, k, v = ops.attention_block(x, w.q_proj, w.k_proj, w.v_proj, w.out_proj, w.q_norm, w.k_norm, *rope,
                                  c.norm_eps, past_k, past_v, tap=tap, rnd=rnd, window=window, gate_proj=w.gate_proj,
                                  biases=(q_bias, k_bias, v_bias, out_bias), wide_rope=c.model_type == "lfm3")
    return y, (k, v)


def moe_ffn(x: np.ndarray, w: MoEWeights, c: Config, rnd: Rounding = ops.exact, tap: Tap = untapped) -> np.ndarray:
    """Sigmoid top-k routing (:func:`lfm2np.ops.route`), then the chosen SwiGLU experts (:func:`lfm2np.ops.moe`).
    (T, D) -> (T, D)"""
    logits = tap("router_logits", rnd(ops.linear(x, w.gate)))
    if not np.isfinite(logits).all() or (w.expert_bias is not None and not np.isfinite(w.expert_bias).all()):
        return np.full_like(x, np.nan)  # a non-finite router would only steer the choice: make it show
    experts, weights = ops.select_experts(logits, w.expert_bias, c.num_experts_per_tok, c.norm_topk_prob,
                                          c.routed_scaling_factor, rnd)
    experts = tap("selected_experts", experts)
    weights = tap("routing_weights", weights)
    if w.prefetch is not None:
        w.prefetch(np.unique(experts))

    def expert(e: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ew = w.expert(e)
        return ew.w1, ew.w3, ew.w2

    return ops.moe(x, experts, weights, expert, rnd)
