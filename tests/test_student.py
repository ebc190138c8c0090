"""Frozen-student responses: generated once by a tiny local actor or a local fake server, cached, resumed, traced."""

from __future__ import annotations

import argparse
import json
import threading
import time
import traceback
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoTokenizer, GenerationConfig, GenerationMixin, Qwen2Config, Qwen2ForCausalLM

from critic import data as data_mod
from critic.config import DataConfig, SpecError, StudentConfig
from critic.data import DataError, generate_students, load_pair_set, read_pairs
from critic.student import StudentGenerationError, student_responses
from critic.student import endpoint as student_endpoint
from critic.student import responses as student_mod
from critic.student.cache import ResponseStore
from critic.trial import prepare, run_trial
from sweeper.commands.generate import add_parser as add_generate_command
from tests.helpers import tiny_config, write_pairs

API_KEY = "sk-test-do-not-print-4242"
PROMPTS = [f"What is {i} + {3 * i}?" for i in range(6)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def actor_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny random Qwen2 causal LM saved with the project's tokenizer: the frozen actor."""
    path = tmp_path_factory.mktemp("actor")
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         tie_word_embeddings=False, initializer_range=0.5, eos_token_id=tiny_tokenizer.eos_token_id,
                         pad_token_id=tiny_tokenizer.pad_token_id)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # never emit padding or <|im_start|>, so responses hold visible text
        model.lm_head.weight[[tiny_tokenizer.pad_token_id, tiny_tokenizer.convert_tokens_to_ids("<|im_start|>")]] = 0
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference_responses(actor_dir):
    """Each prompt generated alone (no padding), greedy, 6 new tokens: what batched generation must reproduce."""
    tokenizer = AutoTokenizer.from_pretrained(actor_dir)
    model = Qwen2ForCausalLM.from_pretrained(actor_dir).eval()
    out = []
    for prompt in PROMPTS:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
        new = model.generate(**ids, generation_config=GenerationConfig(
            max_new_tokens=6, do_sample=False, eos_token_id=[tokenizer.eos_token_id],
            pad_token_id=tokenizer.pad_token_id))[0, ids["input_ids"].shape[1]:].tolist()
        stop = new.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in new else None
        out.append(tokenizer.decode(new[:stop], skip_special_tokens=True))
    return out


def prompts_only(path, prompts=PROMPTS):
    """The users' real input: prompts and teacher responses, no student column."""
    return write_pairs(path, pd.DataFrame({"content": prompts, "teacher_response": [f"T: {p}" for p in prompts]}))


# Real generation work in this process: model.generate calls, HTTP request attempts (retries included),
# responses stored in the cache. Counted by wrapping those three calls for every test of this file.
GENERATION_COUNTS = {"batches": 0, "requests": 0, "responses": 0}


@pytest.fixture(autouse=True)
def count_generation(monkeypatch):
    generate, urlopen, add = GenerationMixin.generate, urllib.request.urlopen, ResponseStore.add
    lock = threading.Lock()  # requests come from the client's thread pool

    def counting_generate(self, *args, **kwargs):
        GENERATION_COUNTS["batches"] += 1
        return generate(self, *args, **kwargs)

    def counting_urlopen(*args, **kwargs):
        with lock:
            GENERATION_COUNTS["requests"] += 1
        return urlopen(*args, **kwargs)

    def counting_add(self, rows, texts, reasons):
        GENERATION_COUNTS["responses"] += len(rows)
        return add(self, rows, texts, reasons)

    monkeypatch.setattr(GenerationMixin, "generate", counting_generate)
    monkeypatch.setattr(urllib.request, "urlopen", counting_urlopen)
    monkeypatch.setattr(ResponseStore, "add", counting_add)


def counts():
    return dict(GENERATION_COUNTS)


def generated_since(before: dict[str, int]) -> dict[str, int]:
    return {k: GENERATION_COUNTS[k] - before[k] for k in before}


