"""The micro-batch is part of the loss under adaptive temperature; smaller forwards (the OOM retry) keep it."""

from __future__ import annotations

import numpy as np
import optuna
import pytest
import torch

from critic.config import DataConfig, build_config
from critic.data import tokenize_pairs
from critic.demo import make_demo_frame
from critic.model import fresh_critic
from critic.train import train_step
from sweeper import study as study_mod
from sweeper.sweep import Sweep
from tests.helpers import simulate_device, tiny_tolerance
from tests.sweep_helpers import mlflow_uri, tiny_sweep_spec

CPU = torch.device("cpu")
ROW_TOKENS = 32 + 2 * 24  # the pairs below: prompts cut at 32 tokens, responses at 24
# Loss, T and every gradient, relative to the largest gradient entry: the same float32 sums split into other
# forwards, so reordered; a weight's gradient also sums over the step's 16 pairs (tests/helpers.py).
TOLERANCE = tiny_tolerance(1.0, ROW_TOKENS, batch_tokens=16 * ROW_TOKENS)


@pytest.fixture(scope="module")
def pairs(tiny_critic):
    frame = make_demo_frame("train").head(16).reset_index(drop=True)
    return tokenize_pairs(frame, DataConfig(max_prompt_length=32, max_response_length=24), tiny_critic.tokenizer, "mb")


def one_step(tiny_critic, pairs, **train):
    """Loss, T and gradients of one optimizer step over the 16 pairs, from the same initial weights."""
    cfg = build_config({"loss": {"adaptive_temperature": True, "t_a": 0.2, "t_b": 4.0, "t_max": 10.0},
                        "train": {"batch_size": 16, **train}})
    model = fresh_critic(tiny_critic, cfg.model, CPU)
    _, _, loss, temperature, _ = train_step(model, pairs, np.arange(16), cfg, CPU, tiny_critic.tokenizer.pad_token_id)
    return float(loss), float(temperature), torch.cat([p.grad.flatten() for p in model.parameters()])


def gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


@pytest.mark.parametrize("forward", [4, 1])
def test_smaller_forwards_keep_the_adaptive_loss_and_its_gradients(tiny_critic, pairs, forward, torch_threads):
    loss, temperature, grads = one_step(tiny_critic, pairs, micro_batch_size=8)
    split = one_step(tiny_critic, pairs, micro_batch_size=8, forward_micro_batch_size=forward)
    assert split[0] == pytest.approx(loss, rel=TOLERANCE) and split[1] == pytest.approx(temperature, rel=TOLERANCE)
    assert gap(grads, split[2]) < TOLERANCE


def test_a_smaller_micro_batch_is_another_loss_under_adaptive_temperature(tiny_critic, pairs):
    # What the old retry did (halve micro_batch_size): T per 4 pairs instead of 8 -> other gradients.
    _, _, grads = one_step(tiny_critic, pairs, micro_batch_size=8)
    _, _, halved = one_step(tiny_critic, pairs, micro_batch_size=4)
    assert gap(grads, halved) > 10 * TOLERANCE  # another loss lands far outside the rounding bound (24x here)


def mlflow_curves(tmp_path, tiny_cache_dir, device_pairs: str | None, monkeypatch) -> dict[str, list[float]]:
    """Per-step loss and gradient norm of one sweep trial (adaptive T, micro-batch 4), on a device of N pairs."""
    spec = study_mod.load_sweep_spec(str(tiny_sweep_spec(
        tmp_path, sweep={"n_trials": 1, "baseline": {}, "search_space": {
            "train.micro_batch_size": {"type": "categorical", "choices": [4]}}},
        extra={"data": {"cache_dir": str(tiny_cache_dir)}, "loss": {"adaptive_temperature": True, "t_b": 4.0}})))
    sweep = Sweep.init(spec, f"sqlite:///{tmp_path / 'o.db'}", mlflow_uri(tmp_path, 'm.db'))
    study, tracker = sweep.study, sweep.tracker
    if device_pairs:
        simulate_device(monkeypatch, int(device_pairs))
    sweep.run_trials(1, progress=False)
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.COMPLETE
    assert trial.user_attrs.get("oom_retry", False) is bool(device_pairs)
    run_id = trial.user_attrs["mlflow_run_id"]
    return {key: [m.value for m in sorted(tracker.client.get_metric_history(run_id, key), key=lambda m: m.step)]
            for key in ("critic/loss", "critic/grad_norm", "critic/temperature")}


def test_out_of_memory_retry_optimises_the_same_loss(tmp_path, tiny_cache_dir, monkeypatch):
    plain = mlflow_curves(tmp_path / "plain", tiny_cache_dir, None, monkeypatch)
    retried = mlflow_curves(tmp_path / "retried", tiny_cache_dir, "3", monkeypatch)  # 4 pairs OOM -> forwards of 2
    for key, values in plain.items():
        assert len(values) == 6 and retried[key] == pytest.approx(values, rel=TOLERANCE), key


def test_forward_micro_batch_larger_than_the_loss_micro_batch_is_refused():
    from critic.config import SpecError
    with pytest.raises(SpecError, match=r"train.forward_micro_batch_size must be null or in 1..train.micro_batch_size"):
        build_config({"train": {"micro_batch_size": 4, "forward_micro_batch_size": 8}})
