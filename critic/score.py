"""Sequence scores: per-token critic values -> one score per sequence. The one scoring path.

Training, evaluation, diagnosis and benchmarks all call `score_pairs`, which
runs `collate_pairs` -> one forward -> `sequence_scores`.

verl's alignment: the value for response token t is read from the hidden state
at position t-1 (`values = logits[:, -R-1:-1]`), i.e. from the state that has
seen everything *before* token t. Under this alignment, `exclude_eos` drops the
value read at the response's last content token, so the final content token of
a response that ends with EOS never influences its score.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    """Teacher rows first, then student rows for pairs whose texts differ (identical ones reuse the teacher's)."""
    input_ids: torch.Tensor  # (rows, L)
    attention_mask: torch.Tensor  # (rows, L)
    mask: torch.Tensor  # (rows, L) value positions
    student_row: torch.Tensor  # (pairs,) row holding each pair's student score
    teacher_tokens: torch.Tensor  # (pairs,) response tokens (including EOS)
    student_tokens: torch.Tensor
    n_pairs: int

    def to(self, device: torch.device) -> "PairBatch":
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return PairBatch(move(self.input_ids), move(self.attention_mask), move(self.mask),
                         move(self.student_row), self.teacher_tokens, self.student_tokens, self.n_pairs)


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
                     torch.tensor([len(pairs.student_ids[i]) for i in index]), len(index))


def score_batch(model: torch.nn.Module, batch: PairBatch, score_cfg: ScoreConfig,
                autocast: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward -> (teacher_scores, student_scores), each (pairs,) float32."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (rows, L, 1)
    token_values = logits.squeeze(-1).float()  # (rows, L)
    scores = sequence_scores(token_values, batch.mask, score_cfg.reduction)  # (rows,)
    return scores[:batch.n_pairs], scores[batch.student_row]
