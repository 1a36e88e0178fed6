#!/usr/bin/env bash
# HF <-> Megatron checkpoint conversion for every supported family (one script, not one per family).
#
#   model_convertor.sh MEGATRON_PATH SOURCE_CKPT_PATH TARGET_CKPT_PATH TP PP MODEL_NAME EXTRA_VOCAB_SIZE MG2HF [FORMAT] [EP]
#
#   MEGATRON_PATH     a Megatron-LM checkout to put on PYTHONPATH, or "none" for the installed megatron-core
#   SOURCE_CKPT_PATH  HF directory (MG2HF=false) or Megatron checkpoint directory (MG2HF=true)
#   TARGET_CKPT_PATH  output directory (must not exist or be empty)
#   TP, PP            tensor / pipeline parallel sizes of the Megatron checkpoint (ignored for MG2HF=true:
#                     they are read from the checkpoint)
#   MODEL_NAME        model family (llama, qwen, baichuan, bloom, qwen_moe, mixtral) or "auto" to detect it from
#                     config.json; a size suffix such as llama-2-7b is accepted and ignored (config.json has the
#                     sizes); a qwen name containing "moe" (qwen2-moe-a14b, qwen3_moe) is the qwen_moe family
#   EXTRA_VOCAB_SIZE  new token rows to append to the vocabulary (0 for none)
#   MG2HF             false: HF -> Megatron; true: Megatron -> HF
#   FORMAT            torch_dist (default) or legacy
#   EP                expert-parallel size of a mixture-of-experts model (default 1; ignored for MG2HF=true);
#                     legacy writes one file per TP x PP x EP rank, torch_dist loads at any EP
#
# Environment: MP_EXTRA_ARGS appends flags of python -m megatron_patch.convert (e.g. "--overwrite",
# "--make-vocab-size-divisible-by 64", "--max-shard-size-gb 2"); PYTHON picks the interpreter.
set -euo pipefail

usage() {
  # the header comment (up to the first line that is not a comment), without its '#'
  sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0" >&2
  [ $# -gt 0 ] && echo "error: $*" >&2
  exit 2
}

[ $# -ge 8 ] && [ $# -le 10 ] || usage "expected 8 to 10 arguments, got $#"
MEGATRON_PATH=$1 SOURCE_CKPT_PATH=$2 TARGET_CKPT_PATH=$3 TP=$4 PP=$5 MODEL_NAME=$6 EXTRA_VOCAB_SIZE=$7 MG2HF=$8
FORMAT=${9:-torch_dist} EP=${10:-1}

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }
is_uint "$TP" && [ "$TP" -ge 1 ] || usage "TP must be a positive integer (got '$TP')"
is_uint "$PP" && [ "$PP" -ge 1 ] || usage "PP must be a positive integer (got '$PP')"
is_uint "$EP" && [ "$EP" -ge 1 ] || usage "EP must be a positive integer (got '$EP')"
is_uint "$EXTRA_VOCAB_SIZE" || usage "EXTRA_VOCAB_SIZE must be a non-negative integer (got '$EXTRA_VOCAB_SIZE')"
case $MG2HF in true|false) ;; *) usage "MG2HF must be true or false (got '$MG2HF')" ;; esac
case $FORMAT in torch_dist|legacy) ;; *) usage "FORMAT must be torch_dist or legacy (got '$FORMAT')" ;; esac
[ -e "$SOURCE_CKPT_PATH" ] || usage "SOURCE_CKPT_PATH '$SOURCE_CKPT_PATH' does not exist"
if [ "$MEGATRON_PATH" != none ]; then
  [ -d "$MEGATRON_PATH" ] || usage "MEGATRON_PATH '$MEGATRON_PATH' is not a directory (use 'none' for the installed megatron-core)"
  export PYTHONPATH="$MEGATRON_PATH${PYTHONPATH:+:$PYTHONPATH}"
fi

# This checkout's megatron_patch, whatever else is installed.
PYTHONPATH="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONPATH
PYTHON=${PYTHON:-python}
# What the user typed behind each flag, for the errors' "[the script's MODEL_NAME=qwen-7b]" (errors.py).
MEGATRON_PATCH_SCRIPT_ARGS=$(printf '%s\n' "--load=SOURCE_CKPT_PATH=$SOURCE_CKPT_PATH" "--save=TARGET_CKPT_PATH=$TARGET_CKPT_PATH" \
  "--tp=TP=$TP" "--pp=PP=$PP" "--ep=EP=$EP" "--model-name=MODEL_NAME=$MODEL_NAME" \
  "--extra-vocab-size=EXTRA_VOCAB_SIZE=$EXTRA_VOCAB_SIZE" "--format=FORMAT=$FORMAT" "--overwrite=MP_EXTRA_ARGS=--overwrite")
export MEGATRON_PATCH_SCRIPT_ARGS
# shellcheck disable=SC2206  # MP_EXTRA_ARGS is a list of flags on purpose
extra=(${MP_EXTRA_ARGS:-})
if [ "$MG2HF" = true ]; then
  exec "$PYTHON" -m megatron_patch.convert mcore2hf --load "$SOURCE_CKPT_PATH" --save "$TARGET_CKPT_PATH" "${extra[@]}"
fi

family_args=()
family=${MODEL_NAME,,}
is_moe=false
[[ $family == *moe* ]] && is_moe=true
family=${family%%[-_]*}  # llama-2-7b -> llama, qwen2.5-7b -> qwen2.5
family=${family%%[0-9.]*}  # qwen2.5 -> qwen
[ "$family" = qwen ] && [ "$is_moe" = true ] && family=qwen_moe  # qwen2-moe-a14b, qwen3_moe -> qwen_moe
[ "$family" = auto ] || family_args=(--model-name "$family")
exec "$PYTHON" -m megatron_patch.convert hf2mcore --load "$SOURCE_CKPT_PATH" --save "$TARGET_CKPT_PATH" \
  --tp "$TP" --pp "$PP" --ep "$EP" --format "$FORMAT" --extra-vocab-size "$EXTRA_VOCAB_SIZE" "${family_args[@]}" \
  "${extra[@]}"
