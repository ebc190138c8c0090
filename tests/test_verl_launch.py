"""`init --from-verl`: a launch script becomes the spec, its values what verl composes, and the export gives them back.

The scripts are under tests/fixtures/verl-launch/ (written for these tests in the style of verl's examples and of
public GAD warmup launches); verl 0.9.1's config is the installed one, 0.5.0's the fixture. Nothing is mocked:
Hydra composes verl's own yaml on both sides of every comparison.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest

from critic.config import SpecError
from sweeper.study import load_sweep_spec
from sweeper.verl_export import parse_overrides, verl_export
from sweeper.verl_import import launch_diff, spec_from_launch
from sweeper.verl_launch import VerlSource, load_launch, read_launch, select
from tests.verl_helpers import FIXTURES, compose, verl_config_dir, verl_version

SCRIPTS = FIXTURES / "verl-launch"
ROOT = Path(__file__).resolve().parent.parent


def write_prompts(path: Path, rows: int, prompt_key: str = "content") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({prompt_key: [f"prompt {i}" for i in range(rows)], "teacher_response": "t",
                  "student_response": "s"}).to_parquet(path)
    return path


@pytest.fixture
def gad(tmp_path):
    """The GAD warmup script on verl 0.9.1: its data, variables and pass-through argument."""
    write_prompts(tmp_path / "gad" / "train.parquet", 2000)
    write_prompts(tmp_path / "gad" / "test.parquet", 100)
    launch = load_launch(str(SCRIPTS / "gad_warmup_qwen.sh"), ["trainer.total_training_steps=400"],
                         {"DATA_ROOT": str(tmp_path), "MODEL_PATH": "/ckpt/qwen15b"})
    return launch, VerlSource(verl_config_dir(), verl_version())


@pytest.fixture
def v1_async(tmp_path):
    train = write_prompts(tmp_path / "async" / "train.parquet", 1000, "prompt")
    launch = load_launch(str(SCRIPTS / "gad_warmup_v1_async.sh"), [], {"TRAIN_FILE": str(train)})
    return launch, VerlSource(verl_config_dir(), verl_version())


@pytest.fixture
def v05(tmp_path):
    write_prompts(tmp_path / "home" / "data" / "gad" / "train.parquet", 500)
    write_prompts(tmp_path / "home" / "data" / "gad" / "test.parquet", 50)
    launch = load_launch(str(SCRIPTS / "gad_warmup_v05.sh"), [], {"HOME": str(tmp_path / "home")})
    return launch, VerlSource(FIXTURES / "verl-0.5.0", "0.5.0")


def imported(launch, source):
    cfg = compose(source.config_dir, launch.overrides)
    return spec_from_launch(launch, cfg, source), cfg


# --- the shell subset ----------------------------------------------------------------------------------------

def test_script_words_are_what_bash_passes_for_the_supported_subset():
    script = """#!/bin/bash
export A=1
B=${B:-b$A}   # a default that uses another variable
C="two words"
# python3 -m verl.trainer.main_ppo commented=out
PYTHONUNBUFFERED=1 python3 -m verl.trainer.main_ppo \\
    k1=$A k2=${B} 'k3=$A' "k4=$C" k5=${D:?set D} k6=${A:+alt} k7=$(date +%s) \\
    k8=$1 "${@:2}" 2>&1 | tee log.txt
