#!/usr/bin/env bash
# Every GPU figure of the README in one run (about 8 minutes on one H100/H200): see benchmarks/run_gpu.py.
#   bash benchmarks/run_gpu.sh OUT_DIR [run_gpu.py flags]      e.g. bash benchmarks/run_gpu.sh gpu_figures
#   bash benchmarks/run_gpu.sh OUT_DIR --quick                  CPU smoke run (seconds)
# RUN_GPU_TIMEOUT (seconds, default 570) stops a run that overruns; the finished figures stay in OUT_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
if [ $# -lt 1 ]; then echo "usage: bash benchmarks/run_gpu.sh OUT_DIR [--quick] [--sections a,b] [--budget-s S]" >&2; exit 2; fi
exec timeout --signal=INT --kill-after=20 "${RUN_GPU_TIMEOUT:-570}" "$PY" benchmarks/run_gpu.py "$@"
