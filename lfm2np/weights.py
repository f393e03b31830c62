"""How a model reads its weights: one interface, whatever the file format, within a memory budget.

:class:`Weights` is what :class:`lfm2np.Model` reads: tensors by Hugging Face name, already in the numerics
mode's dtype (``mode``), with ``rows`` (an embedding lookup without the whole table), ``prefetch`` (a
read-ahead hint) and ``report`` (what is resident). Two kinds:

- :class:`InMemory`: a plain mapping of arrays (a model built from a dict), converted for the mode once;
- :class:`Lazy`: tensors produced on first use from a :class:`TensorSource` (a safetensors checkpoint, a GGUF
  file: :mod:`lfm2np.io`), converted for the mode (:meth:`lfm2np.numerics.Numerics.weight`: rounded to bf16 in
  the emulation) and kept within a **memory budget** (bytes of converted tensors):

  1. tensors every token uses (embedding and head, norms, attention and conv weights, dense FFNs, routers)
     are kept first, as they are first used, while they fit;
  2. experts are cached in what is left, least recently used first out; a tensor of class 1 evicts cached
     experts when it needs the room;
  3. nothing beyond the budget is kept: a tensor that does not fit is produced again at each use (an embedding
     lookup then reads only the rows asked for).

  ``budget=None`` keeps everything; 0 keeps nothing. The cache is shared safely between threads.

  Experts that are not resident are also **converted ahead**: when the model says which experts a layer
  chose (:meth:`Weights.prefetch`, in the order the products need them), a background thread converts
  them one after the other, at most :data:`AHEAD` tensors before they are asked for, so an expert is
  dequantised (or widened) while the products of the one before run. Nothing changes but when the
  conversion happens: the same function makes the same values.

:func:`check_tensors` is the one strict check of what a source holds against what the config needs: missing or
mis-shaped tensors are errors; unexpected ones an error, or a warning when not ``strict``.
"""

from __future__ import annotations

import ctypes
import os
import threading
import warnings
import weakref
from collections import OrderedDict, deque
from typing import Any, Callable, Iterator, Mapping, Protocol

import numpy as np

from .errors import Lfm2npError, shown
from .numerics import Numerics
from .schema import Tensor


class TensorSource(Protocol):
    """Where tensors come from, by Hugging Face name: a checkpoint directory, a GGUF file."""

    def read(self, name: str, dtype: np.dtype, rows: np.ndarray | None = None) -> np.ndarray:
        """Tensor ``name`` in ``dtype`` (a fresh array), or only ``rows`` of its first axis."""

    def stored_type(self, name: str) -> str:
        """How tensor ``name`` is stored (``BF16``, ``F32``, ``Q4_K``...)."""

    def read_blocks(self, name: str) -> np.ndarray:
        """Tensor ``name`` as stored, when quantised: its blocks, one row of bytes per row of its first axis,
        uint8 (rows, row bytes) (for a numerics mode that multiplies the stored blocks: llama.cpp's CPU
        arithmetic)."""

    def prefetch(self, names: "list[str]") -> None:
        """A hint: these tensors are needed soon (read them into the page cache in the background)."""

    def close(self) -> None:
        """Release the files (reading afterwards is an error)."""

    def describe(self) -> dict[str, Any]:
        """Where the tensors come from: ``{"format": "gguf" | "safetensors", "path": ...}``."""


def check_tensors(have: Mapping[str, tuple[int, ...]], want: Mapping[str, tuple[int, ...]], where: str,
                  strict: bool, what: str, shape_word: str = "shape") -> list[str]:
    """Check a source's tensors (``have``: name -> shape) against those a config needs (``want``): a missing or
    mis-shaped tensor is an :class:`Lfm2npError` naming ``where``; unexpected tensors are an error when
    ``strict``, else a warning (both naming them, the first five and how many more). ``what`` describes the
    config in the messages. Returns the unexpected names."""
    missing = [n for n in want if n not in have]
    if missing:
        raise Lfm2npError(f"{where}: missing tensor {_some(missing, 3)} ({what})")
    for name, shape in want.items():
        if tuple(have[name]) != tuple(shape):
            raise Lfm2npError(f"{where}: tensor {shown(name)} has {shape_word} {list(have[name])}; the config expects "
                              f"{list(shape)} ({what})")
    unexpected = [n for n in have if n not in want]
    if unexpected:
        message = f"{where}: tensor {_some(unexpected, 5)} is not used by this config ({what})"
        if strict:
            raise Lfm2npError(message + "; pass strict=False to load anyway")
        warnings.warn(message + "; ignored", stacklevel=4)
    return unexpected


