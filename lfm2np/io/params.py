"""The weights of a loaded model: a lazy mapping from Hugging Face tensor names to arrays.

A :class:`LazyParams` produces a tensor on first use: ``read(name)`` gets it from its file in the compute
dtype (a view of a memory-mapped float tensor, a widened bf16 one, a dequantised GGUF one), then the
numerics mode prepares it (:meth:`lfm2np.numerics.Numerics.weight`: rounded to bf16 in the emulation).
Tensors are kept once produced when ``keep`` is true; with ``keep`` false they are produced again at
every use, which trades speed for memory. Embedding lookups read only the rows asked for
(:meth:`LazyParams.rows`) when the table is not kept.

:class:`lfm2np.Model` trusts a mapping with a ``mode`` attribute to give arrays for that numerics mode.
"""

from __future__ import annotations

import os
from typing import Callable, Iterator, Mapping

import numpy as np

from ..numerics import Numerics

Reader = Callable[[str], np.ndarray]
RowReader = Callable[[str, np.ndarray], np.ndarray]


class LazyParams(Mapping[str, np.ndarray]):
    """Tensors by name, produced by ``read`` (and ``read_rows`` for row lookups) for ``numerics``."""

    def __init__(self, names: "list[str]", read: Reader, numerics: Numerics, keep: bool,
                 read_rows: RowReader | None = None, stored: Callable[[str], str] | None = None):
        self._names = list(names)
        self._stored = stored
        self._known = set(self._names)
        self._read, self._read_rows = read, read_rows
        self.numerics, self.keep = numerics, keep
        self.mode = numerics.name
        self._kept: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        arr = self._kept.get(name)
        if arr is None:
            if name not in self._known:
                raise KeyError(name)
            arr = self.numerics.weight(name, self._read(name))
            if self.keep:
                self._kept[name] = arr
        return arr

    def rows(self, name: str, index: np.ndarray) -> np.ndarray:
        """``self[name][index]`` without producing the whole tensor when it is not kept."""
        if self.keep or name in self._kept or self._read_rows is None:
            return self[name][index]
        return self.numerics.weight(name, self._read_rows(name, index))

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def stored_type(self, name: str) -> str:
        """How tensor ``name`` is stored in its file (``BF16``, ``F32``, ``Q4_K``...)."""
        if name not in self._known:
            raise KeyError(name)
        return self._stored(name) if self._stored else "?"

    def kept_bytes(self) -> int:
        """Bytes of the tensors kept in memory (converted copies; memory-map views count too)."""
        return sum(a.nbytes for a in self._kept.values())


def machine_memory() -> int:
    """Physical memory of this machine in bytes (16 GiB when the platform does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: assume a laptop
        return 16 * 1024**3


def default_keep(sizes: Mapping[str, tuple[int, ...]], numerics: Numerics) -> bool:
    """Keep converted tensors when the whole model in the compute dtype takes at most half of the machine's
    memory (the rule :func:`lfm2np.load` uses when ``keep_weights`` is None)."""
    converted = sum(int(np.prod(s)) for s in sizes.values()) * numerics.dtype.itemsize
    return converted <= machine_memory() // 2
