"""Sequence scores: per-token critic values -> one score per sequence. The one scoring path.

Training, evaluation, diagnosis and benchmarks all call `score_pairs` (or its two
halves, `collate` and `score_batch`): collate a batch in the configured layout ->
one forward -> `sequence_scores`.

Two layouts, same scores (to float rounding, ~1e-6 in float32):
- `padded` (`collate_pairs`): a row prompt|teacher and a row prompt|student per pair,
  right-padded to the longest row.
- `packed` (`collate_packed`, the default): every pair of the batch in one row,
  prompt|teacher|student each, no padding, so each prompt is computed once. The
  student's position ids restart after the prompt, and `pair_attention` (transformers'
  SDPA plus a per-pair path) lets the student's tokens attend to the prompt and the
  student only, so every token sees exactly what it sees in its own padded row.
  `score.attention: flex` swaps that per-pair path for `pair_flex_attention`: one
  flex_attention kernel per layer over a block mask of the pairs (critic/flex.py; CUDA).

verl's alignment: the value for response token t is read from the hidden state
at position t-1 (`values = logits[:, -R-1:-1]`), i.e. from the state that has
seen everything *before* token t. Under this alignment, `exclude_eos` drops the
value read at the response's last content token, so the final content token of
a response that ends with EOS never influences its score. `score.eos_rule: token`
drops instead every value that scores an EOS id, the users' verl mask (see docs/spec.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from critic.config import ScoreConfig, SpecError
from critic.flex import flex_pair_attention, pair_block_mask


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
        value = token_values.gather(1, last[:, None]).squeeze(1)
        return torch.where(mask.any(-1), value, 0.0)  # an empty mask (score.eos_rule: token) scores 0
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

    def model_inputs(self, model: torch.nn.Module) -> dict:
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
                      seq_len, score_cfg.exclude_eos and score_cfg.eos_rule == "final")
    if score_cfg.eos_rule == "token":  # the value at p scores the token at p + 1
        mask &= torch.from_numpy(np.roll(input_ids, -1, axis=1) != eos_id_of(pairs))
    return PairBatch(torch.from_numpy(input_ids), torch.from_numpy(attention), mask, torch.from_numpy(student_row),
                     torch.tensor([len(pairs.teacher_ids[i]) for i in index]),
                     torch.tensor([len(pairs.student_ids[i]) for i in index]), len(index),
                     n_tokens=sum(len(r) for r in rows))


class PairSegments:
    """Where each pair sits in a packed row: the `attention_mask` that `pair_attention` understands.

    Spans are host ints (start, prompt, teacher, student tokens in the row); the student's additive
    bias (student tokens see the prompt and the student so far) is built once per forward and device.
    """

    def __init__(self, starts, prompt_lens, teacher_lens, student_lens) -> None:
        self.spans = [tuple(int(x) for x in span) for span in zip(starts, prompt_lens, teacher_lens, student_lens)]
        # the row cut into [prompt | teacher], [student] per pair, in order (a student chunk may be empty)
        self.chunk_sizes = [size for _, p, t, s in self.spans for size in (p + t, s)]
        self._biases: dict[tuple, list[torch.Tensor | None]] = {}
        self._block_masks: dict[torch.device, object] = {}  # score.attention: flex, one BlockMask per device

    def block_mask(self, device: torch.device):
        """The row's flex_attention BlockMask (critic/flex.py), built once per forward and device."""
        if device not in self._block_masks:
            self._block_masks[device] = pair_block_mask(self.spans, device)
        return self._block_masks[device]

    def student_biases(self, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor | None]:
        """Per pair, (S, P+S) additive bias over [prompt | student] keys for the S student queries."""
        if (device, dtype) not in self._biases:
            biases = []
            for _, prompt, _, student in self.spans:
                seen = torch.ones(student, prompt + student, dtype=torch.bool, device=device).tril(prompt)
                bias = torch.zeros(seen.shape, dtype=dtype, device=device)
                biases.append(bias.masked_fill_(~seen, torch.finfo(dtype).min) if student else None)
            self._biases[(device, dtype)] = biases
        return self._biases[(device, dtype)]


