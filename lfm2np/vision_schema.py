"""The vision side of the tensor layout and the trace schema (LFM2-VL), as data: :mod:`lfm2np.schema` adds these
to :func:`~lfm2np.schema.layout` and :func:`~lfm2np.schema.trace_names` for a config with a vision tower.

Names are the released checkpoints' module paths: the SigLIP2 tower below ``model.vision_tower.vision_model.``,
the projector below ``model.multi_modal_projector.``. transformers 5.25 builds the tower without the
``vision_model`` level (its capture keys are ``model.vision_tower.encoder.layers.3.mlp.fc1.output``; its
``save_pretrained`` writes ``model.vision_tower.*`` too): :func:`transformers_keys` gives both spellings.

Shapes use ``"N"`` (images), ``"P"`` (patches per image, the batch's padded count), ``"I"`` (image tokens, all
images together) and ``"T"`` (tokens of the call).
"""

from __future__ import annotations

import re

from .vision_config import VisionConfig

TOWER = "model.vision_tower.vision_model."
PROJECTOR = "model.multi_modal_projector."
#: the embeddings after the image features took their placeholders' rows (transformers' inputs_embeds)
PLACED = "model.inputs_embeds"
#: the steps of encoder layer i, below ``{TOWER}encoder.layers.{i}.`` (the layer's output is the layer's name)
LAYER_STEPS = ("layer_norm1", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.attn_out",
               "self_attn.out_proj", "attn_residual", "layer_norm2", "mlp.fc1", "mlp.act", "mlp.fc2")
#: the values outside the encoder layers, in forward order (``{layers}`` marks where the layers go)
STEPS = (TOWER + "embeddings.patch_embedding", TOWER + "embeddings.position_embedding", TOWER + "embeddings",
         TOWER + "encoder.attention_mask", "{layers}", TOWER + "post_layernorm", PROJECTOR + "pixel_unshuffle",
         PROJECTOR + "layer_norm", PROJECTOR + "linear_1", PROJECTOR + "act", PROJECTOR + "linear_2", PLACED)
_LAYER = re.compile(re.escape(TOWER) + r"encoder\.layers\.(\d+)(?:\.(.+))?")


def tensors(v: VisionConfig, text_width: int) -> list[tuple[str, tuple[int, ...], str, str]]:
    """``(name, shape, part, role)`` of every vision-side tensor: part ``vision_tower`` (the tower; role ``{i}.{step}``
    inside encoder layer i) or ``projector``; a bias's role is its weight's plus ``_bias``."""
    Dv, Fv, p = v.hidden_size, v.intermediate_size, TOWER
    out = [(p + "embeddings.patch_embedding.weight", (Dv, v.patch_dim), "vision_tower", "patch_embedding"),
           (p + "embeddings.patch_embedding.bias", (Dv,), "vision_tower", "patch_embedding_bias"),
           (p + "embeddings.position_embedding.weight", (v.num_patches, Dv), "vision_tower", "position_embedding")]
    for i in range(v.num_hidden_layers):
        q = f"{p}encoder.layers.{i}."
        for step, shape in (("layer_norm1", (Dv,)), ("self_attn.q_proj", (Dv, Dv)), ("self_attn.k_proj", (Dv, Dv)),
                            ("self_attn.v_proj", (Dv, Dv)), ("self_attn.out_proj", (Dv, Dv)), ("layer_norm2", (Dv,)),
                            ("mlp.fc1", (Fv, Dv)), ("mlp.fc2", (Dv, Fv))):
            out += [(q + step + ".weight", shape, "vision_tower", f"{i}.{step}"),
                    (q + step + ".bias", shape[:1], "vision_tower", f"{i}.{step}_bias")]
    out += [(p + "post_layernorm.weight", (Dv,), "vision_tower", "post_layernorm"),
            (p + "post_layernorm.bias", (Dv,), "vision_tower", "post_layernorm_bias")]
    pieces = [("layer_norm", (v.projector_in,))] if v.projector_use_layernorm else []
    pieces += [("linear_1", (v.projector_hidden_size, v.projector_in)), ("linear_2", (text_width, v.projector_hidden_size))]
    for step, shape in pieces:
        out.append((PROJECTOR + step + ".weight", shape, "projector", step))
        if step == "layer_norm" or v.projector_bias:
            out.append((PROJECTOR + step + ".bias", shape[:1], "projector", step + "_bias"))
    return out


def trace_steps(v: VisionConfig, text_width: int) -> list[tuple[str, tuple[int | str, ...]]]:
    """``(name, shape)`` of every value the vision tower, the projector and the placement name, in forward order."""
    Dv, Fv, out = v.hidden_size, v.intermediate_size, []
    for name in STEPS:
        if name == "{layers}":
            for i in range(v.num_hidden_layers):
                q = f"{TOWER}encoder.layers.{i}"
                out += [(f"{q}.{s}", ("N", "P", Fv if s in ("mlp.fc1", "mlp.act") else Dv)) for s in LAYER_STEPS]
                out.append((q, ("N", "P", Dv)))
        elif name.startswith(PROJECTOR):
            if name.endswith("layer_norm") and not v.projector_use_layernorm:
                continue
            width = {"linear_1": v.projector_hidden_size, "act": v.projector_hidden_size,
                     "linear_2": text_width}.get(name.rsplit(".", 1)[1], v.projector_in)
            out.append((name, ("I", width)))
        elif name == PLACED:
            out.append((name, ("T", text_width)))
        else:
            out.append((name, ("N", "P") if name.endswith("attention_mask") else ("N", "P", Dv)))
    return out


def is_vision_name(name: str) -> bool:
    """Whether ``name`` is a value some LFM2-VL forward pass names (any layer index)."""
    m = _LAYER.fullmatch(name)
    if m:
        return m.group(2) is None or m.group(2) in LAYER_STEPS
    return name in STEPS and name != "{layers}"


def order(name: str) -> tuple[int, int, int] | None:
    """Where ``name`` comes in the vision side's forward order (None: not a vision name)."""
    m = _LAYER.fullmatch(name)
    if m:
        step = m.group(2)
        return (STEPS.index("{layers}"), int(m.group(1)), len(LAYER_STEPS) if step is None else
                LAYER_STEPS.index(step) if step in LAYER_STEPS else len(LAYER_STEPS) + 1)
    return (STEPS.index(name), 0, 0) if name in STEPS else None


def transformers_keys(name: str) -> tuple[str, ...]:
    """The capture keys a transformers run gives vision value ``name``: the module's ``.output`` (the released
    path and transformers 5.25's, without ``vision_model.``), or the function-level steps a fixture tool records."""
    function_level = name == PLACED or name.endswith(("attention_mask", "pixel_unshuffle", "attn_out", "attn_residual"))
    keys = (name,) if function_level else (name + ".output",)
    short = tuple(k.replace(TOWER, "model.vision_tower.") for k in keys if k.startswith(TOWER))
    return keys + short
