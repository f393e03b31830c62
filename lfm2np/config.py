"""The model configuration: a frozen dataclass built from a Hugging Face ``config.json`` dictionary.

Three model types: ``lfm2`` (dense), ``lfm2_moe`` (mixture of experts) and ``lfm3`` (the tri-hybrid: conv,
sliding-window and full attention layers, sandwich norms, a per-head attention output gate, RoPE per layer
type). Legacy keys of early LFM2 checkpoints are read as transformers reads them:

=====================  ===============================================================
legacy key             meaning
=====================  ===============================================================
``block_ff_dim``       overrides ``intermediate_size`` (``lfm2``)
``full_attn_idxs``     list of attention layer indices, turned into ``layer_types``
``tie_embedding``      overrides ``tie_word_embeddings`` (``lfm2``, ``lfm2_moe``)
``theta``              RoPE base; wins over ``rope_theta`` as in transformers 4.x (transformers 5
                       ignores it: a config with only ``theta`` is read there as theta = 1e6)
``rms_norm_eps``       an alias of ``norm_eps`` (``lfm3``)
=====================  ===============================================================

Shape fields (vocabulary, widths, layer and head counts, and for MoE the expert counts) are required: a
config that lacks one is rejected rather than silently given a library default. Behaviour switches that
transformers defaults (``norm_eps``, ``conv_L_cache``, ``use_expert_bias``, ``sliding_window``...) take the
same defaults here. Unknown keys are ignored, as real configs carry many (``torch_dtype``, ``architectures``).
Every field is checked for its type and range, sizes against generous bounds (:data:`LIMITS`) so that a
hostile config cannot make anything allocate or loop before a checkpoint contradicts it, and token ids
against the vocabulary. Derived values (``head_dim``, ``ffn_dim``, the MoE layer mask, each layer's RoPE)
are computed once, at construction.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping

from .config_keys import (ATTENTION, CONV, LAYER_KINDS, LIMITS, MAX_TENSORS, MODEL_TYPES, POOLINGS, ROPE_READINGS,
                          ROPE_TYPES, SLIDING, Rope, normalise)
from .errors import Lfm2npError, shown
from .vision_config import VisionConfig

__all__ = ["ATTENTION", "CONV", "Config", "LAYER_KINDS", "LIMITS", "MODEL_TYPES", "POOLINGS", "ROPE_READINGS",
           "ROPE_TYPES", "Rope", "SLIDING", "check_rope_reading", "checked_config", "effective_ffn_dim"]

def effective_ffn_dim(intermediate_size: int, auto_adjust: bool, multiplier: float | None, multiple_of: int) -> int:
    """Width of the dense SwiGLU of an ``lfm2`` layer, as the reference computes it.

    With ``auto_adjust``: ``f = int(2 f / 3)``; then, if a multiplier is given, ``f = int(mult * f)``
    rounded UP to a multiple of ``multiple_of``. Without it, ``intermediate_size`` is used as is.
    Examples: 6656 -> 4608, 10240 -> 6912, 12288 -> 8192.
    """
    f = intermediate_size
    if auto_adjust:
        f = int(2 * f / 3)
        if multiplier is not None:
            f = int(multiplier * f)
            f = multiple_of * ((f + multiple_of - 1) // multiple_of)
    return f


def checked_config(config: Any) -> "Config":
    """``config`` when it is a :class:`Config`, else an :class:`Lfm2npError` (not an AttributeError deep inside)."""
    if not isinstance(config, Config):
        raise Lfm2npError(f"expected an lfm2np Config (lfm2np.load_config); got {type(config).__name__}")
    return config


def check_rope_reading(reading: Any) -> str:
    """``reading`` when it is one of :data:`ROPE_READINGS`, else an :class:`Lfm2npError` naming it: the check every
    path takes (a config, a checkpoint, a GGUF file), before any file is read."""
    if not isinstance(reading, str) or reading not in ROPE_READINGS:
        raise Lfm2npError(f"rope_reading is {shown(reading)}; expected one of {', '.join(ROPE_READINGS)}")
    return reading


@dataclass(frozen=True)
class Config:
    """An LFM2 / LFM2-MoE / LFM3 configuration, fields under their Hugging Face names.

    Build one with :func:`lfm2np.load_config` (a path, a checkpoint directory or a preset name) or
    :meth:`Config.from_dict` (a parsed ``config.json``). Derived fields (``head_dim``, ``ffn_dim``,
    ``moe_layer_mask``) are filled in at construction and validated with the rest.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    layer_types: tuple[str, ...]
    intermediate_size: int
    norm_eps: float = 1e-5
    rope_theta: float = 1e6
    conv_L_cache: int = 3
    conv_bias: bool = False
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 128_000
    # dense FFN width rule (lfm2 only; lfm2_moe and lfm3 use intermediate_size as is)
    block_auto_adjust_ff_dim: bool = False
    block_ffn_dim_multiplier: float | None = 1.0
    block_multiple_of: int = 256
    # mixture of experts (lfm2_moe only)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    num_dense_layers: int = 0
    use_expert_bias: bool = False
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    # lfm3 only
    sliding_window: int | None = None
    use_sandwich_norm: bool = False
    use_attention_gate: bool = False
    attention_bias: bool = False
    #: RoPE per attention layer type; empty: every attention layer "default" with ``rope_theta``
    rope_parameters: tuple[Rope, ...] = ()
    rope_reading: str = "trained"
    # special tokens
    bos_token_id: int | None = 1
    eos_token_id: tuple[int, ...] = (2,)
    pad_token_id: int | None = 0
    #: LFM2-VL: the vision tower, projector and image placeholder (None for a text model)
    vision: VisionConfig | None = None
    # an explicit head_dim key in config.json (transformers honours one); None means hidden_size / heads
    explicit_head_dim: int | None = None
    # bidirectional LFM2 (LFM2.5-Embedding / -ColBERT / -Encoder; lfm2 only): False = every position sees every
    # other (a centred conv window, attention without the causal mask); conv_zero_padding: padded positions of a
    # padded batch are zeroed before the centred conv (config_keys explains the default when the key is absent)
    causal: bool = True
    conv_zero_padding: bool = False
    # the sentence-transformers head (embed): pooling ("cls", "mean", "last"; None when none is declared) and the
    # dense projection D -> dense_out (0: none), with a bias when dense_bias
    pooling: str | None = None
    dense_out: int = 0
    dense_bias: bool = False
    # where this config came from (a path or a preset name); informational only
    source: str | None = field(default=None, compare=False)

    # ---- derived, computed once in __post_init__ ----
    head_dim: int = field(init=False)
    ffn_dim: int = field(init=False)
    moe_layer_mask: tuple[bool, ...] = field(init=False)
    # behaviour flags: what differs between the model types, decided here so that nothing else tests one
    #: RoPE stays float32 whatever the numerics (transformers' LFM3): cos and sin are not rounded to bf16, and
    #: the products and their sum are float32, rounded once (LFM2 rounds the tables, each product and the sum)
    rope_in_float32: bool = field(init=False)
    #: the attention tensors' spelling: "lfm2" (``out_proj``, ``q_layernorm``, ``k_layernorm``) or "qwen3"
    #: (LFM3: ``o_proj``, ``q_norm``, ``k_norm``)
    attention_spelling: str = field(init=False)

    def __post_init__(self) -> None:
        for name in ("layer_types", "eos_token_id", "rope_parameters"):  # lists in, tuples kept (hashable)
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if not self.rope_parameters:
            kinds = sorted({k for k in self.layer_types if isinstance(k, str) and k != CONV}) \
                if isinstance(self.layer_types, tuple) else []  # (bad entries are named by _validate)
            object.__setattr__(self, "rope_parameters", tuple(Rope(k, "default", self.rope_theta) for k in kinds))
        self._validate()
        hd = self.explicit_head_dim or self.hidden_size // self.num_attention_heads
        if self.model_type == "lfm2":
            ffn = effective_ffn_dim(self.intermediate_size, self.block_auto_adjust_ff_dim,
                                    self.block_ffn_dim_multiplier, self.block_multiple_of)
        else:
            ffn = self.intermediate_size
        moe = tuple(self.is_moe and i >= self.num_dense_layers for i in range(self.num_hidden_layers))
        if ffn <= 0:
            raise self._error("intermediate_size", f"gives an effective FFN width of {ffn}; expected > 0")
        object.__setattr__(self, "head_dim", hd)
        object.__setattr__(self, "ffn_dim", ffn)
        object.__setattr__(self, "moe_layer_mask", moe)
        lfm3 = self.model_type == "lfm3"
        object.__setattr__(self, "rope_in_float32", lfm3)
        object.__setattr__(self, "attention_spelling", "qwen3" if lfm3 else "lfm2")
        _check_tensor_count(self)

    # ---------------------------------------------------------------- queries
    @property
    def is_moe(self) -> bool:
        """True for ``lfm2_moe`` configs."""
        return self.model_type == "lfm2_moe"

    @property
    def is_vision_language(self) -> bool:
        """True for LFM2-VL configs (a vision tower and projector before the text tower)."""
        return self.vision is not None

    @property
    def attention_layers(self) -> tuple[int, ...]:
        """Indices of the attention layers (full and sliding)."""
        return tuple(i for i, t in enumerate(self.layer_types) if t != CONV)

    @property
    def full_attention_layers(self) -> tuple[int, ...]:
        """Indices of the full (global) attention layers."""
        return tuple(i for i, t in enumerate(self.layer_types) if t == ATTENTION)

    @property
    def sliding_layers(self) -> tuple[int, ...]:
        """Indices of the sliding-window attention layers (lfm3)."""
        return tuple(i for i, t in enumerate(self.layer_types) if t == SLIDING)

    @property
    def conv_layers(self) -> tuple[int, ...]:
        """Indices of the gated short convolution layers."""
        return tuple(i for i, t in enumerate(self.layer_types) if t == CONV)

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """Indices of the layers whose FFN is a mixture of experts."""
        return tuple(i for i, m in enumerate(self.moe_layer_mask) if m)

    @property
    def kv_groups(self) -> int:
        """Query heads per KV head, ``H // G``."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def embedding_size(self) -> int:
        """The width of the vectors ``embed`` gives: the dense head's output, else the hidden size."""
        return self.dense_out or self.hidden_size

    def is_attention(self, layer: int) -> bool:
        return self.layer_types[layer] != CONV

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe_layer_mask[layer]

    def window(self, layer: int) -> int | None:
        """The sliding window of layer ``layer`` (None: it sees every earlier position, or is a conv layer)."""
        return self.sliding_window if self.layer_types[layer] == SLIDING else None

    def rope(self, kind: str) -> Rope:
        """The RoPE of attention layer type ``kind``."""
        return next(r for r in self.rope_parameters if r.kind == kind)

    def rotated_pairs(self, kind: str) -> int | None:
        """Frequency pairs that turn in layers of type ``kind`` under this config's ``rope_reading``."""
        return self.rope(kind).rotated_pairs(self.head_dim, self.rope_reading)

    def layer_pattern(self) -> str:
        """One character per layer: ``C`` conv, ``A`` attention, ``S`` sliding-window attention; lower case
        when the FFN is a MoE block. E.g. LFM2-8B-A1B: ``CCacccacccacccacccaccacc``."""
        letter = {CONV: "C", ATTENTION: "A", SLIDING: "S"}
        return "".join(letter[k].lower() if m else letter[k] for k, m in zip(self.layer_types, self.moe_layer_mask))

    def replace(self, **changes: Any) -> "Config":
        """A copy with some fields changed (derived values recomputed and everything re-validated)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        if "rope_theta" in changes and "rope_parameters" not in changes and self.model_type != "lfm3":
            values["rope_parameters"] = ()  # re-derived from the new theta
        if "layer_types" in changes and "rope_parameters" not in changes and self.model_type != "lfm3":
            values["rope_parameters"] = ()
        values.update(changes)
        return Config(**values)

    def to_dict(self) -> dict[str, Any]:
        """The config as a canonical Hugging Face ``config.json`` dictionary (no legacy keys)."""
        arch = {"lfm2": "Lfm2ForCausalLM", "lfm2_moe": "Lfm2MoeForCausalLM", "lfm3": "Lfm3ForCausalLM"}
        d: dict[str, Any] = {
            "model_type": self.model_type, "architectures": [arch[self.model_type]],
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "layer_types": list(self.layer_types),
            "intermediate_size": self.intermediate_size, "norm_eps": self.norm_eps,
            "conv_L_cache": self.conv_L_cache, "conv_bias": self.conv_bias,
            "tie_word_embeddings": self.tie_word_embeddings, "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if len(self.eos_token_id) != 1 else self.eos_token_id[0],
            "pad_token_id": self.pad_token_id,
        }
        if self.explicit_head_dim is not None:
            d["head_dim"] = self.explicit_head_dim
        if not self.causal:  # the released layout: model_type lfm2, a bidirectional architecture
            d.update(architectures=["Lfm2BidirectionalModel"], conv_zero_padding=self.conv_zero_padding)
        if self.pooling is not None or self.dense_out:
            d["sentence_transformers"] = {"pooling": self.pooling, **(
                {"dense_out": self.dense_out, "dense_bias": self.dense_bias} if self.dense_out else {})}
        if self.vision is not None:
            text = self.replace(vision=None).to_dict()
            return {"model_type": "lfm2_vl", "architectures": ["Lfm2VlForConditionalGeneration"],
                    "text_config": text, "vision_config": self.vision.to_dict(), **self.vision.top_level(),
                    "tie_word_embeddings": self.tie_word_embeddings}
        if self.model_type == "lfm3":
            d.update(sliding_window=self.sliding_window, use_sandwich_norm=self.use_sandwich_norm,
                     use_attention_gate=self.use_attention_gate, attention_bias=self.attention_bias,
                     rope_parameters={r.kind: {"rope_type": r.rope_type, "rope_theta": r.theta,
                                               **({"partial_rotary_factor": r.partial_rotary_factor}
                                                  if r.partial_rotary_factor is not None else {})}
                                      for r in self.rope_parameters})
            return d
        d["rope_theta"] = self.rope_theta
        if self.is_moe:
            d.update(num_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
                     moe_intermediate_size=self.moe_intermediate_size, num_dense_layers=self.num_dense_layers,
                     use_expert_bias=self.use_expert_bias, norm_topk_prob=self.norm_topk_prob,
                     routed_scaling_factor=self.routed_scaling_factor)
        else:
            d.update(block_auto_adjust_ff_dim=self.block_auto_adjust_ff_dim,
                     block_ffn_dim_multiplier=self.block_ffn_dim_multiplier,
                     block_multiple_of=self.block_multiple_of)
        return d

    # ------------------------------------------------------------- building
    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str | None = None, rope_reading: str = "trained") -> "Config":
        """Parse a Hugging Face ``config.json`` dictionary (any model type, legacy keys included).
        ``rope_reading`` decides an ambiguous LFM3 RoPE label (:data:`ROPE_READINGS`); such a config warns."""
        config = cls(**normalise(d, source), rope_reading=rope_reading, source=source)
        ambiguous = [r.kind for r in config.rope_parameters if r.ambiguous]
        if ambiguous:
            reading = ("a partial (proportional) rotation, as the checkpoint was trained" if rope_reading == "trained"
                       else "a full rotation, as transformers 5.24 reads it")
            warnings.warn(f"config{f' {source}' if source else ''}: rope_parameters.{ambiguous[0]} is labelled "
                          f"'default' with partial_rotary_factor {config.rope(ambiguous[0]).partial_rotary_factor}: "
                          f"read as {reading} (rope_reading={shown(rope_reading)}; see docs/ops/rope.md)", stacklevel=2)
        return config

    # ----------------------------------------------------------- validation
    def _error(self, name: str, problem: str) -> Lfm2npError:
        where = f" in {self.source}" if self.source else ""
        return Lfm2npError(f"config field {shown(name)}{where} {problem}")

    def _validate(self) -> None:
        c, err = self, self._error
        if c.model_type not in MODEL_TYPES:
            raise err("model_type", f"is {shown(c.model_type)}; expected one of {', '.join(MODEL_TYPES)}")
        ints = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "conv_L_cache", "max_position_embeddings", "block_multiple_of"]
        if c.is_moe:
            ints += ["num_experts", "num_experts_per_tok", "moe_intermediate_size"]
        if c.model_type == "lfm3" and c.sliding_layers:
            ints.append("sliding_window")
        for name in ints:
            _positive_int(err, name, getattr(c, name), LIMITS.get(name))
        if c.explicit_head_dim is not None:
            _positive_int(err, "head_dim", c.explicit_head_dim, LIMITS["head_dim"])
        for name in ("norm_eps", "rope_theta", "routed_scaling_factor"):
            _positive_number(err, name, getattr(c, name))
        if c.block_ffn_dim_multiplier is not None:
            _positive_number(err, "block_ffn_dim_multiplier", c.block_ffn_dim_multiplier)
        for name in ("conv_bias", "tie_word_embeddings", "block_auto_adjust_ff_dim", "use_expert_bias",
                     "norm_topk_prob", "use_sandwich_norm", "use_attention_gate", "attention_bias", "causal",
                     "conv_zero_padding", "dense_bias"):
            if not isinstance(getattr(c, name), bool):
                raise err(name, f"is {shown(getattr(c, name))}; expected true or false")
        if c.model_type != "lfm3" and (c.use_sandwich_norm or c.use_attention_gate or c.attention_bias):
            raise err("model_type", f"is {shown(c.model_type)}, which has no sandwich norms, attention gate or bias")
        if c.model_type != "lfm2" and not c.causal:
            raise err("model_type", f"is {shown(c.model_type)}; only lfm2 has a bidirectional variant")
        if c.pooling is not None and c.pooling not in POOLINGS:
            raise err("pooling", f"is {shown(c.pooling)}; expected one of {', '.join(POOLINGS)} or null")
        if c.dense_out:
            _positive_int(err, "dense_out", c.dense_out, LIMITS["hidden_size"])
        elif isinstance(c.dense_out, bool) or c.dense_out != 0:
            raise err("dense_out", f"is {shown(c.dense_out)}; expected a positive integer or 0 (no dense head)")
        hd = c.explicit_head_dim or c.hidden_size // c.num_attention_heads
        if c.explicit_head_dim is None and c.hidden_size % c.num_attention_heads:
            raise err("num_attention_heads", f"is {c.num_attention_heads}, which does not divide hidden_size "
                                             f"{c.hidden_size}")
        if hd % 2:
            raise err("head_dim" if c.explicit_head_dim else "num_attention_heads",
                      f"gives an odd head_dim {hd}; RoPE needs an even one")
        if c.num_attention_heads % c.num_key_value_heads:
            raise err("num_key_value_heads", f"is {c.num_key_value_heads}, which does not divide "
                                             f"num_attention_heads {c.num_attention_heads}")
        kinds = LAYER_KINDS[c.model_type]
        if not isinstance(c.layer_types, tuple) or len(c.layer_types) != c.num_hidden_layers:
            raise err("layer_types", f"has {len(c.layer_types)} entries; expected num_hidden_layers = "
                                     f"{c.num_hidden_layers}")
        for i, kind in enumerate(c.layer_types):
            if kind not in kinds:
                raise err(f"layer_types[{i}]", f"is {shown(kind)}; expected one of {', '.join(kinds)}")
        self._validate_rope()
        if c.is_moe:
            if c.num_experts_per_tok > c.num_experts:
                raise err("num_experts_per_tok", f"is {c.num_experts_per_tok}, more than num_experts {c.num_experts}")
            if isinstance(c.num_dense_layers, bool) or not isinstance(c.num_dense_layers, int) \
                    or not 0 <= c.num_dense_layers <= c.num_hidden_layers:
                raise err("num_dense_layers", f"is {shown(c.num_dense_layers)}; expected an integer in "
                                              f"0..{c.num_hidden_layers}")
        check_rope_reading(c.rope_reading)
        self._validate_token_ids()
        if c.vision is not None:
            if not isinstance(c.vision, VisionConfig) or c.model_type != "lfm2":
                raise err("vision", "is set on a config that is not LFM2-VL's lfm2 text tower")
            c.vision.check(err)
            if c.vision.image_token_id >= c.vocab_size:
                raise err("image_token_id", f"is {c.vision.image_token_id}, outside the vocabulary 0..{c.vocab_size - 1}")

    def _validate_rope(self) -> None:
        used = {k for k in self.layer_types if k != CONV}
        given = [r.kind for r in self.rope_parameters if isinstance(r, Rope)]
        if len(given) != len(self.rope_parameters) or len(set(given)) != len(given):
            raise self._error("rope_parameters", f"is {shown(self.rope_parameters)}; expected one entry per layer type")
        for kind in sorted(used - set(given)):
            raise self._error("rope_parameters", f"has no entry for {shown(kind)}, which layer_types uses")
        for r in self.rope_parameters:
            name = f"rope_parameters.{r.kind}"
            if r.rope_type not in ROPE_TYPES:
                raise self._error(f"{name}.rope_type", f"is {shown(r.rope_type)}; lfm2np implements "
                                                       f"{', '.join(ROPE_TYPES)}")
            _positive_number(self._error, f"{name}.rope_theta", r.theta)
            p = r.partial_rotary_factor
            if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1):
                raise self._error(f"{name}.partial_rotary_factor", f"is {shown(p)}; expected a number in (0, 1]")

    def _validate_token_ids(self) -> None:
        V = self.vocab_size
        if not isinstance(self.eos_token_id, tuple) or not self.eos_token_id:
            raise self._error("eos_token_id", f"is {shown(self.eos_token_id)}; expected an integer or a list of "
                                              f"integers")
        for t in self.eos_token_id:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < V:
                raise self._error("eos_token_id", f"holds {shown(t)}; expected token ids in 0..{V - 1} (the "
                                                  f"vocabulary)")
        for name in ("bos_token_id", "pad_token_id"):
            t = getattr(self, name)
            if t is not None and (isinstance(t, bool) or not isinstance(t, int)):
                raise self._error(name, f"is {shown(t)}; expected an integer token id or null")
            if t is not None and not -2**63 <= t < 2**63:  # no array of ids holds it (nor a repr of 4300 digits)
                raise self._error(name, f"is {shown(t)}; expected a token id (an int64) or null")
            if t is not None and not 0 <= t < V:  # unused by the forward pass; transformers only warns too
                warnings.warn(f"config field {shown(name)} is {shown(t)}, outside the vocabulary 0..{V - 1}",
                              stacklevel=4)


def _positive_int(err: Any, name: str, value: Any, limit: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise err(name, f"is {shown(value)}; expected a positive integer")
    if limit is not None and value > limit:
        raise err(name, f"is {shown(value)}, above lfm2np's bound {limit} for it (no released model comes close)")


def _positive_number(err: Any, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise err(name, f"is {shown(value)}; expected a positive finite number")


def _check_tensor_count(c: Config) -> None:
    """Refuse a config whose tensor list alone would be huge (layers x experts), before anything lists it."""
    per_layer = 12 + (3 * c.num_experts if c.is_moe else 3)
    if c.num_hidden_layers * per_layer > MAX_TENSORS:
        raise c._error("num_experts" if c.is_moe else "num_hidden_layers",
                       f"gives about {c.num_hidden_layers * per_layer:,} tensors, above lfm2np's bound {MAX_TENSORS:,}")
