"""How a port of LFM2 / LFM3 computes each operator (:class:`Port`), and the forward pass it gives (:func:`run`).

A backend that ports an LFM model makes a choice at every operator; :class:`Port` names those choices, one
switch each, and ``Port()`` is the reference. :func:`run` computes a forward pass the way a ``Port`` says, through
:meth:`lfm2np.Model.forward`'s record protocol: the recorder returns replacements for the intermediates the
port computes differently (the handlers below, one per switch, reading the layer's weights through
``model.layer_weights(i)`` / ``model.params``), so there is still exactly one forward pass. The named
mistakes built from these switches are the catalogue, :mod:`lfm2np.oracle.mistakes`.

Adding a switch: a field on ``Port`` (with its allowed values in ``_CHOICES`` when it is a choice) and a
handler registered with ``_on`` for the tap it changes. A handler that recomputes an operator does it as
the layer does on this model: RoPE with the tables of the layer's type (:meth:`lfm2np.Model.rope`),
attention with the layer's sliding window and LFM3's output gate.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .. import ops
from ..config import Config
from ..errors import Lfm2npError

# ------------------------------------------------------------------------------------------ Port
_CHOICES = {"router_scores": ("sigmoid", "softmax"), "conv_taps": ("causal", "reversed"),
            "conv_gates": ("b,c", "c,b"), "rope_pairs": ("split-half", "interleaved"),
            "qk_norm": ("before-rope", "none", "after-rope"), "final_norm": ("end", "start"),
            "swiglu_silu_on": ("w1", "w3")}


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
      sliding layers see their last W positions (False: every earlier position).
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

    def __post_init__(self) -> None:
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise Lfm2npError(f"Port.{name} is {getattr(self, name)!r}; expected one of {', '.join(allowed)}")

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
                raise Lfm2npError(f"Port.{name} cannot be both {merged[name]!r} and {value!r}")
            merged[name] = value
    return Port(**merged)


# ------------------------------------------------------------------------- the mutated forward
class _Run:
    """One forward pass the way ``port`` says: the recorder handed to :meth:`Model.forward`. ``seen`` holds
    the values of the current layer's intermediates and of every layer's output so far, as the forward pass
    continued with them."""

    def __init__(self, model: Any, port: Port, T: int,
                 observe: Callable[[str, np.ndarray], None] | None = None):
        self.model, self.port, self.c = model, port, model.config
        self.rnd = model.numerics.round
        self.positions = np.arange(T)
        self.seen: dict[str, np.ndarray] = {}
        self.stash: dict[int, np.ndarray] = {}
        self.observe = observe

    def get(self, layer: int, step: str) -> np.ndarray:
        return self.seen[f"model.layers.{layer}.{step}"]

    def __call__(self, name: str, value: np.ndarray) -> np.ndarray | None:
        m = _LAYER.match(name)
        layer, step = (int(m.group(1)), m.group(2) or "") if m else (None, name)
        out = None
        for handler in _HANDLERS.get(step, ()):
            replaced = handler(self, layer, step, value if out is None else out)
            if replaced is not None:
                out = replaced
        final = value if out is None else out
        if layer is not None and not step:  # a layer is done: keep its output, let its internals go
            prefix = f"model.layers.{layer}."
            for key in [k for k in self.seen if k.startswith(prefix)]:
                del self.seen[key]
        self.seen[name] = final
        if self.observe is not None:
            self.observe(name, final)
        return out


_LAYER = re.compile(r"^model\.layers\.(\d+)(?:\.(.+))?$")
Handler = Callable[[_Run, "int | None", str, np.ndarray], "np.ndarray | None"]
_HANDLERS: dict[str, list[Handler]] = {}


def _on(*steps: str) -> Callable[[Handler], Handler]:
    """Register a handler for the intermediates named ``steps`` (below ``model.layers.{i}.``, or a whole
    top-level name); it returns a replacement, or None when its switch is at the reference."""
    def register(fn: Handler) -> Handler:
        for step in steps:
            _HANDLERS.setdefault(step, []).append(fn)
        return fn
    return register


def run(model: Any, ids: Any, port: Port = REFERENCE,
        observe: Callable[[str, np.ndarray], None] | None = None) -> np.ndarray:
    """The logits ``(T, V)`` of ``ids`` (T,) computed from scratch the way ``port`` says. ``observe(name,
    value)`` sees every intermediate as the pass continued with it (the mutated values)."""
    ids = model.check_ids(ids)
    if ids.ndim != 1:
        raise Lfm2npError(f"a mutated forward pass runs one sequence, shape (T,); got shape {ids.shape}")
    if port == REFERENCE and observe is None:
        return model.forward(ids)
    return model.forward(ids, record=_Run(model, port, ids.shape[0], observe))


# ------------------------------------------------------------------------------------ handlers
@_on("model.embed_tokens")
def _norm_at_start(run: _Run, layer: int | None, step: str, value: np.ndarray) -> np.ndarray | None:
    if run.port.final_norm == "start":
        return ops.rms_norm(value, run.model.params["model.embedding_norm.weight"], run.c.norm_eps, run.rnd)
    return None


@_on("model.embedding_norm")
def _no_norm_at_end(run: _Run, layer: int | None, step: str, value: np.ndarray) -> np.ndarray | None:
    if run.port.final_norm == "start":
        return run.seen[f"model.layers.{run.c.num_hidden_layers - 1}"]
    return None


@_on("conv.b_gate", "conv.c_gate")
def _gates(run: _Run, i: int, step: str, value: np.ndarray) -> np.ndarray | None:
    if run.port.conv_gates == "b,c":
        return None
    b, c, _ = np.split(run.get(i, "conv.in_proj"), 3, axis=-1)
    return c if step == "conv.b_gate" else b


@_on("conv.conv_out")
def _conv(run: _Run, i: int, step: str, value: np.ndarray) -> np.ndarray | None:
    p = run.port
    if p.conv_taps == "causal" and p.conv_restart is None:
        return None
    w = run.model.layer_weights(i).mixer
    kernel = w.conv[:, 0, :] if p.conv_taps == "causal" else w.conv[:, 0, ::-1]  # (D, L)
    u = run.get(i, "conv.bx")  # (T, D)
    P = p.conv_restart if p.conv_restart is not None and 0 < p.conv_restart < u.shape[0] else 0
    parts = [ops.causal_conv1d(part, kernel, w.conv_bias)[0] for part in (u[:P], u[P:]) if part.shape[0]]
    return run.rnd(np.concatenate(parts))


def _rope(run: _Run, i: int, x: np.ndarray) -> np.ndarray:
    """The port's RoPE of ``x`` (T, n, hd) at positions 0..T-1 in attention layer ``i``: the tables of the
    layer's type, computed as :meth:`lfm2np.Model.rope` computes them, unless the port changes the base or
    the partial rotation; applied as the layer applies them (LFM3: float32 cos/sin, ``wide``)."""
    p, c = run.port, run.c
    kind = c.layer_types[i]
    full = not p.partial_rotation and c.rotated_pairs(kind) is not None
    if p.rope_theta is None and not full:
        cos, sin = run.model.rope(run.positions, kind)
    else:
        theta = c.rope(kind).theta if p.rope_theta is None else p.rope_theta
        cos, sin = ops.rope_tables(run.positions, c.head_dim, theta, run.model.dtype,
                                   None if full else c.rotated_pairs(kind))
        if c.model_type != "lfm3":  # Model.rope's policy: LFM3 keeps cos and sin in float32
            cos, sin = run.rnd(cos), run.rnd(sin)
    wide = c.model_type == "lfm3"  # as layers.attention_mixer applies them
    if p.rope_pairs == "split-half":
        return ops.apply_rope(x, cos, sin, run.rnd, wide)
    hd = x.shape[-1]
    perm = np.concatenate([np.arange(0, hd, 2), np.arange(1, hd, 2)])  # pairs (2i, 2i+1) -> (i, i + hd/2)
    out = np.empty_like(x)
    out[..., perm] = ops.apply_rope(x[..., perm], cos, sin, run.rnd, wide)
    return out


def _rope_changed(run: _Run, i: int) -> bool:
    p = run.port
    return (p.rope_pairs != "split-half" or p.rope_theta is not None
            or (not p.partial_rotation and run.c.rotated_pairs(run.c.layer_types[i]) is not None))


@_on("self_attn.q_normed", "self_attn.k_normed")
def _qk_norm(run: _Run, i: int, step: str, value: np.ndarray) -> np.ndarray | None:
    p = run.port
    if p.qk_norm == "before-rope":
        return None
    which = step[len("self_attn.")]  # "q" or "k"
    raw = run.get(i, f"self_attn.{which}_proj")
    if p.qk_norm == "none":
        return raw
    w = run.model.layer_weights(i).mixer
    return ops.rms_norm(_rope(run, i, raw), w.q_norm if which == "q" else w.k_norm, run.c.norm_eps, run.rnd)


@_on("self_attn.q_rope", "self_attn.k_rope")
def _rotation(run: _Run, i: int, step: str, value: np.ndarray) -> np.ndarray | None:
    which = step[len("self_attn.")]
    if run.port.qk_norm == "after-rope":  # normed after rotating: "q_normed" already holds the rotated value
        return run.get(i, f"self_attn.{which}_normed")
    if not _rope_changed(run, i):
        return None
    return _rope(run, i, run.get(i, f"self_attn.{which}_normed"))


@_on("self_attn.gate")
def _no_gate(run: _Run, i: int, step: str, value: np.ndarray) -> np.ndarray | None:
    return None if run.port.output_gate else np.ones_like(value)  # attn_out = the ungated heads


@_on("self_attn.attn_out")
def _attention(run: _Run, i: int, step: str, value: np.ndarray) -> np.ndarray | None:
    """Attention recomputed from the (port's) q_rope, k_rope and v_proj when the scale differs or a
    sliding layer's window is ignored; then LFM3's output gate, as the layer applies it."""
    p, c = run.port, run.c
    window = c.window(i)
    if p.attention_scale is None and (window is None or p.sliding_window):
        return None
    q = run.get(i, "self_attn.q_rope")
    if p.attention_scale is not None:
        q = q * q.dtype.type(p.attention_scale / c.head_dim ** -0.5)  # attention() multiplies by hd^-0.5 itself
    attn = ops.attention_blocked(q, run.get(i, "self_attn.k_rope"), run.get(i, "self_attn.v_proj"),
                                 window=window if p.sliding_window else None, rnd=run.rnd)  # (T, H*hd)
    gate_name = f"model.layers.{i}.self_attn.gate"
    if gate_name in run.seen:  # the gate the pass went on with (ones when the port drops it)
        T, hd = attn.shape[0], c.head_dim
        attn = run.rnd(attn.reshape(T, -1, hd) * run.seen[gate_name][:, :, None]).reshape(T, -1)
    return attn


@_on("post_operator_norm")
def _no_post_mixer_norm(run: _Run, i: int, step: str, value: np.ndarray) -> np.ndarray | None:
    if run.port.sandwich_norms:
        return None
    return run.get(i, "self_attn.out_proj" if run.c.is_attention(i) else "conv.out_proj")  # the mixer output


@_on("post_ffn_norm")
def _no_post_ffn_norm(run: _Run, i: int, step: str, value: np.ndarray) -> np.ndarray | None:
    return None if run.port.sandwich_norms else run.get(i, "feed_forward.output")


def route(logits: np.ndarray, expert_bias: np.ndarray | None, c: Config, port: Port = REFERENCE,
          rnd: Callable[[np.ndarray], np.ndarray] = ops.exact) -> tuple[np.ndarray, np.ndarray]:
    """:func:`lfm2np.ops.select_experts` with the port's router switches (``Port()`` gives its result).
    (T, E), (E,) -> experts (T, k), weights (T, k)"""
    scores = rnd(ops.softmax(logits) if port.router_scores == "softmax" else ops.sigmoid(logits))
    biased = scores if expert_bias is None else scores + expert_bias
    experts = ops.top_k_experts(biased, c.num_experts_per_tok)
    weights = np.take_along_axis(biased if port.router_bias_in_weights else scores, experts, axis=-1)
    if c.norm_topk_prob and port.router_renorm:
        weights = rnd(weights / rnd(rnd(weights.sum(axis=-1, keepdims=True)) + weights.dtype.type(ops.ROUTER_NORM_EPS)))
    if port.router_scaling:
        weights = rnd(weights * weights.dtype.type(c.routed_scaling_factor))
    return experts, weights


@_on("feed_forward.selected_experts")
def _experts(run: _Run, i: int, step: str, value: np.ndarray) -> np.ndarray | None:
    if not run.port.reroutes:
        return None
    experts, run.stash[i] = route(run.get(i, "feed_forward.router_logits"), run.model.layer_weights(i).ffn.expert_bias,
                                  run.c, run.port, run.rnd)
    return experts


@_on("feed_forward.routing_weights")
def _weights(run: _Run, i: int, step: str, value: np.ndarray) -> np.ndarray | None:
    return run.stash.pop(i) if run.port.reroutes else None


@_on("feed_forward.act")
def _swiglu(run: _Run, i: int, step: str, value: np.ndarray) -> np.ndarray | None:
    if run.port.swiglu_silu_on == "w1":
        return None
    return run.rnd(run.rnd(ops.silu(run.get(i, "feed_forward.w3"))) * run.get(i, "feed_forward.w1"))


@_on("feed_forward.output")
def _experts_swiglu(run: _Run, i: int, step: str, value: np.ndarray) -> np.ndarray | None:
    if run.port.swiglu_silu_on == "w1" or not run.c.is_moe_layer(i):
        return None
    moe = run.model.layer_weights(i).ffn

    def swapped(e: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        w = moe.expert(e)
        return w.w3, w.w1, w.w2  # silu(w3 x) * (w1 x): w1 and w3 exchanged

    return ops.moe(run.get(i, "ffn_norm"), run.get(i, "feed_forward.selected_experts"),
                   run.get(i, "feed_forward.routing_weights"), swapped, run.rnd)
