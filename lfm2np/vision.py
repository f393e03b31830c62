"""The LFM2-VL vision tower and projector over weight views, as :mod:`lfm2np.layers` is for the text layers: the one
place that rounds and names each vision value (names: :mod:`lfm2np.vision_schema`).

::

    pixel_values (N, P, C*p*p), pixel_attention_mask (N, P), spatial_shapes (N, 2) = (h, w) patches per image
      -> patch_embedding (Linear)  +  position_embedding (the G x G grid resized to h x w, antialiased bilinear)
      -> for each encoder layer:  h += out_proj(attention(layer_norm1(h), keys masked by the padding))
                                  h += fc2(gelu_tanh(fc1(layer_norm2(h))))
      -> post_layernorm                                                              (N, P, Dv)
      -> per image, its h*w real patches: pixel_unshuffle by f                       (h/f * w/f, f*f*Dv)
      -> projector: [layer_norm] -> linear_1 -> gelu (exact, erf) -> linear_2        (I, D)
    ids: each image's features replace its placeholders (image_token_id), in order   (T, D)

The formulas are :mod:`lfm2np.ops` (LayerNorm, the GELUs) and :mod:`lfm2np.ops_vision` (the position resize,
masked attention, pixel unshuffle). An image batch is anything with ``pixel_values``, ``pixel_attention_mask`` and
``spatial_shapes`` as transformers' Lfm2VlImageProcessor returns them (lfm2np's processor's ImageBatch).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from . import ops, ops_vision
from .errors import Lfm2npError
from .layers import QUIET, Scope
from .vision_config import VisionConfig
from .vision_schema import PLACED, PROJECTOR, TOWER

__all__ = ["EncoderLayerWeights", "PLACED", "Pixels", "ProjectorWeights", "TowerWeights", "check_images",
           "check_pixels", "encode", "encoder_layer", "place", "project", "views"]


# ------------------------------------------------------------------------------------- weight views
@dataclass(frozen=True)
class EncoderLayerWeights:
    """One SigLIP2 encoder layer: LayerNorms ``layer_norm1``/``layer_norm2`` (Dv,) with biases, attention
    projections ``q/k/v/out_proj`` (Dv, Dv) with biases, MLP ``fc1`` (Fv, Dv) and ``fc2`` (Dv, Fv) with biases."""

    layer_norm1: np.ndarray
    layer_norm1_bias: np.ndarray
    q_proj: np.ndarray
    q_bias: np.ndarray
    k_proj: np.ndarray
    k_bias: np.ndarray
    v_proj: np.ndarray
    v_bias: np.ndarray
    out_proj: np.ndarray
    out_bias: np.ndarray
    layer_norm2: np.ndarray
    layer_norm2_bias: np.ndarray
    fc1: np.ndarray
    fc1_bias: np.ndarray
    fc2: np.ndarray
    fc2_bias: np.ndarray


@dataclass(frozen=True)
class TowerWeights:
    """The tower: ``patch_embedding`` (Dv, C*p*p) and its bias, the learned ``position_embedding`` (G*G, Dv),
    ``layer(i)`` giving encoder layer i's view, and ``post_layernorm`` with its bias."""

    patch_embedding: np.ndarray
    patch_bias: np.ndarray
    position_embedding: np.ndarray
    layer: Callable[[int], EncoderLayerWeights]
    post_layernorm: np.ndarray
    post_layernorm_bias: np.ndarray


@dataclass(frozen=True)
class ProjectorWeights:
    """The projector: ``linear_1`` (Hp, f*f*Dv), ``linear_2`` (D, Hp), their biases (None without
    ``projector_bias``) and the optional ``layer_norm`` (f*f*Dv,) with its bias (None without
    ``projector_use_layernorm``)."""

    linear_1: np.ndarray
    linear_1_bias: np.ndarray | None
    linear_2: np.ndarray
    linear_2_bias: np.ndarray | None
    layer_norm: np.ndarray | None = None
    layer_norm_bias: np.ndarray | None = None


