#!/usr/bin/env bash
# Supervised finetuning of a baichuan model with megatron-core. Arguments (22, positional, + an optional 23rd PEFT =
# none | lora[:RANK[:ALPHA]]; see examples/common.sh):
# ENV MEGATRON_PATH MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE LR MIN_LR SEQ_LEN PAD_LEN EXTRA_VOCAB_SIZE PR TP PP
# AC DO FL SP TRAIN_DATASET_PATH VALID_DATASET_PATH PRETRAIN_CHECKPOINT_PATH EPOCH OUTPUT_BASEPATH
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
mp_finetune baichuan "$@"
