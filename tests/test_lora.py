"""LoRA critics (model.lora): the value head trains and is saved, the adapters change, the base does not."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from critic.checkpoint import ADAPTER_DIR, load_adapter, load_checkpoint, save_trial_checkpoint
from critic.config import SpecError
from critic.model import fresh_critic, load_base_critic, merged_critic
from critic.reporting import RecordingReporter
from critic.score import score_pairs
from critic.trial import prepare, run_trial
from sweeper.export import render
from sweeper.space import parse_space
from sweeper.study import config_for, load_sweep_spec
from sweeper.verl_export import parse_overrides
from tests.helpers import demo_pairs, tiny_config, tiny_tolerance
from tests.sweep_helpers import mlflow_uri
from tests.verl_helpers import compose, verl_config_dir

LORA = {"model.lora.rank": 4, "model.lora.alpha": 8}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_cache_dir):
    """A LoRA trial of 3 steps on 24 demo pairs (lr high enough that every trained weight visibly moves)."""
    folder = tmp_path_factory.mktemp("lora")
    cfg = tiny_config(demo_pairs(folder / "pairs.parquet", 24), tiny_cache_dir,
                      {**LORA, "train.lr": 1e-2, "eval.every_steps": 10})
    recorder = RecordingReporter()
    result = run_trial(cfg, recorder, keep_model=True)
    return cfg, result, recorder


def assert_same_scores(merged: torch.Tensor, adapted: torch.Tensor, cfg) -> None:
    """float32 on the CPU: W + (alpha / r) * B @ A folded into W changes each score by float rounding only; the
    fold adds a sum over the rank's terms to each projection (tests/helpers.py tiny_tolerance)."""
    tokens = cfg.data.max_prompt_length + cfg.data.max_response_length
    tolerance = tiny_tolerance(adapted.numpy(), tokens, batch_tokens=cfg.model.lora.rank)
    torch.testing.assert_close(merged, adapted, rtol=0, atol=tolerance)


def _heldout_scores(model, cfg):
    """Scores of the val pairs through the one scoring path, on the CPU."""
    _, base, data = prepare(cfg)
    pairs = data.eval_sets["val"]
    with torch.no_grad():
        teacher, student, _ = score_pairs(model.eval(), pairs, np.arange(len(pairs)), base.tokenizer.pad_token_id,
                                          cfg.score, torch.device("cpu"))
    return torch.stack([teacher, student])


def test_training_moves_the_value_head_and_the_adapters_but_not_the_base(lora_run):
    cfg, result, _ = lora_run
    base = load_base_critic(cfg.model, cfg.data.cache_dir).model
    initial = {name: p for name, p in base.named_parameters()}
    head, lora_a, lora_b, frozen = 0, 0, 0, 0
    for name, param in result.model.named_parameters():
        if "modules_to_save" in name:  # base_model.model.score.modules_to_save.default.weight
            assert param.requires_grad and not torch.equal(param, initial[f"score.{name.rsplit('.', 1)[-1]}"]), name
            head += 1
        elif "lora_A" in name or "lora_B" in name:
            assert param.requires_grad
            if "lora_B" in name:  # B starts at zero, so the adapter starts as the identity
                assert param.abs().sum() > 0, name
                lora_b += 1
            else:
                lora_a += 1
        else:  # the body (and the original head, kept as base_layer) is frozen and bit-identical
            original = name.removeprefix("base_model.model.").replace(".base_layer", "")
            original = original.replace("score.original_module.", "score.")
            assert not param.requires_grad and torch.equal(param, initial[original]), name
            frozen += 1
    layers, targets = 2, len(cfg.model.lora.target_modules)
    assert (head, lora_a, lora_b) == (2, layers * targets, layers * targets) and frozen > 0
    assert result.metrics["model/trainable_params"] < 0.2 * sum(p.numel() for p in base.parameters())
    assert 0 < result.metrics["model/trainable_fraction"] < 0.2


