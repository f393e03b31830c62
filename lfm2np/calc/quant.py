"""GGUF weight sizes: which ggml type llama.cpp gives each LFM2 tensor, and how many bytes that takes.

A GGUF file's size is not ``params * bits_per_weight``: llama.cpp's ``llama-quantize`` chooses a type per
tensor (``src/llama-quant.cpp``, ``llama_tensor_get_type_impl``), some tensors are never quantised, and each
type stores whole blocks. This module re-states those rules for the two LFM2 architectures (``lfm2``,
``lfm2moe``) so the tensor data of a GGUF file can be computed to the byte from a :class:`~lfm2np.config.Config`.

The rules, as llama.cpp applies them (each has its own test in ``tests/test_quant.py``):

1. **Never quantised** (kept as the converter wrote them, float32): 1-D tensors, names not ending in
   ``weight`` (``exp_probs_b.bias``), ``*_norm.weight``, the router ``ffn_gate_inp.weight`` and the short
   conv kernel ``shortconv.conv.weight``. ``convert_hf_to_gguf.py`` writes all of these as F32.
2. **Output / tied embedding.** When there is no ``output.weight`` (tied head) ``token_embd.weight`` is
   treated as the output: Q8_0 if its row length is not a multiple of the file type's block size, else
   Q6_K unless the file type's default already is Q8_0. An untied ``output.weight`` gets that rule and
   ``token_embd.weight`` keeps the default type.
3. **attn_v** (and a fused **attn_qkv**, ``convert_hf_to_gguf.py --fuse-qkv``) is counted over attention
   layers (``i`` of ``n``): Q4_K_M and Q5_K_M use Q6_K where
   ``use_more_bits(i, n)``; Q3_K_M uses Q5_K for the first two then Q4_K; Q3_K_L Q5_K; Q4_K_S Q5_K for
   the first four; Q2_K Q4_K if ``n_gqa() >= 4`` else Q3_K. ``n_gqa()`` is read from layer 0, a conv
   layer in every released LFM2, where llama.cpp reports 0: the Q2_K branch therefore picks Q3_K.
   With exactly 8 experts attn_v and attn_k become Q8_0. llama.cpp's ``category_is_attn_v`` is true for
   ``ATTENTION_V``, ``ATTENTION_QKV`` and ``ATTENTION_KV_B`` (``src/llama-quant.cpp``), and that branch comes
   before the one written for ``ATTENTION_QKV`` alone (Q4_K_M -> Q5_K, Q5_K_M -> Q6_K), which is therefore
   never reached: a fused attn_qkv gets exactly attn_v's type, over its whole (H + 2G) * hd rows, and counts
   in ``n_attention_wv`` like attn_v (checked in the vendored llama.cpp of llama-cpp-python 0.3.36).
4. **ffn_down** by layer index (``i`` of all ``n`` layers; for MoE the index is parsed from the name, so
   dense and expert ffn_down both count): Q4_K_M / Q5_K_M use Q6_K where ``use_more_bits(i, n)``;
   Q4_K_S Q5_K for ``i < n/8``; Q3_K_M Q5_K for ``i < n/16`` else Q4_K; Q3_K_L Q5_K; Q2_K Q3_K; with an
   importance matrix Q4_0 / Q5_0 use Q4_1 / Q5_1 for ``i < n/8``.
5. **attn_output**: Q2_K -> Q3_K, Q3_K_M -> Q4_K, Q3_K_L -> Q5_K (with 8 experts: Q5_K for the low k-quants).
6. **Shape fallback**: a row length (``ne[0]``) that is not a multiple of the chosen type's block falls back
   Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, Q2_K/Q3_K -> Q4_0, then to F16 if still incompatible; a
   32-element type with no fallback (Q4_0, Q8_0, ...) makes llama-quantize stop with an error.

``use_more_bits(i, n) = i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2`` (integer division).

Block sizes are gguf-py's ``GGML_QUANT_SIZES`` (``gguf-py/gguf/constants.py``): (elements per block, bytes).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Config, checked_config
from ..errors import Lfm2npError, shown
from ..io.gguf import gguf_layout
from ..io.gguf_names import GgufTensor, quantisable

# ------------------------------------------------------------------------------------ ggml types
QK_K = 256
#: (elements per block, bytes per block), as in gguf-py's GGML_QUANT_SIZES.
GGML_BLOCK: dict[str, tuple[int, int]] = {
    "F32": (1, 4),
    "F16": (1, 2),
    "BF16": (1, 2),
    "Q4_0": (32, 2 + 16),
    "Q4_1": (32, 2 + 2 + 16),
    "Q5_0": (32, 2 + 4 + 16),
    "Q5_1": (32, 2 + 2 + 4 + 16),
    "Q8_0": (32, 2 + 32),
    "Q2_K": (256, 2 + 2 + QK_K // 16 + QK_K // 4),
    "Q3_K": (256, 2 + QK_K // 4 + QK_K // 8 + 12),
    "Q4_K": (256, 2 + 2 + QK_K // 2 + 12),
    "Q5_K": (256, 2 + 2 + QK_K // 2 + QK_K // 8 + 12),
    "Q6_K": (256, 2 + QK_K // 2 + QK_K // 4 + QK_K // 16),
}
_FLOAT_TYPES = ("F32", "F16", "BF16")

#: llama.cpp file types (``llama-quantize`` names) -> the default tensor type of that mixture.
FILE_TYPES: dict[str, str] = {
    "F32": "F32",
    "F16": "F16",
    "BF16": "BF16",
    "Q8_0": "Q8_0",
    "Q6_K": "Q6_K",
    "Q5_K_M": "Q5_K",
    "Q5_K_S": "Q5_K",
    "Q5_1": "Q5_1",
    "Q5_0": "Q5_0",
    "Q4_K_M": "Q4_K",
    "Q4_K_S": "Q4_K",
    "Q4_1": "Q4_1",
    "Q4_0": "Q4_0",
    "Q3_K_L": "Q3_K",
    "Q3_K_M": "Q3_K",
    "Q3_K_S": "Q3_K",
    "Q2_K": "Q2_K",
}

#: llama-quantize's own aliases (its QUANT_OPTIONS: "Q4_K", "alias for Q4_K_M"; likewise Q3_K and Q5_K).
FILE_TYPE_ALIASES: dict[str, str] = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}

#: llama-quantize types whose per-tensor rules (and, for some, block sizes) this module does not state: refused
#: by name rather than sized wrong.
UNSIZED_FILE_TYPES = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "IQ3_S",
                      "IQ3_M", "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0", "Q2_K_S", "MXFP4_MOE")

#: Type a k-quant falls back to when a row length is not a multiple of 256 (tensor_type_fallback).
_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}

GGUF_ALIGNMENT = 32  # GGUF_DEFAULT_ALIGNMENT: every tensor's data starts on a multiple of this


def row_bytes(ggml_type: str, ncols: int) -> int:
    """Bytes of one row of ``ncols`` elements stored as ``ggml_type`` (whole blocks only)."""
    block, size = GGML_BLOCK[ggml_type]
    if ncols % block:
        raise Lfm2npError(f"row length {ncols} is not a multiple of the {ggml_type} block size {block}")
    return ncols // block * size


def tensor_bytes(ggml_type: str, ne: tuple[int, ...]) -> int:
    """Bytes of a tensor with ggml dimensions ``ne`` (``ne[0]`` is the row length) stored as ``ggml_type``."""
    rows = 1
    for n in ne[1:]:
        rows *= n
    return rows * row_bytes(ggml_type, ne[0])


def accepted_file_types() -> str:
    """The file types this module sizes, and llama-quantize's aliases, for messages."""
    aliases = ", ".join(f"{a} (= {b})" for a, b in FILE_TYPE_ALIASES.items())
    return f"{', '.join(FILE_TYPES)}, and llama-quantize's aliases {aliases}"


