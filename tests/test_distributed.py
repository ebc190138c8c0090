"""Several GPUs per trial, tested on the CPU: 2 gloo ranks under torchrun, FSDP2, the tiny critic.

(a) a 2-rank trial equals the 1-process trial (same global batches, seed); (b) a dead rank fails its trial
with a reason naming it and the sweep goes on; (c) GPU slots never give two concurrent trials one device;
(d) the spec's gpus_per_trial is validated at load.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from critic.config import SpecError
from critic.reporting import RecordingReporter
from critic.trial import run_trial
from sweeper.launch import run_trial_distributed
from sweeper.slots import gpu_slots, plan_slots
from tests.helpers import THREAD_SETTINGS, adam_max_update, demo_pairs, tiny_config, tiny_tolerance
from tests.sweep_helpers import cli, mlflow_uri, store_args, tiny_sweep_spec


def test_gpus_per_trial_is_validated_at_load(tmp_path):
    train = tmp_path / "train.parquet"
    with pytest.raises(SpecError, match=r"sweep.gpus_per_trial must be an integer >= 1"):
        tiny_config(train, tmp_path, {"sweep.gpus_per_trial": 0})
    with pytest.raises(SpecError, match=r"need sweep.gpus_per_trial: 1"):
        tiny_config(train, tmp_path, {"sweep.gpus_per_trial": 2, "train.save_checkpoint": True})
    assert tiny_config(train, tmp_path).sweep.gpus_per_trial == 1


@pytest.mark.parametrize("ids, per_trial, expected", [
    (["0", "1", "2", "3"], 2, [["0", "1"], ["2", "3"]]),
    (["0", "1", "2", "3", "4"], 2, [["0", "1"], ["2", "3"]]),  # the odd GPU idles rather than being shared
    (["4", "5", "6", "7"], 1, [["4"], ["5"], ["6"], ["7"]]),
    (["0", "1", "2", "3", "4", "5", "6", "7"], 4, [["0", "1", "2", "3"], ["4", "5", "6", "7"]]),
])
def test_gpu_slots_are_disjoint(ids, per_trial, expected):
    assert gpu_slots(ids, per_trial) == expected


def test_more_workers_than_slots_says_so_and_uses_what_fits():
    slots, notice = plan_slots(3, ["0", "1", "2", "3"], 2)
    assert slots == [["0", "1"], ["2", "3"]] and "2 slots; running 2 workers" in notice
    assert plan_slots(1, ["0", "1", "2", "3"], 2) == ([["0", "1"]], None)
    assert plan_slots(4, [], 2) == ([], None)  # CPU machine: workers as before
    with pytest.raises(SpecError, match="only 1 GPUs are visible"):
        plan_slots(1, ["0"], 2)


@pytest.mark.parametrize("threads", THREAD_SETTINGS)
def test_two_ranks_train_and_score_like_one_process(tmp_path, tiny_cache_dir, threads):
    """Same global batches: micro-batch groups of 3 in steps of 8 (ragged: ghost forwards on one rank),
    forwards of 2 pairs with the adaptive T's no-grad pass, held-out batches of 6 (one rank scores more)."""
    train = demo_pairs(tmp_path / "train.parquet", 60)
    cfg = tiny_config(train, tiny_cache_dir, {
        "train.batch_size": 8, "train.micro_batch_size": 3, "train.forward_micro_batch_size": 2,
        "train.max_steps": 4, "train.lr": 3e-4, "loss.adaptive_temperature": True, "eval.every_steps": 2,
        "eval.batch_size": 6, "model.torch_threads": threads})
    one, two = RecordingReporter(), RecordingReporter()
    single = run_trial(cfg, one)
    sharded = run_trial_distributed(cfg, two, 2)
    assert [step for step, _ in two.train] == [1, 2, 3, 4] and [step for step, _ in two.eval] == [2, 4]

    # Both runs sum the same float32 terms in another order (all-reduce, rank-local micro-batches).
    teacher, student = (single.pair_scores[c].to_numpy() for c in ("teacher_score", "student_score"))
    row = cfg.data.max_prompt_length + 2 * cfg.data.max_response_length  # one packed pair
    score_tol = tiny_tolerance(np.r_[teacher, student], row)
    # loss = mean of -logsigmoid((t - s) / T) with T >= loss.t_a: its slope in each score is at most 1 / t_a
    loss_tol = 2 * score_tol / cfg.loss.t_a
    grad_tol = tiny_tolerance(1.0, row, cfg.train.batch_size * row)  # relative; a weight's gradient sums the batch too
    for (_, m1), (_, m2) in zip(one.train, two.train):
        assert m2["critic/loss"] == pytest.approx(m1["critic/loss"], abs=loss_tol)
        assert m2["critic/grad_norm"] == pytest.approx(m1["critic/grad_norm"], rel=grad_tol)
        assert m2["critic/d_acc"] == m1["critic/d_acc"]  # no pair's t - s lies within score_tol of 0 here
    # What the loss and every pair metric read, t - s per held-out pair (gathered from both ranks), agrees to
    # rounding. A shift of every score does not: the BT loss is blind to it, so the value head's bias has a
    # gradient that is pure rounding noise, and Adam turns noise into steps of up to ~lr (measured: 4 steps at
    # lr 3e-4 moved the two runs' biases 4e-6 apart on one machine, 8e-5 on another).
    sharded_teacher, sharded_student = (sharded.pair_scores[c].to_numpy() for c in ("teacher_score", "student_score"))
    diff_gap = np.abs((teacher - student) - (sharded_teacher - sharded_student)).max()
    assert diff_gap <= score_tol, f"teacher - student differs by {diff_gap} > {score_tol}"
    shift = sharded_teacher - teacher
    assert np.ptp(np.r_[shift, sharded_student - student]) <= 2 * score_tol, "the scores differ by more than a shift"
    bound = adam_max_update(cfg.train.max_steps, cfg.train.betas, cfg.train.lr)
    assert abs(shift.mean()) <= bound, f"scores shifted by {shift.mean()}, more than AdamW can move a bias ({bound})"
    assert sharded.metrics["val/n_pairs"] == single.metrics["val/n_pairs"]
    assert sharded.metrics["val/d_acc"] == pytest.approx(single.metrics["val/d_acc"], abs=1e-9)


