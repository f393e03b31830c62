"""The Model: a config, its weights and a numerics mode, and the forward pass over :mod:`lfm2np.layers`.

The whole forward pass is :meth:`Model.run`: embed, every layer (:func:`lfm2np.layers.lfm2_layer`, or
:func:`~lfm2np.layers.lfm3_layer` for LFM3, each attention layer with the RoPE tables of its type), the
final norm ``embedding_norm`` (applied after the last layer despite its name), the head (tied to the
embedding unless the checkpoint has ``lm_head.weight``). :meth:`Model.forward` computes from scratch;
:meth:`Model.step` continues a :class:`~lfm2np.state.State`.

Tracing and interventions: ``forward(ids, record=fn)`` and ``step(..., record=fn)`` call
``fn(name, value)`` with every named intermediate, in forward order. Names are the Hugging Face module
path plus the step::

    model.embed_tokens
    model.layers.{i}.operator_norm
    model.layers.{i}.conv.{in_proj, b_gate, c_gate, x, bx, conv_out, y, out_proj}
    model.layers.{i}.self_attn.{q_proj, k_proj, v_proj, q_normed, k_normed, q_rope, k_rope, attn_out, out_proj}
                                                     (LFM3: gate, the sigmoid output gate, before attn_out)
    model.layers.{i}.post_operator_norm              (LFM3's sandwich norm of the mixer output)
    model.layers.{i}.mixer_residual                  (h + mixer output)
    model.layers.{i}.ffn_norm
    model.layers.{i}.feed_forward.{w1, w3, act, w2}  (dense SwiGLU)
    model.layers.{i}.feed_forward.{router_logits, selected_experts, routing_weights}  (MoE)
    model.layers.{i}.feed_forward.output
    model.layers.{i}.post_ffn_norm                   (LFM3's sandwich norm of the FFN output)
    model.layers.{i}                                 (the residual stream after the layer)
    model.embedding_norm
    lm_head                                          (the logits)

When ``fn`` returns None the value is only observed; when it returns an array of the same shape, that
array replaces the value from there on (patching, as TransformerLens does). Values are ``(T, ...)`` for
the T tokens of the call; a value must not be modified in place.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import numpy as np

from . import ops, tensors
from .config import Config
from .errors import Lfm2npError
from .config import CONV
from .layers import LAYERS, AttentionWeights, ConvWeights, LayerWeights, MoEWeights, SwiGLUWeights
from .numerics import Numerics, numerics
from .ops import Tap, prefixed, untapped
from .state import DEFAULT_MAX_ROLLBACK, State

#: ``record(name, value) -> None | array``: observes each named intermediate, or returns a replacement.
Recorder = Callable[[str, np.ndarray], "np.ndarray | None"]
#: ``progress(done, total)``: called after each layer of a forward pass (done = layers finished so far,
#: over every chunk of a long prompt) so a caller can show progress; never called in between.
Progress = Callable[[int, int], None]


def check_progress(progress: Any) -> None:
    """A progress callback must be a function ``progress(done, total)`` (or None): an error otherwise, before
    any work rather than a TypeError in the middle of it."""
    if progress is not None and not callable(progress):
        raise Lfm2npError(f"progress must be a function progress(done, total); got {type(progress).__name__}")


def tap_for(record: Recorder | None) -> Tap:
    """The operators' tap for a user's recorder: None keeps the value, an array replaces it (same shape)."""
    if record is None:
        return untapped
    if not callable(record):
        raise Lfm2npError(f"record must be a function record(name, value); got {type(record).__name__}")

    def tap(name: str, value: np.ndarray) -> np.ndarray:
        out = record(name, value)
        if out is None:
            return value
        tap.replaced = True  # type: ignore[attr-defined]  # an intervention: the run is no longer the model's
        out = np.asarray(out)
        if out.shape != value.shape:
            raise Lfm2npError(f"the replacement for {name} has shape {list(out.shape)}; "
                              f"expected {list(value.shape)}")
        return out.astype(value.dtype, copy=False)

    tap.replaced = False  # type: ignore[attr-defined]
    return tap


class Model:
    """An LFM2 / LFM2-MoE model: its config, its weights and its numerics mode.

    ``params`` maps Hugging Face tensor names to arrays: a plain dict (converted for the mode here), or a
    lazily loading mapping from :func:`lfm2np.load` that already gives arrays for the mode (its ``mode``
    attribute says which, and it may offer ``rows(name, index)`` to read embedding rows alone).
    ``dtype`` is the mode: "float32", "float64" (the oracle) or "bfloat16" (the emulation), or a
    :class:`~lfm2np.numerics.Numerics`.
    """

    #: forward() runs prompts longer than this in chunks of this many tokens (0: never), unless recording
    prefill_chunk = 2048

    def __init__(self, config: Config, params: Mapping[str, np.ndarray], dtype: Any = "float32"):
        self.config = config
        self.numerics: Numerics = numerics(dtype)
        self.dtype = self.numerics.dtype
        prepared = getattr(params, "mode", None)
        if prepared is None:
            params = {name: self.numerics.weight(name, w) for name, w in params.items()}
        elif prepared != self.numerics.name:
            raise Lfm2npError(f"these weights were loaded for {prepared}, not {self.numerics.name}: "
                              f"load the model with dtype={self.numerics.name!r}")
        self.params = params
        self._names = [tensors.layer_names(config, i) for i in range(config.num_hidden_layers)]

    def __repr__(self) -> str:
        c = self.config
        name = c.source or c.model_type
        if name.endswith("config.json"):  # a checkpoint: its directory's name
            name = os.path.basename(os.path.dirname(os.path.abspath(name)))
        mode = "bfloat16 (emulated)" if self.numerics.round_weights else self.numerics.name
        return (f"Model({name}: {c.num_hidden_layers} layers "
                f"({len(c.conv_layers)} conv, {len(c.attention_layers)} attention), D={c.hidden_size}, "
                f"V={c.vocab_size}{f', {c.num_experts} experts top-{c.num_experts_per_tok}' if c.is_moe else ''}, "
                f"dtype={mode})")

    # ------------------------------------------------------------------ public
    def memory_report(self) -> dict[str, Any]:
        """What of the weights is resident (see :meth:`lfm2np.io.params.LazyParams.report`); for weights
        given as a plain dict, everything."""
        report = getattr(self.params, "report", None)
        if report is not None:
            return report()
        held = sum(np.asarray(a).nbytes for a in self.params.values())
        return {"budget_bytes": None, "resident_bytes": held, "all_tensors_bytes": held}

    def forward(self, ids: Any, *, record: Recorder | None = None, progress: Progress | None = None) -> np.ndarray:
        """Logits for every position of one sequence or an equal-length batch, computed from scratch.

        ids ``(T,)`` -> logits ``(T, V)``; ids ``(B, T)`` -> ``(B, T, V)``. Causal: position t depends on
        tokens 0..t only. ``record`` sees (or replaces) every intermediate of a single sequence (see the
        module docstring). Prompts longer than :attr:`prefill_chunk` run in chunks (as :meth:`step` would),
        which bounds the temporaries; recording runs one pass. Raises :class:`Lfm2npError` for an id
        outside ``0 .. vocab_size - 1``.
        """
        ids = self.check_ids(ids)
        check_progress(progress)
        if ids.ndim == 2:
            if record is not None:
                raise Lfm2npError(f"record traces one sequence, shape (T,); got ids of shape {ids.shape}")
            return np.stack([self.forward(row) for row in ids])
        chunk = self.prefill_chunk
        if record is not None or not chunk or ids.shape[0] <= chunk:
            return self.run(ids, record=record, progress=progress)[0]
        # a long prompt in chunks, each continuing the state of the last: the temporaries of a layer are
        # bounded by the chunk (the FFN's T x F, the conv's T x 3D), the result is the same rows
        state = State.start(self.config, self.dtype, max_rollback=0, numerics=self.numerics.name)
        # each chunk's logits are written in place (copying, or concatenating, gigabytes is slow)
        logits = np.empty((ids.shape[0], self.config.vocab_size), self.dtype)
        starts = range(0, ids.shape[0], chunk)
        L = self.config.num_hidden_layers
        for n, t0 in enumerate(starts):
            each = None if progress is None else (lambda done, _, n=n: progress(n * L + done, len(starts) * L))
            part = ids[t0:t0 + chunk]
            _, layers = self.run(part, state.layer_pasts(), state.position, None, each, logits[t0:t0 + len(part)])
            state = state.advance(len(part), layers)
        return logits

    def new_state(self, max_rollback: int = DEFAULT_MAX_ROLLBACK) -> State:
        """The decoding state of an empty sequence (see :mod:`lfm2np.state`)."""
        return State.start(self.config, self.dtype, max_rollback, self.numerics.name)

    def step(self, ids: Any, state: State | None = None, *, record: Recorder | None = None,
             progress: Progress | None = None) -> tuple[np.ndarray, State]:
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
        if not isinstance(state, State):
            raise Lfm2npError(f"state must be an lfm2np State (or None); got {type(state).__name__}")
        state.check_for(self.config, self.dtype, self.numerics.name)
        logits, layers = self.run(ids, state.layer_pasts(), state.position, record, progress)
        return logits, state.advance(ids.shape[0], layers)

    def step_batch(self, ids: "list[Any]", states: "list[State | None]") -> tuple[list[np.ndarray], list[State]]:
        """:meth:`step` for several sequences at once, each with its own ids (lengths may differ) and state.
        Sequences never share anything: the result equals running each one alone."""
        if not isinstance(ids, (list, tuple)) or not isinstance(states, (list, tuple)):
            raise Lfm2npError("step_batch takes a list of id sequences and a list of states (None for new ones)")
        if len(ids) != len(states):
            raise Lfm2npError(f"step_batch got {len(ids)} id sequences but {len(states)} states")
        results = [self.step(i, s) for i, s in zip(ids, states)]
        return [r[0] for r in results], [r[1] for r in results]

    def check_ids(self, ids: Any) -> np.ndarray:
        """``ids`` as an int64 array of shape (T,) or (B, T), every id inside the vocabulary."""
        try:
            arr = np.asarray(ids)
        except (ValueError, TypeError) as e:  # ragged lists and the like
            raise Lfm2npError(f"token ids must be a rectangular array of integers ({e})") from None
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

    # ------------------------------------------------------------- the forward pass
    def run(self, ids: np.ndarray, past: list | None = None, start: int = 0, record: Recorder | None = None,
            progress: Progress | None = None, out: np.ndarray | None = None) -> tuple[np.ndarray, list]:
        """The forward pass of ``ids`` (T,) (already checked) at positions ``start ..``, continuing from
        ``past`` (per layer: what the previous call returned, None for a fresh sequence). Returns the
        logits (T, V) (written into ``out`` when given) and, per layer, its state after these tokens."""
        c, rnd, tap = self.config, self.numerics.round, tap_for(record)
        check_progress(progress)
        T = ids.shape[0]
        if start + T > c.max_position_embeddings:
            raise Lfm2npError(f"positions {start}..{start + T - 1} go past max_position_embeddings "
                              f"{c.max_position_embeddings} of this model")
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # non-finite logits are checked below
            positions = np.arange(start, start + T)
            rope = {kind: self.rope(positions, kind) for kind in {k for k in c.layer_types if k != CONV}}
            layer = LAYERS[c.model_type]  # lfm2_layer or lfm3_layer
            h = tap("model.embed_tokens", self.embed(ids))  # (T, D)
            layer_states = []
            ahead = getattr(self.params, "prefetch", None)  # read the next layer's tensors while this one runs
            for i, kind in enumerate(c.layer_types):
                if ahead is not None and i + 1 < c.num_hidden_layers:
                    ahead(list(self._names[i + 1].values()))
                layer_past = None if past is None else past[i]
                h, layer_state = layer(h, self.layer_weights(i), c, rope.get(kind), layer_past, rnd,
                                       prefixed(tap, f"model.layers.{i}."), c.window(i))
                h = tap(f"model.layers.{i}", h)
                layer_states.append(layer_state)
                if progress is not None:
                    progress(i + 1, c.num_hidden_layers)
            h = tap("model.embedding_norm", ops.rms_norm(h, self.params["model.embedding_norm.weight"], c.norm_eps,
                                                         rnd))
            logits = tap("lm_head", ops.lm_head(h, self.params[tensors.head_name(c)], rnd, out))  # (T, V)
        # the one check on the way: a sum (one pass, no buffer) is finite unless a value is NaN or infinite, or
        # finite values overflow it, which the exact check then tells apart; the search only on failure
        with np.errstate(over="ignore", invalid="ignore"):
            total = logits.sum()
        if not np.isfinite(total) and not np.isfinite(logits).all():
            if getattr(record, "searching", False):  # the search below, already under way
                raise Lfm2npError("non-finite values")
            raise self._non_finite(ids, past, start, getattr(tap, "replaced", False))
        return logits, layer_states

    def _non_finite(self, ids: np.ndarray, past: list | None, start: int, intervened: bool) -> Lfm2npError:
        """Name where non-finite values first appear: run again, stop at the first non-finite intermediate,
        and name the non-finite weights of its layer (or the input that carried them in)."""
        first: list[str] = []

        def find(name: str, value: np.ndarray) -> None:
            if not first and np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
                first.append(name)

        find.searching = True  # type: ignore[attr-defined]

        if not intervened:
            try:
                with np.errstate(all="ignore"):
                    self.run(ids, past, start, find)
            except Lfm2npError:
                pass
        where = first[0] if first else "the logits"
        prefix = where.rsplit(".", 1)[0] + "." if where.startswith("model.layers.") else None
        layer = int(where.split(".")[2]) if prefix else None
        suspects = [n for n in tensors.layer_names(self.config, layer).values()] if layer is not None \
            else [tensors.HEAD_TIED, "model.embedding_norm.weight", tensors.head_name(self.config)]
        bad = [n for n in dict.fromkeys(suspects) if not np.isfinite(self.params[n]).all()]
        if layer is not None and not bad and self.config.is_moe_layer(layer):
            bad = [n for e in range(self.config.num_experts) for n in tensors.expert_names(layer, e)
                   if not np.isfinite(self.params[n]).all()][:3]
        cause = (f"; weight {', '.join(bad)} holds NaN or infinite values" if bad else
                 "; no weight of that layer is non-finite, so the values overflowed or came from the state "
                 "or an intervention" if not intervened else " (a value returned by record)")
        return Lfm2npError(f"non-finite values: they first appear in {where}{cause}")

    # ------------------------------------------------------------- the pieces
    def embed(self, ids: np.ndarray) -> np.ndarray:
        """The embedding rows of ``ids``: (T,) -> (T, D). From a lazily loaded checkpoint only those rows
        are read and converted."""
        rows = getattr(self.params, "rows", None)
        if rows is not None:
            return rows(tensors.HEAD_TIED, ids)
        return ops.embed(ids, self.params[tensors.HEAD_TIED])

    def rope(self, positions: np.ndarray, kind: str = "full_attention") -> tuple[np.ndarray, np.ndarray]:
        """The RoPE (cos, sin) tables of ``positions`` for attention layers of type ``kind``, as this mode
        computes them: angles in float32 (float64 in the oracle mode), cos and sin rounded in the bf16
        emulation (LFM2; LFM3 keeps them float32); LFM3's partial rotation leaves the frequencies past the
        rotated pairs at 0.
        (T,) -> (T, hd) x 2"""
        c, rnd = self.config, self.numerics.round
        cos, sin = ops.rope_tables(positions, c.head_dim, c.rope(kind).theta, self.dtype, c.rotated_pairs(kind))
        if c.model_type == "lfm3":  # transformers' LFM3 keeps cos and sin in float32, whatever the dtype
            return cos, sin
        return rnd(cos), rnd(sin)

    def layer_weights(self, i: int) -> LayerWeights:
        """Layer ``i``'s weights as the view :mod:`lfm2np.layers` computes with (experts fetched when chosen)."""
        c, W, n = self.config, self.params, self._names[i]
        opt = lambda role: W[n[role]] if role in n else None  # noqa: E731  (biases only with conv_bias)
        if c.is_attention(i):
            biases = (W[n["q_proj_bias"]], W[n["k_proj_bias"]], W[n["v_proj_bias"]], W[n["out_proj_bias"]]) \
                if c.attention_bias else None
            mixer: ConvWeights | AttentionWeights = AttentionWeights(
                W[n["q_proj"]], W[n["k_proj"]], W[n["v_proj"]], W[n["out_proj"]], W[n["q_norm"]], W[n["k_norm"]],
                opt("gate_proj"), biases)
        else:
            mixer = ConvWeights(W[n["in_proj"]], W[n["conv"]], W[n["out_proj"]],
                                opt("in_proj_bias"), opt("conv_bias"), opt("out_proj_bias"))
        if c.is_moe_layer(i):
            def expert(e: int) -> SwiGLUWeights:
                w1, w3, w2 = tensors.expert_names(i, e)
                return SwiGLUWeights(W[w1], W[w3], W[w2])

            prefetch = getattr(W, "prefetch", None)  # a lazily read checkpoint can read the chosen ones ahead
            ahead = None if prefetch is None else (
                lambda chosen: prefetch([n for e in chosen for n in tensors.expert_names(i, int(e))]))
            ffn: SwiGLUWeights | MoEWeights = MoEWeights(W[n["gate"]], opt("expert_bias"), expert, ahead)
        else:
            ffn = SwiGLUWeights(W[n["w1"]], W[n["w3"]], W[n["w2"]])
        return LayerWeights(W[n["operator_norm"]], mixer, W[n["ffn_norm"]], ffn,
                            opt("post_operator_norm"), opt("post_ffn_norm"))