# --- spec rules -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("student, match", [
    ({"model": "/m", "endpoint": "http://x/v1", "model_name": "m"},
     r"student\.model .* or student\.endpoint .* not both"),
    ({"endpoint": "http://x/v1"}, r"student\.endpoint needs student\.model_name"),
    ({"endpoint": "x:8000", "model_name": "m"}, r"student\.endpoint must be an http:// or https:// URL"),
    ({"regenerate": True}, r"student\.regenerate: true needs student\.model or student\.endpoint"),
    ({"temperature": -0.1}, r"student\.temperature must be >= 0"),
    ({"top_p": 0.0}, r"student\.top_p must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"student\.top_p must be in \(0, 1\]"),
    ({"max_new_tokens": 0}, r"student\.max_new_tokens must be >= 1"),
    ({"batch_size": 0}, r"student\.batch_size must be >= 1"),
    ({"concurrency": 0}, r"student\.concurrency must be >= 1"),
    ({"timeout_s": 0}, r"student\.timeout_s must be > 0"),
    ({"max_retries": -1}, r"student\.max_retries must be >= 0"),
])
def test_impossible_student_settings_fail_at_load(tmp_path, student, match):
    with pytest.raises(SpecError, match=match):
        tiny_config(tmp_path / "pairs.parquet", tmp_path, {f"student.{k}": v for k, v in student.items()})


def test_missing_student_column_without_a_source_says_how_to_generate(tmp_path, tiny_tokenizer):
    path = prompts_only(tmp_path / "prompts.parquet")
    cfg = DataConfig(train_path=str(path), cache_dir=str(tmp_path))
    with pytest.raises(DataError, match=r"missing column\(s\) \['student_response'\].* or configure "
                                        r"student\.model / student\.endpoint to generate it"):
        load_pair_set(str(path), cfg, tiny_tokenizer, "tiny", "train", StudentConfig())


# --- local actor ----------------------------------------------------------------------------------------------

def test_local_actor_generates_once_then_reads_the_disk_cache(tmp_path, actor_dir, reference_responses,
                                                             monkeypatch):
    path = prompts_only(tmp_path / "prompts.parquet")
    cfg = DataConfig(train_path=str(path), cache_dir=str(tmp_path / "cache"))
    student = StudentConfig(model=str(actor_dir), max_new_tokens=6, batch_size=4)
    before = counts()
    first = student_responses(path, cfg, student)
    assert generated_since(before) == {"batches": 2, "requests": 0, "responses": 6}
    frame = pd.read_parquet(first.path)
    assert list(frame.columns) == ["content", "teacher_response", "student_response",
                                   "student_response_finish_reason"]
    assert frame["content"].tolist() == PROMPTS  # original rows, in order
    assert frame["student_response"].tolist() == reference_responses  # left padding + chat template are right
    assert any(reference_responses) and set(frame["student_response_finish_reason"]) <= {"stop", "length"}
    assert first.lineage["source"] == "model"
    assert first.lineage["actor"].startswith(f"{actor_dir.resolve()}@")
    assert json.loads(first.lineage["generation"]) == {"max_new_tokens": 6, "seed": 0, "temperature": 0.0,
                                                       "top_p": 1.0}

    before = counts()
    assert student_responses(path, cfg, student) == first  # same process: memory
    monkeypatch.setattr(student_mod, "_MEMORY", {})  # a new process: only the disk cache is left
    assert student_responses(path, cfg, student) == first
    assert generated_since(before) == {"batches": 0, "requests": 0, "responses": 0}

    other = student_responses(path, cfg, StudentConfig(model=str(actor_dir), max_new_tokens=4, batch_size=4))
    assert other.lineage["cache_key"] != first.lineage["cache_key"]  # other generation params: other responses


