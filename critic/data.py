"""Teacher/student pairs: read and check parquet, split by prompt, tokenize once (cached on disk).

A pair is (prompt_ids, teacher_ids, student_ids). Response ids end with the
tokenizer's EOS token unless the response was truncated, as in verl where a
response cut at max length has no EOS.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from critic.config import DataConfig, ExperimentConfig, StudentConfig
from critic.demo import demo_path
from critic.files import atomic_write, atomic_write_text, file_digest
from critic.prompts import prompt_messages, prompt_text
from critic.sections import CONFIRM_SET, DataError
from critic.student import StudentResponses, student_responses, student_source

DROP_REASONS = ("null", "non_string", "empty")  # counted as data/<set>_dropped_<reason>
DROP_WARNING = 0.05  # dropping more than this fraction of a file's rows is a warning


@dataclass
class PairSet:
    """Tokenized pairs of one dataset; lists are aligned, one entry per pair."""
    name: str
    prompt_ids: list[np.ndarray]
    teacher_ids: list[np.ndarray]
    student_ids: list[np.ndarray]
    prompt_text: list[str]
    teacher_ends_eos: np.ndarray  # bool per pair: response kept its EOS (not truncated)
    student_ends_eos: np.ndarray
    stats: dict[str, float] = field(default_factory=dict)
    digest: str = ""
    lineage: dict[str, str] = field(default_factory=dict)  # how generated student responses were made
    eos_id: int | None = None  # the tokenizer's EOS id (score.eos_rule: token drops its values)

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def subset(self, index: np.ndarray, name: str) -> "PairSet":
        pick = lambda seq: [seq[i] for i in index]  # noqa: E731
        return PairSet(name, pick(self.prompt_ids), pick(self.teacher_ids), pick(self.student_ids),
                       pick(self.prompt_text), self.teacher_ends_eos[index], self.student_ends_eos[index],
                       dict(self.stats), self.digest, dict(self.lineage), self.eos_id)

    def pair_lengths(self) -> np.ndarray:
        """(N,) tokens of prompt + teacher + student, used to group batches by length."""
        return np.array([len(p) + len(t) + len(s) for p, t, s in
                         zip(self.prompt_ids, self.teacher_ids, self.student_ids)])


def resolve_path(path: str, cache_dir: str) -> Path:
    """A parquet path, or `demo:<name>` for the embedded demo data (written on first use)."""
    if path.startswith("demo:"):
        return demo_path(path.split(":", 1)[1], cache_dir)
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_file():
        raise DataError(f"data file not found: {resolved}")
    return resolved


def read_pairs(path: Path, cfg: DataConfig, keep_empty_student: bool = False) -> tuple[pd.DataFrame, dict[str, float]]:
    """Read a parquet file and drop unusable rows, counting them.

    `keep_empty_student`: the student column was generated from the actor, so an empty response
    is what the actor said (EOS at once); it is kept (tokenized as the EOS-only response) and counted.
    """
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise DataError(f"{path}: cannot read as parquet ({exc})") from None
    needed = [cfg.prompt_key, cfg.teacher_key, cfg.student_key]
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        hint = " or configure student.model / student.endpoint to generate it" if cfg.student_key in missing else ""
        raise DataError(f"{path}: missing column(s) {missing}; the file has {list(frame.columns)}. "
                        f"Set data.prompt_key / data.teacher_key / data.student_key to the right names{hint}.")
    if len(frame) == 0:
        raise DataError(f"{path}: the file has no rows")
    reasons = pd.Series("", index=frame.index)  # why a row is dropped: its first problem, in column order
    for column in (cfg.prompt_key, cfg.teacher_key, cfg.student_key):
        allow_empty = keep_empty_student and column == cfg.student_key
        problem = frame[column].map(lambda v: _problem(v, prompt=column == cfg.prompt_key, allow_empty=allow_empty))
        reasons = reasons.where(reasons != "", problem)
    ok = reasons == ""
    dropped = int((~ok).sum())
    kept = frame[ok].reset_index(drop=True)
    if len(kept) == 0:
        raise DataError(f"{path}: all {len(frame)} rows have a null, non-string or empty prompt/response; "
                        f"nothing is left to train on")
    stats = {"rows": float(len(frame)), "dropped_rows": float(dropped),
             **{f"dropped_{reason}": float((reasons == reason).sum()) for reason in DROP_REASONS}}
    if keep_empty_student:
        stats["student_empty_responses"] = float(kept[cfg.student_key].map(lambda v: v.strip() == "").sum())
    return kept, stats


def _problem(value, prompt: bool, allow_empty: bool) -> str:
    """'' for a usable cell, else its DROP_REASONS entry. A prompt may be a chat list; a response is a string."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "null"
    if prompt:
        return ""
    if not isinstance(value, str):
        return "non_string"
    return "empty" if not allow_empty and value.strip() == "" else ""


