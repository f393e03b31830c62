"""The catalogue of porting mistakes, each a small named variant plugged into the one forward pass.

A :class:`Mistake` is a documented, named setting of some switches of :class:`~lfm2np.oracle.port.Port`,
the policy that says how a port computes each operator (router-softmax is
``Port(router_scores="softmax")``), applied through the record protocol by
:func:`~lfm2np.oracle.port.run`: no second copy of the forward pass exists.

Ports compose: several mistakes are one ``Port`` with all their switches (:func:`port_of`), e.g. the three
router slips of ml-explore/mlx-lm#1883 at once; two mistakes that set the same switch differently cannot
be combined. Adding a mistake is: a switch on ``Port`` with its handler (:mod:`lfm2np.oracle.port`), and an
entry in :data:`CATALOGUE` whose ``applies`` names the configs it concerns.

The router entries concern LFM2-MoE; the conv, RoPE, QK-norm, attention-scale, SwiGLU and final-norm entries
every model type with such a layer, LFM3 included (the handlers recompute RoPE with the tables of the
layer's type and attention with its window and output gate); the ``lfm3-*`` entries LFM3's own operators
(output gate, sandwich norms, proportional RoPE, sliding window); the ``bidir-*`` entries the bidirectional
LFM2 (the causal mask, the conv's window, the padding, the pooling: seen in an embeddings dump).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ..config import Config
from ..errors import Lfm2npError
from ..schema import attention_kinds
from .port import REFERENCE, Port, embed, merge, run

__all__ = ["BY_ID", "CATALOGUE", "Mistake", "PLAUSIBLE_THETAS", "Port", "REFERENCE", "embed", "merge", "mistake",
           "port_of", "run"]

# ----------------------------------------------------------------------------------- catalogue
Variant = tuple[str, dict[str, Any]]  # (label, Port switches)


@dataclass(frozen=True)
class Mistake:
    """A named porting mistake: what it is, who shipped it, what it looks like in a trace, the configs it
    concerns (``applies``; ``requires`` says which in words) and its variants (``variants(config, prefill)``:
    ``(label, Port switches)`` pairs; ``prefill`` is the position where a backend's second call began, when
    known). ``ambiguous``: trace names (globs below ``model.layers.{i}.``, or top-level names) whose value a
    backend with this mistake may dump under another meaning; they are not used to judge this hypothesis."""

    id: str
    description: str
    shipped_by: str
    in_a_trace: str
    requires: str
    applies: Callable[[Config], bool]
    variants: Callable[[Config, "int | None"], list[Variant]]
    ambiguous: tuple[str, ...] = field(default=())
    localisable: bool = True  # whether it can be made in one layer only (not: the RoPE base, the final norm)
    modes: tuple[str, ...] | None = None  # the numerics modes of the reference it concerns (None: every one)

    def concerns(self, model: Any) -> bool:
        """Whether the mistake can be made against ``model``: its config and its numerics mode."""
        return self.applies(model.config) and (self.modes is None or model.numerics.name in self.modes)


#: Plausible wrong RoPE bases: the original RoPE / Llama 2 default, Llama 3's, and LFM2's own 1e6 (wrong on a
#: model with another base).
PLAUSIBLE_THETAS = (1e4, 5e5, 1e6)


def _moe(c: Config) -> bool:
    return bool(c.moe_layers)


def _partial(c: Config) -> bool:
    """Whether some attention layer type of ``c`` turns only part of its pairs (LFM3's proportional RoPE)."""
    return any(c.rotated_pairs(k) is not None for k in attention_kinds(c))


def _any(c: Config) -> bool:
    return True


def _has_conv(c: Config) -> bool:
    return bool(c.conv_layers)


def _has_head(c: Config) -> bool:
    """A model with an embedding head: a bidirectional one, or one whose checkpoint declares a head."""
    return not c.causal or c.pooling is not None or bool(c.dense_out)


def _poolings(c: Config, prefill: int | None) -> list[Variant]:
    own = c.pooling or "mean"
    return [(f"{how} instead of {own}", {"pooling": how}) for how in ("cls", "mean", "last") if how != own]


def _pad_zeroing(c: Config, prefill: int | None) -> list[Variant]:
    return [("pads zeroed" if not c.conv_zero_padding else "pads not zeroed",
             {"conv_zero_padding": not c.conv_zero_padding})]


def _has_attention(c: Config) -> bool:
    return bool(c.attention_layers)


def _vl(c: Config) -> bool:
    return c.is_vision_language


def _fixed(label: str, **switches: Any) -> Callable[[Config, "int | None"], list[Variant]]:
    return lambda c, prefill: [(label, switches)]


def _thetas(c: Config, prefill: int | None) -> list[Variant]:
    """One base for every attention layer: the plausible ones, and on LFM3 each layer type's own base (a
    backend that reads one theta for all types: the full layers' on the sliding ones, or the other way);
    those that change the base of some layer."""
    own = [c.rope(k).theta for k in attention_kinds(c)]
    candidates = dict.fromkeys([*PLAUSIBLE_THETAS, *own])
    return [(f"theta {t:g}", {"rope_theta": t}) for t in candidates if any(t != o for o in own)]


def _scales(c: Config, prefill: int | None) -> list[Variant]:
    return [("no scale (1)", {"attention_scale": 1.0}),
            (f"1/hd = {1 / c.head_dim:g}", {"attention_scale": 1.0 / c.head_dim}),
            (f"1/sqrt(D) = {c.hidden_size ** -0.5:g}", {"attention_scale": c.hidden_size ** -0.5})]


def _restart(c: Config, prefill: int | None) -> list[Variant]:
    return [] if not prefill else [(f"restart at position {prefill}", {"conv_restart": int(prefill)})]


_MLX = "mlx-lm's lfm2_moe.py until ml-explore/mlx-lm#1354, reported as ml-explore/mlx-lm#1883; mlx-swift-lm " \
       "until ml-explore/mlx-swift-lm#332"
CATALOGUE: tuple[Mistake, ...] = (
    Mistake("router-softmax", "router scores are softmax over the experts instead of a sigmoid per expert",
            _MLX, "router_logits agree; routing_weights differ in every MoE layer, and selected_experts where "
            "the expert bias reorders the top-k", "a MoE model",
            _moe, _fixed("softmax", router_scores="softmax")),
    Mistake("router-bias-in-weights", "the expert bias, meant for choosing the top-k only, also added to the "
            "weights the chosen experts are mixed with", _MLX,
            "selected_experts agree; routing_weights differ (by the bias before renormalisation)",
            "a MoE model with use_expert_bias", lambda c: _moe(c) and c.use_expert_bias,
            _fixed("bias in weights", router_bias_in_weights=True)),
    Mistake("router-no-scaling", "routed_scaling_factor never applied to the routing weights",
            _MLX + " (invisible on released checkpoints, whose factor is 1.0)",
            "selected_experts agree; routing_weights off by exactly the factor",
            "a MoE model with routed_scaling_factor != 1",
            lambda c: _moe(c) and c.routed_scaling_factor != 1,
            _fixed("no scaling", router_scaling=False)),
    Mistake("router-no-renorm", "the top-k weights not renormalised to sum to 1 although norm_topk_prob is set",
            "no public LFM2 report; the norm_topk_prob default differs between MoE families (Qwen2-MoE: false)",
            "selected_experts agree; routing_weights are the raw sigmoid scores (times the factor)",
            "a MoE model with norm_topk_prob", lambda c: _moe(c) and c.norm_topk_prob,
            _fixed("no renormalisation", router_renorm=False)),
    Mistake("conv-taps-reversed", "the conv kernel applied back to front: the first tap on the current token",
            "no public report; the GGUF shortconv.conv is [L, D] in ggml order, and reading it the other way, or "
            "flipping it for a 'true' convolution, reverses the taps", "bx agrees; conv_out of the first conv "
            "layer differs at every position", "a conv layer", _has_conv,
            _fixed("reversed", conv_taps="reversed")),
    Mistake("conv-gates-swapped", "the B and C gates exchanged: u = C*x before the conv, y = B*z after it",
            "no public report; B and C collide with batch/channel names (LFM2-FACTS)", "in_proj agrees (or is "
            "permuted, if the weights were); bx differs in the first conv layer; without conv biases its y "
            "agrees at position 0 (y = b c w x there)", "a conv layer",
            _has_conv, _fixed("c before b", conv_gates="c,b"),
            ambiguous=("conv.in_proj", "conv.b_gate", "conv.c_gate")),
    Mistake("conv-state-dropped", "a second call (decode after a prefill, or a second prefill) starts its conv "
            "window from zeros instead of the first call's last L-1 values of b*x; attention keeps its KV "
            "cache, and the window is kept from then on", "transformers#42017 (a second prefill on an existing "
            "cache: a follow-up question); LFM2-FACTS lists the family (vmlx-swift#210, llama.cpp#14670, ...)",
            "everything agrees before the second call's first position P; at P the first conv layer's conv_out "
            "differs while its bx agrees", "a causal conv layer, and a known second-call position",
            lambda c: _has_conv(c) and c.causal, _restart),
    Mistake("rope-interleaved", "RoPE rotates adjacent pairs (2i, 2i+1), GPT-J style, instead of split halves "
            "(i, i + hd/2), NeoX style", "no public LFM2 report; one flag away in every library (llama.cpp "
            "rope type NORM vs NEOX, mlx nn.RoPE(traditional=True))", "q_normed agrees; q_rope and k_rope differ "
            "from position 1 on (position 0 is not rotated)", "an attention layer",
            _has_attention, _fixed("interleaved", rope_pairs="interleaved")),
    Mistake("rope-theta", "RoPE with a wrong base: another family's default (1e4, 5e5) or LFM2's 1e6 on a model "
            "with another base; on LFM3 one base for every layer type (e.g. the full layers' 1e6 on the sliding "
            "layers too)", "no public LFM2 report; configs spell it theta, rope_theta or "
            "rope_parameters.rope_theta (LFM2-FACTS), and a reader that misses it falls back to a default; LFM3 "
            "keys rope_parameters by layer type (GGUF: rope.freq_base_swa for the sliding layers)",
            "q_rope and k_rope differ from position 1 on, most in the slow (high) pairs", "an attention layer",
            _has_attention, _thetas, localisable=False),
    Mistake("no-qk-norm", "the per-head q_layernorm / k_layernorm (LFM3: q_norm / k_norm) skipped (a Llama-style "
            "attention)",
            "no public LFM2 report; Llama-derived ports have no QK-norm", "q_normed equals q_proj; attn_out "
            "differs from position 1 on", "an attention layer",
            _has_attention, _fixed("none", qk_norm="none")),
    Mistake("qk-norm-after-rope", "the per-head norm applied after RoPE instead of before",
            "no public LFM2 report; the order differs between model families", "q_proj agrees; q_rope/k_rope "
            "differ from position 1 on (the norm weights are not rotation-invariant)", "an attention layer",
            _has_attention, _fixed("after RoPE", qk_norm="after-rope"),
            ambiguous=("self_attn.q_normed", "self_attn.k_normed", "self_attn.q_rope", "self_attn.k_rope")),
    Mistake("embedding-norm-at-start", "model.embedding_norm applied to the embeddings, as its name suggests, and "
            "no norm after the last layer", "no public report; LFM2-FACTS warns that the name misleads",
            "the first layer's operator_norm differs (the norm weights are not all ones); the embeddings "
            "themselves agree unless the dump names the normed ones model.embed_tokens", "any model",
            _any, _fixed("at the start", final_norm="start"),
            ambiguous=("model.embed_tokens", "model.embedding_norm"), localisable=False),
    Mistake("swiglu-gate-up-swapped", "silu applied to the up projection: w2(silu(w3 x) * w1 x); w1 (gate) and "
            "w3 (up) exchanged in a weight-name mapping", "no public LFM2 report; w1/w3/w2 map to "
            "gate/up/down, not in numeric order", "w1 and w3 agree (or appear exchanged, if the weights were); "
            "act differs in the first layer (in the experts' output on MoE layers)", "any model",
            _any, _fixed("silu on w3", swiglu_silu_on="w3"),
            ambiguous=("feed_forward.w1", "feed_forward.w3")),
    Mistake("attention-scale", "attention scores scaled by something else than hd^-0.5: not at all, by 1/hd "
            "(the scale applied twice), or by 1/sqrt(D)", "no public LFM2 report; kernels that take the scale "
            "as an argument and also apply their own", "q_rope and k_rope agree; attn_out differs from "
            "position 1 on (one key: the softmax is 1 whatever the scale)", "an attention layer",
            _has_attention, _scales),
    # ------------------------------------------------------------------------------------ LFM3's own
    Mistake("lfm3-gate-missing", "the per-head output gate not applied: attn_out is the ungated attention, "
            "o_proj(concat_j o_j) instead of o_proj(concat_j sigmoid(gate_proj x)_j * o_j)",
            "no public report; LFM2 attention has no gate, so a port grown from an LFM2 one lacks it (the "
            "llama.cpp of llama-cpp-python 0.3.36 has no lfm3 at all), and transformers renames the "
            "checkpoint's gate_proj to g_proj on load, so a name mapping can miss it",
            "q_rope, k_rope and v_proj agree; attn_out of the first attention layer differs at every position "
            "(its heads not scaled by a sigmoid in (0, 1)); the dump has no self_attn.gate",
            "an LFM3 model with use_attention_gate",
            lambda c: c.use_attention_gate and bool(c.attention_layers),
            _fixed("ungated", output_gate=False)),
    Mistake("lfm3-sandwich-norms-missing", "post_operator_norm and post_ffn_norm skipped: each block's output "
            "joins the residual stream un-normed (LFM2's pre-norm layer)",
            "no public report; LFM2 has no post-norms, so a port grown from an LFM2 one lacks them (the "
            "llama.cpp of llama-cpp-python 0.3.36 has no lfm3)",
            "the first layer's mixer output (conv.out_proj or self_attn.out_proj) agrees, its mixer_residual "
            "differs at every position; the dump has no post_operator_norm / post_ffn_norm",
            "an LFM3 model with use_sandwich_norm", lambda c: c.use_sandwich_norm,
            _fixed("no post-norms", sandwich_norms=False)),
    Mistake("lfm3-rope-full", "the layers with a partial (proportional) RoPE, LFM3's full-attention layers, "
            "rotate every frequency pair instead of the first int(partial_rotary_factor * hd // 2): "
            "inv_freq_i = theta^(-2i/hd) for all i < hd/2",
            "transformers 5.24 itself on configs that label the full-attention RoPE 'default' with "
            "partial_rotary_factor 0.5, as released LFM3 configs are reported to (its 'default' ignores the "
            "factor; NeMo AutoModel's LFM3 config documents this and relabels such entries 'proportional'; see "
            "docs/ops/rope.md); lfm2np.load(..., rope_reading='transformers') computes the same. The family "
            "elsewhere: AI-Hypercomputer/maxtext#4616 (partial_rotary_factor ignored, Qwen3.5)",
            "q_normed and k_normed agree; q_rope and k_rope of the first full-attention layer differ from "
            "position 1 on, only in the dims past the rotated pairs (i and i + hd/2 for i >= rotated), which "
            "turn slowly: by little at short positions when the base is large; sliding layers agree",
            "an LFM3 model with a partial RoPE rotation (partial_rotary_factor < 1)",
            _partial, _fixed("every pair turns", partial_rotation=False), localisable=False),
    Mistake("lfm3-window-ignored", "sliding-window layers attend to every earlier position instead of the last "
            "sliding_window ones",
            "no public LFM3 report; the family: llama.cpp ran Mistral 7B and Gemma 2 without their sliding "
            "windows at first (ggml-org/llama.cpp#3371, #3377), and kernels or KV caches without a window "
            "argument drop it silently",
            "everything agrees before position W (no query has more than W keys to see there); from W on, "
            "attn_out of the first sliding layer differs while its q_rope, k_rope and v_proj agree",
            "an LFM3 model with a sliding-window layer", lambda c: bool(c.sliding_layers),
            _fixed("no window", sliding_window=False)),
    # ------------------------------------------------- llama.cpp's CPU arithmetic (a reference in llamacpp-cpu)
    Mistake("activations-unquantised", "every product multiplies f32 activations by the dequantised weights, "
            "where llama.cpp's CPU backend first quantises the activations to the weight type's dot-product type "
            "(Q8_0 for Q8_0 and Q4_0, Q8_K for the k-quants, f16 for F16): a backend that computes more exactly "
            "than llama.cpp, not a broken kernel", "every backend that dequantises and multiplies in float: "
            "GPU paths through cuBLAS, transformers or lfm2np (float32) on a GGUF, a first port of the ggml "
            "kernels without their vec_dot types", "the operator_norm output agrees; every product after it "
            "differs by the activations' quantisation noise (on a Q8_0 file about 1e-2 of scale, -40 dB), spread "
            "over every element, from the first product on", "a reference in dtype llamacpp-cpu",
            _any, _fixed("f32 activations", activations="float"), modes=("llamacpp-cpu", "llamacpp-cpu-kv-f32")),
    Mistake("kv-cache-f32", "the KV cache kept in f32 where llama.cpp stores it in f16 (its default, "
            "--cache-type-k/v f16): the q.k product reads f32, the attention weights meet f32 values",
            "backends with an f32 cache; llama.cpp run with --cache-type-k f32 --cache-type-v f32; transformers and "
            "lfm2np's float32 mode", "q_rope, k_rope and v_proj agree; attn_out of the first attention layer "
            "differs by f16 rounding (about 1e-4 of scale, -70 dB), and more after the next quantised product",
            "an attention layer and a reference in dtype llamacpp-cpu (f16 KV cache)", _has_attention,
            _fixed("f32 KV cache", kv_cache="f32"), modes=("llamacpp-cpu",)),
    Mistake("kv-cache-f16", "the KV cache stored in f16 where the reference keeps it in f32 (llama.cpp run with "
            "--cache-type-k/v f32, dtype llamacpp-cpu-kv-f32)", "llama.cpp's default cache type against an f32 "
            "reference", "as kv-cache-f32, the other way round", "an attention layer and a reference in dtype "
            "llamacpp-cpu-kv-f32", _has_attention, _fixed("f16 KV cache", kv_cache="f16"),
            modes=("llamacpp-cpu-kv-f32",)),
)
CATALOGUE += (
    # ------------------------------------------------------------------------------------ LFM2-VL's own
    Mistake("vl-padding-mask-dropped", "the vision tower's attention sees every patch slot, the padding after an "
            "image's h*w patches included (no key padding mask)",
            "Blaizzy/mlx-vlm#2266 (with a bicubic position resize: logits 19-86% off, top-1 agreement 40-65%); "
            "LiteRT-LM#3094 (padding not masked)",
            "the embeddings agree; encoder layer 0's attn_out differs on every image with padding slots (a tile "
            "that fills all its patch slots agrees), and so does all that follows",
            "an LFM2-VL model and an image with padding patches", _vl, _fixed("no mask", vision_mask=False)),
    Mistake("vl-position-resize", "the learned position grid resized to each image with another kernel than "
            "transformers' antialiased bilinear: plain bilinear (no antialiasing: differs where an image has fewer "
            "patch rows or columns than the grid's side), or bicubic",
            "ggml-org/llama.cpp#17290 (no antialiasing, fixed by #17577); Blaizzy/mlx-vlm#2266 (bicubic)",
            "patch_embedding agrees; embeddings.position_embedding differs (bilinear without antialiasing: only "
            "for images narrower or shorter than the grid)", "an LFM2-VL model",
            _vl, lambda c, prefill: [("bilinear, no antialiasing", {"position_resize": "bilinear"}),
                                     ("bicubic", {"position_resize": "bicubic"}),
                                     ("bicubic, antialiased", {"position_resize": "bicubic-antialias"})]),
    Mistake("vl-projector-layernorm", "the projector's LayerNorm against the config: skipped although "
            "projector_use_layernorm is true, or applied (unit weight, zero bias) although it is false",
            "no public report; transformers' default is true while LFM2.5-VL configs say false, so a port that "
            "reads the key with the wrong default, or not at all, gets it wrong for one of the families",
            "the vision tower's post_layernorm and pixel_unshuffle agree; the projector's linear_1 differs on "
            "every image token", "an LFM2-VL model", _vl, _fixed("against the config", projector_layernorm=False)),
    Mistake("vl-image-prepended", "image embeddings put before the text instead of at their placeholders (the "
            "placeholders dropped, the sequence keeping its length)", "tenstorrent/tt-metal#45282",
            "the projector's output agrees; model.inputs_embeds differs from the first placeholder's position on "
            "(or from position 0 when the prompt does not start with an image)", "an LFM2-VL model",
            _vl, _fixed("prepended", image_placement="prepended")),
)
# ---------------------------------------------------------------------------- bidirectional LFM2's own
_ENCODERS = ("no public report for LFM2's encoders; the family: a bidirectional checkpoint run by a decoder's "
             "code (LFM2.5-Embedding-350M loaded without its remote code gives the causal model)")
CATALOGUE += (
    Mistake("bidir-causal-mask", "a bidirectional model's attention kept causal: each position sees only the earlier "
            "ones (the causal mask of the decoder the port grew from)", _ENCODERS,
            "the first attention layer's q_rope, k_rope and v_proj agree; its attn_out differs at every position "
            "but the last", "a bidirectional model with an attention layer",
            lambda c: not c.causal and bool(c.attention_layers), _fixed("causal mask", attention_both_ways=False)),
    Mistake("bidir-conv-left-padded", "a bidirectional model's short conv left-padded by L-1 as in the causal model "
            "instead of centred (L//2 on each side): the window ends at the current token instead of centring on it",
            _ENCODERS + "; llama.cpp centres it only when the file says attention.causal = false",
            "the first conv layer's bx agrees; its conv_out differs at every position (the taps see other "
            "neighbours)", "a bidirectional model with a conv layer",
            lambda c: not c.causal and bool(c.conv_layers), _fixed("left-padded", conv_centred=False)),
    Mistake("bidir-as-causal", "a bidirectional checkpoint run as the causal LFM2: the causal mask and the causal "
            "conv window both (its own code not run)", "LFM2.5-Embedding-350M loaded by transformers without "
            "trust_remote_code (reported: AideMemo's evaluation); a port with no bidirectional variant",
            "the first mixer's output differs at every position but the last (a conv: conv_out; attention: "
            "attn_out)", "a bidirectional model", lambda c: not c.causal,
            _fixed("causal model", attention_both_ways=False, conv_centred=False)),
    Mistake("bidir-pad-zeroing", "in a padded batch, the padding zeroed before the centred conv against the "
            "checkpoint's conv_zero_padding, or not zeroed against it (then the pad tokens reach their neighbours)",
            "mlxcel zeroes (its pad tokens had moved pooled vectors to cosine 0.94 before), mlx-swift-lm#365 keeps "
            "them 'as trained'; transformers' lfm2_bidirectional makes it a per-checkpoint flag",
            "only padded rows differ, from the first conv layer's bx on, at the padding next to a sequence's "
            "end; a sequence run alone agrees", "a bidirectional model with a conv layer (visible in a padded "
            "batch only)", lambda c: not c.causal and bool(c.conv_layers), _pad_zeroing),
    Mistake("bidir-wrong-pooling", "the embedding pooled otherwise than the checkpoint says (1_Pooling: CLS for "
            "LFM2.5-Embedding-350M; the ColBERT models pool nothing, mean here)",
            "no public LFM2 report; the usual slip: a default mean pooling where the model wants CLS (or the "
            "last token)", "every layer and model.embedding_norm agree; head.pooled differs",
            "a model with an embedding head", _has_head, _poolings, localisable=False),
)
BY_ID = {m.id: m for m in CATALOGUE}


def mistake(mistake_id: str) -> Mistake:
    """The catalogue entry called ``mistake_id``."""
    if mistake_id not in BY_ID:
        raise Lfm2npError(f"unknown mistake {mistake_id!r}; the catalogue has {', '.join(BY_ID)}")
    return BY_ID[mistake_id]


def port_of(config: Config, *mistake_ids: str, prefill: int | None = None, mode: str | None = None) -> Port:
    """The Port that makes all of ``mistake_ids`` (each entry's first variant) on a model with ``config`` (in
    numerics ``mode``, when an entry concerns some modes only). :class:`Lfm2npError` for an unknown id, an
    entry that does not apply (or has no variant: conv-state-dropped without ``prefill``), or two entries that set
    the same switch differently."""
    switch_sets = []
    for mistake_id in mistake_ids:
        m = mistake(mistake_id)
        applies = m.applies(config) and (m.modes is None or mode in m.modes)
        variants = m.variants(config, prefill) if applies else []
        if not variants:
            raise Lfm2npError(f"mistake {mistake_id!r} needs {m.requires}"
                              + (" (pass prefill=)" if mistake_id == "conv-state-dropped" and applies else ""))
        switch_sets.append(variants[0][1])
    return merge(*switch_sets)
