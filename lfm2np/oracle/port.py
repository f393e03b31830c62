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
a field on ``Port`` (:mod:`lfm2np.oracle.port_switches`, with its allowed values in ``_CHOICES`` when it is a choice) and a handler registered with
``_on`` for the schema value it replaces, with the values it ``reads``; both are checked against the schema's
names when the handler is registered.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import numpy as np

from .. import ops
from ..errors import Lfm2npError, shown
from ..layers import SwiGLUWeights, mixture
from ..ops_vision import resize_positions
from ..schema import STEPS, TOP_LEVEL
from ..vision_schema import PLACED, PROJECTOR, TOWER, is_vision_name

from .port_switches import REFERENCE, Port, merge  # noqa: F401  (Port and merge are read from here too)


# ------------------------------------------------------------------------- the mutated forward
class _Run:
    """One forward pass the way ``port`` says: the recorder handed to :meth:`Model.forward`. ``seen`` holds the
    values of the current layer's intermediates, of every layer's output and of the values outside the layers,
    as the forward pass continued with them."""

    def __init__(self, model: Any, port: Port, observe: Callable[[str, np.ndarray], None] | None = None,
                 ids: np.ndarray | None = None, images: Any = None, pads: np.ndarray | None = None):
        self.model, self.port, self.c = model, port, model.config
        self.ids, self.images = ids, images  # the call's ids and its checked images (LFM2-VL)
        self.rnd = model.numerics.round
        self.ops = ops if model.numerics.ops is None else model.numerics.ops  # the operators the pass computes with
        self.pads = pads  # a padded row's padding (bidirectional models), True where padded
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
        if not name.startswith(TOWER + "encoder.layers."):  # (no handler reads inside the vision layers)
            self.seen[name] = final
        if self.observe is not None:
            self.observe(name, final)
        return out


_LAYER = re.compile(r"^model\.layers\.(\d+)(?:\.(.+))?$")
_TOP_KEY = re.compile(r"(?<=^model\.rotary_emb)\.\w+\.")  # model.rotary_emb.{kind}.inv_freq
Handler = Callable[[_Run, "int | None", str, np.ndarray], "np.ndarray | None"]
_HANDLERS: dict[str, list[Handler]] = {}


def _known(step: str) -> bool:
    return step in STEPS or step in TOP_LEVEL or is_vision_name(step)


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
        observe: Callable[[str, np.ndarray], None] | None = None, images: Any = None) -> np.ndarray:
    """The logits ``(T, V)`` of ``ids`` (T,) computed from scratch the way ``port`` says (LFM2-VL: with
    ``images``, as :meth:`lfm2np.Model.forward` takes them). ``observe(name, value)`` sees every intermediate as
    the pass continued with it (the mutated values)."""
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
        return model.forward(ids, images=images)
    px = model.pixels(images, ids)
    return model.forward(ids, images=px, record=_Run(model, port, observe, ids, px))


def embed(model: Any, ids: Any, mask: Any = None, port: Port = REFERENCE,
          observe: Callable[[int, str, np.ndarray], None] | None = None) -> np.ndarray:
    """The pooled embeddings ``(B, E)`` of the rows of ``ids`` (B, T) (padded as ``mask`` says, 1 for a token),
    computed the way ``port`` says (:meth:`lfm2np.Model.embed` with a mask: a reference's padded batch).
    ``observe(row, name, value)`` sees every intermediate of each row."""
    ids = model.check_ids(ids)
    ids = ids[None] if ids.ndim == 1 else ids
    mask = np.ones(ids.shape, bool) if mask is None else np.asarray(mask).reshape(ids.shape).astype(bool)
    rows = []
    for b, (row, real) in enumerate(zip(ids, mask)):
        seen = None if observe is None else (lambda n, v, b=b: observe(b, n, v))
        rows.append(model.embed(row, attention_mask=real, record=_Run(model, port, seen, pads=~real)))
    return np.stack(rows)


# ------------------------------------------------------------------------------------ handlers
@_on("model.embed_tokens")
def _norm_at_start(run: _Run, layer: int | None, name: str, value: np.ndarray) -> np.ndarray | None:
    if run.port.final_norm == "start":
        return run.ops.rms_norm(value, run.model.params["model.embedding_norm.weight"], run.c.norm_eps, run.rnd)
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


@_on("conv.bx", reads=("conv.b_gate", "conv.x"))
def _pad_zeroing(run: _Run, i: int, name: str, value: np.ndarray) -> np.ndarray | None:
    """A padded row's padding zeroed before the centred conv, or not, against the checkpoint's flag."""
    zero, pads = run.port.conv_zero_padding, run.pads
    if zero is None or run.c.causal or pads is None or not pads.any():
        return None
    u = run.rnd(run.get("conv.b_gate", i) * run.get("conv.x", i))
    return np.where(pads[:, None], u.dtype.type(0), u) if zero else u


