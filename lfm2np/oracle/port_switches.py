"""The switches of a port (:class:`Port`): at every operator, the choice a port of LFM2 / LFM3 makes, one switch
each; ``Port()`` is the reference. How each switch acts on the forward pass is :mod:`lfm2np.oracle.port`; the named
mistakes built from them are :mod:`lfm2np.oracle.mistakes`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from ..errors import Lfm2npError, shown

# ------------------------------------------------------------------------------------------ Port
_CHOICES = {"router_scores": ("sigmoid", "softmax"), "conv_taps": ("causal", "reversed"),
            "conv_gates": ("b,c", "c,b"), "rope_pairs": ("split-half", "interleaved"),
            "qk_norm": ("before-rope", "none", "after-rope"), "final_norm": ("end", "start"),
            "swiglu_silu_on": ("w1", "w3"), "pooling": (None, "cls", "mean", "last"),
            "position_resize": ("bilinear-antialias", "bilinear", "bicubic", "bicubic-antialias"),
            "image_placement": ("placed", "prepended"), "activations": ("quantised", "float"),
            "kv_cache": (None, "f16", "f32")}


@dataclass(frozen=True)
class Port:
    """How a port computes each operator; every field at its default is the reference.

    - ``router_scores``: ``sigmoid`` per expert, or ``softmax`` over the experts;
    - ``router_bias_in_weights``: the expert bias also added to the mixing weights (not only to the choice);
    - ``router_scaling``: ``routed_scaling_factor`` applied; ``router_renorm``: top-k weights renormalised
      when ``norm_topk_prob``;
    - ``conv_taps``: ``causal`` (the last tap on the current token) or ``reversed``;
    - ``conv_gates``: ``b,c`` (``u = b*x`` before the conv, ``y = c*z`` after) or ``c,b`` (swapped);
    - ``conv_restart``: position P at which the conv window restarts from zeros (a second call that lost
      the first call's conv state), None: never;
    - ``rope_pairs``: ``split-half`` (dim i with i + hd/2) or ``interleaved`` (2i with 2i+1);
      ``rope_theta``: one base for every attention layer (None: each layer type's own);
    - ``qk_norm``: ``before-rope``, ``none`` or ``after-rope``;
    - ``final_norm``: ``end`` (embedding_norm after the last layer) or ``start`` (on the embeddings, none at
      the end);
    - ``swiglu_silu_on``: ``w1`` (silu of the gate projection) or ``w3`` (of the up projection);
    - ``attention_scale``: the factor on ``q k^T`` (None: ``hd^-0.5``);
    - LFM3: ``output_gate``: each head's output multiplied by ``sigmoid(gate_proj x)`` (False: ungated);
      ``sandwich_norms``: ``post_operator_norm`` and ``post_ffn_norm`` applied (False: skipped);
      ``partial_rotation``: a layer type with a partial (proportional) RoPE turns only its rotated pairs
      (False: every pair turns, transformers 5.24's reading of a "default" label); ``sliding_window``:
      sliding layers see their last W positions (False: every earlier position);
    - bidirectional LFM2: ``attention_both_ways`` (False: the causal mask kept), ``conv_centred`` (False: the conv
      left-padded as in the causal model), ``conv_zero_padding`` (None: the checkpoint's flag; True / False: a
      padded row's padding zeroed before the conv, or not, whatever the flag), ``pooling`` (None: the
      checkpoint's; "cls", "mean", "last": another pooling of the embedding head);
    - LFM2-VL: ``vision_mask``: padding patches masked out as keys (False: every patch attends to the padding);
      ``position_resize``: the learned position grid resized to each image by antialiased bilinear weights, or
      plain ``bilinear`` (no antialiasing), ``bicubic`` (torch's, a = -0.75) or ``bicubic-antialias``;
      ``projector_layernorm``: the projector's LayerNorm as the config says (False: the opposite, skipped when
      configured, or applied with unit weight and zero bias when not); ``image_placement``: image features at
      their placeholders, or ``prepended`` (the features first, then the text's embeddings without the
      placeholders);
    - llama.cpp's CPU arithmetic (a reference in dtype ``llamacpp-cpu``): ``activations``: ``quantised`` to each
      weight type's dot-product type before a product, or ``float`` (f32 activations, dequantised weights);
      ``kv_cache``: the type the attention reads q, k and v in (None: the reference's own; ``f32``, ``f16``);
      both change nothing in a model computing in exact arithmetic (float activations, no KV cache type);
    - where: ``layers``, the layers whose values the switches change (None: every layer; the RoPE frequencies
      and the final norm are not a layer's), and ``experts``, on MoE layers, the experts whose weights
      ``swiglu_silu_on`` exchanges (None: all): a weight converter that got one layer, or some experts, wrong.
    """

    router_scores: str = "sigmoid"
    router_bias_in_weights: bool = False
    router_scaling: bool = True
    router_renorm: bool = True
    conv_taps: str = "causal"
    conv_gates: str = "b,c"
    conv_restart: int | None = None
    rope_pairs: str = "split-half"
    rope_theta: float | None = None
    qk_norm: str = "before-rope"
    final_norm: str = "end"
    swiglu_silu_on: str = "w1"
    attention_scale: float | None = None
    output_gate: bool = True
    sandwich_norms: bool = True
    partial_rotation: bool = True
    sliding_window: bool = True
    attention_both_ways: bool = True
    conv_centred: bool = True
    conv_zero_padding: bool | None = None
    pooling: str | None = None
    vision_mask: bool = True
    position_resize: str = "bilinear-antialias"
    projector_layernorm: bool = True
    image_placement: str = "placed"
    activations: str = "quantised"
    kv_cache: str | None = None
    layers: tuple[int, ...] | None = None
    experts: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise Lfm2npError(f"Port.{name} is {shown(getattr(self, name))}; expected one of "
                                  f"{', '.join(str(a) for a in allowed)}")
        for name in ("router_bias_in_weights", "router_scaling", "router_renorm", "output_gate", "sandwich_norms",
                     "partial_rotation", "sliding_window", "attention_both_ways", "conv_centred", "vision_mask",
                     "projector_layernorm"):
            if not isinstance(getattr(self, name), bool):  # "no" would be true, None false
                raise Lfm2npError(f"Port.{name} is {shown(getattr(self, name))}; expected True or False")
        for name in ("rope_theta", "attention_scale"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value <= 0):
                raise Lfm2npError(f"Port.{name} is {shown(value)}; expected None or a positive finite number")
        if self.conv_zero_padding is not None and not isinstance(self.conv_zero_padding, bool):
            raise Lfm2npError(f"Port.conv_zero_padding is {shown(self.conv_zero_padding)}; expected None, True or "
                              f"False")
        p = self.conv_restart
        if p is not None and (isinstance(p, bool) or not isinstance(p, int) or p < 1):
            raise Lfm2npError(f"Port.conv_restart is {shown(p)}; expected None or a position >= 1")
        for name in ("layers", "experts"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, tuple) and value and all(
                    isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value)):
                raise Lfm2npError(f"Port.{name} is {shown(value)}; expected None or a tuple of indices >= 0")

    def at(self, layer: int) -> bool:
        """Whether the switches change layer ``layer``'s values."""
        return self.layers is None or layer in self.layers

    def changes(self) -> dict[str, Any]:
        """The switches set away from the reference, ``{field: value}``."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != f.default}

    @property
    def reroutes(self) -> bool:
        """Whether the router is computed differently."""
        return (self.router_scores != "sigmoid" or self.router_bias_in_weights or not self.router_scaling
                or not self.router_renorm)


REFERENCE = Port()


def merge(*switch_sets: dict[str, Any]) -> Port:
    """One Port with every switch of ``switch_sets``; :class:`Lfm2npError` when two set the same switch
    to different values (those mistakes cannot both be made)."""
    merged: dict[str, Any] = {}
    for switches in switch_sets:
        for name, value in switches.items():
            if name in merged and merged[name] != value:
                raise Lfm2npError(f"Port.{name} cannot be both {shown(merged[name])} and {shown(value)}")
            merged[name] = value
    return Port(**merged)