def test_interrupted_generation_resumes_where_it_stopped(tmp_path, actor_dir, reference_responses):
    path = prompts_only(tmp_path / "prompts.parquet")
    cfg = DataConfig(train_path=str(path), cache_dir=str(tmp_path / "cache"))
    student = StudentConfig(model=str(actor_dir), max_new_tokens=6, batch_size=2)

    class Stop(Exception):
        pass

    def stop_after_first_batch(done, total):
        raise Stop(f"{done} of {total}")

    before = counts()
    with pytest.raises(Stop, match="2 of 6"):
        student_responses(path, cfg, student, on_progress=stop_after_first_batch, chunk_rows=100)
    assert generated_since(before)["responses"] == 2
    parts = list((tmp_path / "cache" / "students").glob("*/part-*.parquet"))
    assert len(parts) == 1 and len(pd.read_parquet(parts[0])) == 2  # flushed although the chunk was not full

    before = counts()
    resumed = student_responses(path, cfg, student)
    assert generated_since(before) == {"batches": 2, "requests": 0, "responses": 4}  # only the rest
    assert pd.read_parquet(resumed.path)["student_response"].tolist() == reference_responses


# --- OpenAI-compatible endpoint -------------------------------------------------------------------------------

class FakeChatServer:
    """A chat-completions server on 127.0.0.1 that misbehaves on cue: `script[prompt]` lists what each attempt gets.

    "500": an internal error; "slow": answers only after 1 s (past the client's timeout);
    "401": rejects the key and echoes the Authorization header back, as some servers do.
    A prompt starting with EMPTY gets an empty answer.
    """

    def __init__(self, script: dict[str, list[str]]):
        self.script, self.attempts, self.auth, self.received = script, {}, [], []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][-1]["content"]
                with server.lock:
                    attempt = server.attempts.get(prompt, 0)
                    server.attempts[prompt] = attempt + 1
                    server.auth.append(self.headers.get("Authorization"))
                    server.received.append(body["messages"])
                cues = server.script.get(prompt, [])
                cue = cues[attempt] if attempt < len(cues) else "ok"
                try:
                    if cue == "slow":
                        time.sleep(1.0)
                    if cue in ("500", "401"):
                        text = "boom" if cue == "500" else f"invalid key in {self.headers.get('Authorization')}"
                        self.reply(int(cue), {"error": {"message": text}})
                        return
                    content = "" if prompt.startswith("EMPTY") else f"answer to {prompt}"
                    self.reply(200, {"choices": [{"index": 0, "finish_reason": "stop",
                                                  "message": {"role": "assistant", "content": content}}]})
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass

            def reply(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)  # port 0: a free port
        self.httpd.daemon_threads, self.httpd.block_on_close = True, False
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def endpoint_env(monkeypatch):
    monkeypatch.setenv("TEST_STUDENT_KEY", API_KEY)
    monkeypatch.setenv("no_proxy", "*")  # the fake server is local, whatever proxy the machine sets
    monkeypatch.setattr(student_endpoint, "BACKOFF_S", 0.01)
    servers = []
    yield lambda script: servers.append(FakeChatServer(script)) or servers[-1]
    for server in servers:
        server.close()


def endpoint_student(url: str, **overrides) -> StudentConfig:
    return StudentConfig(**{"endpoint": url, "model_name": "actor", "api_key_env": "TEST_STUDENT_KEY",
                            "timeout_s": 0.3, "max_retries": 2, "concurrency": 3, **overrides})


