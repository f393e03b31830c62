"""Configs of the released LFM2, LFM2.5 and LFM3 families, and tiny configs for tests.

Each preset is written as the ``config.json`` dictionary the checkpoint ships (legacy keys kept where the
release uses them), so presets go through exactly the same parser as real files.

Values that Liquid AI has not confirmed publicly (taken from third-party copies of the configs) are
listed in :data:`UNCONFIRMED`, the one place to look before trusting them.
"""

from __future__ import annotations

from .config import Config

_LFM2_COMMON = {
    "model_type": "lfm2",
    "vocab_size": 65536,
    "num_key_value_heads": 8,
    "conv_L_cache": 3,
    "conv_bias": False,
    "norm_eps": 1e-5,
    "rope_theta": 1_000_000.0,
    "tie_embedding": True,
    "max_position_embeddings": 128_000,
    "bos_token_id": 1,
    "eos_token_id": 7,
    "pad_token_id": 0,
    "block_multiple_of": 256,
    "block_ffn_dim_multiplier": 1.0,
}
_SMALL_ATTN = [2, 5, 8, 10, 12, 14]
_350M = {"hidden_size": 1024, "num_hidden_layers": 16, "num_attention_heads": 16, "block_ff_dim": 6656,
         "block_auto_adjust_ff_dim": True, "full_attn_idxs": _SMALL_ATTN}

_LFM2_MOE_COMMON = {
    "model_type": "lfm2_moe",
    "vocab_size": 65536,
    "hidden_size": 2048,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "conv_L_cache": 3,
    "conv_bias": False,
    "norm_eps": 1e-5,
    "rope_theta": 1_000_000.0,
    "tie_word_embeddings": True,
    "max_position_embeddings": 128_000,
    "bos_token_id": 1,
    "eos_token_id": 7,
    "pad_token_id": 0,
    "num_experts_per_tok": 4,
    "num_dense_layers": 2,
    "use_expert_bias": True,
    "norm_topk_prob": True,
    "routed_scaling_factor": 1.0,
}


def _layer_types(n: int, attention: list[int]) -> list[str]:
    return ["full_attention" if i in attention else "conv" for i in range(n)]


