#!/usr/bin/env bash
# The test command: sets up ./.venv on first use, then runs the whole suite offline on CPU.
# Extra arguments go to pytest, e.g. `bash run_tests.sh -k pruner -x`.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest tests -q -p no:cacheprovider "$@"
