"""How an image is cut for the encoder, from its size alone: smart resize, tiles, thumbnail, image tokens.

With ``f = encoder_patch_size * downsample_factor`` (32) and the pixel bounds ``min/max_image_tokens * f^2``:

- **smart resize**: round each side to a multiple of f (at least f); above the maximum, scale both sides by
  ``1/beta``, ``beta = sqrt(h w / max)``, and floor to multiples of f; below the minimum, scale by
  ``beta = sqrt(min / (h w))`` and ceil. transformers rounds with Python's ``round`` (half to even) in float64;
  llama.cpp with ``std::round`` (half away from zero) in float32: 600x400 becomes 608x384 (228 tokens) in
  transformers, 608x416 (247) in llama.cpp.
- **tiling**: an image is "too large" when its sides rounded to multiples of f (at least p) hold more than
  ``max_image_tokens * f^2 * max_pixels_tolerance`` pixels; then it is resized to a grid of ``tile_size`` tiles
  whose aspect ratio (cols/rows, min_tiles <= cols * rows <= max_tiles) is closest to the image's (ties: the
  larger grid when the image covers more than half its area), cut row by row, and followed by a thumbnail (the
  smart-resized image) when ``use_thumbnail`` and the grid has more than one tile.
- **tokens**: a unit of h x w pixels gives ``ceil(h/p / ds) * ceil(w/p / ds)`` image tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import Lfm2npError
from .config import ProcessorConfig


@dataclass(frozen=True)
class ImageLayout:
    """How one image becomes encoder inputs ("units") and placeholder tokens.

    ``height``, ``width``: the image as decoded; ``resized``: its smart resize ``(height, width)`` (the single
    unit, or the thumbnail); ``tiled``: cut into a ``rows`` x ``cols`` grid of ``tile_size`` tiles (a 1x1 grid
    is possible with min_tiles 1); ``units``: ``(height, width)`` in pixels of each unit, tiles row by row then
    the thumbnail; ``unit_tokens``: the placeholders written for each unit."""

    height: int
    width: int
    resized: tuple[int, int]
    tiled: bool
    rows: int
    cols: int
    thumbnail: bool
    units: tuple[tuple[int, int], ...]
    unit_tokens: tuple[int, ...]

    @property
    def tokens(self) -> int:
        """Image tokens (placeholders) of the image: the sum over its units."""
        return sum(self.unit_tokens)

    @property
    def multi_tile(self) -> bool:
        """Whether the prompt marks tiles (``<|img_row_R_col_C|>``): a grid of more than one tile."""
        return self.rows * self.cols > 1


def _f32(x: float) -> float:
    return float(np.float32(x))


def smart_resize(height: int, width: int, config: ProcessorConfig) -> tuple[int, int]:
    """``(height, width)`` of the smart resize of a ``height`` x ``width`` image, in ``config.rounding``'s
    reading (see the module's doc)."""
    f = config.encoder_patch_size * config.downsample_factor
    lo, hi = config.min_image_tokens * f * f, config.max_image_tokens * f * f
    if config.rounding == "transformers":
        h_bar, w_bar = max(f, round(height / f) * f), max(f, round(width / f) * f)
        if h_bar * w_bar > hi:
            beta = math.sqrt(height * width / hi)
            h_bar, w_bar = (max(f, math.floor(height / beta / f) * f), max(f, math.floor(width / beta / f) * f))
        elif h_bar * w_bar < lo:
            beta = math.sqrt(lo / (height * width))
            h_bar, w_bar = math.ceil(height * beta / f) * f, math.ceil(width * beta / f) * f
        return h_bar, w_bar
    # llama.cpp's calc_size_preserved_ratio: every operation in float32, std::round rounds halves away from zero
    f32, ff = np.float32, np.float32(f)

    def away(x: np.float32) -> int:
        q = float(f32(x) / ff)
        return int(math.copysign(math.floor(abs(q) + 0.5), q)) * f

    h_bar, w_bar = max(f, away(f32(height))), max(f, away(f32(width)))
    if h_bar * w_bar > hi:
        beta = np.sqrt(f32(height) * f32(width) / f32(hi))
        h_bar = max(f, math.floor(float(f32(height) / beta / ff)) * f)
        w_bar = max(f, math.floor(float(f32(width) / beta / ff)) * f)
    elif h_bar * w_bar < lo:
        beta = np.sqrt(f32(lo) / (f32(height) * f32(width)))
        h_bar = math.ceil(float(f32(height) * beta / ff)) * f
        w_bar = math.ceil(float(f32(width) * beta / ff)) * f
    return h_bar, w_bar


def too_large(height: int, width: int, config: ProcessorConfig) -> bool:
    """Whether the image is cut into tiles (when tiling is on): its sides rounded to multiples of f (half to even,
    at least p: transformers' ``_is_image_too_large``, and llama.cpp's ``should_tile`` since its fix) hold more
    than ``max_image_tokens * f^2 * max_pixels_tolerance`` pixels."""
    p, f = config.encoder_patch_size, config.encoder_patch_size * config.downsample_factor
    h_bar, w_bar = max(p, round(height / f) * f), max(p, round(width / f) * f)
    return h_bar * w_bar > config.max_image_tokens * f * f * config.max_pixels_tolerance


def grid(height: int, width: int, config: ProcessorConfig) -> tuple[int, int]:
    """``(rows, cols)`` of the tile grid whose aspect ratio is closest to the image's (see the module's doc)."""
    # built as transformers builds it (a list, then a set, then sorted by area): equal areas keep the set's order
    ratios = sorted(set([(w, h) for n in range(config.min_tiles, config.max_tiles + 1) for w in range(1, n + 1)
                         for h in range(1, n + 1) if config.min_tiles <= w * h <= config.max_tiles]),
                    key=lambda r: r[0] * r[1])
    aspect, best, best_diff = width / height, (1, 1), float("inf")
    for w, h in ratios:  # ties: stable order by area, a later (larger) grid wins if the image fills half of it
        diff = abs(aspect - w / h)
        if diff < best_diff:
            best, best_diff = (w, h), diff
        elif diff == best_diff and height * width > 0.5 * config.tile_size ** 2 * w * h:
            best = (w, h)
    return best[1], best[0]


def unit_tokens(height: int, width: int, config: ProcessorConfig) -> int:
    """Image tokens of an encoder input of ``height`` x ``width`` pixels (after the pixel unshuffle)."""
    p, ds = config.encoder_patch_size, config.downsample_factor
    return math.ceil(height // p / ds) * math.ceil(width // p / ds)


def image_layout(height: int, width: int, config: ProcessorConfig, name: str = "image") -> ImageLayout:
    """The layout of a ``height`` x ``width`` image (``name`` for errors). :class:`Lfm2npError` when a unit
    would hold more patches than the processor pads to (an image too thin for its patch grid, e.g. 1x2000:
    transformers 5.25 returns a mask shorter than its patches there, or fails)."""
    for what, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise Lfm2npError(f"{name}: {what} must be a whole number >= 1; got {value!r}")
    height, width = int(height), int(width)
    resized = smart_resize(height, width, config)
    tiled = config.tiling and too_large(height, width, config)
    rows, cols = grid(height, width, config) if tiled else (1, 1)
    thumbnail = tiled and config.use_thumbnail and rows * cols != 1
    units = ((config.tile_size, config.tile_size),) * (rows * cols) if tiled else (resized,)
    units += (resized,) if thumbnail else ()
    tokens = [unit_tokens(h, w, config) for h, w in units]
    if tiled and rows * cols == 1 and config.single_tile_placeholders == "transformers-5.25":
        tokens = [unit_tokens(*resized, config)]
    p = config.encoder_patch_size
    for h, w in units:
        if (h // p) * (w // p) > config.max_num_patches:
            raise Lfm2npError(f"{name}: a {width}x{height} image resizes to {w}x{h} pixels, {(h // p) * (w // p)} "
                              f"patches of {p}x{p}, more than the {config.max_num_patches} the processor pads to: "
                              f"too thin for one row of patches within the budget")
    return ImageLayout(height, width, resized, tiled, rows, cols, thumbnail, units, tuple(tokens))
