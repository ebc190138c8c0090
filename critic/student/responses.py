"""Frozen-student responses: generate once from the actor, cache on disk, reuse in every trial.

Used when a data file has no student column (or `student.regenerate` is set) and
`student.model` (a local causal LM) or `student.endpoint` (an OpenAI-compatible
server) is configured. Responses are cached under `<data.cache_dir>/students/<key>/`,
where the key digests the actor (path + weights digest, or endpoint + model name),
the prompts and the generation parameters. They are written in parts as they come,
so an interrupted run resumes where it stopped; once complete, the original file
plus the student column is written beside them and handed to the data pipeline.
A file lock makes concurrent workers wait for one generation instead of repeating it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from critic.config import DataConfig, SpecError, StudentConfig
from critic.data import DataError, file_digest, prompt_messages, prompt_text
from critic.student_sources import (StudentGenerationError, generate_with_endpoint, generate_with_model,
                                    masked_url)

CACHE_VERSION = 1  # bump when the generation or cache layout changes: every key changes with it
# Counts of real generation work in this process (tests read them): model.generate calls,
# HTTP request attempts (retries included), and responses produced.
GENERATION_COUNTS = {"batches": 0, "requests": 0, "responses": 0}
ProgressHook = Callable[[int, int], None]  # (responses done, responses in total)


@dataclass(frozen=True)
class StudentResponses:
    path: Path  # parquet: the original columns plus the student column (and <student_key>_finish_reason)
    lineage: dict[str, str]  # source, actor, generation, cache_key


def student_source(cfg: StudentConfig) -> str | None:
    """'model', 'endpoint' or None when no student source is configured."""
    return "model" if cfg.model else "endpoint" if cfg.endpoint else None


def needs_generation(path: Path, data_cfg: DataConfig, student: StudentConfig) -> bool:
    """True when a source is configured and the file lacks the student column, or regenerate is set."""
    if student_source(student) is None:
        return False
    return student.regenerate or data_cfg.student_key not in pq.read_schema(path).names


_MEMORY: dict[tuple, StudentResponses | None] = {}


def student_responses(path: Path, data_cfg: DataConfig, student: StudentConfig, progress: bool | None = None,
                      on_progress: ProgressHook | None = None, chunk_rows: int = 512) -> StudentResponses | None:
    """The file with generated student responses, or None when its own student column is used.

    Generates only what neither this process nor the disk cache already holds.
    `progress`: tqdm bar (None = only on a terminal); `on_progress(done, total)` after every batch.
    """
    stat = path.stat()
    memo_key = (str(path), stat.st_size, stat.st_mtime_ns, student, data_cfg.prompt_key, data_cfg.student_key,
                str(Path(data_cfg.cache_dir).resolve()))
    if memo_key not in _MEMORY:
        if needs_generation(path, data_cfg, student):
            _MEMORY[memo_key] = _cached_or_generated(path, data_cfg, student, progress, on_progress, chunk_rows)
        else:
            _MEMORY[memo_key] = None
    return _MEMORY[memo_key]


def _read_prompts(path: Path, prompt_key: str) -> list:
    names = pq.read_schema(path).names
    if prompt_key not in names:
        raise DataError(f"{path}: missing prompt column {prompt_key!r}; the file has {names}. "
                        f"Set data.prompt_key to the right name.")
    return pq.read_table(path, columns=[prompt_key]).column(prompt_key).to_pylist()


def _usable(value) -> bool:
    """A prompt the pipeline keeps (read_pairs drops null prompts, so no response is made for them)."""
    if value is None or (isinstance(value, float) and value != value):
        return False
    prompt_text(value)  # raises DataError naming the problem for any other type
    return True


def _generation_params(student: StudentConfig) -> dict:
    return dict(max_new_tokens=student.max_new_tokens, temperature=student.temperature, top_p=student.top_p,
                seed=student.seed)


def _cached_or_generated(path: Path, data_cfg: DataConfig, student: StudentConfig, progress: bool | None,
                         on_progress: ProgressHook | None, chunk_rows: int) -> StudentResponses:
    prompts = _read_prompts(path, data_cfg.prompt_key)
    rows = [i for i, value in enumerate(prompts) if _usable(value)]
    messages = {i: prompt_messages(prompts[i]) for i in rows}
    prompts_digest = hashlib.sha256(json.dumps([messages.get(i) for i in range(len(prompts))],
                                               sort_keys=True).encode()).hexdigest()[:16]
    source = student_source(student)
    root = Path(data_cfg.cache_dir) / "students"
    actor = _actor_identity(student, root)
    params = _generation_params(student)
    key = hashlib.sha256(json.dumps([CACHE_VERSION, source, actor, prompts_digest, params],
                                    sort_keys=True).encode()).hexdigest()[:20]
    lineage = {"source": source, "actor": actor, "generation": json.dumps(params, sort_keys=True), "cache_key": key}
    folder = root / key
    out = folder / f"with-student-{data_cfg.student_key}-{file_digest(path)}.parquet"
    if out.exists():
        return StudentResponses(out, lineage)
    folder.mkdir(parents=True, exist_ok=True)
    with _exclusive(folder / ".lock"):
        if out.exists():  # another worker finished it while this one waited
            return StudentResponses(out, lineage)
        store = ResponseStore(folder, chunk_rows)
        todo = [i for i in rows if i not in store.done]
        if todo:
            _generate(todo, messages, student, store, len(rows), progress, on_progress)
        store.compact()
        (folder / "lineage.json").write_text(json.dumps({**lineage, "prompts_digest": prompts_digest,
                                                         "rows": len(rows)}, indent=1))
        _write_with_student(path, data_cfg.student_key, store.done, out)
    return StudentResponses(out, lineage)


def _generate(todo: list[int], messages: dict[int, list[dict]], student: StudentConfig, store: "ResponseStore",
              total: int, progress: bool | None, on_progress: ProgressHook | None) -> None:
    """Generate the rows `todo` into `store`; a failure keeps what was made and says how to resume."""
    source = student_source(student)
    where = student.model if source == "model" else f"{masked_url(student.endpoint)} ({student.model_name})"
    print(f"[student] generating {len(todo)} of {total} responses with {where}"
          + (f" ({total - len(todo)} already cached)" if len(todo) < total else ""))
    bar = tqdm(total=total, initial=total - len(todo), unit="resp", desc="student responses", dynamic_ncols=True,
               disable=None if progress is None else not progress)

    def on_batch(rows: list[int], texts: list[str], reasons: list[str]) -> None:
        GENERATION_COUNTS["responses"] += len(rows)
        store.add(rows, texts, reasons)
        bar.update(len(rows))
        if on_progress is not None:
            on_progress(len(store.done), total)

    generate = generate_with_model if source == "model" else generate_with_endpoint
    try:
        generate(student, {i: messages[i] for i in todo}, on_batch, GENERATION_COUNTS)
    except StudentGenerationError as exc:
        store.flush()
        raise StudentGenerationError(f"{exc}. {len(store.done)} of {total} responses are saved in {store.folder}; "
                                     f"rerun the same command to resume from there") from None
    finally:
        store.flush()  # whatever happens (Ctrl-C included), nothing already generated is lost
        bar.close()
    empty = sum(1 for text, _ in store.done.values() if not text.strip())
    cut = sum(1 for _, reason in store.done.values() if reason == "length")
    print(f"[student] done: {len(store.done)} responses in {store.folder} ({empty} empty, {cut} cut at "
          f"max_new_tokens={student.max_new_tokens})")


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
        tmp = self.folder / f".{name}.tmp{os.getpid()}"
        pq.write_table(table, tmp)
        tmp.replace(self.folder / name)  # atomic: a reader never sees half a part

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


def _write_with_student(source: Path, student_key: str, done: dict[int, tuple[str, str]], out: Path) -> None:
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
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    pq.write_table(table, tmp)
    tmp.replace(out)


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive file lock; a second process waits here (and says so) until the first is done."""
    with open(lock_path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"[student] another process is generating these responses; waiting for it ({lock_path})")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


_DIGEST_LOCK = threading.Lock()


def _actor_identity(student: StudentConfig, root: Path) -> str:
    """'<resolved dir>@<digest of its files>' for a local model, '<endpoint>#<model_name>' for a server."""
    if student.endpoint:
        return f"{masked_url(student.endpoint)}#{student.model_name}"
    path = Path(student.model).expanduser().resolve()
    if not path.is_dir():
        raise SpecError(f"student.model {str(path)!r} is not a directory; point it at a local checkpoint of the "
                        f"actor (config, weights and tokenizer files)")
    return f"{path}@{actor_digest(path, root / 'actor_digests.json')}"


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
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
        memo[str(path)] = {"files": signature, "digest": h.hexdigest()[:16]}
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_file.with_name(f".{memo_file.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(memo))
        tmp.replace(memo_file)
        return memo[str(path)]["digest"]
