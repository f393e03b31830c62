"""The embedded tiny LFM2-MoE model, and the walk of a sequence through its layers (``lfm2np demo``).

The model ships inside the package (``lfm2np/data/tiny-lfm2-moe``): a few MB, trained by
``tools/train_tiny.py`` on the Python standard library's pydoc topics, with a byte-level BPE tokenizer
that carries LFM2's special tokens and chat template. :func:`embedded_model_path` gives its directory;
wherever a model is named (:func:`lfm2np.load`, :func:`lfm2np.load_config`, every command's MODEL), the name
``"embedded"`` (:data:`NAME`) means it (:func:`resolve`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import Lfm2npError
from .io.hub import EMBEDDED_DIR as EMBEDDED, EMBEDDED_NAME as NAME, embedded_model_path

DEFAULT_PROMPT = 'What is the "while" statement?'


def resolve(model: Any) -> Any:
    """``model`` itself, or the embedded model's directory when ``model`` is the string :data:`NAME` exactly
    (``"embedded"``; a path object, or ``"./embedded"``, is a path as usual). An empty (or blank) string is an
    error: as a path it would mean the current directory, never what an empty name meant."""
    if isinstance(model, str) and not model.strip():
        raise Lfm2npError(f"the model is {model!r}, an empty name; give a checkpoint directory, a cached repo id, a "
                          f".gguf file or 'embedded' ('.' for the current directory)")
    return embedded_model_path() if isinstance(model, str) and model == NAME else model


def layer_walk(model, tokenizer, ids: list[int], last: int | None = None, width: int = 12) -> str:
    """A table: one row per token, its text and, per MoE layer, the experts it chose (and each layer's kind).
    The whole sequence ``ids`` is run (experts depend on the context); ``last`` limits the rows shown."""
    c = model.config
    chosen: dict[str, np.ndarray] = {}
    model.forward(ids, record=lambda name, value: chosen.__setitem__(name, value)
                  if name.endswith("selected_experts") else None)
    first = 0 if last is None else max(0, len(ids) - last)
    header = [f"{'token':>{width}s}"]
    for i in range(c.num_hidden_layers):
        kind = "attn" if c.is_attention(i) else "conv"
        header.append(f"{f'L{i} {kind}':>9s}")
    lines = [" ".join(header),
             " ".join([f"{'':>{width}s}"] + [f"{'MoE' if c.is_moe_layer(i) else 'dense':>9s}"
                                               for i in range(c.num_hidden_layers)])]
    for t in range(first, len(ids)):
        token = ids[t]
        text = tokenizer.decode([token])
        shown = repr(text if len(text) <= width - 2 else text[: width - 3] + "~")
        cells = [f"{shown:>{width}s}"]
        for i in range(c.num_hidden_layers):
            name = f"model.layers.{i}.feed_forward.selected_experts"
            cells.append(f"{','.join(str(int(e)) for e in sorted(chosen[name][t])) if name in chosen else '-':>9s}")
        lines.append(" ".join(cells))
    return "\n".join(lines)
