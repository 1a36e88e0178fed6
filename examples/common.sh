# Shared logic of the examples/<family>/run_*_megatron_<family>.sh launchers (sourced, not executed).
#
# Each launcher is `source common.sh; mp_pretrain <family> "$@"` (or mp_finetune): the positional arguments are
# named once here and checked for their shape (integer, number, choice, existing path), and they become Megatron-LM
# flags of `python -m megatron_patch.train`, launched by torchrun. Rules between arguments (SP needs TP > 1, the
# global batch divisible by micro batch x data-parallel size, MIN_LR <= LR, ...) live once, in Python: the
# pre-flight `python -m megatron_patch.train check` runs them before any rank starts, naming the flag to change.
#
# Two pretraining layouts are accepted, told apart by the argument count: the 24 arguments below, and
# Pai-Megatron-Patch's newer 25 with TE (true: Transformer Engine layers) right after SP.
#
# Environment knobs: GPUS_PER_NODE (dsw/dlc; default: every visible GPU), TOKENIZER_MODEL (needed when training
# from scratch, i.e. PRETRAIN_CHECKPOINT_PATH=none), MP_DRY_RUN=1 (print the command instead of running it),
# MP_EXTRA_ARGS (appended flags, e.g. "--log-interval 10 --eval-interval 100"), MP_VERBOSE=1 (third-party
# warnings and torchrun's own messages too), PYTHON (the interpreter; default python).
# Logs are appended to OUTPUT_BASEPATH/log/<run>.log, one header line per launch.

MP_PRETRAIN_ARGS=(ENV MEGATRON_PATH MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE GLOBAL_BATCH_SIZE LR MIN_LR SEQ_LEN
  PAD_LEN EXTRA_VOCAB_SIZE PR TP PP AC DO FL SP SAVE_INTERVAL DATASET_PATH PRETRAIN_CHECKPOINT_PATH TRAIN_TOKENS
  WARMUP_TOKENS OUTPUT_BASEPATH)
MP_PRETRAIN_TE_ARGS=(ENV MEGATRON_PATH MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE GLOBAL_BATCH_SIZE LR MIN_LR SEQ_LEN
  PAD_LEN EXTRA_VOCAB_SIZE PR TP PP AC DO FL SP TE SAVE_INTERVAL DATASET_PATH PRETRAIN_CHECKPOINT_PATH TRAIN_TOKENS
  WARMUP_TOKENS OUTPUT_BASEPATH)
MP_FINETUNE_ARGS=(ENV MEGATRON_PATH MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE LR MIN_LR SEQ_LEN PAD_LEN
  EXTRA_VOCAB_SIZE PR TP PP AC DO FL SP TRAIN_DATASET_PATH VALID_DATASET_PATH PRETRAIN_CHECKPOINT_PATH EPOCH
  OUTPUT_BASEPATH)
# Finetuning also takes a 23rd argument, PEFT: none | lora | lora:RANK | lora:RANK:ALPHA (default rank 8, alpha
# 2 x rank; adapters on qkv, proj, fc1, fc2; MP_EXTRA_ARGS may add --lora-dropout / --lora-target-modules).
MP_FINETUNE_PEFT_ARGS=("${MP_FINETUNE_ARGS[@]}" PEFT)

mp_fail() {  # print the usage and the error naming the bad argument; exit 2
  echo "usage: $MP_SCRIPT ${MP_NAMES[*]}" >&2
  if [ -n "${MP_OTHER_LAYOUT:-}" ]; then echo "   or: $MP_SCRIPT $MP_OTHER_LAYOUT" >&2; fi
  echo "error: $*" >&2
  exit 2
}

