"""Parameter, FLOP and memory calculators: pure functions of a :class:`~lfm2np.config.Config`.

Everything here is computed from the config's dimensions; no tensor is ever allocated. What is exact and
what is an estimate (see docs/calculators.md):

- parameters: exact (tested against :func:`lfm2np.weights.expected_tensors` for every preset);
- weight bytes: exact for float32/float16/bfloat16 checkpoints and for the tensor data of GGUF files
  (per-tensor llama.cpp types, see :mod:`lfm2np.quant`);
- KV cache and conv state: exact for llama.cpp's layout (attention layers only, ``G * hd`` per K and V per
  token; conv state ``(L-1) * D`` float32 values per conv layer and sequence);
- FLOPs: exact counts of the matmul and attention multiply-adds (2 FLOPs each); norms, RoPE, activations,
  gating products and softmax are not counted (they are O(D) per token, well under 1%);
- the compute buffer for a prefill chunk: an estimate (the peak of float32 intermediates of one layer).

Dimension legend: T tokens, S cached+new positions, D hidden, H query heads, G KV heads, hd head dim,
F FFN width, E experts, k experts per token, Fm expert width, V vocab, L conv kernel.
"""

from __future__ import annotations

import numbers
import re
from typing import Any, Iterable

import numpy as np

from . import quant
from .config import ATTENTION, CONV, Config
from .errors import Lfm2npError

# ================================================================================ parameters


def _mixer_params(c: Config, layer: int) -> dict[str, int]:
    D, H, G, hd, L = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.conv_L_cache
    if c.is_attention(layer):
        return {"q_proj": H * hd * D, "k_proj": G * hd * D, "v_proj": G * hd * D, "out_proj": D * H * hd,
                "q_layernorm": hd, "k_layernorm": hd}
    p = {"in_proj": 3 * D * D, "conv": D * L, "out_proj": D * D}
    if c.conv_bias:
        p.update(in_proj_bias=3 * D, conv_bias=D, out_proj_bias=D)
    return p


def _ffn_params(c: Config, layer: int) -> dict[str, Any]:
    D = c.hidden_size
    if not c.is_moe_layer(layer):
        F = c.ffn_dim
        p = {"kind": "dense", "w1": F * D, "w3": F * D, "w2": D * F}
        p["total"] = p["active"] = 3 * F * D
        return p
    E, k, Fm = c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size
    per_expert = 3 * D * Fm
    router = E * D
    bias = E if c.use_expert_bias else 0
    return {"kind": "moe", "router": router, "expert_bias": bias, "experts": E * per_expert,
            "per_expert": per_expert, "num_experts": E, "experts_per_token": k,
            "total": router + bias + E * per_expert, "active": router + bias + k * per_expert}


def param_breakdown(config: Config) -> dict[str, Any]:
    """The parameters of every part of the model, hierarchically.

    ``{"embedding", "layers": [{index, kind, operator_norm, mixer: {...}, ffn_norm, ffn: {...}, total, active}],
    "final_norm", "lm_head", "by_kind": {...}}``. ``active`` counts only ``k`` of the ``E`` experts of a MoE
    layer (router and expert bias are always active).
    """
    c = config
    D, V = c.hidden_size, c.vocab_size
    layers = []
    by_kind: dict[str, dict[str, int]] = {
        "conv_mixer": {"layers": 0, "params": 0},
        "attention_mixer": {"layers": 0, "params": 0},
        "dense_ffn": {"layers": 0, "params": 0},
        "moe_ffn": {"layers": 0, "params": 0, "active": 0},
        "norms": {"count": 0, "params": 0},
    }
    for i in range(c.num_hidden_layers):
        mixer = _mixer_params(c, i)
        ffn = _ffn_params(c, i)
        mixer_total = sum(mixer.values())
        total = D + mixer_total + D + ffn["total"]
        layers.append({"index": i, "kind": c.layer_types[i], "operator_norm": D, "mixer": mixer,
                       "mixer_total": mixer_total, "ffn_norm": D, "ffn": ffn,
                       "total": total, "active": total - ffn["total"] + ffn["active"]})
        kind = by_kind["attention_mixer" if c.is_attention(i) else "conv_mixer"]
        kind["layers"] += 1
        kind["params"] += mixer_total
        f = by_kind["moe_ffn" if ffn["kind"] == "moe" else "dense_ffn"]
        f["layers"] += 1
        f["params"] += ffn["total"]
        if ffn["kind"] == "moe":
            f["active"] += ffn["active"]
        by_kind["norms"]["count"] += 2
        by_kind["norms"]["params"] += 2 * D
    by_kind["norms"]["count"] += 1
    by_kind["norms"]["params"] += D  # final norm
    return {"embedding": V * D, "layers": layers, "final_norm": D,
            "lm_head": 0 if c.tie_word_embeddings else V * D, "by_kind": by_kind}


