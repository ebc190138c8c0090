"""The packed layout (every pair in one row, each prompt computed once) scores and trains like plain padded rows."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from transformers import AutoModelForTokenClassification, Qwen2Config

from critic.config import ExperimentConfig, LossConfig, ScoreConfig, SpecError, TrainConfig, build_config
from critic.score import (
    PAIR_ATTENTION,
    collate_packed,
    collate_pairs,
    register_pair_attention,
    score_batch,
    sequence_scores,
)
from critic.train import train_step
from tests.helpers import decoder_sum_length, hand_pair_set, reorder_tolerance

PAD, EOS, VOCAB = 0, 2, 64
SHAPE = dict(hidden=32, intermediate=64, layers=2)  # build_critic's Qwen2 body
ROW_TOKENS = 12 + 2 * 10  # random_pairs: a prompt of up to 12 tokens, responses of up to 10, one packed row


def score_tolerance(*reference: torch.Tensor) -> float:
    """Two layouts sum the same float32 terms in another order (tests/helpers.py reorder_tolerance)."""
    magnitude = max(float(r.abs().max()) for r in reference)
    return reorder_tolerance(magnitude, decoder_sum_length(**SHAPE, tokens=ROW_TOKENS))


def build_critic(attn_implementation: str = "sdpa") -> torch.nn.Module:
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, num_labels=1,
                         pad_token_id=PAD, tie_word_embeddings=False, classifier_dropout=0.0)
    return AutoModelForTokenClassification.from_config(config, attn_implementation=attn_implementation).float()


@pytest.fixture(scope="module")
def critic():
    return build_critic()


def random_pairs(n: int, seed: int, identical: tuple[int, ...] = ()):
    """Random ids and lengths (prompt 1..12, responses 1..10), some ending with EOS; `identical` copy the teacher."""
    rng = np.random.default_rng(seed)
    ids = lambda low, high: rng.integers(3, VOCAB, int(rng.integers(low, high + 1))).tolist()  # noqa: E731
    rows = []
    for k in range(n):
        teacher_eos, student_eos = bool(rng.random() < 0.6), bool(rng.random() < 0.6)
        teacher = ids(1, 9) + ([EOS] if teacher_eos else [])
        student = ids(1, 9) + ([EOS] if student_eos else [])
        if k in identical:
            student, student_eos = list(teacher), teacher_eos
        rows.append((ids(1, 12), teacher, student, teacher_eos, student_eos))
    return hand_pair_set(rows)


def one_sequence_scores(model, prompt, response, ends_eos, score_cfg: ScoreConfig) -> torch.Tensor:
    """The plain reference: one unpadded forward of prompt + response, values read at P-1 .. (verl's shift)."""
    ids = torch.tensor(np.concatenate([prompt, response]), dtype=torch.long)[None]
    values = model(input_ids=ids).logits[0, :, 0]
    count = max(len(response) - int(ends_eos and score_cfg.exclude_eos), 1)
    mask = torch.zeros_like(values, dtype=torch.bool)
    mask[len(prompt) - 1:len(prompt) - 1 + count] = True
    return sequence_scores(values[None], mask[None], score_cfg.reduction)[0]


def scores(model, pairs, index, score_cfg: ScoreConfig):
    collate = collate_packed if score_cfg.layout == "packed" else collate_pairs
    with torch.no_grad():
        return score_batch(model, collate(pairs, np.asarray(index), PAD, score_cfg), score_cfg)


# --- collate_packed: the exact row ----------------------------------------------------------------------------

def test_collate_packed_exact_batch():
    # pair 0: prompt 10 11 12 | teacher 20 21 EOS | student 30 EOS; pair 1: identical texts, student left out
    pairs = hand_pair_set([([10, 11, 12], [20, 21, EOS], [30, EOS], True, True),
                           ([13, 14], [22, 23], [22, 23], False, False)])
    batch = collate_packed(pairs, np.array([0, 1]), pad_id=PAD, score_cfg=ScoreConfig(exclude_eos=True))
    assert batch.input_ids.tolist() == [[10, 11, 12, 20, 21, EOS, 30, EOS, 13, 14, 22, 23]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 3, 4, 0, 1, 2, 3]]
    assert batch.segments.spans == [(0, 3, 3, 2), (8, 2, 2, 0)]
    positions = lambda mask: [row.nonzero().flatten().tolist() for row in mask]  # noqa: E731
    # teacher values at P-1.. without the one read at the last content token (EOS excluded)
    assert positions(batch.teacher_mask) == [[2, 3], [9, 10]]
    # student token 0 is read at the last prompt token (2), student token 1 (EOS, excluded) would be read at 6
    assert positions(batch.student_mask) == [[2], [9, 10]]
    assert batch.identical.tolist() == [False, True]
    assert batch.n_tokens == 12