# Validators: each names the argument it rejects.
# Integers are read as decimal and rewritten so (TP=010 is 10 here and in Python, not octal 8 in $((...))).
mp_int() {
  [[ "${!1}" =~ ^[0-9]+$ ]] && [ "${!1}" -ge "${2:-1}" ] || mp_fail "$1 must be an integer >= ${2:-1} (got '${!1}')"
  printf -v "$1" '%d' "$((10#${!1}))"
}
mp_float() {
  [[ "${!1}" =~ ^[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?$ ]] || mp_fail "$1 must be a non-negative number (got '${!1}')"
  awk "BEGIN{exit !(${!1} < 1e300)}" 2>/dev/null || mp_fail "$1 must be a finite number (got '${!1}')"
}
mp_choice() { local name=$1 v=${!1} c; shift; for c in "$@"; do [ "$v" = "$c" ] && return 0; done; mp_fail "$name must be one of: $* (got '$v')"; }
mp_bool() { mp_choice "$1" true false; }

mp_parse() {  # mp_parse <script> <expected names...> -- "$@": assigns each name, or prints usage naming the problem
  MP_SCRIPT=$1; shift
  MP_NAMES=()
  TE=""  # only the 25-argument pretraining layout sets it (never taken from the environment)
  while [ "$1" != "--" ]; do MP_NAMES+=("$1"); shift; done
  shift
  if [ $# -ne ${#MP_NAMES[@]} ]; then
    if [ -n "${MP_OTHER_LAYOUT:-}" ]; then
      local other
      read -r -a other <<< "$MP_OTHER_LAYOUT"
      mp_fail "expected ${#MP_NAMES[@]} or ${#other[@]} arguments, got $#"
    fi
    mp_fail "expected ${#MP_NAMES[@]} arguments, got $#"
  fi
  local name
  for name in "${MP_NAMES[@]}"; do
    printf -v "$name" '%s' "$1"
    shift
  done
}

mp_validate_common() {
  mp_choice ENV dsw dlc cpu
  [ "$MEGATRON_PATH" = none ] || [ -d "$MEGATRON_PATH" ] || mp_fail "MEGATRON_PATH must be none or a directory (got '$MEGATRON_PATH')"
  [ -d "$MEGATRON_PATCH_PATH/megatron_patch" ] || mp_fail "MEGATRON_PATCH_PATH must be the megatron-patch checkout (got '$MEGATRON_PATCH_PATH')"
  [[ "$MODEL_SIZE" =~ ^[A-Za-z0-9._-]+$ ]] || mp_fail "MODEL_SIZE must be a preset name such as 7B or tiny (got '$MODEL_SIZE')"
  mp_int BATCH_SIZE; mp_float LR; mp_float MIN_LR; mp_int SEQ_LEN; mp_int PAD_LEN; mp_int EXTRA_VOCAB_SIZE 0
  mp_choice PR fp32 fp16 bf16 fp8
  mp_int TP; mp_int PP
  mp_choice AC none sel full
  mp_bool DO; mp_bool FL; mp_bool SP
  if [ -n "${TE:-}" ]; then mp_bool TE; fi
  if [ "$PRETRAIN_CHECKPOINT_PATH" != none ] && [ ! -e "$PRETRAIN_CHECKPOINT_PATH" ]; then
    mp_fail "PRETRAIN_CHECKPOINT_PATH '$PRETRAIN_CHECKPOINT_PATH' does not exist (or pass none to train from scratch)"
  fi
  [ -n "$OUTPUT_BASEPATH" ] || mp_fail "OUTPUT_BASEPATH must not be empty"
}

mp_gpu_count() {  # the number of local GPUs; 0 without nvidia-smi or when it fails (no driver)
  # Guarded: under `set -euo pipefail` a bare `$(nvidia-smi -L | wc -l)` would end the script silently (127).
  command -v nvidia-smi > /dev/null 2>&1 || { echo 0; return 0; }
  nvidia-smi -L 2> /dev/null | grep -c '^GPU' || true
}

mp_launcher() {  # sets MP_LAUNCH (array) and MP_WORLD_SIZE from ENV
  # torchrun's launcher, through megatron_patch.torchrun: same flags, but a rank's error is printed once as one
  # line (no ChildFailedError dump) and torchrun's banners stay hidden unless MP_VERBOSE=1.
  local nproc torchrun=("${PYTHON:-python}" -m megatron_patch.torchrun)
  case "$ENV" in
    cpu)
      nproc=$((TP * PP))
      export CUDA_VISIBLE_DEVICES=""  # gloo on the CPU even on a GPU machine
      MP_LAUNCH=("${torchrun[@]}" --nproc-per-node "$nproc" --master-addr 127.0.0.1 --master-port "${MASTER_PORT:-$((20000 + RANDOM % 20000))}")
      MP_WORLD_SIZE=$nproc ;;
    dsw)
      nproc=${GPUS_PER_NODE:-$(mp_gpu_count)}
      [[ "$nproc" =~ ^[0-9]+$ ]] && [ "$nproc" -ge 1 ] || mp_fail "ENV=dsw found no GPU (set GPUS_PER_NODE or use ENV=cpu)"
      MP_LAUNCH=("${torchrun[@]}" --nproc-per-node "$nproc" --master-addr 127.0.0.1 --master-port "${MASTER_PORT:-6000}")
      MP_WORLD_SIZE=$nproc ;;
    dlc)
      local v
      for v in MASTER_ADDR MASTER_PORT WORLD_SIZE RANK; do
        [ -n "${!v:-}" ] || mp_fail "ENV=dlc needs $v in the environment (set by the cluster scheduler)"
      done
      nproc=${GPUS_PER_NODE:-$(mp_gpu_count)}
      [[ "$nproc" =~ ^[0-9]+$ ]] && [ "$nproc" -ge 1 ] || mp_fail "ENV=dlc found no GPU (set GPUS_PER_NODE)"
      # The scheduler's WORLD_SIZE / RANK count nodes; torchrun turns them into per-process ranks.
      MP_LAUNCH=("${torchrun[@]}" --nnodes "$WORLD_SIZE" --node-rank "$RANK" --nproc-per-node "$nproc"
                 --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT")
      MP_WORLD_SIZE=$((WORLD_SIZE * nproc)) ;;
  esac
  # Whether TP x PP divides the processes is checked in Python (the pre-flight); at least 1 for the flags below.
  MP_DP=$((MP_WORLD_SIZE / (TP * PP) > 0 ? MP_WORLD_SIZE / (TP * PP) : 1))
}

