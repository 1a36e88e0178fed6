#!/usr/bin/env bash
# Pretrain a Mixtral mixture-of-experts model with megatron-core. Arguments (positional; every
# layout Pai-Megatron-Patch shipped is accepted, see examples/README.md), e.g. with MOE and EP after TE (26):
# ENV MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE GLOBAL_BATCH_SIZE LR MIN_LR SEQ_LEN PAD_LEN EXTRA_VOCAB_SIZE PR TP PP
# AC DO FL SP TE MOE EP SAVE_INTERVAL DATASET_PATH PRETRAIN_CHECKPOINT_PATH TRAIN_TOKENS WARMUP_TOKENS OUTPUT_BASEPATH
# (MOE must be true; EP: expert-parallel size, carved out of data parallelism; a layout without EP trains at EP=1)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
mp_pretrain mixtral "$@"