def views(get: Callable[[str], "np.ndarray | None"]) -> tuple[TowerWeights, ProjectorWeights]:
    """The tower's and the projector's views from ``get(role)`` (roles of :func:`lfm2np.vision_schema.tensors`;
    None for a tensor the config does not have)."""
    def layer(i: int) -> EncoderLayerWeights:
        return EncoderLayerWeights(*(get(f"{i}.{step}{end}") for step in (
            "layer_norm1", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
            "layer_norm2", "mlp.fc1", "mlp.fc2") for end in ("", "_bias")))

    tower = TowerWeights(get("patch_embedding"), get("patch_embedding_bias"), get("position_embedding"), layer,
                         get("post_layernorm"), get("post_layernorm_bias"))
    projector = ProjectorWeights(get("linear_1"), get("linear_1_bias"), get("linear_2"), get("linear_2_bias"),
                                 get("layer_norm"), get("layer_norm_bias"))
    return tower, projector


# ------------------------------------------------------------------------------------------ images
@dataclass(frozen=True)
class Pixels:
    """An image batch, checked: ``pixel_values`` (N, P, C*p*p) in the compute dtype, ``mask`` (N, P) bool,
    ``shapes`` (N, 2) int = (h, w) patches of each image."""

    pixel_values: np.ndarray
    mask: np.ndarray
    shapes: np.ndarray

    def tokens(self, v: VisionConfig) -> list[int]:
        """Image tokens of each image."""
        return [v.tokens(int(h), int(w)) for h, w in self.shapes]


def check_pixels(batch: Any, v: VisionConfig, dtype: np.dtype) -> Pixels:
    """An image batch (``pixel_values``, ``pixel_attention_mask``, ``spatial_shapes``, as transformers' processor
    returns them) checked against the vision config: shapes, a mask that marks each image's h*w patches first,
    images large enough for one token. An :class:`Lfm2npError` names what is wrong."""
    try:
        pixels = np.asarray(batch.pixel_values)
        mask = np.asarray(batch.pixel_attention_mask)
        shapes = np.asarray(batch.spatial_shapes)
    except AttributeError as e:
        raise Lfm2npError(f"images must be an image batch with pixel_values, pixel_attention_mask and "
                          f"spatial_shapes (lfm2np.processor.process_images), file paths or arrays ({e})") from None
    if pixels.ndim != 3 or pixels.shape[-1] != v.patch_dim or 0 in pixels.shape or pixels.dtype.kind not in "fiu":
        raise Lfm2npError(f"pixel_values has shape {list(pixels.shape)} ({pixels.dtype}); expected (images, patches, "
                          f"{v.patch_dim}) numbers: {v.num_channels} channels x {v.patch_size} x {v.patch_size} per patch")
    N, P, _ = pixels.shape
    if mask.shape != (N, P) or mask.dtype.kind not in "biu":
        raise Lfm2npError(f"pixel_attention_mask has shape {list(mask.shape)} ({mask.dtype}); expected ({N}, {P}) "
                          f"booleans")
    if shapes.shape != (N, 2) or shapes.dtype.kind not in "iu":
        raise Lfm2npError(f"spatial_shapes has shape {list(shapes.shape)} ({shapes.dtype}); expected ({N}, 2) "
                          f"integers (patch rows, patch columns)")
    mask = mask.astype(bool)
    for n, (h, w) in enumerate(shapes.tolist()):
        if h < 1 or w < 1 or h * w > P:
            raise Lfm2npError(f"image {n}: spatial shape {h} x {w} patches does not fit its {P} patch slots")
        if v.tokens(h, w) == 0:
            raise Lfm2npError(f"image {n}: {h} x {w} patches give no image token (downsample factor "
                              f"{v.downsample_factor}); the image is too small")
        if not mask[n, :h * w].all() or mask[n, h * w:].any():
            raise Lfm2npError(f"image {n}: pixel_attention_mask does not mark exactly its first {h * w} patches "
                              f"({h} x {w}) as real")
    if not np.isfinite(pixels).all():
        raise Lfm2npError("pixel_values holds NaN or infinite values")
    return Pixels(pixels.astype(dtype), mask, shapes.astype(np.int64))