def normalise_file_type(name: str) -> str:
    """The canonical spelling of a llama.cpp file type (``q4_k_m`` -> ``Q4_K_M``; llama-quantize's aliases
    ``Q4_K`` -> ``Q4_K_M``, ``Q5_K`` -> ``Q5_K_M``, ``Q3_K`` -> ``Q3_K_M``); raises on unknown names, and names a
    llama-quantize type this module cannot size (the i-quants, ...) as such."""
    key = str(name).strip().upper()
    key = FILE_TYPE_ALIASES.get(key, key)
    if key in UNSIZED_FILE_TYPES:
        raise Lfm2npError(f"{shown(name)} is a llama-quantize type lfm2np cannot size (its per-tensor type rules are "
                          f"not modelled); sized: {accepted_file_types()}")
    if key not in FILE_TYPES:
        raise Lfm2npError(f"unknown GGUF file type {shown(name)}; expected one of {accepted_file_types()}")
    return key


# ------------------------------------------------------------------------- type selection
def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of which of ``n`` layers get more bits: the first and last eighth, every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _n_gqa(config: Config) -> int:
    """llama.cpp's ``hparams.n_gqa()`` (layer 0): 0 when layer 0 is a conv layer (no KV heads)."""
    if not config.is_attention(0):
        return 0
    return config.num_attention_heads // config.num_key_value_heads


