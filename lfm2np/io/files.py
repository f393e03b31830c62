"""The one checked-file reader: positioned reads of a file that may change under us, and strict JSON.

Every tensor byte lfm2np reads from a safetensors or GGUF file goes through a :class:`CheckedFile`:

- **positioned reads, not a memory map.** A memory map of a file that shrinks after opening turns the next
  access past its new end into SIGBUS, which kills the process. So bytes are read with ``os.preadv`` into a
  fresh buffer; a short read (the file shrank in between) is an error naming the file and what was being
  read, never a signal. The file stays open, so a file replaced by renaming another over it keeps being read
  from the original, which is still the data that was checked.
- **the file-changed check.** Before each read of tensor data the file must be the one that was checked: same
  device and inode, same size, same modification time and same status-change time (``st_ctime``). The last one
  matters: a file rewritten in place can get its old size and modification time back (``os.utime`` restores
  the mtime), but the kernel sets ctime to now on every write and on every ``utime``, and nothing sets it back.
  One change of ctime is let through: the file lost links since it was opened (it was deleted, or another file
  was renamed over it, as a cache update does), which changes ctime but not one byte of the open file. A
  changed file is an error ("changed since it was loaded"), never silently different logits. (Not caught: a
  process that still had the file open for writing, writes into it and then deletes it.)
- **read-ahead.** :meth:`CheckedFile.will_need` asks the kernel to read a range into the page cache in the
  background (``posix_fadvise(WILLNEED)``; nothing where the platform has no such call).
- **row runs.** :meth:`CheckedFile.read_runs` reads the byte runs of chosen rows of a tensor, one read per run
  of consecutive rows.

:func:`parse_json` / :func:`read_json` are the one strict JSON reader: UTF-8, no key twice in one object (Python's
``json`` keeps the last one silently), nesting the parser can follow, a size bound, and errors naming the file.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import threading
import weakref
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import Lfm2npError

_MAX_READ = 1 << 30  # largest single read (Linux caps one read at ~2 GiB)
#: the most bytes :func:`read_json` reads (a config, an index, a tokenizer config: all far smaller)
MAX_JSON_BYTES = 100_000_000


class CheckedFile:
    """A regular file opened read-only, whose identity is checked before tensor data is read from it."""

    def __init__(self, path: "str | os.PathLike[str]", what: str = "file"):
        self.path = Path(path)
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
        except OSError as e:
            raise Lfm2npError(f"{self.path}: cannot open the {what} ({e.strerror or e})") from None
        self._fd: int | None = fd
        self._closer = weakref.finalize(self, os.close, fd)
        self._lock = threading.Lock()  # only for the seek+read fallback (no pread on Windows)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            self.close()
            raise Lfm2npError(f"{self.path}: not a regular file")
        self.size = st.st_size
        self._identity, self._links = _identity(st), st.st_nlink

    # ------------------------------------------------------------------------------------ lifetime
    @property
    def closed(self) -> bool:
        return self._fd is None

    def close(self) -> None:
        if self._fd is not None:
            self._fd = None
            self._closer()

    def fileno(self) -> int:
        if self._fd is None:
            raise Lfm2npError(f"{self.path}: the file has been closed")
        return self._fd

    # ------------------------------------------------------------------------------------ checks
    def size_now(self) -> int:
        """The file's size at this moment (it may have changed since opening)."""
        return os.fstat(self.fileno()).st_size

    def check_unchanged(self, what: str | None = None) -> None:
        """Raise unless the file is still the one that was checked (see the module docstring); ``what`` (e.g.
        the tensor about to be read) is named in the message."""
        st = os.fstat(self.fileno())
        identity = _identity(st)
        if identity != self._identity and not (identity[:4] == self._identity[:4] and st.st_nlink < self._links):
            how = (f"its size went from {self.size} to {st.st_size} bytes" if st.st_size != self.size
                   else "it was modified")
            raise Lfm2npError(f"{self.path}: {f'{what}: ' if what else ''}the file changed since it was loaded "
                              f"({how}); load the model again")

    # ------------------------------------------------------------------------------------ reads
    def read_into(self, view: memoryview, offset: int, what: str) -> None:
        """Fill ``view`` with the file's bytes at ``offset``; an error naming ``what``, never a signal, if the
        file ends first."""
        fd, n, done = self.fileno(), len(view), 0
        while done < n:
            chunk = view[done:done + _MAX_READ]
            try:
                if hasattr(os, "preadv"):
                    got = os.preadv(fd, [chunk], offset + done)
                else:
                    with self._lock:
                        os.lseek(fd, offset + done, os.SEEK_SET)
                        data = os.read(fd, len(chunk))
                    chunk[:len(data)] = data
                    got = len(data)
            except OSError as e:
                raise Lfm2npError(f"{self.path}: cannot read {what} ({e.strerror or e})") from None
            if got == 0:
                raise Lfm2npError(f"{self.path}: {what}: read {done} of {n} bytes at offset {offset}: the file "
                                  f"ends at {self.size_now()} bytes (truncated or changed since it was opened?)")
            done += got

    def read_bytes(self, offset: int, n: int, what: str) -> bytes:
        """Exactly ``n`` bytes at ``offset``, or an error naming ``what`` if the file ends sooner."""
        out = np.empty(n, np.uint8)
        self.read_into(memoryview(out), offset, what)
        return out.tobytes()

    def read_runs(self, out: np.ndarray, runs: "Sequence[tuple[int, int, str]]") -> None:
        """Fill the uint8 buffer ``out`` with byte runs ``(offset, nbytes, what)``, in order, one read each."""
        view, pos = memoryview(out.reshape(-1).view(np.uint8)), 0
        for offset, nbytes, what in runs:
            self.read_into(view[pos:pos + nbytes], offset, what)
            pos += nbytes

    def will_need(self, offset: int, nbytes: int) -> None:
        """Hint the kernel to read these bytes into the page cache now, in the background, if it can."""
        if self._fd is None or not hasattr(os, "posix_fadvise") or nbytes <= 0:
            return
        try:
            os.posix_fadvise(self._fd, offset, nbytes, os.POSIX_FADV_WILLNEED)
        except OSError:  # a hint: a file system without it reads on demand as before
            pass