def test_endpoint_retries_errors_and_timeouts_and_keeps_empty_answers(tmp_path, endpoint_env, tiny_tokenizer,
                                                                      capsys):
    prompts = ["p0", "p1 fails once", "p2 is slow once", "EMPTY p3", "p4"]
    server = endpoint_env({"p1 fails once": ["500"], "p2 is slow once": ["slow"]})
    path = prompts_only(tmp_path / "prompts.parquet", prompts)
    cfg = DataConfig(train_path=str(path), cache_dir=str(tmp_path / "cache"), val_fraction=0.25)
    student = endpoint_student(server.url)
    before = counts()
    result = student_responses(path, cfg, student)
    assert generated_since(before) == {"batches": 0, "requests": 7, "responses": 5}  # 5 + one retry each
    assert server.attempts == {"p0": 1, "p1 fails once": 2, "p2 is slow once": 2, "EMPTY p3": 1, "p4": 1}
    assert set(server.auth) == {f"Bearer {API_KEY}"}  # the key is sent ...
    assert API_KEY not in json.dumps(result.lineage) and API_KEY not in capsys.readouterr().out  # ... never shown
    assert result.lineage["source"] == "endpoint" and result.lineage["actor"] == f"{server.url}#actor"
    responses = pd.read_parquet(result.path)["student_response"].tolist()
    assert responses == ["answer to p0", "answer to p1 fails once", "answer to p2 is slow once", "", "answer to p4"]

    # The data pipeline keeps the empty generated answer as the EOS-only response, and counts it.
    pairs = load_pair_set(str(path), cfg, tiny_tokenizer, "tiny", "train", student)
    assert len(pairs) == 5 and pairs.stats["student_empty_responses"] == 1.0
    assert pairs.student_ids[3].tolist() == [tiny_tokenizer.eos_token_id] and pairs.student_ends_eos[3]
    assert pairs.lineage == result.lineage
    # Read as a plain file, the same empty answer is dropped as before: the rule only covers generated responses.
    assert len(read_pairs(result.path, cfg)[0]) == 4


def test_endpoint_failure_stops_keeps_the_rest_and_never_shows_the_key(tmp_path, endpoint_env, capsys, caplog):
    prompts = ["p0", "p1", "p2 always fails", "p3"]
    broken = endpoint_env({"p2 always fails": ["500"] * 10})
    path = prompts_only(tmp_path / "prompts.parquet", prompts)
    cfg = DataConfig(train_path=str(path), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(StudentGenerationError, match=r"failed after 3 attempt\(s\).*HTTP 500.*boom.* 2 of 4 "
                                                     r"responses are saved in .*; rerun the same command to resume"):
        student_responses(path, cfg, endpoint_student(broken.url, concurrency=1))
    assert broken.attempts == {"p0": 1, "p1": 1, "p2 always fails": 3}  # p3 is never started

    rejecting = endpoint_env({p: ["401"] for p in prompts})
    with pytest.raises(StudentGenerationError) as failure:
        student_responses(path, DataConfig(train_path=str(path), cache_dir=str(tmp_path / "other")),
                          endpoint_student(rejecting.url, concurrency=1))
    assert "HTTP 401" in str(failure.value) and "Bearer ***" in str(failure.value)  # the echoed key is scrubbed
    assert sum(rejecting.attempts.values()) == 1  # a rejected key is not retried, and nothing more is started
    shown = "".join(traceback.format_exception(failure.value)) + str(capsys.readouterr()) + caplog.text
    assert API_KEY not in shown

    broken.script.clear()  # the server recovers; the same actor and prompts resume from the saved responses
    before = counts()
    resumed = student_responses(path, cfg, endpoint_student(broken.url))
    assert generated_since(before) == {"batches": 0, "requests": 2, "responses": 2}  # p2 and p3 only
    assert pd.read_parquet(resumed.path)["student_response"].tolist() == [f"answer to {p}" for p in prompts]


def test_chat_prompts_pass_through_and_regenerate_replaces_the_files_own_column(tmp_path, endpoint_env):
    server = endpoint_env({})
    chats = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"q{i}"}] for i in range(2)]
    path = write_pairs(tmp_path / "chat.parquet", pd.DataFrame({
        "content": chats, "teacher_response": ["t0", "t1"], "student_response": ["old0", "old1"]}))
    cfg = DataConfig(train_path=str(path), cache_dir=str(tmp_path / "cache"))
    assert student_responses(path, cfg, endpoint_student(server.url)) is None  # the file's own column is used
    result = student_responses(path, cfg, endpoint_student(server.url, regenerate=True))
    assert sorted(server.received, key=str) == chats  # verl-style message lists reach the server as they are
    frame = pd.read_parquet(result.path)
    assert list(frame.columns) == ["content", "teacher_response", "student_response",
                                   "student_response_finish_reason"]
    assert frame["student_response"].tolist() == ["answer to q0", "answer to q1"]


