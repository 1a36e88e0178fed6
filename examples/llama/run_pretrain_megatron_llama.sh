#!/usr/bin/env bash
# Pretrain a llama model with megatron-core. Arguments (24, positional; see examples/common.sh):
# ENV MEGATRON_PATH MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE GLOBAL_BATCH_SIZE LR MIN_LR SEQ_LEN PAD_LEN
# EXTRA_VOCAB_SIZE PR TP PP AC DO FL SP SAVE_INTERVAL DATASET_PATH PRETRAIN_CHECKPOINT_PATH TRAIN_TOKENS
# WARMUP_TOKENS OUTPUT_BASEPATH   (PAD_LEN: checked, used by finetuning only; pretraining reads SEQ_LEN samples)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
mp_pretrain llama "$@"