def param_counts(config: Config) -> dict[str, Any]:
    """Totals: ``total``, ``active`` (per token: k of E experts), ``active_without_embedding``,
    ``total_without_embedding``, ``embedding``, ``lm_head`` and the ``breakdown``.

    Published "active" counts (8B-A1B: 1.5B, 24B-A2B: 2.3B) include the embedding, as ``active`` does.
    "Without embedding" removes the input embedding and an untied head alike.
    """
    b = param_breakdown(config)
    layers_total = sum(l["total"] for l in b["layers"])
    layers_active = sum(l["active"] for l in b["layers"])
    outer = b["embedding"] + b["final_norm"] + b["lm_head"]
    total, active = outer + layers_total, outer + layers_active
    vocab = b["embedding"] + b["lm_head"]
    return {"total": total, "active": active, "embedding": b["embedding"], "lm_head": b["lm_head"],
            "total_without_embedding": total - vocab, "active_without_embedding": active - vocab,
            "breakdown": b}


# ===================================================================================== FLOPs


def _matmul_flops_per_token(c: Config) -> tuple[int, int]:
    """(dense-equivalent, executed) FLOPs of every weight matmul of the layers for one token, the LM head
    excluded. Two FLOPs per multiply-add; the depthwise conv counts its L taps."""
    total = active = 0
    for i, layer in enumerate(param_breakdown(c)["layers"]):
        m = layer["mixer"]
        mixer = 2 * sum(v for k, v in m.items() if not k.endswith("layernorm") and not k.endswith("bias"))
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
    """QK^T and AV of one query token attending to ``keys`` positions, summed over attention layers."""
    return len(c.attention_layers) * 4 * c.num_attention_heads * c.head_dim * keys


def flops(config: Config, context: int, *, logits: str = "last") -> dict[str, Any]:
    """FLOPs of a prefill of ``context`` tokens and of one decode step at ``context`` cached positions.

    Returns ``{"context", "prefill": {"total", "active", "per_token_total", "per_token_active"},
    "decode": {"total", "active"}}``. ``total`` is dense-equivalent (every expert run), ``active`` is what
    a MoE executes (k experts). ``logits="last"`` counts the LM head once per prefill (inference engines
    compute only the last position's logits); ``"all"`` counts it for every prefill token.
    """
    c = config
    n = _positive("context", context)
    if logits not in ("last", "all"):
        raise Lfm2npError(f"logits is {logits!r}; expected 'last' or 'all'")
    mm_total, mm_active = _matmul_flops_per_token(c)
    head = 2 * c.vocab_size * c.hidden_size
    attn_prefill = len(c.attention_layers) * 4 * c.num_attention_heads * c.head_dim * (n * (n + 1) // 2)
    n_heads = 1 if logits == "last" else n
    pre_total = n * mm_total + attn_prefill + n_heads * head
    pre_active = n * mm_active + attn_prefill + n_heads * head
    dec_attn = _attention_flops(c, n + 1)  # the new token attends to the n cached ones and itself
    return {"context": n,
            "prefill": {"total": pre_total, "active": pre_active,
                        "per_token_total": pre_total / n, "per_token_active": pre_active / n},
            "decode": {"total": mm_total + dec_attn + head, "active": mm_active + dec_attn + head}}


# ==================================================================================== memory
#: Bytes per element of whole-checkpoint dtypes (every tensor in that dtype, as safetensors/PyTorch hold it).
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16", "float": "float32"}

#: KV cache types llama.cpp accepts (--cache-type-k/-v), stored in rows of G*hd elements per token.
KV_TYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q5_1": "Q5_1", "q5_0": "Q5_0",
            "q4_1": "Q4_1", "q4_0": "Q4_0"}
CONV_STATE_BYTES = 4  # llama.cpp keeps recurrent (conv) state in float32