def pair_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask, dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """transformers' SDPA attention, plus packed pairs: a `PairSegments` mask runs SDPA per pair.

    query (1, H, N, D) and key/value (1, H_kv, N, D) of one packed row -> (1, N, H, D). Per pair,
    prompt | teacher is plain causal attention, and the student's queries attend over
    [prompt | student] keys only: the teacher's keys and padding are never computed.
    """
    if not isinstance(attention_mask, PairSegments):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = query.shape[1] // key.shape[1]
    # one split per tensor (not a slice per pair): its backward is one concatenation
    queries, keys, values = (x.split(attention_mask.chunk_sizes, dim=2) for x in (query, key, value))
    biases = attention_mask.student_biases(query.device, query.dtype)
    parts = []
    for k, ((_, prompt, _, student), bias) in enumerate(zip(attention_mask.spans, biases)):
        shared, own = 2 * k, 2 * k + 1  # chunks [prompt | teacher] and [student]
        parts.append(F.scaled_dot_product_attention(queries[shared], keys[shared], values[shared], dropout_p=dropout,
                                                    scale=scaling, is_causal=True, enable_gqa=groups > 1))
        if student:  # with a mask, GQA as expanded heads (as transformers does: masked GQA kernels are slow)
            seen_keys = repeat_kv(torch.cat([keys[shared][:, :, :prompt], keys[own]], dim=2), groups)
            seen_values = repeat_kv(torch.cat([values[shared][:, :, :prompt], values[own]], dim=2), groups)
            parts.append(F.scaled_dot_product_attention(queries[own], seen_keys, seen_values, attn_mask=bias,
                                                        dropout_p=dropout, scale=scaling))
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


def pair_flex_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask, dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """`pair_attention`'s twin for score.attention: flex: a packed row in one flex_attention call per layer.

    Same shapes and the same keys per query as `pair_attention` (critic/flex.py); any other
    input runs transformers' SDPA.
    """
    if not isinstance(attention_mask, PairSegments):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if dropout:
        raise ValueError("score.attention: flex has no attention dropout; the critic's attention_dropout must be 0")
    return flex_pair_attention(query, key, value, attention_mask.block_mask(query.device), scaling), None


PAIR_ATTENTION = "critic_pair_sdpa"
PAIR_FLEX_ATTENTION = "critic_pair_flex"
PAIR_ATTENTIONS = {"sdpa_per_pair": PAIR_ATTENTION, "flex": PAIR_FLEX_ATTENTION}  # score.attention -> registered name


def register_pair_attention() -> None:
    """Make `pair_attention` and `pair_flex_attention` known to transformers (idempotent)."""
    for name, function in ((PAIR_ATTENTION, pair_attention), (PAIR_FLEX_ATTENTION, pair_flex_attention)):
        AttentionInterface.register(name, function)
        AttentionMaskInterface.register(name, sdpa_mask)  # padded inputs get SDPA's masks, as under "sdpa"


def enable_pair_attention(model: torch.nn.Module, attention: str = "sdpa_per_pair") -> None:
    """Switch an SDPA critic to the packed attention `attention` (idempotent; other inputs still run plain SDPA)."""
    # config._attn_implementation: transformers 5.23 has a public setter (set_attn_implementation) but no getter
    config, name = model.config, PAIR_ATTENTIONS[attention]
    if config._attn_implementation == name:
        return
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if config._attn_implementation not in ("sdpa", *PAIR_ATTENTIONS.values()) or layer_types != {"full_attention"}:
        raise SpecError(f"score.layout: packed needs a critic with full SDPA attention (this one has "
                        f"attn_implementation={config._attn_implementation!r}, layers {sorted(layer_types)}); "
                        f"set score.layout: padded")
    register_pair_attention()
    model.set_attn_implementation(name)