def _some(names: list[str], n: int) -> str:
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(name if len(name) <= 100 else shown(name, 100) for name in names[:n]) + more


class Weights(Mapping[str, np.ndarray]):
    """Tensors by Hugging Face name, in the dtype of numerics mode ``mode``: the interface the model reads.
    ``layout`` lists them (:func:`lfm2np.schema.layout` of the config)."""

    mode: str
    layout: "list[Tensor]"
    #: the config whose layout these weights hold, when the loader knows it (None: a Model checks the layout)
    config: Any = None

    def rows(self, name: str, index: np.ndarray) -> np.ndarray:
        """``self[name][index]``, without producing the whole tensor where it is not kept."""
        return self[name][index]

    def prefetch(self, names: "list[str]") -> None:
        """A hint: these tensors are needed next (those not resident may be read ahead)."""

    def report(self) -> dict[str, Any]:
        """What is resident: ``budget_bytes``, ``resident_bytes``, ``all_tensors_bytes`` (and, for lazy
        weights, the every-token tensors and the expert cache)."""
        raise NotImplementedError

    def stored_type(self, name: str) -> str:
        """How tensor ``name`` is stored in its file ("?" when it came from memory)."""
        if name not in self:
            raise KeyError(name)
        return "?"

    def describe(self) -> dict[str, Any]:
        """Where the weights come from, for a trace's metadata: ``format`` ("gguf", "safetensors" or "arrays"),
        the file or directory, and how many tensors each stored type holds (``{"Q8_0": 24, "F32": 9}``)."""
        return {"format": "arrays"}


class InMemory(Weights):
    """The tensors of ``layout`` given as arrays (``tensors``, checked by the caller), each converted once for
    ``numerics``."""

    def __init__(self, tensors: Mapping[str, Any], layout: "list[Tensor]", numerics: Numerics):
        want = {t.name: t.shape for t in layout}  # (tensors it does not use are the caller's to refuse)
        check_tensors({n: np.shape(tensors[n]) for n in want if n in tensors}, want, "params", True, "the layout")
        self.mode, self.layout = numerics.name, layout
        self._tensors = {t.name: numerics.weight(t.name, tensors[t.name]) for t in layout}

    def __getitem__(self, name: str) -> np.ndarray:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def report(self) -> dict[str, Any]:
        held = sum(a.nbytes for a in self._tensors.values())
        return {"budget_bytes": None, "resident_bytes": held, "all_tensors_bytes": held}


class ExpertWeights:
    """An expert's SwiGLU weights as :func:`lfm2np.layers.swiglu` reads them (``w1``, ``w3``, ``w2``), each
    taken from ``weights`` by name when first read: the SwiGLU reads w1, then w3, then w2, so a matrix
    converted at use (an expert that does not fit the memory budget) is converted, or taken from the
    thread converting ahead, just before its product, which then finds it still in the cache."""

    __slots__ = ("_weights", "_names", "_got")

    def __init__(self, weights: Weights, names: "tuple[str, str, str]"):
        self._weights, self._names, self._got = weights, dict(zip(("w1", "w3", "w2"), names)), {}

    def _get(self, role: str) -> np.ndarray:
        if role not in self._got:
            self._got[role] = self._weights[self._names[role]]
        return self._got[role]

    w1 = property(lambda self: self._get("w1"), doc="gate (F, D)")
    w3 = property(lambda self: self._get("w3"), doc="up (F, D)")
    w2 = property(lambda self: self._get("w2"), doc="down (D, F)")


#: tensors converted ahead of use, at most (one expert's three matrices)
AHEAD = 3
#: seconds the background thread waits for more work before it stops
AHEAD_IDLE_SECONDS = 1.0
_ALL_AHEAD: "weakref.WeakSet[_Ahead]" = weakref.WeakSet()


