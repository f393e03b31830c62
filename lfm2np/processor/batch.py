"""Images to the encoder's inputs: resized units, normalised, cut into NaFlex patches, padded with a mask.

For each image (a file, decoded as transformers' ``load_image`` does, or a uint8 (H, W, 3) array): its
:class:`~lfm2np.processor.layout.ImageLayout` says which units it becomes; each unit is the image resized
(:mod:`~lfm2np.processor.resample`, torch's fixed point) to the tile grid and cut, or resized to the smart-resize
size; then ``x' = (x - 255 mean) / (255 std)`` in float32 (transformers fuses the rescale into the mean and std:
``mean * (1 / rescale_factor)`` rounded to float32 first), the unit cut into ``p x p`` patches row by row, each
patch flattened as (row, column, channel), and padded with zero patches to P = ``config.max_num_patches``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import Lfm2npError
from ..io.images import check_image_array, read_image
from .config import ProcessorConfig
from .layout import ImageLayout, image_layout
from .resample import resize, resize_float


@dataclass(frozen=True, eq=False)
class ImageBatch:
    """The encoder's inputs for a list of images, as transformers' Lfm2VlImageProcessor returns them
    (``return_tensors="np"``): ``pixel_values`` (N, P, 3*p*p) float32, ``pixel_attention_mask`` (N, P) bool
    (True on real patches), ``spatial_shapes`` (N, 2) int64 (patch rows, patch columns), N units over all the
    images in order; and per image its ``layouts`` and ``tokens_per_image`` (the placeholders it needs)."""

    pixel_values: np.ndarray
    pixel_attention_mask: np.ndarray
    spatial_shapes: np.ndarray
    tokens_per_image: list[int]
    layouts: list[ImageLayout]

    @property
    def units_per_image(self) -> list[int]:
        """How many of the N units each image contributes (tiles and thumbnail, or 1)."""
        return [len(layout.units) for layout in self.layouts]

    @property
    def image_of_unit(self) -> np.ndarray:
        """(N,) int64: the image each unit belongs to."""
        return np.repeat(np.arange(len(self.layouts)), self.units_per_image).astype(np.int64)

    @classmethod
    def concat(cls, batches: "Sequence[ImageBatch]") -> "ImageBatch":
        """The batches' images in order, as one batch (all processed with the same settings)."""
        if not batches:
            raise Lfm2npError("ImageBatch.concat: no batches")
        return cls(np.concatenate([b.pixel_values for b in batches]),
                   np.concatenate([b.pixel_attention_mask for b in batches]),
                   np.concatenate([b.spatial_shapes for b in batches]),
                   [t for b in batches for t in b.tokens_per_image], [l for b in batches for l in b.layouts])


def unit_images(image: np.ndarray, layout: ImageLayout, config: ProcessorConfig) -> list[np.ndarray]:
    """The uint8 (h, w, 3) units of ``image`` in order: the tiles of the resized grid row by row and the
    thumbnail, or the smart-resized image."""
    filter, aa = config.resample, config.antialias
    scale = resize if config.resize_arithmetic == "fixed-point" else resize_float
    units = []
    if layout.tiled:
        t = config.tile_size
        canvas = scale(image, layout.rows * t, layout.cols * t, filter, aa)
        units = [canvas[r * t:(r + 1) * t, c * t:(c + 1) * t] for r in range(layout.rows) for c in range(layout.cols)]
    if not layout.tiled or layout.thumbnail:
        units.append(scale(image, *layout.resized, filter, aa))
    return units


def normalise(unit: np.ndarray, config: ProcessorConfig) -> np.ndarray:
    """x' = (x - 255 mean) / (255 std) in float32, as transformers' fused rescale and normalisation (or the
    rescale alone, the normalisation alone, or neither, as the config says)."""
    x = unit.astype(np.float32)
    mean, std = np.float32(config.image_mean), np.float32(config.image_std)
    if config.do_rescale and config.do_normalize:
        k = np.float32(1.0 / config.rescale_factor)
        return (x - mean * k) / (std * k)
    if config.do_normalize:
        return (x - mean) / std
    if config.do_rescale:
        return x * np.float32(config.rescale_factor)
    return x


def patchify(unit: np.ndarray, p: int) -> np.ndarray:
    """(h, w, 3) -> (h/p * w/p, p*p*3): patches row by row, each flattened as (row, column, channel)."""
    h, w, c = unit.shape
    return unit.reshape(h // p, p, w // p, p, c).transpose(0, 2, 1, 3, 4).reshape((h // p) * (w // p), p * p * c)


def _decode(image: object, k: int) -> tuple[np.ndarray, str]:
    if isinstance(image, (str, os.PathLike)):
        return read_image(image), str(image)
    return check_image_array(image, f"images[{k}]"), f"images[{k}]"


def process_images(images: Sequence[object], config: ProcessorConfig | None = None) -> ImageBatch:
    """``images`` (file paths or uint8 (H, W, 3) arrays) to the encoder's inputs (:class:`ImageBatch`);
    ``config``: the checkpoint's :class:`ProcessorConfig` (default: the released settings)."""
    config = ProcessorConfig() if config is None else config
    if isinstance(images, (str, os.PathLike, np.ndarray)) or not isinstance(images, Sequence):
        raise Lfm2npError(f"process_images takes a list of images (paths or arrays); got {type(images).__name__}")
    if not images:
        raise Lfm2npError("process_images: no images")
    p, budget = config.encoder_patch_size, config.max_num_patches
    patches, shapes, layouts = [], [], []
    for k, image in enumerate(images):
        pixels, name = _decode(image, k)
        layout = image_layout(pixels.shape[0], pixels.shape[1], config, name)
        for unit in unit_images(pixels, layout, config):
            patches.append(patchify(normalise(unit, config), p))
            shapes.append((unit.shape[0] // p, unit.shape[1] // p))
        layouts.append(layout)
    values = np.zeros((len(patches), budget, config.patch_dim), np.float32)
    mask = np.zeros((len(patches), budget), bool)
    for n, unit in enumerate(patches):
        values[n, :len(unit)] = unit
        mask[n, :len(unit)] = True
    return ImageBatch(values, mask, np.array(shapes, np.int64).reshape(-1, 2), [l.tokens for l in layouts], layouts)


@dataclass(frozen=True)
class ImageProcessor:
    """:func:`process_images` with a checkpoint's settings: what :func:`lfm2np.load` puts on an LFM2-VL model as
    ``model.image_processor``, so that ``model.forward(ids, images=["a.png"])`` takes file paths and arrays."""

    config: ProcessorConfig

    def __call__(self, images: Sequence[object]) -> ImageBatch:
        return process_images(images, self.config)

    @classmethod
    def for_checkpoint(cls, directory: "str | os.PathLike[str]", vision: Any) -> "ImageProcessor | None":
        """The processor of an LFM2-VL checkpoint directory (its ``processor_config.json`` or
        ``preprocessor_config.json``: :meth:`ProcessorConfig.from_dir`), checked against the model's vision config
        ``vision`` (patch size and downsample factor); None when the directory has neither file."""
        directory = Path(directory)
        if not any((directory / name).exists() for name in ("processor_config.json", "preprocessor_config.json")):
            return None
        config = ProcessorConfig.from_dir(directory)
        for mine, theirs in (("encoder_patch_size", "patch_size"), ("downsample_factor", "downsample_factor")):
            if getattr(config, mine) != getattr(vision, theirs):
                raise Lfm2npError(f"{config.source}: {mine} {getattr(config, mine)} but the model's config.json says "
                                  f"{theirs} {getattr(vision, theirs)}: the processor does not fit this model")
        return cls(config)
