"""GGUF tensor names and shapes, derived from the one tensor layout (:func:`lfm2np.schema.layout`).

``convert_hf_to_gguf.py`` renames LFM2's tensors (embed_tokens -> ``token_embd``, embedding_norm ->
``token_embd_norm``, layers.N -> ``blk.N``, operator_norm -> ``attn_norm``, ...), squeezes the conv
kernel ``(D, 1, L)`` to ggml ``[L, D]`` and stacks the per-expert ``w1/w3/w2`` into ``ffn_{gate,up,down}_exps``
(expert e at numpy index e). This module needs no gguf package: the size calculators use it too.

ggml dimensions are numpy's in reverse: ``ne = [D, F]`` is a numpy array of shape ``(F, D)``, which is the
Hugging Face ``(out, in)`` layout of a linear weight. Only the conv kernel and stacked experts change shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import Config
from ..errors import Lfm2npError
from ..schema import Tensor, layout

#: Hugging Face (part, role) -> the GGUF name's suffix (after ``blk.{i}.`` inside the layers).
GGUF_NAMES: dict[tuple[str, str], str] = {
    ("embedding", "embed_tokens"): "token_embd.weight",
    ("final_norm", "embedding_norm"): "token_embd_norm.weight",  # the FINAL norm (LLM_TENSOR_OUTPUT_NORM_LFM2)
    ("lm_head", "lm_head"): "output.weight",  # only when the head is not tied
    ("operator_norm", "operator_norm"): "attn_norm.weight",
    ("ffn_norm", "ffn_norm"): "ffn_norm.weight",
    ("attention", "q_proj"): "attn_q.weight",
    ("attention", "k_proj"): "attn_k.weight",
    ("attention", "v_proj"): "attn_v.weight",
    ("attention", "out_proj"): "attn_output.weight",
    ("attention", "q_norm"): "attn_q_norm.weight",
    ("attention", "k_norm"): "attn_k_norm.weight",
    ("conv", "in_proj"): "shortconv.in_proj.weight",
    ("conv", "in_proj_bias"): "shortconv.in_proj.bias",
    ("conv", "conv"): "shortconv.conv.weight",  # HF (D, 1, L) -> ggml [L, D], i.e. numpy (D, L)
    ("conv", "conv_bias"): "shortconv.conv.bias",
    ("conv", "out_proj"): "shortconv.out_proj.weight",
    ("conv", "out_proj_bias"): "shortconv.out_proj.bias",
    ("ffn", "w1"): "ffn_gate.weight",
    ("ffn", "w3"): "ffn_up.weight",
    ("ffn", "w2"): "ffn_down.weight",
    ("router", "gate"): "ffn_gate_inp.weight",
    ("router", "expert_bias"): "exp_probs_b.bias",
    # LFM3: gguf-py 0.19 has no lfm3 architecture and lfm2np reads no LFM3 GGUF; these are llama.cpp's
    # generic tensor names (LLM_TENSOR_ATTN_GATE, ATTN_POST_NORM, FFN_POST_NORM), used by the size calculator
    ("attention", "gate_proj"): "attn_gate.weight",
    ("attention", "q_proj_bias"): "attn_q.bias",
    ("attention", "k_proj_bias"): "attn_k.bias",
    ("attention", "v_proj_bias"): "attn_v.bias",
    ("attention", "out_proj_bias"): "attn_output.bias",
    ("post_operator_norm", "post_operator_norm"): "post_attention_norm.weight",
    ("post_ffn_norm", "post_ffn_norm"): "post_ffw_norm.weight",
    ("dense_head", "dense"): "dense_2.weight",  # the sentence-transformers Dense (1_Dense), after pooling
    ("dense_head", "dense_bias"): "dense_2.bias",
    ("expert", "w1"): "ffn_gate_exps.weight",  # stacked: (E, Fm, D) in numpy order
    ("expert", "w3"): "ffn_up_exps.weight",
    ("expert", "w2"): "ffn_down_exps.weight",
}


@dataclass(frozen=True)
class GgufTensor:
    """One tensor of an LFM2 GGUF file: its name, ggml dims (``ne[0]`` = row length, numpy's last axis), its
    block (None outside the layers) and the Hugging Face tensors it holds (E of them for stacked experts)."""

    name: str
    ne: tuple[int, ...]
    layer: int | None
    holds: tuple[Tensor, ...] = ()

    @property
    def n_elements(self) -> int:
        return math.prod(self.ne)

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy order."""
        return tuple(reversed(self.ne))


def gguf_name(t: Tensor) -> str:
    """The GGUF tensor that holds Hugging Face tensor ``t`` (for an expert, the stacked tensor)."""
    suffix = GGUF_NAMES.get((t.part, t.role))
    if suffix is None:
        raise Lfm2npError(f"tensor {t.name!r} has no GGUF name in the lfm2/lfm2moe mapping")
    return suffix if t.layer is None else f"blk.{t.layer}.{suffix}"


def gguf_tensors(config: Config, tensors: "list[Tensor] | None" = None) -> list[GgufTensor]:
    """The tensors of an LFM2 GGUF file, in the order llama.cpp's loader sorts them (by layer, then name);
    ``tensors``: the config's layout (:func:`lfm2np.schema.layout`), when the caller has it already."""
    groups: dict[str, list[Tensor]] = {}
    for t in layout(config) if tensors is None else tensors:
        if t.part not in ("vision_tower", "projector"):  # LFM2-VL: those are the mmproj file's (io/mmproj.py)
            groups.setdefault(gguf_name(t), []).append(t)
    out = []
    for name, held in groups.items():
        first = held[0]
        if first.part == "expert":
            shape = (len(held), *first.shape)  # (E, out, in)
        elif first.role == "conv":
            shape = (first.shape[0], first.shape[2])  # (D, L)
        else:
            shape = first.shape
        out.append(GgufTensor(name, tuple(reversed(shape)), first.layer, tuple(held)))
    outside = [t for t in out if t.layer is None]
    inside = sorted((t for t in out if t.layer is not None), key=lambda t: (t.layer, t.name))
    return outside + inside


def quantisable(t: GgufTensor) -> bool:
    """Whether llama.cpp may quantise ``t`` (``tensor_allows_quantization`` for the tensors an LFM2 file
    holds): never 1-D tensors, names not ending in ``weight``, norms, the router or the conv kernel."""
    name = t.name
    if len(t.ne) < 2 or not name.endswith("weight") or "_norm.weight" in name:
        return False
    return "ffn_gate_inp.weight" not in name and "shortconv.conv.weight" not in name
