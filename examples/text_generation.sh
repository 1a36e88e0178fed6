# Shared logic of the examples/<family>/run_text_generation_megatron_<family>.sh launchers (sourced after
# common.sh, whose argument parser, validators and launcher it uses).
#
#   run_text_generation_megatron_<family>.sh ENV MEGATRON_PATH MEGATRON_PATCH_PATH CHECKPOINT_PATH MODEL_SIZE TP BS
#       SEQ_LEN PAD_LEN EXTRA_VOCAB_SIZE PR TOP_K INPUT_SEQ_LEN OUTPUT_SEQ_LEN INPUT_FILE OUTPUT_FILE TOP_P
#       TEMPERATURE REPETITION_PENALTY
#   or, as Pai-Megatron-Patch's scripts since 2023-10-18, without MEGATRON_PATH (18 arguments)
#
#   ENV                 cpu (TP processes, gloo), dsw (one node: GPUS_PER_NODE or every GPU) or dlc (cluster)
#   MEGATRON_PATH       a Megatron-LM checkout to put on PYTHONPATH, or none for the installed megatron-core
#   MEGATRON_PATCH_PATH this checkout
#   CHECKPOINT_PATH     a converted or trained Megatron checkpoint (torch_dist or legacy, saved at any TP x PP)
#   MODEL_SIZE          the family's size preset the checkpoint has (e.g. 7B, tiny; checked against it), or
#                       auto: whatever shape the checkpoint has
#   TP                  tensor-parallel size (the script runs PP=1; python -m megatron_patch.generate also takes
#                       --pipeline-model-parallel-size); more processes than TP = data parallel over the prompts
#   BS                  prompts generated together
#   SEQ_LEN             longest prompt + completion in tokens
#   PAD_LEN             as in the finetuning scripts; must be <= SEQ_LEN (prompts are batched without padding)
#   EXTRA_VOCAB_SIZE    tokens added at conversion (checked against the checkpoint)
#   PR                  fp32, bf16 or fp16
#   TOP_K               1 = greedy, 0 = off; TOP_K and TOP_P may not both be non-zero
#   INPUT_SEQ_LEN       longest prompt; longer prompts keep their last INPUT_SEQ_LEN tokens
#   OUTPUT_SEQ_LEN      most new tokens per prompt (generation stops earlier at EOS)
#   INPUT_FILE          text file (one prompt per line) or .jsonl with a "prompt" field
#   OUTPUT_FILE         .jsonl of {"prompt", "completion"}, in input order
#   TOP_P               nucleus mass, 0 = off
#   TEMPERATURE         > 0
#   REPETITION_PENALTY  1.0 = off
#
# Environment knobs: MP_DRY_RUN=1 prints the command instead of running it; MP_EXTRA_ARGS appends flags
# (e.g. "--seed 7 --prompt-key text"); GPUS_PER_NODE as in common.sh.

MP_GENERATE_LAYOUTS=(
  "pai-2023-09|Pai-Megatron-Patch's generation layout of 2023-09 (MEGATRON_PATH)|ENV MEGATRON_PATH MEGATRON_PATCH_PATH
    CHECKPOINT_PATH MODEL_SIZE TP BS SEQ_LEN PAD_LEN EXTRA_VOCAB_SIZE PR TOP_K INPUT_SEQ_LEN OUTPUT_SEQ_LEN INPUT_FILE
    OUTPUT_FILE TOP_P TEMPERATURE REPETITION_PENALTY"
  "pai-2023-10|Pai-Megatron-Patch's generation layout since 2023-10-18 (no MEGATRON_PATH)|ENV MEGATRON_PATCH_PATH
    CHECKPOINT_PATH MODEL_SIZE TP BS SEQ_LEN PAD_LEN EXTRA_VOCAB_SIZE PR TOP_K INPUT_SEQ_LEN OUTPUT_SEQ_LEN INPUT_FILE
    OUTPUT_FILE TOP_P TEMPERATURE REPETITION_PENALTY"
)