_RELEASED: dict[str, dict] = {
    "LFM2-350M": {**_LFM2_COMMON, "hidden_size": 1024, "num_hidden_layers": 16, "num_attention_heads": 16,
                  "block_ff_dim": 6656, "block_auto_adjust_ff_dim": True, "full_attn_idxs": _SMALL_ATTN},
    "LFM2-700M": {**_LFM2_COMMON, "hidden_size": 1536, "num_hidden_layers": 16, "num_attention_heads": 24,
                  "block_ff_dim": 10240, "block_auto_adjust_ff_dim": True, "full_attn_idxs": _SMALL_ATTN},
    "LFM2-1.2B": {**_LFM2_COMMON, "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
                  "block_ff_dim": 12288, "block_auto_adjust_ff_dim": True, "full_attn_idxs": _SMALL_ATTN},
    "LFM2-2.6B": {**_LFM2_COMMON, "hidden_size": 2048, "num_hidden_layers": 30, "num_attention_heads": 32,
                  "block_ff_dim": 10752, "block_auto_adjust_ff_dim": False,
                  "layer_types": _layer_types(30, [2, 5, 9, 13, 17, 21, 24, 27])},
    "LFM2.5-1.2B": {**_LFM2_COMMON, "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
                    "block_ff_dim": 12288, "block_auto_adjust_ff_dim": True,
                    "layer_types": _layer_types(16, _SMALL_ATTN)},
    "LFM2-8B-A1B": {**_LFM2_MOE_COMMON, "num_hidden_layers": 24, "intermediate_size": 7168,
                    "moe_intermediate_size": 1792, "num_experts": 32,
                    "layer_types": _layer_types(24, [2, 6, 10, 14, 18, 21])},
    "LFM2.5-8B-A1B": {**_LFM2_MOE_COMMON, "num_hidden_layers": 24, "intermediate_size": 7168,
                      "moe_intermediate_size": 1792, "num_experts": 32, "vocab_size": 128_000,
                      "rope_theta": None, "rope_parameters": {"rope_type": "default", "rope_theta": 5_000_000.0},
                      "bos_token_id": 124894, "eos_token_id": 124900, "pad_token_id": 124893,
                      "layer_types": _layer_types(24, [2, 6, 10, 14, 18, 21])},
    # not LFM2-2.6B with new weights: LFM2.5's 128,000-token vocabulary and ids, RoPE base 1e7, 131,072 positions
    # (a third-party copy of its config.json; the shape as LFM2-2.6B's: see UNCONFIRMED and SOURCES)
    "LFM2.5-2.6B": {**_LFM2_COMMON, "hidden_size": 2048, "num_hidden_layers": 30, "num_attention_heads": 32,
                    "block_ff_dim": 10752, "block_auto_adjust_ff_dim": False, "vocab_size": 128_000,
                    "rope_theta": None, "rope_parameters": {"rope_type": "default", "rope_theta": 10_000_000.0},
                    "max_position_embeddings": 131_072, "bos_token_id": 124894, "eos_token_id": 124900,
                    "pad_token_id": 124893, "layer_types": _layer_types(30, [2, 5, 9, 13, 17, 21, 24, 27])},
    # the bidirectional LFM2 (built on LFM2.5-350M-Base: LFM2-350M's shape), with their sentence-transformers heads
    "LFM2.5-Embedding-350M": {**_LFM2_COMMON, **_350M, "architectures": ["Lfm2BidirectionalModel"],
                              "sentence_transformers": {"pooling": "cls"}},
    "LFM2.5-ColBERT-350M": {**_LFM2_COMMON, **_350M, "architectures": ["Lfm2BidirectionalModel"], "vocab_size": 64_402,
                            "sentence_transformers": {"pooling": None, "dense_out": 128, "dense_bias": False}},
    "LFM2.5-Encoder-350M": {**_LFM2_COMMON, **_350M, "architectures": ["Lfm2BidirectionalForMaskedLM"]},
    "LFM2-ColBERT-350M": {**_LFM2_COMMON, **_350M, "architectures": ["Lfm2Model"],  # causal
                          "sentence_transformers": {"pooling": None, "dense_out": 128, "dense_bias": False}},
    "LFM2-24B-A2B": {**_LFM2_MOE_COMMON, "num_hidden_layers": 40, "intermediate_size": 11776,
                     "moe_intermediate_size": 1536, "num_experts": 64,
                     "layer_types": _layer_types(40, [i for i in range(40) if i % 4 == 2])},
    "LFM2.5-230M": {**_LFM2_COMMON, "hidden_size": 1024, "num_hidden_layers": 14, "num_attention_heads": 16,
                    "block_ff_dim": 2560, "block_auto_adjust_ff_dim": False,
                    "layer_types": _layer_types(14, [2, 4, 6, 8, 10, 12])},
    # transformers 5.24's Lfm3Config defaults, which are LFM3-1.7B's shape; RoPE written with the label that
    # means what the checkpoint was trained with ("proportional": the released config reportedly says
    # "default" with partial_rotary_factor 0.5, which transformers reads as a full rotation; docs/ops/rope.md)
    "LFM3-1.7B": {"model_type": "lfm3", "vocab_size": 128_000, "hidden_size": 2048, "num_hidden_layers": 24,
                  "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 128, "intermediate_size": 7680,
                  "conv_L_cache": 7, "sliding_window": 256, "use_sandwich_norm": True, "use_attention_gate": True,
                  "norm_eps": 1e-5, "tie_word_embeddings": True, "max_position_embeddings": 262_144,
                  "bos_token_id": 124894, "eos_token_id": 124900, "pad_token_id": 124893,
                  "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                                      "full_attention": {"rope_type": "proportional", "rope_theta": 1_000_000.0,
                                                         "partial_rotary_factor": 0.5}},
                  "layer_types": ["full_attention" if i % 4 == 2 else "sliding_attention" if i % 4 == 0 and i > 0
                                  else "conv" for i in range(24)]},
}