def check_images(images: Any, ids: np.ndarray, config: Any, dtype: np.dtype,
                 processor: Callable[[list], Any] | None) -> Pixels | None:
    """The images of a call (None or an empty list: none) as a checked batch: an image batch as it is, file
    paths or arrays through ``processor`` (the model's image processor); their tokens must be as many as the
    placeholders in ``ids`` (one sequence)."""
    if images is None or (isinstance(images, (list, tuple)) and not images):
        return None
    v = config.vision
    if v is None:
        raise Lfm2npError("this model has no vision tower: images need an LFM2-VL model (a checkpoint directory, or "
                          "llama.cpp's text GGUF with its mmproj: mmproj=, --mmproj)")
    if ids.ndim != 1:
        raise Lfm2npError(f"images go with one sequence, ids of shape (T,); got shape {ids.shape}")
    if isinstance(images, Pixels):  # already checked
        px = images
    elif not hasattr(images, "pixel_values"):
        if isinstance(images, (str, os.PathLike, np.ndarray)):
            images = [images]
        if not isinstance(images, (list, tuple)):
            raise Lfm2npError(f"images must be a list of file paths or arrays, or an image batch; got "
                              f"{type(images).__name__}")
        if processor is None:
            raise Lfm2npError("file paths and arrays need the model's image processor (load a checkpoint with its "
                              "processor config), or pass an image batch (lfm2np.processor.process_images)")
        px = check_pixels(processor(list(images)), v, dtype)
    else:
        px = check_pixels(images, v, dtype)
    have, want = int(np.count_nonzero(ids == v.image_token_id)), sum(px.tokens(v))
    if have != want:
        raise Lfm2npError(f"the ids hold {have} image placeholders (id {v.image_token_id}) but the "
                          f"{len(px.shapes)} image(s) give {want} image tokens ({', '.join(map(str, px.tokens(v)))}): "
                          f"expand the prompt with the processor")
    return px


# --------------------------------------------------------------------------------------- the tower
def encode(px: Pixels, tower: TowerWeights, projector: ProjectorWeights, v: VisionConfig,
           s: Scope = QUIET) -> np.ndarray:
    """The image features of a checked batch: the tower, each image's real patches unshuffled, the projector.
    (N, P, C*p*p) -> (I, D), the images' tokens in order."""
    rnd, (N, P, _), Dv = s.rnd, px.pixel_values.shape, v.hidden_size
    # the pixels in the compute dtype first (transformers: pixel_values.to(patch_embedding.weight.dtype))
    patches = s(TOWER + "embeddings.patch_embedding",
                rnd(ops.linear(rnd(px.pixel_values), tower.patch_embedding, tower.patch_bias,
                               shared=True)))  # (N, P, Dv)
    grid = tower.position_embedding.reshape(v.grid, v.grid, Dv)
    positions = np.stack([ops_vision.resize_positions(grid, int(h), int(w), P) for h, w in px.shapes])
    positions = s(TOWER + "embeddings.position_embedding", rnd(positions))  # (N, P, Dv)
    h = s(TOWER + "embeddings", rnd(patches + positions))
    mask = s(TOWER + "encoder.attention_mask", px.mask.astype(h.dtype))  # (N, P): 1 real, 0 padding
    for i in range(v.num_hidden_layers):
        h = encoder_layer(h, mask, tower.layer(i), v, s.at(f"{TOWER}encoder.layers.{i}."))
        h = s(f"{TOWER}encoder.layers.{i}", h)
    h = s(TOWER + "post_layernorm", ops.layer_norm(h, tower.post_layernorm, tower.post_layernorm_bias,
                                                   v.layer_norm_eps, rnd))
    f = v.downsample_factor
    tokens = np.concatenate([ops_vision.pixel_unshuffle(h[n], int(hh), int(ww), f)
                             for n, (hh, ww) in enumerate(px.shapes)])  # (I, f*f*Dv)
    return project(s(PROJECTOR + "pixel_unshuffle", tokens), projector, s.at(PROJECTOR))