def describe_load(source: Path, n_pairs: int, stats: dict[str, float]) -> list[str]:
    """The `[data]` lines of one loaded file: rows, pairs kept, drops by reason, truncations, identical pairs;
    a warning line when more than DROP_WARNING of the rows were dropped."""
    count = lambda key: int(stats.get(key, 0))  # noqa: E731
    rows, dropped = count("rows"), count("dropped_rows")
    reasons = ", ".join(f"{count(f'dropped_{r}')} {r.replace('_', '-')}" for r in DROP_REASONS
                        if count(f"dropped_{r}"))
    why = f" ({reasons})" if reasons else ""
    parts = [f"{rows} rows read", f"{n_pairs} pairs kept", f"{dropped} dropped{why}",
             f"{count('truncated_prompts')} prompts and {count('truncated_responses')} responses truncated",
             f"{count('identical_pairs')} identical teacher==student pairs"]
    if "student_empty_responses" in stats:
        parts.append(f"{count('student_empty_responses')} empty generated student responses kept")
    lines = [f"[data] {source}: " + ", ".join(parts)]
    if rows and dropped / rows > DROP_WARNING:
        lines.append(f"[data] warning: {source}: {dropped} of {rows} rows ({dropped / rows:.0%}) dropped{why}; "
                     f"check the file and data.prompt_key / teacher_key / student_key")
    return lines


