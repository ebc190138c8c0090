"""`export --format verl`: verl's own config composes with the exported overrides and holds our values."""

from __future__ import annotations

import copy

import optuna
import pytest

from critic.config import SpecError
from sweeper.export import render
from sweeper.study import load_sweep_spec
from sweeper.verl_export import parse_overrides, resolve_version, verl_export
from tests.verl_helpers import FIXTURES, compose, verl_config_dir, verl_version

TEMPERATURE_KEYS = {"loss.adaptive_temperature": "critic.adaptive_temperature", "loss.t_min": "critic.temperature_min",
                    "loss.t_max": "critic.temperature_max"}
VERL_SPEC = {  # a trial described in verl's units, the users' run: 64 prompts x 4 responses per iteration
    "loss": {"adaptive_temperature": True},
    "train": {"lr": 1.0e-6, "grad_clip": 0.5, "scheduler": "cosine"},
    "verl": {"train_batch_size": 64, "rollout_n": 4, "ppo_mini_batch_size": 16, "ppo_micro_batch_size_per_gpu": 8,
             "critic_warmup": 20, "lr_warmup_steps": 3, "total_training_steps": 800},
    "sweep": {"search_space": {"train.lr": {"type": "float", "low": 1.0e-7, "high": 1.0e-5, "log": True},
                               "verl.critic_warmup": {"type": "int", "low": 20, "high": 50},
                               "verl.ppo_epochs": {"type": "int", "low": 1, "high": 2},
                               "loss.t_max": {"type": "float", "low": 1.5, "high": 4.0}}},
    "export": {"verl_keys": TEMPERATURE_KEYS},
}
TRAIN_SPEC = {  # the same search described in optimizer steps (train.*), like the demo
    "loss": {"adaptive_temperature": True},
    "train": {"lr": 1.0e-6, "batch_size": 32, "micro_batch_size": 16, "warmup_steps": 20, "epochs": 1,
              "scheduler": "cosine"},
    "sweep": {"search_space": {"train.lr": {"type": "float", "low": 1.0e-7, "high": 1.0e-5, "log": True},
                               "train.warmup_steps": {"type": "int", "low": 0, "high": 50}}},
    "export": {"verl_keys": TEMPERATURE_KEYS},
}


def spec_and_trial(raw: dict, params: dict):
    spec = load_sweep_spec("spec.yaml", raw=copy.deepcopy(raw))
    distributions = {e.key: e.distribution for e in spec.entries if e.key in params}
    return spec, optuna.trial.create_trial(params=params, distributions=distributions, value=0.9)


VERL_PARAMS = {"train.lr": 2.0e-6, "verl.critic_warmup": 50, "verl.ppo_epochs": 2, "loss.t_max": 3.0}


@pytest.mark.parametrize("version, config_dir, scheduler_key, clip_key", [
    ("0.9", None, "lr_scheduler_type", "optim.clip_grad"),  # the installed verl (requirements-verl.txt)
    ("0.5", FIXTURES / "verl-0.5.0", "warmup_style", "grad_clip"),  # verl 0.5.0's yaml, kept as a fixture
])
def test_export_composes_with_verls_config_and_holds_our_values(version, config_dir, scheduler_key, clip_key):
    if config_dir is None:
        config_dir = verl_config_dir()
        assert verl_version().startswith(version + ".")
    spec, trial = spec_and_trial(VERL_SPEC, VERL_PARAMS)
    exported = verl_export(spec, trial, version)
    cfg = compose(config_dir, parse_overrides(exported.text()))
    critic = cfg.critic
    assert critic.optim.lr == 2.0e-6 and cfg.trainer.critic_warmup == 50
    assert critic.optim.lr_warmup_steps == 3 and critic.optim.lr_warmup_steps_ratio == 0.0  # iterations, no ratio
    assert critic.optim[scheduler_key] == "cosine"
    assert (critic.optim.clip_grad if clip_key == "optim.clip_grad" else critic.grad_clip) == 0.5
    assert critic.ppo_micro_batch_size_per_gpu == 8 and critic.use_dynamic_bsz is False  # part of the adaptive loss
    assert critic.ppo_epochs == 2  # swept
    assert (critic.adaptive_temperature, critic.temperature_min, critic.temperature_max) == (True, 0.3, 3.0)
    assert cfg.trainer.total_epochs == compose(config_dir, []).trainer.total_epochs  # the RL run's, untouched
    # not swept, but the lr was tuned at them: written (verl's default mini-batch is 256)
    assert (critic.ppo_mini_batch_size, cfg.data.train_batch_size, cfg.actor_rollout_ref.rollout.n) == (16, 64, 4)
    if version == "0.9":
        assert (critic.optim.min_lr_ratio, critic.optim.num_cycles, critic.optim.zero_indexed_step) == (0.0, 0.5, True)
    assert any("total_training_steps=800" in note for note in exported.notes)


