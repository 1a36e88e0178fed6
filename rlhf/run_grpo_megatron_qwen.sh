#!/usr/bin/env bash
# GRPO of a qwen model: N_SAMPLES responses per prompt, group-normalised rewards, no critic, k3 KL loss to the
# reference (PRETRAIN_CHECKPOINT_PATH). REWARD = a reward checkpoint or fn:<registered Python reward>. Arguments (25,
# positional; see rlhf/common.sh and rlhf/README.md):
# ENV MEGATRON_PATH MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE GLOBAL_BATCH_SIZE LR MIN_LR KL_COEF CLIP_RATIO N_SAMPLES
# SEQ_LEN MAX_NEW_TOKENS PR TP PP AC DO FL SP PROMPT_DATASET_PATH REWARD PRETRAIN_CHECKPOINT_PATH TRAIN_ITERS
# OUTPUT_BASEPATH
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
rlhf_grpo qwen "$@"
