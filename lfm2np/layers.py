"""The decoder layer and its blocks, as pure functions over explicit weights: the one place that rounds and names.

A decoder layer of LFM2, LFM2-MoE and LFM3 (:func:`decoder_layer`)::

    h = h + post_operator_norm(mixer(operator_norm(h)))   # gated short conv or GQA attention, by layer type
    h = h + post_ffn_norm(ffn(ffn_norm(h)))               # SwiGLU, or router + experts on MoE layers

where the post norms are LFM3's "sandwich" norms (absent in LFM2: the identity). The blocks: the gated short
conv (:func:`short_conv`), attention (:func:`attention_block`: projections, QK-norm, RoPE, causal GQA, LFM3's
sliding window and per-head output gate), SwiGLU (:func:`swiglu`) and the MoE (:func:`moe_block`: the sigmoid
top-k router :func:`route`, then :func:`mixture`). The RoPE tables of each attention layer type come from :func:`rope`.

Each block reads one layer's weights from a view (:class:`LayerWeights`, built by
:meth:`lfm2np.Model.layer_weights` from the names in :mod:`lfm2np.schema`), so nothing here builds a tensor
name. The formulas are :mod:`lfm2np.ops`. A :class:`Scope` says what happens to each value a block computes:
``s.rnd`` rounds it where a backend stores it (the numerics mode's rounding: the identity but in the bf16
emulation) and ``s(name, value)`` names it for the trace (:func:`lfm2np.schema.trace_names` lists every name;
a recorder may replace the value, and the pass goes on with what it returns). ``s.ops`` are the operators the
blocks compute with (:mod:`lfm2np.ops`; llama.cpp's CPU arithmetic has its own, :mod:`lfm2np.ggml_ops`), and
``s.linear`` is every product with a weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from . import ops
from .config import Config
from .errors import Lfm2npError
from .ops import Rounding

#: ``tap(name, value) -> value``: sees a named value and returns what the computation goes on with.
Tap = Callable[[str, np.ndarray], np.ndarray]


class Scope:
    """What a pass does with the values it computes: ``rnd`` rounds as the numerics mode stores them, and
    ``scope(name, value)`` names one (``prefix + name``) for ``tap``, returning the value the pass goes on with.
    Without a tap nothing is named, at no cost (:attr:`quiet`). ``ops``: the operators (:mod:`lfm2np.ops`, or a
    numerics mode's); ``experts``: the products are a MoE layer's experts'."""

    __slots__ = ("rnd", "tap", "prefix", "quiet", "ops", "experts")

    def __init__(self, rnd: Rounding = ops.exact, tap: Tap | None = None, prefix: str = "", kernels: Any = None,
                 experts: bool = False):
        self.rnd, self.tap, self.prefix, self.quiet = rnd, tap, prefix, tap is None
        self.ops, self.experts = ops if kernels is None else kernels, experts

    def __call__(self, name: str, value: np.ndarray) -> np.ndarray:
        return value if self.tap is None else self.tap(self.prefix + name, value)

    def at(self, prefix: str) -> "Scope":
        """The scope of a block: its names below ``prefix``."""
        return self if self.tap is None else Scope(self.rnd, self.tap, self.prefix + prefix, self.ops, self.experts)

    def linear(self, name: str, x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
        """``x W^T + b``, the product called ``name``, as the operators compute it (llama.cpp's CPU arithmetic
        converts ``x`` to W's dot-product type first and names it ``{name}.input``)."""
        return ops.linear(x, w, b) if self.ops is ops else self.ops.linear(self, name, x, w, b)

    def kv(self, name: str, x: np.ndarray) -> np.ndarray:
        """``x`` as the attention reads it: itself, or (llama.cpp's CPU arithmetic) in the KV cache's type,
        named ``name``."""
        return x if self.ops is ops else self(name, self.ops.kv(x))


#: exact arithmetic, nothing named: the default of every block called on its own
QUIET = Scope()


# ------------------------------------------------------------------------------------- weight views
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
    ``attention_bias``, the projections' biases."""

    q_proj: np.ndarray
    k_proj: np.ndarray
    v_proj: np.ndarray
    out_proj: np.ndarray
    q_norm: np.ndarray
    k_norm: np.ndarray
    gate_proj: np.ndarray | None = None
    q_bias: np.ndarray | None = None
    k_bias: np.ndarray | None = None
    v_bias: np.ndarray | None = None
    out_bias: np.ndarray | None = None


@dataclass(frozen=True)
class SwiGLUWeights:
    """A SwiGLU FFN: ``w1`` (gate) and ``w3`` (up) ``(F, D)``, ``w2`` (down) ``(D, F)``."""

    w1: np.ndarray
    w3: np.ndarray
    w2: np.ndarray


@dataclass(frozen=True)
class MoEWeights:
    """A mixture of experts: the router ``gate (E, D)``, the selection-only ``expert_bias (E,)`` (or None),
    and ``expert(e)`` giving expert e's :class:`SwiGLUWeights` (or a view read alike: ``w1``, ``w3``, ``w2``)
    when it is first chosen; ``prefetch``, when given, is told which experts were chosen, in the order the
    products need them, before the first is asked for (a hint for reading and converting ahead, no numbers)."""

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


@dataclass(frozen=True)
class Bidirectional:
    """What a bidirectional layer sees in place of a past: the whole sequence, both ways. ``pads`` (T,) bool marks
    the padding of a padded batch's row (None: none): left out of attention's keys, and zeroed before the centred
    conv when ``zero_pads`` (the checkpoint's conv_zero_padding, or ``embed``'s padding-invariant batches)."""

    pads: np.ndarray | None = None
    zero_pads: bool = False


RopeTables = tuple[np.ndarray, np.ndarray]  # (cos, sin), each (T, hd)
#: a conv history (n, D), or (keys, values), or a bidirectional layer's view of its whole sequence
Past = "np.ndarray | tuple[np.ndarray, np.ndarray] | Bidirectional | None"


# ------------------------------------------------------------------------------------------ the layer
def decoder_layer(h: np.ndarray, w: LayerWeights, c: Config, rope: RopeTables | None = None, past: Past = None,
                  window: int | None = None, s: Scope = QUIET) -> tuple[np.ndarray, Past]:
    """One decoder layer (the module docstring).  (T, D) -> (T, D), and the layer's state for the next call.

    ``rope``: the (cos, sin) tables of the T new positions for this layer's attention type; ``past``: what the
    previous call returned for this layer (None at the start of a sequence), the conv inputs so far or the K and
    V cache, or for a bidirectional layer (``c.causal`` false) a :class:`Bidirectional` view (then the layer
    returns None: it keeps no state); ``window``: the sliding window of a sliding attention layer."""
    rnd, o = s.rnd, s.ops
    x = s("operator_norm", o.rms_norm(h, w.operator_norm, c.norm_eps, rnd))
    if isinstance(w.mixer, AttentionWeights):
        y, past = attention_block(x, w.mixer, rope, past, window, c.norm_eps, c.rope_in_float32,
                                  s.at("self_attn."))
    else:
        y, past = short_conv(x, w.mixer, past, s.at("conv."))
    if w.post_operator_norm is not None:
        y = s("post_operator_norm", o.rms_norm(y, w.post_operator_norm, c.norm_eps, rnd))
    h = s("mixer_residual", rnd(h + y))
    x = s("ffn_norm", o.rms_norm(h, w.ffn_norm, c.norm_eps, rnd))
    if isinstance(w.ffn, MoEWeights):
        y = moe_block(x, w.ffn, c, s.at("feed_forward."))
    else:
        y = swiglu(x, w.ffn, s.at("feed_forward."))
    y = s("feed_forward.output", y)
    if w.post_ffn_norm is not None:
        y = s("post_ffn_norm", o.rms_norm(y, w.post_ffn_norm, c.norm_eps, rnd))
    return rnd(h + y), past


# ------------------------------------------------------------------------------------------ the mixers
def short_conv(x: np.ndarray, w: ConvWeights, past: np.ndarray | Bidirectional | None = None,
               s: Scope = QUIET) -> tuple[np.ndarray, np.ndarray | None]:
    """The gated short convolution: ``b, c, x = split(in_proj(x), 3)``; ``u = b * x``; ``z = causal_conv1d(u)``;
    ``out = out_proj(c * z)``. No activation, no norm. ``past`` holds earlier values of u
    (:func:`lfm2np.ops.causal_conv1d`), or (a :class:`Bidirectional` layer) the conv is centred
    (:func:`lfm2np.ops.centred_conv1d`), u zeroed at the padding first when asked, and no history is kept.
    Names: in_proj, b_gate, c_gate, x, bx, conv_out, y, out_proj.
    (T, D), (n, D) -> (T, D), and the history of u extended by this chunk (n + T, D)"""
    rnd = s.rnd
    bcx = s("in_proj", rnd(s.linear("in_proj", x, w.in_proj, w.in_proj_bias)))  # (T, 3D)
    b, c, x = (s(name, part) for name, part in zip(("b_gate", "c_gate", "x"), np.split(bcx, 3, axis=-1)))
    u = rnd(b * x)  # (T, D)
    if isinstance(past, Bidirectional):
        if past.zero_pads and past.pads is not None:
            u = np.where(past.pads[:, None], u.dtype.type(0), u)
        u = s("bx", u)
        z, history = ops.centred_conv1d(u, w.conv[:, 0, :], w.conv_bias), None
    else:
        u = s("bx", u)
        z, history = s.ops.causal_conv1d(u, w.conv[:, 0, :], w.conv_bias, past)
    z = s("conv_out", rnd(z))
    y = s("y", rnd(c * z))
    return s("out_proj", rnd(s.linear("out_proj", y, w.out_proj, w.out_proj_bias))), history


def attention_block(x: np.ndarray, w: AttentionWeights, rope: RopeTables,
                    past: tuple[np.ndarray, np.ndarray] | Bidirectional | None = None, window: int | None = None,
                    eps: float = 1e-5, wide_rope: bool = False,
                    s: Scope = QUIET) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """Attention: q, k, v projections; per-head RMSNorm of q and k (``eps``); RoPE (``wide_rope``: in float32,
    :func:`lfm2np.ops.apply_rope`); causal GQA (with a sliding ``window``: the last W positions only); LFM3's
    output gate ``sigmoid(gate_proj x)`` per head; the output projection. ``past`` is the (K, V) cache of earlier
    positions (already normed and rotated), at least the last W - 1 of a sliding layer, or (a
    :class:`Bidirectional` layer) attention is not causal and the padding is left out of the keys. Names: q_proj,
    k_proj, v_proj, q_normed, k_normed, q_rope, k_rope, (attention, gate,) attn_out, out_proj.
    (T, D) -> (T, D), and ((S, G, hd), (S, G, hd)) with the new positions (None when bidirectional)"""
    T, hd, rnd, o = x.shape[0], w.q_norm.shape[0], s.rnd, s.ops
    q = s("q_proj", rnd(s.linear("q_proj", x, w.q_proj, w.q_bias)).reshape(T, -1, hd))  # (T, H, hd)
    k = s("k_proj", rnd(s.linear("k_proj", x, w.k_proj, w.k_bias)).reshape(T, -1, hd))  # (T, G, hd)
    v = s("v_proj", rnd(s.linear("v_proj", x, w.v_proj, w.v_bias)).reshape(T, -1, hd))  # (T, G, hd)
    q = s("q_normed", o.rms_norm(q, w.q_norm, eps, rnd))
    k = s("k_normed", o.rms_norm(k, w.k_norm, eps, rnd))
    cos, sin = rope
    q = s("q_rope", o.apply_rope(q, cos, sin, rnd, wide_rope))
    k = s("k_rope", o.apply_rope(k, cos, sin, rnd, wide_rope))
    q, k, v = s.kv("q_input", q), s.kv("k_cache", k), s.kv("v_cache", v)  # (llama.cpp: in the KV cache's type)
    if isinstance(past, Bidirectional):
        attn = ops.attention(q, k, v, None, rnd, causal=False, keys=None if past.pads is None else ~past.pads)
        k = v = None
    else:
        if past is not None:
            k = np.concatenate([past[0], k], axis=0)  # (S, G, hd)
            v = np.concatenate([past[1], v], axis=0)
        attn = o.attention(q, k, v, window, rnd)  # (T, H*hd)
    if w.gate_proj is not None:  # LFM3's output gate
        attn = s("attention", attn)
        gate = s("gate", rnd(o.sigmoid(rnd(s.linear("gate", x, w.gate_proj)))))  # (T, H)
        attn = o.output_gate(attn, gate, rnd)
    attn = s("attn_out", attn)
    return s("out_proj", rnd(s.linear("out_proj", attn, w.out_proj, w.out_bias))), None if k is None else (k, v)


def lm_head(h: np.ndarray, head: np.ndarray, s: Scope, out: np.ndarray | None = None) -> np.ndarray:
    """The logits of the final hidden states: :func:`lfm2np.ops.lm_head`, or the mode's product (which names
    ``lm_head.input``). (T, D) -> (T, V), into ``out`` when given"""
    if s.ops is ops:
        return ops.lm_head(h, head, s.rnd, out)
    logits = s.linear("lm_head", h, head)
    if out is None:
        return logits
    out[...] = logits
    return out


def rope(positions: np.ndarray, c: Config, kind: str, dtype: np.dtype = np.float32, s: Scope = QUIET) -> RopeTables:
    """The RoPE (cos, sin) tables of ``positions`` for attention layers of type ``kind``: the inverse
    frequencies of the type's base and rotated pairs (:func:`lfm2np.ops.rope_frequencies`), angles in ``dtype``
    (float32; float64 in the oracle mode), cos and sin rounded as the mode stores them, unless the config keeps
    RoPE in float32 (LFM3). Names (below ``model.rotary_emb.{kind}.``): inv_freq, cos, sin.
    (T,) -> (T, hd) x 2"""
    s = s.at(f"model.rotary_emb.{kind}.")
    inv_freq = s("inv_freq", s.ops.rope_frequencies(c.head_dim, c.rope(kind).theta, c.rotated_pairs(kind), dtype))
    cos, sin = s.ops.rope_cos_sin(positions, inv_freq)
    if not c.rope_in_float32:
        cos, sin = s.rnd(cos), s.rnd(sin)
    return s("cos", cos), s("sin", sin)


# ---------------------------------------------------------------------------------------- embeddings
def embedding_head(h: np.ndarray, dense: np.ndarray | None, dense_bias: np.ndarray | None, how: str,
                   real: np.ndarray | None = None, per_token: bool = False, s: Scope = QUIET) -> np.ndarray:
    """The sentence-transformers head over the final hidden states (``embedding_norm``'s output). Pooled: the real
    tokens pooled (:func:`lfm2np.ops.pool`, ``how``), the ``dense`` projection when the checkpoint has one, then L2
    normalisation (Pooling, Dense, Normalize). Per token (ColBERT's vectors): the dense projection of every token,
    then L2 normalisation. ``real`` (T,) marks the real tokens of a padded row. Names (below ``head.``): pooled,
    dense, embedding; per token: dense_tokens, token_embeddings.  (T, D) -> (E,), or per token (T, E)"""
    rnd, s = s.rnd, s.at("head.")
    if per_token:
        t = h if dense is None else s("dense_tokens", rnd(ops.linear(h, dense, dense_bias)))  # (T, E)
        return s("token_embeddings", rnd(ops.l2_normalize(t)))
    p = s("pooled", rnd(ops.pool(h, how, real)))  # (D,)
    if dense is not None:
        p = s("dense", rnd(ops.linear(p[None], dense, dense_bias)[0]))  # (E,)
    return s("embedding", rnd(ops.l2_normalize(p)))


# ---------------------------------------------------------------------------------------------- FFNs
def swiglu(x: np.ndarray, w: SwiGLUWeights, s: Scope = QUIET) -> np.ndarray:
    """``w2(silu(w1 x) * w3 x)``; w1 = gate, w3 = up, w2 = down. Names: w1, w3, act, w2.
    (T, D) -> (T, D)"""
    rnd = s.rnd
    gate = s("w1", rnd(s.linear("w1", x, w.w1)))  # (T, F)
    up = s("w3", rnd(s.linear("w3", x, w.w3)))  # (T, F)
    act = s("act", s.ops.gated_silu(gate, up, rnd, out=gate if s.quiet else None))  # (gate's buffer: nobody holds it)
    return s("w2", rnd(s.linear("w2", act, w.w2)))


def moe_block(x: np.ndarray, w: MoEWeights, c: Config, s: Scope = QUIET) -> np.ndarray:
    """The LFM2-MoE FFN: the router (:func:`route`) chooses k experts per token and their weights, then
    :func:`mixture` runs them.  (T, D) -> (T, D)"""
    logits, experts, weights = route(x, w.gate, w.expert_bias, c.num_experts_per_tok, c.norm_topk_prob,
                                     c.routed_scaling_factor, s)
    if not np.isfinite(logits).all() or (w.expert_bias is not None and not np.isfinite(w.expert_bias).all()):
        return np.full_like(x, np.nan)  # a non-finite router would only steer the choice: make it show
    if w.prefetch is not None:
        w.prefetch(np.unique(experts))
    return mixture(x, experts, weights, w.expert, s.rnd, s.ops)


def route(x: np.ndarray, gate: np.ndarray, expert_bias: np.ndarray | None, k: int, norm_topk_prob: bool,
          routed_scaling_factor: float, s: Scope = QUIET) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The sigmoid top-k router: ``logits = gate x``; ``scores = sigmoid(logits)``; the k experts chosen on
    ``scores + expert_bias`` (the bias steers the choice only; it is float32, so a bf16 backend chooses in
    float32); their weights are the unbiased scores, renormalised when ``norm_topk_prob``
    (:func:`lfm2np.ops.normalise_weights`), times ``routed_scaling_factor``. Names: router_logits, router_scores,
    (biased_scores,) selected_experts, topk_scores, (topk_normed,) routing_weights.
    (T, D), (E, D), (E,) -> logits (T, E), experts (T, k) int64, weights (T, k)"""
    rnd = s.rnd
    logits = s("router_logits", rnd(s.linear("router_logits", x, gate)))  # (T, E)
    scores = s("router_scores", rnd(s.ops.sigmoid(logits)))  # (T, E)
    choice = scores if expert_bias is None else s("biased_scores", scores + expert_bias)  # (T, E), float32
    experts = s("selected_experts", s.ops.top_k_experts(choice, k))  # (T, k)
    if not s.quiet:  # a recorder may have replaced them
        _check_experts(experts, scores.shape[-1], s.prefix + "selected_experts")
    weights = s("topk_scores", np.take_along_axis(scores, experts, axis=-1))  # (T, k)
    if norm_topk_prob:
        weights = s("topk_normed", s.ops.normalise_weights(weights, rnd))
    return logits, experts, s("routing_weights", rnd(weights * weights.dtype.type(routed_scaling_factor)))


def _check_experts(experts: np.ndarray, E: int, name: str) -> None:
    """Chosen experts given by a recorder must be experts, ``0 <= e < E`` (past E would fail deep in the mixture,
    a negative one silently pick an expert from the end)."""
    bad = experts[(experts < 0) | (experts >= E)]
    if bad.size:
        raise Lfm2npError(f"the replacement for {name} holds expert {int(bad.flat[0])}; the layer has experts "
                          f"0..{E - 1}")


def mixture(x: np.ndarray, experts: np.ndarray, weights: np.ndarray, expert: Callable[[int], SwiGLUWeights],
            rnd: Rounding = ops.exact, kernels: Any = None) -> np.ndarray:
    """``out_t = sum_j weights[t, j] * swiglu_{experts[t, j]}(x_t)``, a mixture of SwiGLU experts.

    Tokens are grouped by expert: each chosen expert runs once on all the tokens that chose it, in increasing
    expert order (the order in which a bf16 backend adds the contributions up; operators whose
    ``MIXTURE_ORDER`` is "slot", llama.cpp's, add them in each token's top-k order instead); ``expert(e)`` gives
    expert e's weights; ``kernels``: the operators the experts compute with (:mod:`lfm2np.ops` by default).
    (T, D), (T, k) int, (T, k) -> (T, D)
    """
    T, k = experts.shape
    flat_experts = experts.ravel()  # (T*k,)
    flat_tokens = np.repeat(np.arange(T), k)  # (T*k,)
    flat_weights = weights.ravel()  # (T*k,)
    order = np.argsort(flat_experts, kind="stable")
    bounds = np.searchsorted(flat_experts[order], np.arange(flat_experts.max(initial=-1) + 2))
    quiet = Scope(rnd, kernels=kernels, experts=True)  # (the experts' values are not named)
    by_slot = quiet.ops.MIXTURE_ORDER == "slot"
    out = np.zeros((T, k) + x.shape[1:], x.dtype) if by_slot else np.zeros_like(x)  # (T, k, D): each slot's share
    for e in range(len(bounds) - 1):
        picks = order[bounds[e]:bounds[e + 1]]
        if picks.size == 0:
            continue
        tokens = flat_tokens[picks]  # each token at most once per expert: no duplicate rows
        y = swiglu(x[tokens], expert(e), quiet)
        if by_slot:
            out[tokens, picks % k] = rnd(y * flat_weights[picks, None])
        else:
            out[tokens] = rnd(out[tokens] + rnd(y * flat_weights[picks, None]))
    if by_slot:  # ((slot 0 + slot 1) + slot 2) + ...
        total = out[:, 0]
        for j in range(1, k):
            total = rnd(total + out[:, j])
        return total
    return out
