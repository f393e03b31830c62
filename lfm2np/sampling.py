"""How a token is chosen from the logits of the last position, and the defaults a checkpoint gives for it.

In the order transformers' ``generate`` applies its processors (``GenerationMixin._get_logits_processor``,
transformers 5.24):

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

A checkpoint's ``generation_config.json`` gives the defaults (:func:`generation_defaults`), read as
transformers reads it: sampling only when ``do_sample`` is true (then an unset ``temperature`` is 1.0
and an unset ``top_k`` 50, transformers' defaults); ``repetition_penalty`` in every mode. Explicit
values override it (:func:`sampling_for`). The generation loop is :mod:`lfm2np.generate`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import AbstractSet as Set, Any, Iterable, Mapping

import numpy as np

from .errors import Lfm2npError, shown
from .io.chat_template import read_json_object
from .io.files import present

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
    seen = _id_list(seen, "seen")
    odd = next((i for i in seen if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer))), None)
    if odd is not None:
        raise Lfm2npError(f"seen holds {shown(odd)}; expected token ids (integers)")
    V = z.shape[-1]  # ids outside the head's rows cannot be generated anyway
    ids = np.unique(np.asarray([int(i) for i in seen if 0 <= i < V], dtype=np.int64))
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
    ``-inf`` where a filter removed a token. In greedy mode only the repetition penalty applies. ``logits`` must be
    real numbers, none NaN or +inf, at least one finite (-inf: a token already ruled out)."""
    logits = _checked_logits(logits)
    if not isinstance(sampling, Sampling):
        raise Lfm2npError(f"sampling must be an lfm2np Sampling; got {type(sampling).__name__}")
    z = apply_repetition_penalty(logits, seen, sampling.repetition_penalty)
    if sampling.temperature not in (0, 1):
        with np.errstate(over="ignore"):
            z = z / sampling.temperature
    finite = z[np.isfinite(np.asarray(logits))]
    # a tiny temperature or penalty overflowed: logits sent to +inf lose their order (and all sent to -inf
    # leave nothing to draw); one sent to -inf alone changes nothing, its probability was 0 already
    if (finite == np.inf).any() or (finite.size and np.isneginf(finite).all()):
        what = (f"temperature {sampling.temperature!r} with repetition_penalty {sampling.repetition_penalty!r}"
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


def _checked_logits(logits: Any) -> np.ndarray:
    """One row of logits ``(V,)`` to choose a token from: real numbers, no NaN (greedy's argmax would take a NaN for
    the largest, id 0 for all NaN), no +inf (the softmax of two would be NaN), not every one -inf."""
    try:
        z = np.asarray(logits)
    except (TypeError, ValueError):
        z = np.asarray(None)
    if z.ndim != 1 or not z.size or z.dtype.kind not in "iuf":
        raise Lfm2npError(f"logits must be one row of real numbers (V,); got {z.dtype} of shape {z.shape}")
    with np.errstate(invalid="ignore"):
        bad = np.flatnonzero(np.isnan(z) | (z == np.inf)) if z.dtype.kind == "f" else np.zeros(0, int)
    if bad.size:
        raise Lfm2npError(f"logits hold {z[bad[0]]} at id {int(bad[0])}; a token is chosen from finite logits "
                          f"(-inf: ruled out)")
    if z.dtype.kind == "f" and np.isneginf(z).all():
        raise Lfm2npError("logits are -inf everywhere: no token can be chosen")
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


def _id_list(ids: Any, what: str) -> list:
    """``ids`` as a list (of ids, or of prompts): a sequence, an iterator or an array with an axis; never text or
    bytes, nor a set or a mapping (no order, or keys taken for ids)."""
    zero_d = isinstance(ids, np.ndarray) and ids.ndim == 0  # an ndarray, but no axis to iterate
    unordered = isinstance(ids, (Set, Mapping))
    if isinstance(ids, (str, bytes, bytearray)) or not isinstance(ids, Iterable) or zero_d or unordered:
        raise Lfm2npError(f"{what} must be a list of token ids; got {type(ids).__name__}"
                          + (" (encode text with a tokenizer first)" if isinstance(ids, (str, bytes)) else "")
                          + (" (a set or a mapping has no order of ids)" if unordered else ""))
    return list(ids)


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
    if not present(file, "the checkpoint's generation config (JSON)"):  # a FIFO in its place is not "no file"
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
    if not present(_config_file(path), "the checkpoint's generation config (JSON)"):
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
    if defaults is not None and not isinstance(defaults, Mapping):
        raise Lfm2npError(f"defaults must be a dict of sampling fields (generation_defaults); got "
                          f"{type(defaults).__name__}")
    unknown = set(explicit) - names
    if unknown:
        raise Lfm2npError(f"unknown sampling option(s): {', '.join(sorted(unknown))}")
    base = Sampling(**{k: v for k, v in (defaults or {}).items() if k in names})
    return replace(base, **{k: v for k, v in explicit.items() if v is not None})
