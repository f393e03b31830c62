"""Random weights with the shapes of any config: for tests, property checks and benchmarks.

Scales keep activations of order one at any width: linear weights ~ N(0, 1/in), embeddings ~ N(0, 1),
norm weights uniform in [0.5, 1.5) (never all ones, which would hide a missing or ``1 + w`` norm weight),
biases ~ N(0, 0.3^2), conv kernels ~ N(0, 0.6^2), the expert bias ~ N(0, expert_bias_scale^2).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .config import Config
from .errors import Lfm2npError, shown
from .model import Model
from .numerics import numerics
from .schema import expected_tensors


def random_params(config: Config, seed: int = 0, dtype: Any = "float32",
                  expert_bias_scale: float = 0.1) -> dict[str, np.ndarray]:
    """A dict of every tensor ``config`` needs, drawn from a seeded generator."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise Lfm2npError(f"seed is {shown(seed)}; expected an integer >= 0")
    if isinstance(expert_bias_scale, bool) or not isinstance(expert_bias_scale, (int, float)) \
            or not np.isfinite(expert_bias_scale):
        raise Lfm2npError(f"expert_bias_scale is {shown(expert_bias_scale)}; expected a finite number")
    dt = numerics(dtype).dtype
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in expected_tensors(config).items():
        if name.endswith(("norm.weight", "layernorm.weight")):
            arr = 0.5 + rng.random(shape)
        elif name.endswith("expert_bias"):
            arr = expert_bias_scale * rng.standard_normal(shape)
        elif name.endswith(".bias"):
            arr = 0.3 * rng.standard_normal(shape)
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):
            arr = rng.standard_normal(shape)
        elif name.endswith("conv.conv.weight"):
            arr = 0.6 * rng.standard_normal(shape)
        else:
            arr = rng.standard_normal(shape) / np.sqrt(shape[-1])
        params[name] = arr.astype(dt)
    return params


def random_model(config: Config, seed: int = 0, dtype: Any = "float32", **kwargs: Any) -> Model:
    """A Model with random in-memory weights (no checkpoint on disk)."""
    return Model(config, random_params(config, seed, dtype, **kwargs), dtype)
