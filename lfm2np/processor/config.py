"""The image processor's settings: ``processor_config.json`` / ``preprocessor_config.json``, strictly validated.

Where transformers 5.25 looks (``ImageProcessingMixin.get_image_processor_dict``): the ``"image_processor"``
object of ``processor_config.json`` when there is one, else the flat ``preprocessor_config.json``; the two are
never merged. ``use_image_special_tokens`` is a processor-level flag of ``processor_config.json``. A key lfm2np
does not know is refused (a typo would otherwise fall back to a default silently); keys transformers ignores for
this processor (``size``, ``do_resize``: the processor always resizes; ``max_num_patches``: it computes the patch
budget itself; ``use_image_special_tokens`` in the image processor's object: only the processor reads it) are read
and ignored as it does.

Four settings are lfm2np's readings, not checkpoint keys: ``rounding`` (``"transformers"``: Python's
``round``, half to even, in float64; ``"llama.cpp"``: ``std::round``, half away from zero, in float32, as
llama.cpp's ``calc_size_preserved_ratio``), ``antialias`` (transformers resizes with it),
``resize_arithmetic`` (``"fixed-point"``: torch's uint8 path, what transformers computes on x86; ``"float"``:
resized in floating point and rounded once, torch's path elsewhere) and ``single_tile_placeholders`` (what a
tiled image cut into a 1x1 grid writes: ``"features"``, one placeholder per feature the tile gives, or
``"transformers-5.25"``, the smart-resized size's count as that version writes; see docs/ops/image_tiling.md).
The diagnosis's image mistakes are these readings and the checkpoint's settings changed.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import Lfm2npError
from ..io.chat_template import read_json_object

ROUNDINGS = ("transformers", "llama.cpp")
RESAMPLES = {2: "bilinear", 3: "bicubic"}  #: PIL's resampling codes transformers maps to torchvision's modes
PLACEHOLDER_RULES = ("features", "transformers-5.25")
ARITHMETICS = ("fixed-point", "float")

_INTS = ("encoder_patch_size", "downsample_factor", "min_image_tokens", "max_image_tokens", "min_tiles", "max_tiles",
         "tile_size")
_BOOLS = ("do_image_splitting", "use_thumbnail", "do_rescale", "do_normalize", "use_image_special_tokens",
          "antialias")
#: keys of the image processor's file that lfm2np reads and then ignores, as transformers' Lfm2VlImageProcessor does
_IGNORED = {"image_processor_type", "processor_class", "auto_map", "size", "do_resize", "max_num_patches",
            "patch_size", "return_row_col_info", "do_convert_rgb", "data_format", "input_data_format", "device",
            "return_tensors", "disable_grouping", "default_to_square", "do_center_crop", "crop_size", "pad_size",
            "image_seq_length", "use_image_special_tokens"}
_PROCESSOR_KEYS = {"processor_class", "image_processor", "use_image_special_tokens", "auto_map", "chat_template"}


@dataclass(frozen=True)
class ProcessorConfig:
    """The LFM2-VL image processor's settings (defaults: transformers' Lfm2VlImageProcessor, as released with
    LFM2-VL-1.6B; LFM2.5-VL-3B's file says ``min_tiles`` 1)."""

    encoder_patch_size: int = 16
    downsample_factor: int = 2
    min_image_tokens: int = 64
    max_image_tokens: int = 256
    do_image_splitting: bool = True
    min_tiles: int = 2
    max_tiles: int = 10
    use_thumbnail: bool = True
    tile_size: int = 512
    max_pixels_tolerance: float = 2.0
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    resample: str = "bilinear"
    use_image_special_tokens: bool = True
    rounding: str = "transformers"
    antialias: bool = True
    single_tile_placeholders: str = "features"
    resize_arithmetic: str = "fixed-point"
    source: str = field(default="defaults", compare=False)

    def __post_init__(self) -> None:
        where = self.source
        for name in _INTS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise Lfm2npError(f"{where}: {name} must be a whole number >= 1; got {value!r}")
        for name in _BOOLS:
            if not isinstance(getattr(self, name), bool):
                raise Lfm2npError(f"{where}: {name} must be true or false; got {getattr(self, name)!r}")
        for name in ("max_pixels_tolerance", "rescale_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise Lfm2npError(f"{where}: {name} must be a finite number > 0; got {value!r}")
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if not (isinstance(value, tuple) and len(value) == 3 and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)):
                raise Lfm2npError(f"{where}: {name} must be three finite numbers; got {value!r}")
        if any(v == 0 for v in self.image_std):
            raise Lfm2npError(f"{where}: image_std {list(self.image_std)} has a zero (normalisation divides by it)")
        if self.min_image_tokens > self.max_image_tokens:
            raise Lfm2npError(f"{where}: min_image_tokens {self.min_image_tokens} > max_image_tokens "
                              f"{self.max_image_tokens}")
        if self.do_image_splitting and self.min_tiles > self.max_tiles:
            raise Lfm2npError(f"{where}: min_tiles {self.min_tiles} > max_tiles {self.max_tiles}")
        unit = self.encoder_patch_size * self.downsample_factor
        if self.tile_size % unit:
            raise Lfm2npError(f"{where}: tile_size {self.tile_size} is not a multiple of encoder_patch_size x "
                              f"downsample_factor = {unit} (a tile must cut into whole merged patches)")
        for name, allowed in (("resample", tuple(RESAMPLES.values())), ("rounding", ROUNDINGS),
                              ("single_tile_placeholders", PLACEHOLDER_RULES), ("resize_arithmetic", ARITHMETICS)):
            if getattr(self, name) not in allowed:
                raise Lfm2npError(f"{where}: {name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")

    # ------------------------------------------------------------------ derived
    @property
    def tiling(self) -> bool:
        """Whether large images are cut into tiles (transformers: ``do_image_splitting``, and not min = max = 1)."""
        return self.do_image_splitting and not (self.min_tiles == self.max_tiles == 1)

    @property
    def max_num_patches(self) -> int:
        """P, the patch budget every unit is padded to: ``max(max_image_tokens * ds^2, (tile_size / p)^2)`` (the
        tile term only when splitting), as transformers computes it (a file's own ``max_num_patches`` is ignored)."""
        tile = (self.tile_size // self.encoder_patch_size) ** 2 if self.do_image_splitting else 0
        return max(self.max_image_tokens * self.downsample_factor ** 2, tile)

    @property
    def patch_dim(self) -> int:
        """3 * p * p: the length of one flattened patch."""
        return 3 * self.encoder_patch_size ** 2

    def replace(self, **changes: Any) -> "ProcessorConfig":
        """A copy with ``changes`` (validated again)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise Lfm2npError(f"ProcessorConfig has no setting {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ files
    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "processor config", **readings: Any) -> "ProcessorConfig":
        """The settings in an image-processor object (flat, as in ``preprocessor_config.json``); ``readings``:
        lfm2np's own choices (``rounding``, ``antialias``, ``single_tile_placeholders``)."""
        if not isinstance(values, dict):
            raise Lfm2npError(f"{source}: expected a JSON object; got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)} - {"source", "rounding", "antialias", "resample",
                                                             "single_tile_placeholders", "use_image_special_tokens",
                                                             "resize_arithmetic"}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            if key in _IGNORED:
                continue
            if key == "resample":
                if isinstance(value, bool) or value not in RESAMPLES:
                    raise Lfm2npError(f"{source}: resample {value!r} is not supported: lfm2np resizes with PIL's "
                                      f"codes {', '.join(f'{k} ({v})' for k, v in RESAMPLES.items())}")
                kwargs["resample"] = RESAMPLES[value]
            elif key == "do_pad":
                if value is not True:
                    raise Lfm2npError(f"{source}: do_pad {value!r}: lfm2np always pads each unit to the patch budget "
                                      "with its mask (the model needs them); only true is supported")
            elif key in ("image_mean", "image_std"):
                kwargs[key] = _three(value, f"{source}: {key}")
            elif key in known:
                kwargs[key] = value
            else:
                raise Lfm2npError(f"{source}: unknown key {key!r} (a typo? lfm2np reads "
                                  f"{', '.join(sorted(known | {'resample', 'do_pad'}))})")
        return cls(**kwargs, **readings, source=source)

    @classmethod
    def from_dir(cls, path: "str | os.PathLike[str]", **readings: Any) -> "ProcessorConfig":
        """The settings of a checkpoint directory, where transformers 5.25 finds them (see the module's doc)."""
        directory = Path(path)
        if not directory.is_dir():
            raise Lfm2npError(f"{directory}: not a directory")
        processor_file, image_file = directory / "processor_config.json", directory / "preprocessor_config.json"
        processor: dict[str, Any] = {}
        if processor_file.exists():
            processor = read_json_object(processor_file, "processor config")
            for key in processor:
                if key not in _PROCESSOR_KEYS:
                    raise Lfm2npError(f"{processor_file}: unknown key {key!r} (lfm2np reads "
                                      f"{', '.join(sorted(_PROCESSOR_KEYS))})")
        if "image_processor" in processor:
            values, source = processor["image_processor"], f"{processor_file}: image_processor"
        elif image_file.exists():
            values, source = read_json_object(image_file, "preprocessor config"), str(image_file)
        else:
            raise Lfm2npError(f"{directory}: no image processor settings (neither processor_config.json with an "
                              "'image_processor' object nor preprocessor_config.json): not a vision-language "
                              "checkpoint")
        config = cls.from_dict(values, source, **readings)
        if "use_image_special_tokens" in processor:
            where = source if source.startswith(str(processor_file)) else f"{processor_file} + {source}"
            config = dataclasses.replace(config, use_image_special_tokens=processor["use_image_special_tokens"],
                                         source=where)
        return config


def _three(value: Any, where: str) -> tuple[float, float, float]:
    """A mean or std: one number for every channel, or a list of three (as transformers accepts them)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (value, value, value)
    if isinstance(value, list) and len(value) == 3:
        return tuple(value)  # type: ignore[return-value]  (checked by ProcessorConfig)
    raise Lfm2npError(f"{where} must be a number or a list of three numbers; got {value!r}")
