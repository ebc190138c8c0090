"""Which token values make a sequence score (verl's alignment), the reductions, and ties from identical text."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from critic.config import DataConfig, ScoreConfig
from critic.data import tokenize_pairs
from critic.metrics import pair_metrics
from critic.score import collate_pairs, score_pairs, sequence_scores, value_mask
from tests.helpers import hand_pair_set, tiny_tolerance

EOS = 2  # any id works for the hand-made masks; the real EOS of the tiny tokenizer is used with the model


def positions(mask: torch.Tensor) -> list[list[int]]:
    return [row.nonzero().flatten().tolist() for row in mask]


# --- value_mask: prompt of 3 tokens, response of 4 (r0 r1 r2 EOS) ------------------------------------------
# row:       p0 p1 p2 r0 r1 r2 EOS pad
# position:   0  1  2  3  4  5  6   7
# verl reads the value of response token j at P + j - 1: r0 at 2, r1 at 3, r2 at 4, EOS at 5.

@pytest.mark.parametrize("exclude_eos, expected", [(False, [2, 3, 4, 5]), (True, [2, 3, 4])])
def test_value_positions_with_eos(exclude_eos, expected):
    mask = value_mask(torch.tensor([3]), torch.tensor([4]), torch.tensor([True]), seq_len=8, exclude_eos=exclude_eos)
    assert mask.dtype == torch.bool and mask.shape == (1, 8)
    assert positions(mask) == [expected]


@pytest.mark.parametrize("exclude_eos", [False, True])
def test_truncated_response_keeps_every_value_position(exclude_eos):
    # r0 r1 r2 r3 cut at max length, no EOS: nothing to exclude
    mask = value_mask(torch.tensor([3]), torch.tensor([4]), torch.tensor([False]), seq_len=8, exclude_eos=exclude_eos)
    assert positions(mask) == [[2, 3, 4, 5]]


def test_eos_only_response_keeps_its_one_value():
    mask = value_mask(torch.tensor([3]), torch.tensor([1]), torch.tensor([True]), seq_len=5, exclude_eos=True)
    assert positions(mask) == [[2]]


def test_value_positions_per_row_of_a_batch():
    mask = value_mask(prompt_lens=torch.tensor([3, 1, 5]), response_lens=torch.tensor([4, 2, 3]),
                      ends_eos=torch.tensor([True, False, True]), seq_len=9, exclude_eos=True)
    assert positions(mask) == [[2, 3, 4], [0, 1], [4, 5]]


# --- sequence_scores ------------------------------------------------------------------------------------------

# Values chosen so that any leak from the prompt, the EOS position or the padding changes the result.
VALUES = torch.tensor([[100.0, 200.0, 1.0, 2.0, 4.0, 8.0, 1000.0, 2000.0]])


@pytest.mark.parametrize("exclude_eos, reduction, expected", [
    (True, "mean", 7.0 / 3), (True, "sum", 7.0), (True, "last", 4.0),
    (False, "mean", 15.0 / 4), (False, "sum", 15.0), (False, "last", 8.0),
])
def test_reductions_over_value_positions(exclude_eos, reduction, expected):
    mask = value_mask(torch.tensor([3]), torch.tensor([4]), torch.tensor([True]), seq_len=8, exclude_eos=exclude_eos)
    scores = sequence_scores(VALUES, mask, reduction)
    assert scores.shape == (1,)
    assert scores.item() == pytest.approx(expected)


def test_unknown_reduction_is_rejected():
    mask = torch.ones(1, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"unknown score reduction 'max'; use mean, last or sum"):
        sequence_scores(VALUES, mask, "max")


# --- collate_pairs --------------------------------------------------------------------------------------------

def test_collate_pairs_exact_batch():
    pairs = hand_pair_set([
        ([11, 12, 13], [21, 22, 23, EOS], [31, EOS], True, True),
        ([14], [24, 25], [24, 25], False, False),  # identical (truncated) responses
    ])
    batch = collate_pairs(pairs, np.array([0, 1]), pad_id=0, score_cfg=ScoreConfig(exclude_eos=True))
    # Teacher rows first, then a student row only for the pair whose texts differ.
    assert batch.input_ids.tolist() == [[11, 12, 13, 21, 22, 23, EOS],
                                        [14, 24, 25, 0, 0, 0, 0],
                                        [11, 12, 13, 31, EOS, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1, 1, 1],
                                             [1, 1, 1, 0, 0, 0, 0],
                                             [1, 1, 1, 1, 1, 0, 0]]
    assert positions(batch.mask) == [[2, 3, 4], [0, 1], [2]]
    assert batch.student_row.tolist() == [2, 1]
    assert batch.teacher_tokens.tolist() == [4, 2] and batch.student_tokens.tolist() == [2, 2]
    assert batch.n_pairs == 2


# --- with the tiny Qwen2 critic -------------------------------------------------------------------------------

# Each layout goes through the one scoring path (`score_pairs`: collate -> one forward -> sequence_scores);
# `padded` is collate_pairs + score_batch.
LAYOUTS = ["padded", "packed"]


def score(model, pairs, index, score_cfg: ScoreConfig, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    with torch.inference_mode():
        teacher, student, _ = score_pairs(model, pairs, np.asarray(index), pad_id, score_cfg, torch.device("cpu"))
    return teacher.numpy(), student.numpy()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("reduction", ["mean", "last", "sum"])
def test_identical_texts_score_identically_and_count_as_a_tie(tiny_critic, reduction, layout):
    tokenizer = tiny_critic.tokenizer
    frame = pd.DataFrame({
        "content": ["What is 2 + 3?", "Ana has 4 apples and buys 2 packs of 3 apples. How many apples now?"],
        "teacher_response": ["2 + 3 = 5. The answer is 5.", "Step 1: 2 * 3 = 6. Step 2: 4 + 6 = 10. The answer is 10."],
        "student_response": ["2 + 3 = 5. The answer is 5.", "I am not sure, maybe it is 6?"],
    })
    pairs = tokenize_pairs(frame, DataConfig(), tokenizer, "ties")
    score_cfg = ScoreConfig(reduction=reduction, layout=layout)
    teacher, student = score(tiny_critic.model, pairs, [0, 1], score_cfg, tokenizer.pad_token_id)
    assert teacher[0] == student[0]  # exactly: the identical pair reuses the teacher's row
    assert teacher[1] != student[1]
    metrics = pair_metrics(teacher, student, np.array([len(x) for x in pairs.teacher_ids]),
                           np.array([len(x) for x in pairs.student_ids]))
    assert metrics["tie_rate"] == 0.5
    assert metrics["d_acc_ties_correct"] - metrics["d_acc"] == 0.5


@pytest.mark.parametrize("layout", LAYOUTS)
def test_score_does_not_depend_on_padding_or_batch_neighbours(tiny_critic, layout, torch_threads):
    pad_id = tiny_critic.tokenizer.pad_token_id
    pairs = hand_pair_set([
        ([40, 41, 42], [50, 51, 52, EOS], [60, 61, EOS], True, True),
        ([40, 41, 42, 43, 44, 45, 46], [70, 71, 72, 73, 74, 75, 76, 77], [80, EOS], False, True),
    ])
    alone = score(tiny_critic.model, pairs, [0], ScoreConfig(layout=layout), pad_id)
    batched = score(tiny_critic.model, pairs, [1, 0], ScoreConfig(layout=layout), pad_id)
    tolerance = tiny_tolerance(np.r_[alone[0], alone[1]], tokens=7 + 8 + 2)  # neighbours split the sums otherwise
    torch.testing.assert_close(torch.tensor(batched[0][1]), torch.tensor(alone[0][0]), atol=tolerance, rtol=0)
    torch.testing.assert_close(torch.tensor(batched[1][1]), torch.tensor(alone[1][0]), atol=tolerance, rtol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("exclude_eos", [True, False])
def test_last_content_token_of_an_eos_response_counts_only_without_exclude_eos(tiny_critic, exclude_eos, layout):
    # Teacher and student differ only in the token before EOS. That token's state is the value
    # position of EOS, which exclude_eos drops; earlier states cannot see it (causal attention).
    pairs = hand_pair_set([([40, 41, 42], [50, 51, 52, EOS], [50, 51, 99, EOS], True, True)])
    teacher, student = score(tiny_critic.model, pairs, [0], ScoreConfig(exclude_eos=exclude_eos, layout=layout),
                             tiny_critic.tokenizer.pad_token_id)
    if exclude_eos:
        torch.testing.assert_close(torch.tensor(teacher), torch.tensor(student))
    else:
        assert abs(teacher[0] - student[0]) > 1e-4


@pytest.mark.parametrize("layout", LAYOUTS)
def test_last_token_of_a_truncated_response_is_never_read(tiny_critic, layout):
    # Without EOS the value read at the last token would score the token after it, which was cut.
    pad_id = tiny_critic.tokenizer.pad_token_id
    last_differs = hand_pair_set([([40, 41, 42], [50, 51, 52, 53], [50, 51, 52, 99], False, False)])
    teacher, student = score(tiny_critic.model, last_differs, [0], ScoreConfig(layout=layout), pad_id)
    torch.testing.assert_close(torch.tensor(teacher), torch.tensor(student))
    before_last_differs = hand_pair_set([([40, 41, 42], [50, 51, 52, 53], [50, 51, 99, 53], False, False)])
    teacher, student = score(tiny_critic.model, before_last_differs, [0], ScoreConfig(layout=layout), pad_id)
    assert abs(teacher[0] - student[0]) > 1e-4


# --- score.eos_rule: which EOS values exclude_eos drops ---------------------------------------------------------
# pair 0: the student said only EOS; pair 1: the teacher's text holds an EOS id inside (tokenized special text).
# final (default, this tool's rule): drop the final EOS's value only; an EOS-only response keeps its one value.
# token (the users' verl mask `response_mask & (responses != eos)`): drop every EOS id's value; EOS-only -> empty.
EOS_PAIRS = [([10, 11, 12], [20, 21, EOS], [EOS], True, True),
             ([13, 14], [22, EOS, 23, EOS], [24, EOS], True, True)]


@pytest.mark.parametrize("rule, teacher, student", [
    # padded rows: 10 11 12 20 21 EOS | 13 14 22 EOS 23 EOS | 10 11 12 EOS | 13 14 24 EOS (value at p scores p+1)
    ("final", [[2, 3], [1, 2, 3]], [[2], [1]]),
    ("token", [[2, 3], [1, 3]], [[], [1]]),
])
def test_eos_rules_on_padded_rows(rule, teacher, student):
    pairs = hand_pair_set(EOS_PAIRS)
    pairs.eos_id = EOS
    batch = collate_pairs(pairs, np.array([0, 1]), pad_id=0, score_cfg=ScoreConfig(eos_rule=rule))
    assert positions(batch.mask) == teacher + student


@pytest.mark.parametrize("rule, teacher, student", [
    # one packed row: 10 11 12 20 21 EOS EOS | 13 14 22 EOS 23 EOS 24 EOS (positions 0-6 | 7-14); a student's
    # first token is scored at its prompt's last position (2 and 8)
    ("final", [[2, 3], [8, 9, 10]], [[2], [8]]),
    ("token", [[2, 3], [8, 10]], [[], [8]]),
])
def test_eos_rules_on_a_packed_row(rule, teacher, student):
    from critic.score import collate_packed
    pairs = hand_pair_set(EOS_PAIRS)
    pairs.eos_id = EOS
    batch = collate_packed(pairs, np.array([0, 1]), pad_id=0, score_cfg=ScoreConfig(eos_rule=rule))
    assert positions(batch.teacher_mask) == teacher and positions(batch.student_mask) == student


@pytest.mark.parametrize("reduction", ["mean", "sum", "last"])
def test_eos_only_response_scores_zero_under_the_token_rule_in_both_layouts(tiny_critic, reduction, torch_threads):
    eos, pad_id = tiny_critic.tokenizer.eos_token_id, tiny_critic.tokenizer.pad_token_id
    pairs = hand_pair_set([([40, 41, 42], [50, 51, eos], [eos], True, True),
                           ([43, 44], [52, eos, 53, eos], [54, eos], True, True)])
    pairs.eos_id = eos
    by_layout = [score(tiny_critic.model, pairs, [0, 1], ScoreConfig(eos_rule="token", reduction=reduction,
                                                                     layout=layout), pad_id) for layout in LAYOUTS]
    assert by_layout[0][1][0] == by_layout[1][1][0] == 0.0
    padded = np.concatenate(by_layout[0])
    tolerance = tiny_tolerance(padded, tokens=3 + 4 + 2)
    np.testing.assert_allclose(padded, np.concatenate(by_layout[1]), atol=tolerance, rtol=0)
    final = score(tiny_critic.model, pairs, [0, 1], ScoreConfig(reduction=reduction), pad_id)
    assert final[1][0] != 0.0  # the default rule scores it by the value at the last prompt token


def test_token_rule_needs_exclude_eos_and_the_pairs_eos_id():
    from critic.config import SpecError, build_config
    with pytest.raises(SpecError, match=r"eos_rule: token drops EOS values, which needs score.exclude_eos: true"):
        build_config({"score": {"eos_rule": "token", "exclude_eos": False}})
    with pytest.raises(ValueError, match=r"eos_rule: token needs the pairs' EOS id"):
        collate_pairs(hand_pair_set(EOS_PAIRS), np.array([0]), pad_id=0, score_cfg=ScoreConfig(eos_rule="token"))