mp_common_flags() {  # sets MP_FLAGS (array) from the validated common arguments
  MP_FLAGS=(--model-name "$MP_FAMILY" --model-size "$MODEL_SIZE"
            --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
            --micro-batch-size "$BATCH_SIZE" --lr "$LR" --min-lr "$MIN_LR" --seq-length "$SEQ_LEN"
            --extra-vocab-size "$EXTRA_VOCAB_SIZE")
  case "$PR" in
    fp16) MP_FLAGS+=(--fp16) ;;
    bf16) MP_FLAGS+=(--bf16) ;;
    fp8) MP_FLAGS+=(--bf16 --fp8-format hybrid --fp8-amax-history-len 1024 --fp8-amax-compute-algo max) ;;
  esac
  case "$AC" in
    sel) MP_FLAGS+=(--recompute-granularity selective) ;;
    full) MP_FLAGS+=(--recompute-granularity full --recompute-method uniform --recompute-num-layers 1) ;;
  esac
  [ "$DO" = true ] && MP_FLAGS+=(--use-distributed-optimizer)
  [ "$FL" = true ] && MP_FLAGS+=(--use-flash-attn)
  [ "$SP" = true ] && MP_FLAGS+=(--sequence-parallel)
  # FP8, flash attention and sequence parallelism all run through Transformer Engine's layers; with the 25-argument
  # layout TE says it explicitly (TE=false with one of them is refused in Python, naming --transformer-impl).
  if [ "${TE:-}" = true ] || { [ -z "${TE:-}" ] && { [ "$PR" = fp8 ] || [ "$FL" = true ] || [ "$SP" = true ]; }; }; then
    MP_FLAGS+=(--transformer-impl transformer_engine)
  fi
  if [ "$PRETRAIN_CHECKPOINT_PATH" != none ]; then MP_FLAGS+=(--load "$PRETRAIN_CHECKPOINT_PATH"); fi
  if [ -n "${TOKENIZER_MODEL:-}" ]; then MP_FLAGS+=(--tokenizer-model "$TOKENIZER_MODEL"); fi
  return 0
}