def _vl(text: str, width: int, mlp: int, layers: int, heads: int, layernorm: bool) -> dict:
    """An LFM2-VL config: the text preset ``text`` behind a SigLIP2 NaFlex tower (patch 16, 16 x 16 positions)."""
    return {"model_type": "lfm2_vl", "text_config": _RELEASED[text], "image_token_id": 396, "downsample_factor": 2,
            "projector_hidden_size": 2560, "projector_bias": True, "projector_hidden_act": "gelu",
            "projector_use_layernorm": layernorm, "tie_word_embeddings": True,
            "vision_config": {"model_type": "siglip2_vision_model", "hidden_size": width, "intermediate_size": mlp,
                              "num_hidden_layers": layers, "num_attention_heads": heads, "num_channels": 3,
                              "patch_size": 16, "num_patches": 256, "layer_norm_eps": 1e-6,
                              "hidden_act": "gelu_pytorch_tanh", "vision_use_head": False}}


# LFM2-VL / LFM2.5-VL: SigLIP2 base (768 wide, 12 layers) on the 450M models, SigLIP2 so400m (1152, 27) on the others
_RELEASED.update({
    "LFM2-VL-450M": _vl("LFM2-350M", 768, 3072, 12, 12, True),
    "LFM2-VL-1.6B": _vl("LFM2-1.2B", 1152, 4304, 27, 16, True),
    "LFM2-VL-3B": _vl("LFM2-2.6B", 1152, 4304, 27, 16, True),
    "LFM2.5-VL-450M": _vl("LFM2-350M", 768, 3072, 12, 12, False),
    "LFM2.5-VL-1.6B": _vl("LFM2.5-1.2B", 1152, 4304, 27, 16, False),
})
# Checkpoints with the shape of another preset (fine-tunes, re-releases): name -> preset it equals. That the
# LFM2.5-350M, LFM2.5-2.6B and LFM2-2.6B-Exp configs equal LFM2-350M's and LFM2-2.6B's is itself unconfirmed
# (third-party copies): UNCONFIRMED lists their shape fields.
ALIASES: dict[str, str] = {
    "LFM2.5-350M": "LFM2-350M",
    "LFM2.5-1.2B-Base": "LFM2.5-1.2B", "LFM2.5-1.2B-Instruct": "LFM2.5-1.2B",
    "LFM2.5-1.2B-Thinking": "LFM2.5-1.2B", "LFM2.5-1.2B-JP": "LFM2.5-1.2B",
    "LFM2-2.6B-Exp": "LFM2-2.6B",
}

_SHAPE = ("hidden_size", "num_hidden_layers", "layer_types", "intermediate_size")

#: Preset values not confirmed by Liquid AI (from third-party copies of the configs). Keep this list
#: in step with ``_RELEASED`` above: it is what the docs and the calculators cite as uncertain.
UNCONFIRMED: dict[str, tuple[str, ...]] = {
    "LFM2.5-8B-A1B": ("vocab_size", "rope_theta", "bos_token_id", "eos_token_id", "pad_token_id"),
    "LFM2-24B-A2B": ("layer_types", "intermediate_size", "rope_theta", "max_position_embeddings",
                     "norm_topk_prob", "routed_scaling_factor", "use_expert_bias"),
    "LFM2.5-230M": ("layer_types", "num_hidden_layers"),
    "LFM2.5-1.2B": ("hidden_size", "intermediate_size", "layer_types"),
    "LFM2.5-2.6B": _SHAPE + ("vocab_size", "rope_theta", "max_position_embeddings", "bos_token_id", "eos_token_id",
                             "pad_token_id"),
    "LFM3-1.7B": ("max_position_embeddings", "rope_parameters"),
    # LFM2-VL: the towers as reported by third parties; the projector width and LayerNorm from early or
    # third-party configs (LFM2.5-VL's say projector_use_layernorm false; transformers' default is true)
    # ("vision": the tower's shape, projector_hidden_size and projector_use_layernorm)
    **{name: ("vision",) for name in ("LFM2-VL-450M", "LFM2-VL-1.6B", "LFM2-VL-3B")},
    **{name: ("vision", *_SHAPE) for name in ("LFM2.5-VL-450M", "LFM2.5-VL-1.6B")},
    "LFM2.5-Encoder-350M": ("causal",),
    "LFM2-ColBERT-350M": ("vocab_size", "pooling", "dense_out", "dense_bias"),
    "LFM2.5-ColBERT-350M": ("dense_bias",),
    # aliases whose equality with their preset is itself from third-party copies of the configs
    "LFM2-2.6B-Exp": _SHAPE,
}

