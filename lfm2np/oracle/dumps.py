"""What a backend can give the diagnosis: its logits, a trace of named intermediates, or the tokens it generated.

A dump file is an ``.npz`` or a ``.safetensors`` file:

- with ``logits`` ``(T, V)`` and ``ids`` ``(T,)``: a **logits dump** (the backend's logits for those ids);
- with ``tokens`` ``(N,)`` and ``ids`` ``(P,)``: a **token stream** (its greedy output after the prompt ``ids``);
- with ``embeddings`` ``(B, E)`` (or ``(E,)``) and ``ids`` ``(B, T)`` (or ``(T,)``), and optionally
  ``attention_mask`` ``(B, T)`` (1 for a token, 0 for padding): an **embeddings dump** (the backend's pooled
  vectors, normalised or not, for those rows);
- otherwise a **trace**: named intermediates as ``lfm2np compare`` reads them: lfm2np's own trace names
  (``lfm2np trace``, ``tools/dump_transformers_trace.py``), llama.cpp's eval-callback names
  (:func:`lfm2np.oracle.trace.llama_cpp_alias`, ``tools/dump_llama_cpp_trace.py``) or transformers' forward-hook
  names (:func:`lfm2np.oracle.trace.from_transformers`); the ids come from the trace's metadata, an ``ids``
  tensor, or the caller.

Any of them may carry ``prefill``, a scalar: the number of ids the backend processed in its first call (where
its second call, a decode or a second prefill, began). Every problem with a file is an
:class:`~lfm2np.Lfm2npError` naming the file and the field.
"""

from __future__ import annotations

import math
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import Lfm2npError, shown
from ..io.files import file_kind
from ..io.params import available_memory
from ..io.safetensors_file import STORAGE, SafetensorsFile
from ..schema import layer_of
from .compare import aligned
from .runs import canonical_tensors, trace_ids
from .routing import canonical_order
from .trace import Trace, holds_integers, is_trace_name

KINDS = ("logits", "trace", "tokens", "embeddings")


@dataclass(frozen=True)
class Dump:
    """What a backend produced. ``kind`` is ``logits`` (``logits`` for ``ids``), ``trace`` (``trace`` of a run
    on ``ids``) or ``tokens`` (``tokens`` generated greedily after the prompt ``ids``). ``prefill``: where the
    backend's second call began, when known."""

    kind: str
    ids: np.ndarray
    logits: np.ndarray | None = None
    trace: Trace | None = None
    tokens: np.ndarray | None = None
    prefill: int | None = None
    source: str = field(default="", compare=False)
    embeddings: np.ndarray | None = None  # (B, E) for ids (B, T), padded as ``mask`` (B, T) says
    mask: np.ndarray | None = None

    @property
    def length(self) -> int:
        """The number of positions the backend computed (of each row, for embeddings)."""
        if self.embeddings is not None:
            return self.ids.shape[-1]
        return len(self.ids) + (len(self.tokens) - 1 if self.tokens is not None else 0)


def _int_array(value: Any, what: str, ndim: int = 1) -> np.ndarray:
    try:
        a = np.asarray(value)
    except (ValueError, TypeError):
        raise Lfm2npError(f"{what} must be an array of integers") from None
    if a.dtype == bool or not (np.issubdtype(a.dtype, np.integer) or (a.size and np.issubdtype(a.dtype, np.floating)
                                                                       and np.all(a == np.round(a)))):
        raise Lfm2npError(f"{what} must hold integers; got {a.dtype}")
    if a.ndim != ndim or a.size == 0:
        raise Lfm2npError(f"{what} must have {ndim} non-empty axis; got shape {list(a.shape)}")
    big = np.abs(a.astype(np.float64)) >= 2.0 ** 63  # would wrap around in int64 (uint64, huge floats)
    if big.any():
        first = a.reshape(-1)[np.argmax(big.reshape(-1))].item()
        raise Lfm2npError(f"{what}: {shown(first)} is no token id (too large)")
    return a.astype(np.int64)


def _prefill(value: Any, what: str) -> int | None:
    if value is None:
        return None
    a = np.asarray(value)
    if a.size != 1 or not np.issubdtype(a.dtype, np.integer) or int(a.reshape(-1)[0]) < 1:
        raise Lfm2npError(f"{what} must be one integer >= 1 (the ids in the backend's first call); got {shown(value)}")
    return int(a.reshape(-1)[0])