def _identity(st: os.stat_result) -> tuple[int, ...]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def row_runs(rows: np.ndarray, row_bytes: int, base: int, what: str) -> list[tuple[int, int, str]]:
    """The byte runs ``(offset, nbytes, what)`` of sorted, distinct row indices ``rows`` of a tensor whose rows
    are ``row_bytes`` long from file offset ``base``: one run per run of consecutive rows."""
    rows = np.asarray(rows, dtype=np.int64)
    if not rows.size:
        return []
    firsts = np.flatnonzero(np.diff(rows, prepend=-2) != 1)
    ends = [*firsts[1:].tolist(), rows.size]
    return [(base + int(rows[a]) * row_bytes, (b - a) * row_bytes, f"{what} rows {int(rows[a])}..{int(rows[b - 1])}")
            for a, b in zip(firsts.tolist(), ends)]


# --------------------------------------------------------------------------------------------- JSON
def no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads``' ``object_pairs_hook`` that refuses a key given twice in one object (Python's json keeps
    the last one silently: which one did the file's author mean?)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice in one object")
        out[key] = value
    return out


def parse_json(raw: "bytes | str", where: str, what: str) -> Any:
    """Strict JSON from UTF-8 bytes (or text): an Lfm2npError naming ``where`` for bad UTF-8, bad JSON, a key
    repeated in one object, or nesting too deep for the parser."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        return json.loads(text, object_pairs_hook=no_duplicate_keys)
    except UnicodeDecodeError as e:
        raise Lfm2npError(f"{where}: corrupt {what}: not UTF-8 (byte {e.start}: {raw[e.start:e.start + 4]!r})") \
            from None
    except RecursionError:
        raise Lfm2npError(f"{where}: corrupt {what}: JSON nested too deeply") from None
    except ValueError as e:
        raise Lfm2npError(f"{where}: corrupt {what} ({e})") from None


def read_json(path: "str | os.PathLike[str]", what: str, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """A JSON file parsed strictly (:func:`parse_json`), refused above ``max_bytes``."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise Lfm2npError(f"{path}: {size} bytes; a {what} is at most {max_bytes}")
        raw = path.read_bytes()
    except OSError as e:
        raise Lfm2npError(f"{path}: cannot read the {what} ({e.strerror or e})") from None
    return parse_json(raw, str(path), what)


