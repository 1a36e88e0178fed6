#!/usr/bin/env bash
# Supervised finetuning of a llama model with megatron-core. Arguments (positional; every layout Pai-Megatron-Patch
# shipped is accepted, see examples/README.md), e.g. Pai's current 22:
# ENV MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE LR MIN_LR SEQ_LEN PAD_LEN EXTRA_VOCAB_SIZE PR TP PP AC DO FL SP TE
# TRAIN_DATASET_PATH VALID_DATASET_PATH PRETRAIN_CHECKPOINT_PATH EPOCH OUTPUT_BASEPATH
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
mp_finetune llama "$@"
