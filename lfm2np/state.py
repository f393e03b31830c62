"""Decoding state: what a sequence carries from one call to the next, as a plain immutable value.

Per layer, by kind:

- a conv layer carries the most recent inputs of its convolution, ``u = b_gate * x``: an array
  ``(n, D)``, oldest row first. The next call reads its last ``L-1`` rows (fewer rows, at the start of
  a sequence, stand for zeros). It keeps up to ``L-1 + max_rollback`` rows so that a rollback of up to
  ``max_rollback`` tokens can restore the exact window.
- an attention layer carries its keys and values after QK-norm and RoPE: two arrays ``(S, G, hd)``,
  one row per position seen.

plus ``position``, the number of tokens seen (the RoPE position of the next token).

Mapping to other implementations (same numbers, different layouts):

- transformers keeps for each conv layer the last ``L`` columns of ``u`` as ``(B, D, L)``; its last
  ``L-1`` columns are our ``conv[i][-(L-1):].T``. Its KV cache is ``(B, G, S, hd)``: ``keys[i]``
  transposed.
- llama.cpp (and vLLM) keep ``L-1`` columns per conv layer (``(L-1) x D`` floats per sequence), the
  same rows as our last ``L-1``; KV as ``hd*G`` per position in the layer's K and V caches.

States are never modified in place: :meth:`Model.step` returns a new one, arrays are read-only, and an
old state stays valid. A snapshot is therefore just a reference kept aside; restoring is using it
again. Sequences never share a state, so nothing can leak from one to another.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import Config
from .errors import Lfm2npError

#: Default number of tokens a state can be rolled back by (speculative decoding drafts are shorter).
DEFAULT_MAX_ROLLBACK = 16


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.flags.writeable:
        a = a.view()
        a.flags.writeable = False
    return a


@dataclass(frozen=True)
class State:
    """The decoding state of one sequence. Build an empty one with :meth:`State.start` (or
    ``model.new_state()``); get the next one from ``model.step(ids, state)``."""

    position: int
    conv: tuple[np.ndarray | None, ...]  # per layer: (n, D) conv inputs, None on attention layers
    keys: tuple[np.ndarray | None, ...]  # per layer: (S, G, hd), None on conv layers
    values: tuple[np.ndarray | None, ...]
    conv_L_cache: int
    max_rollback: int = DEFAULT_MAX_ROLLBACK

    def __post_init__(self) -> None:
        object.__setattr__(self, "conv", tuple(None if a is None else _frozen(a) for a in self.conv))
        object.__setattr__(self, "keys", tuple(None if a is None else _frozen(a) for a in self.keys))
        object.__setattr__(self, "values", tuple(None if a is None else _frozen(a) for a in self.values))
        for k in self.keys:
            if k is not None and k.shape[0] != self.position:
                raise Lfm2npError(f"state: keys hold {k.shape[0]} positions but position is {self.position}")

    @classmethod
    def start(cls, config: Config, dtype=np.float32, max_rollback: int = DEFAULT_MAX_ROLLBACK) -> "State":
        """The state before the first token: empty histories and caches, position 0."""
        if max_rollback < 0:
            raise Lfm2npError(f"max_rollback is {max_rollback}; expected >= 0")
        D, G, hd = config.hidden_size, config.num_key_value_heads, config.head_dim
        conv, keys, values = [], [], []
        for i in range(config.num_hidden_layers):
            if config.is_attention(i):
                conv.append(None)
                keys.append(np.zeros((0, G, hd), dtype))
                values.append(np.zeros((0, G, hd), dtype))
            else:
                conv.append(np.zeros((0, D), dtype))
                keys.append(None)
                values.append(None)
        return cls(0, tuple(conv), tuple(keys), tuple(values), config.conv_L_cache, max_rollback)

    # ------------------------------------------------------------------ views
    def conv_window(self, layer: int) -> np.ndarray:
        """The ``(L-1, D)`` window the next token's convolution reads (zeros before the sequence start):
        exactly what llama.cpp keeps for this layer."""
        u = self.conv[layer]
        if u is None:
            raise Lfm2npError(f"state: layer {layer} is an attention layer and has no conv window")
        L1 = self.conv_L_cache - 1
        tail = u[u.shape[0] - min(L1, u.shape[0]):]
        return np.concatenate([np.zeros((L1 - tail.shape[0], u.shape[1]), u.dtype), tail])

    @property
    def rollback_limit(self) -> int:
        """How many tokens this state can be rolled back by."""
        limit = self.position
        L1 = self.conv_L_cache - 1
        for u in self.conv:
            # after dropping n of its r rows, a conv history must still hold min(position - n, L-1) rows:
            # always true when it holds everything since the start (r == position), else n <= r - (L-1)
            if u is not None and u.shape[0] < self.position:
                limit = min(limit, max(0, u.shape[0] - L1))
        return limit

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays of this state."""
        return sum(a.nbytes for group in (self.conv, self.keys, self.values) for a in group if a is not None)

    # ---------------------------------------------------------------- updates
    def advance(self, tokens: int, conv: list, keys: list, values: list) -> "State":
        """The state after ``tokens`` more tokens, given each layer's extended history / caches.
        Conv histories are trimmed to ``L-1 + max_rollback`` rows."""
        keep = self.conv_L_cache - 1 + self.max_rollback
        trimmed = [None if u is None else u[max(0, u.shape[0] - keep):] for u in conv]
        return State(self.position + tokens, tuple(trimmed), tuple(keys), tuple(values),
                     self.conv_L_cache, self.max_rollback)

    def rollback(self, n: int) -> "State":
        """The state as it was ``n`` tokens ago: as if those tokens had never been fed."""
        if not 0 <= n <= self.position:
            raise Lfm2npError(f"cannot roll back {n} tokens from position {self.position}")
        if n > self.rollback_limit and n != self.position:  # back to the start is always possible
            raise Lfm2npError(
                f"cannot roll back {n} tokens: this state keeps conv history for {self.rollback_limit} "
                f"(create it with max_rollback >= {n})"
            )
        if n == 0:
            return self
        S = self.position - n
        return State(
            S,
            tuple(None if u is None else u[: max(0, u.shape[0] - n)] for u in self.conv),
            tuple(None if k is None else k[:S] for k in self.keys),
            tuple(None if v is None else v[:S] for v in self.values),
            self.conv_L_cache, self.max_rollback,
        )
