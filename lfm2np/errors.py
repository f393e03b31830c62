"""The one exception type lfm2np raises for bad input (files, configs, token ids), and how a message shows the
value at fault."""

from __future__ import annotations

import reprlib
from typing import Any


class Lfm2npError(Exception):
    """Raised when a checkpoint, config or input is not what an LFM2 model needs.

    Messages name the file, tensor, config field or token id at fault and what was expected.
    """


#: an integer with more bits than this is shown by its number of digits (Python refuses to write one of more
#: than 4300 digits as text, and a message has no use for hundreds)
_MAX_INT_BITS = 256


def _digits(n: int) -> str:
    return f"<an integer of {int(abs(n).bit_length() * 0.30103) + 1} digits>"


class _Shown(reprlib.Repr):
    """reprlib's bounded repr (nesting, items, string lengths), with huge integers told by their size."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxlist, self.maxtuple, self.maxdict, self.maxset = 3, 6, 6, 4, 6
        self.maxstring, self.maxother, self.maxlong = 60, 60, 60

    def repr_int(self, x: int, level: int) -> str:
        return _digits(x) if x.bit_length() > _MAX_INT_BITS else super().repr_int(x, level)


_SHOWN = _Shown()


def shown(value: Any, width: int = 80) -> str:
    """``repr(value)`` for an error message: at most about ``width`` characters, and never an exception of its own,
    whatever the value (nested thousands deep, an integer of thousands of digits, a string of megabytes, an object
    whose ``repr`` fails)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > _MAX_INT_BITS:
        return _digits(value)
    try:
        text = _SHOWN.repr(value)
    except Exception:  # a __repr__ that raises (RecursionError included)
        text = f"<{type(value).__name__}>"
    return text if len(text) <= width else text[:width - 3] + "..."
