"""Spec loading: defaults < YAML < --set, and one clear SpecError for every bad input."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from critic.config import (
    ExperimentConfig,
    SpecError,
    TrainConfig,
    build_config,
    flatten,
    load_config,
    parse_override,
    read_spec,
    to_dict,
)

ROOT = Path(__file__).resolve().parents[1]


def write_spec(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return path


# --- precedence and typing ---------------------------------------------------------------------------------

def test_empty_spec_file_gives_the_defaults(tmp_path):
    assert load_config(write_spec(tmp_path, "")) == ExperimentConfig()


def test_yaml_beats_defaults_and_set_beats_yaml(tmp_path):
    path = write_spec(tmp_path, "train:\n  lr: 1.0e-4\n  epochs: 3\nloss:\n  adaptive_temperature: true\n")
    cfg = load_config(path, ["train.lr=2e-5"])
    assert cfg.train.lr == 2e-5  # --set over YAML
    assert cfg.train.epochs == 3  # YAML over default
    assert cfg.loss.adaptive_temperature is True
    assert cfg.train.batch_size == TrainConfig().batch_size  # default where neither says


def test_set_lr_in_scientific_notation_parses_to_float():
    section, key, value = parse_override("train.lr=1e-5")
    assert (section, key) == ("train", "lr")
    assert isinstance(value, float) and value == 1e-5


def test_lr_in_scientific_notation_in_a_yaml_file_is_a_float(tmp_path):
    # PyYAML (YAML 1.1) reads `1e-5` as the string '1e-5'; the spec accepts the usual float spelling.
    cfg = load_config(write_spec(tmp_path, "train:\n  lr: 1e-5\n"))
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == 1e-5


@pytest.mark.parametrize("override, attribute, expected", [
    ("train.betas=[0.8, 0.99]", ("train", "betas"), (0.8, 0.99)),  # YAML list -> the field's tuple
    ("train.epochs=2", ("train", "epochs"), 2),
    ("loss.temperature=2", ("loss", "temperature"), 2.0),  # int accepted where a float is wanted
    ("score.exclude_eos=false", ("score", "exclude_eos"), False),
    ("train.max_steps=null", ("train", "max_steps"), None),
    ("data.eval_sets={shifted: other.parquet}", ("data", "eval_sets"), {"shifted": "other.parquet"}),
])
def test_set_values_are_typed_like_the_field(tmp_path, override, attribute, expected):
    path = write_spec(tmp_path, "train:\n  max_steps: 5\n")
    value = getattr(getattr(load_config(path, [override]), attribute[0]), attribute[1])
    assert value == expected and type(value) is type(expected)


def test_config_round_trips_through_a_plain_dict():
    cfg = load_config(ROOT / "experiments" / "demo.yaml", ["train.betas=[0.8, 0.95]"])
    assert build_config(to_dict(cfg)) == cfg
    flat = flatten(cfg)
    assert flat["train.lr"] == cfg.train.lr and flat["train.betas"] == [0.8, 0.95]
    assert not any(key.startswith(("sweep.", "export.", "student.")) for key in flat)


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        ExperimentConfig().train.lr = 1.0  # type: ignore[misc]


# --- unknown names -----------------------------------------------------------------------------------------

def test_unknown_key_names_the_key_the_file_and_the_valid_keys(tmp_path):
    path = write_spec(tmp_path, "train:\n  learning_rate: 1.0e-4\n")
    with pytest.raises(SpecError, match=rf"^{re.escape(str(path))}: unknown key 'train\.learning_rate'\. "
                                        rf"Valid keys in 'train': .*\blr\b.*\bweight_decay\b"):
        load_config(path)


def test_unknown_key_from_set_is_rejected_too(tmp_path):
    with pytest.raises(SpecError, match=r"unknown key 'loss\.temprature'.*\btemperature\b"):
        load_config(write_spec(tmp_path, ""), ["loss.temprature=2"])


@pytest.mark.parametrize("text, overrides", [("trainer:\n  lr: 1.0\n", []), ("", ["trian.lr=1"])])
def test_unknown_section_lists_the_valid_sections(tmp_path, text, overrides):
    with pytest.raises(SpecError, match=r"unknown section '(trainer|trian)'\. Valid sections: data, model, score"):
        load_config(write_spec(tmp_path, text), overrides)


# --- wrong types and impossible values ---------------------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ("train:\n  epochs: 1.5\n", r"train\.epochs must be an integer, got 1\.5"),
    ("train:\n  epochs: true\n", r"train\.epochs must be an integer, got True"),
    ("train:\n  lr: fast\n", r"train\.lr must be a number, got 'fast'"),
    ("score:\n  exclude_eos: 'yes'\n", r"score\.exclude_eos must be true or false, got 'yes'"),
    ("train:\n  betas: [0.9]\n", r"train\.betas must be a list of 2 values"),
    ("data:\n  eval_sets: [a.parquet]\n", r"data\.eval_sets must be a mapping"),
    ("model:\n  path: 7\n", r"model\.path must be a string, got 7"),
    ("train: 5\n", r"section 'train' must be a mapping of keys, got 5"),
])
def test_wrong_type_names_the_key_and_the_value(tmp_path, text, message):
    path = write_spec(tmp_path, text)
    with pytest.raises(SpecError, match=rf"^{re.escape(str(path))}: .*{message}"):
        load_config(path)


@pytest.mark.parametrize("override, message", [
    ("train.lr=0", r"train\.lr must be a positive number, got 0\.0"),
    ("train.lr=-1e-5", r"train\.lr must be a positive number, got -1e-05"),
    ("train.lr=.inf", r"train\.lr must be a positive number, got inf"),
    ("loss.t_min=2.5", r"loss\.t_min must be > 0 and <= loss\.t_max, got t_min=2\.5, t_max=2\.0"),
    ("loss.t_min=0", r"loss\.t_min must be > 0"),
    ("data.val_fraction=0", r"data\.val_fraction must be in \(0, 1\), got 0\.0"),
    ("data.val_fraction=1", r"data\.val_fraction must be in \(0, 1\), got 1\.0"),
    ("data.val_fraction=1.5", r"data\.val_fraction must be in \(0, 1\)"),
    ("data.val_fraction=-0.1", r"data\.val_fraction must be in \(0, 1\)"),
    ("score.reduction=max", r"score\.reduction must be one of mean, last, sum; got 'max'"),
    ("train.scheduler=step", r"train\.scheduler must be one of constant, linear, cosine"),
    ("train.max_steps=0", r"train\.max_steps must be >= 1 or null, got 0"),
    ("model.preset=null", r"set model\.path to a local checkpoint directory, or model\.preset: tiny"),
    ("data.eval_sets={val: other.parquet}", r"data\.eval_sets name 'val' is reserved \(metric names start with "
                                            r"val, confirm, fold, train, critic, perf, data, model, timing, sweep\)"),
    ("data.eval_sets={confirm: other.parquet}", r"data\.eval_sets name 'confirm' is reserved"),
    # the report would drop their curves (data/, timing/) or mix them with model/trainable_*
    ("data.eval_sets={data: other.parquet}", r"data\.eval_sets name 'data' is reserved"),
    ("data.eval_sets={timing: other.parquet}", r"data\.eval_sets name 'timing' is reserved"),
    ("data.eval_sets={model: other.parquet}", r"data\.eval_sets name 'model' is reserved"),
    ("data.eval_sets={fold: other.parquet}", r"data\.eval_sets name 'fold' is reserved"),
    # checked for every command (train, generate, sweep), not only when a study is made
    ("sweep.sampler=foo", r"sweep\.sampler must be one of tpe, random, gp, cmaes, nsga2; got 'foo'"),
    ("sweep.pruner=asha", r"sweep\.pruner must be one of paired, median, hyperband, none; got 'asha'"),
    ("sweep.max_failures=-1", r"sweep\.max_failures must be >= 0 \(0 = up to sweep\.n_trials failures\), got -1"),
    ("sweep.heartbeat_interval=0", r"sweep\.heartbeat_interval must be >= 1 second, got 0"),
    ("sweep.grace_period=100", r"sweep\.grace_period \(100\) must be at least twice sweep\.heartbeat_interval "
                               r"\(60\)"),
    ("sweep.storage_outage_s=-1", r"sweep\.storage_outage_s must be null or an integer >= 0 seconds"),
    # a worker waiting out an outage sends no heartbeat: the others must not reap its trial meanwhile
    ("sweep.storage_outage_s=500", r"sweep\.storage_outage_s \(500\) plus two heartbeats \(2 x 60\) must fit in "
                                   r"sweep\.grace_period \(300\)"),
    ("sweep.confirm.max_seeds=-1", r"sweep\.confirm\.max_seeds must be >= 0"),
    ("data.confirm_fraction=-0.1", r"data\.confirm_fraction must be in \[0, 1\)"),
    ("data.confirm_fraction=0.9", r"data\.confirm_fraction must be in \[0, 1\) and leave training prompts: "
                                  r"val_fraction \+ confirm_fraction < 1, got 0\.1 \+ 0\.9"),
])
def test_impossible_value_names_the_key_and_the_file(tmp_path, override, message):
    path = write_spec(tmp_path, "")
    with pytest.raises(SpecError, match=rf"^{re.escape(str(path))}: {message}"):
        load_config(path, [override])


# --- bad --set syntax and bad files ------------------------------------------------------------------------

@pytest.mark.parametrize("override", ["train.lr", "lr=1e-5", "=1e-5", "train_lr=1e-5"])
def test_set_without_section_key_value_says_the_expected_form(override):
    with pytest.raises(SpecError, match=r"--set expects section\.key=value \(e\.g\. train\.lr=1e-5\)"):
        parse_override(override)


@pytest.mark.parametrize("override", ["train.betas=[0.9,", "data.eval_sets={a: b"])
def test_set_with_invalid_yaml_value_is_a_spec_error(override):
    with pytest.raises(SpecError, match=r"--set (train\.betas|data\.eval_sets): the value .* is not valid YAML"):
        parse_override(override)


def test_missing_spec_file_shows_the_resolved_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpecError, match=rf"spec file not found: {re.escape(str(tmp_path / 'nope.yaml'))}$"):
        read_spec("nope.yaml")


def test_invalid_yaml_file_is_a_spec_error(tmp_path):
    with pytest.raises(SpecError, match=r"spec\.yaml: invalid YAML"):
        read_spec(write_spec(tmp_path, "train: [1,\n"))


def test_spec_root_must_be_a_mapping(tmp_path):
    with pytest.raises(SpecError, match=r"the spec must be a mapping of sections, got list"):
        read_spec(write_spec(tmp_path, "- train\n- lr\n"))


def test_scoring_the_confirmation_split_needs_one(tmp_path):
    path = write_spec(tmp_path, "data:\n  confirm_fraction: 0\neval:\n  confirm_split: true\n")
    with pytest.raises(SpecError, match=r"eval\.confirm_split needs a confirmation split: set data\.confirm_fraction"):
        load_config(path)
    assert load_config(path, ["data.confirm_fraction=0.1"]).eval.confirm_split is True


# --- sweep.candidates: your planned changes ---------------------------------------------------------------------

BASELINE = "  baseline: {train.lr: 3.0e-4, train.epochs: 1}\n"


@pytest.mark.parametrize("candidates, message", [
    ("[{params: {train.lrr: 1.0e-4}}]", r"sweep\.candidates\[0\]\.params: unknown key 'train\.lrr'\. Valid keys in "
                                        r"'train': batch_size, betas"),
    ("[{params: {sweep.n_trials: 3}}]", r"sweep\.candidates\[0\]\.params: key 'sweep\.n_trials': section must be "
                                        r"one of data, model, score, loss, train, verl, eval"),
    ("[{params: {model.lora: 8}}]", r"sweep\.candidates\[0\]\.params: key 'model\.lora' is a block; "
                                     r"set one of its keys, e\.g\. model\.lora\."),
    ("[{params: {train.epochs: 1.5}}]", r"sweep\.candidates\[0\]\.params\.train\.epochs must be an integer"),
    ("[{name: x, parms: {train.epochs: 3}}]", r"sweep\.candidates\[0\]: unknown key\(s\) \['parms'\]\. Valid keys: "
                                              r"name, params"),
    ("[{name: x}]", r"sweep\.candidates\[0\] has no params; give the keys it changes"),
    ("[{name: x, params: {train.epochs: 3}}, {name: x, params: {train.epochs: 2}}]",
     r"sweep\.candidates\[1\]: the name 'x' is also candidate 0's; give each candidate its own name"),
    ("[{params: {train.epochs: 3}}, {params: {train.epochs: 3}}]", r"sweep\.candidates\[1\]: the name 'epochs=3' is "
                                                                     r"also candidate 0's"),
    ("[{name: baseline, params: {train.epochs: 3}}]", r"sweep\.candidates\[0\]\.name 'baseline' is reserved"),
    ("[{name: trial-4, params: {train.epochs: 3}}]", r"sweep\.candidates\[0\]\.name 'trial-4' is reserved"),
    ("[{name: same, params: {train.epochs: 1}}]", r"sweep\.candidates\[0\] \('same'\) changes nothing: each of its "
                                                  r"params equals sweep\.baseline's"),
])
def test_bad_candidates_name_the_entry_and_the_fix(tmp_path, candidates, message):
    path = write_spec(tmp_path, f"sweep:\n{BASELINE}  candidates: {candidates}\n")
    with pytest.raises(SpecError, match=rf"^{re.escape(str(path))}: {message}"):
        load_config(path)


def test_candidates_need_a_baseline_and_get_a_name_from_their_params(tmp_path):
    with pytest.raises(SpecError, match=r"sweep\.candidates are changes to your current setting, compared with it: "
                                        r"set sweep\.baseline too"):
        load_config(write_spec(tmp_path, "sweep:\n  candidates: [{params: {train.epochs: 3}}]\n"))
    cfg = load_config(write_spec(tmp_path, f"sweep:\n{BASELINE}  candidates: [{{params: {{train.lr: 1.0e-4, "
                                           f"loss.adaptive_temperature: false}}}}, {{name: 3 epochs, params: "
                                           f"{{train.epochs: 3}}}}]\n"))
    assert [c.label for c in cfg.sweep.candidates] == ["lr=0.0001 adaptive_temperature=off", "3 epochs"]
