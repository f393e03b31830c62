"""Decoding state: what a sequence carries from one call to the next, as a plain immutable value.

A :class:`State` holds ``position`` (the number of tokens seen: the RoPE position of the next token) and one
entry per layer, the state that layer continues from, by kind:

- a conv layer: a :class:`ConvState`, the most recent inputs of its convolution ``u = b_gate * x``, an array
  ``(n, D)``, oldest row first. The next call reads its last ``L-1`` rows (fewer rows, at the start of a
  sequence, stand for zeros). It keeps up to ``L-1 + max_rollback`` rows so that a rollback of up to
  ``max_rollback`` tokens can restore the exact window.
- an attention layer: a :class:`KVState`, its keys and values after QK-norm and RoPE, two arrays
  ``(S, G, hd)``, one row per position seen, oldest first.
- a sliding-window attention layer (LFM3): a :class:`KVState` with its ``window``, holding only its most
  recent positions: the next token sees its window of W positions, itself and the W-1 before it, so
  ``W-1 + max_rollback`` rows are kept (fewer at the start). Its memory is bounded however long the sequence
  grows.

Mapping to other implementations (same numbers, different layouts):

- transformers keeps for each conv layer the last ``L`` columns of ``u`` as ``(B, D, L)``; its last
  ``L-1`` columns are our ``layers[i].history[-(L-1):].T``. Its KV cache is ``(B, G, S, hd)``: ``keys``
  transposed; for a sliding layer (``DynamicSlidingWindowLayer``) the last W-1 positions: our last W-1 rows.
- llama.cpp (and vLLM) keep ``L-1`` columns per conv layer (``(L-1) x D`` floats per sequence), the
  same rows as our last ``L-1``; KV as ``hd*G`` per position in the layer's K and V caches; for LFM3's
  sliding layers a separate SWA cache of ``pad256(W + n_ubatch)`` cells, masked to the window.

States are never modified in place: :meth:`Model.step` returns a new one, arrays are read-only, and an
old state stays valid. A snapshot is therefore just a reference kept aside; restoring is using it
again. Sequences never share a state, so nothing can leak from one to another. A State built by a caller
is checked to hold together when it is built; the ones the model makes from its own results are not checked
again at every step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

import numpy as np

from .config import LIMITS, Config
from .errors import Lfm2npError, shown

#: Default number of tokens a state can be rolled back by (speculative decoding drafts are shorter).
DEFAULT_MAX_ROLLBACK = 16


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.flags.writeable:
        a = a.view()
        a.flags.writeable = False
    return a


def _owned(a: np.ndarray) -> np.ndarray:
    """A caller's array as a state keeps it: copied when the caller could still write into it (a state is a value:
    nothing done to the caller's array afterwards may change it), then read-only."""
    return _frozen(a.copy() if a.flags.writeable else a)


def _tail(a: np.ndarray, n: int) -> np.ndarray:
    """The last ``n`` rows of ``a`` (all of them when it has fewer)."""
    return a[a.shape[0] - min(n, a.shape[0]):]


@dataclass(frozen=True)
class ConvState:
    """A conv layer's state: ``history (n, D)``, the latest inputs ``b*x`` of its convolution, oldest first."""

    history: np.ndarray

    @property
    def rows(self) -> int:
        return self.history.shape[0]


@dataclass(frozen=True)
class KVState:
    """An attention layer's state: ``keys`` and ``values (S, G, hd)`` after QK-norm and RoPE, oldest first,
    and the layer's sliding ``window`` (None: it keeps every position)."""

    keys: np.ndarray
    values: np.ndarray
    window: int | None = None

    @property
    def rows(self) -> int:
        return self.keys.shape[0]


LayerState = Union[ConvState, KVState]


def _is_count(value: Any, least: int = 0, most: int = 2**63 - 1) -> bool:
    return not isinstance(value, (bool, np.bool_)) and isinstance(value, (int, np.integer)) and least <= value <= most


