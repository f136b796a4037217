#!/usr/bin/env bash
# Summarization with LoSparse (run_summarization.py): the original commands, BART-large on XSum and CNN/DailyMail,
# low-rank ratio 0.35 + final_threshold 0.05 (kept fraction of S), deltaT 100, 6 beams, 12 epochs, lr 6e-5,
# seed 42. The original ran on a single V100 32GB. ROUGE-1/2/L/Lsum (x100) and the effective parameter ratio are
# written to <output_dir>/all_results.json, the summaries to <output_dir>/generated_predictions.txt.
#
#   bash train_summarization.sh                  # both, one after the other (as the original file)
#   bash train_summarization.sh xsum             # or: cnn_dailymail
#   CHECKPOINT=out/pytorch_model.bin DATASET=xsum bash train_summarization.sh eval   # evaluate, no training
#
# Further arguments go to run_summarization.py, e.g.
#   bash train_summarization.sh xsum --resume_from_checkpoint latest     # continue after an interruption
#   bash train_summarization.sh xsum --max_train_samples 2000 --max_eval_samples 200 --num_train_epochs 1
#   bash train_summarization.sh cnn_dailymail --do_predict --report_to tensorboard
# --checkpointing_steps epoch saves <output_dir>/epoch_<i> after each epoch's evaluation (model, optimizer,
# scheduler, RNG states, data order and the pruner's statistics); --resume_from_checkpoint <that folder> or
# `latest` continues the run exactly (bit for bit on the same machine).
# Multi-GPU / bf16: PYTHON="accelerate launch --multi_gpu --num_processes N --mixed_precision bf16" (data parallel).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
VARIANT=${1:-all}
[ $# -gt 0 ] && shift

common=(
  --model_name_or_path facebook/bart-large
  --max_source_length 256
  --seed 42
  --per_device_train_batch_size 32
  --per_device_eval_batch_size 32
  --deltaT 100
  --low_rank_parameter_ratio 0.35
  --final_threshold 0.05
  --learning_rate 6e-5
  --initial_warmup 2
  --final_warmup 8
  --num_train_epochs 12
  --with_tracking
  --checkpointing_steps epoch
  --beta1 0.85
  --num_beams 6
)
# The hub's XSum (EdinburghNLP/xsum) has one configuration, "default", served as parquet from refs/convert/parquet
# (datasets >= 4 runs no loading scripts); the original's --dataset_config "3.0.0" applies to CNN/DailyMail only.
xsum_data=(--dataset_name xsum --dataset_revision refs/convert/parquet)
cnn_data=(--dataset_name cnn_dailymail --dataset_config "3.0.0")

xsum() {
  $PY run_summarization.py "${xsum_data[@]}" --output_dir output/xsum/lrr0.35_pr0.05/lr6e-5/seed_42 \
    "${common[@]}" "$@"
}
cnn_dailymail() {
  $PY run_summarization.py "${cnn_data[@]}" --output_dir output/cnn_dailymail/lrr0.35_pr0.05/lr6e-5/seed_42 \
    "${common[@]}" "$@"
}

case "$VARIANT" in
  xsum) xsum "$@" ;;
  cnn_dailymail) cnn_dailymail "$@" ;;
  all)
    xsum "$@"
    cnn_dailymail "$@"
    ;;
  eval)
    # The base model must be the one the checkpoint was trained from (the ranks are read from the file).
    case "${DATASET:-xsum}" in
      xsum) data=("${xsum_data[@]}") ;;
      cnn_dailymail) data=("${cnn_data[@]}") ;;
      *) echo "DATASET must be xsum or cnn_dailymail" >&2; exit 2 ;;
    esac
    $PY run_summarization.py "${data[@]}" --model_name_or_path "${MODEL:-facebook/bart-large}" \
      --max_source_length 256 --per_device_eval_batch_size 32 --num_beams 6 --num_train_epochs 0 \
      --eval_checkpoint "${CHECKPOINT:?set CHECKPOINT=path/to/pytorch_model.bin}" \
      --output_dir "${OUTPUT_DIR:-output/${DATASET:-xsum}/eval}" "$@"
    ;;
  *)
    echo "usage: bash train_summarization.sh [xsum|cnn_dailymail|all|eval] [run_summarization.py arguments...]" >&2
    exit 2
    ;;
esac
