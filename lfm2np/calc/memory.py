"""Memory calculators: weights, KV cache, conv state and compute buffer, pure functions of a Config.

Everything here is computed from the config's dimensions; no tensor is ever allocated. What is exact and
what is an estimate (see docs/calculators.md):

- weight bytes: exact for float32/float16/bfloat16 checkpoints and for the tensor data of GGUF files
  (per-tensor llama.cpp types, see :mod:`lfm2np.calc.quant`);
- KV cache and conv state: exact for llama.cpp's layout (attention layers only, ``G * hd`` per K and V per
  token; conv state ``(L-1) * D`` float32 values per conv layer and sequence);
- the compute buffer for a prefill chunk: an estimate (the peak of float32 intermediates of one layer).

Dimension legend: T tokens, S cached+new positions, D hidden, H query heads, G KV heads, hd head dim,
F FFN width, E experts, k experts per token, Fm expert width, V vocab, L conv kernel.
"""

from __future__ import annotations

import numbers
import os
from typing import Any, Iterable

from ..config import ATTENTION, Config, checked_config
from ..errors import Lfm2npError, shown
from ..io.gguf import gguf_tensor_bytes
from ..io.params import parse_size
from ..numerics import DTYPE_BYTES as _ALL_DTYPE_BYTES, canonical_dtype
from . import quant
from .params import param_counts, positive

#: Bytes per element of whole-checkpoint dtypes (every tensor in that dtype, as safetensors/PyTorch hold it).
DTYPE_BYTES = {name: _ALL_DTYPE_BYTES[name] for name in ("float32", "float16", "bfloat16")}

#: KV cache types llama.cpp accepts (--cache-type-k/-v), stored in rows of G*hd elements per token.
KV_TYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q5_1": "Q5_1", "q5_0": "Q5_0",
            "q4_1": "Q4_1", "q4_0": "Q4_0"}
CONV_STATE_BYTES = 4  # llama.cpp keeps recurrent (conv) state in float32


def normalise_quant(name: str) -> str:
    """``float32``/``float16``/``bfloat16`` (aliases fp32, fp16, bf16) or a GGUF file type (``Q4_K_M``, ``F16``...;
    llama-quantize's alias ``Q4_K`` is ``Q4_K_M``)."""
    if not isinstance(name, str):
        raise Lfm2npError(f"a weight format is a name such as 'Q4_K_M' or 'bfloat16'; got {shown(name)}")
    key = name.strip()
    dtype = canonical_dtype(key)
    if dtype in DTYPE_BYTES:
        return dtype
    if key.upper() in quant.UNSIZED_FILE_TYPES:
        return quant.normalise_file_type(key)  # raises, naming it as a type lfm2np cannot size
    try:
        return quant.normalise_file_type(key)
    except Lfm2npError:
        raise Lfm2npError(
            f"unknown weight format {shown(name)}; expected one of {', '.join(DTYPE_BYTES)} "
            f"or a GGUF file type ({quant.accepted_file_types()})"
        ) from None


def weight_bytes(config: Config, quant_name: str = "Q4_K_M", *, imatrix: bool = False,
                 fuse_qkv: bool = False) -> int:
    """Bytes of the weights: every parameter in a float dtype, or the tensor data of a GGUF file type
    (per-tensor types as llama-quantize chooses them; KV metadata and the tokenizer not included;
    ``fuse_qkv``: a file converted with ``--fuse-qkv``). ``quant_name`` may also be the path of a ``.gguf``
    file: its real tensor types are read."""
    checked_config(config)
    if isinstance(quant_name, (str, os.PathLike)) and str(quant_name).lower().endswith(".gguf"):
        return gguf_tensor_bytes(quant_name)
    q = normalise_quant(quant_name)
    if q in DTYPE_BYTES:
        # released checkpoints keep the router's expert bias in float32 beside bf16/f16 weights
        bias = len(config.moe_layers) * config.num_experts if config.use_expert_bias else 0
        return (param_counts(config)["total"] - bias) * DTYPE_BYTES[q] + bias * 4
    return quant.gguf_weight_bytes(config, q, imatrix=imatrix, fuse_qkv=fuse_qkv)


def _kv_type(kv_type: str) -> str:
    key = kv_type.strip().lower() if isinstance(kv_type, str) else None
    if key not in KV_TYPES:
        raise Lfm2npError(f"unknown KV cache type {shown(kv_type)}; expected one of {', '.join(KV_TYPES)}")
    return KV_TYPES[key]


