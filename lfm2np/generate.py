"""Sampling and the generation loop. Never inside forward: the model only turns ids into logits.

- :func:`sample` picks one token from a row of logits: greedy when ``temperature == 0``, otherwise
  softmax of ``logits / temperature`` restricted to the ``top_k`` most likely tokens and then to the
  smallest set whose probability reaches ``top_p`` (nucleus), drawn with a seeded generator.
- :class:`Generation` runs the loop with the decoding state: one prefill of the prompt, then one
  token per step. Iterating it yields token ids as they are produced (streaming); it stops at a stop id
  (not yielded) or after ``max_new_tokens``, and records why in ``finish_reason``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np

from .errors import Lfm2npError
from .state import State


@dataclass(frozen=True)
class Sampling:
    """How to choose each token. ``temperature=0`` is greedy (top_k/top_p are then irrelevant);
    ``top_k=0`` and ``top_p=1`` switch those filters off; ``seed`` makes sampling reproducible."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise Lfm2npError(f"temperature is {self.temperature}; expected a number >= 0")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise Lfm2npError(f"top_k is {self.top_k!r}; expected an integer >= 0 (0: off)")
        if not 0 < self.top_p <= 1:
            raise Lfm2npError(f"top_p is {self.top_p}; expected 0 < top_p <= 1")


def sample(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    """One token id from a row of logits ``(V,)``. Greedy picks the lowest id among equal maxima."""
    if sampling.temperature == 0:
        return int(np.argmax(logits))
    z = np.asarray(logits, dtype=np.float64) / sampling.temperature
    order = np.argsort(-z, kind="stable")  # most likely first, ties to the lower id
    if sampling.top_k:
        order = order[: sampling.top_k]
    p = np.exp(z[order] - z[order[0]])
    p /= p.sum()
    if sampling.top_p < 1:
        # the smallest prefix whose mass reaches top_p (at least one token)
        keep = int(np.searchsorted(np.cumsum(p), sampling.top_p)) + 1
        order, p = order[:keep], p[:keep] / p[:keep].sum()
    return int(order[rng.choice(len(order), p=p)])


class Generation:
    """An iterator over generated token ids; see the module docstring.

    After iteration: ``tokens`` (the generated ids), ``finish_reason`` ("stop" or "length"),
    ``stop_id`` (the id that stopped it, if any) and ``state`` (the decoding state after the last token
    fed to the model, which can continue the conversation).
    """

    def __init__(self, model: Any, prompt_ids: Iterable[int], max_new_tokens: int,
                 sampling: Sampling = Sampling(), stop_ids: Iterable[int] | None = None,
                 state: State | None = None):
        self.model = model
        self.prompt = model.check_ids(list(prompt_ids))
        if self.prompt.ndim != 1:
            raise Lfm2npError(f"the prompt must be one sequence of ids; got shape {self.prompt.shape}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise Lfm2npError(f"max_new_tokens is {max_new_tokens!r}; expected an integer >= 0")
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling
        self.stop_ids = frozenset(model.config.eos_token_id if stop_ids is None else stop_ids)
        self.state = state
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.stop_id: int | None = None
        self._rng = np.random.default_rng(sampling.seed)
        self._started = False

    def __iter__(self) -> Iterator[int]:
        if self._started:
            raise Lfm2npError("a Generation can be iterated once; make a new one")
        self._started = True
        if self.max_new_tokens == 0:
            self.finish_reason = "length"
            return
        logits, self.state = self.model.step(self.prompt, self.state)
        while True:
            token = sample(logits[-1], self.sampling, self._rng)
            if token in self.stop_ids:
                self.finish_reason, self.stop_id = "stop", token
                return
            self.tokens.append(token)
            yield token
            if len(self.tokens) >= self.max_new_tokens:
                self.finish_reason = "length"
                return
            logits, self.state = self.model.step([token], self.state)


def generate(model: Any, prompt_ids: Iterable[int], max_new_tokens: int = 64, *, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
             stop_ids: Iterable[int] | None = None) -> list[int]:
    """Generate and return the new token ids (the stop id, if reached, is not included)."""
    g = Generation(model, prompt_ids, max_new_tokens, Sampling(temperature, top_k, top_p, seed), stop_ids)
    return list(g)
