#!/usr/bin/env bash
# Decoder LLMs with LoSparse (run_clm.py) on WikiText-2 (wikitext-2-raw-v1): perplexity at block size 2048 on the
# test split, the setting the LLM-compression literature reports. The kept fraction of the substituted matrices
# (q, k, v, o, gate, up, down of every layer) ends near low_rank_parameter_ratio + final_threshold and is written as
# `effective_ratio` next to `perplexity` in <output_dir>/all_results.json. lm_head and the embeddings are not
# compressed.
#
#   bash train_clm.sh                 # Qwen2.5-0.5B at 50 % (low-rank 0.2 + sparse 0.3)
#   bash train_clm.sh qwen1.5b        # Qwen2.5-1.5B at 50 %
#   bash train_clm.sh llama8b         # Llama-3.1-8B at 50 % (gated on the Hub: accept the licence, log in)
#   PYTHON="torchrun --nproc_per_node 8" bash train_clm.sh llama8b-fsdp2   # Llama-3.1-8B over 8 GPUs (FSDP2)
#   bash train_clm.sh all             # the four, one after the other
#   LOW_RANK=0.1 FINAL_THRESHOLD=0.2 bash train_clm.sh qwen0.5b   # 30 %
#   bash train_clm.sh qwen0.5b --no_losparse --output_dir output/qwen0.5b_full    # full fine-tuning baseline
#   bash train_clm.sh qwen0.5b --num_train_epochs 0 --no_losparse --output_dir output/qwen0.5b_dense  # as loaded
# Extra arguments are passed on to run_clm.py. Multi-GPU: PYTHON="accelerate launch --multi_gpu --num_processes N"
# (data parallel only; keep the global batch by dividing --gradient_accumulation_steps by N).
#
# Memory on one 80 GB GPU. S is trained densely (as in the paper), so a LoSparse run holds the dense weights plus
# L and R, their gradients and AdamW's two moments: about the memory of full fine-tuning, plus activations.
#   - Qwen2.5-0.5B / 1.5B: fp32 weights with --mixed_precision bf16 fit (about 10 / 30 GB of weights and optimizer
#     state) with batch 1 x 2048 and --gradient_checkpointing; drop gradient checkpointing on 0.5B for speed.
#   - 7B / 8B: fp32 weights + AdamW need 16 bytes a parameter = 128 GB for 8B: they do not fit. With
#     --torch_dtype bfloat16 (pure bf16 weights, gradients and AdamW state: 8 bytes a parameter, about 64 GB for
#     8B, plus L and R) and --gradient_checkpointing at batch 1 x 2048 it is at the limit of 80 GB; Qwen2.5-7B and
#     LLaMA-2-7B leave a little more room. Pure bf16 AdamW updates lose small steps: use a learning rate >= 1e-5.
#     Or shard it over several GPUs with FSDP2 (--fsdp2, recipe llama8b-fsdp2: fp32 weights, bf16 autocast, about
#     17 GB of weights and optimizer state per GPU at 8 GPUs); DeepSpeed and FSDP1 are refused.
#   - --gradient_checkpointing trades about 30 % more time for activations of one layer instead of all;
#     --mixed_precision bf16 (fp32 weights, bf16 compute) is the setting for the smaller models.
# Token budget: WikiText-2 has about 2.4 M (Qwen) / 2.5 M (LLaMA-3) training tokens = about 1,200 blocks of 2048;
# with a global batch of 8 blocks one epoch is about 150 optimizer steps.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
LOW_RANK=${LOW_RANK:-0.2}
FINAL_THRESHOLD=${FINAL_THRESHOLD:-0.3}
which=${1:-qwen0.5b}
if [ $# -gt 0 ]; then shift; fi

data=(--dataset_name wikitext --dataset_config_name wikitext-2-raw-v1 --eval_split test --block_size 2048)
losparse=(--low_rank_parameter_ratio "$LOW_RANK" --final_threshold "$FINAL_THRESHOLD" --initial_threshold 1
          --initial_warmup 1 --final_warmup 3 --beta1 0.85 --deltaT 10 --svd auto)

qwen05() {
  # Qwen2.5-0.5B (24 layers, hidden 896, GQA 14/2 heads): 3 epochs x ~150 steps of 8 blocks.
  $PY run_clm.py --model_name_or_path Qwen/Qwen2.5-0.5B "${data[@]}" "${losparse[@]}" \
    --per_device_train_batch_size 2 --gradient_accumulation_steps 4 --per_device_eval_batch_size 4 \
    --learning_rate 1e-4 --lr_scheduler_type cosine --num_warmup_steps 20 --num_train_epochs 3 \
    --warmup_steps 40 --mixed_precision bf16 --seed 7 --checkpointing_steps epoch \
    --output_dir "${OUTPUT_DIR:-output/qwen2.5-0.5b_wikitext2}" "$@"
}

qwen15() {
  # Qwen2.5-1.5B (28 layers, hidden 1536, GQA 12/2 heads)
  $PY run_clm.py --model_name_or_path Qwen/Qwen2.5-1.5B "${data[@]}" "${losparse[@]}" \
    --per_device_train_batch_size 1 --gradient_accumulation_steps 8 --per_device_eval_batch_size 2 \
    --learning_rate 5e-5 --lr_scheduler_type cosine --num_warmup_steps 20 --num_train_epochs 3 \
    --warmup_steps 40 --mixed_precision bf16 --gradient_checkpointing --seed 7 --checkpointing_steps epoch \
    --output_dir "${OUTPUT_DIR:-output/qwen2.5-1.5b_wikitext2}" "$@"
}

llama8b() {
  # Llama-3.1-8B (32 layers, hidden 4096, GQA 32/8 heads): pure bf16 and gradient checkpointing to fit 80 GB.
  $PY run_clm.py --model_name_or_path meta-llama/Llama-3.1-8B "${data[@]}" "${losparse[@]}" \
    --per_device_train_batch_size 1 --gradient_accumulation_steps 8 --per_device_eval_batch_size 1 \
    --learning_rate 2e-5 --lr_scheduler_type cosine --num_warmup_steps 10 --num_train_epochs 2 \
    --warmup_steps 25 --torch_dtype bfloat16 --gradient_checkpointing --seed 7 --checkpointing_steps 50 \
    --output_dir "${OUTPUT_DIR:-output/llama-3.1-8b_wikitext2}" "$@"
}

llama8b_fsdp2() {
  # Llama-3.1-8B sharded over the processes of the launcher (FSDP2: every rank holds whole rows of S):
  # fp32 master weights, bf16 autocast, global batch 8 blocks at 8 GPUs. Launch with
  # PYTHON="torchrun --nproc_per_node 8" (or accelerate launch --multi_gpu --num_processes 8).
  $PY run_clm.py --model_name_or_path meta-llama/Llama-3.1-8B "${data[@]}" "${losparse[@]}" \
    --per_device_train_batch_size 1 --gradient_accumulation_steps 1 --per_device_eval_batch_size 1 \
    --learning_rate 2e-5 --lr_scheduler_type cosine --num_warmup_steps 10 --num_train_epochs 2 \
    --warmup_steps 25 --mixed_precision bf16 --gradient_checkpointing --fsdp2 --seed 7 --checkpointing_steps 50 \
    --output_dir "${OUTPUT_DIR:-output/llama-3.1-8b_wikitext2_fsdp2}" "$@"
}

case "$which" in
  qwen0.5b) qwen05 "$@" ;;
  qwen1.5b) qwen15 "$@" ;;
  llama8b) llama8b "$@" ;;
  llama8b-fsdp2) llama8b_fsdp2 "$@" ;;
  all) qwen05 "$@"; qwen15 "$@"; llama8b "$@"; llama8b_fsdp2 "$@" ;;
  *) echo "train_clm.sh: unknown recipe '$which' (qwen0.5b | qwen1.5b | llama8b | llama8b-fsdp2 | all)" >&2; exit 2 ;;
esac
