"""The forward pass, composed from :mod:`lfm2np.ops`, and the Model object :func:`load` returns.

One layer, pre-norm residual::

    h = h + mixer(operator_norm(h))      # gated short conv or GQA attention, by layer_types[i]
    h = h + ffn(ffn_norm(h))             # SwiGLU, or router + experts on MoE layers

then ``embedding_norm`` (applied after the last layer despite its name) and the head (tied to the
embedding unless the checkpoint has ``lm_head.weight``).
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Mapping

import numpy as np

from . import hub, ops
from .ops import Recorder
from .config import Config, load_config
from .errors import Lfm2npError
from .state import DEFAULT_MAX_ROLLBACK, State
from .weights import Checkpoint, expected_tensors

DTYPES = {"float32": np.dtype(np.float32), "float64": np.dtype(np.float64)}



def resolve_dtype(dtype: Any) -> np.dtype:
    """'float32' (default compute dtype) or 'float64' (the oracle mode), as a NumPy dtype."""
    try:
        dt = np.dtype(dtype) if dtype is not None else None
    except TypeError:
        dt = None
    if dt is None or dt.name not in DTYPES:  # (np.dtype(None) would silently be float64)
        raise Lfm2npError(f"dtype {dtype!r} is not supported; expected one of {', '.join(DTYPES)}")
    return DTYPES[dt.name]


class LazyParams(Mapping[str, np.ndarray]):
    """Tensors by Hugging Face name, produced on first use by :meth:`_load` (read, widened, dequantised or
    rounded) and kept when ``keep`` is true. ``keep=False`` produces them again at every use, trading speed
    for memory. The subclasses differ only in :meth:`_load`."""

    def __init__(self, names: "list[str]", keep: bool):
        self._names, self.keep = list(names), keep
        self._known = set(self._names)
        self._kept: dict[str, np.ndarray] = {}

    def _load(self, name: str) -> np.ndarray:
        raise NotImplementedError

    def __getitem__(self, name: str) -> np.ndarray:
        arr = self._kept.get(name)
        if arr is None:
            if name not in self._known:
                raise KeyError(name)
            arr = self._load(name)
            if self.keep:
                self._kept[name] = arr
        return arr

    def rows(self, name: str, index: np.ndarray) -> np.ndarray:
        """``self[name][index]`` without producing the whole tensor when it is not kept (an embedding
        lookup widens the looked-up rows only)."""
        if self.keep or name in self._kept:
            return self[name][index]
        return self._load_rows(name, index)

    def _load_rows(self, name: str, index: np.ndarray) -> np.ndarray:
        return self._load(name)[index]

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


class Params(LazyParams):
    """A checkpoint's tensors in the compute dtype. A tensor already stored in that dtype is a read-only view
    of the memory-mapped file either way; a bf16/f16 one is widened (and kept when ``keep``)."""

    def __init__(self, checkpoint: Checkpoint, names: list[str], dtype: np.dtype, keep: bool):
        super().__init__([n for n in names if n in checkpoint.tensors], keep)
        self.checkpoint, self.dtype = checkpoint, dtype

    def _load(self, name: str) -> np.ndarray:
        return self.checkpoint.read(name, self.dtype)

    def _load_rows(self, name: str, index: np.ndarray) -> np.ndarray:
        return self.checkpoint.read(name, self.dtype, rows=index)


class Model:
    """An LFM2 / LFM2-MoE model: its config and its weights, and the forward pass over them.

    ``params`` maps Hugging Face tensor names to arrays (a :class:`Params` for a checkpoint, or a plain
    dict for weights made in memory). Arrays are expected in ``dtype``.
    """

    def __init__(self, config: Config, params: Mapping[str, np.ndarray], dtype: Any = "float32"):
        self.config = config
        self.params = params
        self.dtype = resolve_dtype(dtype)

    def __repr__(self) -> str:
        c = self.config
        name = c.source or c.model_type
        if name.endswith("config.json"):  # a checkpoint: its directory's name
            name = os.path.basename(os.path.dirname(os.path.abspath(name)))
        return (f"Model({name}: {c.num_hidden_layers} layers "
                f"({len(c.conv_layers)} conv, {len(c.attention_layers)} attention), D={c.hidden_size}, "
                f"V={c.vocab_size}{f', {c.num_experts} experts top-{c.num_experts_per_tok}' if c.is_moe else ''}, "
                f"dtype={self.dtype.name})")

    # ------------------------------------------------------------------ public
    def forward(self, ids: Any) -> np.ndarray:
        """Logits for every position of one sequence or an equal-length batch, computed from scratch.

        ids ``(T,)`` -> logits ``(T, V)``; ids ``(B, T)`` -> ``(B, T, V)``. Causal: position t depends on
        tokens 0..t only. Raises :class:`Lfm2npError` for an id outside ``0 .. vocab_size - 1``.
        """
        ids = self.check_ids(ids)
        if ids.ndim == 2:
            return np.stack([self._run(row)[0] for row in ids])
        return self._run(ids)[0]

    def new_state(self, max_rollback: int = DEFAULT_MAX_ROLLBACK) -> State:
        """The decoding state of an empty sequence (see :mod:`lfm2np.state`)."""
        return State.start(self.config, self.dtype, max_rollback)

    def step(self, ids: Any, state: State | None = None) -> tuple[np.ndarray, State]:
        """Continue one sequence by ``ids`` (T,) from ``state`` (None: a new sequence).

        Returns the logits ``(T, V)`` of the new tokens and the state after them. ``state`` itself is not
        changed, so keeping it is a snapshot, and using it again restores the sequence as it was. Equal,
        to float32 rounding, to the matching rows of :meth:`forward` on the whole sequence.
        """
        ids = self.check_ids(ids)
        if ids.ndim != 1:
            raise Lfm2npError(f"step takes the ids of one sequence, shape (T,); got shape {ids.shape}")
        if state is None:
            state = self.new_state()
        self._check_state(state)
        past = [state.conv[i] if state.conv[i] is not None else (state.keys[i], state.values[i])
                for i in range(self.config.num_hidden_layers)]
        logits, layers = self._run(ids, past, start=state.position)
        conv = [None if self.config.is_attention(i) else layers[i] for i in range(len(layers))]
        keys = [layers[i][0] if self.config.is_attention(i) else None for i in range(len(layers))]
        values = [layers[i][1] if self.config.is_attention(i) else None for i in range(len(layers))]
        return logits, state.advance(ids.shape[0], conv, keys, values)

    def step_batch(self, ids: "list[Any]", states: "list[State | None]") -> tuple[list[np.ndarray], list[State]]:
        """:meth:`step` for several sequences at once, each with its own ids (lengths may differ) and state.
        Sequences never share anything: the result equals running each one alone."""
        if len(ids) != len(states):
            raise Lfm2npError(f"step_batch got {len(ids)} id sequences but {len(states)} states")
        results = [self.step(i, s) for i, s in zip(ids, states)]
        return [r[0] for r in results], [r[1] for r in results]

    def _check_state(self, state: State) -> None:
        c = self.config
        if not isinstance(state, State):
            raise Lfm2npError(f"state must be an lfm2np State; got {type(state).__name__}")
        if len(state.conv) != c.num_hidden_layers:
            raise Lfm2npError(f"state does not belong to this model: it has {len(state.conv)} layers, the config "
                              f"{c.num_hidden_layers}")
        for i in range(c.num_hidden_layers):
            if (state.conv[i] is None) != c.is_attention(i):
                raise Lfm2npError(f"state does not belong to this model: layer {i} is "
                                  f"{'attention' if c.is_attention(i) else 'conv'} in the config, not in the state")
            width = (c.num_key_value_heads, c.head_dim) if c.is_attention(i) else (c.hidden_size,)
            held = state.keys[i].shape[1:] if c.is_attention(i) else state.conv[i].shape[1:]
            if tuple(held) != width:
                raise Lfm2npError(f"state does not belong to this model: layer {i} holds rows of shape "
                                  f"{tuple(held)}, the config needs {width}")
        if state.position > c.max_position_embeddings:
            raise Lfm2npError(f"state position {state.position} exceeds max_position_embeddings "
                              f"{c.max_position_embeddings}")
        arrays = [a for a in state.conv + state.keys if a is not None]
        if arrays and arrays[0].dtype != self.dtype:
            raise Lfm2npError(f"state holds {arrays[0].dtype} arrays but the model computes in {self.dtype}")

    def check_ids(self, ids: Any) -> np.ndarray:
        """``ids`` as an int64 array of shape (T,) or (B, T), every id inside the vocabulary."""
        arr = np.asarray(ids)
        if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
            raise Lfm2npError(f"token ids must be integers; got an array of {arr.dtype}")
        if arr.ndim not in (1, 2) or 0 in arr.shape:
            raise Lfm2npError(f"token ids must have shape (T,) or (B, T) with B, T >= 1; got shape {arr.shape}")
        V = self.config.vocab_size
        bad = np.argwhere((arr < 0) | (arr >= V))
        if bad.size:
            where = tuple(int(i) for i in bad[0])
            raise Lfm2npError(
                f"token id {int(arr[where])} at index {where if arr.ndim == 2 else where[0]} is outside the "
                f"vocabulary of size {V} (valid ids are 0..{V - 1})"
            )
        return arr.astype(np.int64, copy=False)

    # ---------------------------------------------------------------- internal
    def _run(self, ids: np.ndarray, past: list | None = None, start: int = 0,
             record: Recorder | None = None) -> tuple[np.ndarray, list]:
        """Logits for ``ids`` (T,) at positions ``start ..``, continuing from ``past`` (per layer: the history
        of conv inputs, or the K and V arrays), and per layer the extended history or K and V.
        ``past=None`` starts a fresh sequence."""
        c = self.config
        positions = np.arange(start, start + ids.shape[0])
        cos, sin = ops.rope_tables(positions, c.head_dim, c.rope_theta, self.dtype)
        h = self._embed(ids)  # (T, D)
        if record:
            record("model.embed_tokens", h)
        new_state = []
        for i in range(c.num_hidden_layers):
            h, layer_state = self._layer(i, h, cos, sin, None if past is None else past[i], record)
            new_state.append(layer_state)
        return self._head(h, record), new_state

    def _head(self, h: np.ndarray, record: Recorder | None) -> np.ndarray:
        """The final norm (``embedding_norm``) and the LM head: (T, D) -> logits (T, V)."""
        c, W = self.config, self.params
        h = ops.rms_norm(h, W["model.embedding_norm.weight"], c.norm_eps)
        if record:
            record("model.embedding_norm", h)
        logits = ops.lm_head(h, W["model.embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight"])
        if record:
            record("lm_head", logits)
        return logits

    def _embed(self, ids: np.ndarray) -> np.ndarray:
        """``ops.embed`` on the embedding table; from a lazily loaded checkpoint only the rows of ``ids`` are
        read and converted."""
        name = "model.embed_tokens.weight"
        if isinstance(self.params, LazyParams):
            return self.params.rows(name, ids).astype(self.dtype, copy=False)
        return ops.embed(ids, self.params[name]).astype(self.dtype, copy=False)

    def _layer(self, i: int, h: np.ndarray, cos: np.ndarray, sin: np.ndarray, past: Any,
               record: Recorder | None) -> tuple[np.ndarray, Any]:
        c, W = self.config, self.params
        p = f"model.layers.{i}."
        sub = (lambda prefix: (lambda name, value: record(prefix + name, value))) if record else (lambda prefix: None)
        x = ops.rms_norm(h, W[p + "operator_norm.weight"], c.norm_eps)
        if record:
            record(p + "operator_norm", x)
        if c.is_attention(i):
            a = p + "self_attn."
            y, k, v = ops.attention_block(
                x, W[a + "q_proj.weight"], W[a + "k_proj.weight"], W[a + "v_proj.weight"], W[a + "out_proj.weight"],
                W[a + "q_layernorm.weight"], W[a + "k_layernorm.weight"], cos, sin, c.norm_eps,
                *(past if past is not None else (None, None)), record=sub(a),
            )
            state: Any = (k, v)
        else:
            b = p + "conv."
            bias = (lambda n: W[b + n + ".bias"]) if c.conv_bias else (lambda n: None)
            y, state = ops.short_conv(
                x, W[b + "in_proj.weight"], W[b + "conv.weight"], W[b + "out_proj.weight"],
                bias("in_proj"), bias("conv"), bias("out_proj"), window=past, record=sub(b),
            )
        h = h + y
        if record:
            record(p + "mixer_residual", h)
        x = ops.rms_norm(h, W[p + "ffn_norm.weight"], c.norm_eps)
        if record:
            record(p + "ffn_norm", x)
        f = p + "feed_forward."
        if c.is_moe_layer(i):
            logits, experts, weights = ops.route(
                x, W[f + "gate.weight"], W[f + "expert_bias"] if c.use_expert_bias else None,
                c.num_experts_per_tok, c.norm_topk_prob, c.routed_scaling_factor,
            )
            if record:
                record(f + "router_logits", logits)
                record(f + "selected_experts", experts)
                record(f + "routing_weights", weights)
            y = ops.moe(x, experts, weights, lambda e: (
                W[f"{f}experts.{e}.w1.weight"], W[f"{f}experts.{e}.w3.weight"], W[f"{f}experts.{e}.w2.weight"]))
        else:
            y = ops.swiglu(x, W[f + "w1.weight"], W[f + "w3.weight"], W[f + "w2.weight"], record=sub(f))
        if record:
            record(f + "output", y)
        h = h + y
        if record:
            record(f"model.layers.{i}", h)
        return h, state


def load(path: "str | os.PathLike[str]", dtype: Any = "float32", *, strict: bool = True,
         keep_weights: bool | None = None) -> Model:
    """Load a checkpoint directory (``config.json`` + ``model.safetensors`` or a sharded set), a repo id
    such as ``LiquidAI/LFM2-350M`` already in the local Hugging Face cache (nothing is downloaded), or a
    ``.gguf`` file (architectures ``lfm2``/``lfm2moe``; needs the ``gguf`` package).

    ``dtype``: "float32" (default), "float64" (the oracle mode) or "bfloat16" (float32 arrays rounded where
    a bfloat16 backend rounds: :mod:`lfm2np.bf16`). Every tensor the config implies must be
    present with its shape. A tensor the model does not use raises :class:`Lfm2npError` (``strict=True``)
    or a warning naming it (``strict=False``). ``keep_weights``: keep each tensor once converted to the
    compute dtype (True), or convert at every use to save memory (False); by default tensors are kept when
    the converted model takes at most half of the machine's memory.
    """
    if dtype in ("bfloat16", "bf16"):  # the bf16 emulation: float32 arrays rounded where bf16 backends round
        from .bf16 import emulate_bf16

        return emulate_bf16(load(path, "float32", strict=strict, keep_weights=keep_weights))
    if str(path).lower().endswith(".gguf"):  # llama.cpp's format: dequantised through the gguf package
        from .gguf import load_gguf

        return load_gguf(path, dtype, strict=strict, keep_weights=keep_weights)
    directory = hub.resolve(path)
    dt = resolve_dtype(dtype)
    config = load_config(directory)
    checkpoint = Checkpoint(directory)
    expected = expected_tensors(config)
    unexpected = checkpoint.check(expected)
    if unexpected:
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        message = (f"{directory}: tensor {', '.join(unexpected[:5])}{more} is not used by this config "
                   f"({config.model_type}, conv_bias={config.conv_bias}, "
                   f"tie_word_embeddings={config.tie_word_embeddings})")
        if strict:
            raise Lfm2npError(message + "; pass strict=False to load anyway")
        warnings.warn(message + "; ignored", stacklevel=2)
    if keep_weights is None:
        keep_weights = default_keep_weights(config, dt)
    return Model(config, Params(checkpoint, list(expected), dt, keep_weights), dt)


def default_keep_weights(config: Config, dtype: np.dtype) -> bool:
    """Keep converted tensors when the whole model in the compute dtype takes at most half of the machine's
    memory (the rule :func:`load` and GGUF loading use when ``keep_weights`` is None)."""
    converted = sum(int(np.prod(s)) for s in expected_tensors(config).values()) * np.dtype(dtype).itemsize
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: assume a laptop
        memory = 16 * 1024**3
    return converted <= memory // 2