# --- whole trials and the command line --------------------------------------------------------------------------

def test_trials_on_prompts_only_data_generate_once(tmp_path, tiny_cache_dir, actor_dir, monkeypatch):
    prompts = [f"Ana has {i} apples and buys {i + 2} more. How many apples?" for i in range(16)]
    path = prompts_only(tmp_path / "prompts.parquet", prompts)
    cfg = tiny_config(path, tiny_cache_dir, {"train.max_steps": 2, "student.model": str(actor_dir),
                                             "student.max_new_tokens": 6, "student.batch_size": 8})
    before = counts()
    with pytest.raises(DataError, match=r"not generated yet: run `sweep.py generate SPEC` first"):
        run_trial(cfg)  # a trial never starts a generation itself
    assert generated_since(before)["responses"] == 0
    generate_students(cfg)  # the explicit step, as `sweep.py run`, `train` and `generate` take it
    first = run_trial(cfg)
    second = run_trial(cfg)  # the next trial of a sweep
    assert generated_since(before) == {"batches": 2, "requests": 0, "responses": 16}  # once, not per trial
    for result in (first, second):
        assert result.metrics["train/steps"] == 2 and np.isfinite(result.metrics["val/d_acc"])
        assert result.metrics["data/train_pairs"] + result.metrics["data/val_pairs"] == 16
        assert "data/train_student_empty_responses" in result.metrics

    monkeypatch.setattr(student_mod, "_MEMORY", {})  # a fresh worker process
    monkeypatch.setattr(data_mod, "_MEMORY", {})
    data = prepare(cfg)[2]
    assert generated_since(before)["responses"] == 16  # the disk cache serves it
    assert data.lineage["student.source"] == "model"
    assert data.lineage["student.actor"].startswith(str(actor_dir.resolve()))
    assert set(data.lineage) == {"student.source", "student.actor", "student.generation", "student.train_cache_key"}
    assert data.digests["train"] != data_mod.file_digest(path)  # the file trials read: prompts + generated column


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks that a CPU machine refuses model.device: cuda")
def test_generation_runs_on_the_specs_model_device(tmp_path, tiny_cache_dir, actor_dir):
    """The actor generates on model.device, not on a device of its own choosing: asked for CUDA on a machine
    without it, generation stops with the spec's one-line error instead of running on the CPU."""
    path = prompts_only(tmp_path / "prompts.parquet")
    cfg = tiny_config(path, tiny_cache_dir, {"student.model": str(actor_dir), "student.max_new_tokens": 6,
                                             "model.device": "cuda"})
    before = counts()
    with pytest.raises(SpecError, match=r"model\.device is 'cuda' but no CUDA device is available"):
        generate_students(cfg)
    assert generated_since(before)["responses"] == 0


def test_generate_command_fills_the_cache_that_trials_read(tmp_path, tiny_cache_dir, actor_dir, capsys):
    path = prompts_only(tmp_path / "prompts.parquet")
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"data:\n  train_path: {path}\n  cache_dir: {tmp_path / 'cache'}\n"
                    f"student:\n  max_new_tokens: 6\n")
    parser = argparse.ArgumentParser()
    add_generate_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["generate", str(spec), "--set", f"student.model={actor_dir}"])
    before = counts()
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert generated_since(before)["responses"] == 6 and "[generate] train: " in out and "student: model" in out

    with pytest.raises(SpecError, match=r"nothing to generate with; set student\.model"):
        args.func(parser.parse_args(["generate", str(spec)]))