def _kv_row_bytes(config: Config, kv_type: str) -> int:
    """Bytes of one position's K (or V) in one attention layer: G KV heads of hd."""
    checked_config(config)
    return quant.row_bytes(_kv_type(kv_type), config.num_key_value_heads * config.head_dim)


def kv_bytes_per_token(config: Config, kv_type: str = "f16") -> int:
    """K and V bytes one more token of context adds to the cache: the full-attention layers, each with its G
    KV heads of hd. (Sliding-window layers keep at most W positions: :func:`sliding_kv_bytes`.)"""
    return 2 * _kv_row_bytes(config, kv_type) * len(config.full_attention_layers)


def sliding_kv_bytes(config: Config, context: int, kv_type: str = "f16") -> int:
    """K and V of the sliding-window layers for one sequence of ``context`` tokens: at most W positions each
    (what attention needs; llama.cpp allocates its SWA cache padded, ``pad256(W + n_ubatch)`` cells)."""
    if not checked_config(config).sliding_layers:
        return 0
    kept = min(positive("context", context), config.sliding_window)
    return 2 * _kv_row_bytes(config, kv_type) * kept * len(config.sliding_layers)


def kv_cache_bytes(config: Config, context: int, parallel: int = 1, kv_type: str = "f16") -> int:
    """KV cache for ``parallel`` sequences of ``context`` tokens each (llama.cpp: ``-c context*parallel -np parallel``):
    full-attention layers at every position, sliding-window layers at their window."""
    n, p = positive("context", context), positive("parallel", parallel)
    return (kv_bytes_per_token(config, kv_type) * n + sliding_kv_bytes(config, n, kv_type)) * p


def conv_state_bytes(config: Config, parallel: int = 1) -> int:
    """Conv state of ``parallel`` sequences: per conv layer the last L-1 columns of ``u = b*x`` (D each), in
    float32, as llama.cpp keeps them (vLLM keeps L-1 columns in the model dtype, bf16, unless
    ``--mamba-cache-dtype`` says otherwise; transformers keeps L columns). Constant in the context length."""
    checked_config(config)
    per_seq = len(config.conv_layers) * (config.conv_L_cache - 1) * config.hidden_size * CONV_STATE_BYTES
    return per_seq * positive("parallel", parallel)


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
    c = checked_config(config)
    t = positive("chunk", chunk)
    s = t if context is None else max(positive("context", context), t)
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
           imatrix: bool = False, fuse_qkv: bool = False,
           mmproj: "str | os.PathLike[str] | None" = None) -> dict[str, Any]:
    """Weights + KV cache + conv state + compute buffer, and whether the total fits ``budget`` bytes.
    ``mmproj``: llama.cpp's LFM2-VL pair, ``quant_name`` the text GGUF and ``mmproj`` the mmproj GGUF, whose
    vision tower and projector are counted at their stored types too (``mmproj_weights_bytes``, within
    ``weights_bytes``).

    Field names are an interface (the CLI's JSON): quant, weights_bytes, kv_bytes_per_token, kv_cache_bytes,
    conv_state_bytes, total_bytes, fits (None without a budget); plus compute_bytes and the inputs.
    """
    gguf = isinstance(quant_name, (str, os.PathLike)) and str(quant_name).lower().endswith(".gguf")
    q = str(quant_name) if gguf else normalise_quant(quant_name)
    w = weight_bytes(config, q, imatrix=imatrix, fuse_qkv=fuse_qkv)
    if mmproj is not None and not gguf:
        raise Lfm2npError(f"an mmproj ({str(mmproj)[:200]}) goes with llama.cpp's text GGUF; the weights are "
                          f"{shown(quant_name)}, not a .gguf file")
    vision = gguf_tensor_bytes(mmproj) if mmproj is not None else None
    w += vision or 0
    per_tok = kv_bytes_per_token(config, kv_type)
    kv = kv_cache_bytes(config, context, parallel, kv_type)
    sliding = sliding_kv_bytes(config, context, kv_type) * parallel
    conv = conv_state_bytes(config, parallel)
    comp = compute_buffer_bytes(config, min(chunk, context), context, flash_attention=flash_attention)
    total = w + kv + conv + comp
    return {"model": config.source, "quant": q, "context": context, "parallel": parallel,
            "kv_type": str(kv_type).lower(), "weights_bytes": w, "kv_bytes_per_token": per_tok,
            "kv_cache_bytes": kv, "sliding_kv_bytes": sliding, "conv_state_bytes": conv, "compute_bytes": comp,
            "flash_attention": flash_attention, "total_bytes": total, "budget_bytes": budget,
            "fits": None if budget is None else total <= budget,
            **({} if vision is None else {"mmproj": str(mmproj), "mmproj_weights_bytes": vision})}


