"""The generation loop. Never inside forward: the model only turns ids into logits; how each token is chosen
from them is :mod:`lfm2np.sampling` (whose names this module also gives: ``Sampling``, ``process_logits``,
``sample``, ``generation_defaults``, ...).

:class:`Generation` runs the loop with the decoding state: one prefill of the prompt, then one token per
step. Iterating it yields token ids as they are produced (streaming); it stops at a stop id (not yielded),
after ``max_new_tokens``, when the context is full, or when its consumer calls :meth:`Generation.stop`, and
records why in ``finish_reason``. :func:`generate` returns the ids, for one prompt or several of different
lengths (each row is exactly its own run).
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from .errors import Lfm2npError, shown
from .model import check_progress
from .sampling import (GENERATION_CONFIG, Sampling, _id_list, apply_repetition_penalty, generation_defaults,
                       probabilities, process_logits, read_generation_config, sample, sampling_for)
from .state import State

__all__ = ["GENERATION_CONFIG", "Generation", "Sampling", "apply_repetition_penalty", "checked_stop_ids", "generate",
           "generation_defaults", "probabilities", "process_logits", "read_generation_config", "sample",
           "sampling_for"]


def checked_stop_ids(ids: Any, vocab_size: int, what: str = "stop id") -> frozenset[int]:
    """``ids`` (an id or several) as a set of token ids, each an integer inside the vocabulary: a stop id the
    model can never produce would make a stop condition that silently never fires."""
    items = [ids] if isinstance(ids, (int, np.integer)) else ids
    try:
        items = list(items)
    except TypeError:
        raise Lfm2npError(f"{what}s must be token ids; got {shown(ids)}") from None
    out = set()
    for i in items:
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
            raise Lfm2npError(f"{what} {shown(i)} is not a token id (an integer)")
        if not 0 <= int(i) < vocab_size:
            raise Lfm2npError(f"{what} {shown(int(i))} is outside the vocabulary of size {vocab_size} "
                              f"(valid ids are 0..{vocab_size - 1}): it could never be generated")
        out.add(int(i))
    return frozenset(out)


def _check_model(model: Any, what: str) -> None:
    """A model to generate with: an lfm2np Model (or a stand-in with its check_ids, step and config)."""
    if not all(hasattr(model, attr) for attr in ("check_ids", "step", "config")):
        raise Lfm2npError(f"{what} takes an lfm2np Model (lfm2np.load); got {type(model).__name__}")


class Generation:
    """An iterator over generated token ids; see the module docstring.

    ``state`` continues a sequence (None: a new one); ``context_ids`` are the ids that state already
    holds, which the repetition penalty counts as seen (with the prompt and the generated ids). ``rng``
    replaces the generator seeded with ``sampling.seed`` (e.g. one generator for a whole conversation).
    ``images`` (LFM2-VL): the images whose placeholders the prompt holds (:meth:`lfm2np.Model.forward`'s
    ``images``; :func:`lfm2np.prompting.encode_with_images` gives the prompt and the batch).

    After iteration: ``tokens`` (the generated ids), ``finish_reason``, ``stop_id`` (the id that stopped it,
    if any) and ``state`` (the decoding state after the last token fed to the model: the prompt and every
    generated id but the last, or all of them when a stop id ended the generation; it can continue the
    conversation). ``finish_reason`` is one of

    - "stop": a stop id was drawn (``stop_id``; it is neither yielded nor in ``tokens``);
    - "length": ``max_new_tokens`` ids were generated;
    - "context": the model's context (``max_position_embeddings``) is full: the last token has no position left;
    - "interrupted": the consumer called :meth:`stop` (the chat does when the user stops a reply).

    With ``max_new_tokens=0`` nothing is computed: the prompt is not fed, ``state`` stays the one given (None
    for a new sequence) and ``finish_reason`` is "length".

    A Generation is one run, consumed by one thread: it is not to be shared between threads (the model and
    the state it starts from may be).
    """

    def __init__(self, model: Any, prompt_ids: Iterable[int], max_new_tokens: int,
                 sampling: Sampling = Sampling(), stop_ids: Iterable[int] | None = None,
                 state: State | None = None, context_ids: Iterable[int] = (),
                 rng: np.random.Generator | None = None, progress: Any = None, images: Any = None):
        _check_model(model, "Generation")
        self.model = model
        check_progress(progress)
        self.progress = progress  # the prefill's progress(done, total) callback (Model.step), or None
        self.prompt = model.check_ids(_id_list(prompt_ids, "the prompt"))
        if self.prompt.ndim != 1:
            raise Lfm2npError(f"the prompt must be one sequence of ids; got shape {self.prompt.shape}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
            raise Lfm2npError(f"max_new_tokens is {shown(max_new_tokens)}; expected an integer >= 0")
        if not isinstance(sampling, Sampling):
            raise Lfm2npError(f"sampling must be an lfm2np Sampling; got {type(sampling).__name__}")
        self.max_new_tokens = int(max_new_tokens)
        self.sampling = sampling
        self.stop_ids = checked_stop_ids(model.config.eos_token_id if stop_ids is None else stop_ids,
                                         model.config.vocab_size)
        self.state = state
        # LFM2-VL: the images whose placeholders the prompt holds, checked now (not at the first step)
        self.images = None if images is None else model.pixels(images, self.prompt)
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.stop_id: int | None = None
        context = _id_list(context_ids, "context_ids")
        self._seen = (model.check_ids(context).tolist() if context else []) + self.prompt.tolist()
        if rng is not None and not isinstance(rng, np.random.Generator):
            raise Lfm2npError(f"rng must be a numpy Generator (np.random.default_rng); got {type(rng).__name__}")
        self._rng = np.random.default_rng(sampling.seed) if rng is None else rng
        self._started = False
        self._stopped = False

    def __iter__(self) -> Iterator[int]:
        if self._started:
            raise Lfm2npError("a Generation can be iterated once; make a new one")
        self._started = True
        if self._stopped:
            return
        if self.max_new_tokens == 0:  # nothing to generate: the prompt is not fed, the state stays as given
            self.finish_reason = "length"
            return
        extra = {} if self.progress is None else {"progress": self.progress}  # (models that take it)
        if self.images is not None:
            extra["images"] = self.images
        logits, self.state = self.model.step(self.prompt, self.state, **extra)
        while True:
            token = self.choose(logits[-1])
            if token is None:
                return
            yield token
            if self._stopped:
                return
            if len(self.tokens) >= self.max_new_tokens:
                self.finish_reason = "length"
                return
            if self.context_full(self.state):
                return
            logits, self.state = self.model.step([token], self.state)

    def stop(self) -> None:
        """End the generation where it is, with ``finish_reason`` "interrupted": called between two ids (in the
        loop that consumes them), the next one is not computed and iteration ends; called before iteration,
        nothing is computed (the prompt is not fed). ``tokens`` and ``state`` stay consistent: ``state`` holds
        the prompt and every id yielded but the last, as after "length". Once the generation has ended for
        another reason, that reason stays."""
        self._stopped = True
        if self.finish_reason is None:
            self.finish_reason = "interrupted"

    def context_full(self, state: Any) -> bool:
        """True (and ``finish_reason`` "context") when ``state`` fills the model's context: the token just
        chosen has no position left to be fed at (it is kept: the model produced it)."""
        position = getattr(state, "position", None)
        if position is None or position < self.model.config.max_position_embeddings:
            return False
        self.finish_reason = "context"
        return True

    def choose(self, logits: np.ndarray) -> int | None:
        """The next token from the last position's logits; None (and ``finish_reason`` "stop") at a stop
        id. Records the token. (The loop above, and :func:`generate` for several prompts, call this.)"""
        token = sample(logits, self.sampling, self._rng, self._seen)
        if token in self.stop_ids:
            self.finish_reason, self.stop_id = "stop", token
            return None
        self.tokens.append(token)
        self._seen.append(token)
        return token


def generate(model: Any, prompt_ids: "Iterable[int] | Sequence[Iterable[int]]", max_new_tokens: int = 64, *,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
             repetition_penalty: float = 1.0, seed: int | None = None, stop_ids: Iterable[int] | None = None,
             sampling: Sampling | None = None) -> "list[int] | list[list[int]]":
    """Generate and return the new token ids (a stop id, if reached, is not included).

    ``prompt_ids`` is one prompt (a list of ids) or several (a list of lists, lengths may differ): then a
    list of lists comes back, row i exactly what ``generate`` gives for prompt i alone (each row has its
    own generator seeded with ``seed``, its own state and stops on its own). The rows advance together,
    one :meth:`Model.step_batch` per token. ``sampling`` replaces the individual options."""
    _check_model(model, "generate")
    if sampling is None:
        sampling = Sampling(temperature, top_k, top_p, seed, min_p, repetition_penalty)
    prompts = _id_list(prompt_ids.tolist() if isinstance(prompt_ids, np.ndarray) and prompt_ids.ndim else prompt_ids,
                       "prompt_ids")
    if not prompts or not all(isinstance(p, (list, tuple, np.ndarray)) for p in prompts):
        return list(Generation(model, prompts, max_new_tokens, sampling, stop_ids))
    gens = [Generation(model, p, max_new_tokens, sampling, stop_ids) for p in prompts]
    if max_new_tokens == 0:
        return [list(g) for g in gens]
    feed: list[list[int]] = [g.prompt.tolist() for g in gens]
    states: list[State | None] = [None] * len(gens)
    active = list(range(len(gens)))
    while active:
        logits, new_states = model.step_batch([feed[i] for i in active], [states[i] for i in active])
        still = []
        for i, row, state in zip(active, logits, new_states):
            states[i] = state
            token = gens[i].choose(row[-1])
            if token is None:
                continue
            if len(gens[i].tokens) >= max_new_tokens:
                gens[i].finish_reason = "length"
                continue
            if gens[i].context_full(state):
                continue
            feed[i] = [token]
            still.append(i)
        active = still
    return [g.tokens for g in gens]