# --- scores ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "last", "sum"])
@pytest.mark.parametrize("exclude_eos", [True, False])
def test_packed_scores_equal_plain_forwards_and_the_padded_layout(critic, reduction, exclude_eos, torch_threads):
    pairs = random_pairs(9, seed=1, identical=(2, 6))
    index = np.array([4, 0, 8, 2, 1, 7, 6, 3, 5])
    packed_cfg = ScoreConfig(reduction=reduction, exclude_eos=exclude_eos, layout="packed")
    teacher, student = scores(critic, pairs, index, packed_cfg)
    padded_teacher, padded_student = scores(critic, pairs, index, dataclasses.replace(packed_cfg, layout="padded"))
    tolerance = score_tolerance(padded_teacher, padded_student)
    torch.testing.assert_close(teacher, padded_teacher, atol=tolerance, rtol=0)
    torch.testing.assert_close(student, padded_student, atol=tolerance, rtol=0)
    with torch.no_grad():
        for k, i in enumerate(index):
            want_teacher = one_sequence_scores(critic, pairs.prompt_ids[i], pairs.teacher_ids[i],
                                               pairs.teacher_ends_eos[i], packed_cfg)
            want_student = one_sequence_scores(critic, pairs.prompt_ids[i], pairs.student_ids[i],
                                               pairs.student_ends_eos[i], packed_cfg)
            torch.testing.assert_close(teacher[k], want_teacher, atol=tolerance, rtol=0)
            torch.testing.assert_close(student[k], want_student, atol=tolerance, rtol=0)


def test_identical_pairs_are_exact_ties(critic):
    pairs = random_pairs(6, seed=2, identical=(0, 3, 5))
    teacher, student = scores(critic, pairs, np.arange(6), ScoreConfig(layout="packed"))
    assert torch.equal(teacher[[0, 3, 5]], student[[0, 3, 5]])
    assert not torch.equal(teacher[[1, 2, 4]], student[[1, 2, 4]])


def test_student_never_sees_the_teacher_tokens(critic, torch_threads):
    pairs = random_pairs(3, seed=3)
    other = copy.deepcopy(pairs)
    other.teacher_ids[1] = np.asarray([5, 6, 7, 8, 9, 10, 11], dtype=np.int32)  # another teacher, same student
    _, student = scores(critic, pairs, np.arange(3), ScoreConfig(layout="packed"))
    _, student_other = scores(critic, other, np.arange(3), ScoreConfig(layout="packed"))
    # only the row's length changes (another teacher), so the student's own sums may be split another way
    torch.testing.assert_close(student, student_other, atol=score_tolerance(student), rtol=0)


def test_pair_attention_is_plain_sdpa_for_padded_batches():
    model, switched = build_critic(), build_critic()
    register_pair_attention()
    switched.set_attn_implementation(PAIR_ATTENTION)
    pairs, cfg = random_pairs(4, seed=4), ScoreConfig(layout="padded")
    for want, got in zip(scores(model, pairs, np.arange(4), cfg), scores(switched, pairs, np.arange(4), cfg)):
        assert torch.equal(want, got)


def test_packed_layout_needs_an_sdpa_critic():
    with pytest.raises(SpecError, match="set score.layout: padded"):
        scores(build_critic("eager"), random_pairs(2, seed=5), [0, 1], ScoreConfig(layout="packed"))


def test_unknown_layout_fails_at_load():
    with pytest.raises(SpecError, match=r"score\.layout must be packed or padded; got 'rows'"):
        build_config({"score": {"layout": "rows"}})


# --- one training step ----------------------------------------------------------------------------------------

def step_outcome(layout: str, gradient_checkpointing: bool = False) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Loss, temperature, d_acc and every gradient of one accumulated step from the same weights."""
    model = build_critic().train()
    if gradient_checkpointing:
        model.activation_checkpointing_enable()
    cfg = ExperimentConfig(score=ScoreConfig(layout=layout), loss=LossConfig(adaptive_temperature=True),
                           train=TrainConfig(batch_size=7, micro_batch_size=3))
    pairs = random_pairs(7, seed=6, identical=(4,))
    teacher, student, loss, temperature, _ = train_step(model, pairs, np.array([3, 0, 6, 1, 5, 2, 4]), cfg,
                                                        torch.device("cpu"), PAD)
    metrics = {"loss": float(loss), "temperature": float(temperature),
               "d_acc": float((teacher > student).float().mean()),
               "tie_rate": float((teacher == student).float().mean()),
               "grad_norm": float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))}
    return metrics, {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_packing_changes_no_metric_of_a_training_step(gradient_checkpointing, torch_threads):
    padded_metrics, padded_grads = step_outcome("padded")
    packed_metrics, packed_grads = step_outcome("packed", gradient_checkpointing)
    # a weight's gradient also sums over the step's tokens (7 pairs of up to ROW_TOKENS); relative to the
    # largest value compared: the loss, T and the gradient norm are each of order 1
    terms = decoder_sum_length(**SHAPE, tokens=ROW_TOKENS) + 7 * ROW_TOKENS
    assert packed_metrics == pytest.approx(padded_metrics, rel=reorder_tolerance(1.0, terms),
                                           abs=reorder_tolerance(1.0, terms))
    assert padded_grads.keys() == packed_grads.keys()
    # at the scale of the largest gradient: the value head's bias has a gradient of pure rounding noise (the
    # loss ignores a shift of every score), so its own scale would compare noise with noise
    tolerance = reorder_tolerance(max(float(g.abs().max()) for g in padded_grads.values()), terms)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=tolerance, rtol=0, msg=name)
