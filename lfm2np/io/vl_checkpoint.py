"""LFM2-VL checkpoints: the tensor names of a directory mapped onto lfm2np's layout, as a tensor source.

An ``Lfm2VlForConditionalGeneration`` checkpoint nests the text tower under ``model.language_model.`` (lfm2np's
layout keeps the text model's own names, ``model.layers.{i}...``, so every text tool reads a VL model alike) and
the vision tower under ``model.vision_tower.vision_model.`` as released, or ``model.vision_tower.`` as
transformers 5.25's ``save_pretrained`` writes it (lfm2np's layout uses the released names). :class:`Renamed` is a
:class:`~lfm2np.weights.TensorSource` that reads the stored names under lfm2np's.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import Lfm2npError
from ..vision_schema import TOWER

TEXT, SAVED_TOWER = "model.language_model.", "model.vision_tower."


def layout_name(stored: str) -> str:
    """lfm2np's name for a tensor an LFM2-VL checkpoint stores as ``stored``."""
    if stored.startswith(TEXT):
        return "model." + stored[len(TEXT):]
    if stored.startswith(SAVED_TOWER) and not stored.startswith(TOWER):
        return TOWER + stored[len(SAVED_TOWER):]
    return stored


class Renamed:
    """A :class:`~lfm2np.weights.TensorSource`: ``source`` (with ``shapes()``) read under lfm2np's names (:func:`layout_name`); two stored names for one
    tensor (both tower spellings in one directory) are an error naming them."""

    def __init__(self, source: Any, where: str):
        self.source, self.stored = source, {}
        for name in source.shapes():
            mine = layout_name(name)
            if mine in self.stored:
                raise Lfm2npError(f"{where}: tensors {self.stored[mine]!r} and {name!r} are the same tensor of the "
                                  f"layout ({mine}) under two names")
            self.stored[mine] = name

    def shapes(self) -> dict[str, tuple[int, ...]]:
        have = self.source.shapes()
        return {mine: have[name] for mine, name in self.stored.items()}

    def read(self, name: str, dtype: np.dtype, rows: np.ndarray | None = None) -> np.ndarray:
        return self.source.read(self.stored.get(name, name), dtype, rows)

    def stored_type(self, name: str) -> str:
        return self.source.stored_type(self.stored.get(name, name))

    def prefetch(self, names: "list[str]") -> None:
        self.source.prefetch([self.stored.get(n, n) for n in names])

    def close(self) -> None:
        self.source.close()

    def describe(self) -> dict[str, Any]:
        return self.source.describe()