class _Ahead:
    """Tensors converted ahead of use by a background thread, in the order asked, at most ``window`` of them
    converted and not yet taken. The thread stops after :data:`AHEAD_IDLE_SECONDS` without work (so nothing
    outlives its model for long) and starts again at the next :meth:`ask`."""

    def __init__(self, convert: Callable[[str], np.ndarray], window: int):
        self._convert, self._window = convert, window
        self._reset()
        _ALL_AHEAD.add(self)

    def _reset(self) -> None:  # (also in a forked child, whose copy of the lock may be held by a vanished thread)
        self._cond = threading.Condition()
        self._queue: deque[str] = deque()
        self._wanted: set[str] = set()
        self._done: dict[str, "np.ndarray | BaseException"] = {}
        self._busy: str | None = None
        self._running = False

    def ask(self, names: "list[str]") -> None:
        """Convert ``names`` ahead, in this order, instead of what was asked before (results not taken are
        dropped)."""
        if self._window <= 0:
            return
        with self._cond:
            self._wanted = set(names)
            self._done = {n: v for n, v in self._done.items() if n in self._wanted}
            self._queue = deque(n for n in dict.fromkeys(names) if n not in self._done and n != self._busy)
            if self._queue and not self._running:
                self._running = True
                threading.Thread(target=self._work, name="lfm2np-ahead", daemon=True).start()
            self._cond.notify_all()

    def take(self, name: str) -> "np.ndarray | None":
        """``name`` as converted ahead (waiting while it is under way), or None when it was not asked for or
        not started yet: then the caller converts it, and the thread goes on with the next."""
        with self._cond:
            if name in self._wanted and name != self._busy and name not in self._done:
                self._wanted.discard(name)
                self._queue = deque(n for n in self._queue if n != name)
                return None
            while self._busy == name:
                self._cond.wait()
            self._wanted.discard(name)
            value = self._done.pop(name, None)
            self._cond.notify_all()  # room for the next
        if isinstance(value, BaseException):
            raise value
        return value

    def _work(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._queue or len(self._done) >= self._window:
                        if not self._cond.wait(timeout=AHEAD_IDLE_SECONDS):
                            return
                    name = self._busy = self._queue.popleft()
                try:
                    value: "np.ndarray | BaseException" = self._convert(name)
                except BaseException as error:  # raised where the tensor is taken
                    value = error
                with self._cond:
                    self._busy = None
                    if name in self._wanted:
                        self._done[name] = value
                    self._cond.notify_all()
        finally:
            with self._cond:
                self._running = False


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=lambda: [a._reset() for a in list(_ALL_AHEAD)])


def _malloc_trim() -> "Callable[[int], int] | None":
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc
    except (OSError, AttributeError, TypeError):  # no such function (musl, macOS); no CDLL(None) (Windows)
        return None


_TRIM = _malloc_trim()
#: MoE layers between two trims (:func:`_give_back_freed_memory`)
TRIM_EVERY, _ASKS = 4, 0


def _give_back_freed_memory() -> None:
    """Return the pages of freed blocks to the system (glibc's ``malloc_trim``; elsewhere nothing), every
    :data:`TRIM_EVERY` MoE layers whose experts are converted ahead: after large blocks are freed glibc raises its
    mmap threshold, and the converting thread's freed expert matrices then stay in its heap, adding up to 1.5 GB
    to the peak at a small budget. Each trim costs time (the pages are faulted in again): every layer kept the 24B
    Q4_K_M at 5.1 GB for 20-25% more time, every 4th at 5.3 GB for 12-14% (docs/performance.md). A fixed mmap
    threshold would bound it too but slows every large temporary 2.5x."""
    global _ASKS
    _ASKS += 1
    if _TRIM is not None and _ASKS % TRIM_EVERY == 0:
        _TRIM(0)


