"""The vision side of an LFM2-VL configuration: the SigLIP2 NaFlex tower, the projector and where image features
go (:class:`VisionConfig`), read from an ``lfm2_vl`` config.json by :mod:`lfm2np.config_keys` and held by
:class:`lfm2np.config.Config` as ``config.vision`` (None for a text model).

Fields keep transformers' names: the tower's from ``vision_config`` (``Siglip2VisionConfig``), the projector's and
``downsample_factor`` / ``image_token_id`` from the top level (``Lfm2VlConfig``), with their defaults. Every field
is checked for its type and range; sizes against bounds far above any released model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

#: upper bounds on the tower's sizes (SigLIP2-400M: 1152 wide, 4304 MLP, 27 layers, 16 heads, 256 positions)
LIMITS = {"hidden_size": 1 << 15, "intermediate_size": 1 << 17, "num_hidden_layers": 1024,
          "num_attention_heads": 1024, "num_channels": 16, "patch_size": 1024, "num_patches": 1 << 16,
          "downsample_factor": 64, "projector_hidden_size": 1 << 17}


@dataclass(frozen=True)
class VisionConfig:
    """An LFM2-VL model's vision tower (SigLIP2 NaFlex: ``hidden_size``, ``intermediate_size``,
    ``num_hidden_layers``, ``num_attention_heads``, ``num_channels``, ``patch_size``, ``num_patches`` learned
    positions on a square grid, ``layer_norm_eps``), its projector (pixel unshuffle by ``downsample_factor``,
    the optional LayerNorm ``projector_use_layernorm``, Linear to ``projector_hidden_size``, exact GELU, Linear to
    the text width; biases when ``projector_bias``) and ``image_token_id``, the placeholder the image features
    replace in the ids."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_channels: int = 3
    patch_size: int = 16
    num_patches: int = 256
    layer_norm_eps: float = 1e-6
    downsample_factor: int = 2
    projector_hidden_size: int = 2560
    projector_bias: bool = True
    projector_use_layernorm: bool = True
    image_token_id: int = 396
    # derived
    head_dim: int = field(init=False)
    grid: int = field(init=False)  # the side G of the learned position grid (G * G = num_patches)
    patch_dim: int = field(init=False)  # C * p * p values per patch
    projector_in: int = field(init=False)  # hidden_size * f * f, the width of an unshuffled token

    def check(self, error: Callable[[str, str], Exception]) -> None:
        """Types and ranges; ``error(field, problem)`` builds the exception raised (naming the config file)."""
        for name, limit in LIMITS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise error(f"{_where(name)}", f"is {value!r}; expected a positive integer")
            if value > limit:
                raise error(f"{_where(name)}", f"is {value}, above lfm2np's bound {limit} for it")
        eps = self.layer_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
            raise error("vision_config.layer_norm_eps", f"is {eps!r}; expected a positive finite number")
        for name in ("projector_bias", "projector_use_layernorm"):
            if not isinstance(getattr(self, name), bool):
                raise error(name, f"is {getattr(self, name)!r}; expected true or false")
        if self.hidden_size % self.num_attention_heads:
            raise error("vision_config.num_attention_heads", f"is {self.num_attention_heads}, which does not divide "
                                                             f"hidden_size {self.hidden_size}")
        if math.isqrt(self.num_patches) ** 2 != self.num_patches:
            raise error("vision_config.num_patches", f"is {self.num_patches}; the learned positions form a square "
                                                     f"grid, so expected a square number (256 = 16 x 16)")
        t = self.image_token_id
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise error("image_token_id", f"is {t!r}; expected a token id")

    def __post_init__(self) -> None:
        ok = all(isinstance(getattr(self, n), int) and getattr(self, n) > 0 for n in LIMITS)
        object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads if ok else 0)
        object.__setattr__(self, "grid", math.isqrt(self.num_patches) if ok else 0)
        object.__setattr__(self, "patch_dim", self.num_channels * self.patch_size ** 2 if ok else 0)
        object.__setattr__(self, "projector_in", self.hidden_size * self.downsample_factor ** 2 if ok else 0)

    def tokens(self, h: int, w: int) -> int:
        """Image tokens of an image of ``h`` x ``w`` patches: ``(h // f) * (w // f)``."""
        f = self.downsample_factor
        return (h // f) * (w // f)

    def to_dict(self) -> dict[str, Any]:
        """The tower's ``vision_config`` dictionary (transformers' ``siglip2_vision_model``)."""
        return {"model_type": "siglip2_vision_model", "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
                "num_attention_heads": self.num_attention_heads, "num_channels": self.num_channels,
                "patch_size": self.patch_size, "num_patches": self.num_patches, "layer_norm_eps": self.layer_norm_eps,
                "hidden_act": "gelu_pytorch_tanh", "vision_use_head": False}

    def top_level(self) -> dict[str, Any]:
        """The projector's and placement's top-level keys of an ``lfm2_vl`` config.json."""
        return {"downsample_factor": self.downsample_factor, "projector_hidden_size": self.projector_hidden_size,
                "projector_bias": self.projector_bias, "projector_use_layernorm": self.projector_use_layernorm,
                "projector_hidden_act": "gelu", "image_token_id": self.image_token_id}


#: the fields read from ``vision_config`` (the rest are top-level keys)
TOWER_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
                "patch_size", "num_patches", "layer_norm_eps")


def _where(name: str) -> str:
    return f"vision_config.{name}" if name in TOWER_FIELDS else name
