"""The Model: a config, its weights and a numerics mode, and the forward pass over :mod:`lfm2np.layers`.

The whole forward pass is :meth:`Model.run`: embed, every layer (:func:`lfm2np.layers.decoder_layer` over the layer's
weight view, each attention layer with the RoPE tables of its type), the
final norm ``embedding_norm`` (applied after the last layer despite its name), the head (tied to the
embedding unless the checkpoint has ``lm_head.weight``). :meth:`Model.forward` computes from scratch;
:meth:`Model.step` continues a :class:`~lfm2np.state.State`.

Tracing and interventions: ``forward(ids, record=fn)`` and ``step(..., record=fn)`` call ``fn(name, value)``
with every named intermediate, in forward order: exactly the names :func:`lfm2np.trace_names` lists for the
config (the Hugging Face module path plus the step, e.g. ``model.layers.3.self_attn.q_rope``). When ``fn``
returns None the value is only observed; when it returns an array of the same shape, that array replaces the
value from there on (patching, as TransformerLens does). Values are ``(T, ...)`` for the T tokens of the call
(the RoPE frequencies ``(hd/2,)``); a value must not be modified in place. A replacement holds the same kind
of numbers as the value (real floating point, or integers for the chosen experts, which must be experts of the
layer); anything else (complex numbers, objects, strings, booleans, floats for integers or integers for floats)
is an :class:`Lfm2npError` naming the value, never a silent cast.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import numpy as np

from . import embedding, layers, ops, schema, vision
from .config import Config
from .errors import Lfm2npError, shown
from .layers import AttentionWeights, Bidirectional, ConvWeights, LayerWeights, MoEWeights, Scope, SwiGLUWeights, Tap
from .numerics import Numerics, numerics
from .state import DEFAULT_MAX_ROLLBACK, ConvState, State
from .weights import ExpertWeights, InMemory, Weights, check_tensors

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


def tap_for(record: Recorder | None) -> Tap | None:
    """The layers' tap for a user's recorder: None keeps the value, an array replaces it (same shape)."""
    if record is None:
        return None
    if not callable(record):
        raise Lfm2npError(f"record must be a function record(name, value); got {type(record).__name__}")

    def tap(name: str, value: np.ndarray) -> np.ndarray:
        out = record(name, value)
        if out is None:
            return value
        tap.replaced = True  # type: ignore[attr-defined]  # an intervention: the run is no longer the model's
        return _replacement(name, value, out)

    tap.replaced = False  # type: ignore[attr-defined]
    return tap


def _replacement(name: str, value: np.ndarray, out: Any) -> np.ndarray:
    """A recorder's replacement ``out`` for ``value``, in ``value``'s dtype: an array of the same shape and the same
    kind of numbers (real floats for floats, integers for integers), since a cast would drop an imaginary part,
    turn an object into NaN or truncate a float into an expert index. Otherwise an error naming ``name``."""
    try:
        out = np.asarray(out)
    except (TypeError, ValueError) as e:  # ragged nested lists and the like
        raise Lfm2npError(f"the replacement for {name} is not an array ({e})") from None
    if out.shape != value.shape:
        raise Lfm2npError(f"the replacement for {name} has shape {list(out.shape)}; expected {list(value.shape)}")
    floats = value.dtype.kind == "f"
    if out.dtype.kind not in ("f" if floats else "iu"):
        raise Lfm2npError(f"the replacement for {name} holds {out.dtype} values; expected "
                          f"{'real floating-point numbers' if floats else 'integers'}, as the value it replaces "
                          f"({value.dtype})")
    return out.astype(value.dtype, copy=False)


class Model:
    """An LFM2 / LFM2-MoE / LFM3 model: its config, its weights and its numerics mode.

    ``params`` maps Hugging Face tensor names to arrays: a plain mapping (checked against the config's tensor
    layout, every tensor present with its shape, and converted for the mode here; an unused tensor is an
    error unless ``strict=False``), or the :class:`~lfm2np.weights.Weights` :func:`lfm2np.load` gives, already
    for the mode. ``dtype`` is the mode: "float32", "float64" (the oracle) or "bfloat16" (the emulation), or
    a :class:`~lfm2np.numerics.Numerics`.
    """

    #: forward() runs prompts longer than this in chunks of this many tokens (0: never), unless recording
    prefill_chunk = 2048

    def __init__(self, config: Config, params: Mapping[str, Any], dtype: Any = "float32", *, strict: bool = True):
        if not isinstance(config, Config):
            raise Lfm2npError(f"config must be an lfm2np Config (lfm2np.load_config); got {type(config).__name__}")
        if not isinstance(strict, (bool, np.bool_)):
            raise Lfm2npError(f"strict must be True or False; got {shown(strict)}")
        self.config = config
        self.numerics: Numerics = numerics(dtype)
        self.dtype = self.numerics.dtype
        if isinstance(params, Weights):
            if params.mode != self.numerics.name:
                raise Lfm2npError(f"these weights were loaded for {params.mode}, not {self.numerics.name}: "
                                  f"load the model with dtype={shown(self.numerics.name)}")
            if params.config != config:  # weights made for another config (the loader's are for this one)
                want = {t.name: t.shape for t in schema.layout(config)}
                check_tensors({t.name: t.shape for t in params.layout}, want, "weights", True,
                              schema.describe(config))
        else:
            params = _in_memory(config, params, self.numerics, strict)
        self.params: Weights = params
        if self.numerics.ops is not None:  # every product weight's type covered, before the first use
            self.numerics.ops.check(params)
        self._names: list[dict[str, str]] = [{} for _ in range(config.num_hidden_layers)]  # per layer: role -> name
        for t in params.layout:
            if t.layer is not None and t.part != "expert":
                self._names[t.layer][t.role] = t.name
        self._vision_names = {t.role: t.name for t in params.layout if t.part in ("vision_tower", "projector")}
        #: LFM2-VL: turns file paths or arrays into an image batch (lfm2np.load sets it from the processor config)
        self.image_processor: Callable[[Any], Any] | None = None

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
        """What of the weights is resident (:meth:`lfm2np.weights.Weights.report`); for weights given as arrays,
        everything."""
        return self.params.report()

    def forward(self, ids: Any, *, images: Any = None, record: Recorder | None = None,
                progress: Progress | None = None, attention_mask: Any = None) -> np.ndarray:
        """Logits for every position of one sequence or an equal-length batch, computed from scratch.

        ids ``(T,)`` -> logits ``(T, V)``; ids ``(B, T)`` -> ``(B, T, V)``. Causal: position t depends on
        tokens 0..t only (a bidirectional model, ``config.causal`` false: on every token). ``record`` sees (or
        replaces) every intermediate of a single sequence (see the module docstring). Prompts longer than
        :attr:`prefill_chunk` run in chunks (as :meth:`step` would; never a bidirectional model's), which bounds
        the temporaries; recording runs one pass. ``attention_mask`` (bidirectional models; the shape of ids, 1
        for a token, 0 for padding) computes a padded batch's rows as a reference backend does: the padding left
        out of attention's keys and, when the checkpoint says ``conv_zero_padding``, zeroed before the centred
        conv. Raises :class:`Lfm2npError` for an id outside ``0 .. vocab_size - 1``. LFM2-VL: ``images`` (file
        paths, arrays, or an image batch as the processor gives it) replace the ids' image placeholders, which
        ``ids`` must already hold (one sequence).
        """
        ids = self.check_ids(ids)
        check_progress(progress)
        T, context = ids.shape[-1], self.config.max_position_embeddings
        if T > context:  # before the logits (T, V) are allocated: a million ids asked for gigabytes first
            raise Lfm2npError(f"positions 0..{T - 1} go past max_position_embeddings {context} of this model")
        px = self.pixels(images, ids)
        pads = embedding.padding(self.config, ids, attention_mask)
        if ids.ndim == 2:
            if record is not None:
                raise Lfm2npError(f"record traces one sequence, shape (T,); got ids of shape {ids.shape}")
            return np.stack([self.forward(row, attention_mask=None if pads is None else ~p)
                             for row, p in zip(ids, pads if pads is not None else ids)])
        chunk = self.prefill_chunk
        if isinstance(chunk, (bool, np.bool_)) or not isinstance(chunk, (int, np.integer)) or chunk < 0:
            raise Lfm2npError(f"Model.prefill_chunk is {shown(chunk)}; expected an integer >= 0 (0: never in chunks)")
        if not self.config.causal:  # the whole sequence at once: every position reads every other
            view = Bidirectional(pads, self.config.conv_zero_padding)
            return self.run(ids, record=record, progress=progress, view=view)[0]
        if record is not None or not chunk or ids.shape[0] <= chunk:
            return self.run(ids, record=record, progress=progress, images=px)[0]
        features = None if px is None else vision.encode(px, *self.vision_views(), self.config.vision,
                                                         Scope(self.numerics.round))
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
            mine = None if features is None else features[self._placeholders(ids[:t0]):][:self._placeholders(part)]
            _, pasts = self.run(part, state, None, each, logits[t0:t0 + len(part)], features=mine)
            state = state.advance(len(part), pasts)
        return logits

    def new_state(self, max_rollback: int = DEFAULT_MAX_ROLLBACK) -> State:
        """The decoding state of an empty sequence (see :mod:`lfm2np.state`)."""
        return State.start(self.config, self.dtype, max_rollback, self.numerics.name)

    def step(self, ids: Any, state: State | None = None, *, images: Any = None, record: Recorder | None = None,
             progress: Progress | None = None) -> tuple[np.ndarray, State]:
        """Continue one sequence by ``ids`` (T,) from ``state`` (None: a new sequence).

        Returns the logits ``(T, V)`` of the new tokens and the state after them. ``state`` itself is not
        changed, so keeping it is a snapshot, and using it again restores the sequence as it was. Equal,
        to float32 rounding, to the matching rows of :meth:`forward` on the whole sequence. ``images``: as for
        :meth:`forward`, the images whose placeholders are in these ids.
        """
        ids = self.check_ids(ids)
        if ids.ndim != 1:
            raise Lfm2npError(f"step takes the ids of one sequence, shape (T,); got shape {ids.shape}")
        if not self.config.causal:
            raise Lfm2npError("a bidirectional model reads whole sequences (every position sees every other): it "
                              "has no decoding state; use forward or embed")
        if state is None:
            state = self.new_state()
        if not isinstance(state, State):
            raise Lfm2npError(f"state must be an lfm2np State (or None); got {type(state).__name__}")
        state.check_for(self.config, self.dtype, self.numerics.name)
        logits, pasts = self.run(ids, state, record, progress, images=self.pixels(images, ids))
        return logits, state.advance(ids.shape[0], pasts)

    def step_batch(self, ids: "list[Any]", states: "list[State | None]") -> tuple[list[np.ndarray], list[State]]:
        """:meth:`step` for several sequences at once, each with its own ids (lengths may differ) and state.
        Sequences never share anything: the result equals running each one alone."""
        if not isinstance(ids, (list, tuple)) or not isinstance(states, (list, tuple)):
            raise Lfm2npError("step_batch takes a list of id sequences and a list of states (None for new ones)")
        if len(ids) != len(states):
            raise Lfm2npError(f"step_batch got {len(ids)} id sequences but {len(states)} states")
        results = [self.step(i, s) for i, s in zip(ids, states)]
        return [r[0] for r in results], [r[1] for r in results]

    def embed(self, ids: Any, *, attention_mask: Any = None, per_token: bool = False, pooling: str | None = None,
              record: Recorder | None = None) -> "np.ndarray | list[np.ndarray]":
        """Embeddings of one sequence ``(T,)`` -> ``(E,)``, or of several -> ``(B, E)``: the final hidden states
        through the checkpoint's sentence-transformers head (pooling, its dense projection if any, L2
        normalisation; :func:`lfm2np.layers.embedding_head`). ``per_token``: ColBERT's vectors instead, ``(T,
        E)`` per sequence (a list for several). Sequences of different lengths (a list of lists) are padded
        into one batch, each giving exactly what it gives alone (to float32 rounding: docs/ops/pooling.md);
        a ``(B, T)`` array with an ``attention_mask`` is a padded batch as a reference computes it (the
        checkpoint's conv_zero_padding applies). ``pooling``: "cls", "mean" or "last" instead of the
        checkpoint's (which, when it declares none, is "mean"). ``record``: as in :meth:`forward`, one sequence
        (the head's values named ``head.*``: :func:`lfm2np.trace_names` with ``output``)."""
        return embedding.embed(self, ids, attention_mask, per_token, pooling, record)

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
    def run(self, ids: np.ndarray, state: State | None = None, record: Recorder | None = None,
            progress: Progress | None = None, out: np.ndarray | None = None, images: "vision.Pixels | None" = None,
            features: np.ndarray | None = None, view: Bidirectional | None = None,
            head: "Callable[[np.ndarray, Scope], np.ndarray] | None" = None) -> tuple[np.ndarray, list]:
        """The forward pass of ``ids`` (T,) (already checked) continuing ``state`` (None: a new sequence; not
        checked here). Returns the logits (T, V) (written into ``out`` when given) and, per layer, what it
        continues from next: its extended conv history, or its keys and values (:meth:`State.advance`). LFM2-VL:
        the checked ``images`` through the tower and projector (or their ``features`` already computed) take
        the placeholders' rows. A bidirectional model's layers see ``view`` (its padding) and keep nothing.
        ``head(h, scope)``, given, replaces the LM head on the final hidden states (:meth:`embed`); its result is
        returned instead."""
        c, tap = self.config, tap_for(record)
        check_progress(progress)
        T, start = ids.shape[0], 0 if state is None else state.position
        if start + T > c.max_position_embeddings:
            raise Lfm2npError(f"positions {start}..{start + T - 1} go past max_position_embeddings "
                              f"{c.max_position_embeddings} of this model")
        s = Scope(self.numerics.round, tap, kernels=self.numerics.ops)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # non-finite logits are checked below
            positions = np.arange(start, start + T)
            rope = {kind: layers.rope(positions, c, kind, self.dtype, s) for kind in schema.attention_kinds(c)}
            if images is not None:
                features = vision.encode(images, *self.vision_views(), c.vision, s)  # (I, D)
            h = s("model.embed_tokens", self.embed_tokens(ids))  # (T, D)
            if features is not None:
                h = s(vision.PLACED, vision.place(h, ids, features, c.vision.image_token_id))
            pasts = []
            for i, kind in enumerate(c.layer_types):
                if i + 1 < c.num_hidden_layers:  # read the next layer's tensors while this one runs
                    self.params.prefetch(list(self._names[i + 1].values()))
                past = None if state is None else state.layers[i]
                past = past.history if isinstance(past, ConvState) else None if past is None else (past.keys,
                                                                                                    past.values)
                if not c.causal:
                    past = view or Bidirectional()
                h, past = layers.decoder_layer(h, self.layer_weights(i), c, rope.get(kind), past, c.window(i),
                                               s.at(f"model.layers.{i}."))
                h = s(f"model.layers.{i}", h)
                pasts.append(past)
                if progress is not None:
                    progress(i + 1, c.num_hidden_layers)
            h = s("model.embedding_norm", s.ops.rms_norm(h, self.params["model.embedding_norm.weight"], c.norm_eps,
                                                         s.rnd))
            if head is not None:
                return embedding.finite(head(h, s)), pasts
            logits = s("lm_head", layers.lm_head(h, self.params[schema.head_name(c)], s, out))  # (T, V)
        # the one check on the way: a sum (one pass, no buffer) is finite unless a value is NaN or infinite, or
        # finite values overflow it, which the exact check then tells apart; the search only on failure
        with np.errstate(over="ignore", invalid="ignore"):
            total = logits.sum()
        if not np.isfinite(total) and not np.isfinite(logits).all():
            if getattr(record, "searching", False):  # the search below, already under way
                raise Lfm2npError("non-finite values")
            raise self._non_finite(ids, state, getattr(tap, "replaced", False))
        return logits, pasts

    def _non_finite(self, ids: np.ndarray, state: State | None, intervened: bool) -> Lfm2npError:
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
                    self.run(ids, state, find)
            except Lfm2npError:
                pass
        where = first[0] if first else "the logits"
        prefix = where.rsplit(".", 1)[0] + "." if where.startswith("model.layers.") else None
        layer = int(where.split(".")[2]) if prefix else None
        suspects = [n for n in schema.layer_names(self.config, layer).values()] if layer is not None \
            else [schema.HEAD_TIED, "model.embedding_norm.weight", schema.head_name(self.config)]
        bad = [n for n in dict.fromkeys(suspects) if not np.isfinite(self.params[n]).all()]
        if layer is not None and not bad and self.config.is_moe_layer(layer):
            bad = [n for e in range(self.config.num_experts) for n in schema.expert_names(layer, e)
                   if not np.isfinite(self.params[n]).all()][:3]
        cause = (f"; weight {', '.join(bad)} holds NaN or infinite values" if bad else
                 "; no weight of that layer is non-finite, so the values overflowed or came from the state "
                 "or an intervention" if not intervened else " (a value returned by record)")
        return Lfm2npError(f"non-finite values: they first appear in {where}{cause}")

    # ------------------------------------------------------------- the pieces
    def embed_tokens(self, ids: np.ndarray) -> np.ndarray:
        """The embedding rows of ``ids``: (T,) -> (T, D) (``model.embed_tokens``; :meth:`embed` gives embeddings).
        From a lazily loaded checkpoint only those rows are read and converted."""
        ids = self.check_ids(ids)
        if ids.ndim != 1:
            raise Lfm2npError(f"embed_tokens takes the ids of one sequence, shape (T,); got shape {ids.shape}")
        return self.params.rows(schema.HEAD_TIED, ids)

    def rope(self, positions: np.ndarray, kind: str = "full_attention") -> tuple[np.ndarray, np.ndarray]:
        """The RoPE (cos, sin) tables of ``positions`` for attention layers of type ``kind``, as this mode
        computes them (:func:`lfm2np.layers.rope`).  (T,) -> (T, hd) x 2"""
        kinds = schema.attention_kinds(self.config)
        if not isinstance(kind, str) or kind not in kinds:
            raise Lfm2npError(f"rope: kind is {shown(kind)}; this model's attention layer types are "
                              f"{', '.join(kinds) or 'none (it has no attention layer)'}")
        try:
            p = np.asarray(positions)
        except (TypeError, ValueError) as e:  # ragged lists and the like
            raise Lfm2npError(f"rope: positions must be a sequence of integers ({e})") from None
        if p.ndim != 1 or not (np.issubdtype(p.dtype, np.integer) or p.size == 0) or p.dtype == bool:
            raise Lfm2npError(f"rope: positions must be integers of shape (T,); got {p.dtype} of shape {p.shape}")
        if p.size and (p.min() < 0 or p.max() >= 2**62):
            raise Lfm2npError(f"rope: position {int(p.min() if p.min() < 0 else p.max())} is not a position "
                              f"(an integer >= 0)")
        return layers.rope(p.astype(np.int64), self.config, kind, self.dtype, Scope(self.numerics.round,
                                                                                  kernels=self.numerics.ops))

    def pixels(self, images: Any, ids: np.ndarray) -> "vision.Pixels | None":
        """``images`` as a checked image batch (file paths and arrays through :attr:`image_processor`), their
        token count checked against the placeholders in ``ids`` (:func:`lfm2np.vision.check_images`)."""
        return vision.check_images(images, ids, self.config, self.dtype, self.image_processor)

    def _placeholders(self, ids: np.ndarray) -> int:
        return int(np.count_nonzero(ids == self.config.vision.image_token_id))

    def vision_views(self) -> "tuple[vision.TowerWeights, vision.ProjectorWeights]":
        """LFM2-VL: the vision tower's and the projector's weight views."""
        names, W = self._vision_names, self.params
        return vision.views(lambda role: W[names[role]] if role in names else None)

    def layer_weights(self, i: int) -> LayerWeights:
        """Layer ``i``'s weights as the view :mod:`lfm2np.layers` computes with (experts fetched when chosen)."""
        L = self.config.num_hidden_layers
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)) or not 0 <= i < L:
            raise Lfm2npError(f"layer {shown(i)} does not exist; the model has {L} layers (0..{L - 1})")
        i = int(i)
        c, W, n = self.config, self.params, self._names[i]
        opt = lambda role: W[n[role]] if role in n else None  # noqa: E731  (biases, gates, sandwich norms)
        if c.is_attention(i):
            mixer: ConvWeights | AttentionWeights = AttentionWeights(
                W[n["q_proj"]], W[n["k_proj"]], W[n["v_proj"]], W[n["out_proj"]], W[n["q_norm"]], W[n["k_norm"]],
                opt("gate_proj"), opt("q_proj_bias"), opt("k_proj_bias"), opt("v_proj_bias"), opt("out_proj_bias"))
        else:
            mixer = ConvWeights(W[n["in_proj"]], W[n["conv"]], W[n["out_proj"]],
                                opt("in_proj_bias"), opt("conv_bias"), opt("out_proj_bias"))
        if c.is_moe_layer(i):
            def expert(e: int) -> SwiGLUWeights:
                return ExpertWeights(W, schema.expert_names(i, e))  # type: ignore[return-value]  # (read alike)

            def prefetch(chosen: np.ndarray) -> None:  # a lazily read checkpoint reads the chosen ones ahead
                W.prefetch([name for e in chosen for name in schema.expert_names(i, int(e))])

            ffn: SwiGLUWeights | MoEWeights = MoEWeights(W[n["gate"]], opt("expert_bias"), expert, prefetch)
        else:
            ffn = SwiGLUWeights(W[n["w1"]], W[n["w3"]], W[n["w2"]])
        return LayerWeights(W[n["operator_norm"]], mixer, W[n["ffn_norm"]], ffn,
                            opt("post_operator_norm"), opt("post_ffn_norm"))


