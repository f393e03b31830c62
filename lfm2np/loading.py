"""``load()`` and ``load_config()``: the one place that knows every input format and the presets.

A model can come from

- a checkpoint directory: ``config.json`` + ``model.safetensors`` or a sharded set
  (:mod:`lfm2np.io.safetensors`);
- a repo id already in the local Hugging Face cache, e.g. ``LiquidAI/LFM2-350M`` (:mod:`lfm2np.io.hub`;
  nothing is ever downloaded);
- a ``.gguf`` file (:mod:`lfm2np.io.gguf`), and for LFM2-VL llama.cpp's pair: the text GGUF with
  ``mmproj=`` its mmproj GGUF (:mod:`lfm2np.io.mmproj`);
- ``"embedded"``: the tiny model shipped inside the package (:mod:`lfm2np.embedded`), as every command's MODEL;

and a config, in addition, from a ``config.json`` path, a parsed dictionary or a preset name
(:mod:`lfm2np.presets`). The numerics mode (:mod:`lfm2np.numerics`) decides the compute dtype and whether
weights are rounded as they are first used.
"""

from __future__ import annotations

import os
import warnings
import weakref
from pathlib import Path
from typing import Any, Mapping

from . import embedded, presets
from .config import Config, check_rope_reading
from .errors import Lfm2npError, shown
from .io import hub
from .io import sentence_transformers as st
from .io.files import present, read_json
from .io.gguf import read_gguf_config, read_gguf_source
from .io.mmproj import read_gguf_pair, read_pair_config
from .io.params import parse_budget
from .io.safetensors import Checkpoint
from .io.vl_checkpoint import Renamed
from .model import Model
from .numerics import numerics
from .processor import ImageProcessor, ProcessorConfig
from .schema import describe, layout
from .weights import Lazy, TensorSource, check_tensors


def is_gguf(path: "str | os.PathLike[str]") -> bool:
    """Whether ``path`` names a GGUF file (by its extension)."""
    return str(path).lower().endswith(".gguf")


