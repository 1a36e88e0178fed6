#!/usr/bin/env bash
# Supervised finetuning of a Qwen2-MoE / Qwen3-MoE (Qwen1.5-MoE, Qwen2-57B-A14B, Qwen3-30B-A3B, ...) mixture-of-experts model with megatron-core. Arguments
# (positional; every layout Pai-Megatron-Patch shipped is accepted, see examples/README.md), e.g. Pai's MoE 27:
# ENV MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE GLOBAL_BATCH_SIZE LR MIN_LR SEQ_LEN PAD_LEN EXTRA_VOCAB_SIZE PR TP PP
# AC DO FL SP TE MOE EP SAVE_INTERVAL DATASET_PATH VALID_DATASET_PATH PRETRAIN_CHECKPOINT_PATH TRAIN_ITERS WARMUP_ITERS
# OUTPUT_BASEPATH   (DATASET_PATH: the training jsonl)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
mp_finetune qwen_moe "$@"
