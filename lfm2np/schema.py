"""THE tensor layout and THE trace schema: what a checkpoint of a config holds, and what its forward pass names.

Everything else derives from these two lists, never from a copy of a name:

- :func:`layout`: every tensor a checkpoint holds, its Hugging Face name and shape, the ``part`` it sits in
  (``embedding``, ``operator_norm``, ``conv``, ``attention``, ``post_operator_norm``, ``ffn_norm``, ``ffn``,
  ``router``, ``expert``, ``post_ffn_norm``, ``final_norm``, ``lm_head``; the two ``post_*`` norms are LFM3's
  sandwich norms) and its ``role`` (the field of the weight view in :mod:`lfm2np.layers`). Loading checks a
  checkpoint against it; the GGUF names and the size calculators are derived from it; so are the weights
  golden vectors write. Experts are per-expert tensors (``feed_forward.experts.{e}.w1.weight``), as released
  checkpoints store them.
- :func:`trace_names`: every intermediate the forward pass names, in the order it computes them, each with its
  shape (``"T"``: the tokens of the call), whether it holds integers, and the names transformers (a forward
  hook's capture) and llama.cpp (its graph callback) give the same value. The forward pass emits exactly this
  list (tested for every fixture config and numerics mode); traces, golden vectors, compare, the llama.cpp
  aliases and the porting mistakes read it.

Names are the Hugging Face module path plus the step: ``model.layers.{i}.self_attn.q_rope``. :data:`STEPS` is
every step below ``model.layers.{i}.`` any config can have, and :data:`TOP_LEVEL` the names outside the layers.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from . import vision_schema
# the names other tools give each value (re-exported: lfm2np.schema.llama_cpp_names, transformers_names)
from .aliases import LLAMA_CPP_STEPS, LLAMA_CPP_TOP, llama_cpp_names, split as _split, transformers_names
from .config import Config, checked_config
from .config_keys import CONV
from .errors import Lfm2npError, shown
from .ggml_ops import INPUT_STEPS, with_inputs


# ========================================================================================== tensor layout
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
        qwen3 = c.attention_spelling == "qwen3"  # LFM3: o_proj, q_norm, k_norm; the output gate gate_proj
        out_name = "o_proj" if qwen3 else "out_proj"
        out = [("q_proj", "self_attn.q_proj.weight", (H * hd, D)),
               ("k_proj", "self_attn.k_proj.weight", (G * hd, D)),
               ("v_proj", "self_attn.v_proj.weight", (G * hd, D)),
               ("out_proj", f"self_attn.{out_name}.weight", (D, H * hd))]
        if c.attention_bias:
            out += [("q_proj_bias", "self_attn.q_proj.bias", (H * hd,)),
                    ("k_proj_bias", "self_attn.k_proj.bias", (G * hd,)),
                    ("v_proj_bias", "self_attn.v_proj.bias", (G * hd,)),
                    ("out_proj_bias", f"self_attn.{out_name}.bias", (D,))]
        norm = "norm" if qwen3 else "layernorm"
        out += [("q_norm", f"self_attn.q_{norm}.weight", (hd,)), ("k_norm", f"self_attn.k_{norm}.weight", (hd,))]
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
    c = checked_config(config)
    D, V = c.hidden_size, c.vocab_size
    out = [Tensor(HEAD_TIED, (V, D), None, "embedding", "embed_tokens")]
    for i in range(c.num_hidden_layers):
        out += _layer(c, i)
    out.append(Tensor("model.embedding_norm.weight", (D,), None, "final_norm", "embedding_norm"))
    if not c.tie_word_embeddings:
        out.append(Tensor("lm_head.weight", (V, D), None, "lm_head", "lm_head"))
    if c.dense_out:  # the sentence-transformers Dense module (1_Dense/model.safetensors: linear.weight)
        out.append(Tensor(DENSE_HEAD, (c.dense_out, D), None, "dense_head", "dense"))
        if c.dense_bias:
            out.append(Tensor(DENSE_HEAD_BIAS, (c.dense_out,), None, "dense_head", "dense_bias"))
    vision = vision_schema.tensors(c.vision, D) if c.vision is not None else []  # LFM2-VL: tower and projector
    return out + [Tensor(name, shape, None, part, role) for name, shape, part, role in vision]


def expected_tensors(config: Config) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of every tensor a checkpoint for ``config`` must hold (see :func:`layout`)."""
    return {t.name: t.shape for t in layout(config)}


