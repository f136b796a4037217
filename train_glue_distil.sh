#!/usr/bin/env bash
# Knowledge distillation of a LoSparse-pruned BERT-base on MNLI (the original train_glue_distil.sh, now a mode of
# run_glue.py). The student is built with STEP 1, the pruned checkpoint of a previous run_glue.py run is loaded
# from --stored_model_path and compacted (utils.prune: only the nonzero rows of S are kept), then trained without
# further pruning on
#   task loss + alpha_output * KL(softmax(teacher/T) || softmax(student/T)) * T^2
#             + alpha_layer  * sum over all hidden states of MSE(student, teacher)
# (MSE of the logits instead of KL for regression tasks). The teacher runs in eval() without gradients.
#
#   bash train_glue_distil.sh                   # distil output/bert_mnli/pytorch_model.bin
#   STORED_MODEL=path/to/pytorch_model.bin bash train_glue_distil.sh --num_train_epochs 10
# Arguments are passed on to run_glue.py.
#
# Step 1, the model to distil (run once): prune BERT-base on MNLI with run_glue.py, e.g. at 25 %
#   python run_glue.py --task_name mnli --model_name_or_path bert-base-uncased --low_rank_parameter_ratio 0.05 \
#     --final_threshold 0.20 --warmup_steps 675 --initial_warmup 1 --final_warmup 5 --beta1 0.85 \
#     --per_device_train_batch_size 32 --gradient_accumulation_steps 8 --learning_rate 9e-5 --num_train_epochs 8 \
#     --num_warmup_steps 480 --seed 7 --output_dir output/bert_mnli
# It writes output/bert_mnli/pytorch_model.bin (original key layout), which --stored_model_path loads.
#
# With --alpha_output > 0 the teacher's label order must be the dataset's (GLUE: entailment, neutral,
# contradiction); the original command below uses the hidden-state term only (--alpha_output 0).
# The original ran on a single V100 32GB.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}

# MNLI
"$PY" run_glue.py \
  --task_name mnli \
  --model_name_or_path bert-base-uncased \
  --stored_model_path "${STORED_MODEL:-output/bert_mnli/pytorch_model.bin}" \
  --teacher_path textattack/bert-base-uncased-MNLI \
  --per_device_train_batch_size 32 \
  --learning_rate 9e-5 \
  --alpha_output 0 \
  --alpha_layer 15 \
  --temperature 2 \
  --num_train_epochs 50 \
  --output_dir "${OUTPUT_DIR:-output/bert_mnli_distil}" \
  --low_rank_parameter_ratio 0.05 \
  --seed 7 \
  "$@"

# Evaluate the distilled model (its pytorch_model.bin holds sparse_weight_pruned + nonzero_idx; ranks and kept rows
# are read from the file):
#   python run_glue.py --task_name mnli --model_name_or_path bert-base-uncased --num_train_epochs 0 \
#     --eval_checkpoint output/bert_mnli_distil/pytorch_model.bin --output_dir output/bert_mnli_distil_eval