#: Where each LFM2.5 and bidirectional preset's values come from, best source first (checked December 2026 with
#: the search tools of this project's development; "third-party" = a copy not published by Liquid AI).
SOURCES: dict[str, str] = {
    "LFM2.5-1.2B": "model card (16 layers, 10 conv + 6 GQA; vocabulary 65,536; 1.17B parameters; 32,768 context), "
                   "LiquidAI's generation_config.json (bos 1, eos 7, pad 0); the shape of LFM2-1.2B, which the card's "
                   "parameter count matches",
    "LFM2.5-350M": "LiquidAI's generation_config.json (bos 1, eos 7, pad 0); llama.cpp's converter takes LFM2.5-350M "
                   "as the reference of the 'lfm2' tokenizer (LFM2's 65,536 tokens); LiquidAI's config.json of "
                   "LFM2.5-Encoder-350M-Prompt-Router (built on LFM2.5-350M-Base): LFM2-350M's shape",
    "LFM2.5-230M": "llama.cpp's lfm2 graph (n_ff 2560 is its 230M size type); vLLM's LFM2.5 recipe (32K context); "
                   "the layer count and pattern from third-party copies",
    "LFM2.5-8B-A1B": "vLLM's LFM2.5 recipe (128K context); llama.cpp's converter lists a tokenizer of its own for it "
                     "(not LFM2's); vocabulary, RoPE base and ids from third-party copies",
    "LFM2.5-2.6B": "third-party copy of its config.json (vocabulary 128,000, RoPE base 1e7, 131,072 positions, ids "
                   "124894 / 124900 / 124893); a third-party listing gives 2.7B parameters, which the 128,000-token "
                   "vocabulary gives (LFM2-2.6B's 65,536 give 2.57B); LiquidAI's config.json was not readable here",
    "LFM2.5-Embedding-350M": "model card (LFM2.5-350M-Base with bidirectional patches; 10 conv + 6 attention layers "
                             "and a pooling module; CLS pooling of 1024 dimensions; vocabulary 65,536; ~354M "
                             "parameters; 32,768 context, 512-token documents); conv_zero_padding absent (read as "
                             "false: transformers' development branch says these checkpoints were trained without it)",
    "LFM2.5-ColBERT-350M": "model card (vocabulary 64,402; a dense layer to 128 dimensions per token; ~353M "
                           "parameters); the dense head's lack of a bias from a third-party MLX conversion",
    "LFM2.5-Encoder-350M": "LiquidAI's config.json of LFM2.5-Encoder-350M-Prompt-Router (a fine-tune of it: "
                           "modeling_lfm2_bidirectional, LFM2-350M's shape); 8,192 context from a third-party page",
    "LFM2-ColBERT-350M": "model card (a late-interaction retriever on LFM2-350M, causal: llama.cpp converts its "
                         "Lfm2Model without causal_attention = false); its vocabulary and dense head as "
                         "LFM2.5-ColBERT-350M's are unconfirmed",
}

#: The context each model card states as supported (trained), where it differs from what the config allows:
#: max_position_embeddings is 128,000 in LFM2 configs, but the cards state 32,768. The calculators cap
#: "how long a context fits" here and say so.
SUPPORTED_CONTEXT: dict[str, int] = {
    "LFM2-350M": 32_768, "LFM2-700M": 32_768, "LFM2-1.2B": 32_768, "LFM2-2.6B": 32_768, "LFM2.5-1.2B": 32_768,
    "LFM2-8B-A1B": 32_768, "LFM2.5-8B-A1B": 128_000, "LFM2-24B-A2B": 32_768, "LFM2.5-230M": 32_768,
    "LFM3-1.7B": 262_144, "LFM2.5-Embedding-350M": 32_768, "LFM2.5-ColBERT-350M": 32_768,
    "LFM2.5-Encoder-350M": 8_192,
}