# ------------------------------------------------------------------------------------- file kinds
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def file_kind(path: "str | os.PathLike[str]") -> str | None:
    """What ``path`` is when it is not a regular file, found without opening it (opening a FIFO would wait for a
    writer): ``"missing"`` when nothing is there, else ``"a directory"``, ``"a FIFO (named pipe)"``, ``"a loop of
    symbolic links"``, ... ; None for a regular file (links followed)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return "missing"
        return "a loop of symbolic links" if e.errno == errno.ELOOP else f"unreadable ({e.strerror or e})"
    except ValueError:  # a NUL in the name
        return "missing"
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def present(path: "str | os.PathLike[str]", what: str) -> bool:
    """Whether the regular file ``path`` is there (False when nothing is); an :class:`Lfm2npError` naming it and
    ``what`` it should be when something else is in its place (a directory, a FIFO, a loop of links): never told
    as missing, nor read as absent."""
    kind = file_kind(path)
    if kind not in (None, "missing"):
        raise Lfm2npError(f"{path}: is {kind}, not a regular file; expected {what}")
    return kind is None


# ------------------------------------------------------------------------------------- outputs
def identity(path: "str | os.PathLike[str]") -> tuple[int, int] | None:
    """``(device, inode)`` of what ``path`` names, links followed: the file itself whatever name leads to it (a
    hard link, a bind mount, a link); None when nothing is there or it cannot be looked at."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def read_identities(path: "str | os.PathLike[str]") -> tuple[set[tuple[int, int]], set[tuple[int, int]]]:
    """What reading ``path`` reads, as :func:`identity` values ``(files, directories)``: a directory (a checkpoint)
    and each regular file in it; or a file."""
    p = Path(path)
    if p.is_dir():
        try:
            files = {identity(f) for f in p.iterdir() if f.is_file()}
        except OSError:
            files = set()
        return {i for i in files if i is not None}, {i for i in (identity(p),) if i is not None}
    return {i for i in (identity(p),) if i is not None}, set()


def overwrites(out: "str | os.PathLike[str]", files: set[tuple[int, int]], directories: set[tuple[int, int]],
               into: bool = False) -> str | None:
    """Why writing ``out`` would write over something read (``files`` and ``directories``: :func:`read_identities`),
    whatever name it is given, else None: ``out`` is one of the files (a hard link to it is the same file), or
    lies in one of the directories (through any link or mount). With ``into`` (``out`` a directory written into),
    a file already in it that is one of the files counts too."""
    real = Path(os.path.realpath(Path(out).expanduser()))
    if identity(real) in files:
        return "is a file this command reads (under another name: a hard link or a link)"
    for place in (real, *real.parents):
        if identity(place) in directories:
            return f"is inside the checkpoint directory {place}, which this command reads"
    if into and real.is_dir():
        try:
            inside = next((f for f in real.iterdir() if identity(f) in files), None)
        except OSError:
            inside = None
        if inside is not None:
            return f"holds {inside.name}, which is a file this command reads (a hard link or a link to it)"
    return None
