"""The weights of a loaded model: a lazy mapping from Hugging Face tensor names to arrays, within a memory budget.

A :class:`LazyParams` produces a tensor on first use: ``read(name)`` gets it from its file in the compute
dtype (a widened bf16 tensor, a dequantised GGUF one...), then the numerics mode prepares it
(:meth:`lfm2np.numerics.Numerics.weight`: rounded to bf16 in the emulation). What it keeps is decided by a
**memory budget** (bytes of converted tensors):

1. tensors every token uses (embedding and head, norms, attention and conv weights, dense FFNs, routers)
   are kept first, as they are first used, while they fit;
2. experts (``evictable``) are cached in what is left, least recently used first out; a tensor of class 1
   evicts cached experts when it needs the room;
3. nothing beyond the budget is kept: a tensor that does not fit is produced again at each use (an
   embedding lookup then reads only the rows asked for, :meth:`LazyParams.rows`).

``budget=None`` keeps everything; 0 keeps nothing. :meth:`LazyParams.report` says what is resident.
:class:`lfm2np.Model` trusts a mapping with a ``mode`` attribute to give arrays for that numerics mode.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from ..errors import Lfm2npError
from ..numerics import Numerics

Reader = Callable[[str], np.ndarray]
RowReader = Callable[[str, np.ndarray], np.ndarray]

#: Share of the machine's available memory the default budget takes (the rest is left to the page cache,
#: the activations and everything else running).
DEFAULT_BUDGET_FRACTION = 0.2
MIN_DEFAULT_BUDGET = 1 << 30


class LazyParams(Mapping[str, np.ndarray]):
    """Tensors by name, produced by ``read`` (and ``read_rows`` for row lookups) for ``numerics``, kept
    within ``budget`` bytes (None: no limit). ``sizes`` gives each tensor's converted size (needed with a
    budget); ``evictable`` names the tensors that are cached least-recently-used (experts)."""

    def __init__(self, names: "list[str]", read: Reader, numerics: Numerics, budget: int | None = None,
                 read_rows: RowReader | None = None, stored: Callable[[str], str] | None = None,
                 sizes: Mapping[str, int] | None = None, evictable: "set[str] | frozenset[str]" = frozenset(),
                 prefetch: Callable[[list[str]], None] | None = None):
        self._names = list(names)
        self._known = set(self._names)
        self._read, self._read_rows, self._stored, self._prefetch = read, read_rows, stored, prefetch
        self.numerics, self.mode = numerics, numerics.name
        if isinstance(budget, bool):  # keep everything / nothing
            budget = None if budget else 0
        if budget is not None and (not isinstance(budget, int) or budget < 0):
            raise Lfm2npError(f"memory budget is {budget!r}; expected a number of bytes >= 0 or None")
        if budget and sizes is None:
            raise Lfm2npError("a memory budget needs the tensors' sizes")
        self.budget = budget
        self._sizes = dict(sizes or {})
        self._evictable = frozenset(evictable)
        self._pinned: dict[str, np.ndarray] = {}
        self._cached: OrderedDict[str, np.ndarray] = OrderedDict()  # experts, least recently used first
        self.stats = {"hits": 0, "misses": 0, "evictions": 0}

    # ------------------------------------------------------------------------------- the mapping
    def __getitem__(self, name: str) -> np.ndarray:
        arr = self._pinned.get(name)
        if arr is not None:
            return arr
        arr = self._cached.get(name)
        if arr is not None:
            self._cached.move_to_end(name)
            self.stats["hits"] += 1
            return arr
        if name not in self._known:
            raise KeyError(name)
        arr = self.numerics.weight(name, self._read(name))
        if name in self._evictable:
            self.stats["misses"] += 1
        self._keep(name, arr)
        return arr

    def rows(self, name: str, index: np.ndarray) -> np.ndarray:
        """``self[name][index]`` without producing the whole tensor when it is not kept."""
        if name in self._pinned or name in self._cached or self._read_rows is None or self._fits(name):
            return self[name][index]
        return self.numerics.weight(name, self._read_rows(name, index))

    def prefetch(self, names: "list[str]") -> None:
        """A hint: these tensors are needed next; those not resident may be read ahead in the background."""
        if self._prefetch is not None:
            cold = [n for n in names if n not in self._pinned and n not in self._cached and n in self._known]
            if cold:
                self._prefetch(cold)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    # -------------------------------------------------------------------------------- the policy
    def _resident(self) -> int:
        return sum(a.nbytes for a in self._pinned.values()) + sum(a.nbytes for a in self._cached.values())

    def _fits(self, name: str) -> bool:
        """Whether ``name`` can be kept now, evicting cached experts if need be."""
        if self.budget is None:
            return True
        if name not in self._sizes:
            return False
        return sum(a.nbytes for a in self._pinned.values()) + self._sizes[name] <= self.budget

    def _keep(self, name: str, arr: np.ndarray) -> None:
        if self.budget is None:
            (self._cached if name in self._evictable else self._pinned)[name] = arr
            return
        if sum(a.nbytes for a in self._pinned.values()) + arr.nbytes > self.budget:
            return
        while self._cached and self._resident() + arr.nbytes > self.budget:
            self._cached.popitem(last=False)
            self.stats["evictions"] += 1
        if name in self._evictable:
            self._cached[name] = arr
        else:
            self._pinned[name] = arr

    # -------------------------------------------------------------------------------- reporting
    def stored_type(self, name: str) -> str:
        """How tensor ``name`` is stored in its file (``BF16``, ``F32``, ``Q4_K``...)."""
        if name not in self._known:
            raise KeyError(name)
        return self._stored(name) if self._stored else "?"

    def kept_bytes(self) -> int:
        """Bytes of the converted tensors held in memory."""
        return self._resident()

    def report(self) -> dict[str, Any]:
        """What is resident: budget, bytes and counts of kept every-token tensors and cached experts, what
        would be needed to keep everything, and the expert cache's hits, misses and evictions."""
        total = sum(self._sizes.values()) if self._sizes else None
        every = [n for n in self._names if n not in self._evictable]
        return {"budget_bytes": self.budget, "resident_bytes": self._resident(), "all_tensors_bytes": total,
                "every_token": {"kept": len(self._pinned), "of": len(every),
                                "bytes": sum(a.nbytes for a in self._pinned.values()),
                                "needed_bytes": sum(self._sizes.get(n, 0) for n in every) if self._sizes else None},
                "experts": {"cached": len(self._cached), "of": len(self._evictable),
                            "bytes": sum(a.nbytes for a in self._cached.values()), **self.stats}}