class Lazy(Weights):
    """The tensors of ``layout`` read from ``source`` for ``numerics`` on first use, kept within ``budget``
    bytes (None: no limit; see the module docstring). Experts (``part == "expert"``) are cached least recently
    used first out. Safe to share between threads (one lock around the cache; reads run outside it)."""

    def __init__(self, source: TensorSource, layout: "list[Tensor]", numerics: Numerics, budget: int | None = None):
        if isinstance(budget, bool) or (budget is not None and (not isinstance(budget, int) or budget < 0)):
            raise Lfm2npError(f"memory budget is {shown(budget)}; expected a number of bytes >= 0 or None")
        self.source, self.numerics, self.mode, self.budget = source, numerics, numerics.name, budget
        self.layout = layout
        self._names = [t.name for t in layout]
        self._sizes = {t.name: t.size * numerics.dtype.itemsize for t in layout}
        self._evictable = frozenset(t.name for t in layout if t.part == "expert")
        self._pinned: dict[str, np.ndarray] = {}
        self._cached: OrderedDict[str, np.ndarray] = OrderedDict()  # experts, least recently used first
        self._held = {"pinned": 0, "cached": 0}  # bytes in each (kept up to date: summing is slow at 7,000 experts)
        self._lock = threading.RLock()
        self.stats = {"hits": 0, "misses": 0, "evictions": 0}
        self._ahead = _Ahead(self._convert, AHEAD)

    def _convert(self, name: str) -> np.ndarray:
        """Tensor ``name`` read from the source and converted for the mode."""
        return self.numerics.weight(name, self.source.read(name, self.numerics.dtype), self._stored(name))

    # ------------------------------------------------------------------------------- the mapping
    def _resident_array(self, name: str) -> np.ndarray | None:
        with self._lock:
            arr = self._pinned.get(name)
            if arr is None:
                arr = self._cached.get(name)
                if arr is not None:
                    self._cached.move_to_end(name)
                    self.stats["hits"] += 1
            return arr

    def __getitem__(self, name: str) -> np.ndarray:
        arr = self._resident_array(name)
        if arr is not None:
            return arr
        if name not in self._sizes:
            raise KeyError(name)
        arr = self._ahead.take(name) if name in self._evictable else None
        if arr is None:
            arr = self._convert(name)
        with self._lock:
            if name in self._evictable:
                self.stats["misses"] += 1
            self._keep(name, arr)
        return arr

    def rows(self, name: str, index: np.ndarray) -> np.ndarray:
        with self._lock:
            whole = name in self._pinned or name in self._cached or self._fits(name)
        if whole:
            return self[name][index]
        if name not in self._sizes:
            raise KeyError(name)
        return self.numerics.weight(name, self.source.read(name, self.numerics.dtype, rows=np.asarray(index)))

    def _stored(self, name: str) -> Any:
        """How ``name`` is stored, for a mode that multiplies the stored blocks: (type, a function reading them)."""
        if not self.numerics.reads_blocks:
            return None
        return self.source.stored_type(name), lambda: self.source.read_blocks(name)

    def prefetch(self, names: "list[str]") -> None:
        with self._lock:
            cold = [n for n in names if n not in self._pinned and n not in self._cached and n in self._sizes]
        if cold:
            self.source.prefetch(cold)
            experts = [n for n in cold if n in self._evictable]
            if experts:  # chosen experts: converted ahead, in this order
                _give_back_freed_memory()
                self._ahead.ask(experts)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._sizes

    # -------------------------------------------------------------------------------- the policy
    def _resident(self) -> int:
        return self._held["pinned"] + self._held["cached"]

    def _fits(self, name: str) -> bool:
        """Whether ``name`` can be kept now, evicting cached experts if need be."""
        if self.budget is None:
            return True
        if name not in self._sizes:
            return False
        return self._held["pinned"] + self._sizes[name] <= self.budget

    def _keep(self, name: str, arr: np.ndarray) -> None:
        if name in self._pinned or name in self._cached:  # another thread read it meanwhile: keep one
            return
        evictable = name in self._evictable
        if self.budget is not None:
            if self._held["pinned"] + arr.nbytes > self.budget:
                return
            while self._cached and self._resident() + arr.nbytes > self.budget:
                self._held["cached"] -= self._cached.popitem(last=False)[1].nbytes
                self.stats["evictions"] += 1
        (self._cached if evictable else self._pinned)[name] = arr
        self._held["cached" if evictable else "pinned"] += arr.nbytes

    # -------------------------------------------------------------------------------- reporting
    def stored_type(self, name: str) -> str:
        if name not in self._sizes:
            raise KeyError(name)
        return self.source.stored_type(name)

    def describe(self) -> dict[str, Any]:
        types: dict[str, int] = {}
        for name in self._names:
            kind = self.source.stored_type(name)
            types[kind] = types.get(kind, 0) + 1
        return {**self.source.describe(), "types": dict(sorted(types.items()))}

    def kept_bytes(self) -> int:
        """Bytes of the converted tensors held in memory."""
        with self._lock:
            return self._resident()

    def report(self) -> dict[str, Any]:
        """What is resident: budget, bytes and counts of kept every-token tensors and cached experts, what
        would be needed to keep everything, and the expert cache's hits, misses and evictions."""
        with self._lock:
            every = [n for n in self._names if n not in self._evictable]
            return {"budget_bytes": self.budget, "resident_bytes": self._resident(),
                    "all_tensors_bytes": sum(self._sizes.values()),
                    "every_token": {"kept": len(self._pinned), "of": len(every),
                                    "bytes": self._held["pinned"],
                                    "needed_bytes": sum(self._sizes[n] for n in every)},
                    "experts": {"cached": len(self._cached), "of": len(self._evictable),
                                "bytes": self._held["cached"], **self.stats}}