def test_lora_copy_leaves_the_cached_base_critic_untouched(lora_run):
    cfg, result, _ = lora_run
    base = load_base_critic(cfg.model, cfg.data.cache_dir).model
    assert not any("lora" in name for name, _ in base.named_parameters())  # peft did not wrap the cached model
    fresh = fresh_critic(load_base_critic(cfg.model, cfg.data.cache_dir), cfg.model, torch.device("cpu"))
    assert torch.equal(_heldout_scores(fresh, cfg), _heldout_scores(base, cfg))  # B = 0: a fresh adapter is a no-op


def test_saved_adapter_reloads_the_same_head_and_scores(lora_run, tmp_path):
    cfg, result, recorder = lora_run
    directory = save_trial_checkpoint(result, cfg, recorder.train, tmp_path / "ckpt")
    assert (directory / ADAPTER_DIR / "adapter_config.json").is_file()
    base = copy.deepcopy(load_base_critic(cfg.model, cfg.data.cache_dir).model)
    reloaded = load_adapter(base, directory)
    trained_head = result.model.base_model.model.score.modules_to_save["default"].weight
    assert torch.equal(reloaded.base_model.model.score.modules_to_save["default"].weight, trained_head)
    assert torch.equal(_heldout_scores(reloaded, cfg), _heldout_scores(result.model, cfg))
    merged, _, saved_cfg, _ = load_checkpoint(directory)  # the top level is the merged critic, a plain HF model
    assert saved_cfg.model.lora.rank == 4
    assert_same_scores(_heldout_scores(merged, cfg), _heldout_scores(result.model, cfg), cfg)


def test_merge_and_unload_keeps_the_scores(lora_run):
    cfg, result, _ = lora_run
    merged = merged_critic(result.model)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert any("lora" in name for name, _ in result.model.named_parameters())  # the trained model is untouched
    assert_same_scores(_heldout_scores(merged, cfg), _heldout_scores(result.model, cfg), cfg)


def test_lora_with_gradient_checkpointing_and_the_padded_layout_trains(tmp_path, tiny_cache_dir):
    cfg = tiny_config(demo_pairs(tmp_path / "pairs.parquet", 16), tiny_cache_dir,
                      {**LORA, "model.gradient_checkpointing": True, "score.layout": "padded", "train.max_steps": 1})
    result = run_trial(cfg, keep_model=True)
    head = result.model.base_model.model.score.modules_to_save["default"].weight
    base = load_base_critic(cfg.model, cfg.data.cache_dir).model
    assert not torch.equal(head, base.score.weight)
    assert any(p.requires_grad and "lora_B" in n and p.abs().sum() > 0 for n, p in result.model.named_parameters())


@pytest.mark.parametrize("override, message", [
    ({"model.lora.rank": -1}, r"model\.lora\.rank must be >= 0 \(0 = no LoRA"),
    ({"model.lora.target_modules": []}, r"model\.lora\.target_modules must be a non-empty list of module names"),
    ({"model.lora.alpha": 0}, r"model\.lora\.alpha must be > 0"),
    ({"model.lora.dropout": 1.0}, r"model\.lora\.dropout must be in \[0, 1\)"),
    ({"model.lora.rnk": 8}, r"model\.lora: unknown key\(s\) \['rnk'\]\. Valid keys: alpha, dropout, rank"),
])
def test_bad_lora_values_stop_at_load(tmp_path, override, message):
    with pytest.raises(SpecError, match=message):
        tiny_config(tmp_path / "unused.parquet", tmp_path, override)


@pytest.mark.parametrize("targets, message", [
    (["q_proj", "qkv_proj"], r"model\.lora\.target_modules \['qkv_proj'\] name no linear layer of this critic "
                             r"\(Qwen2ForTokenClassification\); its layers are \[.*'q_proj'.*\]: set"),
    (["score"], r"'score' is the value head, which is always trained whole; remove it"),
])
def test_unknown_target_module_is_named_with_the_ones_that_exist(tmp_path, tiny_cache_dir, tiny_critic, targets,
                                                                  message):
    cfg = tiny_config(tmp_path / "unused.parquet", tiny_cache_dir, {**LORA, "model.lora.target_modules": targets})
    with pytest.raises(SpecError, match=message):
        fresh_critic(tiny_critic, cfg.model, torch.device("cpu"))