def logits_dump(ids: Any, logits: Any, prefill: Any = None, source: str = "logits") -> Dump:
    """A logits dump: ``logits`` ``(T, V)`` computed by the backend for ``ids`` ``(T,)``."""
    ids = _int_array(ids, f"{source}: ids")
    try:
        logits = np.asarray(logits, dtype=np.float32)
    except (ValueError, TypeError):
        raise Lfm2npError(f"{source}: logits must be an array of numbers") from None
    if logits.ndim != 2 or logits.shape[0] != ids.shape[0]:
        raise Lfm2npError(f"{source}: logits must have shape (T, V) with T = {ids.shape[0]} ids; "
                          f"got {list(logits.shape)}")
    return Dump("logits", ids, logits=logits, prefill=_prefill(prefill, f"{source}: prefill"), source=source)


def embeddings_dump(ids: Any, embeddings: Any, mask: Any = None, source: str = "embeddings") -> Dump:
    """An embeddings dump: the pooled ``embeddings`` (B, E) a backend computed for the rows of ``ids`` (B, T),
    padded as ``mask`` (B, T) says (1 for a token, 0 for padding; None: no padding). One row may be given as
    ``(T,)`` and ``(E,)``."""
    ids = np.asarray(ids)
    ids = _int_array(ids[None] if ids.ndim == 1 else ids, f"{source}: ids", ndim=2)
    try:
        emb = np.asarray(embeddings, dtype=np.float64)
    except (ValueError, TypeError):
        raise Lfm2npError(f"{source}: embeddings must be an array of numbers") from None
    emb = emb[None] if emb.ndim == 1 else emb
    if emb.ndim != 2 or emb.shape[0] != ids.shape[0] or not np.isfinite(emb).all():
        raise Lfm2npError(f"{source}: embeddings must be finite, of shape (B, E) with B = {ids.shape[0]} rows of ids; "
                          f"got {list(emb.shape)}")
    if mask is not None:
        m = np.asarray(mask)
        if m.shape != ids.shape or m.dtype.kind not in "biuf" or not np.isin(m, (0, 1)).all():
            raise Lfm2npError(f"{source}: attention_mask must hold 0 and 1 in the shape of ids {list(ids.shape)}")
        mask = m.astype(bool)
    return Dump("embeddings", ids, embeddings=emb, mask=mask, source=source)


def token_stream(prompt: Any, tokens: Any, prefill: Any = None, source: str = "tokens") -> Dump:
    """A token stream: ``tokens`` generated greedily by the backend after ``prompt``."""
    return Dump("tokens", _int_array(prompt, f"{source}: prompt ids"), tokens=_int_array(tokens, f"{source}: tokens"),
                prefill=_prefill(prefill, f"{source}: prefill"), source=source)


def trace_dump(trace: Trace, ids: Any = None, prefill: Any = None, source: str = "trace") -> Dump:
    """A trace of named intermediates computed by the backend for ``ids`` (default: the trace's own)."""
    recorded = trace_ids(trace, source)
    if ids is None:
        ids = recorded
    elif recorded is not None and [int(i) for i in np.asarray(ids).reshape(-1)] != recorded:
        raise Lfm2npError(f"{source}: the trace records the ids it ran, and they are not the ids given")
    if ids is None:
        raise Lfm2npError(f"{source}: the trace does not say which ids it ran (no 'ids' in its metadata or "
                          f"tensors): pass them (--ids)")
    tensors = {k: v for k, v in trace.tensors.items() if k not in ("ids", "prefill")}
    if not tensors:
        raise Lfm2npError(f"{source}: the trace holds no tensors")
    if prefill is None and "prefill" in trace:
        prefill = trace["prefill"]
    return Dump("trace", _int_array(ids, f"{source}: ids"), trace=Trace(tensors, trace.meta),
                prefill=_prefill(prefill, f"{source}: prefill"), source=source)


#: how many times its size an .npz file's arrays may declare in all (float data barely compresses; zeros do: a bomb)
INFLATION = 100
#: what every .npz file may declare beyond that, whatever its size (small dumps of ids and logits compress well)
INFLATION_SLACK = 16 << 20