mp_text_generation() {  # mp_text_generation <family> "$@"
  MP_FAMILY=$1; shift
  mp_parse_layouts "run_text_generation_megatron_$MP_FAMILY.sh" MP_GENERATE_LAYOUTS -- "$@"
  mp_choice ENV dsw dlc cpu
  [ "$MEGATRON_PATH" = none ] || [ -d "$MEGATRON_PATH" ] || mp_fail "MEGATRON_PATH must be none or a directory (got '$MEGATRON_PATH')"
  [ -d "$MEGATRON_PATCH_PATH/megatron_patch" ] || mp_fail "MEGATRON_PATCH_PATH must be the megatron-patch checkout (got '$MEGATRON_PATCH_PATH')"
  [ -e "$CHECKPOINT_PATH" ] || mp_fail "CHECKPOINT_PATH '$CHECKPOINT_PATH' does not exist"
  [[ "$MODEL_SIZE" =~ ^[A-Za-z0-9._-]+$ ]] || mp_fail "MODEL_SIZE must be a preset name such as 7B or tiny, or auto (got '$MODEL_SIZE')"
  mp_int TP; mp_int BS; mp_int SEQ_LEN; mp_int PAD_LEN; mp_int EXTRA_VOCAB_SIZE 0
  mp_choice PR fp32 bf16 fp16
  mp_int TOP_K 0; mp_float TOP_P; mp_float TEMPERATURE; mp_float REPETITION_PENALTY
  mp_int INPUT_SEQ_LEN; mp_int OUTPUT_SEQ_LEN
  # Ranges and rules between arguments (TOP_P <= 1, TOP_K and TOP_P not both set, TEMPERATURE > 0, lengths within
  # SEQ_LEN, the checkpoint's size and vocabulary) are checked by the Python pre-flight below.
  [ -f "$INPUT_FILE" ] || mp_fail "INPUT_FILE '$INPUT_FILE' is not a file"
  [ -d "$(dirname -- "$OUTPUT_FILE")" ] || mp_fail "OUTPUT_FILE's directory '$(dirname -- "$OUTPUT_FILE")' does not exist"
  PP=1
  if [ "$ENV" = dsw ] && [ -z "${GPUS_PER_NODE:-}" ]; then GPUS_PER_NODE=$TP; fi  # one model copy by default
  mp_launcher
  MP_FLAGS=(--model-name "$MP_FAMILY" --load "$CHECKPOINT_PATH")
  if [ "$MODEL_SIZE" != auto ]; then MP_FLAGS+=(--model-size "$MODEL_SIZE"); fi  # auto: the checkpoint's shape
  MP_FLAGS+=(--tensor-model-parallel-size "$TP" --micro-batch-size "$BS" --seq-length "$SEQ_LEN"
            --max-padding-length "$PAD_LEN" --extra-vocab-size "$EXTRA_VOCAB_SIZE" --precision "$PR"
            --top-k "$TOP_K" --top-p "$TOP_P" --temperature "$TEMPERATURE" --repetition-penalty "$REPETITION_PENALTY"
            --input-len "$INPUT_SEQ_LEN" --out-seq-length "$OUTPUT_SEQ_LEN"
            --text-generate-input-file "$INPUT_FILE" --text-generate-output-file "$OUTPUT_FILE")
  # shellcheck disable=SC2206  # MP_EXTRA_ARGS is a list of flags on purpose
  local extra=(${MP_EXTRA_ARGS:-})
  mp_python_path
  local cmd=("${MP_LAUNCH[@]}" -m megatron_patch.generate "${MP_FLAGS[@]}" "${extra[@]}")
  if [ "${MP_DRY_RUN:-0}" = 1 ]; then
    printf '%q ' "${cmd[@]}"; echo
    return 0
  fi
  # Every check one process can do (flags, files, the checkpoint's metadata) before torchrun starts a rank.
  WORLD_SIZE=$MP_WORLD_SIZE "${PYTHON:-python}" -m megatron_patch.generate --check-only "${MP_FLAGS[@]}" "${extra[@]}"
  "${cmd[@]}"
}
