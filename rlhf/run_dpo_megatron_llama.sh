#!/usr/bin/env bash
# DPO of a llama model (policy + frozen reference from PRETRAIN_CHECKPOINT_PATH) on preference jsonl. Arguments (22,
# positional; see rlhf/common.sh and rlhf/README.md):
# ENV MEGATRON_PATH MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE GLOBAL_BATCH_SIZE LR MIN_LR BETA SEQ_LEN PR TP PP AC DO FL
# SP TRAIN_DATASET_PATH VALID_DATASET_PATH PRETRAIN_CHECKPOINT_PATH EPOCH OUTPUT_BASEPATH
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
rlhf_dpo llama "$@"