def max_context(config: Config, quant_name: str, budget: int, *, parallel: int = 1, kv_type: str = "f16",
                chunk: int = 512, flash_attention: bool = True, fuse_qkv: bool = False,
                limit: int | None = None, mmproj: "str | os.PathLike[str] | None" = None) -> int:
    """The longest context (per sequence) whose :func:`memory` total fits ``budget`` bytes (0 if none does),
    at most ``limit`` tokens when given (the context the model supports: memory alone would allow contexts a
    model was never trained for; :func:`lfm2np.presets.supported_context`)."""
    top = 1 << 40 if limit is None else positive("limit", limit)
    if isinstance(budget, bool) or not isinstance(budget, numbers.Integral) or budget < 0:
        raise Lfm2npError(f"budget is {shown(budget)}; expected a number of bytes (an integer >= 0)")

    def fits(n: int) -> bool:
        return memory(config, quant_name, context=n, parallel=parallel, kv_type=kv_type, chunk=chunk,
                      flash_attention=flash_attention, fuse_qkv=fuse_qkv, mmproj=mmproj)["total_bytes"] <= budget
    if not fits(1):
        return 0
    if fits(top):
        return top
    lo, hi = 1, 2  # fits(lo), and below top
    while hi < top and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, top)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def attention_only(config: Config) -> Config:
    """The same model with every layer an attention layer (the baseline the hybrid is compared against)."""
    config = checked_config(config)
    return config.replace(layer_types=tuple(ATTENTION for _ in range(config.num_hidden_layers)))


def hybrid_savings(config: Config, contexts: Iterable[int] = (4096, 32768, 131072), kv_type: str = "f16",
                   parallel: int = 1) -> list[dict[str, Any]]:
    """KV cache (+ conv state) of the hybrid vs the same model with every layer attention, per context."""
    full = attention_only(config)
    if isinstance(contexts, (str, bytes)) or not isinstance(contexts, Iterable):
        raise Lfm2npError(f"contexts is {shown(contexts)}; expected a list of context lengths")
    rows = []
    for n in contexts:
        hybrid = kv_cache_bytes(config, n, parallel, kv_type) + conv_state_bytes(config, parallel)
        attn = kv_cache_bytes(full, n, parallel, kv_type)
        rows.append({"context": n, "hybrid_bytes": hybrid, "attention_only_bytes": attn,
                     "saved_bytes": attn - hybrid, "ratio": attn / hybrid if hybrid else float("inf")})
    return rows


# ==================================================================================== helpers
def parse_bytes(text: str) -> int:
    """``"32GB"`` -> 32e9, ``"32GiB"`` = ``"8G"``-style one-letter units -> powers of 1024, ``"123"`` (bytes):
    :func:`lfm2np.io.params.parse_size`, which :func:`lfm2np.load`'s ``memory_budget`` reads too."""
    return parse_size(text, "budget")


def format_bytes(n: float) -> str:
    """``1234567890`` -> ``'1.23 GB (1.15 GiB)'``."""
    if isinstance(n, bool) or not isinstance(n, numbers.Real) or n != n:
        raise Lfm2npError(f"format_bytes takes a number of bytes; got {shown(n)}")
    if isinstance(n, numbers.Integral) and abs(n) >= 10**300:  # past float range: no unit makes it readable
        return f"{shown(int(n))} B"
    for unit, div in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= div:
            bunit, bdiv = {"TB": ("TiB", 2**40), "GB": ("GiB", 2**30), "MB": ("MiB", 2**20),
                           "KB": ("KiB", 2**10)}[unit]
            return f"{n / div:.2f} {unit} ({n / bdiv:.2f} {bunit})"
    return f"{int(n)} B"


__all__ = ["weight_bytes", "sliding_kv_bytes", "kv_bytes_per_token", "kv_cache_bytes",
           "conv_state_bytes", "compute_buffer_bytes", "memory", "max_context", "attention_only",
           "hybrid_savings", "parse_bytes", "format_bytes", "normalise_quant"]
