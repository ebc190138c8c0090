#!/usr/bin/env bash
# The GPU benchmark in one command, on a CUDA machine with a checkout of this repo (no network needed):
#   bash benchmarks/gpu_run.sh [bench_gpu.py options]      (or: make bench-gpu)
# Results go to $OUT when set (the device machine collects it), else benchmarks/results/:
# bench_gpu.jsonl (one JSON object per configuration), bench_gpu.txt (the table), bench_gpu.log (everything).
# BENCH_TIMEOUT (seconds, default 540) bounds the run; rows finished before a timeout are already written.
set -uo pipefail
cd "$(dirname "$0")/.."
out_dir="${OUT:-benchmarks/results}"

# A python whose torch sees the GPU: $PYTHON, else the project's .venv, else python3 (the device image's).
python="${PYTHON:-}"
if [ -z "$python" ]; then
  for candidate in .venv/bin/python python3; do
    if "$candidate" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
      python="$candidate"; break
    fi
  done
fi
if [ -z "$python" ]; then
  echo "gpu_run.sh: no python with a CUDA build of torch that sees a GPU; set PYTHON=/path/to/python" >&2
  exit 2
fi

mkdir -p "$out_dir"

# Optional offline extras (TRL for the TRL rows; see docs/benchmarks.md): wheels in .whl/, installed aside.
if compgen -G ".whl/*.whl" >/dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --target /tmp/bench-site .whl/*.whl \
    && export PYTHONPATH="/tmp/bench-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

{
  "$python" -c "import sys, torch, transformers; print('python', sys.version.split()[0], '| torch', torch.__version__,
'| transformers', transformers.__version__, '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv,noheader 2>/dev/null
  timeout --signal=INT --kill-after=30 "${BENCH_TIMEOUT:-540}" "$python" benchmarks/bench_gpu.py --out "$out_dir" "$@"
} 2>&1 | tee "$out_dir/bench_gpu.log"