def test_search_space_over_lora_rank(tmp_path):
    raw = {"model": {"lora": {"alpha": 32}},
           "sweep": {"search_space": {"model.lora.rank": {"type": "categorical", "choices": [0, 8, 16]},
                                      "train.lr": {"type": "float", "low": 1.0e-5, "high": 1.0e-3, "log": True}},
                     "baseline": {"model.lora.rank": 0, "train.lr": 1.0e-4}}}
    spec = load_sweep_spec("spec.yaml", raw=raw)
    assert [e.key for e in spec.entries] == ["model.lora.rank", "train.lr"]
    cfg = config_for(spec, {"model.lora.rank": 16, "train.lr": 2.0e-4}, "trial 1")
    assert (cfg.model.lora.rank, cfg.model.lora.alpha, cfg.train.lr) == (16, 32, 2.0e-4)  # alpha from the spec
    assert spec.raw["model"]["lora"] == {"alpha": 32}  # the trial's value did not leak into the spec
    with pytest.raises(SpecError, match=r"model\.lora\.rank must be >= 0"):
        load_sweep_spec("spec.yaml", raw={"sweep": {"search_space": {
            "model.lora.rank": {"type": "int", "low": -4, "high": 8}}}})
    with pytest.raises(SpecError, match=r"unknown key 'model\.lora\.rnk'\. Valid keys in 'model\.lora': alpha"):
        parse_space({"model.lora.rnk": {"type": "int", "low": 0, "high": 8}})
    with pytest.raises(SpecError, match=r"key 'model\.lora' is a block; sample one of its keys, e.g. model\.lora\.r"):
        parse_space({"model.lora": {"type": "categorical", "choices": [0]}})



def test_export_weights_writes_the_trials_adapter_and_merged_critic_for_verl(lora_run, tmp_path):
    """`export --format verl --weights DIR`: the trial's checkpoint artifact (real MLflow store) lands in DIR."""
    import argparse

    import optuna
    from mlflow import MlflowClient

    from sweeper.commands.export import write_weights
    cfg, result, recorder = lora_run
    uri = mlflow_uri(tmp_path)
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("lora", (tmp_path / "artifacts").as_uri())).info.run_id
    client.log_artifacts(run_id, str(save_trial_checkpoint(result, cfg, recorder.train, tmp_path / "c")), "checkpoint")
    study = optuna.create_study()
    study.add_trial(optuna.trial.create_trial(value=0.5, user_attrs={"mlflow_run_id": run_id}))
    args = argparse.Namespace(storage=None, tracking_uri=uri)
    weights = write_weights(args, study, 0, tmp_path / "weights")
    assert (weights / ADAPTER_DIR / "adapter_config.json").is_file() and (weights / "config.json").is_file()
    spec = load_sweep_spec("spec.yaml", raw={"model": {"lora": {"rank": 4, "alpha": 8}}, "sweep": {"search_space": {
        "train.lr": {"type": "float", "low": 1.0e-5, "high": 1.0e-3, "log": True}}}})
    trial = optuna.trial.create_trial(params={"train.lr": 1.0e-4}, distributions={
        "train.lr": spec.entries[0].distribution}, value=0.5)
    overrides = parse_overrides(render(spec, trial, "verl", weights=str(weights)))
    critic = compose(verl_config_dir(), overrides).critic
    assert (critic.model.lora_rank, critic.model.lora_alpha) == (4, 8)
    assert critic.model.lora_adapter_path == f"{weights}/adapter"
    with pytest.raises(SpecError, match="already exists and is not empty; choose a new directory"):
        write_weights(args, study, 0, weights)