def describe(config: Config) -> str:
    """The config in the words a tensor-inventory message needs: ``lfm2_moe, 24 layers, conv_bias=False,
    tie_word_embeddings=True``."""
    c, vl = config, "" if config.vision is None else f" + a {config.vision.num_hidden_layers}-layer vision tower"
    return (f"{c.model_type}, {c.num_hidden_layers} layers{vl}, conv_bias={c.conv_bias}, "
            f"tie_word_embeddings={c.tie_word_embeddings}")


MIXER_PARTS = ("conv", "attention")
NORM_PARTS = ("operator_norm", "post_operator_norm", "ffn_norm", "post_ffn_norm")


def layer_names(config: Config, layer: int, parts: tuple[str, ...] | None = None) -> dict[str, str]:
    """``{role: name}`` of layer ``layer``'s tensors (of the given ``parts`` only), experts excepted
    (see :func:`expert_names`)."""
    return {t.role: t.name for t in _layer(config, layer, experts=False) if parts is None or t.part in parts}


def expert_names(layer: int, expert: int) -> tuple[str, str, str]:
    """The names of expert ``expert``'s ``(w1, w3, w2)`` in layer ``layer``."""
    return tuple(f"model.layers.{layer}.feed_forward.experts.{expert}.{w}.weight" for w in ("w1", "w3", "w2"))


HEAD_TIED = "model.embed_tokens.weight"
#: the embedding head's dense projection (E, D) and its bias (a sentence-transformers Dense module's linear)
DENSE_HEAD, DENSE_HEAD_BIAS = "dense.weight", "dense.bias"


def head_name(config: Config) -> str:
    """The tensor the LM head multiplies by: the embedding when tied, else ``lm_head.weight``."""
    return HEAD_TIED if config.tie_word_embeddings else "lm_head.weight"


# =========================================================================================== trace schema
@dataclass(frozen=True)
class TraceName:
    """One named intermediate of the forward pass: ``name``; ``shape`` with ``"T"`` for the tokens of the call;
    ``layer`` (None outside the layers); ``integer`` (the chosen experts) or floating point; ``transformers``,
    the names a forward-hook capture of transformers' model gives it (module path + ``.output``, or the
    function-level step the fixture tools record); ``llama_cpp``, the names llama.cpp's graph callback gives it
    (``ggml_format_name(t, "%s-%d", name, il)``; older and newer spellings)."""

    name: str
    shape: tuple[int | str, ...]
    layer: int | None = None
    integer: bool = False
    transformers: tuple[str, ...] = ()
    llama_cpp: tuple[str, ...] = ()

    @property
    def step(self) -> str:
        """The name below ``model.layers.{i}.`` (the whole name outside the layers)."""
        return self.name.split(".", 3)[3] if self.layer is not None and self.name.count(".") >= 3 else \
            ("" if self.layer is not None else self.name)

    def shape_for(self, T: int, dims: "dict[str, int] | None" = None) -> tuple[int, ...]:
        """The shape for a call of ``T`` tokens (and, for LFM2-VL's vision values, ``dims`` N, P and I)."""
        return tuple(T if d == "T" else (dims or {}).get(d, d) for d in self.shape)


#: Every step below ``model.layers.{i}.`` a config can name (a port's mistake may only act on these).
CONV_STEPS = ("in_proj", "b_gate", "c_gate", "x", "bx", "conv_out", "y", "out_proj")
ATTENTION_STEPS = ("q_proj", "k_proj", "v_proj", "q_normed", "k_normed", "q_rope", "k_rope", "attention", "gate",
                   "attn_out", "out_proj")
DENSE_STEPS = ("w1", "w3", "act", "w2")
ROUTER_STEPS = ("router_logits", "router_scores", "biased_scores", "selected_experts", "topk_scores", "topk_normed",
                "routing_weights")
