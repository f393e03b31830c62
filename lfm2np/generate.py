"""Sampling and the generation loop. Never inside forward: the model only turns ids into logits.

How a token is chosen from the logits of the last position, in the order transformers' ``generate``
applies its processors (``GenerationMixin._get_logits_processor``, transformers 5.24):

1. **repetition penalty** (``RepetitionPenaltyLogitsProcessor``): the logit of every token already seen
   (the prompt, including what a reused state already holds, and everything generated) is divided by
   ``repetition_penalty`` when positive and multiplied by it when negative; each token at most once.
   It applies to greedy decoding too, as in transformers.
2. greedy (``temperature == 0``): the argmax (the lowest id among equal maxima). Otherwise:
3. **temperature** (``TemperatureLogitsWarper``): ``logits / temperature``;
4. **top_k** (``TopKLogitsWarper``): keep the tokens whose logit is at least the k-th largest (ties kept);
5. **top_p** (``TopPLogitsWarper``): sort ascending, drop the tokens whose cumulative probability is at
   most ``1 - top_p`` (the most likely token always stays): the nucleus;
6. **min_p** (``MinPLogitsWarper``): of what is left, drop the tokens with probability below
   ``min_p * p_max``;
7. draw from the softmax of what remains with a seeded generator.

:func:`process_logits` is steps 1-6 (the filtered logits, ``-inf`` where removed), tested against
transformers' own processors (``tools/make_sampling_reference.py``). Everything is computed in float64.

:class:`Generation` runs the loop with the decoding state: one prefill of the prompt, then one token per
step. Iterating it yields token ids as they are produced (streaming); it stops at a stop id (not yielded),
after ``max_new_tokens``, when the context is full, or when its consumer calls :meth:`Generation.stop`, and
records why in ``finish_reason``. :func:`generate` returns the ids, for one prompt or several of different
lengths (each row is exactly its own run).

A checkpoint's ``generation_config.json`` gives the defaults (:func:`generation_defaults`), read as
transformers reads it: sampling only when ``do_sample`` is true (then an unset ``temperature`` is 1.0
and an unset ``top_k`` 50, transformers' defaults); ``repetition_penalty`` in every mode. Explicit
values override it (:func:`sampling_for`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from .errors import Lfm2npError, shown
from .io.chat_template import read_json_object
from .model import check_progress
from .state import State

GENERATION_CONFIG = "generation_config.json"


def _number(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def _finite(x: Any) -> bool:
    """A finite number (an integer too large for a float, e.g. JSON's 1e400 written out, is not one)."""
    try:
        return _number(x) and math.isfinite(x)
    except OverflowError:
        return False


def _shown(x: Any) -> str:
    return shown(x, 40)


@dataclass(frozen=True)
class Sampling:
    """How to choose each token (see the module docstring for the order). ``temperature=0`` is greedy;
    ``top_k=0``, ``top_p=1``, ``min_p=0`` and ``repetition_penalty=1`` switch those off; ``seed`` makes
    sampling reproducible."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not (_finite(self.temperature) and self.temperature >= 0):
            raise Lfm2npError(f"temperature is {_shown(self.temperature)}; expected a finite number >= 0 (0: greedy)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) \
                or not 0 <= self.top_k < 2**63:
            raise Lfm2npError(f"top_k is {_shown(self.top_k)}; expected an integer in 0 .. 2**63 - 1 (0: off)")
        if not (_finite(self.top_p) and 0 < self.top_p <= 1):
            raise Lfm2npError(f"top_p is {_shown(self.top_p)}; expected 0 < top_p <= 1 (1: off)")
        if not (_finite(self.min_p) and 0 <= self.min_p <= 1):
            raise Lfm2npError(f"min_p is {_shown(self.min_p)}; expected 0 <= min_p <= 1 (0: off)")
        if not (_finite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise Lfm2npError(f"repetition_penalty is {_shown(self.repetition_penalty)}; expected a finite number > 0 "
                              f"(1: off)")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer))
                                      or not 0 <= self.seed < 2**64):
            raise Lfm2npError(f"seed is {_shown(self.seed)}; expected an integer in 0 .. 2**64 - 1, or None")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# ------------------------------------------------------------------------------ the processors
def apply_repetition_penalty(logits: np.ndarray, seen: Iterable[int], penalty: float) -> np.ndarray:
    """transformers' ``RepetitionPenaltyLogitsProcessor``: the logits of the ``seen`` ids divided by
    ``penalty`` where positive, multiplied where negative (once per id). ``(V,) -> (V,)`` float64."""
    z = np.array(logits, dtype=np.float64)
    ids = np.unique(np.asarray(list(seen), dtype=np.int64))
    ids = ids[(ids >= 0) & (ids < z.shape[-1])]  # ids outside the head's rows cannot be generated anyway
    if penalty != 1 and ids.size:
        s = z[ids]
        with np.errstate(over="ignore"):  # an overflow is refused by process_logits
            z[ids] = np.where(s < 0, s * penalty, s / penalty)
    return z


def _softmax(z: np.ndarray) -> np.ndarray:
    finite = np.isfinite(z)
    p = np.zeros_like(z)
    p[finite] = np.exp(z[finite] - z[finite].max())
    return p / p.sum()


def process_logits(logits: np.ndarray, sampling: Sampling, seen: Iterable[int] = ()) -> np.ndarray:
    """Steps 1-6 of the module docstring on one row of logits ``(V,)``: the processed logits in float64,
    ``-inf`` where a filter removed a token. In greedy mode only the repetition penalty applies."""
    z = apply_repetition_penalty(logits, seen, sampling.repetition_penalty)
    if sampling.temperature not in (0, 1):
        with np.errstate(over="ignore"):
            z = z / sampling.temperature
    finite = z[np.isfinite(np.asarray(logits))]
    # a tiny temperature or penalty overflowed: logits sent to +inf lose their order (and all sent to -inf
    # leave nothing to draw); one sent to -inf alone changes nothing, its probability was 0 already
    if (finite == np.inf).any() or (finite.size and np.isneginf(finite).all()):
        what = (f"temperature {shown(sampling.temperature)} with repetition_penalty {shown(sampling.repetition_penalty)}"
                if sampling.temperature not in (0, 1) else f"repetition_penalty {shown(sampling.repetition_penalty)}")
        raise Lfm2npError(f"{what} overflows these logits (float64); use a larger value (temperature 0 for "
                          f"greedy, repetition_penalty 1 for none)")
    if sampling.greedy:
        return z
    V = z.shape[-1]
    if sampling.top_k and sampling.top_k < V:
        kth = np.partition(z, V - sampling.top_k)[V - sampling.top_k]  # the k-th largest
        z[z < kth] = -np.inf
    if sampling.top_p < 1:
        order = np.argsort(z, kind="stable")  # ascending
        cumulative = np.cumsum(_softmax(z[order]))
        remove = cumulative <= 1 - sampling.top_p
        remove[-1] = False  # the most likely token stays
        z[order[remove]] = -np.inf
    if sampling.min_p > 0:
        p = _softmax(z)
        z[p < sampling.min_p * p.max()] = -np.inf  # never the most likely token: p_max >= min_p * p_max
    return z


def probabilities(logits: np.ndarray, sampling: Sampling, seen: Iterable[int] = ()) -> np.ndarray:
    """The distribution a token is drawn from: the softmax of :func:`process_logits` (float64, ``(V,)``).
    Greedy: all the mass on the argmax."""
    z = process_logits(logits, sampling, seen)
    if sampling.greedy:
        p = np.zeros_like(z)
        p[int(np.argmax(z))] = 1.0
        return p
    return _softmax(z)


def sample(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator, seen: Iterable[int] = ()) -> int:
    """One token id from a row of logits ``(V,)``; ``seen`` are the ids the repetition penalty counts.
    Greedy picks the lowest id among equal maxima; sampling draws from :func:`probabilities`."""
    z = process_logits(logits, sampling, seen)
    if sampling.greedy:
        return int(np.argmax(z))
    kept = np.flatnonzero(np.isfinite(z))
    kept = kept[np.argsort(-z[kept], kind="stable")]  # most likely first, ties to the lower id
    p = np.exp(z[kept] - z[kept[0]])
    return int(kept[rng.choice(len(kept), p=p / p.sum())])


# ------------------------------------------------------------------------------ the loop
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


def _id_list(ids: Any, what: str) -> list:
    """``ids`` as a list (of ids, or of prompts): a sequence or an array with an axis, never text or bytes."""
    zero_d = isinstance(ids, np.ndarray) and ids.ndim == 0  # an ndarray, but no axis to iterate
    if isinstance(ids, (str, bytes, bytearray)) or not isinstance(ids, Iterable) or zero_d:
        raise Lfm2npError(f"{what} must be a list of token ids; got {type(ids).__name__}"
                          + (" (encode text with a tokenizer first)" if isinstance(ids, (str, bytes)) else ""))
    return list(ids)


class Generation:
    """An iterator over generated token ids; see the module docstring.

    ``state`` continues a sequence (None: a new one); ``context_ids`` are the ids that state already
    holds, which the repetition penalty counts as seen (with the prompt and the generated ids). ``rng``
    replaces the generator seeded with ``sampling.seed`` (e.g. one generator for a whole conversation).

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
                 rng: np.random.Generator | None = None, progress: Any = None):
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


