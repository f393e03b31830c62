"""Embeddings: a batch of sequences through the model and the sentence-transformers head (:meth:`Model.embed`).

A sequence's embedding is computed from its final hidden states by :func:`lfm2np.layers.embedding_head`: the
checkpoint's pooling (CLS, mean or last token) over its real tokens, its dense projection when it has one, L2
normalisation; or, per token (ColBERT), the dense projection and normalisation of every token.

Sequences of different lengths are padded on the right into one batch of rows of the longest length. A padded
row of a bidirectional model leaves its padding out of attention's keys and zeroes it before the centred conv,
whatever the checkpoint's ``conv_zero_padding``, so that every sequence gives what it gives alone: the value of a
sequence does not depend on what it is batched with (llama.cpp never pads; transformers' unpadded forward). The
rows agree with the sequences run alone to float32 rounding, not bit for bit: BLAS blocks a product differently
for another number of rows. A ``(B, T)`` array given with an ``attention_mask`` is instead a padded batch as a
reference computes it: its padding is zeroed only when the checkpoint says ``conv_zero_padding``
(:mod:`lfm2np.config_keys` explains the default). A causal model (LFM2-ColBERT-350M) ignores what follows a
token, so right padding changes nothing there; its padding must be on the right.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import layers, schema
from .config import POOLINGS, Config
from .errors import Lfm2npError
from .layers import Bidirectional


def padding(config: Config, ids: np.ndarray, attention_mask: Any) -> np.ndarray | None:
    """The padding of checked ``ids`` (T,) or (B, T) from an ``attention_mask`` of the same shape (1 or True for
    a token, 0 or False for padding): a bool array, True at the padding; None without a mask. Every row keeps at
    least one token; a causal model's padding must follow its tokens (it is never masked there)."""
    if attention_mask is None:
        return None
    try:
        m = np.asarray(attention_mask)
    except (TypeError, ValueError) as e:
        raise Lfm2npError(f"attention_mask must be an array of 0 and 1 ({e})") from None
    if m.shape != ids.shape:
        raise Lfm2npError(f"attention_mask has shape {list(m.shape)}; expected the shape of the ids, {list(ids.shape)}")
    if m.dtype.kind not in "biu" or not np.isin(m, (0, 1)).all():
        raise Lfm2npError("attention_mask must hold 0 (padding) and 1 (a token) only")
    real = m.astype(bool).reshape(-1, ids.shape[-1])
    if not real.any(axis=-1).all():
        raise Lfm2npError(f"attention_mask row {int(np.flatnonzero(~real.any(axis=-1))[0])} has no token")
    if config.causal and (np.diff(real.astype(np.int8), axis=-1) > 0).any():
        raise Lfm2npError("a causal model's padding must follow its tokens (right padding): a padded position "
                          "before a token would be read by it")
    return ~real.reshape(ids.shape)


def finite(x: np.ndarray) -> np.ndarray:
    """``x``, unless it holds NaN or infinite values (then an :class:`Lfm2npError`)."""
    if not np.isfinite(x).all():
        raise Lfm2npError(f"non-finite values in the embedding head's output (first at "
                          f"{np.argwhere(~np.isfinite(x))[0].tolist()}): the weights or an intervention")
    return x


def rows(model: Any, ids: Any, attention_mask: Any) -> tuple[np.ndarray, np.ndarray, bool, bool]:
    """The batch ``embed`` computes: ids (B, T), their padding (B, T) bool, whether one sequence was given, and
    whether the padding is zeroed before the conv (padded here: always; a caller's mask: the checkpoint's)."""
    ragged = isinstance(ids, (list, tuple)) and len(ids) > 0 and all(
        isinstance(r, (list, tuple, np.ndarray)) for r in ids)
    if ragged and attention_mask is None:
        seqs = [model.check_ids(r) for r in ids]
        if any(r.ndim != 1 for r in seqs):
            raise Lfm2npError("embed takes one sequence of ids, a list of sequences, or a (B, T) array")
        T = max(len(r) for r in seqs)
        pad = model.config.pad_token_id or 0
        batch = np.array([np.concatenate([r, np.full(T - len(r), pad, np.int64)]) for r in seqs])
        pads = np.arange(T)[None, :] >= np.array([len(r) for r in seqs])[:, None]
        return batch, pads, False, True
    arr = model.check_ids(ids)
    pads = padding(model.config, arr, attention_mask)
    single = arr.ndim == 1
    batch = arr[None] if single else arr
    pads = np.zeros(batch.shape, bool) if pads is None else pads.reshape(batch.shape)
    return batch, pads, single, model.config.conv_zero_padding


def embed(model: Any, ids: Any, attention_mask: Any = None, per_token: bool = False, pooling: str | None = None,
          record: Any = None) -> "np.ndarray | list[np.ndarray]":
    """:meth:`lfm2np.Model.embed` (its docstring)."""
    c = model.config
    how = pooling if pooling is not None else c.pooling or "mean"
    if how not in POOLINGS:
        raise Lfm2npError(f"pooling is {how!r}; expected one of {', '.join(POOLINGS)}")
    batch, pads, single, zero = rows(model, ids, attention_mask)
    if record is not None and len(batch) != 1:
        raise Lfm2npError(f"record traces one sequence; got {len(batch)}")
    dense = model.params[schema.DENSE_HEAD] if c.dense_out else None
    bias = model.params[schema.DENSE_HEAD_BIAS] if c.dense_bias and c.dense_out else None
    out = []
    for row, pad in zip(batch, pads):
        real = ~pad
        view = None if c.causal else Bidirectional(pad if pad.any() else None, zero)

        def head(h: np.ndarray, s: layers.Scope) -> np.ndarray:
            return layers.embedding_head(h, dense, bias, how, real, per_token, s)

        vec, _ = model.run(row, record=record, view=view, head=head)
        out.append(vec[real] if per_token else vec)
    if per_token:
        return out[0] if single else out
    return out[0] if single else np.stack(out)