def test_dead_rank_fails_its_trial_and_slots_never_overlap(tmp_path):
    """`run --workers 2` on 4 fake GPU ids with 2 per trial: two slots; rank 1 of the first trial to reach
    step 2 dies (os._exit). That trial FAILs naming rank 1, the sweep finishes its 2 trials, no run is left
    RUNNING, and trials that ran at the same time never held the same device."""
    import optuna
    from mlflow import MlflowClient

    spec = tiny_sweep_spec(tmp_path, sweep={"n_trials": 2, "gpus_per_trial": 2}, n_pairs=60,
                           extra={"train": {"max_steps": 4}})
    env = {"SWEEP_DEVICE_IDS": "0,1,2,3", "SWEEP_TEST_RANK_EXIT": f"1:2:{tmp_path / 'killed-once'}",
           "SWEEP_DIST_TIMEOUT_S": "60", "OMP_NUM_THREADS": "1"}
    done = cli("run", str(spec), *store_args(tmp_path), "--workers", "3", "--no-progress", cwd=tmp_path,
               env=env, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "3 asks for more trials at a time than fit" in done.stderr
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    trials = study.get_trials(deepcopy=False)
    states = sorted(t.state.name for t in trials)
    assert states == ["COMPLETE", "COMPLETE", "FAIL"], [(t.state.name, t.user_attrs) for t in trials]
    failed = next(t for t in trials if t.state.name == "FAIL")
    assert "rank 1 died with exit code 1" in failed.user_attrs["fail_reason"]
    assert {t.user_attrs["devices"] for t in trials} <= {"0,1", "2,3"}
    for a, b in itertools.combinations(trials, 2):
        overlap = a.datetime_start < b.datetime_complete and b.datetime_start < a.datetime_complete
        assert not (overlap and set(a.user_attrs["devices"].split(",")) & set(b.user_attrs["devices"].split(",")))
    client = MlflowClient(mlflow_uri(tmp_path))
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs and not [r.info.run_id for r in runs if r.info.status == "RUNNING"]
