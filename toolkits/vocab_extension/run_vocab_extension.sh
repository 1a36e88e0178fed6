#!/usr/bin/env bash
# Extend a model's vocabulary with a new language (see megatron_patch/data/vocab_extension.py for what is done and guaranteed).
#
#   run_vocab_extension.sh MEGATRON_PATCH_PATH CORPUS LOAD SAVE VOCAB_SIZE [MODEL_TYPE]
#
#   MEGATRON_PATCH_PATH  this checkout
#   CORPUS               text file(s) in the new language, comma-separated
#   LOAD                 HF model directory or Megatron checkpoint (torch_dist or legacy)
#   SAVE                 output directory (must not exist or be empty); same kind as LOAD
#   VOCAB_SIZE           size of the SentencePiece model trained on CORPUS (its new pieces join the vocabulary)
#   MODEL_TYPE           bpe (default) or unigram
set -euo pipefail

usage() {
  # the header comment (up to the first line that is not a comment), without its '#'
  sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0" >&2
  [ $# -gt 0 ] && echo "error: $*" >&2
  exit 2
}

[ $# -eq 5 ] || [ $# -eq 6 ] || usage "expected 5 or 6 arguments, got $#"
MEGATRON_PATCH_PATH=$1 CORPUS=$2 LOAD=$3 SAVE=$4 VOCAB_SIZE=$5 MODEL_TYPE=${6:-bpe}
[ -d "$MEGATRON_PATCH_PATH/megatron_patch" ] || usage "MEGATRON_PATCH_PATH must be the megatron-patch checkout (got '$MEGATRON_PATCH_PATH')"
IFS=, read -r -a corpus_files <<< "$CORPUS"
[ ${#corpus_files[@]} -ge 1 ] || usage "CORPUS must name at least one file"
for f in "${corpus_files[@]}"; do [ -f "$f" ] || usage "CORPUS file '$f' does not exist"; done
[ -e "$LOAD" ] || usage "LOAD '$LOAD' does not exist"
[[ "$VOCAB_SIZE" =~ ^[0-9]+$ ]] || usage "VOCAB_SIZE must be an integer (got '$VOCAB_SIZE')"
case $MODEL_TYPE in bpe|unigram) ;; *) usage "MODEL_TYPE must be bpe or unigram (got '$MODEL_TYPE')" ;; esac

export PYTHONPATH="$MEGATRON_PATCH_PATH${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" "$MEGATRON_PATCH_PATH/toolkits/vocab_extension/extend_vocab.py" --corpus "${corpus_files[@]}" \
  --load "$LOAD" --save "$SAVE" --vocab-size "$VOCAB_SIZE" --model-type "$MODEL_TYPE"