class State:
    """The decoding state of one sequence. Build an empty one with :meth:`State.start` (or
    ``model.new_state()``); get the next one from ``model.step(ids, state)``. ``State(position, layers,
    conv_L_cache, max_rollback=16, numerics="")`` builds one by hand, checked to hold together."""

    __slots__ = ("position", "layers", "conv_L_cache", "max_rollback", "numerics")
    position: int
    layers: tuple[LayerState, ...]
    conv_L_cache: int
    max_rollback: int
    numerics: str  # the numerics mode that made it ("float32", "bfloat16", ...; "" for any)

    def __init__(self, position: int, layers: "tuple[LayerState, ...] | list[LayerState]", conv_L_cache: int,
                 max_rollback: int = DEFAULT_MAX_ROLLBACK, numerics: str = ""):
        for name, value, least, most in (("position", position, 0, 2**63 - 1),
                                         ("conv_L_cache", conv_L_cache, 1, LIMITS["conv_L_cache"]),
                                         ("max_rollback", max_rollback, 0, 2**63 - 1)):
            if not _is_count(value, least, most):
                raise Lfm2npError(f"state: {name} is {shown(value)}; expected an integer in {least}..{most}")
        if not isinstance(numerics, str):
            raise Lfm2npError(f"state: numerics is {shown(numerics)}; expected the name of a numerics mode (a str)")
        if not isinstance(layers, (tuple, list)):
            raise Lfm2npError(f"state: layers is a {type(layers).__name__}; expected a tuple with one ConvState "
                              f"or KVState per layer")
        checked = tuple(_checked_layer(i, s, int(position), int(conv_L_cache)) for i, s in enumerate(layers))
        self._set(int(position), checked, int(conv_L_cache), int(max_rollback), numerics)

    @classmethod
    def _made(cls, position: int, layers: tuple[LayerState, ...], conv_L_cache: int, max_rollback: int,
              numerics: str) -> "State":
        """A state from the model's own results (already consistent: not checked again)."""
        state = object.__new__(cls)
        state._set(position, layers, conv_L_cache, max_rollback, numerics)
        return state

    def _set(self, position: int, layers: tuple[LayerState, ...], conv_L_cache: int, max_rollback: int,
             numerics: str) -> None:
        for name, value in (("position", position), ("layers", layers), ("conv_L_cache", conv_L_cache),
                            ("max_rollback", max_rollback), ("numerics", numerics)):
            object.__setattr__(self, name, value)

    def replace(self, **changes: Any) -> "State":
        """A copy with some fields changed (``position``, ``layers``, ``conv_L_cache``, ``max_rollback``,
        ``numerics``), checked as a hand-built state is."""
        fields = {name: getattr(self, name) for name in self.__slots__}
        unknown = sorted(set(changes) - set(fields))
        if unknown:
            raise Lfm2npError(f"state has no field {shown(unknown[0])}; its fields are {', '.join(fields)}")
        return State(**{**fields, **changes})

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"State is immutable: {name} cannot be set (step, rollback or start make new ones)")

    def __repr__(self) -> str:
        kinds = "".join("C" if isinstance(s, ConvState) else "A" for s in self.layers)
        return f"State(position={self.position}, layers={kinds}, max_rollback={self.max_rollback})"

    @classmethod
    def start(cls, config: Config, dtype=np.float32, max_rollback: int = DEFAULT_MAX_ROLLBACK,
              numerics: str = "") -> "State":
        """The state before the first token: empty histories and caches, position 0; ``numerics`` names the
        mode of the model that will fill it (a bf16-emulated state holds float32 arrays too)."""
        if not isinstance(config, Config):
            raise Lfm2npError(f"config must be an lfm2np Config (lfm2np.load_config); got {type(config).__name__}")
        try:
            kind = np.dtype(dtype).kind
        except Exception:  # TypeError, or whatever a strange object raises
            kind = None
        if kind != "f":
            raise Lfm2npError(f"dtype is {shown(dtype)}; expected a floating-point dtype (the model's: float32 or "
                              f"float64)")
        if not _is_count(max_rollback):
            raise Lfm2npError(f"max_rollback is {shown(max_rollback)}; expected an integer >= 0")
        D, G, hd = config.hidden_size, config.num_key_value_heads, config.head_dim
        layers: list[LayerState] = []
        for i in range(config.num_hidden_layers):
            if config.is_attention(i):
                empty = _frozen(np.zeros((0, G, hd), dtype))
                layers.append(KVState(empty, empty, config.window(i)))
            else:
                layers.append(ConvState(_frozen(np.zeros((0, D), dtype))))
        return cls._made(0, tuple(layers), config.conv_L_cache, int(max_rollback), numerics)

    # ------------------------------------------------------------------ views
    @property
    def conv(self) -> tuple[np.ndarray | None, ...]:
        """Per layer: the conv history ``(n, D)``, None on attention layers."""
        return tuple(s.history if isinstance(s, ConvState) else None for s in self.layers)

    @property
    def keys(self) -> tuple[np.ndarray | None, ...]:
        """Per layer: the keys ``(S, G, hd)``, None on conv layers."""
        return tuple(s.keys if isinstance(s, KVState) else None for s in self.layers)

    @property
    def values(self) -> tuple[np.ndarray | None, ...]:
        """Per layer: the values ``(S, G, hd)``, None on conv layers."""
        return tuple(s.values if isinstance(s, KVState) else None for s in self.layers)

    @property
    def windows(self) -> tuple[int | None, ...]:
        """Per layer: the sliding window, None elsewhere."""
        return tuple(s.window if isinstance(s, KVState) else None for s in self.layers)

    def conv_window(self, layer: int) -> np.ndarray:
        """The ``(L-1, D)`` window the next token's convolution reads (zeros before the sequence start):
        exactly what llama.cpp keeps for this layer."""
        if not _is_count(layer) or not layer < len(self.layers):
            raise Lfm2npError(f"state: layer {shown(layer)} does not exist; the state has {len(self.layers)} layers")
        s = self.layers[layer]
        if not isinstance(s, ConvState):
            raise Lfm2npError(f"state: layer {layer} is an attention layer and has no conv window")
        L1 = self.conv_L_cache - 1
        tail = _tail(s.history, L1)
        return np.concatenate([np.zeros((L1 - tail.shape[0], tail.shape[1]), tail.dtype), tail])

    @property
    def rollback_limit(self) -> int:
        """How many tokens this state can be rolled back by."""
        limit = self.position
        for s in self.layers:
            # after dropping n of its r rows, a conv history must still hold min(position - n, L-1) rows
            # (a sliding layer's keys min(position - n, W-1)): always true when it holds everything since
            # the start (r == position), else n <= r - (L-1)
            need = self.conv_L_cache - 1 if isinstance(s, ConvState) else None if s.window is None else s.window - 1
            if need is not None and s.rows < self.position:
                limit = min(limit, max(0, s.rows - need))
        return limit

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays of this state."""
        return sum(s.history.nbytes if isinstance(s, ConvState) else s.keys.nbytes + s.values.nbytes
                   for s in self.layers)

    # ---------------------------------------------------------------- the model's view
    def check_for(self, config: Config, dtype: np.dtype, numerics: str = "") -> None:
        """Raise :class:`Lfm2npError` unless this state can continue a sequence of a model with ``config``
        computing in ``dtype`` (numerics mode ``numerics``): same layer kinds, row shapes, conv kernel, dtype
        and mode, position in range."""
        c = config
        if len(self.layers) != c.num_hidden_layers:
            raise Lfm2npError(f"state does not belong to this model: it has {len(self.layers)} layers, the config "
                              f"{c.num_hidden_layers}")
        if self.windows != tuple(c.window(i) for i in range(c.num_hidden_layers)):
            raise Lfm2npError(f"state does not belong to this model: its sliding windows {self.windows} are not "
                              f"the config's")
        if self.conv_L_cache != c.conv_L_cache:
            raise Lfm2npError(f"state does not belong to this model: it was made for conv_L_cache "
                              f"{self.conv_L_cache}, the config has {c.conv_L_cache}")
        for i, s in enumerate(self.layers):
            if isinstance(s, KVState) != c.is_attention(i):
                raise Lfm2npError(f"state does not belong to this model: layer {i} is "
                                  f"{'attention' if c.is_attention(i) else 'conv'} in the config, not in the state")
            width = (c.num_key_value_heads, c.head_dim) if c.is_attention(i) else (c.hidden_size,)
            held = s.keys.shape[1:] if isinstance(s, KVState) else s.history.shape[1:]
            if tuple(held) != width:
                raise Lfm2npError(f"state does not belong to this model: layer {i} holds rows of shape "
                                  f"{tuple(held)}, the config needs {width}")
        if self.position > c.max_position_embeddings:
            raise Lfm2npError(f"state position {self.position} exceeds max_position_embeddings "
                              f"{c.max_position_embeddings}")
        arrays = [a for s in self.layers for a in ((s.history,) if isinstance(s, ConvState) else (s.keys, s.values))]
        odd = next((a.dtype for a in arrays if a.dtype != dtype), None)
        if odd is not None:
            raise Lfm2npError(f"state holds {odd} arrays but the model computes in {np.dtype(dtype)}")
        if numerics and self.numerics and numerics != self.numerics:
            raise Lfm2npError(f"state does not belong to this model: it was made in {self.numerics} numerics, "
                              f"the model computes in {numerics}")

    # ---------------------------------------------------------------- updates
    def advance(self, tokens: int, layers: "list[np.ndarray | tuple[np.ndarray, np.ndarray]]") -> "State":
        """The state after ``tokens`` more tokens, given what each layer returned (its extended conv history,
        or its K and V). Conv histories are trimmed to ``L-1 + max_rollback`` rows, a sliding layer's keys
        and values to ``W-1 + max_rollback``."""
        keep = self.conv_L_cache - 1 + self.max_rollback
        new: list[LayerState] = []
        for old, out in zip(self.layers, layers):
            if isinstance(old, ConvState):
                new.append(ConvState(_frozen(_tail(out, keep))))
            else:
                k, v = out
                if old.window is not None:
                    k, v = _tail(k, old.window - 1 + self.max_rollback), _tail(v, old.window - 1 + self.max_rollback)
                new.append(KVState(_frozen(k), _frozen(v), old.window))
        return State._made(self.position + tokens, tuple(new), self.conv_L_cache, self.max_rollback, self.numerics)

    def rollback(self, n: int) -> "State":
        """The state as it was ``n`` tokens ago: as if those tokens had never been fed."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
            raise Lfm2npError(f"rollback takes a number of tokens (an integer); got {shown(n)}")
        n = int(n)
        if not 0 <= n <= self.position:
            raise Lfm2npError(f"cannot roll back {shown(n)} tokens from position {self.position}")
        if n > self.rollback_limit and n != self.position:  # back to the start is always possible
            raise Lfm2npError(
                f"cannot roll back {n} tokens: this state keeps conv history for {self.rollback_limit} "
                f"(create it with max_rollback >= {n})"
            )
        if n == 0:
            return self
        drop = lambda a: a[: max(0, a.shape[0] - n)]  # noqa: E731  (the last n rows)
        layers = tuple(ConvState(drop(s.history)) if isinstance(s, ConvState)
                       else KVState(drop(s.keys), drop(s.values), s.window) for s in self.layers)
        return State._made(self.position - n, layers, self.conv_L_cache, self.max_rollback, self.numerics)


