#!/usr/bin/env bash
# Reward-model training of a baichuan model on preference jsonl {"prompt","chosen","rejected"}. Arguments (21, positional;
# see rlhf/common.sh and rlhf/README.md):
# ENV MEGATRON_PATH MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE GLOBAL_BATCH_SIZE LR MIN_LR SEQ_LEN PR TP PP AC DO FL SP
# TRAIN_DATASET_PATH VALID_DATASET_PATH PRETRAIN_CHECKPOINT_PATH EPOCH OUTPUT_BASEPATH
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
rlhf_reward_model baichuan "$@"