def encoder_layer(h: np.ndarray, mask: np.ndarray, w: EncoderLayerWeights, v: VisionConfig,
                  s: Scope = QUIET) -> np.ndarray:
    """One SigLIP2 encoder layer (pre-norm): ``h += out_proj(attention(layer_norm1(h)))``, each image's queries
    seeing its keys where ``mask`` is 1; ``h += fc2(gelu_tanh(fc1(layer_norm2(h))))``. Names: layer_norm1,
    self_attn.{q,k,v}_proj, self_attn.attn_out, self_attn.out_proj, attn_residual, layer_norm2, mlp.fc1, mlp.act,
    mlp.fc2.  (N, P, Dv), (N, P) -> (N, P, Dv)"""
    rnd, (N, P, Dv), eps = s.rnd, h.shape, v.layer_norm_eps
    Hv, hd = v.num_attention_heads, v.head_dim
    x = s("layer_norm1", ops.layer_norm(h, w.layer_norm1, w.layer_norm1_bias, eps, rnd))
    q = s("self_attn.q_proj", rnd(ops.linear(x, w.q_proj, w.q_bias, shared=True)))  # (N, P, Dv)
    k = s("self_attn.k_proj", rnd(ops.linear(x, w.k_proj, w.k_bias, shared=True)))
    val = s("self_attn.v_proj", rnd(ops.linear(x, w.v_proj, w.v_bias, shared=True)))
    heads = [ops_vision.encoder_attention(q[n].reshape(P, Hv, hd), k[n].reshape(P, Hv, hd),
                                          val[n].reshape(P, Hv, hd), mask[n], rnd) for n in range(N)]
    attn = s("self_attn.attn_out", np.stack(heads))  # (N, P, Dv)
    out = s("self_attn.out_proj", rnd(ops.linear(attn, w.out_proj, w.out_bias, shared=True)))
    h = s("attn_residual", rnd(h + out))
    x = s("layer_norm2", ops.layer_norm(h, w.layer_norm2, w.layer_norm2_bias, eps, rnd))
    y = s("mlp.fc1", rnd(ops.linear(x, w.fc1, w.fc1_bias, shared=True)))  # (N, P, Fv)
    y = s("mlp.act", ops.gelu_tanh(y, rnd))
    y = s("mlp.fc2", rnd(ops.linear(y, w.fc2, w.fc2_bias, shared=True)))  # (N, P, Dv)
    return rnd(h + y)


def project(tokens: np.ndarray, w: ProjectorWeights, s: Scope = QUIET) -> np.ndarray:
    """The projector: ``linear_2(gelu(linear_1(layer_norm(tokens))))``, the LayerNorm only with
    ``projector_use_layernorm``; GELU in its exact erf form. Names (below ``model.multi_modal_projector.``):
    (layer_norm,) linear_1, act, linear_2.  (I, f*f*Dv) -> (I, D)"""
    rnd = s.rnd
    if w.layer_norm is not None:
        tokens = s("layer_norm", ops.layer_norm(tokens, w.layer_norm, w.layer_norm_bias, 1e-5, rnd))
    y = s("linear_1", rnd(ops.linear(tokens, w.linear_1, w.linear_1_bias, shared=True)))  # (I, Hp)
    y = s("act", ops_vision.gelu(y, rnd))
    return s("linear_2", rnd(ops.linear(y, w.linear_2, w.linear_2_bias, shared=True)))  # (I, D)


def place(embeds: np.ndarray, ids: np.ndarray, features: np.ndarray, image_token_id: int) -> np.ndarray:
    """The embeddings with each placeholder's row (``ids == image_token_id``) replaced by the next image feature,
    in order; the counts must agree.  (T, D), (T,), (I, D) -> (T, D)"""
    slots = np.flatnonzero(ids == image_token_id)
    if slots.size != features.shape[0]:
        raise Lfm2npError(f"the ids hold {slots.size} image placeholders (id {image_token_id}) but the images give "
                          f"{features.shape[0]} image tokens: expand the prompt with the processor (each image's "
                          f"tokens_per_image placeholders)")
    out = embeds.copy()
    out[slots] = features
    return out
