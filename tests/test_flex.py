"""score.attention: flex (one flex_attention kernel per layer over a block mask of the pairs) sees and scores
exactly what the per-pair SDPA path does.

torch 2.13 runs flex_attention on CPU only eagerly and only forward, so scores are compared here without
gradients; training with flex is CUDA only (benchmarks/bench_gpu.py runs it there).
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch
from torch.nn.attention.flex_attention import create_mask

from critic.config import ExperimentConfig, ScoreConfig, SpecError, TrainConfig, build_config
from critic.flex import PROMPT, STUDENT, TEACHER, pair_block_mask, pair_mask_mod, row_roles
from critic.score import PairSegments, collate_packed
from critic.train import train_step
from tests.test_packing import PAD, build_critic, random_pairs, score_tolerance, scores


@pytest.fixture(autouse=True)
def _quiet_eager_flex():
    with warnings.catch_warnings():  # "flex_attention called without torch.compile()": the CPU reference, on purpose
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        yield


def dense_mask(spans) -> torch.Tensor:
    """(N, N) bool mask of the flex path, evaluated at every (query, key)."""
    pair_of, role = (torch.from_numpy(x) for x in row_roles(spans))
    n = len(pair_of)
    return create_mask(pair_mask_mod(pair_of, role), None, None, n, n, device="cpu")[0, 0]


def per_pair_mask(segments: PairSegments) -> torch.Tensor:
    """(N, N) bool: what `pair_attention` lets each query see, read off its causal chunks and student biases."""
    n = sum(p + t + s for _, p, t, s in segments.spans)
    seen = torch.zeros(n, n, dtype=torch.bool)
    biases = segments.student_biases(torch.device("cpu"), torch.float32)
    for (start, prompt, teacher, student), bias in zip(segments.spans, biases):
        shared = slice(start, start + prompt + teacher)
        seen[shared, shared] = torch.ones(prompt + teacher, prompt + teacher, dtype=torch.bool).tril()
        if student:
            rows = slice(start + prompt + teacher, start + prompt + teacher + student)
            visible = bias == 0  # (S, P+S) over [prompt | student] keys
            seen[rows, start:start + prompt] = visible[:, :prompt]
            seen[rows, rows] = visible[:, prompt:]
    return seen


def test_row_roles_of_the_exact_packed_row():
    # collate_packed's exact row (tests/test_packing.py): pair 0 = 3 | 3 | 2, pair 1 identical (student left out)
    pair_of, role = row_roles([(0, 3, 3, 2), (8, 2, 2, 0)])
    assert pair_of.tolist() == [0] * 8 + [1] * 4
    assert role.tolist() == [PROMPT] * 3 + [TEACHER] * 3 + [STUDENT] * 2 + [PROMPT] * 2 + [TEACHER] * 2


def test_hand_mask_student_sees_prompt_and_itself_only():
    mask = dense_mask([(0, 2, 2, 2), (6, 1, 1, 0)]).int().tolist()
    assert mask == [  # keys: p p t t s s | p t
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0, 0],  # student: the prompt, not the teacher
        [1, 1, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 0, 1, 0],  # the next pair sees nothing of the first
        [0, 0, 0, 0, 0, 0, 1, 1],
    ]


def test_flex_mask_equals_the_per_pair_attention_mask():
    pairs = random_pairs(9, seed=11, identical=(3,))
    batch = collate_packed(pairs, np.arange(9), PAD, ScoreConfig())
    assert torch.equal(dense_mask(batch.segments.spans), per_pair_mask(batch.segments))


def test_block_mask_keeps_every_tile_a_query_needs():
    # long pairs over many 128-token tiles: the kernel computes only the tiles the BlockMask lists
    rng = np.random.default_rng(0)
    spans, start = [], 0
    for _ in range(5):
        prompt, teacher, student = (int(x) for x in rng.integers(20, 200, 3))
        spans.append((start, prompt, teacher, student))
        start += prompt + teacher + student
    block_mask = pair_block_mask(spans, torch.device("cpu"))
    dense = dense_mask(spans)
    tiles = -(-start // 128)
    padded = torch.zeros(tiles * 128, tiles * 128, dtype=torch.bool)
    padded[:start, :start] = dense
    needed = padded.view(tiles, 128, tiles, 128).any(dim=3).any(dim=1)  # (q tiles, kv tiles)
    listed = block_mask.to_dense()[0, 0].bool()
    assert torch.equal(listed, needed)
    assert listed.sum() < tiles * (tiles + 1) // 2  # other pairs' tiles are skipped, not only the causal half


@pytest.mark.parametrize("reduction", ["mean", "last"])
def test_flex_scores_equal_sdpa_per_pair_and_padded(reduction, torch_threads):
    model = build_critic()
    pairs, index = random_pairs(9, seed=1, identical=(2, 6)), np.array([4, 0, 8, 2, 1, 7, 6, 3, 5])
    per_pair_cfg = ScoreConfig(reduction=reduction, layout="packed", attention="sdpa_per_pair")
    want = scores(model, pairs, index, per_pair_cfg)
    got = scores(model, pairs, index, dataclasses.replace(per_pair_cfg, attention="flex"))
    padded = scores(model, pairs, index, dataclasses.replace(per_pair_cfg, layout="padded"))
    for flex_scores, per_pair_scores, padded_scores in zip(got, want, padded):
        tolerance = score_tolerance(per_pair_scores)  # the same terms as the per-pair path, in another order
        torch.testing.assert_close(flex_scores, per_pair_scores, atol=tolerance, rtol=0)
        torch.testing.assert_close(flex_scores, padded_scores, atol=tolerance, rtol=0)
    assert torch.equal(got[0][[3, 6]], got[1][[3, 6]])  # pairs 2 and 6 (identical texts): exact ties
    # the same model switches back: sdpa_per_pair again gives its own scores bit for bit
    for again, first in zip(scores(model, pairs, index, per_pair_cfg), want):
        assert torch.equal(again, first)


def test_flex_critic_runs_plain_sdpa_on_padded_batches():
    model, flex_model = build_critic(), build_critic()
    pairs = random_pairs(4, seed=4)
    scores(flex_model, pairs, np.arange(2), ScoreConfig(attention="flex"))  # switches it to flex
    cfg = ScoreConfig(layout="padded")
    for want, got in zip(scores(model, pairs, np.arange(4), cfg), scores(flex_model, pairs, np.arange(4), cfg)):
        assert torch.equal(want, got)


def test_flex_training_on_cpu_says_what_to_set():
    model = build_critic().train()
    cfg = ExperimentConfig(score=ScoreConfig(attention="flex"), train=TrainConfig(batch_size=2, micro_batch_size=2))
    with pytest.raises(SpecError, match="flex trains on CUDA only.*set score.attention: sdpa_per_pair"):
        train_step(model, random_pairs(2, seed=5), np.arange(2), cfg, torch.device("cpu"), PAD)


@pytest.mark.parametrize("raw, match", [
    ({"score": {"attention": "flash"}}, r"score\.attention must be sdpa_per_pair or flex; got 'flash'"),
    ({"score": {"attention": "flex", "layout": "padded"}}, "applies to score.layout: packed only"),
    ({"score": {"attention": "flex"}, "model": {"device": "cpu"}}, "with model.device: cpu set score.attention"),
])
def test_bad_attention_fails_at_load(raw, match):
    with pytest.raises(SpecError, match=match):
        build_config(raw)
