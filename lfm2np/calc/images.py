"""What images cost a vision-language model's context: tokens per image and their KV cache.

An image of W x H pixels becomes, by the processor's layout (:func:`lfm2np.processor.image_layout`: smart
resize, tiles and thumbnail), ``tokens`` image embeddings, and takes ``sequence_tokens`` positions of the prompt
(the image tokens plus ``<|image_start|>``, ``<|image_end|>``, one marker per tile and the thumbnail's when
``use_image_special_tokens``). Every position costs the text model's KV bytes per token
(:func:`lfm2np.calc.kv_bytes_per_token`: K and V of each full-attention layer); the conv state does not grow.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Sequence

from ..config import Config
from ..errors import Lfm2npError
from ..io.gguf import open_gguf
from ..io.mmproj import processor_settings as mmproj_processor_settings
from ..processor import ProcessorConfig, image_layout
from .memory import kv_bytes_per_token

MAX_SIDE = 1 << 20  #: the widest side --image accepts (a million pixels)


def parse_image_size(text: str) -> tuple[int, int]:
    """``"WxH"`` (width x height in pixels, e.g. ``792x660``) as ``(width, height)``."""
    m = re.fullmatch(r"\s*([0-9]{1,7})\s*[xX×]\s*([0-9]{1,7})\s*", text)
    if not m or not 1 <= int(m[1]) <= MAX_SIDE or not 1 <= int(m[2]) <= MAX_SIDE:
        raise Lfm2npError(f"image size {text!r}: expected WxH, width and height in pixels between 1 and {MAX_SIDE} "
                          f"(e.g. 792x660)")
    return int(m[1]), int(m[2])


def processor_settings(model: "str | os.PathLike[str]", mmproj: "str | os.PathLike[str] | None" = None) \
        -> tuple[ProcessorConfig, str]:
    """The processor settings of ``model`` when it is a directory that has them, llama.cpp's with an ``mmproj``
    (:func:`lfm2np.io.mmproj.processor_settings`: the file's patch size, downsample factor, mean and std, its
    fixed LFM2 values and rounding), else the released defaults; and where they came from."""
    if mmproj is not None:
        with open_gguf(mmproj) as f:
            settings = mmproj_processor_settings(f.metadata, str(f.path))
        where = f"{mmproj} (llama.cpp's LFM2 settings)"
        return ProcessorConfig(**settings, source=where), where
    path = Path(model)
    if path.is_dir() and ((path / "processor_config.json").is_file() or (path / "preprocessor_config.json").is_file()):
        config = ProcessorConfig.from_dir(path)
        return config, config.source
    return ProcessorConfig(), "the released defaults (LFM2-VL's processor; MODEL has no processor config)"


def image_costs(config: Config, sizes: Sequence[tuple[int, int]], processor: ProcessorConfig | None = None,
                kv_type: str = "f16") -> dict[str, Any]:
    """Per image ``(width, height)``: its layout, image tokens, prompt positions and their KV bytes; and the
    totals (``image_tokens``, ``sequence_tokens``, ``kv_bytes``)."""
    processor = ProcessorConfig() if processor is None else processor
    per_token = kv_bytes_per_token(config, kv_type)
    images = []
    for k, (width, height) in enumerate(sizes):
        layout = image_layout(height, width, processor, f"image {k + 1} ({width}x{height})")
        markers = processor.use_image_special_tokens * (2 + layout.multi_tile * (layout.rows * layout.cols
                                                                                 + layout.thumbnail))
        positions = layout.tokens + markers
        images.append({"width": width, "height": height, "resized": [layout.resized[1], layout.resized[0]],
                       "tiles": [layout.cols, layout.rows] if layout.tiled else None,
                       "thumbnail": layout.thumbnail, "units": len(layout.units), "tokens": layout.tokens,
                       "sequence_tokens": positions, "kv_bytes": positions * per_token})
    return {"images": images, "image_tokens": sum(i["tokens"] for i in images),
            "sequence_tokens": sum(i["sequence_tokens"] for i in images),
            "kv_bytes": sum(i["kv_bytes"] for i in images), "kv_bytes_per_token": per_token,
            "tile_size": processor.tile_size}
