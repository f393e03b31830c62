"""THE tensor layout: every tensor a checkpoint of a given config holds, its Hugging Face name and shape.

Everything else derives from :func:`layout`: checkpoint validation (:func:`expected_tensors`), the
per-layer weight views the forward pass reads (:func:`layer_names`, :func:`expert_names`), the GGUF
names and tensor list (:mod:`lfm2np.io.gguf_names`), parameter counts (:mod:`lfm2np.calc`) and the
weights written with golden vectors (:mod:`lfm2np.oracle.golden`).

Each tensor has a ``part`` (where it sits: ``embedding``, ``operator_norm``, ``conv``, ``attention``,
``post_operator_norm``, ``ffn_norm``, ``ffn``, ``router``, ``expert``, ``post_ffn_norm``, ``final_norm``,
``lm_head``; the two ``post_*`` norms are LFM3's sandwich norms) and a ``role`` (which
weight it is within the part, the field name of the weight view in :mod:`lfm2np.layers`). Experts are
per-expert tensors (``feed_forward.experts.{e}.w1.weight``), as released checkpoints store them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import Config


@dataclass(frozen=True)
class Tensor:
    """One checkpoint tensor: Hugging Face name, shape, layer (None outside the layers), part, role and,
    for an expert's weight, the expert index."""

    name: str
    shape: tuple[int, ...]
    layer: int | None
    part: str
    role: str
    expert: int | None = None

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def _mixer(c: Config, i: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """(role, name suffix after ``model.layers.{i}.``, shape) of layer i's mixer."""
    D, L = c.hidden_size, c.conv_L_cache
    H, G, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    if c.is_attention(i):
        lfm3 = c.model_type == "lfm3"  # Qwen3-style names: o_proj, q_norm, k_norm; the output gate gate_proj
        out = [("q_proj", "self_attn.q_proj.weight", (H * hd, D)),
               ("k_proj", "self_attn.k_proj.weight", (G * hd, D)),
               ("v_proj", "self_attn.v_proj.weight", (G * hd, D)),
               ("out_proj", "self_attn.o_proj.weight" if lfm3 else "self_attn.out_proj.weight", (D, H * hd))]
        if c.attention_bias:
            out += [("q_proj_bias", "self_attn.q_proj.bias", (H * hd,)),
                    ("k_proj_bias", "self_attn.k_proj.bias", (G * hd,)),
                    ("v_proj_bias", "self_attn.v_proj.bias", (G * hd,)),
                    ("out_proj_bias", "self_attn.o_proj.bias", (D,))]
        out += [("q_norm", "self_attn.q_norm.weight" if lfm3 else "self_attn.q_layernorm.weight", (hd,)),
                ("k_norm", "self_attn.k_norm.weight" if lfm3 else "self_attn.k_layernorm.weight", (hd,))]
        if c.use_attention_gate:
            out.append(("gate_proj", "self_attn.gate_proj.weight", (H, D)))  # transformers calls it g_proj
        return out
    out = [("in_proj", "conv.in_proj.weight", (3 * D, D))]
    if c.conv_bias:
        out.append(("in_proj_bias", "conv.in_proj.bias", (3 * D,)))
    out.append(("conv", "conv.conv.weight", (D, 1, L)))
    if c.conv_bias:
        out.append(("conv_bias", "conv.conv.bias", (D,)))
    out.append(("out_proj", "conv.out_proj.weight", (D, D)))
    if c.conv_bias:
        out.append(("out_proj_bias", "conv.out_proj.bias", (D,)))
    return out


def _swiglu(prefix: str, F: int, D: int) -> list[tuple[str, str, tuple[int, ...]]]:
    return [("w1", prefix + "w1.weight", (F, D)), ("w3", prefix + "w3.weight", (F, D)),
            ("w2", prefix + "w2.weight", (D, F))]


def _layer(c: Config, i: int, experts: bool = True) -> list[Tensor]:
    """Layer i's tensors in checkpoint order (its experts' only when ``experts``)."""
    D, p = c.hidden_size, f"model.layers.{i}."
    out = [Tensor(p + "operator_norm.weight", (D,), i, "operator_norm", "operator_norm")]
    part = "attention" if c.is_attention(i) else "conv"
    out += [Tensor(p + name, shape, i, part, role) for role, name, shape in _mixer(c, i)]
    if c.use_sandwich_norm:
        out.append(Tensor(p + "post_operator_norm.weight", (D,), i, "post_operator_norm", "post_operator_norm"))
    out.append(Tensor(p + "ffn_norm.weight", (D,), i, "ffn_norm", "ffn_norm"))
    if c.is_moe_layer(i):
        E, Fm = c.num_experts, c.moe_intermediate_size
        out.append(Tensor(p + "feed_forward.gate.weight", (E, D), i, "router", "gate"))
        if c.use_expert_bias:
            out.append(Tensor(p + "feed_forward.expert_bias", (E,), i, "router", "expert_bias"))
        for e in range(E if experts else 0):
            out += [Tensor(p + name, shape, i, "expert", role, e)
                    for role, name, shape in _swiglu(f"feed_forward.experts.{e}.", Fm, D)]
    else:
        out += [Tensor(p + name, shape, i, "ffn", role) for role, name, shape in _swiglu("feed_forward.", c.ffn_dim, D)]
    if c.use_sandwich_norm:
        out.append(Tensor(p + "post_ffn_norm.weight", (D,), i, "post_ffn_norm", "post_ffn_norm"))
    return out


def layout(config: Config) -> list[Tensor]:
    """Every tensor of a checkpoint for ``config``, in checkpoint order (embedding, layers, final norm, head)."""
    c = config
    D, V = c.hidden_size, c.vocab_size
    out = [Tensor("model.embed_tokens.weight", (V, D), None, "embedding", "embed_tokens")]
    for i in range(c.num_hidden_layers):
        out += _layer(c, i)
    out.append(Tensor("model.embedding_norm.weight", (D,), None, "final_norm", "embedding_norm"))
    if not c.tie_word_embeddings:
        out.append(Tensor("lm_head.weight", (V, D), None, "lm_head", "lm_head"))
    return out


def expected_tensors(config: Config) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of every tensor a checkpoint for ``config`` must hold (see :func:`layout`)."""
    return {t.name: t.shape for t in layout(config)}


MIXER_PARTS = ("conv", "attention")
NORM_PARTS = ("operator_norm", "post_operator_norm", "ffn_norm", "post_ffn_norm")


def layer_names(config: Config, layer: int, parts: tuple[str, ...] | None = None) -> dict[str, str]:
    """``{role: name}`` of layer ``layer``'s tensors (of the given ``parts`` only), experts excepted
    (see :func:`expert_names`)."""
    return {t.role: t.name for t in _layer(config, layer, experts=False) if parts is None or t.part in parts}


def expert_names(layer: int, expert: int) -> tuple[str, str, str]:
    """The names of expert ``expert``'s ``(w1, w3, w2)`` in layer ``layer``."""
    p = f"model.layers.{layer}.feed_forward.experts.{expert}."
    return p + "w1.weight", p + "w3.weight", p + "w2.weight"


HEAD_TIED = "model.embed_tokens.weight"


def head_name(config: Config) -> str:
    """The tensor the LM head multiplies by: the embedding when tied, else ``lm_head.weight``."""
    return HEAD_TIED if config.tie_word_embeddings else "lm_head.weight"