def _npz_shapes(path: Path) -> dict[str, tuple[tuple[int, ...], int, str]]:
    """Each array of an ``.npz`` file: its shape, item size and dtype kind, from the ``.npy`` headers alone
    (nothing is decompressed beyond them). Object arrays (pickles), anything that is not an ``.npy`` member,
    encrypted members, members compressed otherwise than deflate (zipfile inflates bzip2 and lzma without
    bounding the output), and arrays that together declare more than :data:`INFLATION` times the file's size
    plus :data:`INFLATION_SLACK` (16 MiB) are refused, before any array data is inflated."""
    out = {}
    total, limit = 0, INFLATION * path.stat().st_size + INFLATION_SLACK
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    raise Lfm2npError(f"{path}: member {shown(info.filename)} is not an .npy array")
                if info.flag_bits & 0x1:
                    raise Lfm2npError(f"{path}: member {shown(info.filename)} is encrypted")
                if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                    # zipfile inflates bzip2 and lzma without an output bound: reading a header alone could
                    # inflate gigabytes
                    raise Lfm2npError(f"{path}: member {shown(info.filename)} is compressed with method "
                                      f"{info.compress_type}; a dump's members are stored or deflated (as "
                                      f"numpy's savez and savez_compressed write them)")
                with zf.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    if version not in ((1, 0), (2, 0)):
                        raise Lfm2npError(f"{path}: member {shown(info.filename)} has .npy format {version}")
                    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                        np.lib.format.read_array_header_2_0
                    shape, _, dtype = read(f)
                name = info.filename[:-4]
                if dtype.hasobject:
                    raise Lfm2npError(f"{path}: array {shown(name)} holds Python objects; a dump holds numbers")
                shape = tuple(int(n) for n in shape)
                total += math.prod(shape) * dtype.itemsize
                if total > limit:
                    raise Lfm2npError(f"{path}: its arrays would inflate its {path.stat().st_size} stored bytes to at "
                                      f"least {total} (with array {shown(name)}): refused (an .npz dump may declare "
                                      f"at most {INFLATION} times its size plus {INFLATION_SLACK >> 20} MiB; a dump "
                                      f"of real numbers does not compress {INFLATION}-fold)")
                out[name] = (shape, dtype.itemsize, dtype.kind)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError, NotImplementedError,
            RuntimeError) as e:  # RuntimeError: zipfile's compression methods it cannot read
        raise Lfm2npError(f"{path}: not a readable .npz file ({e})") from None
    return out


def _check_shapes(path: Path, shapes: dict[str, tuple[tuple[int, ...], int, str]], ids_given: bool,
                  vocab_size: int | None) -> None:
    """What the arrays of a dump say they are, checked before any is read: real numbers (ids and chosen
    experts integers, logits and intermediates floating point); no more data than this machine has memory
    available for; a logits dump's ``logits`` (T, V) against its ``ids`` (T,) and the model's V."""
    for name, (shape, itemsize, kind) in shapes.items():
        if math.prod(n for n in shape if n) * itemsize >= 2 ** 63:  # numpy refuses it even when an axis is 0
            raise Lfm2npError(f"{path}: array {shown(name)} has shape {list(shape)}, beyond what an array can hold")
        if name in ("ids", "tokens", "prefill") or holds_integers(name):
            allowed, want = "iuf", "integers"
        elif name in ("logits", "embeddings") or is_trace_name(name):
            allowed, want = "f", "floating-point numbers"
        else:  # a tensor the diagnosis does not read (llama.cpp's argsort, an attention mask): any number
            allowed, want = "biuf", "numbers"
        if kind not in allowed:
            raise Lfm2npError(f"{path}: array {shown(name)} has dtype kind {shown(kind)}; expected {want}")
    need = sum(math.prod(shape) * size for shape, size, _ in shapes.values())
    if need > available_memory():
        raise Lfm2npError(f"{path}: the dump holds {need} bytes of arrays, more than the memory available")
    if "logits" in shapes:
        logits = shapes["logits"][0]
        if len(logits) != 2:
            raise Lfm2npError(f"{path}: logits must have shape (T, V); got {list(logits)}")
        if not ids_given and "ids" in shapes and shapes["ids"][0] != logits[:1]:
            raise Lfm2npError(f"{path}: logits have {logits[0]} rows but ids has shape {list(shapes['ids'][0])}")
        if vocab_size is not None and logits[1] != vocab_size:
            raise Lfm2npError(f"{path}: logits have {logits[1]} columns; the model's vocabulary is {vocab_size}")