def _fallback(t: GgufTensor, ggml_type: str) -> str:
    """tensor_type_fallback (rule 6)."""
    block = GGML_BLOCK[ggml_type][0]
    if t.ne[0] % block == 0:
        return ggml_type
    if ggml_type not in _FALLBACK:
        raise Lfm2npError(
            f"llama-quantize cannot store {t.name} as {ggml_type}: its row length {t.ne[0]} is not a multiple of "
            f"{block} and llama.cpp defines no fallback for {ggml_type}"
        )
    new = _FALLBACK[ggml_type]
    if t.ne[0] % GGML_BLOCK[new][0]:
        new = "F16"
    return new


def tensor_types(config: Config, file_type: str = "Q4_K_M", *, imatrix: bool = False,
                 fuse_qkv: bool = False) -> dict[str, str]:
    """The ggml type of every tensor of an LFM2 GGUF file of ``file_type``, as llama-quantize chooses it.

    ``imatrix`` says whether an importance matrix was given (only changes Q4_0/Q5_0's first ffn_down layers).
    ``fuse_qkv``: the file was converted with ``--fuse-qkv`` (one ``attn_qkv`` per attention layer, typed as
    attn_v is). Float file types (F32/F16/BF16) store every quantisable tensor in that type and the rest in
    F32, exactly as ``convert_hf_to_gguf.py --outtype`` does.
    """
    checked_config(config)
    ftype = normalise_file_type(file_type)
    default = FILE_TYPES[ftype]
    tensors = gguf_layout(config, fuse_qkv)
    tied = config.tie_word_embeddings
    n_experts = config.num_experts if config.is_moe else 0
    n_attn_v = sum(1 for t in tensors if t.name.endswith(("attn_v.weight", "attn_qkv.weight")))
    n_layers = config.num_hidden_layers
    gqa = _n_gqa(config)
    i_attn_v = 0
    out: dict[str, str] = {}
    for t in tensors:
        if not quantisable(t):
            out[t.name] = "F32"
            continue
        if default in _FLOAT_TYPES:  # ggml_is_quantized(default) is false: no mixture rules, no fallback
            out[t.name] = default
            continue
        new = default
        short = t.name.split(".", 2)[-1] if t.layer is not None else t.name
        if t.name == "output.weight" or (tied and t.name == "token_embd.weight"):  # rule 2
            if t.ne[0] % GGML_BLOCK[default][0]:
                new = "Q8_0"
            elif default != "Q8_0":
                new = "Q6_K"
        elif t.name == "token_embd.weight":
            pass  # untied embedding: the default type (IQ mixtures aside)
        elif short in ("attn_v.weight", "attn_qkv.weight"):  # rule 3 (category_is_attn_v)
            i = i_attn_v
            if ftype == "Q2_K":
                new = "Q4_K" if gqa >= 4 else "Q3_K"
            elif ftype == "Q3_K_M":
                new = "Q5_K" if i < 2 else "Q4_K"
            elif ftype == "Q3_K_L":
                new = "Q5_K"
            elif ftype in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n_attn_v):
                new = "Q6_K"
            elif ftype == "Q4_K_S" and i < 4:
                new = "Q5_K"
            if n_experts == 8:
                new = "Q8_0"
            i_attn_v += 1
        elif short == "attn_k.weight":
            if n_experts == 8:
                new = "Q8_0"
        elif short.startswith("ffn_down"):  # rule 4; the layer index is the tensor's block number
            i, n = t.layer, n_layers
            if ftype == "Q2_K":
                new = "Q3_K"
            elif ftype == "Q3_K_M":
                new = "Q5_K" if i < n // 16 else "Q4_K"
            elif ftype == "Q3_K_L":
                new = "Q5_K"
            elif ftype == "Q4_K_M":
                if use_more_bits(i, n):
                    new = "Q6_K"
            elif ftype == "Q5_K_M" and use_more_bits(i, n):
                new = "Q6_K"
            elif ftype == "Q4_K_S" and i < n // 8:
                new = "Q5_K"
            elif ftype in ("Q4_0", "Q5_0") and imatrix and i < n // 8:
                new = "Q4_1" if ftype == "Q4_0" else "Q5_1"
        elif short == "attn_output.weight":  # rule 5
            if n_experts == 8:
                if ftype in ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M"):
                    new = "Q5_K"
            elif ftype == "Q2_K":
                new = "Q3_K"
            elif ftype == "Q3_K_M":
                new = "Q4_K"
            elif ftype == "Q3_K_L":
                new = "Q5_K"
        out[t.name] = _fallback(t, new)
    return out


