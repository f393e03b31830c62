"""Perplexity of a token sequence under a model, in sliding windows for sequences longer than the context.

The definition (the Hugging Face "perplexity of fixed-length models" recipe, made exact). For ids
``x_0 .. x_{N-1}``, a window of ``W`` tokens and a stride ``S`` (``1 <= S < W``):

- window ``k`` reads ``x[b_k : e_k]`` with ``b_k = k*S`` and ``e_k = min(b_k + W, N)``; the last window is
  the first that reaches ``e_k = N``;
- it scores the targets ``t`` with ``e_{k-1} <= t < e_k`` (``e_{-1} = 1``): each of ``x_1 .. x_{N-1}`` is
  scored exactly once, by ``-log p(x_t | x_{b_k} .. x_{t-1})``, with at least ``W - S`` tokens of context
  once past the first window (``x_0`` has no context and is never scored);
- ``nll`` is the mean over the ``N - 1`` scored tokens (nats per token), ``perplexity = exp(nll)``.

With ``W >= N`` it is one window over the whole sequence. The published recipe weights every window
after the first by one token too few (it subtracts the label shift in windows whose first label is
already masked); this module counts exactly, and ``tools/make_perplexity_reference.py`` computes the same
windows with transformers' own loss. ``S = W`` (disjoint windows) would leave each window's first token
without context, so the stride must be smaller than the window.

Log-probabilities are computed stably in float64: ``(z_t - max z) - log sum exp(z - max z)``.

The uncertainty, as llama-perplexity reports it: ``nll_stderr`` is the standard error of the mean NLL over
the scored *tokens*, ``sqrt(var(nll_t) / (N - 1))`` with the sample variance of the per-token NLLs, and
``perplexity_stderr = perplexity * nll_stderr`` (the delta method). It treats the tokens as independent
samples, which neighbouring tokens are not, so it understates the uncertainty of the text's perplexity.

Text files (:func:`read_text`) are read as Python's text mode reads them: UTF-8, with ``\r\n`` and a lone
``\r`` read as ``\n``, so a file saved with Windows line ends scores as the same text with Unix ones.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import AbstractSet, Any, Callable, Iterable, Mapping

import numpy as np

from .errors import Lfm2npError, shown
from .io.files import file_kind

#: The default window: the model's context, at most this many tokens (a NumPy forward stays quick).
DEFAULT_WINDOW = 2048

#: ``progress(window_index, windows, result_so_far)`` after each window.
Progress = Callable[[int, int, dict], None]


def read_text(path: "str | Path") -> str:
    """The text of a UTF-8 file with its line ends read as ``\n`` (``\r\n`` and a lone ``\r`` too, as
    Python's text mode reads them); :class:`Lfm2npError` naming the file otherwise."""
    file = Path(path)
    kind = file_kind(file)
    if kind is not None:
        raise Lfm2npError(f"{file}: no such file" if kind == "missing" else f"{file}: is {kind}, not a text file")
    try:
        data = file.read_bytes()
    except OSError as e:
        raise Lfm2npError(f"{file}: cannot read it ({e.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Lfm2npError(f"{file}: not UTF-8 text ({e})") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def log_probs(logits: np.ndarray, targets: np.ndarray, rows: int = 256) -> np.ndarray:
    """``log softmax(logits)[t, targets[t]]`` for each row, in float64, ``rows`` rows at a time (bounded
    temporaries for large vocabularies). ``(T, V), (T,) -> (T,)``"""
    out = np.empty(len(targets), dtype=np.float64)
    for a in range(0, len(targets), rows):
        z = np.asarray(logits[a:a + rows], dtype=np.float64)
        z = z - z.max(axis=-1, keepdims=True)  # the largest is 0: exp never overflows
        out[a:a + rows] = z[np.arange(len(z)), targets[a:a + rows]] - np.log(np.exp(z).sum(axis=-1))
    return out


def windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """The windows of the module docstring: ``(begin, end, first_target)`` each; the window reads
    ``ids[begin:end]`` and scores ``first_target .. end - 1``."""
    _check_windowing(n_tokens, window, stride)
    out, prev_end, begin = [], 1, 0
    while True:
        end = min(begin + window, n_tokens)
        out.append((begin, end, prev_end))
        if end == n_tokens:
            return out
        prev_end, begin = end, begin + stride


def _check_windowing(n_tokens: int, window: int, stride: int) -> None:
    for name, v in (("window", window), ("stride", stride)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise Lfm2npError(f"{name} is {shown(v)}; expected an integer")
    if n_tokens < 2:
        raise Lfm2npError(f"perplexity needs at least 2 tokens (the first is never scored); got {n_tokens}")
    if window < 2:
        raise Lfm2npError(f"window is {window}; expected at least 2 tokens")
    if not 1 <= stride < window:
        raise Lfm2npError(f"stride is {stride}; expected 1 <= stride < window ({window}), so that every "
                          f"token is scored with context")


def plan(model: Any, ids: Iterable[int], window: int | None = None, stride: int | None = None) \
        -> tuple[np.ndarray, int, int, list[tuple[int, int, int]]]:
    """The checked ids and the windows :func:`perplexity` runs: ``(ids, window, stride, windows)``."""
    if not all(hasattr(model, attr) for attr in ("check_ids", "forward", "config")):
        raise Lfm2npError(f"perplexity takes an lfm2np Model (lfm2np.load); got {type(model).__name__}")
    if isinstance(ids, (AbstractSet, Mapping)):  # no order of ids (or keys taken for ids)
        raise Lfm2npError(f"perplexity takes a sequence of ids; got a {type(ids).__name__}, which has no order")
    ids = model.check_ids(list(ids))
    if ids.ndim != 1:
        raise Lfm2npError(f"perplexity takes one sequence of ids; got shape {ids.shape}")
    context = model.config.max_position_embeddings
    if window is None:
        window = min(context, DEFAULT_WINDOW)
    if window > context:
        raise Lfm2npError(f"window is {window}; the model's context (max_position_embeddings) is {context}")
    if stride is None:
        stride = max(1, window // 2)
    return ids, window, stride, windows(len(ids), window, stride)


def window_nll(model: Any, piece: "tuple[np.ndarray, int]") -> np.ndarray:
    """The per-token NLLs of one window: ``piece`` is ``(ids[begin:end], first - begin)``, the window's ids and
    where its scored targets begin in it; ``(end - first,)`` float64."""
    ids, first = piece
    logits = model.forward(ids)  # (n, V): row j predicts ids[j + 1]
    rows = np.arange(first - 1, len(ids) - 1)
    return -log_probs(logits[rows], ids[rows + 1])


class Accumulator:
    """The running result of :func:`perplexity` as window NLLs are added in order (:meth:`add`)."""

    def __init__(self, n_ids: int, window: int, stride: int, n_windows: int):
        self.n_ids, self.window, self.stride, self.n_windows = n_ids, window, stride, n_windows
        self.nll_sum, self.scored, self.spread = 0.0, 0, 0.0  # spread: squared deviations from the running mean
        self.result: dict[str, Any] = {}

    def add(self, nll: np.ndarray) -> dict[str, Any]:
        """Add the next window's NLLs (n,); the result so far."""
        n, window_mean = len(nll), float(nll.mean())
        scored = self.scored
        # Chan et al.'s pairwise update of the spread: no cancellation between large, similar sums
        shift = (window_mean - self.nll_sum / scored) ** 2 * scored * n / (scored + n) if scored else 0.0
        self.spread += float(((nll - window_mean) ** 2).sum()) + shift
        self.nll_sum += float(nll.sum())
        self.scored = scored = scored + n
        mean = self.nll_sum / scored  # beyond ~709 nats per token the perplexity is past float range: inf
        ppl = math.exp(mean) if mean < 709.78 else math.inf
        stderr = math.sqrt(self.spread / (scored - 1) / scored) if scored > 1 else math.nan
        self.result = {"perplexity": ppl, "nll": mean, "nll_sum": self.nll_sum, "tokens": scored,
                       "input_tokens": int(self.n_ids), "window": int(self.window), "stride": int(self.stride),
                       "windows": self.n_windows, "nll_stderr": stderr,
                       "perplexity_stderr": ppl * stderr if math.isfinite(ppl) else math.inf}
        return self.result


def perplexity(model: Any, ids: Iterable[int], window: int | None = None, stride: int | None = None,
               progress: Progress | None = None) -> dict[str, Any]:
    """Perplexity of ``ids`` under ``model`` (see the module docstring).

    ``window`` defaults to the model's context (``max_position_embeddings``, at most
    :data:`DEFAULT_WINDOW`), ``stride`` to half the window. Returns ``perplexity``, ``nll`` (mean nats per
    scored token), ``nll_sum``, ``tokens`` (scored: N - 1), ``input_tokens`` (N), ``window``, ``stride`` and
    ``windows`` (how many forward passes), ``nll_stderr`` and ``perplexity_stderr`` (the module docstring:
    over tokens; NaN for a single scored token). ``progress`` is called after each window. The windows are
    independent: :func:`window_nll` computes one (on a cluster's worker too), :class:`Accumulator` adds them."""
    if progress is not None and not callable(progress):
        raise Lfm2npError(f"progress is {shown(progress)}; expected a function progress(window, windows, result) or "
                          f"None")
    ids, window, stride, parts = plan(model, ids, window, stride)
    total = Accumulator(len(ids), window, stride, len(parts))
    for k, (begin, end, first) in enumerate(parts):
        result = total.add(window_nll(model, (ids[begin:end], first - begin)))
        if progress is not None:
            progress(k + 1, len(parts), result)
    return total.result
