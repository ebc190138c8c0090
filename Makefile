# Two commands on a fresh machine: `make sweep` (demo sweep) and `make test`; `make lint` and `make smoke` for quick checks.
PY := .venv/bin/python
PIP := .venv/bin/pip
SPEC ?= experiments/demo.yaml
export MLFLOW_DISABLE_TELEMETRY := true
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install sweep gad-demo train test lint smoke bench bench-decision bench-scale bench-gpu ui export clean

install: .venv/.installed .venv/.verl-extra .venv/.launcher-extras

# torch first, pinned to the CPU build that satisfies requirements.txt's range without pulling CUDA wheels.
# Then the project itself, editable (pyproject.toml; its dependencies are requirements.txt, installed just before).
.venv/.installed: requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -r requirements.txt -r requirements-dev.txt
	$(PIP) install -q --no-deps -e .
	touch $@

# Test-only extra (requirements-verl.txt, --no-deps: verl pins an older transformers). Where it cannot be
# installed (offline), the tool still works and tests/test_verl_*.py skip, printing why.
.venv/.verl-extra: .venv/.installed requirements-verl.txt
	if $(PIP) install -q --no-deps -r requirements-verl.txt; then touch $@; \
	else echo "[make] verl test extra not installed: tests/test_verl_*.py will skip"; fi

# The launchers' extras (requirements-ray.txt, requirements-slurm.txt), which tests/test_launchers.py needs. Where
# they cannot be installed, `run --launcher local` still works and those tests skip, printing why.
.venv/.launcher-extras: .venv/.installed requirements-ray.txt requirements-slurm.txt
	if $(PIP) install -q -r requirements-ray.txt -r requirements-slurm.txt; then touch $@; \
	else echo "[make] ray/slurm extras not installed: tests/test_launchers.py will skip them"; fi

sweep: install
	$(PY) sweep.py run $(SPEC)

# The GAD flow offline: the demo actor (trained once) writes the student side of prompts-only demo data,
# then a 5-trial sweep on it. docs/student.md, "Try it offline".
gad-demo: install
	$(PY) sweep.py generate experiments/demo_generate.yaml
	$(PY) sweep.py run experiments/demo_generate.yaml

train: install
	$(PY) sweep.py train $(SPEC)

# Two pytest-xdist workers per core, up to 8: a test often waits (a server restarting, a worker's heartbeat, a
# subprocess starting) and the other worker on its core runs meanwhile; each worker imports torch once, so more
# costs memory. tests/conftest.py says how the tests are spread over them.
TEST_WORKERS ?= $(shell python3 -c "import os; print(max(1, min(8, 2 * len(os.sched_getaffinity(0)))))")
test: install
	$(PY) -m pytest -q -rs --durations=30 -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder tests

lint: install
	$(PY) -m ruff check .

# One tiny trial end to end (tiny preset, demo data, 6 steps): under a minute on a laptop CPU.
smoke: install
	$(PY) sweep.py train experiments/demo.yaml --set train.max_steps=6 --set eval.every_steps=3 --json

bench: install
	$(PY) benchmarks/bench_trainer.py
	$(PY) benchmarks/bench_sweep.py

# Decision quality per trial-second: tool defaults vs Optuna defaults vs careful-by-hand, planted and null scenarios
# (docs/benchmarks.md, "Decision benchmark"). BENCH_ARGS=--quick: one repetition, a smoke check.
bench-decision: install
	OMP_NUM_THREADS=1 $(PY) -m benchmarks.bench_decision $(BENCH_ARGS)

bench-scale: install
	$(PY) -m benchmarks.bench_scale

# On a CUDA machine, offline: no install step (it uses the python whose torch sees the GPU); docs/benchmarks.md.
# `$(PY) benchmarks/bench_gpu.py --device cpu --tiny` checks the same script here in a minute.
bench-gpu:
	bash benchmarks/gpu_run.sh

ui: install
	$(PY) sweep.py ui

export: install
	$(PY) sweep.py export --format yaml -o best.yaml

clean:
	rm -rf mlruns .pytest_cache
