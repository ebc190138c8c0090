"""The verl section: verl's units -> optimizer steps (one table), its rules, verl's lr schedule and batch order."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from critic.config import SpecError, TrainConfig, VerlConfig, apply_overrides, build_config, to_dict
from critic.reporting import RecordingReporter
from critic.train import build_optimizer, step_batches, total_steps
from critic.trial import run_trial
from critic.verl_units import lr_multiplier, verl_batches, verl_steps
from tests.helpers import demo_pairs, hand_pair_set, tiny_config
from tests.verl_helpers import import_verl

USERS = {"train_batch_size": 64, "rollout_n": 4, "ppo_mini_batch_size": 16, "ppo_micro_batch_size_per_gpu": 8,
         "critic_warmup": 20}  # a run like the users': 64 prompts x 4 responses, 4 mini-batches per iteration


# --- the mapping: one row per case, every output of verl_steps ------------------------------------------------

@pytest.mark.parametrize("verl, expected", [
    # (train_batch_size, rollout_n, ppo_mini_batch_size, ppo_epochs, micro, critic_warmup, lr_warmup_steps)
    #  -> (pairs/iteration, batch_size, mini-batches/iteration, steps/iteration, warmup iterations, max_steps,
    #      warmup_steps)
    ((8, 4, 8, 1, 16, 20, 0), (32, 32, 1, 1, 19, 19, 0)),  # one optimizer step per iteration
    ((64, 4, 16, 1, 8, 20, 0), (256, 64, 4, 4, 19, 76, 0)),  # the users' 20 ...
    ((64, 4, 16, 1, 8, 50, 0), (256, 64, 4, 4, 49, 196, 0)),  # ... and the 50 they want to try
    ((256, 8, 64, 2, 4, 50, 5), (2048, 512, 4, 8, 49, 392, 40)),  # ppo_epochs 2 doubles the steps per iteration
    ((1024, 1, 256, 1, 8, 2, 3), (1024, 256, 4, 4, 1, 4, 12)),  # the smallest warmup: one critic-only iteration
    ((96, 2, 32, 3, 8, 10, 3), (192, 64, 3, 9, 9, 81, 27)),
])
def test_verl_units_to_optimizer_steps(verl, expected):
    names = ("train_batch_size", "rollout_n", "ppo_mini_batch_size", "ppo_epochs", "ppo_micro_batch_size_per_gpu",
             "critic_warmup", "lr_warmup_steps")
    steps = verl_steps(VerlConfig(**dict(zip(names, verl))))
    assert (steps.pairs_per_iteration, steps.batch_size, steps.mini_batches_per_iteration, steps.steps_per_iteration,
            steps.warmup_iterations, steps.max_steps, steps.warmup_steps) == expected
    assert steps.micro_batch_size == verl[4]


# --- the section in a spec ---------------------------------------------------------------------------------------

def test_verl_section_sets_the_train_fields_and_round_trips():
    cfg = build_config({"verl": {**USERS, "lr_warmup_steps": 2}})
    assert (cfg.train.batch_size, cfg.train.micro_batch_size, cfg.train.max_steps, cfg.train.warmup_steps,
            cfg.train.epochs) == (64, 8, 76, 8, 1)
    assert build_config(to_dict(cfg)) == cfg  # an exported spec loads back to the same trial
    assert not build_config({}).verl.in_use() and build_config({}).train == TrainConfig()


def test_train_field_that_agrees_is_accepted_and_one_that_conflicts_is_refused():
    build_config({"verl": USERS, "train": {"batch_size": 64, "lr": 1e-5}})  # same value, and a non-derived key
    with pytest.raises(SpecError, match=r"train.warmup_steps=20 conflicts with the verl section, which gives "
                                        r"train.warmup_steps=0.*remove train.warmup_steps"):
        build_config({"verl": USERS, "train": {"warmup_steps": 20}}, "spec.yaml")


@pytest.mark.parametrize("change, message", [
    ({"critic_warmup": None}, r"set verl.critic_warmup too"),
    ({"critic_warmup": 1}, r"critic_warmup must be >= 2.*N-1"),
    ({"ppo_mini_batch_size": 24}, r"train_batch_size \(64\) must be a multiple of verl.ppo_mini_batch_size \(24\)"),
    ({"ppo_micro_batch_size_per_gpu": 3}, r"micro-batches of ppo_micro_batch_size_per_gpu=3"),
    ({"n_gpus": 16}, r"over n_gpus=16 GPUs"),  # 64 pairs per mini-batch / 16 GPUs = 4 < the micro-batch of 8
    ({"lr_warmup_steps": -1}, r"lr_warmup_steps must be >= 0"),
    ({"total_training_steps": 10}, r"total_training_steps \(10\) must be >= verl.critic_warmup \(20\)"),
])
def test_verl_section_rules(change, message):
    with pytest.raises(SpecError, match=message):
        build_config({"verl": {**USERS, **change}})


@pytest.mark.parametrize("scheduler, extra, message", [
    ("linear", {}, r"linear does not exist in verl's critic"),
    ("cosine", {}, r"cosine with a verl section needs verl.total_training_steps"),
])
def test_schedules_verl_cannot_run_are_refused(scheduler, extra, message):
    with pytest.raises(SpecError, match=message):
        build_config({"verl": {**USERS, **extra}, "train": {"scheduler": scheduler}})


def test_search_space_can_sample_critic_warmup_and_refuses_a_train_field_the_section_sets(tmp_path):
    from sweeper.study import load_sweep_spec
    raw = {"verl": USERS, "sweep": {"search_space": {"verl.critic_warmup": {"type": "int", "low": 20, "high": 50}},
                                    "baseline": {"verl.critic_warmup": 20}}}
    spec = load_sweep_spec("spec.yaml", raw=raw)
    assert [e.key for e in spec.entries] == ["verl.critic_warmup"]
    assert build_config(apply_overrides(raw, {"verl.critic_warmup": 50})).train.max_steps == 49 * 4
    raw["sweep"]["search_space"]["train.warmup_steps"] = {"type": "int", "low": 0, "high": 5}
    with pytest.raises(SpecError, match=r"train.warmup_steps=5 conflicts with the verl section"):
        load_sweep_spec("spec.yaml", raw=raw)


# --- verl's lr schedule: per iteration, against verl's own scheduler functions ------------------------------

@pytest.mark.parametrize("scheduler", ["constant", "cosine"])
def test_lr_follows_verls_scheduler_stepped_once_per_iteration(scheduler):
    torch_functional = import_verl("verl.utils.torch_functional")
    verl = VerlConfig(**{**USERS, "lr_warmup_steps": 3, "total_training_steps": 40})
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=1.0)
    if scheduler == "constant":  # as verl builds it (fsdp_workers.py / engine/fsdp/transformer_impl.py)
        theirs = torch_functional.get_constant_schedule_with_warmup(optimizer, num_warmup_steps=3)
    else:
        theirs = torch_functional.get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=3, num_training_steps=40)
    verl_lrs = []
    for _ in range(40):  # update_critic reads the lr, updates, then steps the scheduler once
        verl_lrs.append(theirs.get_last_lr()[0])
        optimizer.step()
        theirs.step()
    assert [lr_multiplier(i, verl, scheduler) for i in range(40)] == pytest.approx(verl_lrs, abs=1e-12)
    # ...and the trial's optimizer holds each iteration's lr for its 4 optimizer steps
    cfg = build_config({"verl": dataclasses.asdict(verl), "train": {"lr": 1.0, "scheduler": scheduler}})
    _, ours = build_optimizer(torch.nn.Linear(1, 1), cfg, cfg.train.max_steps)
    step_lrs = []
    for _ in range(cfg.train.max_steps):
        step_lrs.append(ours.get_last_lr()[0])
        ours.optimizer.step()
        ours.step()
    assert step_lrs == pytest.approx([lr for lr in verl_lrs[:19] for _ in range(4)], abs=1e-12)



@pytest.mark.parametrize("scheduler", ["constant", "cosine"])
def test_v1_separate_async_steps_the_lr_once_per_local_update(scheduler):
    # P=4 local updates per iteration (verl's default parameter_sync_step), one mini-batch each: verl's scheduler
    # steps 4 times per iteration over a horizon of 40 x 4 (trainer_base.py on_train_begin)
    torch_functional = import_verl("verl.utils.torch_functional")
    verl = VerlConfig(**{**USERS, "lr_warmup_steps": 6, "total_training_steps": 40, "parameter_sync_step": 4})
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    if scheduler == "constant":
        theirs = torch_functional.get_constant_schedule_with_warmup(optimizer, num_warmup_steps=6)
    else:
        theirs = torch_functional.get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=6,
                                                                  num_training_steps=160)
    verl_lrs = []
    for _ in range(76):  # 19 critic-only iterations x 4 update_critic calls
        verl_lrs.append(theirs.get_last_lr()[0])
        optimizer.step()
        theirs.step()
    cfg = build_config({"verl": dataclasses.asdict(verl), "train": {"lr": 1.0, "scheduler": scheduler}})
    assert (cfg.train.max_steps, cfg.train.warmup_steps) == (76, 6)  # the same 76 steps; warmup: 6 calls, not 6 x 4
    _, ours = build_optimizer(torch.nn.Linear(1, 1), cfg, cfg.train.max_steps)
    step_lrs = []
    for _ in range(cfg.train.max_steps):
        step_lrs.append(ours.get_last_lr()[0])
        ours.optimizer.step()
        ours.step()
    assert step_lrs == pytest.approx(verl_lrs, abs=1e-12)


def test_v1_separate_async_runs_ppo_epochs_per_local_update_and_needs_whole_local_batches():
    verl = VerlConfig(train_batch_size=4, rollout_n=1, ppo_mini_batch_size=2, ppo_epochs=2,
                      ppo_micro_batch_size_per_gpu=2, critic_warmup=2, parameter_sync_step=2)
    batches = [b.tolist() for b, _ in verl_batches(4, verl, np.random.default_rng(0))]
    assert batches[0] == batches[1] and batches[2] == batches[3] and batches[0] != batches[2]  # m1 m1 m2 m2
    with pytest.raises(SpecError, match=r"must be verl.parameter_sync_step \(3\) local updates"):
        build_config({"verl": {**USERS, "parameter_sync_step": 3}})

# --- verl's batch order --------------------------------------------------------------------------------------

def test_verl_batches_split_each_iteration_in_order_and_repeat_it_per_ppo_epoch():
    verl = VerlConfig(train_batch_size=4, rollout_n=2, ppo_mini_batch_size=2, ppo_epochs=2,
                      ppo_micro_batch_size_per_gpu=2, critic_warmup=5)  # 8 pairs/iteration, 2 minis, 4 iterations
    batches = verl_batches(20, verl, np.random.default_rng(0))
    assert len(batches) == verl_steps(verl).max_steps == 16 and all(len(b) == 4 for b, _ in batches)
    for it in range(4):
        first, second = batches[4 * it:4 * it + 2], batches[4 * it + 2:4 * it + 4]
        assert [b.tolist() for b, _ in first] == [b.tolist() for b, _ in second]  # the same split, run again
        assert len(set(np.concatenate([b for b, _ in first]).tolist())) == 8  # 8 distinct pairs per iteration
    # 20 pairs hold 2 iterations of 8: the 4 left over are dropped, as verl's dataloader (drop_last) does;
    # the third iteration starts a new shuffle. Only first visits, first ppo epoch, are fresh.
    assert [fresh for _, fresh in batches] == [True, True, False, False] * 2 + [False] * 8
    with pytest.raises(SpecError, match=r"8 pairs per iteration, but the training split has 6"):
        verl_batches(6, verl, np.random.default_rng(0))


def _as_lists(batches):
    return [(index.tolist(), fresh) for index, fresh in batches]


def test_default_batch_order_is_verls_for_a_plain_spec_and_a_verl_spec_alike():
    # 42 pairs whose lengths rise with their index: any grouping by length would show in the batches
    pairs = hand_pair_set([([1, 2], [3] * k, [4], True, True) for k in range(1, 43)])
    plain = build_config({"train": {"batch_size": 8, "micro_batch_size": 4, "epochs": 2}})
    described = build_config({"verl": {"train_batch_size": 8, "ppo_mini_batch_size": 8,  # the same warmup in
                                       "ppo_micro_batch_size_per_gpu": 4, "critic_warmup": 11}})  # verl's units
    verls = verl_batches(len(pairs), described.verl, np.random.default_rng(3))
    for cfg in (plain, described):
        assert _as_lists(step_batches(pairs, cfg, np.random.default_rng(3))) == _as_lists(verls)
    assert len(verls) == total_steps(len(pairs), plain) == 10  # 2 passes of 5 full batches; 2 pairs left each pass
    assert [fresh for _, fresh in verls] == [True] * 5 + [False] * 5
    first_pass = np.concatenate([index for index, _ in verls[:5]])
    assert len(set(first_pass.tolist())) == 40  # a shuffle: no pair twice in one pass
    lengths = pairs.pair_lengths()
    spread = np.mean([np.ptp(lengths[index]) for index, _ in verls])
    assert spread > np.ptp(lengths) / 2  # shuffled batches span most lengths (grouped ones span a few)


def test_length_grouping_is_opt_in_with_the_same_steps_and_refused_with_a_verl_section():
    pairs = hand_pair_set([([1, 2], [3] * k, [4], True, True) for k in range(1, 43)])
    grouped = build_config({"train": {"batch_size": 8, "micro_batch_size": 4, "epochs": 2, "length_grouping": True}})
    batches = step_batches(pairs, grouped, np.random.default_rng(3))
    assert len(batches) == total_steps(len(pairs), grouped) == 10 and all(len(index) == 8 for index, _ in batches)
    assert [fresh for _, fresh in batches] == [True] * 5 + [False] * 5
    lengths = pairs.pair_lengths()
    assert np.mean([np.ptp(lengths[index]) for index, _ in batches]) < np.ptp(lengths) / 4
    with pytest.raises(SpecError, match=r"train.length_grouping: true conflicts with the verl section"):
        build_config({"train": {"length_grouping": True}, "verl": dict(USERS)})


def test_a_plain_spec_needs_one_full_batch():
    pairs = hand_pair_set([([1], [2], [3], True, True)] * 6)
    with pytest.raises(SpecError, match=r"train.batch_size is 8 pairs per step, but the training split has 6"):
        step_batches(pairs, build_config({"train": {"batch_size": 8}}), np.random.default_rng(0))


def test_a_trial_described_in_verl_units_runs_verls_steps_and_lr(tmp_path, tiny_cache_dir):
    train_file = demo_pairs(tmp_path / "pairs.parquet", 48)
    verl = {"train_batch_size": 8, "rollout_n": 1, "ppo_mini_batch_size": 4, "ppo_micro_batch_size_per_gpu": 2,
            "critic_warmup": 4, "lr_warmup_steps": 2}  # 36 training pairs: 4 iterations of 8 fit, 3 are run
    raw = to_dict(tiny_config(train_file, tiny_cache_dir))
    raw.update(verl=verl, train={"lr": 1e-3}, eval={"every_steps": 100, "batch_size": 16})
    reporter = RecordingReporter()
    result = run_trial(build_config(raw), reporter)
    assert result.metrics["train/steps"] == 6  # 3 iterations x 2 mini-batches
    lrs = [metrics["critic/lr"] for _, metrics in reporter.train]
    assert lrs == pytest.approx([0.0, 0.0, 5e-4, 5e-4, 1e-3, 1e-3])  # verl's warmup of 2 iterations, held per iteration