@dataclass
class PackedPairBatch:
    """Packed layout: all pairs in one row of N tokens, each pair as prompt | teacher | student, no padding.

    A pair whose student text equals the teacher's keeps only prompt | teacher and
    takes the teacher's score, so it is a tie bit for bit.
    """
    input_ids: torch.Tensor  # (1, N)
    position_ids: torch.Tensor  # (1, N): per pair 0..P+T-1, then P..P+S-1 again for the student
    segments: PairSegments
    teacher_mask: torch.Tensor  # (pairs, N) positions of each pair's teacher values
    student_mask: torch.Tensor  # (pairs, N) positions of each pair's student values
    identical: torch.Tensor  # (pairs,) bool
    teacher_tokens: torch.Tensor  # (pairs,) response tokens (including EOS)
    student_tokens: torch.Tensor
    n_pairs: int
    n_tokens: int = 0  # tokens in the forward (no padding), counted on the host
    attention: str = "sdpa_per_pair"  # score.attention

    def to(self, device: torch.device) -> "PackedPairBatch":
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return PackedPairBatch(move(self.input_ids), move(self.position_ids), self.segments, move(self.teacher_mask),
                               move(self.student_mask), move(self.identical), self.teacher_tokens,
                               self.student_tokens, self.n_pairs, self.n_tokens, self.attention)

    def model_inputs(self, model: torch.nn.Module) -> dict:
        enable_pair_attention(model, self.attention)
        # A dict of masks by layer type is used as given (no causal mask is built over the N x N row).
        return {"input_ids": self.input_ids, "position_ids": self.position_ids,
                "attention_mask": {"full_attention": self.segments}}

    def scores(self, token_values: torch.Tensor, reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, N) values -> (teacher_scores, student_scores), each (pairs,)."""
        values = token_values.expand(self.n_pairs, -1)  # (pairs, N), a view
        teacher_scores = sequence_scores(values, self.teacher_mask, reduction)
        student_scores = sequence_scores(values, self.student_mask, reduction)
        return teacher_scores, torch.where(self.identical, teacher_scores, student_scores)


ScoreBatch = Union[PairBatch, PackedPairBatch]


def packed_value_masks(starts: torch.Tensor, prompt_lens: torch.Tensor, teacher_lens: torch.Tensor,
                       student_lens: torch.Tensor, teacher_eos: torch.Tensor, student_eos: torch.Tensor,
                       seq_len: int, exclude_eos: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(pairs, N) teacher and student value positions of packed pairs, under verl's shift.

    With P, T relative to the pair's start: teacher token j sits at P + j and its value is read
    at P + j - 1 (as in `value_mask`). Student token j sits at P + T + j; its value is read at
    P + T + j - 1 for j >= 1, and for j = 0 at the last prompt token P - 1: the state that has
    seen the prompt only, as in the student's own padded row.
    """
    positions = torch.arange(seq_len)[None, :] - starts[:, None]  # (pairs, N), relative to each pair
    prompt, teacher = prompt_lens[:, None], teacher_lens[:, None]  # (pairs, 1)
    teacher_count = (teacher_lens - (teacher_eos & exclude_eos).long()).clamp(min=1)[:, None]
    student_count = (student_lens - (student_eos & exclude_eos).long()).clamp(min=1)[:, None]
    teacher_mask = (positions >= prompt - 1) & (positions < prompt - 1 + teacher_count)
    student_rest = (positions >= prompt + teacher) & (positions < prompt + teacher + student_count - 1)
    return teacher_mask, (positions == prompt - 1) | student_rest


def eos_id_of(pairs) -> int:
    if getattr(pairs, "eos_id", None) is None:
        raise ValueError("score.eos_rule: token needs the pairs' EOS id (PairSet.eos_id, set when data is loaded)")
    return int(pairs.eos_id)


