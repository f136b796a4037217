#!/usr/bin/env bash
# SQuAD v1.1 with LoSparse (run_qa.py). The kept fraction of every substituted matrix ends near
#   low_rank_parameter_ratio + final_threshold      (e.g. 0.05 + 0.15 = the 20 % column of the README table)
# and is reported as `effective_ratio` in <output_dir>/all_results.json, next to eval_exact_match / eval_f1.
#
#   bash train_qa.sh                      # DeBERTa-v3-base at 20 % (README table: SQuAD v1.1, 5-50 %)
#   FINAL_THRESHOLD=0.05 bash train_qa.sh # ... at 10 %; 0.25 -> 30 %, 0.35 -> 40 %, 0.45 -> 50 %
#   bash train_qa.sh bert                 # the original script: BERT-base, low-rank 0.05 + final_threshold 0.45
#   CHECKPOINT=out/pytorch_model.bin bash train_qa.sh eval   # evaluate a saved checkpoint, no training
#
# Further arguments go to run_qa.py, e.g.
#   bash train_qa.sh deberta --checkpointing_steps epoch --with_tracking --report_to tensorboard
#   bash train_qa.sh deberta --resume_from_checkpoint losparse_squad/deberta/epoch_3   # or: latest
#   bash train_qa.sh deberta --dataset_name squad_v2 --version_2_with_negative        # SQuAD v2.0
#   bash train_qa.sh deberta --eval_steps 2750        # also evaluate every half epoch, as the original did
# Multi-GPU: replace `python` by `accelerate launch --multi_gpu --num_processes N` (data parallel only).
# The original ran on a single V100 32GB.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
VARIANT=${1:-deberta}
[ $# -gt 0 ] && shift

SEED=${SEED:-7}
LOW_RANK=${LOW_RANK:-0.05}
# Schedule of the original command: SQuAD v1.1 has ~88.6k windows at 384 tokens, i.e. ~5.5k steps per epoch at
# batch 16; pruning starts after one unit of 5400 steps and the final ratio is held for the last five.
schedule=(--warmup_steps 5400 --initial_threshold 1 --initial_warmup 1 --final_warmup 5 --beta1 0.85 --deltaT 10)
train=(--per_device_train_batch_size 16 --per_device_eval_batch_size 16 --learning_rate 5e-5 --num_train_epochs 10
       --num_warmup_steps 3681 --max_seq_length 384 --doc_stride 128 --seed "$SEED")

case "$VARIANT" in
  deberta)
    FINAL_THRESHOLD=${FINAL_THRESHOLD:-0.15}
    "$PY" run_qa.py --dataset_name squad --model_name_or_path microsoft/deberta-v3-base \
      "${train[@]}" "${schedule[@]}" --low_rank_parameter_ratio "$LOW_RANK" --final_threshold "$FINAL_THRESHOLD" \
      --output_dir "${OUTPUT_DIR:-losparse_squad/deberta/lr5e-5/ratio${LOW_RANK}+${FINAL_THRESHOLD}/seed$SEED}" "$@"
    ;;
  bert)
    # The original train_qa.sh, flag for flag.
    FINAL_THRESHOLD=${FINAL_THRESHOLD:-0.45}
    "$PY" run_qa.py --dataset_name squad --model_name_or_path bert-base-uncased \
      "${train[@]}" "${schedule[@]}" --low_rank_parameter_ratio "$LOW_RANK" --final_threshold "$FINAL_THRESHOLD" \
      --output_dir "${OUTPUT_DIR:-losparse_squad/lr5e-5/seed$SEED}" "$@"
    ;;
  eval)
    # The base model must be the one the checkpoint was trained from (its ranks are read from the file).
    "$PY" run_qa.py --dataset_name squad --model_name_or_path "${MODEL:-microsoft/deberta-v3-base}" \
      --per_device_eval_batch_size 16 --max_seq_length 384 --doc_stride 128 --num_train_epochs 0 \
      --eval_checkpoint "${CHECKPOINT:?set CHECKPOINT=path/to/pytorch_model.bin}" \
      --output_dir "${OUTPUT_DIR:-losparse_squad/eval}" "$@"
    ;;
  *)
    echo "usage: bash train_qa.sh [deberta|bert|eval] [run_qa.py arguments...]" >&2
    exit 2
    ;;
esac
