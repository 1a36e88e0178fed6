#!/usr/bin/env bash
# Offline text generation with a mixtral checkpoint (at EP=1); the arguments are documented in ../text_generation.sh.
#
#   run_text_generation_megatron_mixtral.sh ENV MEGATRON_PATH MEGATRON_PATCH_PATH CHECKPOINT_PATH MODEL_SIZE TP BS SEQ_LEN
#       PAD_LEN EXTRA_VOCAB_SIZE PR TOP_K INPUT_SEQ_LEN OUTPUT_SEQ_LEN INPUT_FILE OUTPUT_FILE TOP_P TEMPERATURE
#       REPETITION_PENALTY
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$here/../common.sh"
source "$here/../text_generation.sh"
mp_text_generation mixtral "$@"