def split_by_prompt(prompts: list[str], val_fraction: float, seed: int,
                    confirm_fraction: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices (train, val, confirm): a prompt goes wholly to one part, decided by a seeded hash of its text.

    The hash is a position in [0, 1): below val_fraction is val, the next confirm_fraction is confirm, the rest train.
    So val does not depend on confirm_fraction (confirm is carved out of what was training), and
    confirm_fraction = 0 gives the two-way split.
    """
    def bucket(text: str) -> float:
        digest = hashlib.sha256(f"{seed}\x00{text}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64
    position = np.array([bucket(p) for p in prompts])
    is_val = position < val_fraction
    is_confirm = (position >= val_fraction) & (position < val_fraction + confirm_fraction)
    return np.flatnonzero(~is_val & ~is_confirm), np.flatnonzero(is_val), np.flatnonzero(is_confirm)


def split_fold(prompts: list[str], index: np.ndarray, fold: int, n_folds: int,
               seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held_out) parts of `index`; a prompt's fold is a seeded hash of its text (salted apart from val)."""
    def fold_of(text: str) -> int:
        digest = hashlib.sha256(f"fold\x00{seed}\x00{text}".encode()).digest()
        return int.from_bytes(digest[:8], "big") * n_folds >> 64
    held_out = np.array([fold_of(prompts[i]) == fold for i in index], dtype=bool)
    return index[~held_out], index[held_out]


def _encode_prompt(tokenizer, value, max_len: int) -> np.ndarray:
    if tokenizer.chat_template:
        ids = tokenizer.apply_chat_template(prompt_messages(value), add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    else:
        ids = tokenizer(prompt_text(value) + "\n", add_special_tokens=False)["input_ids"]
    return np.asarray(ids[-max_len:], dtype=np.int32)  # keep the end: the question is usually last


def _encode_responses(tokenizer, texts: list[str], max_len: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Keep the start of each response; append EOS when it still fits (a cut response has none)."""
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    out, ends_eos = [], np.zeros(len(texts), dtype=bool)
    for i, ids in enumerate(encoded):
        if len(ids) < max_len:
            ids = ids + [tokenizer.eos_token_id]
            ends_eos[i] = True
        out.append(np.asarray(ids[:max_len], dtype=np.int32))
    return out, ends_eos


def tokenize_pairs(frame: pd.DataFrame, cfg: DataConfig, tokenizer, name: str) -> PairSet:
    prompts = frame[cfg.prompt_key].tolist()
    prompt_ids = [_encode_prompt(tokenizer, p, cfg.max_prompt_length) for p in prompts]
    teacher_ids, teacher_eos = _encode_responses(tokenizer, frame[cfg.teacher_key].tolist(), cfg.max_response_length)
    student_ids, student_eos = _encode_responses(tokenizer, frame[cfg.student_key].tolist(), cfg.max_response_length)
    full_prompts = [_encode_prompt(tokenizer, p, 10**9) for p in prompts]
    stats = {
        "truncated_prompts": float(sum(len(f) > len(p) for f, p in zip(full_prompts, prompt_ids))),
        "truncated_responses": float((~teacher_eos).sum() + (~student_eos).sum()),
    }
    texts = [prompt_text(p) for p in prompts]
    return PairSet(name, prompt_ids, teacher_ids, student_ids, texts, teacher_eos, student_eos, stats)


def _cache_key(digest: str, tokenizer_id: str, cfg: DataConfig, keep_empty_student: bool = False) -> str:
    options = dict(prompt=cfg.prompt_key, teacher=cfg.teacher_key, student=cfg.student_key,
                   max_prompt=cfg.max_prompt_length, max_response=cfg.max_response_length, version=1)
    if keep_empty_student:  # only then, so existing cache keys stay valid
        options["keep_empty_student"] = True
    return hashlib.sha256(json.dumps([digest, tokenizer_id, options], sort_keys=True).encode()).hexdigest()[:24]


def _save(pairs: PairSet, path: Path) -> None:
    frame = pd.DataFrame({"prompt_ids": pairs.prompt_ids, "teacher_ids": pairs.teacher_ids,
                          "student_ids": pairs.student_ids, "prompt_text": pairs.prompt_text,
                          "teacher_ends_eos": pairs.teacher_ends_eos, "student_ends_eos": pairs.student_ends_eos})
    frame.attrs = {}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path.with_suffix(".json"), json.dumps(pairs.stats))  # first: a reader of the parquet finds them
    atomic_write(path, lambda tmp: frame.to_parquet(tmp, index=False))


def _load(path: Path, name: str, digest: str) -> PairSet:
    frame = pd.read_parquet(path)
    as_arrays = lambda col: [np.asarray(x, dtype=np.int32) for x in frame[col]]  # noqa: E731
    stats = json.loads(path.with_suffix(".json").read_text())
    return PairSet(name, as_arrays("prompt_ids"), as_arrays("teacher_ids"), as_arrays("student_ids"),
                   frame["prompt_text"].tolist(), frame["teacher_ends_eos"].to_numpy(bool),
                   frame["student_ends_eos"].to_numpy(bool), stats, digest)


_MEMORY: dict[str, PairSet] = {}


def generate_students(cfg: ExperimentConfig, progress: bool | None = None) -> dict[str, StudentResponses | None]:
    """The explicit step before any trial: the student's responses for every data file of the spec (train and each
    eval set) that needs them, generated once on model.device and cached; {set name: responses, or None where the
    file's own student column is used}. Nothing happens without a student source."""
    if student_source(cfg.student) is None:
        return {}
    files = {"train": cfg.data.train_path, **cfg.data.eval_sets}
    return {name: student_responses(resolve_path(path_spec, cfg.data.cache_dir), cfg.data, cfg.student, progress,
                                    device=cfg.model.device)
            for name, path_spec in files.items()}


def load_pair_set(path_spec: str, cfg: DataConfig, tokenizer, tokenizer_id: str, name: str,
                  student: StudentConfig | None = None) -> PairSet:
    """Read, check and tokenize one file; cached in memory and on disk by file digest + tokenizer + options.

    With `student` configured, a file without the student column (or any file, with student.regenerate)
    is read with the frozen actor's responses that `generate_students` made (see critic/student/).
    """
    path = source = resolve_path(path_spec, cfg.cache_dir)
    generated = None
    if student is not None:
        generated = student_responses(path, cfg, student, generate=False)  # generate_students made them
        path = generated.path if generated else path
    digest = file_digest(path)
    key = _cache_key(digest, tokenizer_id, cfg, keep_empty_student=generated is not None)
    if key in _MEMORY:
        cached = _MEMORY[key]
        return cached.subset(np.arange(len(cached)), name)
    cache_file = Path(cfg.cache_dir) / "tokenized" / f"{key}.parquet"
    if cache_file.exists():
        pairs = _load(cache_file, name, digest)
    else:
        frame, read_stats = read_pairs(path, cfg, keep_empty_student=generated is not None)
        pairs = tokenize_pairs(frame, cfg, tokenizer, name)
        pairs.stats.update(read_stats)
        pairs.digest = digest
        _save(pairs, cache_file)
    pairs.stats["identical_pairs"] = float(sum(np.array_equal(t, s) for t, s in
                                               zip(pairs.teacher_ids, pairs.student_ids)))
    pairs.lineage = dict(generated.lineage) if generated else {}
    pairs.eos_id = tokenizer.eos_token_id
    _MEMORY[key] = pairs
    for line in describe_load(source, len(pairs), pairs.stats):  # once per file and process: later loads hit _MEMORY
        print(line, file=sys.stderr)  # stderr: `train --json` keeps stdout for its JSON
    return pairs.subset(np.arange(len(pairs)), name)


@dataclass
class TrialData:
    train: PairSet
    eval_sets: dict[str, PairSet]  # the selection sets: "val" first, then "fold" and the named extra sets
    stats: dict[str, float]
    digests: dict[str, str]
    lineage: dict[str, str] = field(default_factory=dict)  # student.* of generated responses, for tracking
    confirm: PairSet | None = None  # the confirmation split (data.confirm_fraction), scored only when asked

    def heldout(self, confirm_split: bool) -> dict[str, PairSet]:
        """The sets an evaluation scores: the selection sets, and the confirmation split after val when asked
        (eval.confirm_split: the confirmation stage's runs; a search trial never scores it)."""
        if not confirm_split:
            return dict(self.eval_sets)
        assert self.confirm is not None, "eval.confirm_split without data.confirm_fraction passed the spec check"
        val, *rest = self.eval_sets.items()
        return dict([val, (CONFIRM_SET, self.confirm), *rest])


def _student_lineage(name: str, lineage: dict[str, str]) -> dict[str, str]:
    """{'student.source': ..., 'student.actor': ..., 'student.generation': ..., 'student.<set>_cache_key': ...}"""
    return {f"student.{name}_{k}" if k == "cache_key" else f"student.{k}": v for k, v in lineage.items()}


def load_trial_data(cfg: DataConfig, tokenizer, tokenizer_id: str, student: StudentConfig | None = None) -> TrialData:
    """The training split, the held-out val split (by prompt) and every extra evaluation set."""
    full = load_pair_set(cfg.train_path, cfg, tokenizer, tokenizer_id, "train", student)
    train_idx, val_idx, confirm_idx = split_by_prompt(full.prompt_text, cfg.val_fraction, cfg.split_seed,
                                                      cfg.confirm_fraction)
    if len(train_idx) == 0 or len(val_idx) == 0:
        raise DataError(f"{cfg.train_path}: splitting {len(full)} pairs by prompt with val_fraction="
                        f"{cfg.val_fraction} leaves an empty side; use more distinct prompts or change val_fraction")
    if cfg.confirm_fraction > 0 and len(confirm_idx) == 0:
        raise DataError(f"{cfg.train_path}: data.confirm_fraction={cfg.confirm_fraction} of {len(full)} pairs leaves "
                        f"the confirmation split empty; use more distinct prompts, raise data.confirm_fraction, or "
                        f"set it to 0 (the confirmation then re-scores the val pairs that selected its finalists)")
    eval_sets = {"val": full.subset(val_idx, "val")}
    if cfg.fold is not None:  # cross-validation: train on the other folds, evaluate on this one
        train_idx, fold_idx = split_fold(full.prompt_text, train_idx, cfg.fold, cfg.n_folds, cfg.split_seed)
        if len(train_idx) == 0 or len(fold_idx) == 0:
            raise DataError(f"{cfg.train_path}: fold {cfg.fold} of {cfg.n_folds} leaves an empty side of the "
                            f"{len(train_idx) + len(fold_idx)} training pairs; use fewer data.n_folds")
        eval_sets["fold"] = full.subset(fold_idx, "fold")
    stats = {f"data/train_{k}": v for k, v in full.stats.items()}
    stats.update({"data/train_pairs": float(len(train_idx)), "data/val_pairs": float(len(val_idx)),
                  f"data/{CONFIRM_SET}_pairs": float(len(confirm_idx))})
    if cfg.fold is not None:
        stats["data/fold_pairs"] = float(len(eval_sets["fold"]))
    digests = {"train": full.digest}
    lineage = _student_lineage("train", full.lineage)
    for name, path in cfg.eval_sets.items():
        extra = load_pair_set(path, cfg, tokenizer, tokenizer_id, name, student)
        lineage.update(_student_lineage(name, extra.lineage))
        eval_sets[name] = extra
        stats.update({f"data/{name}_{k}": v for k, v in extra.stats.items()})
        stats[f"data/{name}_pairs"] = float(len(extra))
        digests[name] = extra.digest
    confirm = full.subset(confirm_idx, CONFIRM_SET) if len(confirm_idx) else None
    return TrialData(full.subset(train_idx, "train"), eval_sets, stats, digests, lineage, confirm)
