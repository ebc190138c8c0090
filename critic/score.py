"""Sequence scores: per-token critic values -> one score per sequence. The one scoring path.

Training, evaluation, diagnosis and benchmarks all call `score_pairs` (or its two
halves, `collate` and `score_batch`): collate a batch in the configured layout ->
one forward -> `sequence_scores`.

Two layouts, same scores (to float rounding, ~1e-6 in float32):
- `padded` (`collate_pairs`): a row prompt|teacher and a row prompt|student per pair.
- `packed` (`collate_packed`, the default): one row prompt|teacher|student per pair, so
  the prompt is computed once. A 4D attention mask keeps the student tokens from
  seeing the teacher tokens, and the student's position ids restart after the
  prompt, so every token sees exactly what it sees in its own padded row.

verl's alignment: the value for response token t is read from the hidden state
at position t-1 (`values = logits[:, -R-1:-1]`), i.e. from the state that has
seen everything *before* token t. Under this alignment, `exclude_eos` drops the
value read at the response's last content token, so the final content token of
a response that ends with EOS never influences its score.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import numpy as np
import torch

from critic.config import ScoreConfig


def value_mask(prompt_lens: torch.Tensor, response_lens: torch.Tensor, ends_eos: torch.Tensor,
               seq_len: int, exclude_eos: bool) -> torch.Tensor:
    """(B, L) bool: positions whose value scores a response token under verl's shift.

    A row is prompt (P tokens) + response (R tokens) + right padding. Response token j
    sits at P + j and its value is read at P + j - 1, so the mask covers P-1 .. P+R-2,
    minus the last one when the response ends with EOS and `exclude_eos` is set.
    """
    positions = torch.arange(seq_len, device=prompt_lens.device)[None, :]  # (1, L)
    start = (prompt_lens - 1)[:, None]  # (B, 1)
    count = response_lens - (ends_eos & exclude_eos).long()  # (B,)
    count = count.clamp(min=1)  # an EOS-only response keeps its one value rather than scoring nothing
    return (positions >= start) & (positions < start + count[:, None])


def sequence_scores(token_values: torch.Tensor, mask: torch.Tensor, reduction: str) -> torch.Tensor:
    """(B, L) values and (B, L) mask -> (B,) scores by mean, sum or last masked value."""
    masked = token_values * mask
    if reduction == "sum":
        return masked.sum(-1)
    if reduction == "mean":
        return masked.sum(-1) / mask.sum(-1).clamp(min=1)
    if reduction == "last":
        last = (mask.long() * torch.arange(mask.shape[1], device=mask.device)).argmax(-1)  # (B,)
        return token_values.gather(1, last[:, None]).squeeze(1)
    raise ValueError(f"unknown score reduction {reduction!r}; use mean, last or sum")


@dataclass
class PairBatch:
    """Padded layout: teacher rows, then a student row per pair whose texts differ (else the teacher's row)."""
    input_ids: torch.Tensor  # (rows, L)
    attention_mask: torch.Tensor  # (rows, L)
    mask: torch.Tensor  # (rows, L) value positions
    student_row: torch.Tensor  # (pairs,) row holding each pair's student score
    teacher_tokens: torch.Tensor  # (pairs,) response tokens (including EOS)
    student_tokens: torch.Tensor
    n_pairs: int
    n_tokens: int = 0  # non-padding tokens in the forward, counted on the host (no device sync)

    def to(self, device: torch.device) -> "PairBatch":
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return PairBatch(move(self.input_ids), move(self.attention_mask), move(self.mask),
                         move(self.student_row), self.teacher_tokens, self.student_tokens, self.n_pairs, self.n_tokens)

    def model_inputs(self, mask_dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}

    def scores(self, token_values: torch.Tensor, reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, L) values -> (teacher_scores, student_scores), each (pairs,)."""
        scores = sequence_scores(token_values, self.mask, reduction)  # (rows,)
        return scores[:self.n_pairs], scores[self.student_row]


def collate_pairs(pairs, index: np.ndarray, pad_id: int, score_cfg: ScoreConfig) -> PairBatch:
    """Stack the pairs `index` of a PairSet into one right-padded batch for a single forward."""
    rows, prompt_lens, response_lens, ends = [], [], [], []
    student_row = np.zeros(len(index), dtype=np.int64)
    for k, i in enumerate(index):  # teacher rows
        rows.append(np.concatenate([pairs.prompt_ids[i], pairs.teacher_ids[i]]))
        prompt_lens.append(len(pairs.prompt_ids[i]))
        response_lens.append(len(pairs.teacher_ids[i]))
        ends.append(pairs.teacher_ends_eos[i])
    for k, i in enumerate(index):  # student rows; identical text -> same row, hence the same score by construction
        if np.array_equal(pairs.teacher_ids[i], pairs.student_ids[i]):
            student_row[k] = k
            continue
        student_row[k] = len(rows)
        rows.append(np.concatenate([pairs.prompt_ids[i], pairs.student_ids[i]]))
        prompt_lens.append(len(pairs.prompt_ids[i]))
        response_lens.append(len(pairs.student_ids[i]))
        ends.append(pairs.student_ends_eos[i])
    seq_len = max(len(r) for r in rows)
    input_ids = np.full((len(rows), seq_len), pad_id, dtype=np.int64)
    attention = np.zeros((len(rows), seq_len), dtype=np.int64)
    for r, row in enumerate(rows):
        input_ids[r, :len(row)] = row
        attention[r, :len(row)] = 1
    mask = value_mask(torch.tensor(prompt_lens), torch.tensor(response_lens), torch.tensor(ends),
                      seq_len, score_cfg.exclude_eos)
    return PairBatch(torch.from_numpy(input_ids), torch.from_numpy(attention), mask, torch.from_numpy(student_row),
                     torch.tensor([len(pairs.teacher_ids[i]) for i in index]),
                     torch.tensor([len(pairs.student_ids[i]) for i in index]), len(index),
                     n_tokens=sum(len(r) for r in rows))


@dataclass
class PackedPairBatch:
    """Packed layout: one row per pair, prompt | teacher | student, right-padded.

    A pair whose student text equals the teacher's keeps only prompt | teacher and
    takes the teacher's score, so it is a tie bit for bit.
    """
    input_ids: torch.Tensor  # (pairs, L)
    position_ids: torch.Tensor  # (pairs, L): 0..P+T-1, then P.. again for the student
    segment_lens: torch.Tensor  # (pairs, 3): prompt, teacher, student tokens in the row (0 when identical)
    teacher_mask: torch.Tensor  # (pairs, L) positions of the teacher's values
    student_mask: torch.Tensor  # (pairs, L) positions of the student's values
    identical: torch.Tensor  # (pairs,) bool
    teacher_tokens: torch.Tensor  # (pairs,) response tokens (including EOS)
    student_tokens: torch.Tensor
    n_pairs: int
    n_tokens: int = 0  # non-padding tokens in the forward, counted on the host

    def to(self, device: torch.device) -> "PackedPairBatch":
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return PackedPairBatch(move(self.input_ids), move(self.position_ids), move(self.segment_lens),
                               move(self.teacher_mask), move(self.student_mask), move(self.identical),
                               self.teacher_tokens, self.student_tokens, self.n_pairs, self.n_tokens)

    def model_inputs(self, mask_dtype: torch.dtype) -> dict[str, torch.Tensor]:
        bias = packed_attention_bias(self.segment_lens, self.input_ids.shape[1], mask_dtype)
        return {"input_ids": self.input_ids, "attention_mask": bias, "position_ids": self.position_ids}

    def scores(self, token_values: torch.Tensor, reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(pairs, L) values -> (teacher_scores, student_scores), each (pairs,)."""
        teacher_scores = sequence_scores(token_values, self.teacher_mask, reduction)
        student_scores = sequence_scores(token_values, self.student_mask, reduction)
        return teacher_scores, torch.where(self.identical, teacher_scores, student_scores)


ScoreBatch = Union[PairBatch, PackedPairBatch]


def packed_attention_bias(segment_lens: torch.Tensor, seq_len: int, dtype: torch.dtype) -> torch.Tensor:
    """(rows, 1, L, L) additive mask for packed rows: causal, and student tokens do not see teacher tokens.

    Padding queries see the prompt (never an empty row, so no NaN); no real query sees padding.
    """
    prompt, teacher = segment_lens[:, 0], segment_lens[:, 1]
    positions = torch.arange(seq_len, device=segment_lens.device)
    query, key = positions[None, :, None], positions[None, None, :]  # (1, L, 1), (1, 1, L)
    teacher_start, student_start = prompt[:, None, None], (prompt + teacher)[:, None, None]  # (rows, 1, 1)
    teacher_key = (key >= teacher_start) & (key < student_start)  # (rows, 1, L)
    blocked = (key > query) | ((query >= student_start) & teacher_key)  # (rows, L, L)
    bias = torch.zeros(blocked.shape, dtype=dtype, device=blocked.device)
    return bias.masked_fill_(blocked, torch.finfo(dtype).min)[:, None]


def packed_value_masks(prompt_lens: torch.Tensor, teacher_lens: torch.Tensor, student_lens: torch.Tensor,
                       teacher_eos: torch.Tensor, student_eos: torch.Tensor, seq_len: int,
                       exclude_eos: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, L) teacher and student value positions of packed rows, under verl's shift.

    Teacher token j sits at P + j, its value is read at P + j - 1 (as in `value_mask`).
    Student token j sits at P + T + j; its value is read at P + T + j - 1 for j >= 1, and
    for j = 0 at the last prompt token P - 1: the state that has seen the prompt only.
    """
    positions = torch.arange(seq_len)[None, :]  # (1, L)
    prompt, teacher = prompt_lens[:, None], teacher_lens[:, None]  # (rows, 1)
    teacher_count = (teacher_lens - (teacher_eos & exclude_eos).long()).clamp(min=1)[:, None]
    student_count = (student_lens - (student_eos & exclude_eos).long()).clamp(min=1)[:, None]
    teacher_mask = (positions >= prompt - 1) & (positions < prompt - 1 + teacher_count)
    student_rest = (positions >= prompt + teacher) & (positions < prompt + teacher + student_count - 1)
    return teacher_mask, (positions == prompt - 1) | student_rest


def collate_packed(pairs, index: np.ndarray, pad_id: int, score_cfg: ScoreConfig) -> PackedPairBatch:
    """Pack the pairs `index` of a PairSet one per row (prompt | teacher | student) for a single forward."""
    prompts = [pairs.prompt_ids[i] for i in index]
    teachers = [pairs.teacher_ids[i] for i in index]
    students = [pairs.student_ids[i] for i in index]
    identical = np.array([np.array_equal(t, s) for t, s in zip(teachers, students)], dtype=bool)
    prompt_lens = np.array([len(p) for p in prompts], dtype=np.int64)
    teacher_lens = np.array([len(t) for t in teachers], dtype=np.int64)
    student_lens = np.array([len(s) for s in students], dtype=np.int64)
    assert prompt_lens.min() >= 1, "a packed row needs at least one prompt token to read the first values from"
    in_row = np.where(identical, 0, student_lens)  # student tokens placed in the row
    row_lens = prompt_lens + teacher_lens + in_row
    seq_len = int(row_lens.max())
    input_ids = np.full((len(index), seq_len), pad_id, dtype=np.int64)
    for r, (prompt, teacher, student) in enumerate(zip(prompts, teachers, students)):
        parts = (prompt, teacher) if identical[r] else (prompt, teacher, student)
        input_ids[r, :row_lens[r]] = np.concatenate(parts)
    positions = torch.arange(seq_len)[None, :]  # (1, L)
    student_start = torch.from_numpy(prompt_lens + teacher_lens)[:, None]
    position_ids = positions - torch.from_numpy(teacher_lens)[:, None] * (positions >= student_start)
    teacher_eos = torch.from_numpy(np.asarray(pairs.teacher_ends_eos)[index])
    student_eos = torch.from_numpy(np.asarray(pairs.student_ends_eos)[index])
    teacher_mask, student_mask = packed_value_masks(
        torch.from_numpy(prompt_lens), torch.from_numpy(teacher_lens), torch.from_numpy(student_lens),
        teacher_eos, student_eos, seq_len, score_cfg.exclude_eos)
    student_mask[identical] = teacher_mask[identical]
    segment_lens = torch.from_numpy(np.stack([prompt_lens, teacher_lens, in_row], axis=1))
    return PackedPairBatch(torch.from_numpy(input_ids), position_ids, segment_lens, teacher_mask, student_mask,
                           torch.from_numpy(identical), torch.from_numpy(teacher_lens), torch.from_numpy(student_lens),
                           len(index), n_tokens=int(row_lens.sum()))


def score_batch(model: torch.nn.Module, batch: "ScoreBatch", score_cfg: ScoreConfig,
                autocast: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward -> (teacher_scores, student_scores), each (pairs,) float32; either layout."""
    mask_dtype = torch.bfloat16 if autocast else next(model.parameters()).dtype  # what attention will see
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        logits = model(**batch.model_inputs(mask_dtype), use_cache=False).logits  # (rows, L, 1)
    token_values = logits.squeeze(-1).float()  # (rows, L)
    return batch.scores(token_values, score_cfg.reduction)


def collate(pairs, index: np.ndarray, pad_id: int, score_cfg: ScoreConfig) -> "ScoreBatch":
    """The pairs `index` of a PairSet as one batch in `score_cfg.layout`."""
    if score_cfg.layout == "packed":
        return collate_packed(pairs, index, pad_id, score_cfg)
    if score_cfg.layout == "padded":
        return collate_pairs(pairs, index, pad_id, score_cfg)
    raise ValueError(f"unknown score layout {score_cfg.layout!r}; use packed or padded")


def score_pairs(model: torch.nn.Module, pairs, index: np.ndarray, pad_id: int, score_cfg: ScoreConfig,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Collate, move and score the pairs `index`: (teacher_scores, student_scores, forward tokens)."""
    batch = collate(pairs, index, pad_id, score_cfg).to(device)
    teacher_scores, student_scores = score_batch(model, batch, score_cfg, autocast=device.type == "cuda")
    return teacher_scores, student_scores, batch.n_tokens
