"""Atomic writes: the one place that knows how to replace a file or a directory so that a reader, or
a run killed half-way, sees the old version or the new one and never a mixture.

    atomic_write_text(path, text)         small files (JSON, markdown)
    with atomic_file(path) as tmp: ...    what a library writes to a path (safetensors, PNG, stream)
    with atomic_dir(path) as tmp: ...     a whole directory (a checkpoint), swapped in when complete

A file goes to a uniquely named temporary beside its target (same directory, so the rename stays on
one file system), is flushed to disk (fsync), renamed over the target, and the directory's entry is
flushed too. A failure inside the `with` block removes the temporary and leaves the target as it
was.
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace `path` with `data`."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Replace `path` with `text`, UTF-8 encoded."""
    atomic_write_bytes(path, text.encode("utf-8"))


@contextmanager
def atomic_file(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; on success it becomes
    `path`, on an error it is removed. suffix: how the temporary's name ends (for a writer that
    checks the extension)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory beside `path` to fill; on success it replaces `path`
    (whose old contents are deleted), on an error it is removed and `path` is left as it was. A
    directory has one writer: the leftovers of one killed while writing `path` are deleted first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.old"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        for file in sorted(p for p in tmp.rglob("*") if p.is_file()):
            _fsync_file(file)
        _fsync_dir(tmp)
        if path.exists():  # moved aside first: the gap without `path` is two renames long
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(path.parent)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (POSIX; other systems have no directory handles to flush)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