def normalise_quant(name: str) -> str:
    """``float32``/``float16``/``bfloat16`` (aliases fp32, fp16, bf16) or a GGUF file type (``Q4_K_M``, ``F16``...)."""
    key = str(name).strip()
    low = key.lower()
    low = _DTYPE_ALIASES.get(low, low)
    if low in DTYPE_BYTES:
        return low
    try:
        return quant.normalise_file_type(key)
    except Lfm2npError:
        raise Lfm2npError(
            f"unknown weight format {name!r}; expected one of {', '.join(DTYPE_BYTES)} "
            f"or a GGUF file type ({', '.join(quant.FILE_TYPES)})"
        ) from None


def weight_bytes(config: Config, quant_name: str = "Q4_K_M", *, imatrix: bool = False) -> int:
    """Bytes of the weights: every parameter in a float dtype, or the tensor data of a GGUF file type
    (per-tensor types as llama-quantize chooses them; KV metadata and the tokenizer not included).
    ``quant_name`` may also be the path of a ``.gguf`` file: its real tensor types are read (gguf package)."""
    if str(quant_name).lower().endswith(".gguf"):
        from .gguf import gguf_tensor_bytes

        return gguf_tensor_bytes(quant_name)
    q = normalise_quant(quant_name)
    if q in DTYPE_BYTES:
        # released checkpoints keep the router's expert bias in float32 beside bf16/f16 weights
        bias = len(config.moe_layers) * config.num_experts if config.use_expert_bias else 0
        return (param_counts(config)["total"] - bias) * DTYPE_BYTES[q] + bias * 4
    return quant.gguf_weight_bytes(config, q, imatrix=imatrix)


def _kv_type(kv_type: str) -> str:
    key = str(kv_type).strip().lower()
    if key not in KV_TYPES:
        raise Lfm2npError(f"unknown KV cache type {kv_type!r}; expected one of {', '.join(KV_TYPES)}")
    return KV_TYPES[key]


def kv_bytes_per_token(config: Config, kv_type: str = "f16") -> int:
    """K and V bytes one token adds to the cache: attention layers only, each with its G KV heads of hd."""
    ggml = _kv_type(kv_type)
    row = quant.row_bytes(ggml, config.num_key_value_heads * config.head_dim)
    return 2 * row * len(config.attention_layers)


def kv_cache_bytes(config: Config, context: int, parallel: int = 1, kv_type: str = "f16") -> int:
    """KV cache for ``parallel`` sequences of ``context`` tokens each (llama.cpp: ``-c context*parallel -np parallel``)."""
    return kv_bytes_per_token(config, kv_type) * _positive("context", context) * _positive("parallel", parallel)


def conv_state_bytes(config: Config, parallel: int = 1) -> int:
    """Conv state of ``parallel`` sequences: per conv layer the last L-1 columns of ``u = b*x`` (D each), in
    float32, as llama.cpp and vLLM keep them (transformers keeps L columns). Constant in the context length."""
    per_seq = len(config.conv_layers) * (config.conv_L_cache - 1) * config.hidden_size * CONV_STATE_BYTES
    return per_seq * _positive("parallel", parallel)


def compute_buffer_bytes(config: Config, chunk: int = 512, context: int | None = None, *,
                         flash_attention: bool = True) -> int:
    """Estimate of the activation memory of one prefill chunk of ``chunk`` tokens (llama.cpp's n_ubatch).

    The peak of one layer's float32 intermediates (layers run one after another, so their buffers are
    reused): residual and normed input (2D) plus the largest of the conv block (in_proj 3D + conv output D),
    the attention block (q, k, v, output; without flash attention also the H x S score matrix per token),
    the dense FFN (gate, up, product: 3F) and the MoE block (router E, k experts' gate/up/product 3kFm, their
    outputs kD); plus the logits of the chunk's last token (V). An estimate: the real allocator's packing
    differs, and backends add scratch; the figure is meant within a factor of ~2.
    """
    c = config
    t = _positive("chunk", chunk)
    s = t if context is None else max(_positive("context", context), t)
    D, H, G, hd = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    blocks = [4 * D]
    if c.attention_layers:
        blocks.append((2 * H + 2 * G) * hd + (0 if flash_attention else H * s))
    if any(not c.is_moe_layer(i) for i in range(c.num_hidden_layers)):
        blocks.append(3 * c.ffn_dim)
    if c.moe_layers:
        k, Fm = c.num_experts_per_tok, c.moe_intermediate_size
        blocks.append(c.num_experts + 3 * k * Fm + k * D)
    return 4 * (t * (2 * D + max(blocks)) + c.vocab_size)