def load_dump(path: "str | os.PathLike[str]", ids: Sequence[int] | None = None, prefill: int | None = None,
              vocab_size: int | None = None) -> Dump:
    """Read a dump file (see the module docstring). ``ids`` / ``prefill`` override what the file says; with
    ``vocab_size`` a logits dump's width is checked before its logits are read. The file is untrusted: sizes
    and shapes are checked from its headers before anything is read, and safetensors files are read as
    :meth:`lfm2np.oracle.trace.Trace.load` reads traces (pread, no memory map)."""
    path = _dump_file(path)
    arrays, meta = read_arrays(path, ids is not None, vocab_size)
    src = str(path)
    if "embeddings" in arrays:
        if "logits" in arrays or "tokens" in arrays:
            raise Lfm2npError(f"{path}: holds 'embeddings' and {'logits' if 'logits' in arrays else 'tokens'}; a dump "
                              f"is one kind: split it into two files")
        if "ids" not in arrays and ids is None:
            raise Lfm2npError(f"{path}: an embeddings dump needs 'ids' (the rows the embeddings are for)")
        return embeddings_dump(arrays["ids"] if ids is None else ids, arrays["embeddings"],
                               arrays.get("attention_mask"), src)
    if "logits" in arrays and "tokens" in arrays:
        raise Lfm2npError(f"{path}: holds both 'logits' and 'tokens'; a dump is either a logits dump (ids + logits) "
                          f"or a token stream (ids + tokens): split it into two files")
    if "ids" in arrays and ids is None:
        _check_ids(path, "ids", arrays["ids"], vocab_size)
    elif ids is not None:  # the ids given for the dump: the same check, naming them as given
        _check_ids(path, "the ids given", _int_array(ids, f"{path}: the ids given"), vocab_size)
    if "tokens" in arrays:
        _check_ids(path, "tokens", arrays["tokens"], vocab_size)
    if "logits" in arrays:
        if ids is None and "ids" not in arrays:
            raise Lfm2npError(f"{path}: a logits dump needs 'ids' (the T ids the logits are for)")
        _check_float32_range(path, "logits", arrays["logits"])
        return _positions(path, logits_dump(arrays["ids"] if ids is None else ids, arrays["logits"],
                                            prefill if prefill is not None else arrays.get("prefill"), src))
    if "tokens" in arrays:
        if ids is None and "ids" not in arrays:
            raise Lfm2npError(f"{path}: a token stream needs 'ids' (the prompt before the tokens)")
        return _positions(path, token_stream(arrays["ids"] if ids is None else ids, arrays["tokens"],
                                             prefill if prefill is not None else arrays.get("prefill"), src))
    return _positions(path, trace_dump(Trace(arrays, meta if isinstance(meta, dict) else {}), ids, prefill, src))