def _drop_eos_values(teacher_mask: torch.Tensor, student_mask: torch.Tensor, input_ids: np.ndarray,
                     last_prompt: np.ndarray, students: list[np.ndarray], eos_id: int) -> None:
    """score.eos_rule: token on packed masks, in place: drop every value that scores an EOS id.

    The value at p scores the token at p + 1, except a student's first token, scored at its
    prompt's last position (`last_prompt`, whose next token in the row is the teacher's).
    """
    scored_not_eos = torch.from_numpy(np.roll(input_ids, -1) != eos_id)[None, :]  # (1, N)
    teacher_mask &= scored_not_eos
    student_keep = scored_not_eos.repeat(len(students), 1)  # (pairs, N)
    first_not_eos = torch.tensor([len(s) > 0 and int(s[0]) != eos_id for s in students])
    student_keep[torch.arange(len(students)), torch.from_numpy(last_prompt)] = first_not_eos
    student_mask &= student_keep


def collate_packed(pairs, index: np.ndarray, pad_id: int, score_cfg: ScoreConfig) -> PackedPairBatch:
    """Pack the pairs `index` of a PairSet into one row, prompt | teacher | student each, for a single forward.

    `pad_id` is unused (nothing is padded); it keeps the signature of `collate_pairs`.
    """
    prompts, teachers, students = ([getattr(pairs, f"{k}_ids")[i] for i in index] for k in
                                   ("prompt", "teacher", "student"))
    identical = np.array([np.array_equal(t, s) for t, s in zip(teachers, students)], dtype=bool)
    prompt_lens, teacher_lens, student_lens = (np.array([len(x) for x in seqs], dtype=np.int64) for seqs in
                                               (prompts, teachers, students))
    if prompt_lens.min() < 1:
        raise ValueError("score.layout: packed reads a response's first value at its last prompt token; "
                         "every prompt needs at least one token (or use score.layout: padded)")
    in_row = np.where(identical, 0, student_lens)  # student tokens placed in the row
    pair_lens = prompt_lens + teacher_lens + in_row
    starts = np.concatenate([[0], np.cumsum(pair_lens)[:-1]])
    input_ids = np.concatenate([np.concatenate((p, t) if same else (p, t, s)) for p, t, s, same in
                                zip(prompts, teachers, students, identical)]).astype(np.int64)
    position_ids = np.concatenate([np.concatenate([np.arange(p + t), np.arange(p, p + s)]) for p, t, s in
                                   zip(prompt_lens, teacher_lens, in_row)])
    teacher_mask, student_mask = packed_value_masks(
        *map(torch.from_numpy, (starts, prompt_lens, teacher_lens, student_lens,
                                np.asarray(pairs.teacher_ends_eos)[index], np.asarray(pairs.student_ends_eos)[index])),
        seq_len=len(input_ids), exclude_eos=score_cfg.exclude_eos and score_cfg.eos_rule == "final")
    if score_cfg.eos_rule == "token":
        _drop_eos_values(teacher_mask, student_mask, input_ids, starts + prompt_lens - 1, students, eos_id_of(pairs))
    student_mask[identical] = teacher_mask[identical]
    return PackedPairBatch(torch.from_numpy(input_ids)[None], torch.from_numpy(position_ids)[None],
                           PairSegments(starts, prompt_lens, teacher_lens, in_row), teacher_mask, student_mask,
                           torch.from_numpy(identical), torch.from_numpy(teacher_lens),
                           torch.from_numpy(student_lens), len(index), n_tokens=len(input_ids),
                           attention=score_cfg.attention)


def score_batch(model: torch.nn.Module, batch: "ScoreBatch", score_cfg: ScoreConfig,
                autocast: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward -> (teacher_scores, student_scores), each (pairs,) float32; either layout."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        logits = model(**batch.model_inputs(model), use_cache=False).logits  # (rows, L, 1)
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