# ------------------------------------------------------------------------------------- budgets
def machine_memory() -> int:
    """Physical memory of this machine in bytes (16 GiB when the platform does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: assume a laptop
        return 16 * 1024**3


def available_memory() -> int:
    """Memory available to a new program now (MemAvailable), else the physical memory."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return machine_memory()


def default_budget(total_bytes: int) -> int | None:
    """The budget :func:`lfm2np.load` uses by default: everything when the converted model takes at most
    a fifth of the available memory, else a fifth of it (at least 1 GiB)."""
    budget = max(MIN_DEFAULT_BUDGET, int(DEFAULT_BUDGET_FRACTION * available_memory()))
    return None if total_bytes <= budget else budget


_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*")
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
MAX_SIZE = 2**62  # bytes: far beyond any machine, inside an int64


def parse_size(text: Any, what: str = "size") -> int:
    """``"32GB"`` -> 32e9, ``"32GiB"`` -> 32 * 2**30, ``"1.5 TB"``, ``"123"`` (bytes): decimal units are
    powers of 1000, binary units (KiB, MiB, GiB, TiB) powers of 1024. :class:`Lfm2npError` naming ``what``
    otherwise (and above 2^62 bytes)."""
    m = _SIZE.fullmatch(str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise Lfm2npError(f"{what} {text!r} is not a size; expected a number with an optional unit "
                          f"(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. 32GB")
    value = float(m.group(1)) * _UNITS[unit]
    if not value <= MAX_SIZE:  # also catches inf from hundreds of digits
        raise Lfm2npError(f"{what} {text!r} is too large: above any machine's memory ({MAX_SIZE} bytes)")
    return int(value)


def parse_budget(budget: Any, total_bytes: int) -> int | None:
    """A memory budget as bytes: None (the default rule), "all"/"inf" (no limit), a number of bytes, or a
    size such as "6GiB" / "500MB"."""
    if budget is None:
        return default_budget(total_bytes)
    if isinstance(budget, str):
        if budget.strip().lower() in ("all", "inf", "unlimited"):
            return None
        return parse_size(budget, "memory budget")
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or not 0 <= budget <= MAX_SIZE:
        raise Lfm2npError(f"memory budget is {budget!r}; expected bytes >= 0, a size such as '6GiB', or 'all'")
    return int(budget)


def default_keep(shapes: Mapping[str, tuple[int, ...]], numerics: Numerics) -> bool:
    """Whether the default budget keeps every one of these tensors (shapes in the compute dtype)."""
    total = sum(int(np.prod(s)) for s in shapes.values()) * numerics.dtype.itemsize
    return default_budget(total) is None
