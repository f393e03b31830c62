"""Calculators: exact parameter counts and FLOPs, memory per dtype or GGUF type, KV cache and conv state.

Pure functions of a :class:`~lfm2np.config.Config`; nothing is downloaded or allocated.
"""

from .memory import (CONV_STATE_BYTES, DTYPE_BYTES, KV_TYPES, attention_only, compute_buffer_bytes,
                     conv_state_bytes, format_bytes, hybrid_savings, kv_bytes_per_token, kv_cache_bytes,
                     max_context, memory, normalise_quant, parse_bytes, sliding_kv_bytes, weight_bytes)
from .params import flops, param_breakdown, param_counts

__all__ = ["CONV_STATE_BYTES", "DTYPE_BYTES", "KV_TYPES", "attention_only", "compute_buffer_bytes",
           "conv_state_bytes", "flops", "format_bytes", "hybrid_savings", "kv_bytes_per_token", "kv_cache_bytes",
           "max_context", "memory", "normalise_quant", "param_breakdown", "param_counts", "parse_bytes",
           "sliding_kv_bytes", "weight_bytes"]
