#!/usr/bin/env bash
# Evaluate the checkpoints released with the original work (no training): run_glue.py builds the model with STEP 1,
# reads every layer's rank (and, for distilled checkpoints, the kept rows of S) from the file, loads it strictly and
# prints the metric; all_results.json in the output folder holds it with effective_ratio and the parameter counts.
# A checkpoint that does not fit the model (wrong base model, wrong task) stops with an error naming the keys.
#
# Download the checkpoints first (the links are those of the original README), into $CKPT_DIR (default: checkpoints):
#   mkdir -p checkpoints && cd checkpoints
#   wget -O deberta_mnli_20.bin "https://www.dropbox.com/s/1mmpjaj851hof8a/deberta_mnli_20.bin?dl=1"
#   wget -O deberta_mnli_15.bin "https://www.dropbox.com/s/iejlwggckidjrmk/deberta_mnli_15.bin?dl=1"
#   wget -O deberta_mnli_10.bin "https://www.dropbox.com/s/qa55uh7p702qlp0/deberta_mnli_10.bin?dl=1"
#   wget -O deberta_rte_20.bin  "https://www.dropbox.com/s/a07g1far2smlalh/deberta_rte_20.bin?dl=1"
#   wget -O deberta_rte_15.bin  "https://www.dropbox.com/s/ui75hemwvcayp9r/deberta_rte_15.bin?dl=1"
#   wget -O deberta_rte_10.bin  "https://www.dropbox.com/s/z8wpuli2uwlk7kt/deberta_rte_10.bin?dl=1"
#   wget -O deberta_cola_20.bin "https://www.dropbox.com/s/e2tw1l9u2smpsd4/deberta_cola_20.bin?dl=1"
#   wget -O deberta_cola_15.bin "https://www.dropbox.com/s/3y71y0jbno8uwlx/deberta_cola_15.bin?dl=1"
#   wget -O deberta_cola_10.bin "https://www.dropbox.com/s/7y8i53yxn79vpxj/deberta_cola_10.bin?dl=1"
#   wget -O deberta_stsb_20.bin "https://www.dropbox.com/s/cmvduaa1n2sgteq/deberta_stsb_20.bin?dl=1"
#   wget -O deberta_stsb_15.bin "https://www.dropbox.com/s/dkx4rtpnd30hhki/deberta_stsb_15.bin?dl=1"
#   wget -O deberta_stsb_10.bin "https://www.dropbox.com/s/dmm3l3vmsgfaug1/deberta_stsb_10.bin?dl=1"
#   wget -O bert_rte_20.bin     "https://www.dropbox.com/s/mz1cy01dp4tlpyq/bert_rte_20.bin?dl=1"
#   wget -O bert_rte_15.bin     "https://www.dropbox.com/s/xf5cdenimaojhko/bert_rte_15.bin?dl=1"
#   wget -O bert_rte_10.bin     "https://www.dropbox.com/s/rcnl6ncq5hw082j/bert_rte_10.bin?dl=1"
#   # distilled (BERT-base, with sparse_weight_pruned):
#   wget -O bert_mnli_25_distil.bin "https://www.dropbox.com/s/xb04hm4crrm2f85/bert_mnli_25_distil.bin?dl=1"
#   wget -O bert_mnli_50_distil.bin "https://www.dropbox.com/s/69jelv6rdmeai3l/bert_mnli_50_distil.bin?dl=1"
#   wget -O bert_rte_50_distil.bin  "https://www.dropbox.com/s/wtrtngjby537su3/bert_rte_50_distill.bin?dl=1"
#
#   bash eval_glue.sh                                  # deberta_mnli_20
#   bash eval_glue.sh deberta_rte_15 bert_rte_10       # any of the names above
#   bash eval_glue.sh all                              # every checkpoint present in $CKPT_DIR
# The README of the original lists the expected metrics (e.g. deberta_mnli_20: 84.6 matched accuracy).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
CKPT_DIR=${CKPT_DIR:-checkpoints}
OUT_DIR=${OUT_DIR:-eval_output}

# checkpoint name -> base model and GLUE task
base_model() { case "$1" in deberta_*) echo microsoft/deberta-v3-base ;; bert_*) echo bert-base-uncased ;; esac; }
task() { local t=${1#*_}; echo "${t%%_*}"; }   # deberta_mnli_20 -> mnli, bert_rte_50_distil -> rte

evaluate() {
  local name=$1
  "$PY" run_glue.py \
    --task_name "$(task "$name")" \
    --model_name_or_path "$(base_model "$name")" \
    --eval_checkpoint "$CKPT_DIR/$name.bin" \
    --num_train_epochs 0 \
    --per_device_eval_batch_size 32 \
    --output_dir "$OUT_DIR/$name"
}

ALL=(deberta_mnli_20 deberta_mnli_15 deberta_mnli_10 deberta_rte_20 deberta_rte_15 deberta_rte_10
     deberta_cola_20 deberta_cola_15 deberta_cola_10 deberta_stsb_20 deberta_stsb_15 deberta_stsb_10
     bert_rte_20 bert_rte_15 bert_rte_10 bert_mnli_25_distil bert_mnli_50_distil bert_rte_50_distil)

names=("$@")
[ ${#names[@]} -eq 0 ] && names=(deberta_mnli_20)
if [ "${names[0]}" = all ]; then
  names=()
  for n in "${ALL[@]}"; do [ -f "$CKPT_DIR/$n.bin" ] && names+=("$n"); done
fi
for name in "${names[@]}"; do
  if [ -z "$(base_model "$name")" ]; then
    echo "eval_glue.sh: unknown checkpoint name $name (deberta_<task>_<ratio> or bert_<task>_<ratio>[_distil])" >&2
    exit 1
  fi
  if [ ! -f "$CKPT_DIR/$name.bin" ]; then
    echo "eval_glue.sh: $CKPT_DIR/$name.bin not found (download it first, see the top of this script)" >&2
    exit 1
  fi
  echo "== $name ($(base_model "$name"), $(task "$name")) ==" >&2
  evaluate "$name"
done