mp_python_path() {  # MEGATRON_PATH (unless none) and this checkout on PYTHONPATH
  if [ "$MEGATRON_PATH" != none ]; then export PYTHONPATH="$MEGATRON_PATH${PYTHONPATH:+:$PYTHONPATH}"; fi
  export PYTHONPATH="$MEGATRON_PATCH_PATH${PYTHONPATH:+:$PYTHONPATH}"
  if [ "${MP_VERBOSE:-0}" = 1 ]; then export MEGATRON_PATCH_VERBOSE=1; fi
  return 0
}

mp_log_header() {  # mp_log_header <log file> <command...>: one header line per launch (logs are appended)
  local log=$1; shift
  { echo; echo "===== $(date '+%Y-%m-%d %H:%M:%S') launch on $(hostname 2> /dev/null || echo '?'): $(printf '%q ' "$@")"; } >> "$log"
}

mp_exec() {  # mp_exec <mode> <run name>: pre-flight checks, then launch (or print with MP_DRY_RUN=1)
  local mode=$1 name=$2
  local save="$OUTPUT_BASEPATH/checkpoint/$name"
  MP_FLAGS+=(--save "$save" --tensorboard-dir "$OUTPUT_BASEPATH/tensorboard/$name")
  # shellcheck disable=SC2206  # MP_EXTRA_ARGS is a list of flags on purpose
  local extra=(${MP_EXTRA_ARGS:-})
  mp_python_path
  local cmd=("${MP_LAUNCH[@]}" -m megatron_patch.train "$mode" "${MP_FLAGS[@]}" "${extra[@]}")
  # What can be checked in one process (flags, checkpoint metadata, data schema, FP8/TE support) is, before
  # torchrun starts a rank.
  local check=("${PYTHON:-python}" -m megatron_patch.train check "$mode" --world-size "$MP_WORLD_SIZE"
               "${MP_FLAGS[@]}" "${extra[@]}")
  if [ "${MP_DRY_RUN:-0}" = 1 ]; then
    printf '%q ' "${cmd[@]}"; echo
    return 0
  fi
  local log="$OUTPUT_BASEPATH/log/$name.log"
  mkdir -p "$OUTPUT_BASEPATH/log"
  echo "log: $log (appended)"
  mp_log_header "$log" "${cmd[@]}"
  { "${check[@]}" && "${cmd[@]}"; } 2>&1 | tee -a "$log"
  return "${PIPESTATUS[0]}"
}