def test_trial_in_optimizer_steps_exports_what_verl_can_express_and_says_what_it_cannot(capsys):
    spec, trial = spec_and_trial(TRAIN_SPEC, {"train.lr": 3.0e-6, "train.warmup_steps": 20})
    text = render(spec, trial, "verl")
    overrides = parse_overrides(text)
    keys = {line.split("=", 1)[0] for line in overrides}
    assert "critic.optim.lr=3e-06" in overrides and "critic.optim.clip_grad=1.0" in overrides
    # optimizer steps and a per-trial cosine have no verl unit: not written, said in the file and on stderr
    assert not keys & {"trainer.total_epochs", "trainer.critic_warmup", "critic.optim.lr_warmup_steps",
                       "critic.optim.lr_scheduler_type"}
    stderr = capsys.readouterr().err
    for said in ("trainer.critic_warmup not written", "lr warmup not written", "train.scheduler=cosine not written"):
        assert said in stderr and said in text
    assert "critic.ppo_micro_batch_size_per_gpu=16" in overrides  # adaptive T: the micro-batch is part of the loss
    cfg = compose(verl_config_dir(), overrides)
    assert cfg.critic.optim.lr == 3e-06 and cfg.critic.temperature_max == 2.0


def test_zero_lr_warmup_is_written_with_a_zero_ratio_so_verl_does_not_fall_back_to_it():
    spec, trial = spec_and_trial(TRAIN_SPEC, {"train.lr": 3.0e-6, "train.warmup_steps": 0})
    overrides = verl_export(spec, trial).overrides
    assert "critic.optim.lr_warmup_steps=0" in overrides and "critic.optim.lr_warmup_steps_ratio=0.0" in overrides


@pytest.mark.parametrize("version, worker, clip_key", [
    ("0.9", None, "critic.optim.clip_grad"), ("0.8.0", None, "critic.optim.clip_grad"),
    ("0.7", None, "critic.grad_clip"), ("0.7", "engine", "critic.optim.clip_grad"),
    ("0.6", "legacy", "critic.grad_clip"),
    ("0.5", None, "critic.grad_clip"), ("0.4.1", None, "critic.grad_clip"),
])
def test_clip_key_is_the_one_the_chosen_worker_reads(version, worker, clip_key):
    spec, trial = spec_and_trial(VERL_SPEC, VERL_PARAMS)
    assert f"{clip_key}=0.5" in verl_export(spec, trial, version, worker).overrides


@pytest.mark.parametrize("version, worker, message", [
    ("0.3", None, r"--verl-version 0.3: supported are 0.4, 0.5, 0.6, 0.7, 0.8, 0.9"),
    ("0.9", "legacy", r"verl 0.9 has the engine critic worker only; choose engine"),
    ("0.5", "engine", r"verl 0.5 has the legacy critic worker only"),
])
def test_unsupported_version_or_worker_is_refused(version, worker, message):
    with pytest.raises(SpecError, match=message):
        resolve_version(version, worker)


def test_key_verl_does_not_define_must_not_be_written_bare():
    spec, trial = spec_and_trial(VERL_SPEC, VERL_PARAMS)
    overrides = parse_overrides(verl_export(spec, trial).text())
    assert "++critic.temperature_max=3.0" in overrides  # ++: also accepted where the fork's yaml defines the key
    with pytest.raises(Exception, match=r"Could not override 'critic.adaptive_temperature'"):
        compose(verl_config_dir(), [line.lstrip("+") for line in overrides])


LORA_SPEC = {**TRAIN_SPEC, "model": {"lora": {"rank": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}},
             "sweep": {"search_space": {**TRAIN_SPEC["sweep"]["search_space"],
                                        "model.lora.rank": {"type": "categorical", "choices": [0, 8, 16]}}}}


@pytest.mark.parametrize("version, config_dir, adapter_key", [
    ("0.9", None, True),  # the installed verl 0.9.1: critic.model.lora_adapter_path exists
    ("0.5", FIXTURES / "verl-0.5.0", False),  # verl 0.5.0 has the LoRA keys but no adapter path
])
def test_lora_trial_exports_verls_lora_keys_and_the_adapter(version, config_dir, adapter_key):
    spec, trial = spec_and_trial(LORA_SPEC, {"train.lr": 3.0e-6, "train.warmup_steps": 0, "model.lora.rank": 16})
    exported = verl_export(spec, trial, version, weights="/ckpt/trial-3")
    critic = compose(config_dir or verl_config_dir(), parse_overrides(exported.text())).critic
    assert (critic.model.lora_rank, critic.model.lora_alpha) == (16, 16)  # the trial's rank, the spec's alpha
    assert list(critic.model.target_modules) == ["q_proj", "v_proj"]
    if adapter_key:
        assert critic.model.lora_adapter_path == "/ckpt/trial-3/adapter"
        assert any("critic.model.path=<weights dir>" in note for note in exported.notes)  # the merged alternative
    else:
        assert not any("lora_adapter_path" in line for line in exported.overrides)
        assert any("verl 0.5 has no critic.model.lora_adapter_path" in note for note in exported.notes)


def test_lora_trial_without_weights_says_the_value_head_would_start_untrained():
    spec, trial = spec_and_trial(LORA_SPEC, {"train.lr": 3.0e-6, "train.warmup_steps": 0, "model.lora.rank": 8})
    exported = verl_export(spec, trial)
    assert "critic.model.lora_rank=8" in exported.overrides
    assert not any("lora_adapter_path" in line for line in exported.overrides)
    assert any("untrained, frozen value head (verl#4620)" in note and "--weights DIR" in note
               for note in exported.notes)


def test_full_fine_tuning_trial_writes_no_lora_keys():
    spec, trial = spec_and_trial(LORA_SPEC, {"train.lr": 3.0e-6, "train.warmup_steps": 0, "model.lora.rank": 0})
    assert not any("lora" in line for line in verl_export(spec, trial, weights="/ckpt").overrides)