# ------------------------------------------------------------------------------------ sizes
def gguf_weight_bytes(config: Config, file_type: str = "Q4_K_M", *, imatrix: bool = False,
                      fuse_qkv: bool = False) -> int:
    """Bytes of tensor data in a GGUF file of ``file_type`` (exact; no padding, no header)."""
    types = tensor_types(config, file_type, imatrix=imatrix, fuse_qkv=fuse_qkv)
    return sum(tensor_bytes(types[t.name], t.ne) for t in gguf_layout(config, fuse_qkv))


def gguf_file_bytes(config: Config, file_type: str = "Q4_K_M", *, imatrix: bool = False,
                    metadata_bytes: int = 0, fuse_qkv: bool = False) -> int:
    """Size of a GGUF file without its key/value metadata: the fixed header, the tensor-info table, the
    tensor data and the alignment padding after each tensor. ``metadata_bytes`` adds the KV section
    (architecture keys, tokenizer vocabulary and merges, chat template), which this module does not model.
    The up-to-31 bytes of padding between the tensor-info table and the data are not counted."""
    types = tensor_types(config, file_type, imatrix=imatrix, fuse_qkv=fuse_qkv)
    size = 4 + 4 + 8 + 8  # magic, version, tensor count, KV count
    for t in gguf_layout(config, fuse_qkv):
        size += 8 + len(t.name.encode()) + 4 + 8 * len(t.ne) + 4 + 8  # name, n_dims, dims, type, offset
        nbytes = tensor_bytes(types[t.name], t.ne)
        size += nbytes + (-nbytes) % GGUF_ALIGNMENT
    return size + metadata_bytes


def type_summary(config: Config, file_type: str = "Q4_K_M", *, imatrix: bool = False,
                 fuse_qkv: bool = False) -> dict[str, dict[str, int]]:
    """Per ggml type: how many tensors, elements and bytes a GGUF file of ``file_type`` holds."""
    types = tensor_types(config, file_type, imatrix=imatrix, fuse_qkv=fuse_qkv)
    summary: dict[str, dict[str, int]] = {}
    for t in gguf_layout(config, fuse_qkv):
        s = summary.setdefault(types[t.name], {"tensors": 0, "elements": 0, "bytes": 0})
        s["tensors"] += 1
        s["elements"] += t.n_elements
        s["bytes"] += tensor_bytes(types[t.name], t.ne)
    return summary
