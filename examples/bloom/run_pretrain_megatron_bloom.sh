#!/usr/bin/env bash
# Pretrain a bloom model with megatron-core. Arguments (positional; every layout Pai-Megatron-Patch shipped is
# accepted, see examples/README.md), e.g. Pai's current 24:
# ENV MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE GLOBAL_BATCH_SIZE LR MIN_LR SEQ_LEN PAD_LEN EXTRA_VOCAB_SIZE PR TP PP
# AC DO FL SP TE SAVE_INTERVAL DATASET_PATH PRETRAIN_CHECKPOINT_PATH TRAIN_TOKENS WARMUP_TOKENS OUTPUT_BASEPATH
# (PAD_LEN: checked, used by finetuning only; MODEL_SIZE=auto: the shape of PRETRAIN_CHECKPOINT_PATH)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
mp_pretrain bloom "$@"
