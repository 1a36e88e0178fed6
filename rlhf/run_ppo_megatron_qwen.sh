#!/usr/bin/env bash
# PPO of a qwen model: actor from PRETRAIN_CHECKPOINT_PATH (also the frozen reference), critic from the reward
# model (REWARD = a reward checkpoint, or fn:<name> for a registered Python reward; then the critic starts from the
# actor's backbone), optional PTX. Arguments (27, positional; see rlhf/common.sh and rlhf/README.md):
# ENV MEGATRON_PATH MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE GLOBAL_BATCH_SIZE LR MIN_LR CRITIC_LR KL_COEF CLIP_RATIO
# SEQ_LEN MAX_NEW_TOKENS PR TP PP AC DO FL SP PROMPT_DATASET_PATH REWARD PRETRAIN_CHECKPOINT_PATH PTX_DATASET_PATH
# PTX_COEF TRAIN_ITERS OUTPUT_BASEPATH
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
rlhf_ppo qwen "$@"
