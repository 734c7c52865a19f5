"""Files written whole or not at all, and their checksums.

Every file histo-dist writes for a user (shards, manifests, checkpoints, metrics, predictions,
plots, decompressed sources, synthetic data) goes through `atomic_path`: the bytes go to a
temporary name next to the final one (`.NAME.<random>.partial`), are flushed to disk, and only then
renamed over the final name. A kill or a full disk therefore never leaves a half-written file
under a final name, and a leftover temporary file is recognisable by its name (`convert` removes
those of a killed run before it continues).

`check_input` and `check_output` check a path the user gave before any work is done, so that a file
where a folder belongs, a missing file, or a folder that cannot be read or written is one line naming
the option and the path, not a traceback after minutes of work.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Literal

from histo_dist.errors import HistoDistError

PARTIAL_SUFFIX = ".partial"


class PathError(HistoDistError):
    """A path the user gave that is missing, the wrong kind of thing, unreadable or unwritable."""


def partial_name(final: Path) -> Path:
    """A fresh temporary name next to `final`: `.NAME.<random>.partial`."""
    return final.with_name(f".{final.name}.{uuid.uuid4().hex[:12]}{PARTIAL_SUFFIX}")


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `final` to write (by any means: open, h5py, savefig); when the
    block succeeds it is flushed to disk and renamed to `final`, else deleted."""
    final = Path(final)
    tmp = partial_name(final)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)  # fsync through a new descriptor: the writer may have closed its own
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_open(final: str | os.PathLike, mode: str = "wb", **kwargs) -> Iterator[IO]:
    """`open(final, mode)` that only takes the final name once the block has written everything."""
    with atomic_path(final) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Write `data` (text as UTF-8) to `path` atomically."""
    with atomic_open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_input(path: str | os.PathLike, what: str, kind: Literal["file", "folder", "any"] = "any") -> Path:
    """`path` exists, is a `kind`, and can be read (a folder: listed); else a `PathError` naming `what`."""
    path = Path(path)
    if not path.exists():
        raise PathError(f"{what} {path}: no such {'file or folder' if kind == 'any' else kind}")
    if kind == "file" and path.is_dir():
        raise PathError(f"{what} {path}: a folder, expected a file")
    if kind == "folder" and not path.is_dir():
        raise PathError(f"{what} {path}: a file, expected a folder")
    if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
        raise PathError(f"{what} {path}: not readable (permission denied)")
    return path


def check_output(path: str | os.PathLike, what: str, kind: Literal["file", "folder"]) -> Path:
    """`path` can be written as a `kind`: it is one already, or can be created, in a writable folder."""
    path = Path(path)
    if path.exists() and kind == "folder" and not path.is_dir():
        raise PathError(f"{what} {path}: a file, expected a folder")
    if path.is_dir() and kind == "file":
        raise PathError(f"{what} {path}: a folder, expected a file name")
    folder = path if path.is_dir() else path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise PathError(f"{what} {path}: cannot be created, {folder} is a file")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PathError(f"{what} {path}: cannot write in {folder} (permission denied)")
    return path
