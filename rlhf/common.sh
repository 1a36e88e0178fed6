# Shared logic of the rlhf/run_{reward_model,dpo}_megatron_<family>.sh launchers (sourced, not executed).
#
# Reuses examples/common.sh (argument parsing, validators, launcher, precision/parallel flags) and launches the
# RLHF entry points (python -m megatron_patch.rlhf.train_reward_model | megatron_patch.rlhf.dpo) with torchrun.
# Same environment knobs as the training scripts: GPUS_PER_NODE, MP_DRY_RUN=1, MP_EXTRA_ARGS.

# shellcheck source=../examples/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../examples/common.sh"

RLHF_RM_ARGS=(ENV MEGATRON_PATH MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE GLOBAL_BATCH_SIZE LR MIN_LR SEQ_LEN PR TP PP
  AC DO FL SP TRAIN_DATASET_PATH VALID_DATASET_PATH PRETRAIN_CHECKPOINT_PATH EPOCH OUTPUT_BASEPATH)
RLHF_DPO_ARGS=(ENV MEGATRON_PATH MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE GLOBAL_BATCH_SIZE LR MIN_LR BETA SEQ_LEN PR
  TP PP AC DO FL SP TRAIN_DATASET_PATH VALID_DATASET_PATH PRETRAIN_CHECKPOINT_PATH EPOCH OUTPUT_BASEPATH)

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

rlhf_exec() {  # rlhf_exec <python module> <run name>: launch (or print with MP_DRY_RUN=1)
  local module=$1 name=$2
  MP_FLAGS+=(--save "$OUTPUT_BASEPATH/checkpoint/$name" --tensorboard-dir "$OUTPUT_BASEPATH/tensorboard/$name")
  # shellcheck disable=SC2206  # MP_EXTRA_ARGS is a list of flags on purpose
  local extra=(${MP_EXTRA_ARGS:-})
  if [ "$MEGATRON_PATH" != none ]; then export PYTHONPATH="$MEGATRON_PATH${PYTHONPATH:+:$PYTHONPATH}"; fi
  export PYTHONPATH="$MEGATRON_PATCH_PATH${PYTHONPATH:+:$PYTHONPATH}"
  local cmd=("${MP_LAUNCH[@]}" -m "$module" "${MP_FLAGS[@]}" "${extra[@]}")
  if [ "${MP_DRY_RUN:-0}" = 1 ]; then
    printf '%q ' "${cmd[@]}"; echo
    return 0
  fi
  mkdir -p "$OUTPUT_BASEPATH/log"
  echo "log: $OUTPUT_BASEPATH/log/$name.log"
  "${cmd[@]}" 2>&1 | tee "$OUTPUT_BASEPATH/log/$name.log"
  return "${PIPESTATUS[0]}"
}

rlhf_reward_model() {  # rlhf_reward_model <family> "$@"
  MP_FAMILY=$1; shift
  mp_parse "run_reward_model_megatron_$MP_FAMILY.sh" "${RLHF_RM_ARGS[@]}" -- "$@"
  rlhf_validate
  rlhf_exec megatron_patch.rlhf.train_reward_model \
    "rm-$MP_FAMILY-$MODEL_SIZE-mbs$BATCH_SIZE-gbs$GLOBAL_BATCH_SIZE-seq$SEQ_LEN-lr$LR-$PR-tp$TP-pp$PP"
}

rlhf_dpo() {  # rlhf_dpo <family> "$@"
  MP_FAMILY=$1; shift
  mp_parse "run_dpo_megatron_$MP_FAMILY.sh" "${RLHF_DPO_ARGS[@]}" -- "$@"
  mp_float BETA
  awk "BEGIN{exit !($BETA > 0)}" || mp_fail "BETA must be > 0 (got '$BETA')"
  rlhf_validate
  MP_FLAGS+=(--dpo-beta "$BETA")
  rlhf_exec megatron_patch.rlhf.dpo \
    "dpo-$MP_FAMILY-$MODEL_SIZE-mbs$BATCH_SIZE-gbs$GLOBAL_BATCH_SIZE-seq$SEQ_LEN-lr$LR-beta$BETA-$PR-tp$TP-pp$PP"
}