STEPS = frozenset(["", "operator_norm", "post_operator_norm", "mixer_residual", "ffn_norm", "feed_forward.output",
                   "post_ffn_norm", *(f"conv.{s}" for s in CONV_STEPS), *(f"self_attn.{s}" for s in ATTENTION_STEPS),
                   *(f"feed_forward.{s}" for s in DENSE_STEPS + ROUTER_STEPS), *INPUT_STEPS])  # (+ llama.cpp's)
#: The embedding head's values (``Model.embed``): pooled, then dense and normalised; or per token.
HEAD_POOLED = ("head.pooled", "head.dense", "head.embedding")
HEAD_TOKENS = ("head.dense_tokens", "head.token_embeddings")
#: The names outside the layers ({kind}: an attention layer type, e.g. ``full_attention``; lm_head.input: llama.cpp's).
TOP_LEVEL = ("model.rotary_emb.{kind}.inv_freq", "model.rotary_emb.{kind}.cos", "model.rotary_emb.{kind}.sin",
             "model.embed_tokens", "model.embedding_norm", "lm_head.input", "lm_head", *HEAD_POOLED, *HEAD_TOKENS)
_TOP = re.compile(r"model\.rotary_emb\.\w+\.(inv_freq|cos|sin)|model\.(embed_tokens|embedding_norm)|lm_head(\.input)?"
                  r"|head\.(pooled|dense|embedding|dense_tokens|token_embeddings)")

def attention_kinds(config: Config) -> list[str]:
    """The attention layer types ``config`` uses, in the order of their first layer."""
    return list(dict.fromkeys(k for k in config.layer_types if k != CONV))


def layer_steps(config: Config, i: int) -> list[tuple[str, tuple[int | str, ...]]]:
    """``(step, shape)`` of every value layer ``i`` names, in the order it computes them."""
    c = config
    D, H, G, hd = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    out: list[tuple[str, tuple[int | str, ...]]] = [("operator_norm", ("T", D))]
    if c.is_attention(i):
        out += [("self_attn.q_proj", ("T", H, hd)), ("self_attn.k_proj", ("T", G, hd)),
                ("self_attn.v_proj", ("T", G, hd)), ("self_attn.q_normed", ("T", H, hd)),
                ("self_attn.k_normed", ("T", G, hd)), ("self_attn.q_rope", ("T", H, hd)),
                ("self_attn.k_rope", ("T", G, hd))]
        if c.use_attention_gate:  # the attention before LFM3's output gate, the gate, then attn_out (gated)
            out += [("self_attn.attention", ("T", H * hd)), ("self_attn.gate", ("T", H))]
        out += [("self_attn.attn_out", ("T", H * hd)), ("self_attn.out_proj", ("T", D))]
    else:
        out += [("conv.in_proj", ("T", 3 * D)), *((f"conv.{s}", ("T", D)) for s in CONV_STEPS[1:])]
    if c.use_sandwich_norm:
        out.append(("post_operator_norm", ("T", D)))
    out += [("mixer_residual", ("T", D)), ("ffn_norm", ("T", D))]
    if c.is_moe_layer(i):
        E, k = c.num_experts, c.num_experts_per_tok
        out += [("feed_forward.router_logits", ("T", E)), ("feed_forward.router_scores", ("T", E))]
        if c.use_expert_bias:  # what the experts are chosen on
            out.append(("feed_forward.biased_scores", ("T", E)))
        out += [("feed_forward.selected_experts", ("T", k)), ("feed_forward.topk_scores", ("T", k))]
        if c.norm_topk_prob:
            out.append(("feed_forward.topk_normed", ("T", k)))
        out.append(("feed_forward.routing_weights", ("T", k)))
    else:
        F = c.ffn_dim
        out += [("feed_forward.w1", ("T", F)), ("feed_forward.w3", ("T", F)), ("feed_forward.act", ("T", F)),
                ("feed_forward.w2", ("T", D))]
    out.append(("feed_forward.output", ("T", D)))
    if c.use_sandwich_norm:
        out.append(("post_ffn_norm", ("T", D)))
    out.append(("", ("T", D)))
    return out