def memory(config: Config, quant_name: str = "Q4_K_M", *, context: int = 4096, parallel: int = 1,
           kv_type: str = "f16", chunk: int = 512, flash_attention: bool = True, budget: int | None = None,
           imatrix: bool = False) -> dict[str, Any]:
    """Weights + KV cache + conv state + compute buffer, and whether the total fits ``budget`` bytes.

    Field names are an interface (the CLI's JSON): quant, weights_bytes, kv_bytes_per_token, kv_cache_bytes,
    conv_state_bytes, total_bytes, fits (None without a budget); plus compute_bytes and the inputs.
    """
    q = str(quant_name) if str(quant_name).lower().endswith(".gguf") else normalise_quant(quant_name)
    w = weight_bytes(config, q, imatrix=imatrix)
    per_tok = kv_bytes_per_token(config, kv_type)
    kv = kv_cache_bytes(config, context, parallel, kv_type)
    conv = conv_state_bytes(config, parallel)
    comp = compute_buffer_bytes(config, min(chunk, context), context, flash_attention=flash_attention)
    total = w + kv + conv + comp
    return {"model": config.source, "quant": q, "context": context, "parallel": parallel,
            "kv_type": str(kv_type).lower(), "weights_bytes": w, "kv_bytes_per_token": per_tok,
            "kv_cache_bytes": kv, "conv_state_bytes": conv, "compute_bytes": comp,
            "flash_attention": flash_attention, "total_bytes": total, "budget_bytes": budget,
            "fits": None if budget is None else total <= budget}


def max_context(config: Config, quant_name: str, budget: int, *, parallel: int = 1, kv_type: str = "f16",
                chunk: int = 512, flash_attention: bool = True) -> int:
    """The longest context (per sequence) whose :func:`memory` total fits ``budget`` bytes (0 if none does)."""
    def fits(n: int) -> bool:
        return memory(config, quant_name, context=n, parallel=parallel, kv_type=kv_type, chunk=chunk,
                      flash_attention=flash_attention)["total_bytes"] <= budget
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi):
        lo, hi = hi, hi * 2
        if hi > 1 << 40:
            return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def attention_only(config: Config) -> Config:
    """The same model with every layer an attention layer (the baseline the hybrid is compared against)."""
    return config.replace(layer_types=tuple(ATTENTION for _ in range(config.num_hidden_layers)))


def hybrid_savings(config: Config, contexts: Iterable[int] = (4096, 32768, 131072), kv_type: str = "f16",
                   parallel: int = 1) -> list[dict[str, Any]]:
    """KV cache (+ conv state) of the hybrid vs the same model with every layer attention, per context."""
    full = attention_only(config)
    rows = []
    for n in contexts:
        hybrid = kv_cache_bytes(config, n, parallel, kv_type) + conv_state_bytes(config, parallel)
        attn = kv_cache_bytes(full, n, parallel, kv_type)
        rows.append({"context": n, "hybrid_bytes": hybrid, "attention_only_bytes": attn,
                     "saved_bytes": attn - hybrid, "ratio": attn / hybrid if hybrid else float("inf")})
    return rows


# ==================================================================================== helpers
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """``"32GB"`` -> 32e9, ``"32GiB"`` -> 32 * 2**30, ``"1.5 TB"``, ``"123"`` (bytes). Decimal units are powers
    of 1000, binary units (KiB, MiB, GiB, TiB) powers of 1024."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise Lfm2npError(f"budget {text!r} is not a size; expected a number with an optional unit "
                          f"(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. 32GB")
    return int(float(m.group(1)) * _UNITS[unit])


def format_bytes(n: float) -> str:
    """``1234567890`` -> ``'1.23 GB (1.15 GiB)'``."""
    for unit, div in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= div:
            bunit, bdiv = {"TB": ("TiB", 2**40), "GB": ("GiB", 2**30), "MB": ("MiB", 2**20),
                           "KB": ("KiB", 2**10)}[unit]
            return f"{n / div:.2f} {unit} ({n / bdiv:.2f} {bunit})"
    return f"{int(n)} B"


def _positive(name: str, value: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value <= 0:
        raise Lfm2npError(f"{name} is {value!r}; expected a positive integer")
    return int(value)


__all__ = ["param_breakdown", "param_counts", "flops", "weight_bytes", "kv_bytes_per_token", "kv_cache_bytes",
           "conv_state_bytes", "compute_buffer_bytes", "memory", "max_context", "attention_only",
           "hybrid_savings", "parse_bytes", "format_bytes", "normalise_quant", "CONV", "ATTENTION"]
