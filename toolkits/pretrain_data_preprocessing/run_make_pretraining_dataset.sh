#!/usr/bin/env bash
# jsonl -> Megatron mmap indexed dataset.
# usage: run_make_pretraining_dataset.sh MEGATRON_PATCH_PATH INPUT_JSONL OUTPUT_PREFIX TOKENIZER [JSON_KEY=text] [WORKERS=4] [SKIP_BAD_LINES=false] [OVERWRITE=false]
set -euo pipefail
usage() { echo "usage: $0 MEGATRON_PATCH_PATH INPUT_JSONL OUTPUT_PREFIX TOKENIZER [JSON_KEY=text] [WORKERS=4] [SKIP_BAD_LINES=true|false] [OVERWRITE=true|false]" >&2; echo "error: $1" >&2; exit 2; }
[ $# -ge 4 ] && [ $# -le 8 ] || usage "expected 4 to 8 arguments, got $#"
MEGATRON_PATCH_PATH=$1; INPUT=$2; OUTPUT_PREFIX=$3; TOKENIZER=$4
JSON_KEY=${5:-text}; WORKERS=${6:-4}; SKIP=${7:-false}; OVERWRITE=${8:-false}
[ -d "$MEGATRON_PATCH_PATH" ] || usage "MEGATRON_PATCH_PATH '$MEGATRON_PATCH_PATH' is not a directory"
[ -f "$INPUT" ] || usage "INPUT_JSONL '$INPUT' is not a file"
[ -e "$TOKENIZER" ] || usage "TOKENIZER '$TOKENIZER' does not exist"
[[ "$WORKERS" =~ ^[1-9][0-9]*$ ]] || usage "WORKERS must be a positive integer (got '$WORKERS')"
case "$SKIP" in true) SKIP_FLAG=--skip-bad-lines ;; false) SKIP_FLAG= ;; *) usage "SKIP_BAD_LINES must be true or false (got '$SKIP')" ;; esac
case "$OVERWRITE" in true) OVERWRITE_FLAG=--overwrite ;; false) OVERWRITE_FLAG= ;; *) usage "OVERWRITE must be true or false (got '$OVERWRITE')" ;; esac
# What the user types behind each flag, for the errors' "[the script's SKIP_BAD_LINES=true]" (errors.py).
MEGATRON_PATCH_SCRIPT_ARGS=$(printf '%s\n' "--input=INPUT_JSONL=$INPUT" "--output-prefix=OUTPUT_PREFIX=$OUTPUT_PREFIX" \
  "--tokenizer=TOKENIZER=$TOKENIZER" "--json-key=JSON_KEY=$JSON_KEY" "--workers=WORKERS=$WORKERS" \
  "--skip-bad-lines=SKIP_BAD_LINES=true" "--overwrite=OVERWRITE=true")
export MEGATRON_PATCH_SCRIPT_ARGS
export PYTHONPATH="$MEGATRON_PATCH_PATH${PYTHONPATH:+:$PYTHONPATH}"
exec python -m megatron_patch.data.preprocess --input "$INPUT" --output-prefix "$OUTPUT_PREFIX" \
  --tokenizer "$TOKENIZER" --json-key "$JSON_KEY" --workers "$WORKERS" $SKIP_FLAG $OVERWRITE_FLAG