#: what a pass ends with: the logits (``forward``), the pooled embedding or the per-token vectors (``embed``)
OUTPUTS = ("logits", "embedding", "token_embeddings")


def trace_names(config: Config, output: str = "logits", images: bool = True, inputs: bool = False) -> list[TraceName]:
    """Every intermediate the forward pass of a model with ``config`` names, in the order it computes them (see
    the module docstring): the RoPE tables of each attention layer type, (LFM2-VL, a call with ``images``: the
    vision tower and projector, :mod:`lfm2np.vision_schema`), the embeddings (with the image features placed),
    every step of every layer (``inputs``: llama.cpp's CPU arithmetic's too), the final norm and the logits, or
    for ``output`` "embedding" / "token_embeddings" (``Model.embed``) the embedding head's values instead."""
    c = checked_config(config)
    if not isinstance(output, str) or output not in OUTPUTS:
        raise Lfm2npError(f"trace_names: output is {shown(output)}; expected one of {', '.join(OUTPUTS)}")
    hd, D, out = c.head_dim, c.hidden_size, []
    for kind in attention_kinds(c):
        p = f"model.rotary_emb.{kind}."
        out += [TraceName(p + "inv_freq", (hd // 2,)), TraceName(p + "cos", ("T", hd)), TraceName(p + "sin", ("T", hd))]
    vision = vision_schema.trace_steps(c.vision, D) if c.vision is not None and images else []
    out += [TraceName(n, shape, transformers=vision_schema.transformers_keys(n)) for n, shape in vision[:-1]]
    out.append(TraceName("model.embed_tokens", ("T", D), transformers=transformers_names("model.embed_tokens"),
                         llama_cpp=llama_cpp_names("model.embed_tokens")))
    out += [TraceName(n, shape, transformers=vision_schema.transformers_keys(n)) for n, shape in vision[-1:]]
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}"
        for step, shape in (with_inputs(c, layer_steps(c, i)) if inputs else layer_steps(c, i)):
            name = f"{p}.{step}" if step else p
            # (the llama.cpp of llama-cpp-python 0.3.36 has no LFM3 graph: no llama.cpp names for its spelling)
            llama = llama_cpp_names(name, c.is_moe_layer(i)) if c.attention_spelling == "lfm2" else ()
            out.append(TraceName(name, shape, i, step == "feed_forward.selected_experts",
                                 transformers_names(name, c.attention_spelling), llama))
    out.append(TraceName("model.embedding_norm", ("T", D), transformers=transformers_names("model.embedding_norm"),
                         llama_cpp=llama_cpp_names("model.embedding_norm")))
    if output == "logits":
        return out + ([TraceName("lm_head.input", ("T", D))] if inputs else []) + [TraceName(
            "lm_head", ("T", c.vocab_size), transformers=transformers_names("lm_head"), llama_cpp=llama_cpp_names("lm_head"))]
    E = c.embedding_size
    if output == "token_embeddings":
        head = [("head.dense_tokens", ("T", E))] if c.dense_out else []
        return out + [TraceName(n, sh) for n, sh in head + [("head.token_embeddings", ("T", E))]]
    head = [("head.pooled", (D,))] + ([("head.dense", (E,))] if c.dense_out else []) + [("head.embedding", (E,))]
    return out + [TraceName(n, sh) for n, sh in head]


def is_trace_name(name: str) -> bool:
    """Whether ``name`` is a name some config's forward pass gives a value (``model.layers.3.conv.bx``)."""
    layer, step = _split(name)
    return step in STEPS if layer is not None else _TOP.fullmatch(name) is not None or vision_schema.is_vision_name(name)


#: every name llama.cpp's LFM2 graph callback gives a value of the schema ("Qcur-3", "result_norm", ...)
LLAMA_CPP_NAME = re.compile("|".join(
    [re.escape(t.format(i="LAYER")).replace("LAYER", r"\d+") for names in LLAMA_CPP_STEPS.values() for t in names]
    + [r"ffn_moe_out-\d+"] + [re.escape(t) for names in LLAMA_CPP_TOP.values() for t in names]))


# ---------------------------------------------------------------------------------- names from any tool
_LLAMA_PREFIX = {t.replace("{{}}", "{}").rsplit("-{i}", 1)[0]: step for step, names in LLAMA_CPP_STEPS.items() for t in names}
_LLAMA_PREFIX["ffn_moe_out"] = "feed_forward.output"
LLAMA_CPP_TOP_NAME = {t: name for name, names in LLAMA_CPP_TOP.items() for t in names}


def canonical_name(key: str) -> str | None:
    """lfm2np's name for a value that lfm2np, llama.cpp's graph callback (``Qcur-3``, ``result_output``) or a
    transformers capture (``model.layers.3.self_attn.q_layernorm.output``) names ``key``; None when it names no
    value of the schema."""
    if is_trace_name(key):
        return key
    if key in LLAMA_CPP_TOP_NAME:
        return LLAMA_CPP_TOP_NAME[key]
    head, _, layer = key.rpartition("-")
    if layer.isdigit() and head in _LLAMA_PREFIX:
        step = _LLAMA_PREFIX[head]
        return f"model.layers.{int(layer)}.{step}" if step else f"model.layers.{int(layer)}"
    return transformers_name(key)


def transformers_name(key: str) -> str | None:
    """lfm2np's name for a transformers capture key (module path + ``.output``, or a function-level step the
    fixture tools record), or None."""
    if key.endswith(".output") and key[:-len(".output")] in ("model.embed_tokens", "model.embedding_norm", "lm_head"):
        return key[:-len(".output")]
    m = _CAPTURED.fullmatch(key)
    if m is None:
        return None
    layer, rest = m.groups()
    if rest == "output":
        return layer
    for step in STEP_ORDER:
        if step and key in transformers_names(f"{layer}.{step}"):
            return f"{layer}.{step}"
    return None


_CAPTURED = re.compile(r"(model\.layers\.\d+)\.(.+)")
#: the order of the steps inside a layer (a layer has either the router's or the dense FFN's)
STEP_ORDER = with_inputs(None, ("operator_norm", *(f"conv.{s}" for s in CONV_STEPS), *(f"self_attn.{s}" for s in
                              ATTENTION_STEPS), "post_operator_norm", "mixer_residual", "ffn_norm", *(
    f"feed_forward.{s}" for s in ROUTER_STEPS + DENSE_STEPS), "feed_forward.output", "post_ffn_norm", ""))
_STEP_INDEX = {step: n for n, step in enumerate(STEP_ORDER)}


def order_key(name: str) -> tuple:
    """A sort key putting lfm2np names in forward order, whatever the config (unknown names last)."""
    layer, step = _split(name)
    if layer is not None:
        return (2, layer, _STEP_INDEX.get(step, len(STEP_ORDER)), step)
    if vision_schema.order(name) is not None:  # LFM2-VL: the tower, the projector, the placed embeddings
        return (0.5, *vision_schema.order(name)) if name != vision_schema.PLACED else (1.5, name)
    if name.startswith("model.rotary_emb."):  # per attention type: inv_freq, cos, sin
        kind, _, table = name[len("model.rotary_emb."):].partition(".")
        return (0, kind, ("inv_freq", "cos", "sin").index(table) if table in ("inv_freq", "cos", "sin") else 3)
    head = HEAD_TOKENS + HEAD_POOLED
    if name in head:  # (the embedding head replaces lm_head: the same place, in its own order)
        return (4, str(head.index(name)))
    return ({"model.embed_tokens": 1, "model.embedding_norm": 3, "lm_head.input": 4, "lm_head": 4.5}.get(name, 5), name)


def layer_of(name: str) -> int | None:
    """The layer of an lfm2np name (None outside the layers)."""
    return _split(name)[0]


def per_position(name: str) -> bool:
    """Whether the value named ``name`` has one row per position of the call (every value but the RoPE
    frequencies ``model.rotary_emb.{kind}.inv_freq``)."""
    return not name.endswith(".inv_freq") and name not in HEAD_POOLED


def holds_integers(name: str) -> bool:
    """Whether the value named ``name`` (lfm2np's or llama.cpp's name) holds integers: the chosen experts."""
    return name.endswith(".selected_experts") or re.fullmatch(r"ffn_moe_topk-\d+", name) is not None
