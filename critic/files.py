"""Files shared between processes: atomic replace, content digests and an exclusive lock."""

from __future__ import annotations

import hashlib
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from filelock import FileLock, Timeout


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call `write(tmp)` on a temp file (or folder) beside `path`, then rename it to `path`.

    A reader sees the old file or the whole new one, never half of it; the temp name is per process, so
    concurrent workers never share one. A folder can only replace a missing or empty one.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    if tmp.is_dir():  # left by a crashed process of the same id
        shutil.rmtree(tmp)
    write(tmp)
    tmp.replace(path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def file_digest(path: Path) -> str:
    """sha256 of the file's bytes, first 16 hex digits."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()[:16]


@contextmanager
def exclusive(lock_path: Path, waiting: str | None = None) -> Iterator[None]:
    """Hold an exclusive lock on `lock_path` across processes; print `waiting` if another holder makes us wait."""
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if waiting:
            print(waiting)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()