def _in_memory(config: Config, params: Any, mode: Numerics, strict: bool) -> InMemory:
    """Weights given as arrays, checked against the config's tensor layout (names and shapes) and converted
    for the mode; each tensor that is not an array of real numbers is an error naming it."""
    if not isinstance(params, Mapping):
        raise Lfm2npError(f"params must map tensor names to arrays; got {type(params).__name__}")
    tensors = schema.layout(config)
    arrays = {}
    for name, value in params.items():
        if not isinstance(name, str):
            raise Lfm2npError(f"params: key {shown(name)} is a {type(name).__name__}; tensor names are strings")
        if isinstance(value, np.ma.MaskedArray):  # np.asarray would drop the mask: use the values it hides?
            raise Lfm2npError(f"params: tensor {shown(name)} is a masked array; expected a plain array")
        try:
            a = np.asarray(value)
        except (TypeError, ValueError):  # ragged nested lists and the like
            a = np.asarray(None)
        if a.dtype.kind not in "fiu":
            raise Lfm2npError(f"params: tensor {shown(name)} is a {type(value).__name__} of {a.dtype}; expected an "
                              f"array of real numbers")
        arrays[name] = a
    check_tensors({n: a.shape for n, a in arrays.items()}, {t.name: t.shape for t in tensors}, "params", strict,
                  schema.describe(config))
    return InMemory(arrays, tensors, mode)