mp_pretrain() {  # mp_pretrain <family> "$@"
  MP_FAMILY=$1; shift
  local names=("${MP_PRETRAIN_ARGS[@]}")
  MP_OTHER_LAYOUT="${MP_PRETRAIN_TE_ARGS[*]}"
  if [ $# -eq ${#MP_PRETRAIN_TE_ARGS[@]} ]; then names=("${MP_PRETRAIN_TE_ARGS[@]}"); MP_OTHER_LAYOUT="${MP_PRETRAIN_ARGS[*]}"; fi
  mp_parse "run_pretrain_megatron_$MP_FAMILY.sh" "${names[@]}" -- "$@"
  mp_validate_common
  mp_int GLOBAL_BATCH_SIZE; mp_int SAVE_INTERVAL; mp_int TRAIN_TOKENS; mp_int WARMUP_TOKENS 0
  [ -n "$DATASET_PATH" ] || mp_fail "DATASET_PATH must name at least one indexed dataset prefix"
  local word
  for word in $DATASET_PATH; do
    [[ "$word" =~ ^[0-9]*\.?[0-9]+$ ]] || [ -f "$word.bin" ] || mp_fail "DATASET_PATH: $word.bin does not exist"
  done
  mp_launcher
  # Python never sees token counts: turning them into iterations, and the checks of that arithmetic, stay here.
  local tokens_per_iter=$((GLOBAL_BATCH_SIZE * SEQ_LEN))
  local train_iters=$((TRAIN_TOKENS / tokens_per_iter)) warmup_iters=$((WARMUP_TOKENS / tokens_per_iter))
  [ "$train_iters" -ge 1 ] || mp_fail "TRAIN_TOKENS ($TRAIN_TOKENS) is less than one global batch ($tokens_per_iter tokens)"
  [ "$warmup_iters" -le "$train_iters" ] || mp_fail "WARMUP_TOKENS ($WARMUP_TOKENS) exceeds TRAIN_TOKENS ($TRAIN_TOKENS)"
  mp_common_flags
  # shellcheck disable=SC2206
  local data=($DATASET_PATH)
  MP_FLAGS+=(--global-batch-size "$GLOBAL_BATCH_SIZE" --train-iters "$train_iters" --lr-warmup-iters "$warmup_iters"
             --lr-decay-style cosine --save-interval "$SAVE_INTERVAL" --data-path "${data[@]}" --split 99,1,0)
  mp_exec pretrain "pretrain-$MP_FAMILY-$MODEL_SIZE-mbs$BATCH_SIZE-gbs$GLOBAL_BATCH_SIZE-seq$SEQ_LEN-lr$LR-$PR-tp$TP-pp$PP"
}

mp_finetune() {  # mp_finetune <family> "$@"
  MP_FAMILY=$1; shift
  local names=("${MP_FINETUNE_ARGS[@]}")
  MP_OTHER_LAYOUT="${MP_FINETUNE_PEFT_ARGS[*]}"
  if [ $# -eq ${#MP_FINETUNE_PEFT_ARGS[@]} ]; then names=("${MP_FINETUNE_PEFT_ARGS[@]}"); MP_OTHER_LAYOUT="${MP_FINETUNE_ARGS[*]}"; fi
  PEFT=none  # the 22-argument layout trains every parameter (never taken from the environment)
  mp_parse "run_finetune_megatron_$MP_FAMILY.sh" "${names[@]}" -- "$@"
  mp_validate_common
  [ -f "$TRAIN_DATASET_PATH" ] || mp_fail "TRAIN_DATASET_PATH '$TRAIN_DATASET_PATH' is not a file"
  [ "$VALID_DATASET_PATH" = none ] || [ -f "$VALID_DATASET_PATH" ] || mp_fail "VALID_DATASET_PATH '$VALID_DATASET_PATH' is not a file (or none)"
  mp_int EPOCH
  mp_launcher
  mp_common_flags
  MP_FLAGS+=(--global-batch-size $((BATCH_SIZE * MP_DP)) --epochs "$EPOCH" --max-padding-length "$PAD_LEN"
             --train-data-path "$TRAIN_DATASET_PATH" --lr-decay-style cosine)
  if [ "$VALID_DATASET_PATH" != none ]; then MP_FLAGS+=(--valid-data-path "$VALID_DATASET_PATH"); fi
  local peft_tag=""
  if [ "$PEFT" != none ]; then
    [[ "$PEFT" =~ ^lora(:([0-9]+)(:([0-9]*\.?[0-9]+))?)?$ ]] || mp_fail "PEFT must be none, lora, lora:RANK or lora:RANK:ALPHA (got '$PEFT')"
    LORA_RANK=${BASH_REMATCH[2]:-8}; mp_int LORA_RANK
    LORA_ALPHA=${BASH_REMATCH[4]:-$((2 * LORA_RANK))}
    MP_FLAGS+=(--lora-rank "$LORA_RANK" --lora-alpha "$LORA_ALPHA")
    peft_tag="-lora$LORA_RANK"
  fi
  mp_exec finetune "finetune-$MP_FAMILY-$MODEL_SIZE-mbs$BATCH_SIZE-seq$SEQ_LEN-lr$LR-$PR-tp$TP-pp$PP$peft_tag"
}