#: Published parameter counts (model cards), for the calculators to check against.
MODEL_CARD_PARAMS: dict[str, int | str] = {
    "LFM2-350M": 354_483_968,
    "LFM2-700M": 742_489_344,
    "LFM2-1.2B": 1_170_340_608,
    "LFM2-2.6B": 2_569_272_320,
    "LFM2.5-1.2B": "1.17B",
    "LFM2-8B-A1B": "8.3B total / 1.5B active",
    "LFM2.5-8B-A1B": "8.3B total / 1.5B active (card; the 128000-token vocabulary makes it ~8.47B)",
    "LFM2-24B-A2B": "24B total / 2.3B active",
    "LFM2.5-230M": "230M (this preset: 229,693,184)",
    "LFM2-VL-450M": "450M", "LFM2-VL-1.6B": "1.6B", "LFM2-VL-3B": "3B", "LFM2.5-VL-450M": "450M",
    "LFM2.5-VL-1.6B": "1.6B",
    "LFM3-1.7B": 1_728_801_536,  # transformers 5.24's Lfm3Config() counted on the meta device; the card: 1.73B
    "LFM2.5-2.6B": "2.7B (a third-party listing)",
    "LFM2.5-Embedding-350M": "~354M (card)",
    "LFM2.5-ColBERT-350M": "~353M (card)",
    "LFM2.5-Encoder-350M": "354,483,968 (a third-party page)",
    "LFM2-ColBERT-350M": "350M (the name; not checked)",
}

# Tiny configs: odd sizes so that transposed or mis-split weights cannot line up by accident.
_TINY: dict[str, dict] = {
    "tiny-dense": {**_LFM2_COMMON, "vocab_size": 97, "hidden_size": 48, "num_hidden_layers": 4,
                   "num_attention_heads": 6, "num_key_value_heads": 2, "intermediate_size": 80,
                   "block_auto_adjust_ff_dim": False, "layer_types": _layer_types(4, [1, 3]),
                   "max_position_embeddings": 512},
    "tiny-moe": {**_LFM2_MOE_COMMON, "vocab_size": 97, "hidden_size": 48, "num_hidden_layers": 4,
                 "num_attention_heads": 6, "num_key_value_heads": 2, "intermediate_size": 72,
                 "moe_intermediate_size": 24, "num_experts": 6, "num_experts_per_tok": 2,
                 "num_dense_layers": 1, "layer_types": _layer_types(4, [2]), "max_position_embeddings": 512},
}

PRESETS: dict[str, dict] = {**_RELEASED, **_TINY}
RELEASED = tuple(_RELEASED)


def _key(name: str) -> str:
    name = name.strip().lower()
    return name[len("liquidai/"):] if name.startswith("liquidai/") else name


_BY_KEY = {_key(n): n for n in [*PRESETS, *ALIASES]}


def supported_context(config: Config) -> tuple[int, str]:
    """The longest context ``config`` is meant to run at, and where that number comes from: the model card's
    (:data:`SUPPORTED_CONTEXT`) for a preset or alias, else the config's ``max_position_embeddings``."""
    name = canonical(config.source or "")
    if name in SUPPORTED_CONTEXT:
        return SUPPORTED_CONTEXT[name], "model card"
    return config.max_position_embeddings, "config"


def unconfirmed(config: Config) -> tuple[str, ...]:
    """The fields of the preset ``config`` came from that Liquid AI has not confirmed (:data:`UNCONFIRMED`;
    an alias inherits its preset's and adds its own); empty for a checkpoint's own config."""
    found = _BY_KEY.get(_key(config.source or ""))
    if found is None:
        return ()
    fields = UNCONFIRMED.get(ALIASES.get(found, found), ()) + UNCONFIRMED.get(found, ())
    return tuple(dict.fromkeys(fields))


def names() -> list[str]:
    """All preset names, released models first, then the aliases."""
    return [*PRESETS, *ALIASES]


def canonical(name: str) -> str | None:
    """The preset ``name`` refers to (through :data:`ALIASES`), or None."""
    found = _BY_KEY.get(_key(name))
    return ALIASES.get(found, found) if found else None


def find(name: str) -> Config | None:
    """The preset called ``name`` (any case, ``LiquidAI/`` prefix optional, aliases included), or None.
    Its ``source`` is the name asked for."""
    found = _BY_KEY.get(_key(name))
    if found is None:
        return None
    return Config.from_dict(PRESETS[ALIASES.get(found, found)], source=found)
