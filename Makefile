# Two commands on a fresh machine: `make sweep` (demo sweep) and `make test`.
PY := .venv/bin/python
PIP := .venv/bin/pip
SPEC ?= experiments/demo.yaml
export MLFLOW_DISABLE_TELEMETRY := true
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install sweep train test bench bench-scale ui export clean

install: .venv/.installed

# torch first, pinned to the CPU build that satisfies requirements.txt's range without pulling CUDA wheels.
.venv/.installed: requirements.txt
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -r requirements.txt
	touch $@

sweep: install
	$(PY) sweep.py run $(SPEC)

train: install
	$(PY) sweep.py train $(SPEC)

test: install
	$(PY) -m pytest -q tests

bench: install
	$(PY) benchmarks/bench_trainer.py
	$(PY) benchmarks/bench_sweep.py

bench-scale: install
	$(PY) benchmarks/bench_scale.py

ui: install
	$(PY) sweep.py ui

export: install
	$(PY) sweep.py export --format yaml -o best.yaml

clean:
	rm -rf mlruns .pytest_cache
