"""The on-disk cache of student responses: parquet parts appended by atomic renames, and actor digests."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from critic.files import atomic_write, atomic_write_text


class ResponseStore:
    """Responses of one cache key: parquet parts (row, response, finish_reason) appended by atomic renames."""

    def __init__(self, folder: Path, chunk_rows: int, flush_seconds: float = 60.0) -> None:
        self.folder, self.chunk_rows, self.flush_seconds = folder, chunk_rows, flush_seconds
        self.done: dict[int, tuple[str, str]] = {}  # row -> (response, finish_reason)
        for part in self._parts():
            table = pq.read_table(part).to_pydict()
            self.done.update(zip(table["row"], zip(table["response"], table["finish_reason"])))
        self._pending: list[int] = []
        self._last_flush = time.monotonic()

    def _parts(self) -> list[Path]:
        return sorted(self.folder.glob("part-*.parquet"))

    def add(self, rows: list[int], texts: list[str], reasons: list[str]) -> None:
        for row, text, reason in zip(rows, texts, reasons):
            self.done[row] = (text, reason)
        self._pending.extend(rows)
        if len(self._pending) >= self.chunk_rows or time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def _write(self, rows: list[int], name: str) -> None:
        table = pa.table({"row": pa.array(rows, pa.int64()),
                          "response": pa.array([self.done[r][0] for r in rows], pa.string()),
                          "finish_reason": pa.array([self.done[r][1] for r in rows], pa.string())})
        atomic_write(self.folder / name, lambda tmp: pq.write_table(table, tmp))  # a reader never sees half a part

    def _next_name(self) -> str:
        parts = self._parts()
        return f"part-{int(parts[-1].stem.split('-')[1]) + 1 if parts else 0:06d}.parquet"

    def flush(self) -> None:
        if self._pending:
            self._write(self._pending, self._next_name())
            self._pending = []
        self._last_flush = time.monotonic()

    def compact(self) -> None:
        """Merge every part into one, written before the others are removed (a crash leaves duplicates only)."""
        self.flush()
        parts = self._parts()
        if len(parts) > 1:
            self._write(sorted(self.done), self._next_name())
            for part in parts:
                part.unlink()


def write_with_student(source: Path, student_key: str, done: dict[int, tuple[str, str]], out: Path) -> None:
    """The source table with the student column (null where the prompt is null) and its finish reasons."""
    table = pq.read_table(source)
    reason_key = f"{student_key}_finish_reason"
    for name in (student_key, reason_key):  # regenerate: the generated column replaces the file's own
        if name in table.column_names:
            table = table.drop_columns([name])
    table = table.append_column(student_key, pa.array([done.get(i, (None, None))[0] for i in range(len(table))],
                                                      pa.string()))
    table = table.append_column(reason_key, pa.array([done.get(i, (None, None))[1] for i in range(len(table))],
                                                     pa.string()))
    atomic_write(out, lambda tmp: pq.write_table(table, tmp))


_DIGEST_LOCK = threading.Lock()


def actor_digest(path: Path, memo_file: Path) -> str:
    """sha256 of every file in a model directory (weights, config, tokenizer), memoised by size and mtime."""
    files = sorted(p for p in path.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    signature = [[str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    with _DIGEST_LOCK:
        memo = json.loads(memo_file.read_text()) if memo_file.exists() else {}
        entry = memo.get(str(path))
        if entry and entry["files"] == signature:
            return entry["digest"]
        h = hashlib.sha256()
        for p in files:
            h.update(f"{p.relative_to(path)}\x00{p.stat().st_size}\x00".encode())
            with open(p, "rb") as fh:
                hashlib.file_digest(fh, lambda: h)  # continues h with the file's bytes, in chunks
        memo[str(path)] = {"files": signature, "digest": h.hexdigest()[:16]}
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(memo_file, json.dumps(memo))
        return memo[str(path)]["digest"]
