"""The output rule of the commands that write files (docs/cli.md, "Outputs never overwrite inputs"): no output is
a file the command reads or lies inside a checkpoint directory it reads, whatever name leads there (links,
``..``, relative names, hard links, mounts); an existing output is replaced only with ``--force``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Sequence

from ..errors import Lfm2npError
from ..io.files import identity, overwrites
from ..io.hub import resolve


def _real(path: "str | os.PathLike[str]") -> Path:
    """``path`` with symbolic links, ``..`` and the working directory resolved (it need not exist)."""
    return Path(os.path.realpath(Path(path).expanduser()))


def read_paths(model: str) -> tuple[set[Path], set[Path]]:
    """What a command reads for a MODEL argument: ``(files, directories)``, resolved. A checkpoint directory
    (a repo id's cached snapshot too) is read as a whole, and each of its files as what it links to (a cached
    snapshot's files are links to blobs); a file (a .gguf) with its .json sibling when there is one."""
    path = Path(model).expanduser()
    if path.is_file():
        sibling = path.with_suffix(".json")
        return {_real(path)} | ({_real(sibling)} if os.path.lexists(sibling) else set()), set()
    try:
        directory = resolve(model)
    except Lfm2npError:
        return set(), set()  # nothing readable: loading says so
    files = {_real(f) for f in directory.iterdir() if f.is_file()} if directory.is_dir() else set()
    return files, {_real(directory)}


def _identities(files: set[Path], directories: set[Path]) -> tuple[set[tuple[int, int]], set[tuple[int, int]]]:
    """:func:`read_paths` as the files themselves (device and inode), whatever names lead to them."""
    return ({i for i in map(identity, files) if i is not None},
            {i for i in map(identity, directories) if i is not None})


def check_outputs(outputs: Sequence[Path], model: str | None, force: bool, directory: bool = False,
                  reads: Sequence[Path] = ()) -> None:
    """The output rule of every command that writes (docs/cli.md): no output may be a file the command reads or
    lie inside a checkpoint directory it reads (``model``: :func:`read_paths`; ``reads``: its other input files,
    such as the traces compare reads), whatever links, ``..`` or relative names lead there; an output file that
    exists (with ``directory``: an output directory that is not empty) is replaced only with ``--force``. Checked
    before anything is loaded or computed; an error names the path."""
    files, directories = read_paths(model) if model is not None else (set(), set())
    inputs = {_real(p): p for p in reads}
    file_ids, directory_ids = _identities(files | set(inputs), directories)
    for out in outputs:
        real = _real(out)
        if real in inputs:
            raise Lfm2npError(f"{out}: is a file this command reads ({inputs[real]}); choose another output")
        if real in files:
            raise Lfm2npError(f"{out}: is a file this command reads (MODEL {model}); choose another output")
        inside = next((d for d in directories if real == d or d in real.parents), None)
        if inside is not None:
            raise Lfm2npError(f"{out}: is inside the checkpoint directory {inside}, which this command reads; "
                              f"choose an output outside it")
        why = overwrites(out, file_ids, directory_ids, into=directory)  # the same files under other names
        if why is not None:
            raise Lfm2npError(f"{out}: {why}" + (f" (MODEL {model})" if model is not None else "")
                              + "; choose another output")
        if not directory and real.is_dir():  # --force replaces a file, never a directory (written half otherwise)
            raise Lfm2npError(f"{out}: is a directory; the output is a file (choose another name)")
        if force:
            continue
        if directory and real.is_dir() and any(real.iterdir()):
            raise Lfm2npError(f"{out}: the output directory is not empty; give --force to write into it anyway")
        if not directory and os.path.lexists(out):
            raise Lfm2npError(f"{out}: exists; give --force to replace it")


def add_force_argument(p: argparse.ArgumentParser, what: str = "an existing output file") -> None:
    p.add_argument("--force", action="store_true", help=f"replace {what} (never a file the command reads, nor "
                                                          "anything inside a checkpoint directory it reads)")


def write_page(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all: a temporary file beside it, then renamed over it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise Lfm2npError(f"{path}: cannot write it ({e.strerror or e})") from None
