#!/usr/bin/env bash
# Pretrain a Qwen2-MoE / Qwen3-MoE (Qwen1.5-MoE, Qwen2-57B-A14B, Qwen3-30B-A3B, ...) mixture-of-experts model with megatron-core. Arguments (positional; every
# layout Pai-Megatron-Patch shipped is accepted, see examples/README.md), e.g. with MOE and EP after TE (26):
# ENV MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE GLOBAL_BATCH_SIZE LR MIN_LR SEQ_LEN PAD_LEN EXTRA_VOCAB_SIZE PR TP PP
# AC DO FL SP TE MOE EP SAVE_INTERVAL DATASET_PATH PRETRAIN_CHECKPOINT_PATH TRAIN_TOKENS WARMUP_TOKENS OUTPUT_BASEPATH
# (MOE must be true; EP: expert-parallel size, carved out of data parallelism; a layout without EP trains at EP=1)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
mp_pretrain qwen_moe "$@"
