"""Parameter counts and FLOPs: pure functions of a :class:`~lfm2np.config.Config`, derived from the one
tensor layout (:func:`lfm2np.schema.layout`), so the total is by construction the sum of the shapes the
loader expects.

FLOPs are exact counts of the matmul and attention multiply-adds (2 FLOPs each); norms, RoPE, activations,
gating products and softmax are not counted (they are O(D) per token, well under 1%).
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from ..config import Config, checked_config
from ..errors import Lfm2npError, shown
from ..schema import NORM_PARTS, layout

_NORM_ROLES = ("q_norm", "k_norm")  # per-head norms inside the attention mixer: not multiplications


def param_breakdown(config: Config) -> dict[str, Any]:
    """The parameters of every part of the model, hierarchically.

    ``{"embedding", "layers": [{index, kind, operator_norm, mixer: {role: n}, mixer_total, ffn_norm,
    ffn: {...}, total, active}], "final_norm", "lm_head", "by_kind": {...}}`` (LFM2-VL: also "vision_tower" and
    "projector"). ``active`` counts only ``k`` of the ``E`` experts of a MoE layer (router and expert bias are
    always active).
    """
    c = checked_config(config)
    layers: list[dict[str, Any]] = [
        {"index": i, "kind": c.layer_types[i], "operator_norm": 0, "mixer": {}, "ffn_norm": 0, "ffn": {},
         **({"post_operator_norm": 0, "post_ffn_norm": 0} if c.use_sandwich_norm else {})}
        for i in range(c.num_hidden_layers)]
    outer = {"embedding": 0, "final_norm": 0, "lm_head": 0, "dense_head": 0,  # dense_head: an embedding head's
             **({"vision_tower": 0, "projector": 0} if c.is_vision_language else {})}
    norm_count = 0
    for t in layout(c):
        if t.layer is None:
            outer[t.part] += t.size
            continue
        layer = layers[t.layer]
        if t.part in NORM_PARTS:
            layer[t.part] += t.size
            norm_count += 1
        elif t.part in ("conv", "attention"):
            layer["mixer"][t.role] = t.size
        elif t.part == "expert":
            layer["ffn"].setdefault("per_expert_sizes", {}).setdefault(t.expert, 0)
            layer["ffn"]["per_expert_sizes"][t.expert] += t.size
        else:  # dense FFN or router
            layer["ffn"][t.role] = t.size
    by_kind: dict[str, dict[str, int]] = {
        "conv_mixer": {"layers": 0, "params": 0},
        "attention_mixer": {"layers": 0, "params": 0},
        "dense_ffn": {"layers": 0, "params": 0},
        "moe_ffn": {"layers": 0, "params": 0, "active": 0},
        "norms": {"count": 1, "params": outer["final_norm"]},
    }
    for i, layer in enumerate(layers):
        layer["mixer_total"] = sum(layer["mixer"].values())
        layer["ffn"] = _ffn_summary(c, i, layer["ffn"])
        ffn = layer["ffn"]
        norms = sum(layer.get(part, 0) for part in NORM_PARTS)
        layer["total"] = norms + layer["mixer_total"] + ffn["total"]
        layer["active"] = norms + layer["mixer_total"] + ffn["active"]
        kind = by_kind["attention_mixer" if c.is_attention(i) else "conv_mixer"]
        kind["layers"] += 1
        kind["params"] += layer["mixer_total"]
        f = by_kind["moe_ffn" if ffn["kind"] == "moe" else "dense_ffn"]
        f["layers"] += 1
        f["params"] += ffn["total"]
        if ffn["kind"] == "moe":
            f["active"] += ffn["active"]
        by_kind["norms"]["params"] += norms
    by_kind["norms"]["count"] += norm_count
    return {**outer, "layers": layers, "by_kind": by_kind}


def _ffn_summary(c: Config, layer: int, sizes: dict[str, Any]) -> dict[str, Any]:
    if not c.is_moe_layer(layer):
        total = sizes["w1"] + sizes["w3"] + sizes["w2"]
        return {"kind": "dense", "w1": sizes["w1"], "w3": sizes["w3"], "w2": sizes["w2"], "total": total,
                "active": total}
    per = sizes.get("per_expert_sizes", {})
    per_expert = max(per.values(), default=0)
    router, bias = sizes["gate"], sizes.get("expert_bias", 0)
    E, k = c.num_experts, c.num_experts_per_tok
    return {"kind": "moe", "router": router, "expert_bias": bias, "experts": sum(per.values()),
            "per_expert": per_expert, "num_experts": E, "experts_per_token": k,
            "total": router + bias + sum(per.values()), "active": router + bias + k * per_expert}


def param_counts(config: Config) -> dict[str, Any]:
    """Totals: ``total``, ``active`` (per token: k of E experts), ``active_without_embedding``,
    ``total_without_embedding``, ``embedding``, ``lm_head`` and the ``breakdown``.

    Published "active" counts (8B-A1B: 1.5B, 24B-A2B: 2.3B) include the embedding, as ``active`` does.
    "Without embedding" removes the input embedding and an untied head alike.
    """
    b = param_breakdown(config)
    layers_total = sum(layer["total"] for layer in b["layers"])
    layers_active = sum(layer["active"] for layer in b["layers"])
    vision = {k: b[k] for k in ("vision_tower", "projector") if k in b}  # LFM2-VL: counted apart, and in the total
    outer = b["embedding"] + b["final_norm"] + b["lm_head"] + b["dense_head"] + sum(vision.values())
    total, active = outer + layers_total, outer + layers_active
    vocab = b["embedding"] + b["lm_head"]
    return {"total": total, "active": active, "embedding": b["embedding"], "lm_head": b["lm_head"],
            "total_without_embedding": total - vocab, "active_without_embedding": active - vocab, **vision,
            **({"text": total - sum(vision.values())} if vision else {}), "breakdown": b}


# ===================================================================================== FLOPs
def _matmul_flops_per_token(c: Config) -> tuple[int, int]:
    """(dense-equivalent, executed) FLOPs of every weight matmul of the layers for one token, the LM head
    excluded. Two FLOPs per multiply-add; the depthwise conv counts its L taps; biases and norms are not
    multiplications."""
    total = active = 0
    for layer in param_breakdown(c)["layers"]:
        m = layer["mixer"]
        mixer = 2 * sum(v for k, v in m.items() if k not in _NORM_ROLES and not k.endswith("bias"))
        ffn = layer["ffn"]
        if ffn["kind"] == "dense":
            f_total = f_active = 2 * ffn["total"]
        else:
            f_total = 2 * (ffn["router"] + ffn["experts"])
            f_active = 2 * (ffn["router"] + ffn["experts_per_token"] * ffn["per_expert"])
        total += mixer + f_total
        active += mixer + f_active
    return total, active


def _attention_flops(c: Config, keys: int) -> int:
    """QK^T and AV of one query token attending to ``keys`` positions, summed over attention layers (a
    sliding-window layer reads at most W of them)."""
    seen = len(c.full_attention_layers) * keys + len(c.sliding_layers) * min(keys, c.sliding_window or keys)
    return 4 * c.num_attention_heads * c.head_dim * seen


def _prefill_attention_flops(c: Config, n: int) -> int:
    """QK^T and AV of a causal prefill of ``n`` tokens: query t reads t+1 keys (at most W in a sliding layer)."""
    W = c.sliding_window or n
    sliding = W * (W + 1) // 2 + (n - W) * W if n > W else n * (n + 1) // 2
    return 4 * c.num_attention_heads * c.head_dim * (len(c.full_attention_layers) * (n * (n + 1) // 2)
                                                     + len(c.sliding_layers) * sliding)


def flops(config: Config, context: int, *, logits: str = "last") -> dict[str, Any]:
    """FLOPs of a prefill of ``context`` tokens and of one decode step at ``context`` cached positions.

    Returns ``{"context", "prefill": {"total", "active", "per_token_total", "per_token_active"},
    "decode": {"total", "active"}}``. ``total`` is dense-equivalent (every expert run), ``active`` is what
    a MoE executes (k experts). ``logits="last"`` counts the LM head once per prefill (inference engines
    compute only the last position's logits); ``"all"`` counts it for every prefill token.
    """
    c = checked_config(config)
    n = positive("context", context)
    if logits not in ("last", "all"):
        raise Lfm2npError(f"logits is {shown(logits)}; expected 'last' or 'all'")
    mm_total, mm_active = _matmul_flops_per_token(c)
    head = 2 * c.vocab_size * c.hidden_size
    attn_prefill = _prefill_attention_flops(c, n)
    n_heads = 1 if logits == "last" else n
    pre_total = n * mm_total + attn_prefill + n_heads * head
    pre_active = n * mm_active + attn_prefill + n_heads * head
    dec_attn = _attention_flops(c, n + 1)  # the new token attends to the n cached ones and itself
    return {"context": n,
            "prefill": {"total": pre_total, "active": pre_active,
                        "per_token_total": pre_total / n, "per_token_active": pre_active / n},
            "decode": {"total": mm_total + dec_attn + head, "active": mm_active + dec_attn + head}}


def positive(name: str, value: int) -> int:
    """``value`` as an int if it is a positive integer (at most 2**63 - 1, as the command line takes), else an
    :class:`Lfm2npError` naming ``name``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or not 0 < value < 2**63:
        raise Lfm2npError(f"{name} is {shown(value)}; expected a positive integer (up to 2**63 - 1)")
    return int(value)
