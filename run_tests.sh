#!/usr/bin/env bash
# The test command: sets up ./.venv on first use, then runs the whole suite offline on CPU.
# Extra arguments go to pytest, e.g. `bash run_tests.sh -k pruner -x`.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Two pytest workers (pytest-xdist), one OpenMP thread each: most tests are Python-bound (script start-up, tiny
# models), and two processes with two threads each on two cores stall each other. LOSPARSE_TEST_WORKERS=0 runs
# the suite in this one process. --dist loadscope sends each test file whole to one worker (its module-scoped runs
# are trained once), and --no-loadscope-reorder keeps the order tests/conftest.py gives: longest files first, so the
# two workers finish together.
# The example scripts the tests run start as children of a fork server that has imported torch, transformers and
# datasets once per worker (tests/_script_server.py; LOSPARSE_TEST_FORK=0 starts a fresh interpreter for each run).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python -m pytest tests -q -p no:cacheprovider -n "${LOSPARSE_TEST_WORKERS:-2}" --dist loadscope \
  --no-loadscope-reorder --durations=20 "$@"