def _checked_layer(i: int, s: Any, position: int, conv_L_cache: int) -> LayerState:
    """Layer ``i``'s state as a caller gave it, checked to hold together with ``position`` (its arrays made
    read-only views)."""
    if isinstance(s, ConvState):
        u = s.history
        if not isinstance(u, np.ndarray) or u.ndim != 2:
            raise Lfm2npError(f"state: layer {i}'s conv history must be an array (n, D); got "
                              f"{getattr(u, 'shape', type(u).__name__)}")
        if not min(position, conv_L_cache - 1) <= u.shape[0] <= position:  # the last L-1 inputs (fewer at the start)
            raise Lfm2npError(f"state: layer {i}'s conv history holds {u.shape[0]} rows at position {position}; "
                              f"it needs {min(position, conv_L_cache - 1)}")
        return ConvState(_owned(u))
    if isinstance(s, KVState):
        k, v, w = s.keys, s.values, s.window
        if not (isinstance(k, np.ndarray) and isinstance(v, np.ndarray) and k.ndim == 3 and k.shape == v.shape):
            raise Lfm2npError(f"state: layer {i} must hold keys and values of one shape (S, G, hd)")
        if w is not None and not _is_count(w, 1, LIMITS["sliding_window"]):
            raise Lfm2npError(f"state: layer {i}'s window is {shown(w)}; expected an integer in "
                              f"1..{LIMITS['sliding_window']} or None")
        if k.shape[0] != position if w is None else not min(position, w - 1) <= k.shape[0] <= position:
            raise Lfm2npError(f"state: layer {i}'s keys hold {k.shape[0]} positions but position is {position}")
        return KVState(_owned(k), _owned(v), None if w is None else int(w))
    raise Lfm2npError(f"state: layer {i} is a {type(s).__name__}; expected a ConvState (conv history) or a "
                      f"KVState (keys and values)")
