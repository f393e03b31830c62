"""The names other tools give the values of the trace schema (:mod:`lfm2np.schema`): llama.cpp's graph callback
(``Qcur-3``, ``result_norm``) and a transformers capture (module path + ``.output``, or the function-level steps
the fixture tools record), per step below ``model.layers.{i}.``. :mod:`lfm2np.schema` attaches them to each
:class:`~lfm2np.schema.TraceName` and reads them back (``canonical_name``).
"""

from __future__ import annotations

import re

# llama.cpp's LFM2 graph (src/models/lfm2.cpp) names some tensors after the Hugging Face modules with a literal
# "{}" where the layer goes ("model.layers.{}.conv.conv-3"), the generic helpers (build_attn, build_ffn,
# build_moe_ffn) the rest ("Qcur-3", "ffn_moe_logits-3"); newer versions name q/k/v after the modules too. Checked
# against real dumps (tools/dump_llama_cpp_trace.py, llama-cpp-python 0.3.36). The FFN norm's output is named
# "...ffn_out" when computed (it was "...ffn_norm" when the graph was built). MoE: build_moe_ffn names the sigmoid
# scores ffn_moe_probs, the chosen ones ffn_moe_weights, their renormalised values ffn_moe_weights_norm, and for
# LFM2 never scales them (routed_scaling_factor, 1 in every released model, is ignored: no ffn_moe_weights_scaled).
LLAMA_CPP_STEPS = {
    "operator_norm": ("model.layers.{{}}.operator_norm-{i}",),
    "conv.in_proj": ("model.layers.{{}}.conv.in_proj-{i}",), "conv.conv_out": ("model.layers.{{}}.conv.conv-{i}",),
    "conv.out_proj": ("model.layers.{{}}.conv.out_proj-{i}",),
    "self_attn.q_proj": ("Qcur-{i}", "model.layers.{{}}.self_attn.q_proj-{i}"),
    "self_attn.k_proj": ("Kcur-{i}", "model.layers.{{}}.self_attn.k_proj-{i}"),
    "self_attn.v_proj": ("Vcur-{i}", "model.layers.{{}}.self_attn.v_proj-{i}"),
    "self_attn.q_normed": ("model.layers.{{}}.self_attn.q_layernorm-{i}",),
    "self_attn.k_normed": ("model.layers.{{}}.self_attn.k_layernorm-{i}",),
    "self_attn.attn_out": ("kqv_out-{i}",), "self_attn.out_proj": ("model.layers.{{}}.self_attn.out_proj-{i}",),
    "ffn_norm": ("model.layers.{{}}.ffn_out-{i}",),
    "feed_forward.w1": ("ffn_gate-{i}",), "feed_forward.w3": ("ffn_up-{i}",), "feed_forward.act": ("ffn_swiglu-{i}",),
    "feed_forward.router_logits": ("ffn_moe_logits-{i}",), "feed_forward.router_scores": ("ffn_moe_probs-{i}",),
    "feed_forward.biased_scores": ("ffn_moe_probs_biased-{i}",),
    "feed_forward.selected_experts": ("ffn_moe_topk-{i}",), "feed_forward.topk_scores": ("ffn_moe_weights-{i}",),
    "feed_forward.topk_normed": ("ffn_moe_weights_norm-{i}",),
    "": ("l_out-{i}",),
}
LLAMA_CPP_TOP = {"model.embed_tokens": ("model.embed_tokens",), "model.embedding_norm": ("result_norm",),
              "lm_head": ("result_output",)}


#: a step's capture keys in a transformers run (module path + ".output", or the function-level steps the fixture
#: tools record: bx, conv_out, q_rope, k_rope, attn_out, and the router's logits, choice and weights), by the
#: config's attention spelling where the two differ
TRANSFORMERS_STEPS = {
    "": ("output",), "operator_norm": ("operator_norm.output",), "ffn_norm": ("ffn_norm.output",),
    "post_operator_norm": ("post_operator_norm.output",), "post_ffn_norm": ("post_ffn_norm.output",),
    "conv.in_proj": ("conv.in_proj.output",), "conv.bx": ("conv.bx",), "conv.conv_out": ("conv.conv_out",),
    "conv.out_proj": ("conv.output", "conv.out_proj.output"),
    "self_attn.q_proj": ("self_attn.q_proj.output",), "self_attn.k_proj": ("self_attn.k_proj.output",),
    "self_attn.v_proj": ("self_attn.v_proj.output",),
    "self_attn.q_rope": ("self_attn.q_rope",), "self_attn.k_rope": ("self_attn.k_rope",),
    "self_attn.attn_out": ("self_attn.attn_out",), "self_attn.out_proj": ("self_attn.output",),
    "feed_forward.w1": ("feed_forward.w1.output",), "feed_forward.w3": ("feed_forward.w3.output",),
    "feed_forward.w2": ("feed_forward.w2.output",), "feed_forward.output": ("feed_forward.output",),
    "feed_forward.router_logits": ("feed_forward.gate.router_logits",),
    "feed_forward.selected_experts": ("feed_forward.gate.selected_experts",),
    "feed_forward.routing_weights": ("feed_forward.gate.routing_weights",),
}
TRANSFORMERS_SPELLED = {
    "lfm2": {"self_attn.q_normed": ("self_attn.q_layernorm.output",),
             "self_attn.k_normed": ("self_attn.k_layernorm.output",),
             "self_attn.out_proj": ("self_attn.output", "self_attn.out_proj.output")},
    "qwen3": {"self_attn.q_normed": ("self_attn.q_norm.output",), "self_attn.k_normed": ("self_attn.k_norm.output",),
              "self_attn.out_proj": ("self_attn.output", "self_attn.o_proj.output")},
}
LAYER_NAME = re.compile(r"model\.layers\.(\d+)(?:\.(.+))?")


def split(name: str) -> tuple[int | None, str]:
    """(layer, step) of a trace name; (None, name) outside the layers."""
    m = LAYER_NAME.fullmatch(name)
    return (int(m.group(1)), m.group(2) or "") if m else (None, name)


def transformers_names(name: str, spelling: str | None = None) -> tuple[str, ...]:
    """The capture keys of trace name ``name`` in a transformers run, for a config's attention ``spelling``
    ("lfm2" or "qwen3"; None: both)."""
    layer, step = split(name)
    if layer is None:
        return {"model.embed_tokens": ("model.embed_tokens.output",), "model.embedding_norm":
                ("model.embedding_norm.output",), "lm_head": ("lm_head.output",)}.get(name, ())
    keys = TRANSFORMERS_STEPS.get(step, ())
    for sp in ((spelling,) if spelling else tuple(TRANSFORMERS_SPELLED)):
        keys = tuple(dict.fromkeys(keys + TRANSFORMERS_SPELLED[sp].get(step, ())))
    return tuple(f"model.layers.{layer}.{k}" for k in keys)


def llama_cpp_names(name: str, moe: bool | None = None) -> tuple[str, ...]:
    """The names llama.cpp's LFM2 graph callback gives trace name ``name`` (older and newer spellings; the
    FFN output has one only in MoE layers: ``moe`` None means either)."""
    layer, step = split(name)
    if layer is None:
        return LLAMA_CPP_TOP.get(name, ())
    if step == "feed_forward.output":
        return () if moe is False else (f"ffn_moe_out-{layer}",)
    return tuple(t.format(i=layer) for t in LLAMA_CPP_STEPS.get(step, ()))
