"""Memory budgets: how many bytes of converted weights a loaded model may keep, and how sizes are written.

:func:`parse_budget` turns what a user gives (None for the default rule, "all", a number of bytes, a size such
as "6GiB") into the bytes :class:`lfm2np.weights.Lazy` keeps; :func:`default_budget` is the default rule
(everything when the converted model takes at most a fifth of the available memory, else a fifth of it);
:func:`parse_size` reads sizes with decimal and binary units (``8G`` = ``8GiB``).
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

from ..errors import Lfm2npError, shown

#: Share of the machine's available memory the default budget takes (the rest is left to the page cache,
#: the activations and everything else running).
DEFAULT_BUDGET_FRACTION = 0.2
MIN_DEFAULT_BUDGET = 1 << 30


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
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}  # one letter: binary, as GNU tools and Docker read it
MAX_SIZE = 2**62  # bytes: far beyond any machine, inside an int64


def parse_size(text: Any, what: str = "size") -> int:
    """``"32GB"`` -> 32e9, ``"32GiB"`` = ``"32G"`` = ``"32g"`` -> 32 * 2**30, ``"1.5 TB"``, ``"123"`` (bytes):
    decimal units (KB, MB, GB, TB) are powers of 1000; binary units (KiB, MiB, GiB, TiB) and the one-letter
    K, M, G, T (as GNU ``sort -S``, ``dd``, Docker and the JVM read them) powers of 1024; any case.
    :class:`Lfm2npError` naming ``what`` otherwise (and above 2^62 bytes). The one reader of sizes: the
    command line's (:func:`lfm2np.calc.parse_bytes`) is this one."""
    if isinstance(text, bool) or not isinstance(text, (str, int, np.integer)) or \
            (not isinstance(text, str) and not 0 <= text <= MAX_SIZE):
        raise Lfm2npError(f"{what} {shown(text)} is not a size; expected a number of bytes or a size such as "
                          f"'32GB' or '8G'")
    m = _SIZE.fullmatch(str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise Lfm2npError(f"{what} {shown(text)} is not a size; expected a number with an optional unit "
                          f"(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB, or K, M, G, T = KiB ... TiB), e.g. 32GB "
                          f"or 8G")
    value = float(m.group(1)) * _UNITS[unit]
    if not value <= MAX_SIZE:  # also catches inf from hundreds of digits
        raise Lfm2npError(f"{what} {shown(text)} is too large: above any machine's memory ({MAX_SIZE} bytes)")
    return int(value)


def parse_budget(budget: Any, total_bytes: int) -> int | None:
    """A memory budget as bytes: None (the default rule), "all"/"inf" (no limit), a number of bytes, or a
    size such as "6GiB" / "6G" / "500MB" (:func:`parse_size`)."""
    if budget is None:
        return default_budget(total_bytes)
    if isinstance(budget, str):
        if budget.strip().lower() in ("all", "inf", "unlimited"):
            return None
        return parse_size(budget, "memory budget")
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or not 0 <= budget <= MAX_SIZE:
        raise Lfm2npError(f"memory budget is {shown(budget)}; expected bytes >= 0, a size such as '6GiB', or 'all'")
    return int(budget)
