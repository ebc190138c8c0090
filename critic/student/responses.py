"""Frozen-student responses: generate once from the actor, cache on disk, reuse in every trial.

Used when a data file has no student column (or `student.regenerate` is set) and
`student.model` (a local causal LM; `demo:actor` is the demo's, built once by
critic/demo_actor.py) or `student.endpoint` (an OpenAI-compatible server) is configured.
Generation is an explicit step before any trial: `sweep.py generate`, or `sweep.py run` / `train`
before their first trial (critic/data.py `generate_students`); loading data for a trial only reads the cache and
says what to run when the responses are not there. Responses are cached under
`<data.cache_dir>/students/<key>/`,
where the key digests the actor (path + weights digest, or endpoint + model name),
the prompts and the generation parameters. They are written in parts as they come,
so an interrupted run resumes where it stopped; once complete, the original file
plus the student column is written beside them and handed to the data pipeline.
A file lock makes concurrent workers wait for one generation instead of repeating it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import pyarrow.parquet as pq
from tqdm.auto import tqdm

from critic.config import DataConfig, SpecError, StudentConfig
from critic.files import exclusive, file_digest
from critic.prompts import prompt_messages, prompt_text
from critic.redact import mask
from critic.sections import DataError
from critic.student.base import StudentGenerationError
from critic.student.cache import ResponseStore, actor_digest, write_with_student
from critic.student.endpoint import generate_with_endpoint
from critic.student.local import generate_with_model

CACHE_VERSION = 1  # bump when the generation or cache layout changes: every key changes with it
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
                      on_progress: ProgressHook | None = None, chunk_rows: int = 512, device: str = "auto",
                      generate: bool = True) -> StudentResponses | None:
    """The file with generated student responses, or None when its own student column is used.

    Generates only what neither this process nor the disk cache already holds; with `generate=False` (loading
    data for a trial) a DataError says how to generate what is missing. `device`: the spec's model.device.
    `progress`: False = no bar; True or None = a tqdm bar on a terminal only; `on_progress(done, total)` after
    every batch.
    """
    stat = path.stat()
    memo_key = (str(path), stat.st_size, stat.st_mtime_ns, student, data_cfg.prompt_key, data_cfg.student_key,
                str(Path(data_cfg.cache_dir).resolve()))
    if memo_key not in _MEMORY:
        if needs_generation(path, data_cfg, student):
            _MEMORY[memo_key] = _cached_or_generated(path, data_cfg, _resolve_demo_actor(student, data_cfg), progress,
                                                     on_progress, chunk_rows, device, generate)
        else:
            _MEMORY[memo_key] = None
    return _MEMORY[memo_key]


def _resolve_demo_actor(student: StudentConfig, data_cfg: DataConfig) -> StudentConfig:
    """`demo:actor` -> its checkpoint directory (trained once); from here on it is an ordinary local model."""
    if not (student.model or "").startswith("demo:"):
        return student
    from critic.demo_actor import resolve_student_model  # torch and transformers: only when it is used

    return dataclasses.replace(student, model=resolve_student_model(student.model, data_cfg.cache_dir))


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
                         on_progress: ProgressHook | None, chunk_rows: int, device: str,
                         generate: bool) -> StudentResponses:
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
    if not generate:
        raise DataError(f"{path} has no {data_cfg.student_key!r} column and the student's responses for it are not "
                        f"generated yet: run `sweep.py generate SPEC` first (`sweep.py run` and `train` do it before "
                        f"their first trial), with data.cache_dir ({data_cfg.cache_dir}) shared by every worker")
    folder.mkdir(parents=True, exist_ok=True)
    waiting = f"[student] another process is generating these responses; waiting for it ({folder / '.lock'})"
    with exclusive(folder / ".lock", waiting):
        if out.exists():  # another worker finished it while this one waited
            return StudentResponses(out, lineage)
        store = ResponseStore(folder, chunk_rows)
        todo = [i for i in rows if i not in store.done]
        if todo:
            _generate(todo, messages, student, store, len(rows), progress, on_progress, device)
        store.compact()
        (folder / "lineage.json").write_text(json.dumps({**lineage, "prompts_digest": prompts_digest,
                                                         "rows": len(rows)}, indent=1))
        write_with_student(path, data_cfg.student_key, store.done, out)
    return StudentResponses(out, lineage)


def _generate(todo: list[int], messages: dict[int, list[dict]], student: StudentConfig, store: ResponseStore,
              total: int, progress: bool | None, on_progress: ProgressHook | None, device: str) -> None:
    """Generate the rows `todo` into `store`; a failure keeps what was made and says how to resume."""
    source = student_source(student)
    where = student.model if source == "model" else f"{mask(student.endpoint)} ({student.model_name})"
    print(f"[student] generating {len(todo)} of {total} responses with {where}"
          + (f" ({total - len(todo)} already cached)" if len(todo) < total else ""), file=sys.stderr)
    bar = tqdm(total=total, initial=total - len(todo), unit="resp", desc="student responses", dynamic_ncols=True,
               disable=True if progress is False else None)  # None: only on a terminal

    def on_batch(rows: list[int], texts: list[str], reasons: list[str]) -> None:
        store.add(rows, texts, reasons)
        bar.update(len(rows))
        if on_progress is not None:
            on_progress(len(store.done), total)

    generate = partial(generate_with_model, device=device) if source == "model" else generate_with_endpoint
    try:
        generate(student, {i: messages[i] for i in todo}, on_batch)
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
          f"max_new_tokens={student.max_new_tokens})", file=sys.stderr)



def _actor_identity(student: StudentConfig, root: Path) -> str:
    """'<resolved dir>@<digest of its files>' for a local model, '<endpoint>#<model_name>' for a server."""
    if student.endpoint:
        return f"{mask(student.endpoint)}#{student.model_name}"
    path = Path(student.model).expanduser().resolve()
    if not path.is_dir():
        raise SpecError(f"student.model {str(path)!r} is not a directory; point it at a local checkpoint of the "
                        f"actor (config, weights and tokenizer files)")
    return f"{path}@{actor_digest(path, root / 'actor_digests.json')}"