def load(path: "str | os.PathLike[str]", dtype: Any = "float32", *, strict: bool = True,
         memory_budget: Any = None, rope_reading: str = "trained", keep_weights: bool | None = None,
         mmproj: "str | os.PathLike[str] | None" = None) -> Model:
    """Load a checkpoint directory (``config.json`` + ``model.safetensors`` or a sharded set), a repo id
    such as ``LiquidAI/LFM2-350M`` already in the local Hugging Face cache (nothing is downloaded), a
    ``.gguf`` file (architectures ``lfm2``/``lfm2moe``; needs the ``gguf`` package), or ``"embedded"`` (the
    tiny model shipped inside lfm2np, :func:`lfm2np.embedded.resolve`).

    ``dtype``: "float32" (default), "float64" (the oracle mode) or "bfloat16" (float32 arrays rounded where
    a bfloat16 backend rounds: :mod:`lfm2np.numerics`). Every tensor the config implies must be present
    with its shape. A tensor the model does not use raises :class:`Lfm2npError` (``strict=True``) or a
    warning naming it (``strict=False``). ``memory_budget`` bounds the converted tensors kept in memory
    (bytes, or a size such as "6GiB" = "6G" or "6GB": :func:`lfm2np.io.params.parse_size`; "all": no limit;
    0: convert at every use): every-token tensors are kept first, experts cached least-recently-used in the
    rest (:mod:`lfm2np.io.params`); by default everything when the converted model fits a fifth of the
    available memory, else a fifth of it. ``model.params.report()`` says what is resident. ``rope_reading`` decides how an LFM3 RoPE
    entry labelled "default" with a partial_rotary_factor is read (see :data:`lfm2np.config.ROPE_READINGS`:
    "trained", the default, or "transformers"); such a config warns. ``keep_weights`` is the deprecated
    switch the budget replaced (True: "all", False: 0).

    ``mmproj``: LFM2-VL from llama.cpp's pair, ``path`` the text GGUF and ``mmproj`` the mmproj GGUF (vision tower
    and projector, :mod:`lfm2np.io.mmproj`); the model's image processor then has llama.cpp's settings.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise Lfm2npError(f"path must be a checkpoint directory, a cached repo id or a .gguf file (a str or a "
                          f"path); got {type(path).__name__}")
    check_rope_reading(rope_reading)  # whatever the format, before a file is read
    for name, flag, optional in (("strict", strict, False), ("keep_weights", keep_weights, True)):
        if not isinstance(flag, bool) and not (optional and flag is None):  # keep_weights="no" would keep all
            raise Lfm2npError(f"{name} must be True or False; got {shown(flag)}")
    path = embedded.resolve(path)
    check_mmproj_with(path, mmproj)
    try:
        return _load(path, dtype, strict, memory_budget, rope_reading, keep_weights, mmproj)
    except OSError as e:  # a name too long, a loop of links, a permission: the path at fault, never a traceback
        raise Lfm2npError(f"{str(path)[:200]}: {e.strerror or e}") from None


def check_mmproj_with(path: Any, mmproj: Any) -> None:
    """An mmproj goes with a text GGUF only, and is a path."""
    if mmproj is None:
        return
    if not isinstance(mmproj, (str, os.PathLike)):
        raise Lfm2npError(f"mmproj must be the path of an mmproj GGUF file; got {type(mmproj).__name__}")
    if not is_gguf(path):
        raise Lfm2npError(f"mmproj goes with llama.cpp's text GGUF; {str(path)[:200]} is not a .gguf file (a "
                          f"checkpoint directory holds its vision tower itself)")


def _load(path: "str | os.PathLike[str]", dtype: Any, strict: bool, memory_budget: Any, rope_reading: str,
          keep_weights: bool | None, mmproj: Any = None) -> Model:
    mode = numerics(dtype)
    if keep_weights is not None:  # the switch the budget replaced: True keeps everything, False nothing
        if memory_budget is not None:
            raise Lfm2npError("give memory_budget or keep_weights (its deprecated older form), not both")
        warnings.warn("keep_weights is deprecated: memory_budget='all' keeps every converted tensor, "
                      "memory_budget=0 none", DeprecationWarning, stacklevel=3)
        memory_budget = "all" if keep_weights else 0
    settings = None
    if mmproj is not None:
        config, tensors, source, settings = read_gguf_pair(path, mmproj, strict)
    elif is_gguf(path):
        config, tensors, source = read_gguf_source(path, strict)
        config = config.replace(rope_reading=rope_reading)  # (an lfm2 file's RoPE reads the same either way)
    else:
        directory = hub.resolve(path)
        config = load_config(directory, rope_reading=rope_reading)
        tensors = layout(config)
        source = checkpoint_source(directory)
        try:
            if config.is_vision_language:  # the towers' names as lfm2np lays them out
                source = Renamed(source, str(directory))
            check_tensors(source.shapes(), {t.name: t.shape for t in tensors}, str(directory), strict,
                          describe(config))
        except BaseException:
            source.close()
            raise
    weights = lazy_weights(source, tensors, mode, memory_budget)
    weights.config = config  # the layout is this config's: the Model need not compute it again
    model = Model(config, weights, mode)
    if settings is not None:  # llama.cpp's pair: its processor settings
        model.image_processor = ImageProcessor(ProcessorConfig(**settings,
                                                               source=f"{mmproj} (llama.cpp's LFM2 settings)"))
    elif config.is_vision_language and not is_gguf(path):  # a directory: its processor_config.json's settings
        model.image_processor = ImageProcessor.for_checkpoint(directory, config.vision)
    return model


def checkpoint_source(directory: "str | os.PathLike[str]") -> Any:
    """The tensors of a checkpoint directory by lfm2np's names: its safetensors files, or, for a
    sentence-transformers checkpoint of a base model, those and its Dense module's file renamed
    (:mod:`lfm2np.io.sentence_transformers`)."""
    main = Checkpoint(directory)
    try:
        dense_dir = st.dense_directory(directory)
        dense = Checkpoint(dense_dir) if dense_dir is not None else None
    except BaseException:
        main.close()
        raise
    names = st.lfm2np_names(list(main.tensors), list(dense.tensors) if dense is not None else [])
    if names is None:
        return main
    sources = [main] + ([dense] if dense is not None else [])
    return st.Renamed({name: (sources[i], stored) for name, (i, stored) in names.items()}, sources)


def lazy_weights(source: TensorSource, tensors: "list[Any]", mode: Any, memory_budget: Any) -> Lazy:
    """The weights of a model read from ``source`` (its tensors ``tensors``, the config's layout) for numerics
    ``mode`` within ``memory_budget`` (:func:`lfm2np.io.params.parse_budget`); the source is closed when the
    weights are no longer used."""
    budget = parse_budget(memory_budget, sum(t.size for t in tensors) * mode.dtype.itemsize)
    weights = Lazy(source, tensors, mode, budget)
    weakref.finalize(weights, source.close)
    return weights


def load_config(x: "str | os.PathLike[str] | Mapping[str, Any] | Config", rope_reading: str = "trained",
                mmproj: "str | os.PathLike[str] | None" = None) -> Config:
    """A Config from a config.json path, a checkpoint directory, a cached repo id, a ``.gguf`` file, a
    preset name, ``"embedded"`` (the shipped tiny model) or a parsed dictionary.

    Preset names are matched without regard to case, with or without the ``LiquidAI/`` prefix
    (``"LFM2-350M"``, ``"liquidai/lfm2-8b-a1b"``); see :data:`lfm2np.presets.PRESETS`. A cached repo id
    wins over a preset of the same name (it is the real file). ``mmproj``: with a text GGUF ``x``, llama.cpp's
    LFM2-VL pair (:func:`lfm2np.io.mmproj.read_pair_config`).
    """
    check_rope_reading(rope_reading)  # whatever x is, before a file is read
    if mmproj is not None:
        check_mmproj_with(x, mmproj)
        try:
            return read_pair_config(x, mmproj).replace(rope_reading=rope_reading)
        except OSError as e:
            raise Lfm2npError(f"{str(x)[:200]} + {str(mmproj)[:200]}: {e.strerror or e}") from None
    if isinstance(x, Config):
        return x if x.rope_reading == rope_reading else x.replace(rope_reading=rope_reading)
    if not isinstance(x, (str, os.PathLike, Mapping)):
        raise Lfm2npError(f"a config is a config.json path, a checkpoint directory, a repo id, a .gguf file, a "
                          f"preset name, a dict or a Config; got {type(x).__name__}")
    x = embedded.resolve(x)
    try:
        return _load_config(x, rope_reading)
    except OSError as e:
        raise Lfm2npError(f"{str(x)[:200]}: {e.strerror or e}") from None


def _load_config(x: "str | os.PathLike[str] | Mapping[str, Any]", rope_reading: str) -> Config:
    if isinstance(x, Mapping):
        return Config.from_dict(x, rope_reading=rope_reading)
    if is_gguf(x):
        return read_gguf_config(x).replace(rope_reading=rope_reading)
    path = Path(x)
    if not path.exists() and presets.find(str(x)) is not None and not hub.is_cached(str(x)):
        return presets.find(str(x)).replace(rope_reading=rope_reading)
    if not path.exists() and hub.is_cached(str(x)):
        path = hub.resolve(x)
    if path.is_dir():
        path = path / "config.json"
        if not present(path, "the checkpoint's config.json"):
            ggufs = sorted(p.name for p in path.parent.glob("*.gguf"))[:3]
            hint = f"; it holds GGUF files ({', '.join(ggufs)}): give one of them" if ggufs else ""
            raise Lfm2npError(f"{path.parent}: no config.json in this directory{hint}")
    if path.is_file():
        d = _read_json(path)
        head = st.read_head(path.parent)  # a sentence-transformers checkpoint's pooling and dense head
        if head is not None and isinstance(d, dict):
            d = {**d, "sentence_transformers": head}
        return Config.from_dict(d, source=str(path), rope_reading=rope_reading)
    raise Lfm2npError(
        f"{shown(x)} is neither a config.json, a checkpoint directory, a .gguf file, a cached repo id nor a preset "
        f"name; presets: {', '.join(presets.names())}"
    )


def _read_json(path: Path) -> Any:
    """config.json parsed strictly: UTF-8, a key given twice in one object or nesting too deep is an error
    naming the file (:func:`lfm2np.io.files.read_json`)."""
    return read_json(path, "JSON config")
