"""Reading ``config.json`` dictionaries: the keys of every model type, their legacy spellings and defaults,
and the names and bounds :class:`lfm2np.config.Config` validates against.

:func:`normalise` maps a raw dictionary onto Config's constructor arguments, as transformers reads it:
legacy keys of early LFM2 checkpoints, transformers' defaults where a switch is missing, LFM3's RoPE
keyed by layer type. Types and ranges are checked by Config itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from .errors import Lfm2npError, shown
from .vision_config import TOWER_FIELDS, VisionConfig

MODEL_TYPES = ("lfm2", "lfm2_moe", "lfm3")
#: vision-language model types: an LFM2 text tower behind a SigLIP2 vision tower ("lfm2-vl": the remote-code spelling)
VL_MODEL_TYPES = ("lfm2_vl", "lfm2-vl")
#: transformers' development branch names the bidirectional LFM2 "lfm2_bidirectional": read as lfm2, not causal
BIDIRECTIONAL_TYPE = "lfm2_bidirectional"
#: how a sentence-transformers head pools the token vectors (``embed``): the first token (CLS; LFM2's BOS), the
#: mean of the real tokens, the last real token
POOLINGS = ("cls", "mean", "last")
CONV, ATTENTION, SLIDING = "conv", "full_attention", "sliding_attention"
LAYER_KINDS = {"lfm2": (CONV, ATTENTION), "lfm2_moe": (CONV, ATTENTION), "lfm3": (CONV, SLIDING, ATTENTION)}
ROPE_TYPES = ("default", "proportional")
#: How a ``"default"`` RoPE entry that carries ``partial_rotary_factor < 1`` is read: ``"trained"`` (the
#: partial rotation the released LFM3 checkpoints were trained with; lfm2np's default) or ``"transformers"``
#: (as transformers 5.24 computes it: "default" ignores the factor and rotates every dim). docs/ops/rope.md.
ROPE_READINGS = ("trained", "transformers")

#: Upper bounds on sizes: far above any released model, low enough that no config can make lfm2np allocate
#: or loop without end before a checkpoint is read (a tensor count bound caps layers x experts too).
LIMITS = {"vocab_size": 1 << 24, "hidden_size": 1 << 17, "num_hidden_layers": 4096, "num_attention_heads": 4096,
          "num_key_value_heads": 4096, "intermediate_size": 1 << 20, "moe_intermediate_size": 1 << 20,
          "num_experts": 1 << 16, "num_experts_per_tok": 1 << 16, "conv_L_cache": 1024,
          "max_position_embeddings": 1 << 26, "head_dim": 1 << 12, "sliding_window": 1 << 26,
          "block_multiple_of": 1 << 20}
MAX_TENSORS = 1 << 18


@dataclass(frozen=True)
class Rope:
    """The RoPE of one attention layer type: ``rope_type`` ("default" or "proportional"), base ``theta`` and
    ``partial_rotary_factor`` (None: the whole head rotates)."""

    kind: str
    rope_type: str = "default"
    theta: float = 1e6
    partial_rotary_factor: float | None = None

    def rotated_pairs(self, head_dim: int, reading: str = "trained") -> int | None:
        """How many of the hd/2 frequency pairs turn (None: all). "proportional" honours the factor:
        ``int(factor * hd // 2)`` pairs, the rest with frequency 0; "default" honours it only in the
        ``"trained"`` reading (transformers 5.24's "default" ignores it)."""
        p = self.partial_rotary_factor
        if p is None or p >= 1 or (self.rope_type == "default" and reading == "transformers"):
            return None
        return int(p * head_dim // 2)

    @property
    def ambiguous(self) -> bool:
        """A "default" label with a partial factor: the two readings of :data:`ROPE_READINGS` differ."""
        return self.rope_type == "default" and self.partial_rotary_factor is not None \
            and self.partial_rotary_factor < 1


_SENTINEL = object()
#: the config fields read as floats (a JSON integer there must fit one: 1e400 written out has 401 digits)
FLOAT_FIELDS = ("norm_eps", "rope_theta", "routed_scaling_factor", "block_ffn_dim_multiplier")
#: the keys of one LFM3 RoPE entry (``type`` is the legacy spelling of ``rope_type``)
LFM3_ROPE_KEYS = ("rope_type", "type", "rope_theta", "partial_rotary_factor")


def fits_float(name: str, value: Any, error: Any) -> Any:
    """``value``, unless it is an integer too large for a float (then ``error(name, problem)`` is raised): Python
    reads a JSON integer exactly, and turning 10**400 into a float raises OverflowError. Other values are
    returned as they are, for Config to check."""
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            float(value)
        except OverflowError:
            raise error(name, f"is an integer of {int(value.bit_length() * 0.30103) + 1} digits, too large for a "
                              f"float; expected a finite number") from None
    return value


def _key(key: Any) -> str:
    """A dictionary key as a message names it (a key given from Python need not be a string)."""
    return key if isinstance(key, str) else shown(key)


def normalise(d: Mapping[str, Any], source: str | None) -> dict[str, Any]:
    """Map a raw config.json dictionary (legacy keys included) onto Config's constructor arguments."""
    where = f" in {source}" if source else ""

    def error(name: str, problem: str) -> Lfm2npError:
        return Lfm2npError(f"config field {shown(name)}{where} {problem}")

    if not isinstance(d, Mapping):
        raise Lfm2npError(f"config{where} is a {type(d).__name__}; expected a JSON object")
    model_type = d.get("model_type", _SENTINEL)
    if model_type in VL_MODEL_TYPES:
        return _vision_language(d, source, error)
    if model_type is _SENTINEL:
        raise error("model_type", f"is missing; expected one of {', '.join(MODEL_TYPES)}")
    bidirectional = model_type == BIDIRECTIONAL_TYPE
    if bidirectional:
        model_type = "lfm2"
    if model_type not in MODEL_TYPES:
        raise error("model_type", f"is {shown(model_type)}; expected one of {', '.join(MODEL_TYPES)}, "
                                  f"or {BIDIRECTIONAL_TYPE}")
    lfm3 = model_type == "lfm3"

    def require(name: str, *aliases: str) -> Any:
        for key in (*aliases, name):  # legacy aliases win, as in transformers' Lfm2Config
            if key in d and d[key] is not None:
                return d[key]
        names = " or ".join(repr(k) for k in (name, *aliases))
        raise error(name, f"is missing (looked for {names})")

    out: dict[str, Any] = {"model_type": model_type}
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"):
        out[name] = require(name)
    out["intermediate_size"] = require("intermediate_size", *(("block_ff_dim",) if model_type == "lfm2" else ()))
    if model_type == "lfm2_moe":
        for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size"):
            out[name] = require(name)
    n_layers = out["num_hidden_layers"]
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or not 0 < n_layers <= LIMITS["num_hidden_layers"]:
        raise error("num_hidden_layers", f"is {shown(n_layers)}; expected a positive integer up to "
                                         f"{LIMITS['num_hidden_layers']}")
    out["layer_types"] = _layer_types(d, n_layers, lfm3, error)

    if lfm3:
        out.update(_lfm3_fields(d, out["layer_types"], error))
    else:
        out.update(_lfm2_rope(d, error))
        tie = d.get("tie_embedding", d.get("tie_word_embeddings"))
        if tie is not None:
            out["tie_word_embeddings"] = tie
    for name in ("norm_eps", "conv_L_cache", "conv_bias", "max_position_embeddings"):
        if d.get(name) is not None:
            out[name] = d[name]
    if model_type == "lfm2":
        out["block_auto_adjust_ff_dim"] = d.get("block_auto_adjust_ff_dim", True)
        out["block_ffn_dim_multiplier"] = d.get("block_ffn_dim_multiplier", 1.0)
        if d.get("block_multiple_of") is not None:
            out["block_multiple_of"] = d["block_multiple_of"]
    elif model_type == "lfm2_moe":
        out["num_dense_layers"] = d.get("num_dense_layers", 2)
        for name, default in (("use_expert_bias", True), ("norm_topk_prob", True), ("routed_scaling_factor", 1.0)):
            value = d.get(name)
            out[name] = default if value is None else value
    if d.get("head_dim") is not None:
        out["explicit_head_dim"] = d["head_dim"]
    ids = {"bos_token_id": 124_894, "pad_token_id": 124_893} if lfm3 else {}
    for name in ("bos_token_id", "pad_token_id"):
        out[name] = d[name] if name in d else ids.get(name, 1 if name == "bos_token_id" else 0)
    eos = d.get("eos_token_id", 124_900 if lfm3 else 2)  # transformers' defaults; released LFM2 configs say 7
    out["eos_token_id"] = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
    for name in FLOAT_FIELDS:
        if name in out:
            fits_float(name, out[name], error)
    if model_type == "lfm2":
        out.update(_bidirectional(d, bidirectional))
    out.update(_head(d, error))
    return out


def _bidirectional(d: Mapping[str, Any], typed: bool) -> dict[str, Any]:
    """An lfm2 config reads both ways (a centred conv, attention without the causal mask) when its model_type is
    transformers' "lfm2_bidirectional" or, in the released layout (model_type "lfm2" with remote code), when an
    architecture is one of the bidirectional classes (Lfm2BidirectionalModel, ...ForMaskedLM,
    Lfm2BidirForSequenceRouting) or auto_map points at modeling_lfm2_bidirectional. LFM2-ColBERT-350M
    (Lfm2Model) stays causal. ``conv_zero_padding``, when absent, is what the code the config is written for
    does: transformers' lfm2_bidirectional zeroes padded positions (its default, True); the released remote code
    does not, and the released checkpoints were trained without it (False)."""
    archs = d.get("architectures") if isinstance(d.get("architectures"), (list, tuple)) else ()
    auto = d.get("auto_map") if isinstance(d.get("auto_map"), Mapping) else {}
    named = any(isinstance(a, str) and a.startswith("Lfm2Bidir") for a in archs) or any(
        isinstance(v, str) and v.startswith("modeling_lfm2_bidirectional.") for v in auto.values())
    out: dict[str, Any] = {"causal": not (typed or named)}
    if not out["causal"]:
        zero = d.get("conv_zero_padding")
        out["conv_zero_padding"] = typed if zero is None else zero
    return out


def _head(d: Mapping[str, Any], error: Any) -> dict[str, Any]:
    """The sentence-transformers head (``sentence_transformers``: what :mod:`lfm2np.io.sentence_transformers`
    reads from modules.json, 1_Pooling and 1_Dense, or a GGUF's pooling_type and dense_2): pooling and the dense
    projection's width and bias."""
    head = d.get("sentence_transformers")
    if head is None:
        return {}
    if not isinstance(head, Mapping) or set(head) - {"pooling", "dense_out", "dense_bias"}:
        raise error("sentence_transformers", f"is {shown(head)}; expected an object with pooling, dense_out, "
                                             f"dense_bias")
    out = {"pooling": head.get("pooling")}
    if head.get("dense_out") is not None:
        out.update(dense_out=head["dense_out"], dense_bias=head.get("dense_bias", False))
    return out


def _layer_types(d: Mapping[str, Any], n_layers: int, lfm3: bool, error: Any) -> tuple[str, ...]:
    """layer_types, else full_attn_idxs (lfm2), else every layer attention (lfm2) or LFM3's default pattern."""
    if d.get("layer_types") is not None:
        types = d["layer_types"]
        if not isinstance(types, (list, tuple)):
            raise error("layer_types", f"is {shown(types)}; expected a list")
        return tuple("full_attention" if t == "attention" else t for t in types)  # transformers' legacy name
    if not lfm3 and d.get("full_attn_idxs") is not None:
        idxs = d["full_attn_idxs"]
        if not isinstance(idxs, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in idxs):
            raise error("full_attn_idxs", f"is {shown(idxs)}; expected a list of layer indices")
        bad = [i for i in idxs if not 0 <= i < n_layers]
        if bad:
            raise error("full_attn_idxs", f"has {shown(bad)}, outside 0..{n_layers - 1} (num_hidden_layers)")
        if len(set(idxs)) != len(idxs):
            raise error("full_attn_idxs", f"lists a layer twice: {shown(idxs)}")
        return tuple(ATTENTION if i in set(idxs) else CONV for i in range(n_layers))
    if lfm3:  # transformers' Lfm3Config default pattern
        return tuple(ATTENTION if i % 4 == 2 else SLIDING if i % 4 == 0 and i > 0 else CONV for i in range(n_layers))
    return tuple(ATTENTION for _ in range(n_layers))


def _lfm2_rope(d: Mapping[str, Any], error: Any) -> dict[str, Any]:
    """RoPE base of an lfm2/lfm2_moe config: rope_parameters.rope_theta (transformers 5) / rope_theta / theta."""
    rope = d.get("rope_parameters") or d.get("rope_scaling")
    key = "rope_parameters" if d.get("rope_parameters") else "rope_scaling"
    theta = None
    if rope is not None:
        if not isinstance(rope, Mapping):
            raise error(key, f"is {shown(rope)}; expected an object such as {{'rope_type': 'default', "
                             f"'rope_theta': ...}}")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise error(f"{key}.rope_type", f"is {shown(rope_type)}; only 'default' RoPE is implemented for LFM2")
        odd = [k for k in rope if k not in ("rope_type", "type", "rope_theta")]
        if odd:
            raise error(f"{key}.{_key(odd[0])}", f"is {shown(rope[odd[0]])}; an LFM2 {key} holds rope_type and "
                                                 f"rope_theta only "
                                           f"(per-layer-type RoPE is LFM3's)")
        theta = rope.get("rope_theta")
    if theta is None:  # the legacy ``theta`` wins over ``rope_theta``, as in transformers 4.x's Lfm2Config
        theta = d.get("theta") if d.get("theta") is not None else d.get("rope_theta")
    return {} if theta is None else {"rope_theta": theta}


def _lfm3_fields(d: Mapping[str, Any], layer_types: tuple[str, ...], error: Any) -> dict[str, Any]:
    """The lfm3-only keys with transformers 5.24's Lfm3Config defaults, and RoPE keyed by layer type."""
    out: dict[str, Any] = {"conv_L_cache": 7, "sliding_window": 256, "use_sandwich_norm": True,
                           "use_attention_gate": True, "explicit_head_dim": 128}
    for name in ("sliding_window", "use_sandwich_norm", "use_attention_gate", "attention_bias", "tie_word_embeddings"):
        if d.get(name) is not None:
            out[name] = d[name]
    if d.get("norm_eps") is None and d.get("rms_norm_eps") is not None:
        out["norm_eps"] = d["rms_norm_eps"]
    rope = d.get("rope_scaling") or d.get("rope_parameters")  # the legacy key wins, as in transformers
    key = "rope_scaling" if d.get("rope_scaling") else "rope_parameters"
    if rope is None:  # Lfm3Config's defaults (a flat rope_theta is then ignored, as transformers ignores it)
        rope = {SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
                ATTENTION: {"rope_type": "proportional", "rope_theta": 1_000_000.0, "partial_rotary_factor": 0.5}}
    if not isinstance(rope, Mapping) or not rope or not set(rope) <= {SLIDING, ATTENTION}:
        raise error(key, f"is {shown(rope)}; expected an object keyed by layer type ({SLIDING!r}, {ATTENTION!r}), "
                         f"each {{'rope_type': ..., 'rope_theta': ...}} (transformers cannot build LFM3 otherwise)")
    entries = []
    for kind, entry in rope.items():
        if not isinstance(entry, Mapping):
            raise error(f"{key}.{kind}", f"is {shown(entry)}; expected an object with rope_type and rope_theta")
        odd = [k for k in entry if k not in LFM3_ROPE_KEYS]
        if odd:  # a misspelt partial_rotary_factor would silently rotate the whole head
            raise error(f"{key}.{kind}.{_key(odd[0])}", f"is {shown(entry[odd[0]])}, not a key of an LFM3 RoPE entry "
                                                  f"(expected {', '.join(LFM3_ROPE_KEYS)})")
        theta = fits_float(f"{key}.{kind}.rope_theta",  # transformers' default_theta fills a gap
                           entry.get("rope_theta", d.get("rope_theta", 1e6)), error)
        factor = fits_float(f"{key}.{kind}.partial_rotary_factor",
                            entry.get("partial_rotary_factor", d.get("partial_rotary_factor")), error)
        entries.append(Rope(kind, entry.get("rope_type", entry.get("type", "default")), theta, factor))
    out["rope_parameters"] = tuple(entries)
    return out


def _vision_language(d: Mapping[str, Any], source: str | None, error: Any) -> dict[str, Any]:
    """An ``lfm2_vl`` config: its ``text_config`` read as an ``lfm2`` config (the top-level tie_word_embeddings
    wins, as in transformers' Lfm2VlConfig), and ``vision`` from ``vision_config`` and the top-level projector keys
    with Lfm2VlConfig's and Siglip2VisionConfig's defaults."""
    text, vision = d.get("text_config"), d.get("vision_config")
    for name, value in (("text_config", text), ("vision_config", vision)):
        if not isinstance(value, Mapping):
            raise error(name, f"is {value!r:.60}; expected an object (an LFM2-VL config nests its two towers)")
    text_type = text.get("model_type", "lfm2")
    if text_type != "lfm2":
        raise error("text_config.model_type", f"is {text_type!r}; LFM2-VL's text tower is 'lfm2'")
    out = normalise({**text, "model_type": "lfm2"}, source)
    tie = d.get("tie_embedding", d.get("tie_word_embeddings"))
    if tie is not None:
        out["tie_word_embeddings"] = tie
    if vision.get("model_type", "siglip2_vision_model") != "siglip2_vision_model":
        raise error("vision_config.model_type", f"is {vision.get('model_type')!r}; lfm2np implements "
                                                 f"'siglip2_vision_model' (SigLIP2 NaFlex)")
    checks = ((vision, "hidden_act", "gelu_pytorch_tanh", "vision_config."),
              (vision, "vision_use_head", False, "vision_config."), (d, "projector_hidden_act", "gelu", ""))
    for where, key, expected, prefix in checks:
        value = where.get(key, True if key == "vision_use_head" else expected)  # Siglip2VisionConfig: head on
        if value != expected or isinstance(value, bool) != isinstance(expected, bool):
            raise error(prefix + key, f"is {value!r:.60}; LFM2-VL uses {expected!r} (lfm2np implements that only)")
    args: dict[str, Any] = {}
    for name in TOWER_FIELDS:
        if vision.get(name) is not None:
            args[name] = vision[name]
        elif name in TOWER_FIELDS[:4]:
            raise error(f"vision_config.{name}", "is missing")
    for name in ("downsample_factor", "projector_hidden_size", "projector_bias", "projector_use_layernorm"):
        if d.get(name) is not None:
            args[name] = d[name]
    token = d.get("image_token_id", d.get("image_token_index"))
    if token is not None:
        args["image_token_id"] = token
    fits_float("vision_config.layer_norm_eps", args.get("layer_norm_eps", 1e-6), error)
    out["vision"] = VisionConfig(**args)
    return out