# ------------------------------------------------------------------ the checkpoint's defaults
#: The generation_config.json fields lfm2np reads, and what each must be.
_FIELDS = {
    "do_sample": (lambda v: isinstance(v, bool), "true or false"),
    "temperature": (lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    "top_k": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63,
              "an integer in 0 .. 2**63 - 1"),
    "top_p": (lambda v: _finite(v) and 0 < v <= 1, "a number in (0, 1]"),
    "min_p": (lambda v: _finite(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "repetition_penalty": (lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "eos_token_id": (lambda v: (isinstance(v, int) and not isinstance(v, bool) and v >= 0) or
                     (isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                  for i in v)), "a token id or a list of token ids"),
}
#: transformers' defaults for what a sampling generation_config leaves unset (GenerationConfig).
_TRANSFORMERS_SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}


def _config_file(path: "str | os.PathLike[str]") -> Path:
    file = Path(path)
    return file / GENERATION_CONFIG if file.is_dir() else file


def read_generation_config(path: "str | os.PathLike[str]") -> dict[str, Any]:
    """The fields lfm2np uses from a ``generation_config.json`` file (or a directory holding one; {} when
    it has none), each validated: an error names the file and the key. Other keys are ignored (``null``
    counts as unset, as in transformers)."""
    file = _config_file(path)
    if not file.is_file():
        return {}
    data = read_json_object(file, "generation config")  # bounded, UTF-8, no key twice, no nesting too deep
    out = {}
    for key, (ok, expected) in _FIELDS.items():
        value = data.get(key)
        if value is None:
            continue
        if not ok(value):
            raise Lfm2npError(f"{file}: {key} is {_shown(value)}; expected {expected}")
        out[key] = value
    return out


def generation_defaults(path: "str | os.PathLike[str]") -> dict[str, Any]:
    """The :class:`Sampling` fields a checkpoint's ``generation_config.json`` implies, read as transformers
    reads it: ``do_sample`` true samples with its temperature/top_k/top_p/min_p (unset ones take
    transformers' defaults, temperature 1.0 and top_k 50); otherwise decoding is greedy (temperature 0)
    and the file's filters are kept only for when a temperature is given. ``repetition_penalty`` applies
    in both modes. Plus ``stop_ids`` when the file names ``eos_token_id``. {} without a file."""
    if not _config_file(path).is_file():
        return {}
    cfg = read_generation_config(path)
    out: dict[str, Any] = {}
    sampling = cfg.get("do_sample") is True
    for key in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty"):
        if key in cfg:
            out[key] = cfg[key]
        elif sampling and key in _TRANSFORMERS_SAMPLING_DEFAULTS:
            out[key] = _TRANSFORMERS_SAMPLING_DEFAULTS[key]
    if not sampling:
        out["temperature"] = 0.0
    elif out.get("temperature") == 0:
        raise Lfm2npError(f"{_config_file(path)}: do_sample is true but temperature is 0; expected a "
                          f"temperature > 0 (or do_sample false for greedy decoding)")
    if "eos_token_id" in cfg:
        eos = cfg["eos_token_id"]
        out["stop_ids"] = [eos] if isinstance(eos, int) else list(eos)
    return out


def sampling_for(defaults: Mapping[str, Any] | None = None, **explicit: Any) -> Sampling:
    """A :class:`Sampling` from a checkpoint's :func:`generation_defaults` overridden by the ``explicit``
    values that are not None (e.g. the command-line options the user gave)."""
    names = {f.name for f in fields(Sampling)}
    unknown = set(explicit) - names
    if unknown:
        raise Lfm2npError(f"unknown sampling option(s): {', '.join(sorted(unknown))}")
    base = Sampling(**{k: v for k, v in (defaults or {}).items() if k in names})
    return replace(base, **{k: v for k, v in explicit.items() if v is not None})
