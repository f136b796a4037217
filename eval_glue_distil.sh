#!/usr/bin/env bash
# Evaluate the distilled BERT-base checkpoints released with the original work (the original eval_glue_distil.sh).
# Their files hold sparse_weight_pruned (the kept rows of S); run_glue.py reads ranks and kept rows from the file.
# Download them first (see the top of eval_glue.sh), into $CKPT_DIR (default: checkpoints).
#   bash eval_glue_distil.sh                         # bert_mnli_25_distil
#   bash eval_glue_distil.sh bert_rte_50_distil      # or bert_mnli_50_distil
set -euo pipefail
cd "$(dirname "$0")"
[ $# -eq 0 ] && set -- bert_mnli_25_distil
for name in "$@"; do
  case "$name" in
    bert_*_distil) ;;
    *) echo "eval_glue_distil.sh: $name is not a distilled checkpoint (bert_mnli_25_distil, bert_mnli_50_distil," \
            "bert_rte_50_distil); use eval_glue.sh" >&2; exit 1 ;;
  esac
done
exec bash eval_glue.sh "$@"