"""
    launch = read_launch(script, "run.sh", ["first", "extra=2", "+more=3"])
    assert launch.overrides == ["k1=1", "k2=b1", "k3=$A", "k4=two words", "k5=__UNRESOLVED_D__", "k6=alt",
                                "k7=__UNRESOLVED_COMMAND1__", "k8=first", "extra=2", "+more=3"]
    assert launch.unresolved == {"__UNRESOLVED_D__": "${D:?set D}", "__UNRESOLVED_COMMAND1__": "$(date +%s)"}
    assert "--var D=VALUE" in launch.how_to_resolve("k5=__UNRESOLVED_D__")
    forced = read_launch(script, "run.sh", [], {"D": "d", "A": "9"})  # --var fills D and wins over the script's A
    assert forced.overrides[:5] == ["k1=9", "k2=b9", "k3=$A", "k4=two words", "k5=d"]
    assert read_launch("python -m my_fork.main_gad x=1", "cmd", entry="my_fork.main_gad").overrides == ["x=1"]


# --- the spec: what verl composes ----------------------------------------------------------------------------

def test_gad_script_spec_holds_what_verl_composes(gad):
    launch, source = gad
    spec, cfg = imported(launch, source)
    raw = spec.raw
    verl = raw["verl"]
    assert verl == {"train_batch_size": 64, "rollout_n": 4, "ppo_mini_batch_size": 16, "ppo_epochs": 1, "n_gpus": 8,
                    "ppo_micro_batch_size_per_gpu": 8, "critic_warmup": 20, "total_training_steps": 400,
                    "parameter_sync_step": 1, "lr_warmup_steps": 3}
    # the values verl only has after composing: the critic's mini-batch and epochs come from the actor's
    assert (cfg.critic.ppo_mini_batch_size, cfg.critic.rollout_n, cfg.critic.ppo_epochs) == (16, 4, 1)
    assert cfg.trainer.n_gpus_per_node == 8 and cfg.trainer.total_training_steps == 400  # ${N_GPUS...:-8}, "${@:1}"
    assert raw["train"] == {"lr": cfg.critic.optim.lr, "weight_decay": cfg.critic.optim.weight_decay,
                            "scheduler": "constant", "grad_clip": 0.5, "betas": [0.9, 0.999]}
    assert raw["loss"] == {"adaptive_temperature": True, "t_min": 0.3, "t_max": 2.0}  # the fork's keys
    assert raw["export"]["verl_keys"]["loss.t_max"] == "critic.temperature_max"
    assert raw["data"]["eval_sets"] == {"test": str(Path(cfg.data.val_files))}
    assert raw["data"]["prompt_key"] == cfg.data.prompt_key == "content"
    assert raw["model"]["path"] == "/ckpt/qwen15b" == cfg.critic.model.path
    loaded = load_sweep_spec("spec.yaml", raw=raw)
    assert loaded.cfg.sweep.baseline == {"train.lr": 2e-6, "verl.critic_warmup": 20, "verl.lr_warmup_steps": 3,
                                         "loss.t_max": 2.0}
    assert (loaded.cfg.train.batch_size, loaded.cfg.train.max_steps) == (64, 19 * 4)  # 16 prompts x 4 per step
    space = raw["sweep"]["search_space"]
    assert space["train.lr"]["low"] == 2e-7 and space["train.lr"]["high"] == 2e-5
    assert (space["verl.critic_warmup"]["low"], space["verl.critic_warmup"]["high"]) == (10, 40)
    text = spec.text()
    for said in ("critic.value_head_init=zeros", "trainer.project_name=gad-warmup", "$(date +%m%d) unresolved",
                 "loss.t_min=0.3 is not sampled",
                 "actor_rollout_ref.actor.ppo_mini_batch_size=16 is also the critic's"):
        assert said in text
    assert not spec.dead


def test_v05_script_spec_holds_what_verl_0_5_composes(v05):
    launch, source = v05
    spec, cfg = imported(launch, source)
    raw = spec.raw
    assert raw["train"]["grad_clip"] == cfg.critic.grad_clip == 0.8  # the legacy worker's key, read in 0.5
    assert raw["train"]["scheduler"] == cfg.critic.optim.warmup_style == "constant"
    assert raw["verl"]["lr_warmup_steps"] == cfg.critic.optim.lr_warmup_steps == 2
    assert (raw["verl"]["ppo_mini_batch_size"], raw["verl"]["rollout_n"], raw["verl"]["n_gpus"]) == (8, 2, 4)
    assert raw["model"]["lora"]["rank"] == 16 and raw["model"]["lora"]["alpha"] == 32
    assert raw["loss"] == {"adaptive_temperature": False, "temperature": 2.0}
    assert "loss.temperature" in raw["sweep"]["search_space"]
    load_sweep_spec("spec.yaml", raw=raw)


# --- the round trip ------------------------------------------------------------------------------------------

FORM_ONLY = {  # keys whose form the export changes for the same behaviour (docs/verl_import.md)
    "gad": {},
    "v1_async": {"critic.optim.lr_warmup_steps": (-1, 2), "critic.optim.lr_warmup_steps_ratio": (0.05, 0.0)},
    "v05": {"critic.model.target_modules": ("all-linear", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj"])},
}


def baseline_export(spec_raw: dict, version: str, sync_step: int | None = None):
    spec = load_sweep_spec("spec.yaml", raw=spec_raw)
    distributions = {e.key: e.distribution for e in spec.entries}
    trial = optuna.trial.create_trial(params=spec.cfg.sweep.baseline, distributions=distributions, value=0.9)
    return verl_export(spec, trial, version, sync_step=sync_step)


@pytest.mark.parametrize("name", ["gad", "v1_async", "v05"])
def test_export_of_the_imported_baseline_gives_back_the_users_values_key_by_key(name, request):
    launch, source = request.getfixturevalue(name)
    spec, before = imported(launch, source)
    exported = baseline_export(spec.raw, source.short)
    overrides = parse_overrides(exported.text())
    compose(source.config_dir, overrides)  # the export composes on its own
    after = compose(source.config_dir, launch.overrides + overrides)
    changed = {}
    for key in {o.split("=", 1)[0].lstrip("+") for o in overrides}:
        if select(before, key) != select(after, key):
            changed[key] = (select(before, key), select(after, key))
    assert changed == FORM_ONLY[name]
    written = {o.split("=", 1)[0].lstrip("+") for o in overrides}  # the batch settings the lr was tuned at
    assert {"data.train_batch_size", "actor_rollout_ref.rollout.n", "critic.ppo_mini_batch_size",
            "critic.ppo_epochs", "trainer.critic_warmup", "critic.optim.lr"} <= written
    diff = launch_diff(launch, before, source, overrides)
    assert [line for line in diff if line.startswith(("- ", "+ "))] == [
        line for key, (old, new) in sorted(changed.items(), key=lambda kv: overrides_order(overrides, kv[0]))
        for line in (f"- {key}={old}", f"+ {key}={new}")]


def overrides_order(overrides: list[str], key: str) -> int:
    return [o.split("=", 1)[0].lstrip("+") for o in overrides].index(key)


def test_fork_keys_are_written_with_double_plus_so_a_fork_that_defines_them_accepts_them(gad):
    launch, source = gad
    spec, _ = imported(launch, source)
    overrides = baseline_export(spec.raw, "0.9").overrides
    assert "++critic.temperature_max=2.0" in overrides and "++critic.adaptive_temperature=true" in overrides
    fork = compose(source.config_dir, ["+critic.temperature_max=9.0"])  # stands for a fork whose yaml has the key
    assert fork.critic.temperature_max == 9.0
    with pytest.raises(Exception, match=r"Could not append to config. An item is already at 'critic.temperature_max'"):
        compose(source.config_dir, ["+critic.temperature_max=9.0", "+critic.temperature_max=2.0"])
    assert compose(source.config_dir, ["+critic.temperature_max=9.0", "++critic.temperature_max=2.0"]
                   ).critic.temperature_max == 2.0


# --- what verl does not read, and V1 separate_async -------------------------------------------------------------

def test_a_key_verl_no_longer_reads_is_reported_and_the_spec_takes_what_verl_does(v1_async):
    launch, source = v1_async
    spec, cfg = imported(launch, source)
    assert spec.raw["train"]["grad_clip"] == cfg.critic.optim.clip_grad == 1.0  # not the script's dead 0.2
    assert len(spec.dead) == 1 and spec.dead[0].startswith(
        "critic.grad_clip=0.2: verl 0.9's engine critic worker does not read it; it clips with "
        "critic.optim.clip_grad=1.0")
    assert "NOT READ BY VERL: critic.grad_clip=0.2" in spec.text()
    diff = launch_diff(launch, cfg, source, parse_overrides(baseline_export(spec.raw, "0.9").text()))
    assert diff[-1].startswith("! NOT READ BY VERL 0.9.1: critic.grad_clip=0.2")


def test_separate_async_counts_the_lr_warmup_in_local_updates_and_converts_between_modes(v1_async, gad):
    launch, source = v1_async
    spec, cfg = imported(launch, source)
    verl = spec.raw["verl"]
    # 1000 rows // 128 x 2 epochs = 14 iterations; x 4 local updates = 56 scheduler steps; ratio 0.05 -> 2
    assert (verl["parameter_sync_step"], verl["total_training_steps"], verl["lr_warmup_steps"]) == (4, 14, 2)
    assert cfg.trainer.v1.separate_async.parameter_sync_step == 4
    assert "critic.optim.lr_warmup_steps=2" in baseline_export(spec.raw, "0.9", sync_step=4).overrides
    with pytest.raises(SpecError, match=r"lr warmup: 2 scheduler steps at parameter_sync_step=4 is 0.5 at your "
                                        r"run's 1 .*not a whole number"):
        baseline_export(spec.raw, "0.9", sync_step=1)
    sync_spec, _ = imported(*gad)  # tuned with one scheduler step per iteration: 3 iterations = 12 local updates
    converted = baseline_export(sync_spec.raw, "0.9", sync_step=4)
    assert "critic.optim.lr_warmup_steps=12" in converted.overrides
    assert "converted from 3 at parameter_sync_step=1" in converted.text()
    unknown = baseline_export(sync_spec.raw, "0.9")
    assert any("separate_async" in note and "--against" in note for note in unknown.notes)


# --- bad input: one line each, nothing written -------------------------------------------------------------------

def run_init(tmp_path, *args):
    output = tmp_path / "out" / "spec.yaml"
    result = subprocess.run([sys.executable, "sweep.py", "init", "--from-verl", *args, "-o", str(output)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    return result, output


@pytest.mark.parametrize("case, message", [
    ("no_invocation", r"no verl invocation found: no line runs `python3 -m verl.trainer.main_ppo"),
    ("rejected", r"verl 0.9.1's config rejects an override: Could not override 'critic.optim.lrr'"),
    ("missing_data", r"data.train_files: data file not found: .*/nowhere/gad/train.parquet"),
    ("unresolved", r"data.train_files=__UNRESOLVED_DATA_ROOT__/gad/train.parquet is unresolved and the spec needs "
                   r"it for data.train_path: \$\{DATA_ROOT\} is not set by the script: pass --var DATA_ROOT=VALUE"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, case, message):
    verl_config_dir()  # skips without verl
    write_prompts(tmp_path / "gad" / "train.parquet", 200)
    write_prompts(tmp_path / "gad" / "test.parquet", 20)
    script = str(SCRIPTS / "gad_warmup_qwen.sh")
    args = {"no_invocation": [str(SCRIPTS / "not_verl.sh")],
            "rejected": [script, "critic.optim.lrr=1e-6", "--var", f"DATA_ROOT={tmp_path}"],
            "missing_data": [script, "--var", f"DATA_ROOT={tmp_path / 'nowhere'}"],
            "unresolved": [script]}[case]
    result, output = run_init(tmp_path, *args)
    assert result.returncode == 2 and not output.exists() and not output.parent.exists()
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert re.search(message, lines[0]), lines[0]


def test_init_from_verl_writes_a_spec_that_runs_as_is(tmp_path):
    verl_config_dir()
    write_prompts(tmp_path / "gad" / "train.parquet", 2000)
    write_prompts(tmp_path / "gad" / "test.parquet", 100)
    result, output = run_init(tmp_path, str(SCRIPTS / "gad_warmup_qwen.sh"), "trainer.total_training_steps=400",
                              "--var", f"DATA_ROOT={tmp_path}", "--var", "MODEL_PATH=/ckpt/qwen15b")
    assert result.returncode == 0, result.stderr
    assert f"wrote {output}" in result.stdout
    spec = load_sweep_spec(str(output))
    assert spec.cfg.verl.critic_warmup == 20 and spec.cfg.train.lr == 2e-6
    assert output.read_text().startswith("# Imported from ")
    again, _ = run_init(tmp_path, str(SCRIPTS / "gad_warmup_qwen.sh"))
    assert again.returncode == 2 and "exists; choose another file with -o" in again.stderr