def read_arrays(path: "str | os.PathLike[str]", ids_given: bool = False, vocab_size: int | None = None) \
        -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The arrays of an ``.npz`` or ``.safetensors`` file and its metadata (a safetensors trace's), read as an
    untrusted file: sizes, kinds and shapes checked from the headers before anything is read (see
    :func:`load_dump`); ``ids_given``: the caller supplies the ids (a logits array's rows are not checked against
    an ``ids`` array)."""
    path = _dump_file(path)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        _check_shapes(path, _npz_shapes(path), ids_given, vocab_size)
        try:
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in f.files}
        except Exception as e:  # zipfile and format errors alike (the headers were read above)
            raise Lfm2npError(f"{path}: not a readable .npz file ({e})") from None
        return arrays, {}
    if suffix == ".safetensors":
        header = SafetensorsFile(path, dtypes=tuple(STORAGE))
        _check_shapes(path, {k: (i.shape, 4 if i.dtype == "BF16" else STORAGE[i.dtype].itemsize,  # bf16 widens
                                 "f" if i.dtype == "BF16" else STORAGE[i.dtype].kind)
                             for k, i in header.tensors.items()}, ids_given, vocab_size)
        trace = Trace.load(path)
        return dict(trace.tensors), trace.meta
    raise Lfm2npError(f"{path}: a dump is an .npz or a .safetensors file")


def _positions(path: Path, dump: Dump) -> Dump:
    """``dump``, its ``prefill`` checked against the positions it covers (where the backend's second call began:
    after the first position, before the last; a token stream's last token was fed to no call)."""
    last = dump.length + (dump.kind == "tokens")
    if dump.prefill is not None and not 0 < dump.prefill < last:
        raise Lfm2npError(f"{path}: prefill {dump.prefill} is outside the positions of the dump (1 .. {last - 1})")
    return dump


def _dump_file(path: "str | os.PathLike[str]") -> Path:
    """``path`` if it is a regular file; otherwise an error saying what it is (a directory, a FIFO, a loop of
    links, nothing), found without opening it (opening a FIFO would wait for a writer)."""
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise Lfm2npError(f"a dump is the path of an .npz or a .safetensors file; got {shown(path)}")
    path = Path(path)
    what = file_kind(path)
    if what == "missing":
        raise Lfm2npError(f"{path}: no such dump file")
    if what == "a loop of symbolic links" or (what or "").startswith("unreadable"):
        raise Lfm2npError(f"{path}: cannot read the dump file ({what})")
    if what is not None:
        raise Lfm2npError(f"{path}: is {what}; a dump is an .npz or a .safetensors file")
    return path


def _check_ids(path: Path, name: str, values: np.ndarray, vocab_size: int | None) -> None:
    """A dump's ``ids`` / ``tokens``: token ids inside the model's vocabulary (when it is known)."""
    a = np.asarray(values)
    if vocab_size is None or a.dtype.kind not in "iuf" or not a.size:
        return  # the type and shape are checked, naming the file, where the dump is built
    bad = ~((a >= 0) & (a < vocab_size))
    if bad.any():
        first = a.reshape(-1)[np.argmax(bad.reshape(-1))].item()
        raise Lfm2npError(f"{path}: {name} holds {shown(first)}, outside the "
                          f"model's vocabulary (0..{vocab_size - 1})")


def _check_float32_range(path: Path, name: str, values: np.ndarray) -> None:
    """Logits wider than float32 must fit it: compared in float32, a float64 1e300 would become the backend's
    own infinity, silently."""
    a = np.asarray(values)
    if a.dtype.kind != "f" or a.dtype.itemsize <= 4:
        return
    big = np.isfinite(a) & (np.abs(a) > np.finfo(np.float32).max)
    if big.any():
        where = np.unravel_index(int(np.argmax(big)), a.shape)
        raise Lfm2npError(f"{path}: array {name!r} holds {shown(a[where].item())} at {list(map(int, where))}, beyond "
                          f"float32 range ({np.finfo(np.float32).max:.4g}); logits are compared in float32")


# ------------------------------------------------------------------------------------- names
def align(trace: Trace, reference: "dict[str, np.ndarray]", source: str = "dump") \
        -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors of a backend's ``trace`` under lfm2np's names (whatever tool named them:
    :func:`lfm2np.oracle.compare.canonical_tensors`, which refuses one value under two names with other numbers),
    in ``reference``'s forward order, shaped as the reference's (axes of length 1 dropped or added, the axes after
    the first split alike), with each layer's expert choices in a canonical order; and the names left out, each
    with the reason."""
    tensors, unknown = canonical_tensors(trace, source)
    skipped = {key: "not an intermediate of any LFM model" for key in unknown}
    out: dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        if name not in reference:
            skipped[name] = "not an intermediate of this model"
            continue
        value, want = np.asarray(value), reference[name]
        if value.shape != want.shape:
            value, _ = aligned(value, want)
            if value.shape != want.shape:
                skipped[name] = f"shape {list(np.shape(tensors[name]))}, the reference's is {list(want.shape)}"
                continue
        out[name] = value
    order = {n: i for i, n in enumerate(reference)}
    return canonical_routing({n: out[n] for n in sorted(out, key=order.__getitem__)}), skipped


def canonical_routing(tensors: "dict[str, np.ndarray]") -> dict[str, np.ndarray]:
    """``tensors`` with each layer's chosen experts in increasing order per token and its per-choice values in
    the same order (backends list the top-k in different orders). A new dict; other tensors are shared."""
    for layer in sorted({layer_of(n) for n in tensors if n.endswith(".selected_experts")}):
        tensors = canonical_order(tensors, layer)
    return dict(tensors)


def read_npz(path: "str | os.PathLike[str]") -> dict[str, np.ndarray]:
    """Every array of an untrusted ``.npz`` file, read as :func:`load_dump` reads one (headers checked first:
    no pickles, bounded inflation, real numbers, the memory available), whatever the arrays mean."""
    path = _dump_file(path)
    if path.suffix.lower() != ".npz":
        raise Lfm2npError(f"{path}: expected an .npz file")
    _check_shapes(path, _npz_shapes(path), True, None)
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except Exception as e:  # zipfile and format errors alike (the headers were read above)
        raise Lfm2npError(f"{path}: not a readable .npz file ({e})") from None
