# Shared logic of the rlhf/run_{reward_model,dpo,ppo,grpo}_megatron_<family>.sh launchers (sourced, not executed).
#
# Reuses examples/common.sh (argument parsing, validators, precision/parallel flags, and its launch: the entry point's
# one-process pre-flight `--check`, then torchrun through megatron_patch.torchrun, the log appended to
# OUTPUT_BASEPATH/log/<run>.log with a header line per launch) for the RLHF entry points (python -m
# megatron_patch.rlhf.preference.train_reward_model | .preference.dpo | .ppo). Same environment knobs as the training
# scripts: GPUS_PER_NODE, MP_DRY_RUN=1, MP_EXTRA_ARGS (e.g. "--distributed-timeout-minutes 30"), MP_VERBOSE=1, PYTHON.

# shellcheck source=../examples/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../examples/common.sh"

RLHF_RM_ARGS=(ENV MEGATRON_PATH MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE GLOBAL_BATCH_SIZE LR MIN_LR SEQ_LEN PR TP PP
  AC DO FL SP TRAIN_DATASET_PATH VALID_DATASET_PATH PRETRAIN_CHECKPOINT_PATH EPOCH OUTPUT_BASEPATH)
RLHF_DPO_ARGS=(ENV MEGATRON_PATH MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE GLOBAL_BATCH_SIZE LR MIN_LR BETA SEQ_LEN PR
  TP PP AC DO FL SP TRAIN_DATASET_PATH VALID_DATASET_PATH PRETRAIN_CHECKPOINT_PATH EPOCH OUTPUT_BASEPATH)

RLHF_PPO_ARGS=(ENV MEGATRON_PATH MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE GLOBAL_BATCH_SIZE LR MIN_LR CRITIC_LR
  KL_COEF CLIP_RATIO SEQ_LEN MAX_NEW_TOKENS PR TP PP AC DO FL SP PROMPT_DATASET_PATH REWARD PRETRAIN_CHECKPOINT_PATH
  PTX_DATASET_PATH PTX_COEF TRAIN_ITERS OUTPUT_BASEPATH)
RLHF_GRPO_ARGS=(ENV MEGATRON_PATH MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE GLOBAL_BATCH_SIZE LR MIN_LR KL_COEF
  CLIP_RATIO N_SAMPLES SEQ_LEN MAX_NEW_TOKENS PR TP PP AC DO FL SP PROMPT_DATASET_PATH REWARD PRETRAIN_CHECKPOINT_PATH
  TRAIN_ITERS OUTPUT_BASEPATH)

rlhf_reward_file() {  # py:FILE:FUNC -> FILE
  local body=${1#py:}
  echo "${body%:*}"
}

rlhf_validate_rl() {  # the checks shared by PPO and GRPO, after mp_parse; GLOBAL_BATCH_SIZE counts prompts
  PAD_LEN=$SEQ_LEN EXTRA_VOCAB_SIZE=0
  [ "$PRETRAIN_CHECKPOINT_PATH" != none ] || mp_fail "PRETRAIN_CHECKPOINT_PATH must be the SFT (or converted) checkpoint of the actor (got none)"
  mp_validate_common
  mp_int GLOBAL_BATCH_SIZE; mp_int TRAIN_ITERS; mp_int MAX_NEW_TOKENS; mp_float KL_COEF; mp_float CLIP_RATIO
  if [ "$MAX_NEW_TOKENS" -ge "$SEQ_LEN" ]; then mp_fail "MAX_NEW_TOKENS ($MAX_NEW_TOKENS) must be below SEQ_LEN ($SEQ_LEN): the prompt needs room"; fi
  [ -f "$PROMPT_DATASET_PATH" ] || mp_fail "PROMPT_DATASET_PATH '$PROMPT_DATASET_PATH' is not a file (jsonl of {\"prompt\": ...})"
  case "$REWARD" in
    fn:?*) ;;
    py:?*:?*) [ -f "$(rlhf_reward_file "$REWARD")" ] || mp_fail "REWARD '$REWARD': the file $(rlhf_reward_file "$REWARD") does not exist (py:FILE:FUNC)" ;;
    *) [ -e "$REWARD" ] || mp_fail "REWARD '$REWARD' must be a reward-model checkpoint, fn:<built-in reward> or py:FILE:FUNC" ;;
  esac
  mp_launcher
  if [ $((GLOBAL_BATCH_SIZE % MP_DP)) -ne 0 ]; then
    mp_fail "GLOBAL_BATCH_SIZE ($GLOBAL_BATCH_SIZE prompts) must be divisible by the data-parallel size ($MP_DP)"
  fi
  mp_common_flags
  MP_FLAGS+=(--global-batch-size "$GLOBAL_BATCH_SIZE" --train-iters "$TRAIN_ITERS" --prompt-data-path "$PROMPT_DATASET_PATH"
             --max-new-tokens "$MAX_NEW_TOKENS" --kl-coef "$KL_COEF" --clip-ratio "$CLIP_RATIO" --lr-decay-style constant)
  case "$REWARD" in
    fn:*) MP_FLAGS+=(--reward "${REWARD#fn:}") ;;
    py:*) MP_FLAGS+=(--reward "$REWARD") ;;
    *) MP_FLAGS+=(--reward-model "$REWARD") ;;
  esac
  return 0
}

