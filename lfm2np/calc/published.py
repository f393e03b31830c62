"""Published figures the calculators are checked against: sizes of real GGUF files."""

from __future__ import annotations

#: Sizes of real GGUF files, to check the calculator against (see docs/calculators.md for the comparison).
#: kind "file_bytes": exact file size in bytes; "file_MB": file size as shown rounded to MB (10^6);
#: "data_GiB": llama-bench's model size (tensor data only) rounded to 0.01 GiB.
PUBLISHED_GGUF_SIZES: list[dict] = [
    {"model": "LFM2-350M", "quant": "Q4_0", "kind": "file_MB", "value": 219, "source": "LiquidAI/LFM2-350M-GGUF"},
    {"model": "LFM2-350M", "quant": "Q4_K_M", "kind": "file_MB", "value": 229, "source": "LiquidAI/LFM2-350M-GGUF"},
    {"model": "LFM2-350M", "quant": "Q5_K_M", "kind": "file_bytes", "value": 260_374_144,
     "source": "LiquidAI/LFM2-350M-Extract-GGUF (same architecture)"},
    {"model": "LFM2-350M", "quant": "Q6_K", "kind": "file_bytes", "value": 293_380_672,
     "source": "bartowski LFM2-350M-Extract-GGUF (same architecture)"},
    {"model": "LFM2-350M", "quant": "Q8_0", "kind": "file_MB", "value": 379, "source": "LiquidAI/LFM2-350M-GGUF"},
    {"model": "LFM2-350M", "quant": "F16", "kind": "file_MB", "value": 711, "source": "LiquidAI/LFM2-350M-GGUF"},
    {"model": "LFM2-1.2B", "quant": "Q8_0", "kind": "file_bytes", "value": 1_246_252_768,
     "source": "LiquidAI/LFM2-1.2B-Extract-GGUF (same architecture)"},
    {"model": "LFM2-2.6B", "quant": "Q5_K_M", "kind": "file_bytes", "value": 1_828_958_976,
     "source": "LiquidAI/LFM2-2.6B-Transcript-GGUF (same architecture)"},
    {"model": "LFM2-8B-A1B", "quant": "Q4_0", "kind": "data_GiB", "value": 4.41,
     "source": "llama-bench in llama.cpp PR #19848"},
    {"model": "LFM2-24B-A2B", "quant": "Q4_0", "kind": "data_GiB", "value": 12.54,
     "source": "llama-bench in llama.cpp PR #19848 (Preview checkpoint; the preset's dense FFN width was inferred "
               "from this figure, so the match is not independent)"},
]
