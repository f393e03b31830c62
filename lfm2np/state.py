"""Decoding state: what a sequence carries from one call to the next, as a plain immutable value.

Per layer, by kind:

- a conv layer carries the most recent inputs of its convolution, ``u = b_gate * x``: an array
  ``(n, D)``, oldest row first. The next call reads its last ``L-1`` rows (fewer rows, at the start of
  a sequence, stand for zeros). It keeps up to ``L-1 + max_rollback`` rows so that a rollback of up to
  ``max_rollback`` tokens can restore the exact window.
- an attention layer carries its keys and values after QK-norm and RoPE: two arrays ``(S, G, hd)``,
  one row per position seen, oldest first.
- a sliding-window attention layer (LFM3) carries the same, but only its most recent positions: the next
  token sees its window of W positions, itself and the W-1 before it, so ``W-1 + max_rollback`` rows are
  kept (fewer at the start). Its memory is bounded however long the sequence grows.

plus ``position``, the number of tokens seen (the RoPE position of the next token), and per layer its
``window`` (None but for sliding layers).

Mapping to other implementations (same numbers, different layouts):

- transformers keeps for each conv layer the last ``L`` columns of ``u`` as ``(B, D, L)``; its last
  ``L-1`` columns are our ``conv[i][-(L-1):].T``. Its KV cache is ``(B, G, S, hd)``: ``keys[i]``
  transposed; for a sliding layer (``DynamicSlidingWindowLayer``) the last W-1 positions: our last W-1 rows.
- llama.cpp (and vLLM) keep ``L-1`` columns per conv layer (``(L-1) x D`` floats per sequence), the
  same rows as our last ``L-1``; KV as ``hd*G`` per position in the layer's K and V caches; for LFM3's
  sliding layers a separate SWA cache of ``pad256(W + n_ubatch)`` cells, masked to the window.

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


def _tail(a: np.ndarray, n: int) -> np.ndarray:
    """The last ``n`` rows of ``a`` (all of them when it has fewer)."""
    return a[a.shape[0] - min(n, a.shape[0]):]


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
    windows: tuple[int | None, ...] = ()  # per layer: the sliding window, None elsewhere (empty: none)
    numerics: str = ""  # the numerics mode that made it ("float32", "bfloat16", ...; "" for any)

    def __post_init__(self) -> None:
        # a State is made by start/advance/rollback, but may be built or replaced by hand: check it holds
        # together, so that a broken one is an error rather than wrong logits
        for name in ("position", "conv_L_cache", "max_rollback"):
            value = getattr(self, name)
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 0 \
                    or (name == "conv_L_cache" and value < 1):
                raise Lfm2npError(f"state: {name} is {value!r}; expected an integer >= {int(name == 'conv_L_cache')}")
        if not (isinstance(self.conv, tuple) and isinstance(self.keys, tuple) and isinstance(self.values, tuple)
                and len(self.conv) == len(self.keys) == len(self.values)):
            raise Lfm2npError("state: conv, keys and values must be tuples with one entry per layer")
        for i, (u, k, v) in enumerate(zip(self.conv, self.keys, self.values)):
            if (u is None) == (k is None) or (k is None) != (v is None) or \
                    (k is not None and (np.ndim(k) != 3 or np.shape(k) != np.shape(v))) or \
                    (u is not None and np.ndim(u) != 2):
                raise Lfm2npError(f"state: layer {i} must hold either a conv history (n, D) or keys and values "
                                  f"of one shape (S, G, hd)")
        object.__setattr__(self, "conv", tuple(None if a is None else _frozen(a) for a in self.conv))
        object.__setattr__(self, "keys", tuple(None if a is None else _frozen(a) for a in self.keys))
        object.__setattr__(self, "values", tuple(None if a is None else _frozen(a) for a in self.values))
        if not self.windows:
            object.__setattr__(self, "windows", tuple(None for _ in self.conv))
        for i, (k, w) in enumerate(zip(self.keys, self.windows)):
            if k is not None and (k.shape[0] != self.position if w is None else
                                  not min(self.position, w - 1) <= k.shape[0] <= self.position):
                raise Lfm2npError(f"state: layer {i}'s keys hold {k.shape[0]} positions but position is "
                                  f"{self.position}")
        for i, u in enumerate(self.conv):  # the conv window needs the last L-1 inputs (fewer at the start)
            if u is not None and not min(self.position, self.conv_L_cache - 1) <= u.shape[0] <= self.position:
                raise Lfm2npError(f"state: layer {i}'s conv history holds {u.shape[0]} rows at position "
                                  f"{self.position}; it needs {min(self.position, self.conv_L_cache - 1)}")

    @classmethod
    def start(cls, config: Config, dtype=np.float32, max_rollback: int = DEFAULT_MAX_ROLLBACK,
              numerics: str = "") -> "State":
        """The state before the first token: empty histories and caches, position 0; ``numerics`` names the
        mode of the model that will fill it (a bf16-emulated state holds float32 arrays too)."""
        if isinstance(max_rollback, bool) or not isinstance(max_rollback, (int, np.integer)) or max_rollback < 0:
            raise Lfm2npError(f"max_rollback is {max_rollback!r}; expected an integer >= 0")
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
        windows = tuple(config.window(i) for i in range(config.num_hidden_layers))
        return cls(0, tuple(conv), tuple(keys), tuple(values), config.conv_L_cache, max_rollback, windows, numerics)

    # ------------------------------------------------------------------ views
    def conv_window(self, layer: int) -> np.ndarray:
        """The ``(L-1, D)`` window the next token's convolution reads (zeros before the sequence start):
        exactly what llama.cpp keeps for this layer."""
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= layer < len(self.conv):
            raise Lfm2npError(f"state: layer {layer!r} does not exist; the state has {len(self.conv)} layers")
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
        for u, k, w in zip(self.conv, self.keys, self.windows):
            # after dropping n of its r rows, a conv history must still hold min(position - n, L-1) rows
            # (a sliding layer's keys min(position - n, W-1)): always true when it holds everything since
            # the start (r == position), else n <= r - (L-1)
            if u is not None and u.shape[0] < self.position:
                limit = min(limit, max(0, u.shape[0] - L1))
            if k is not None and w is not None and k.shape[0] < self.position:
                limit = min(limit, max(0, k.shape[0] - (w - 1)))
        return limit

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays of this state."""
        return sum(a.nbytes for group in (self.conv, self.keys, self.values) for a in group if a is not None)

    # ---------------------------------------------------------------- the model's view
    def check_for(self, config: Config, dtype: np.dtype, numerics: str = "") -> None:
        """Raise :class:`Lfm2npError` unless this state can continue a sequence of a model with ``config``
        computing in ``dtype`` (numerics mode ``numerics``): same layer kinds, row shapes, conv kernel, dtype
        and mode, position in range."""
        c = config
        if len(self.conv) != c.num_hidden_layers:
            raise Lfm2npError(f"state does not belong to this model: it has {len(self.conv)} layers, the config "
                              f"{c.num_hidden_layers}")
        if self.windows != tuple(c.window(i) for i in range(c.num_hidden_layers)):
            raise Lfm2npError(f"state does not belong to this model: its sliding windows {self.windows} are not "
                              f"the config's")
        if self.conv_L_cache != c.conv_L_cache:
            raise Lfm2npError(f"state does not belong to this model: it was made for conv_L_cache "
                              f"{self.conv_L_cache}, the config has {c.conv_L_cache}")
        for i in range(c.num_hidden_layers):
            if (self.conv[i] is None) != c.is_attention(i):
                raise Lfm2npError(f"state does not belong to this model: layer {i} is "
                                  f"{'attention' if c.is_attention(i) else 'conv'} in the config, not in the state")
            width = (c.num_key_value_heads, c.head_dim) if c.is_attention(i) else (c.hidden_size,)
            held = self.keys[i].shape[1:] if c.is_attention(i) else self.conv[i].shape[1:]
            if tuple(held) != width:
                raise Lfm2npError(f"state does not belong to this model: layer {i} holds rows of shape "
                                  f"{tuple(held)}, the config needs {width}")
        if self.position > c.max_position_embeddings:
            raise Lfm2npError(f"state position {self.position} exceeds max_position_embeddings "
                              f"{c.max_position_embeddings}")
        arrays = [a for a in self.conv + self.keys + self.values if a is not None]
        if any(a.dtype != dtype for a in arrays):
            odd = next(a.dtype for a in arrays if a.dtype != dtype)
            raise Lfm2npError(f"state holds {odd} arrays but the model computes in {np.dtype(dtype)}")
        if numerics and self.numerics and numerics != self.numerics:
            raise Lfm2npError(f"state does not belong to this model: it was made in {self.numerics} numerics, "
                              f"the model computes in {numerics}")

    def layer_pasts(self) -> list:
        """Per layer, what the forward pass continues from: the conv history, or the (K, V) pair."""
        return [u if u is not None else (k, v) for u, k, v in zip(self.conv, self.keys, self.values)]

    # ---------------------------------------------------------------- updates
    def advance(self, tokens: int, layers: list) -> "State":
        """The state after ``tokens`` more tokens, given what each layer returned (its extended conv history,
        or its K and V). Conv histories are trimmed to ``L-1 + max_rollback`` rows."""
        keep = self.conv_L_cache - 1 + self.max_rollback
        conv = tuple(None if isinstance(x, tuple) else _tail(x, keep) for x in layers)
        kv = [(None, None) if not isinstance(x, tuple) else x if w is None
              else (_tail(x[0], w - 1 + self.max_rollback), _tail(x[1], w - 1 + self.max_rollback))
              for x, w in zip(layers, self.windows)]
        return State(self.position + tokens, conv, tuple(k for k, _ in kv), tuple(v for _, v in kv),
                     self.conv_L_cache, self.max_rollback, self.windows, self.numerics)

    def rollback(self, n: int) -> "State":
        """The state as it was ``n`` tokens ago: as if those tokens had never been fed."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
            raise Lfm2npError(f"rollback takes a number of tokens (an integer); got {n!r}")
        n = int(n)
        if not 0 <= n <= self.position:
            raise Lfm2npError(f"cannot roll back {n} tokens from position {self.position}")
        if n > self.rollback_limit and n != self.position:  # back to the start is always possible
            raise Lfm2npError(
                f"cannot roll back {n} tokens: this state keeps conv history for {self.rollback_limit} "
                f"(create it with max_rollback >= {n})"
            )
        if n == 0:
            return self
        drop = lambda a: None if a is None else a[: max(0, a.shape[0] - n)]  # noqa: E731  (the last n rows)
        return State(self.position - n, tuple(drop(u) for u in self.conv), tuple(drop(k) for k in self.keys),
                     tuple(drop(v) for v in self.values), self.conv_L_cache, self.max_rollback, self.windows,
                     self.numerics)