@_on("conv.conv_out", reads=("conv.bx",))
def _conv(run: _Run, i: int, name: str, value: np.ndarray) -> np.ndarray | None:
    p, centred = run.port, not run.c.causal and run.port.conv_centred
    if p.conv_taps == "causal" and p.conv_restart is None and (run.c.causal or p.conv_centred):
        return None
    w = run.model.layer_weights(i).mixer
    kernel = w.conv[:, 0, :] if p.conv_taps == "causal" else w.conv[:, 0, ::-1]  # (D, L)
    u = run.get("conv.bx", i)  # (T, D)
    if centred:
        return run.rnd(ops.centred_conv1d(u, kernel, w.conv_bias))
    P = p.conv_restart if p.conv_restart is not None and 0 < p.conv_restart < u.shape[0] else 0
    parts = [run.ops.causal_conv1d(part, kernel, w.conv_bias)[0] for part in (u[:P], u[P:]) if part.shape[0]]
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
    return run.ops.rope_frequencies(c.head_dim, theta, None if full else c.rotated_pairs(kind), value.dtype)


def _rope(run: _Run, i: int, x: np.ndarray) -> np.ndarray:
    """The port's RoPE of ``x`` (T, n, hd) in attention layer ``i``: the pass's tables of the layer's type,
    applied as the layer applies them, to split halves or (``interleaved``) to adjacent pairs."""
    kind = run.c.layer_types[i]
    cos, sin = run.get(f"model.rotary_emb.{kind}.cos"), run.get(f"model.rotary_emb.{kind}.sin")
    wide = run.c.rope_in_float32
    if run.port.rope_pairs == "split-half":
        return run.ops.apply_rope(x, cos, sin, run.rnd, wide)
    hd = x.shape[-1]
    perm = np.concatenate([np.arange(0, hd, 2), np.arange(1, hd, 2)])  # pairs (2i, 2i+1) -> (i, i + hd/2)
    out = np.empty_like(x)
    out[..., perm] = run.ops.apply_rope(x[..., perm], cos, sin, run.rnd, wide)
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
    return run.ops.rms_norm(_rope(run, i, raw), w.q_norm if which == "q" else w.k_norm, run.c.norm_eps, run.rnd)


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


@_on("self_attn.q_input", "self_attn.k_cache", "self_attn.v_cache",
     reads=("self_attn.q_rope", "self_attn.k_rope", "self_attn.v_proj"))
def _kv_type(run: _Run, i: int, name: str, value: np.ndarray) -> np.ndarray | None:
    """The query, keys and values in another KV cache type."""
    if run.port.kv_cache is None:
        return None
    raw = {"q_input": "q_rope", "k_cache": "k_rope", "v_cache": "v_proj"}[name.rsplit(".", 1)[1]]
    return run.ops.variant(kv=run.port.kv_cache).kv(run.get(f"self_attn.{raw}", i))


@_on("self_attn.attention", "self_attn.attn_out", reads=("self_attn.q_rope", "self_attn.k_rope", "self_attn.v_proj"))
def _attention(run: _Run, i: int, name: str, value: np.ndarray) -> np.ndarray | None:
    """The attention (before LFM3's output gate, which the layer then applies) with another scale, a sliding
    layer seeing every earlier position, or (llama.cpp's arithmetic) another KV cache type."""
    p, c = run.port, run.c
    window = c.window(i)
    before_gate = "self_attn.attention" if c.use_attention_gate else "self_attn.attn_out"
    kv_cache = p.kv_cache if run.ops is not ops else None  # (exact arithmetic has no KV cache type to change)
    if not name.endswith(before_gate) or (p.attention_scale is None and (window is None or p.sliding_window)
                                          and (c.causal or p.attention_both_ways) and kv_cache is None):
        return None
    q, k, v = ("self_attn.q_input", "self_attn.k_cache", "self_attn.v_cache") if run.ops is not ops else \
        ("self_attn.q_rope", "self_attn.k_rope", "self_attn.v_proj")
    q = run.get(q, i)
    if p.attention_scale is not None:
        q = q * q.dtype.type(p.attention_scale / c.head_dim ** -0.5)  # attention() multiplies by hd^-0.5 itself
    window = window if p.sliding_window else None
    if not c.causal or run.pads is not None:  # (bidirectional, or padded rows: the padding out of the keys)
        return ops.attention(q, run.get(k, i), run.get(v, i), window, run.rnd,
                             causal=c.causal or not p.attention_both_ways, keys=None if run.pads is None else ~run.pads)
    kernels = run.ops if kv_cache is None else run.ops.variant(kv=kv_cache)
    return kernels.attention(q, run.get(k, i), run.get(v, i), window, run.rnd)


#: the value each product of a layer multiplies (llama.cpp's arithmetic names it quantised: ``{product}.input``)
_PRODUCT_INPUTS = {"conv.in_proj": "operator_norm", "conv.out_proj": "conv.y", "self_attn.q_proj": "operator_norm",
                   "self_attn.k_proj": "operator_norm", "self_attn.v_proj": "operator_norm",
                   "self_attn.gate": "operator_norm", "self_attn.out_proj": "self_attn.attn_out",
                   "feed_forward.router_logits": "ffn_norm", "feed_forward.w1": "ffn_norm",
                   "feed_forward.w3": "ffn_norm", "feed_forward.w2": "feed_forward.act"}


