"""How a port of LFM2 / LFM3 computes each operator (:class:`Port`), and the forward pass it gives (:func:`run`).

A backend that ports an LFM model makes a choice at every operator; :class:`Port` names those choices, one
switch each, and ``Port()`` is the reference. :func:`run` computes a forward pass the way a ``Port`` says, through
:meth:`lfm2np.Model.forward`'s record protocol: for each switch away from the reference, a handler replaces
ONE named value of the trace schema (:mod:`lfm2np.schema`) and the forward pass goes on with it, so there is
still exactly one forward pass, and no policy of it is written twice:

- a handler reads only values the pass has already named (in this layer, or a layer's output, or the RoPE
  tables) and the layer's weights (``model.layer_weights(i)``), and a read of a value not computed yet is an
  error, not a silent use of a stale one;
- it computes its replacement with the model's own functions (:mod:`lfm2np.ops`, :mod:`lfm2np.layers`) given
  other inputs, and the config's behaviour flags: the router's softmax replaces ``router_scores`` and the
  forward chooses the experts from it; a wrong RoPE base replaces ``inv_freq`` and the forward builds the
  tables from it; a missing renormalisation replaces ``topk_normed`` by ``topk_scores``.

The named mistakes built from these switches are the catalogue, :mod:`lfm2np.oracle.mistakes`. Adding a switch:
a field on ``Port`` (with its allowed values in ``_CHOICES`` when it is a choice) and a handler registered with
``_on`` for the schema value it replaces, with the values it ``reads``; both are checked against the schema's
names when the handler is registered.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .. import ops
from ..errors import Lfm2npError, shown
from ..layers import SwiGLUWeights, mixture
from ..schema import STEPS, TOP_LEVEL

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
      sliding layers see their last W positions (False: every earlier position);
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
    layers: tuple[int, ...] | None = None
    experts: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise Lfm2npError(f"Port.{name} is {shown(getattr(self, name))}; expected one of {', '.join(allowed)}")
        for name in ("router_bias_in_weights", "router_scaling", "router_renorm", "output_gate", "sandwich_norms",
                     "partial_rotation", "sliding_window"):
            if not isinstance(getattr(self, name), bool):  # "no" would be true, None false
                raise Lfm2npError(f"Port.{name} is {shown(getattr(self, name))}; expected True or False")
        for name in ("rope_theta", "attention_scale"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value <= 0):
                raise Lfm2npError(f"Port.{name} is {shown(value)}; expected None or a positive finite number")
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


# ------------------------------------------------------------------------- the mutated forward
class _Run:
    """One forward pass the way ``port`` says: the recorder handed to :meth:`Model.forward`. ``seen`` holds the
    values of the current layer's intermediates, of every layer's output and of the values outside the layers,
    as the forward pass continued with them."""

    def __init__(self, model: Any, port: Port, observe: Callable[[str, np.ndarray], None] | None = None):
        self.model, self.port, self.c = model, port, model.config
        self.rnd = model.numerics.round
        self.seen: dict[str, np.ndarray] = {}
        self.observe = observe

    def get(self, name: str, layer: int | None = None) -> np.ndarray:
        """The value named ``name`` (a step of ``layer``), as the pass went on with it."""
        full = name if layer is None else (f"model.layers.{layer}.{name}" if name else f"model.layers.{layer}")
        if full not in self.seen:
            raise Lfm2npError(f"a port handler read {full} before the forward pass computed it")
        return self.seen[full]

    def __call__(self, name: str, value: np.ndarray) -> np.ndarray | None:
        m = _LAYER.match(name)
        layer, step = (int(m.group(1)), m.group(2) or "") if m else (None, _TOP_KEY.sub(".{kind}.", name))
        out = None
        for handler in _HANDLERS.get(step, ()) if layer is None or self.port.at(layer) else ():
            replaced = handler(self, layer, name, value if out is None else out)
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
_TOP_KEY = re.compile(r"(?<=^model\.rotary_emb)\.\w+\.")  # model.rotary_emb.{kind}.inv_freq
Handler = Callable[[_Run, "int | None", str, np.ndarray], "np.ndarray | None"]
_HANDLERS: dict[str, list[Handler]] = {}


def _known(step: str) -> bool:
    return step in STEPS or step in TOP_LEVEL


def _on(*steps: str, reads: tuple[str, ...] = ()) -> Callable[[Handler], Handler]:
    """Register a handler replacing the values named ``steps`` (below ``model.layers.{i}.``, or a top-level
    name of :data:`lfm2np.schema.TOP_LEVEL`); ``reads``: the steps it reads. Both must be schema names (an
    :class:`Lfm2npError` here, when the module is imported, otherwise). The handler returns the replacement, or
    None when its switch is at the reference."""
    unknown = [s for s in (*steps, *reads) if not _known(s)]
    if unknown:
        raise Lfm2npError(f"a port handler names {shown(unknown[0])}, which is not in the trace schema")

    def register(fn: Handler) -> Handler:
        for step in steps:
            _HANDLERS.setdefault(step, []).append(fn)
        return fn
    return register


def run(model: Any, ids: Any, port: Port = REFERENCE,
        observe: Callable[[str, np.ndarray], None] | None = None) -> np.ndarray:
    """The logits ``(T, V)`` of ``ids`` (T,) computed from scratch the way ``port`` says. ``observe(name,
    value)`` sees every intermediate as the pass continued with it (the mutated values)."""
    if not isinstance(port, Port):
        raise Lfm2npError(f"port must be an lfm2np Port; got {type(port).__name__}")
    c = model.config
    for name, count, what in (("layers", c.num_hidden_layers, "layers"), ("experts", c.num_experts, "experts")):
        beyond = [i for i in getattr(port, name) or () if i >= count]
        if beyond:  # a switch that changes nothing would pass for the reference
            raise Lfm2npError(f"Port.{name} names {shown(beyond[0])}; the model has {count} {what} "
                              f"({f'0..{count - 1}' if count else 'none'})")
    ids = model.check_ids(ids)
    if ids.ndim != 1:
        raise Lfm2npError(f"a mutated forward pass runs one sequence, shape (T,); got shape {ids.shape}")
    if port == REFERENCE and observe is None:
        return model.forward(ids)
    return model.forward(ids, record=_Run(model, port, observe))


# ------------------------------------------------------------------------------------ handlers
@_on("model.embed_tokens")
def _norm_at_start(run: _Run, layer: int | None, name: str, value: np.ndarray) -> np.ndarray | None:
    if run.port.final_norm == "start":
        return ops.rms_norm(value, run.model.params["model.embedding_norm.weight"], run.c.norm_eps, run.rnd)
    return None


@_on("model.embedding_norm", reads=("",))
def _no_norm_at_end(run: _Run, layer: int | None, name: str, value: np.ndarray) -> np.ndarray | None:
    if run.port.final_norm == "start":
        return run.get("", run.c.num_hidden_layers - 1)
    return None


@_on("conv.b_gate", "conv.c_gate", reads=("conv.in_proj",))
def _gates(run: _Run, i: int, name: str, value: np.ndarray) -> np.ndarray | None:
    if run.port.conv_gates == "b,c":
        return None
    b, c, _ = np.split(run.get("conv.in_proj", i), 3, axis=-1)  # in_proj's rows: b, c, x
    return c if name.endswith("b_gate") else b


@_on("conv.conv_out", reads=("conv.bx",))
def _conv(run: _Run, i: int, name: str, value: np.ndarray) -> np.ndarray | None:
    p = run.port
    if p.conv_taps == "causal" and p.conv_restart is None:
        return None
    w = run.model.layer_weights(i).mixer
    kernel = w.conv[:, 0, :] if p.conv_taps == "causal" else w.conv[:, 0, ::-1]  # (D, L)
    u = run.get("conv.bx", i)  # (T, D)
    P = p.conv_restart if p.conv_restart is not None and 0 < p.conv_restart < u.shape[0] else 0
    parts = [ops.causal_conv1d(part, kernel, w.conv_bias)[0] for part in (u[:P], u[P:]) if part.shape[0]]
    return run.rnd(np.concatenate(parts))


@_on("model.rotary_emb.{kind}.inv_freq")
def _frequencies(run: _Run, layer: int | None, name: str, value: np.ndarray) -> np.ndarray | None:
    """Another base for every layer type, or every pair turning where the type turns only some."""
    p, c = run.port, run.c
    kind = name.split(".")[2]
    full = not p.partial_rotation and c.rotated_pairs(kind) is not None
    if p.rope_theta is None and not full:
        return None
    theta = c.rope(kind).theta if p.rope_theta is None else p.rope_theta
    return ops.rope_frequencies(c.head_dim, theta, None if full else c.rotated_pairs(kind), value.dtype)


def _rope(run: _Run, i: int, x: np.ndarray) -> np.ndarray:
    """The port's RoPE of ``x`` (T, n, hd) in attention layer ``i``: the pass's tables of the layer's type,
    applied as the layer applies them, to split halves or (``interleaved``) to adjacent pairs."""
    kind = run.c.layer_types[i]
    cos, sin = run.get(f"model.rotary_emb.{kind}.cos"), run.get(f"model.rotary_emb.{kind}.sin")
    wide = run.c.rope_in_float32
    if run.port.rope_pairs == "split-half":
        return ops.apply_rope(x, cos, sin, run.rnd, wide)
    hd = x.shape[-1]
    perm = np.concatenate([np.arange(0, hd, 2), np.arange(1, hd, 2)])  # pairs (2i, 2i+1) -> (i, i + hd/2)
    out = np.empty_like(x)
    out[..., perm] = ops.apply_rope(x[..., perm], cos, sin, run.rnd, wide)
    return out


@_on("self_attn.q_normed", "self_attn.k_normed", reads=("self_attn.q_proj", "self_attn.k_proj"))
def _qk_norm(run: _Run, i: int, name: str, value: np.ndarray) -> np.ndarray | None:
    p = run.port
    if p.qk_norm == "before-rope":
        return None
    which = name.rsplit(".", 1)[1][0]  # "q" or "k"
    raw = run.get(f"self_attn.{which}_proj", i)
    if p.qk_norm == "none":
        return raw
    w = run.model.layer_weights(i).mixer
    return ops.rms_norm(_rope(run, i, raw), w.q_norm if which == "q" else w.k_norm, run.c.norm_eps, run.rnd)


@_on("self_attn.q_rope", "self_attn.k_rope", reads=("self_attn.q_normed", "self_attn.k_normed"))
def _rotation(run: _Run, i: int, name: str, value: np.ndarray) -> np.ndarray | None:
    which = name.rsplit(".", 1)[1][0]
    if run.port.qk_norm == "after-rope":  # normed after rotating: "q_normed" already holds the rotated value
        return run.get(f"self_attn.{which}_normed", i)
    if run.port.rope_pairs == "split-half":
        return None
    return _rope(run, i, run.get(f"self_attn.{which}_normed", i))


@_on("self_attn.gate")
def _no_gate(run: _Run, i: int, name: str, value: np.ndarray) -> np.ndarray | None:
    return None if run.port.output_gate else np.ones_like(value)  # attn_out = the ungated heads


@_on("self_attn.attention", "self_attn.attn_out", reads=("self_attn.q_rope", "self_attn.k_rope", "self_attn.v_proj"))
def _attention(run: _Run, i: int, name: str, value: np.ndarray) -> np.ndarray | None:
    """The attention (before LFM3's output gate, which the layer then applies) with another scale, or a
    sliding layer seeing every earlier position."""
    p, c = run.port, run.c
    window = c.window(i)
    before_gate = "self_attn.attention" if c.use_attention_gate else "self_attn.attn_out"
    if not name.endswith(before_gate) or (p.attention_scale is None and (window is None or p.sliding_window)):
        return None
    q = run.get("self_attn.q_rope", i)
    if p.attention_scale is not None:
        q = q * q.dtype.type(p.attention_scale / c.head_dim ** -0.5)  # attention() multiplies by hd^-0.5 itself
    return ops.attention(q, run.get("self_attn.k_rope", i), run.get("self_attn.v_proj", i),
                         window if p.sliding_window else None, run.rnd)


@_on("post_operator_norm", reads=("self_attn.out_proj", "conv.out_proj"))
def _no_post_mixer_norm(run: _Run, i: int, name: str, value: np.ndarray) -> np.ndarray | None:
    if run.port.sandwich_norms:
        return None
    return run.get("self_attn.out_proj" if run.c.is_attention(i) else "conv.out_proj", i)  # the mixer output


@_on("post_ffn_norm", reads=("feed_forward.output",))
def _no_post_ffn_norm(run: _Run, i: int, name: str, value: np.ndarray) -> np.ndarray | None:
    return None if run.port.sandwich_norms else run.get("feed_forward.output", i)


@_on("feed_forward.router_scores", reads=("feed_forward.router_logits",))
def _router_softmax(run: _Run, i: int, name: str, value: np.ndarray) -> np.ndarray | None:
    if run.port.router_scores == "sigmoid":
        return None
    return run.rnd(ops.softmax(run.get("feed_forward.router_logits", i)))


@_on("feed_forward.topk_scores", reads=("feed_forward.biased_scores", "feed_forward.selected_experts"))
def _bias_in_weights(run: _Run, i: int, name: str, value: np.ndarray) -> np.ndarray | None:
    if not run.port.router_bias_in_weights or not run.c.use_expert_bias:
        return None
    return np.take_along_axis(run.get("feed_forward.biased_scores", i), run.get("feed_forward.selected_experts", i),
                              axis=-1)


@_on("feed_forward.topk_normed", reads=("feed_forward.topk_scores",))
def _no_renorm(run: _Run, i: int, name: str, value: np.ndarray) -> np.ndarray | None:
    return None if run.port.router_renorm else run.get("feed_forward.topk_scores", i)


@_on("feed_forward.routing_weights", reads=("feed_forward.topk_normed", "feed_forward.topk_scores"))
def _no_scaling(run: _Run, i: int, name: str, value: np.ndarray) -> np.ndarray | None:
    if run.port.router_scaling:
        return None
    return run.get("feed_forward.topk_normed" if run.c.norm_topk_prob else "feed_forward.topk_scores", i)


@_on("feed_forward.act", reads=("feed_forward.w1", "feed_forward.w3"))
def _swiglu(run: _Run, i: int, name: str, value: np.ndarray) -> np.ndarray | None:
    if run.port.swiglu_silu_on == "w1":
        return None
    return ops.gated_silu(run.get("feed_forward.w3", i), run.get("feed_forward.w1", i), run.rnd)


@_on("feed_forward.output", reads=("ffn_norm", "feed_forward.selected_experts", "feed_forward.routing_weights"))
def _experts_swiglu(run: _Run, i: int, name: str, value: np.ndarray) -> np.ndarray | None:
    if run.port.swiglu_silu_on == "w1" or not run.c.is_moe_layer(i):
        return None
    moe = run.model.layer_weights(i).ffn

    def swapped(e: int) -> SwiGLUWeights:
        w = moe.expert(e)
        if run.port.experts is not None and e not in run.port.experts:
            return w
        return SwiGLUWeights(w.w3, w.w1, w.w2)  # silu(w3 x) * (w1 x): w1 and w3 exchanged

    return mixture(run.get("ffn_norm", i), run.get("feed_forward.selected_experts", i),
                   run.get("feed_forward.routing_weights", i), swapped, run.rnd)
