"""The decoder layer, as pure functions over explicit weights: the whole LFM2 / LFM2-MoE layer in one screen.

Every layer is pre-norm residual::

    h = h + mixer(operator_norm(h))      # gated short conv or GQA attention, by layer_types[i]
    h = h + ffn(ffn_norm(h))             # SwiGLU, or router + experts on MoE layers

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
    per-head RMSNorm weights ``q_norm``/``k_norm (hd,)`` (``q_layernorm``/``k_layernorm`` in LFM2 checkpoints)."""

    q_proj: np.ndarray
    k_proj: np.ndarray
    v_proj: np.ndarray
    out_proj: np.ndarray
    q_norm: np.ndarray
    k_norm: np.ndarray


@dataclass(frozen=True)
class SwiGLUWeights:
    """A SwiGLU FFN: ``w1`` (gate) and ``w3`` (up) ``(F, D)``, ``w2`` (down) ``(D, F)``."""

    w1: np.ndarray
    w3: np.ndarray
    w2: np.ndarray


@dataclass(frozen=True)
class MoEWeights:
    """A mixture of experts: the router ``gate (E, D)``, the selection-only ``expert_bias (E,)`` (or None),
    and ``expert(e)`` giving expert e's :class:`SwiGLUWeights` when it is first chosen."""

    gate: np.ndarray
    expert_bias: np.ndarray | None
    expert: Callable[[int], SwiGLUWeights]


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer: its two norms, its mixer and its FFN."""

    operator_norm: np.ndarray
    mixer: ConvWeights | AttentionWeights
    ffn_norm: np.ndarray
    ffn: SwiGLUWeights | MoEWeights


# ------------------------------------------------------------------------------------- layers
def lfm2_layer(h: np.ndarray, w: LayerWeights, c: Config, rope: tuple[np.ndarray, np.ndarray], past: Any,
               rnd: Rounding = ops.exact, tap: Tap = untapped) -> tuple[np.ndarray, Any]:
    """One LFM2 / LFM2-MoE decoder layer.  (T, D) -> (T, D), and the layer's state for the next call.

    ``rope`` is the (cos, sin) pair of the T new positions; ``past`` is what the previous call returned
    for this layer (None at the start of a sequence): the conv inputs so far, or the K and V cache.
    """
    x = tap("operator_norm", ops.rms_norm(h, w.operator_norm, c.norm_eps, rnd))
    if isinstance(w.mixer, AttentionWeights):
        y, past = attention_mixer(x, w.mixer, c, rope, past, rnd, prefixed(tap, "self_attn."))
    else:
        y, past = conv_mixer(x, w.mixer, past, rnd, prefixed(tap, "conv."))
    h = tap("mixer_residual", rnd(h + y))
    x = tap("ffn_norm", ops.rms_norm(h, w.ffn_norm, c.norm_eps, rnd))
    if isinstance(w.ffn, MoEWeights):
        y = moe_ffn(x, w.ffn, c, rnd, prefixed(tap, "feed_forward."))
    else:
        y = ops.swiglu(x, w.ffn.w1, w.ffn.w3, w.ffn.w2, prefixed(tap, "feed_forward."), rnd)
    y = tap("feed_forward.output", y)
    return rnd(h + y), past


# ------------------------------------------------------------------------------------- mixers
def conv_mixer(x: np.ndarray, w: ConvWeights, past: np.ndarray | None, rnd: Rounding = ops.exact,
               tap: Tap = untapped) -> tuple[np.ndarray, np.ndarray]:
    """The gated short conv (:func:`lfm2np.ops.short_conv`); ``past`` is the history of its inputs ``b*x``.
    (T, D) -> (T, D), (n + T, D)"""
    return ops.short_conv(x, w.in_proj, w.conv, w.out_proj, w.in_proj_bias, w.conv_bias, w.out_proj_bias,
                          window=past, tap=tap, rnd=rnd)


def attention_mixer(x: np.ndarray, w: AttentionWeights, c: Config, rope: tuple[np.ndarray, np.ndarray],
                    past: tuple[np.ndarray, np.ndarray] | None, rnd: Rounding = ops.exact,
                    tap: Tap = untapped) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """QK-normed, rotated GQA attention (:func:`lfm2np.ops.attention_block`); ``past`` is the (K, V) cache.
    (T, D) -> (T, D), ((S, G, hd), (S, G, hd))"""
    past_k, past_v = past if past is not None else (None, None)
    y, k, v = ops.attention_block(x, w.q_proj, w.k_proj, w.v_proj, w.out_proj, w.q_norm, w.k_norm, *rope,
                                  c.norm_eps, past_k, past_v, tap=tap, rnd=rnd)
    return y, (k, v)


def moe_ffn(x: np.ndarray, w: MoEWeights, c: Config, rnd: Rounding = ops.exact, tap: Tap = untapped) -> np.ndarray:
    """Sigmoid top-k routing (:func:`lfm2np.ops.route`), then the chosen SwiGLU experts (:func:`lfm2np.ops.moe`).
    (T, D) -> (T, D)"""
    logits = tap("router_logits", rnd(ops.linear(x, w.gate)))
    experts, weights = ops.select_experts(logits, w.expert_bias, c.num_experts_per_tok, c.norm_topk_prob,
                                          c.routed_scaling_factor, rnd)
    experts = tap("selected_experts", experts)
    weights = tap("routing_weights", weights)

    def expert(e: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ew = w.expert(e)
        return ew.w1, ew.w3, ew.w2

    return ops.moe(x, experts, weights, expert, rnd)