@_on(*(f"{p}.input" for p in _PRODUCT_INPUTS), "lm_head.input",
     reads=(*set(_PRODUCT_INPUTS.values()), "model.embedding_norm"))
def _float_activations(run: _Run, i: int | None, name: str, value: np.ndarray) -> np.ndarray | None:
    """A product reading its activations unquantised (the experts': :func:`_experts`)."""
    if run.port.activations == "quantised":
        return None
    if i is None:
        return run.get("model.embedding_norm")
    return run.get(_PRODUCT_INPUTS[name.split(".", 3)[3][:-len(".input")]], i)


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
    return run.ops.gated_silu(run.get("feed_forward.w3", i), run.get("feed_forward.w1", i), run.rnd)


@_on("feed_forward.output", reads=("ffn_norm", "feed_forward.selected_experts", "feed_forward.routing_weights"))
def _experts(run: _Run, i: int, name: str, value: np.ndarray) -> np.ndarray | None:
    """The experts with w1 and w3 exchanged, or (llama.cpp's arithmetic) reading their activations unquantised."""
    unquantised = run.port.activations == "float" and run.ops is not ops
    if (run.port.swiglu_silu_on == "w1" and not unquantised) or not run.c.is_moe_layer(i):
        return None
    moe = run.model.layer_weights(i).ffn

    def swapped(e: int) -> SwiGLUWeights:
        w = moe.expert(e)
        if run.port.swiglu_silu_on == "w1" or (run.port.experts is not None and e not in run.port.experts):
            return w
        return SwiGLUWeights(w.w3, w.w1, w.w2)  # silu(w3 x) * (w1 x): w1 and w3 exchanged

    return mixture(run.get("ffn_norm", i), run.get("feed_forward.selected_experts", i),
                   run.get("feed_forward.routing_weights", i), swapped, run.rnd,
                   run.ops.variant(quantised=False) if unquantised else run.ops)


# ----------------------------------------------------------------------------------------- LFM2-VL
@_on(TOWER + "encoder.attention_mask")
def _no_padding_mask(run: _Run, layer: int | None, name: str, value: np.ndarray) -> np.ndarray | None:
    return None if run.port.vision_mask else np.ones_like(value)  # padding patches seen as keys


@_on(TOWER + "embeddings.position_embedding")
def _position_resize(run: _Run, layer: int | None, name: str, value: np.ndarray) -> np.ndarray | None:
    """The learned grid resized to each image with another kernel (the images' patch rows and columns)."""
    if run.port.position_resize == "bilinear-antialias":
        return None
    kernel, _, antialias = run.port.position_resize.partition("-")
    v, (N, P, Dv) = run.c.vision, value.shape
    grid = run.model.vision_views()[0].position_embedding.reshape(v.grid, v.grid, Dv)
    return run.rnd(np.stack([resize_positions(grid, int(h), int(w), P, kernel, bool(antialias))
                             for h, w in run.images.shapes]))


@_on(PROJECTOR + "pixel_unshuffle", PROJECTOR + "layer_norm", reads=(PROJECTOR + "pixel_unshuffle",))
def _projector_norm(run: _Run, layer: int | None, name: str, value: np.ndarray) -> np.ndarray | None:
    """The LayerNorm against the config: skipped where configured (its output is its input), or applied with unit
    weight and zero bias (a checkpoint without it has no weights for it) where not."""
    configured = run.c.vision.projector_use_layernorm
    if run.port.projector_layernorm or name.endswith("layer_norm") != configured:
        return None
    if configured:
        return run.get(PROJECTOR + "pixel_unshuffle")
    width = value.shape[-1]
    return ops.layer_norm(value, np.ones(width, value.dtype), np.zeros(width, value.dtype), 1e-5, run.rnd)


@_on(PLACED, reads=("model.embed_tokens", PROJECTOR + "linear_2"))
def _prepended(run: _Run, layer: int | None, name: str, value: np.ndarray) -> np.ndarray | None:
    """The image features first, then the text's embeddings without the placeholders (the same length)."""
    if run.port.image_placement == "placed":
        return None
    text = run.get("model.embed_tokens")[run.ids != run.c.vision.image_token_id]
    return np.concatenate([run.get(PROJECTOR + "linear_2"), text])[:value.shape[0]]


@_on("head.pooled", reads=("model.embedding_norm",))
def _pooling(run: _Run, layer: int | None, name: str, value: np.ndarray) -> np.ndarray | None:
    if run.port.pooling is None:
        return None
    real = None if run.pads is None else ~run.pads
    return run.rnd(ops.pool(run.get("model.embedding_norm"), run.port.pooling, real))
