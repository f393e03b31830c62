"""The model configuration: a frozen dataclass built from a Hugging Face ``config.json``.

Both model types are handled: ``lfm2`` (dense) and ``lfm2_moe`` (mixture of experts), including the
legacy keys of early checkpoints:

=====================  ===============================================================
legacy key             meaning
=====================  ===============================================================
``block_ff_dim``       overrides ``intermediate_size`` (``lfm2``)
``full_attn_idxs``     list of attention layer indices, turned into ``layer_types``
``tie_embedding``      overrides ``tie_word_embeddings``
``theta``              RoPE base; wins over ``rope_theta`` as in transformers 4.x (transformers 5
                       ignores it: a config with only ``theta`` is read there as theta = 1e6)
=====================  ===============================================================

Shape fields (vocabulary, widths, layer and head counts, and for MoE the expert counts) are required:
a config that lacks one is rejected rather than silently given a library default. Behaviour switches
that transformers defaults (``norm_eps``, ``conv_L_cache``, ``use_expert_bias``, ...) take the same
defaults here. Unknown keys are ignored, as real configs carry many (``torch_dtype``, ``architectures``...).

Derived values are computed once, at construction: ``head_dim``, the effective dense FFN width
``ffn_dim`` and, per layer, its mixer kind (``layer_types``) and whether its FFN is a MoE block.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import Lfm2npError

MODEL_TYPES = ("lfm2", "lfm2_moe")
CONV, ATTENTION = "conv", "full_attention"
LAYER_KINDS = (CONV, ATTENTION)


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


@dataclass(frozen=True)
class Config:
    """An LFM2 / LFM2-MoE configuration, fields under their Hugging Face names.

    Build one with :func:`load_config` (a path, a checkpoint directory or a preset name) or
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
    # dense FFN width rule (lfm2 only; lfm2_moe uses intermediate_size as is)
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
    # special tokens
    bos_token_id: int | None = 1
    eos_token_id: tuple[int, ...] = (2,)
    pad_token_id: int | None = 0
    # an explicit head_dim key in config.json (transformers honours one); None means hidden_size / heads
    explicit_head_dim: int | None = None
    # where this config came from (a path or a preset name); informational only
    source: str | None = field(default=None, compare=False)

    # ---- derived, computed once in __post_init__ ----
    head_dim: int = field(init=False)
    ffn_dim: int = field(init=False)
    moe_layer_mask: tuple[bool, ...] = field(init=False)

    def __post_init__(self) -> None:
        for name in ("layer_types", "eos_token_id"):  # accept lists, store tuples (hashable, immutable)
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        self._validate()
        hd = self.explicit_head_dim or self.hidden_size // self.num_attention_heads
        if self.model_type == "lfm2":
            ffn = effective_ffn_dim(
                self.intermediate_size,
                self.block_auto_adjust_ff_dim,
                self.block_ffn_dim_multiplier,
                self.block_multiple_of,
            )
            moe = tuple(False for _ in range(self.num_hidden_layers))
        else:
            ffn = self.intermediate_size
            moe = tuple(i >= self.num_dense_layers for i in range(self.num_hidden_layers))
        if ffn <= 0:
            raise self._error("intermediate_size", f"gives an effective FFN width of {ffn}; expected > 0")
        object.__setattr__(self, "head_dim", hd)
        object.__setattr__(self, "ffn_dim", ffn)
        object.__setattr__(self, "moe_layer_mask", moe)

    # ---------------------------------------------------------------- queries
    @property
    def is_moe(self) -> bool:
        """True for ``lfm2_moe`` configs."""
        return self.model_type == "lfm2_moe"

    @property
    def attention_layers(self) -> tuple[int, ...]:
        """Indices of the attention layers."""
        return tuple(i for i, t in enumerate(self.layer_types) if t == ATTENTION)

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

    def is_attention(self, layer: int) -> bool:
        return self.layer_types[layer] == ATTENTION

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe_layer_mask[layer]

    def layer_pattern(self) -> str:
        """One character per layer: ``C`` conv, ``A`` attention; lower case when the FFN is a MoE block.
        E.g. LFM2-8B-A1B: ``CCacccacccacccacccaccacc``."""
        return "".join(("A" if self.is_attention(i) else "C").lower() if self.is_moe_layer(i)
                       else ("A" if self.is_attention(i) else "C") for i in range(self.num_hidden_layers))

    def replace(self, **changes: Any) -> "Config":
        """A copy with some fields changed (derived values recomputed and everything re-validated)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        values.update(changes)
        return Config(**values)

    def to_dict(self) -> dict[str, Any]:
        """The config as a canonical Hugging Face ``config.json`` dictionary (no legacy keys)."""
        d: dict[str, Any] = {
            "model_type": self.model_type,
            "architectures": ["Lfm2MoeForCausalLM" if self.is_moe else "Lfm2ForCausalLM"],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "layer_types": list(self.layer_types),
            "intermediate_size": self.intermediate_size,
            "norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "conv_L_cache": self.conv_L_cache,
            "conv_bias": self.conv_bias,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if len(self.eos_token_id) != 1 else self.eos_token_id[0],
            "pad_token_id": self.pad_token_id,
        }
        if self.explicit_head_dim is not None:
            d["head_dim"] = self.explicit_head_dim
        if self.is_moe:
            d.update(
                num_experts=self.num_experts,
                num_experts_per_tok=self.num_experts_per_tok,
                moe_intermediate_size=self.moe_intermediate_size,
                num_dense_layers=self.num_dense_layers,
                use_expert_bias=self.use_expert_bias,
                norm_topk_prob=self.norm_topk_prob,
                routed_scaling_factor=self.routed_scaling_factor,
            )
        else:
            d.update(
                block_auto_adjust_ff_dim=self.block_auto_adjust_ff_dim,
                block_ffn_dim_multiplier=self.block_ffn_dim_multiplier,
                block_multiple_of=self.block_multiple_of,
            )
        return d

    # ------------------------------------------------------------- building
    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str | None = None) -> "Config":
        """Parse a Hugging Face ``config.json`` dictionary (either model type, legacy keys included)."""
        return cls(**_normalise(d, source), source=source)

    # ----------------------------------------------------------- validation
    def _error(self, name: str, problem: str) -> Lfm2npError:
        where = f" in {self.source}" if self.source else ""
        return Lfm2npError(f"config field {name!r}{where} {problem}")

    def _validate(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise self._error("model_type", f"is {self.model_type!r}; expected one of {', '.join(MODEL_TYPES)}")
        positive = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "intermediate_size", "conv_L_cache", "max_position_embeddings"]
        if self.model_type == "lfm2" and self.block_auto_adjust_ff_dim:
            positive.append("block_multiple_of")
        if self.model_type == "lfm2_moe":
            positive += ["num_experts", "num_experts_per_tok", "moe_intermediate_size"]
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise self._error(name, f"is {value!r}; expected a positive integer")
        for name in ("norm_eps", "rope_theta", "routed_scaling_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise self._error(name, f"is {value!r}; expected a positive number")
        for name in ("conv_bias", "tie_word_embeddings", "block_auto_adjust_ff_dim", "use_expert_bias", "norm_topk_prob"):
            if not isinstance(getattr(self, name), bool):
                raise self._error(name, f"is {getattr(self, name)!r}; expected true or false")
        if self.explicit_head_dim is None and self.hidden_size % self.num_attention_heads:
            raise self._error(
                "num_attention_heads",
                f"is {self.num_attention_heads}, which does not divide hidden_size {self.hidden_size}",
            )
        if self.explicit_head_dim is not None and (
            isinstance(self.explicit_head_dim, bool) or not isinstance(self.explicit_head_dim, int)
            or self.explicit_head_dim <= 0 or self.explicit_head_dim % 2
        ):
            raise self._error("head_dim", f"is {self.explicit_head_dim!r}; expected a positive even integer")
        if self.explicit_head_dim is None and (self.hidden_size // self.num_attention_heads) % 2:
            raise self._error(
                "num_attention_heads",
                f"gives an odd head_dim {self.hidden_size // self.num_attention_heads}; RoPE needs an even one",
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise self._error(
                "num_key_value_heads",
                f"is {self.num_key_value_heads}, which does not divide num_attention_heads {self.num_attention_heads}",
            )
        if not isinstance(self.layer_types, tuple) or len(self.layer_types) != self.num_hidden_layers:
            raise self._error(
                "layer_types",
                f"has {len(self.layer_types)} entries; expected num_hidden_layers = {self.num_hidden_layers}",
            )
        for i, kind in enumerate(self.layer_types):
            if kind not in LAYER_KINDS:
                raise self._error(f"layer_types[{i}]", f"is {kind!r}; expected one of {', '.join(LAYER_KINDS)}")
        if self.model_type == "lfm2_moe":
            if self.num_experts_per_tok > self.num_experts:
                raise self._error(
                    "num_experts_per_tok",
                    f"is {self.num_experts_per_tok}, more than num_experts {self.num_experts}",
                )
            if isinstance(self.num_dense_layers, bool) or not isinstance(self.num_dense_layers, int) \
                    or not 0 <= self.num_dense_layers <= self.num_hidden_layers:
                raise self._error(
                    "num_dense_layers",
                    f"is {self.num_dense_layers!r}; expected an integer in 0..{self.num_hidden_layers}",
                )
        if not self.eos_token_id or not all(isinstance(t, int) and not isinstance(t, bool) for t in self.eos_token_id):
            raise self._error("eos_token_id", f"is {self.eos_token_id!r}; expected an integer or a list of integers")


# ------------------------------------------------------------------ parsing
_SENTINEL = object()


def _normalise(d: Mapping[str, Any], source: str | None) -> dict[str, Any]:
    """Map a raw config.json dictionary (legacy keys included) onto Config's constructor arguments."""
    where = f" in {source}" if source else ""

    def error(name: str, problem: str) -> Lfm2npError:
        return Lfm2npError(f"config field {name!r}{where} {problem}")

    if not isinstance(d, Mapping):
        raise Lfm2npError(f"config{where} is a {type(d).__name__}; expected a JSON object")
    model_type = d.get("model_type", _SENTINEL)
    if model_type is _SENTINEL:
        raise error("model_type", "is missing; expected 'lfm2' or 'lfm2_moe'")
    if model_type not in MODEL_TYPES:
        raise error("model_type", f"is {model_type!r}; expected one of {', '.join(MODEL_TYPES)}")

    def require(name: str, *aliases: str) -> Any:
        for key in (*aliases, name):  # legacy aliases win, as in transformers' Lfm2Config
            if key in d and d[key] is not None:
                return d[key]
        names = " or ".join(repr(k) for k in (name, *aliases))
        raise error(name, f"is missing (looked for {names})")

    out: dict[str, Any] = {"model_type": model_type}
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"):
        out[name] = require(name)
    if model_type == "lfm2":
        out["intermediate_size"] = require("intermediate_size", "block_ff_dim")
    else:
        out["intermediate_size"] = require("intermediate_size")
        for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size"):
            out[name] = require(name)

    # layer kinds: layer_types, else full_attn_idxs, else every layer attention
    n_layers = out["num_hidden_layers"]
    if d.get("layer_types") is not None:
        if not isinstance(d["layer_types"], (list, tuple)):
            raise error("layer_types", f"is {d['layer_types']!r}; expected a list")
        out["layer_types"] = tuple(d["layer_types"])
    elif d.get("full_attn_idxs") is not None:
        idxs = d["full_attn_idxs"]
        if not isinstance(idxs, (list, tuple)) or not all(isinstance(i, int) for i in idxs):
            raise error("full_attn_idxs", f"is {idxs!r}; expected a list of layer indices")
        bad = [i for i in idxs if not (isinstance(n_layers, int) and 0 <= i < n_layers)]
        if bad:
            raise error("full_attn_idxs", f"has {bad}, outside 0..{n_layers}-1 (num_hidden_layers)")
        out["layer_types"] = tuple(ATTENTION if i in idxs else CONV for i in range(n_layers))
    else:
        out["layer_types"] = tuple(ATTENTION for _ in range(n_layers if isinstance(n_layers, int) else 0))

    # RoPE base: rope_parameters.rope_theta (transformers 5) / rope_theta / theta (legacy)
    rope = d.get("rope_parameters") or d.get("rope_scaling")
    theta = None
    if isinstance(rope, Mapping):
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            key = "rope_parameters" if d.get("rope_parameters") else "rope_scaling"
            raise error(f"{key}.rope_type", f"is {rope_type!r}; only 'default' RoPE is implemented")
        theta = rope.get("rope_theta")
    if theta is None:  # the legacy ``theta`` wins over ``rope_theta``, as in transformers 4.x's Lfm2Config
        theta = d.get("theta") if d.get("theta") is not None else d.get("rope_theta")
    if theta is not None:
        out["rope_theta"] = theta

    tie = d.get("tie_embedding", d.get("tie_word_embeddings"))
    if tie is not None:
        out["tie_word_embeddings"] = tie

    # optional switches, defaults as in transformers
    for name in ("norm_eps", "conv_L_cache", "conv_bias", "max_position_embeddings"):
        if d.get(name) is not None:
            out[name] = d[name]
    if model_type == "lfm2":
        out["block_auto_adjust_ff_dim"] = d.get("block_auto_adjust_ff_dim", True)
        out["block_ffn_dim_multiplier"] = d.get("block_ffn_dim_multiplier", 1.0)
        if d.get("block_multiple_of") is not None:
            out["block_multiple_of"] = d["block_multiple_of"]
    else:
        out["num_dense_layers"] = d.get("num_dense_layers", 2)
        for name, default in (("use_expert_bias", True), ("norm_topk_prob", True), ("routed_scaling_factor", 1.0)):
            value = d.get(name)
            out[name] = default if value is None else value
    if d.get("head_dim") is not None:
        out["explicit_head_dim"] = d["head_dim"]

    for name in ("bos_token_id", "pad_token_id"):
        if name in d:
            out[name] = d[name]
    eos = d.get("eos_token_id", 2)  # transformers' default; released LFM2 configs say 7 (<|im_end|>)
    out["eos_token_id"] = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
    return out
