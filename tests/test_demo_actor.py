"""The offline GAD flow: the demo actor (`student.model: demo:actor`) and the prompts-only demo sets."""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2ForCausalLM

from critic import data as data_mod
from critic import demo_actor
from critic.config import SpecError, build_config, load_config
from critic.demo import demo_path, make_demo_frame
from critic.model import build_tiny_tokenizer
from critic.student import responses as student_mod
from critic.student.cache import actor_digest
from critic.trial import run_trial
from sweeper.commands.generate import add_parser as add_generate_command
from tests.helpers import write_pairs

STEPS = 3  # the real recipe trains 240 steps (~40 s on one core); the tests check the mechanics, not the quality


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.mark.parametrize("key, value, match", [
    ("student.model", "demo:nosuch", r"student\.model 'demo:nosuch' is not a demo actor; the demo actors are "
                                     r"demo:actor"),
    ("data.train_path", "demo:nosuch", r"data\.train_path 'demo:nosuch' is not a demo set; the demo sets are "
                                       r"demo:train, demo:shifted, demo:train_prompts, demo:shifted_prompts"),
    ("data.eval_sets", {"later": "demo:shifted_prompt"}, r"data\.eval_sets\.later 'demo:shifted_prompt' is not"),
])
def test_unknown_demo_names_fail_at_load(key, value, match):
    section, name = key.split(".")
    with pytest.raises(SpecError, match=match):
        build_config({section: {name: value}}, source="spec.yaml")


def test_prompts_only_demo_sets_are_the_demo_rows_without_the_student_column(tmp_path):
    frame = pd.read_parquet(demo_path("shifted_prompts", tmp_path))
    assert list(frame.columns) == ["content", "teacher_response"]
    pd.testing.assert_frame_equal(frame, make_demo_frame("shifted")[["content", "teacher_response"]])


def test_the_actor_builds_deterministically_as_a_loadable_checkpoint(tmp_path, tiny_tokenizer):
    dirs = [tmp_path / "first", tmp_path / "second"]
    for path in dirs:
        demo_actor.build_actor(path, tiny_tokenizer, steps=STEPS)
    assert actor_digest(dirs[0], tmp_path / "d.json") == actor_digest(dirs[1], tmp_path / "d.json")  # same bytes

    loaded = AutoModelForCausalLM.from_pretrained(dirs[0])
    with torch.random.fork_rng(devices=[]):  # the same seeded init, without the training
        torch.manual_seed(demo_actor.SEED)
        untrained = Qwen2ForCausalLM(loaded.config)
    assert all(not torch.equal(p, q) for p, q in zip(loaded.parameters(), untrained.parameters()))  # it trained
    tokenizer = AutoTokenizer.from_pretrained(dirs[0])
    assert tokenizer.eos_token == "<|im_end|>" and loaded.generation_config.eos_token_id == [tokenizer.eos_token_id]
    # The training examples are rendered exactly as critic/student/local.py renders a generation prompt.
    prompt_ids, response_ids = demo_actor.actor_examples(tokenizer)[0]
    first = make_demo_frame("train").iloc[0]
    assert tokenizer.decode(prompt_ids) == f"<|im_start|>user\n{first.content}<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(response_ids) == first.student_response + "<|im_end|>"


def test_generate_with_the_demo_actor_then_a_trial_trains_on_its_responses(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo_actor, "TRAIN_STEPS", STEPS)
    cache = tmp_path / "cache"
    build_tiny_tokenizer(cache)
    prompts = write_pairs(tmp_path / "prompts.parquet",
                          make_demo_frame("train").head(16)[["content", "teacher_response"]])
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"data:\n  train_path: {prompts}\n  cache_dir: {cache}\n  val_fraction: 0.25\n"
                    f"  confirm_fraction: 0.0\n"
                    f"  max_prompt_length: 48\n  max_response_length: 24\n"
                    f"model: {{device: cpu, torch_threads: 1}}\n"
                    f"train: {{lr: 1.0e-3, batch_size: 4, micro_batch_size: 4, max_steps: 3}}\n"
                    f"eval: {{every_steps: 2, batch_size: 16}}\n"
                    f"student: {{model: 'demo:actor', temperature: 1.0, max_new_tokens: 12, batch_size: 16}}\n")
    parser = argparse.ArgumentParser()
    add_generate_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["generate", str(spec)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    actor_dir = cache / "demo" / f"actor-v{demo_actor.ACTOR_VERSION}"
    assert "[demo] training the demo actor once" in out and (actor_dir / "model.safetensors").is_file()
    written = [p for p in (cache / "students").rglob("with-student-*.parquet")]
    assert len(written) == 1
    table = pq.read_table(written[0]).to_pandas()
    assert table["student_response"].notna().all() and len(table) == 16
    assert table["student_response"].str.len().gt(0).any()  # the actor wrote text, not only EOS

    # A trial in a fresh process: the actor is not rebuilt and nothing is generated again; it reads the cache.
    monkeypatch.setattr(student_mod, "_MEMORY", {})
    monkeypatch.setattr(data_mod, "_MEMORY", {})
    monkeypatch.setattr(demo_actor, "train_demo_actor", lambda *a, **k: pytest.fail("the actor was rebuilt"))
    monkeypatch.setattr(student_mod, "generate_with_model", lambda *a, **k: pytest.fail("generated again"))
    result = run_trial(load_config(spec))
    assert result.metrics["train/steps"] == 3 and np.isfinite(result.metrics["val/d_acc"])
    assert result.metrics["data/train_pairs"] + result.metrics["data/val_pairs"] == 16
    assert result.lineage["student.actor"].startswith(f"{actor_dir.resolve()}@")  # the built directory, digested