rlhf_ppo() {  # rlhf_ppo <family> "$@"
  MP_FAMILY=$1; shift
  mp_parse "run_ppo_megatron_$MP_FAMILY.sh" "${RLHF_PPO_ARGS[@]}" -- "$@"
  mp_float CRITIC_LR; mp_float PTX_COEF
  [ "$PTX_DATASET_PATH" = none ] || [ -f "$PTX_DATASET_PATH" ] || mp_fail "PTX_DATASET_PATH '$PTX_DATASET_PATH' is not a file (or none)"
  if [ "$PTX_DATASET_PATH" = none ] && awk "BEGIN{exit !($PTX_COEF > 0)}"; then
    mp_fail "PTX_COEF ($PTX_COEF) > 0 needs PTX_DATASET_PATH (got none)"
  fi
  rlhf_validate_rl
  MP_FLAGS+=(--algo ppo --critic-lr "$CRITIC_LR")
  if [ "$PTX_DATASET_PATH" != none ]; then MP_FLAGS+=(--ptx-data-path "$PTX_DATASET_PATH" --ptx-coef "$PTX_COEF"); fi
  rlhf_exec megatron_patch.rlhf.ppo \
    "ppo-$MP_FAMILY-$MODEL_SIZE-mbs$BATCH_SIZE-gbs$GLOBAL_BATCH_SIZE-seq$SEQ_LEN-lr$LR-kl$KL_COEF-$PR-tp$TP-pp$PP"
}

rlhf_grpo() {  # rlhf_grpo <family> "$@"
  MP_FAMILY=$1; shift
  mp_parse "run_grpo_megatron_$MP_FAMILY.sh" "${RLHF_GRPO_ARGS[@]}" -- "$@"
  mp_int N_SAMPLES 2
  rlhf_validate_rl
  MP_FLAGS+=(--algo grpo --n-samples-per-prompt "$N_SAMPLES")
  rlhf_exec megatron_patch.rlhf.ppo \
    "grpo-$MP_FAMILY-$MODEL_SIZE-mbs$BATCH_SIZE-gbs$GLOBAL_BATCH_SIZE-n$N_SAMPLES-seq$SEQ_LEN-lr$LR-kl$KL_COEF-$PR-tp$TP-pp$PP"
}

rlhf_validate() {  # the checks shared by both tools, after mp_parse
  PAD_LEN=$SEQ_LEN EXTRA_VOCAB_SIZE=0  # not arguments here: the vocabulary comes from the checkpoint
  [ "$PRETRAIN_CHECKPOINT_PATH" != none ] || mp_fail "PRETRAIN_CHECKPOINT_PATH must be an SFT or converted checkpoint (got none)"
  mp_validate_common
  mp_int GLOBAL_BATCH_SIZE; mp_int EPOCH
  [ -f "$TRAIN_DATASET_PATH" ] || mp_fail "TRAIN_DATASET_PATH '$TRAIN_DATASET_PATH' is not a file (preference jsonl)"
  [ "$VALID_DATASET_PATH" = none ] || [ -f "$VALID_DATASET_PATH" ] || mp_fail "VALID_DATASET_PATH '$VALID_DATASET_PATH' is not a file (or none)"
  mp_launcher  # the global batch vs micro batch x data-parallel size: TrainConfig.validate, before any model
  mp_common_flags
  MP_FLAGS+=(--global-batch-size "$GLOBAL_BATCH_SIZE" --epochs "$EPOCH" --train-data-path "$TRAIN_DATASET_PATH"
             --lr-decay-style cosine)
  if [ "$VALID_DATASET_PATH" != none ]; then MP_FLAGS+=(--valid-data-path "$VALID_DATASET_PATH"); fi
  return 0
}

rlhf_exec() {  # rlhf_exec <python module> <run name>: pre-flight, then launch (or print with MP_DRY_RUN=1)
  # examples/common.sh's launch: the entry point's --check in one process first, then torchrun through
  # megatron_patch.torchrun, the log appended with a header line per launch, MP_VERBOSE for third-party output.
  mp_run "$2" "$1" "megatron_patch.runtime.rank_main $1 --check --world-size"  # rank_main: quiet imports
}

rlhf_reward_model() {  # rlhf_reward_model <family> "$@"
  MP_FAMILY=$1; shift
  mp_parse "run_reward_model_megatron_$MP_FAMILY.sh" "${RLHF_RM_ARGS[@]}" -- "$@"
  rlhf_validate
  rlhf_exec megatron_patch.rlhf.preference.train_reward_model \
    "rm-$MP_FAMILY-$MODEL_SIZE-mbs$BATCH_SIZE-gbs$GLOBAL_BATCH_SIZE-seq$SEQ_LEN-lr$LR-$PR-tp$TP-pp$PP"
}

rlhf_dpo() {  # rlhf_dpo <family> "$@"
  MP_FAMILY=$1; shift
  mp_parse "run_dpo_megatron_$MP_FAMILY.sh" "${RLHF_DPO_ARGS[@]}" -- "$@"
  mp_float BETA
  awk "BEGIN{exit !($BETA > 0)}" || mp_fail "BETA must be > 0 (got '$BETA')"
  rlhf_validate
  MP_FLAGS+=(--dpo-beta "$BETA")
  rlhf_exec megatron_patch.rlhf.preference.dpo \
    "dpo-$MP_FAMILY-$MODEL_SIZE-mbs$BATCH_SIZE-gbs$GLOBAL_BATCH_SIZE-seq$SEQ_LEN-lr$LR-beta$BETA-$PR-tp$TP-pp$PP"
}
