# Shared logic of the examples/<family>/run_*_megatron_<family>.sh launchers (sourced, not executed).
#
# Each launcher is `source common.sh; mp_pretrain <family> "$@"` (or mp_finetune): the positional arguments are
# named once here and checked for their shape (integer, number, choice, existing path), and they become Megatron-LM
# flags of `python -m megatron_patch.train`, launched by torchrun. Rules between arguments (SP needs TP > 1, the
# global batch divisible by micro batch x data-parallel size, MIN_LR <= LR, ...) live once, in Python: the
# pre-flight `python -m megatron_patch.train check` runs them before any rank starts, naming the flag to change.
#
# Every layout Pai-Megatron-Patch shipped for these scripts is accepted (see MP_PRETRAIN_LAYOUTS and
# MP_FINETUNE_LAYOUTS): the layouts of one argument count are told apart by what the arguments are (where PR, AC and
# the true/false switches sit, which argument is the megatron-patch checkout), and the script prints which layout it
# read. MODEL_SIZE=auto takes the model's shape from PRETRAIN_CHECKPOINT_PATH (any shape, not only a preset's).
#
# Environment knobs: GPUS_PER_NODE (dsw/dlc; default: every visible GPU), TOKENIZER_MODEL (needed when training
# from scratch, i.e. PRETRAIN_CHECKPOINT_PATH=none), MP_DRY_RUN=1 (print the command instead of running it),
# MP_EXTRA_ARGS (appended flags, e.g. "--log-interval 10 --eval-interval 100"), MP_VERBOSE=1 (third-party
# warnings and torchrun's own messages too), PYTHON (the interpreter; default python).
# Logs are appended to OUTPUT_BASEPATH/log/<run>.log, one header line per launch.

# One layout per entry: "<name>|<what it is>|<arguments>". The first of each list is the one `usage:` shows first.
MP_PRETRAIN_LAYOUTS=(
  "pai-2023-10|Pai-Megatron-Patch's pretraining layout since 2023-10-18 (no MEGATRON_PATH, TE at 18)|ENV
    MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE GLOBAL_BATCH_SIZE LR MIN_LR SEQ_LEN PAD_LEN EXTRA_VOCAB_SIZE PR TP PP AC
    DO FL SP TE SAVE_INTERVAL DATASET_PATH PRETRAIN_CHECKPOINT_PATH TRAIN_TOKENS WARMUP_TOKENS OUTPUT_BASEPATH"
  "pai-2023-09|Pai-Megatron-Patch's pretraining layout of 2023-09 (MEGATRON_PATH, no TE)|ENV MEGATRON_PATH
    MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE GLOBAL_BATCH_SIZE LR MIN_LR SEQ_LEN PAD_LEN EXTRA_VOCAB_SIZE PR TP PP AC DO
    FL SP SAVE_INTERVAL DATASET_PATH PRETRAIN_CHECKPOINT_PATH TRAIN_TOKENS WARMUP_TOKENS OUTPUT_BASEPATH"
  "pai-2023-09-te|Pai-Megatron-Patch's pretraining layout with MEGATRON_PATH and TE at 19 (baichuan 2023-09, llama2
    and qwen 2023-10-10..16)|ENV MEGATRON_PATH MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE GLOBAL_BATCH_SIZE LR MIN_LR
    SEQ_LEN PAD_LEN EXTRA_VOCAB_SIZE PR TP PP AC DO FL SP TE SAVE_INTERVAL DATASET_PATH PRETRAIN_CHECKPOINT_PATH
    TRAIN_TOKENS WARMUP_TOKENS OUTPUT_BASEPATH"
  "pai-2023-09-bloom|Pai-Megatron-Patch's bloom pretraining layout of 2023-09 (MEGATRON_PATH, no PAD_LEN, no TE)|ENV
    MEGATRON_PATH MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE GLOBAL_BATCH_SIZE LR MIN_LR SEQ_LEN EXTRA_VOCAB_SIZE PR TP PP
    AC DO FL SP SAVE_INTERVAL DATASET_PATH PRETRAIN_CHECKPOINT_PATH TRAIN_TOKENS WARMUP_TOKENS OUTPUT_BASEPATH"
)
MP_FINETUNE_LAYOUTS=(
  "pai-2023-10|Pai-Megatron-Patch's finetuning layout since 2023-10-18 (no MEGATRON_PATH, TE at 17)|ENV
    MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE LR MIN_LR SEQ_LEN PAD_LEN EXTRA_VOCAB_SIZE PR TP PP AC DO FL SP TE
    TRAIN_DATASET_PATH VALID_DATASET_PATH PRETRAIN_CHECKPOINT_PATH EPOCH OUTPUT_BASEPATH"
  "pai-2023-09|Pai-Megatron-Patch's finetuning layout of 2023-09 (MEGATRON_PATH, no TE)|ENV MEGATRON_PATH
    MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE LR MIN_LR SEQ_LEN PAD_LEN EXTRA_VOCAB_SIZE PR TP PP AC DO FL SP
    TRAIN_DATASET_PATH VALID_DATASET_PATH PRETRAIN_CHECKPOINT_PATH EPOCH OUTPUT_BASEPATH"
  "pai-2023-10-12|Pai-Megatron-Patch's finetuning layout with MEGATRON_PATH and TE at 18 (llama2 and qwen
    2023-10-12..16)|ENV MEGATRON_PATH MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE LR MIN_LR SEQ_LEN PAD_LEN
    EXTRA_VOCAB_SIZE PR TP PP AC DO FL SP TE TRAIN_DATASET_PATH VALID_DATASET_PATH PRETRAIN_CHECKPOINT_PATH EPOCH
    OUTPUT_BASEPATH"
)
# Pai-Megatron-Patch's mixture-of-experts scripts (examples/qwen1_5/run_{pretrain,finetune}_mcore_qwen*.sh, which
# train Qwen1.5-MoE-A2.7B) place MOE (true/false) after TE and, in the finetuning script since 2025-05, EP after MOE;
# their pretraining script fixes EP inside (4 for A2.7B). The 26-argument pretraining layout is that placement with
# EP added (this toolkit's, so that pretraining can name EP too). Their finetuning counts iterations and takes a
# global batch and a save interval. Layouts without EP train at EP=1 (MP_EXTRA_ARGS may pass
# --expert-model-parallel-size).
MP_PRETRAIN_LAYOUTS+=(
  "pai-2024-04-moe|Pai-Megatron-Patch's MoE pretraining layout since 2024-04 (MOE at 19, EP fixed at 1 here)|ENV
    MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE GLOBAL_BATCH_SIZE LR MIN_LR SEQ_LEN PAD_LEN EXTRA_VOCAB_SIZE PR TP PP AC
    DO FL SP TE MOE SAVE_INTERVAL DATASET_PATH PRETRAIN_CHECKPOINT_PATH TRAIN_TOKENS WARMUP_TOKENS OUTPUT_BASEPATH"
  "moe-ep|the MoE pretraining layout with EP after MOE (MOE at 19, EP at 20, as Pai's MoE finetuning places them)|ENV
    MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE GLOBAL_BATCH_SIZE LR MIN_LR SEQ_LEN PAD_LEN EXTRA_VOCAB_SIZE PR TP PP AC
    DO FL SP TE MOE EP SAVE_INTERVAL DATASET_PATH PRETRAIN_CHECKPOINT_PATH TRAIN_TOKENS WARMUP_TOKENS OUTPUT_BASEPATH"
)
# Pai-Megatron-Patch's current MoE script (examples/qwen3/run_mcore_qwen3.sh, also qwen2/run_mcore_qwen2_moe.sh since
# 2025-07): one script for pretraining and SFT, no MEGATRON_PATCH_PATH (the checkout holding the script), no
# EXTRA_VOCAB_SIZE, EP at 14 after CP and ETP. Read by the pretraining scripts with SFT=false; what this toolkit does not
# have is refused (CP > 1, ETP other than TP, OPTIMIZER_OFFLOAD, SFT=true: finetuning reads jsonl with
# run_finetune_*). VALID_DATASET_PATH is not used (pretraining splits DATASET_PATH 98,2,0, as Pai's idxmap mode).
MP_PRETRAIN_LAYOUTS+=(
  "pai-2025-mcore|Pai-Megatron-Patch's current MoE layout (run_mcore_qwen3.sh: CP ETP EP at 12-14, SFT at 18)|ENV
    MODEL_SIZE BATCH_SIZE GLOBAL_BATCH_SIZE LR MIN_LR SEQ_LEN PAD_LEN PR TP PP CP ETP EP SP DO FL SFT AC
    OPTIMIZER_OFFLOAD SAVE_INTERVAL DATASET_PATH VALID_DATASET_PATH PRETRAIN_CHECKPOINT_PATH TRAIN_TOKENS WARMUP_TOKENS
    OUTPUT_BASEPATH"
)
MP_FINETUNE_LAYOUTS+=(
  "pai-2025-05-moe|Pai-Megatron-Patch's MoE finetuning layout since 2025-05 (MOE at 19, EP at 20, iterations)|ENV
    MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE GLOBAL_BATCH_SIZE LR MIN_LR SEQ_LEN PAD_LEN EXTRA_VOCAB_SIZE PR TP PP AC
    DO FL SP TE MOE EP SAVE_INTERVAL DATASET_PATH VALID_DATASET_PATH PRETRAIN_CHECKPOINT_PATH TRAIN_ITERS WARMUP_ITERS
    OUTPUT_BASEPATH"
  "pai-2024-04-moe|Pai-Megatron-Patch's MoE finetuning layout of 2024-04 (MOE at 19, no EP, iterations)|ENV
    MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE GLOBAL_BATCH_SIZE LR MIN_LR SEQ_LEN PAD_LEN EXTRA_VOCAB_SIZE PR TP PP AC
    DO FL SP TE MOE SAVE_INTERVAL DATASET_PATH VALID_DATASET_PATH PRETRAIN_CHECKPOINT_PATH TRAIN_ITERS WARMUP_ITERS
    OUTPUT_BASEPATH"
)
# The mixture-of-experts families and the load-balancing loss weight their scripts train with: HF's
# router_aux_loss_coef of the family's released configs (Pai's MoE scripts fix the MoE options inside the script too;
# MP_EXTRA_ARGS="--moe-aux-loss-coeff X" overrides, the last flag wins). Tokens reach their experts through the
# alltoall dispatcher.
declare -gA MP_MOE_AUX_LOSS_COEFF=([qwen_moe]=0.001 [mixtral]=0.02)
MP_EP=1  # the expert-parallel size the launcher sizes ENV=cpu for (set by mp_moe_flags)
MP_OTHER_LAYOUTS=()  # the argument lists `usage:` prints after the one read
# Finetuning also takes an optional last argument after any layout, PEFT: none | lora | lora:RANK | lora:RANK:ALPHA
# (default rank 8, alpha 2 x rank; adapters on qkv, proj, fc1, fc2; MP_EXTRA_ARGS may add --lora-dropout /
# --lora-target-modules).

mp_fail() {  # print the usage and the error naming the bad argument; exit 2
  echo "usage: $MP_SCRIPT ${MP_NAMES[*]}" >&2
  local other
  for other in "${MP_OTHER_LAYOUTS[@]}"; do echo "   or: $MP_SCRIPT $other" >&2; done
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
  TE=""  # only a layout with TE sets it (never taken from the environment)
  while [ "$1" != "--" ]; do MP_NAMES+=("$1"); shift; done
  shift
  if [ $# -ne ${#MP_NAMES[@]} ]; then
    mp_fail "expected ${#MP_NAMES[@]} arguments, got $#"
  fi
  local name
  for name in "${MP_NAMES[@]}"; do
    printf -v "$name" '%s' "$1"
    shift
  done
}

mp_looks_like() {  # mp_looks_like <name> <value>: whether value has the shape of that argument (no message)
  local v=$2
  case "$1" in
    ENV) [[ "$v" =~ ^(dsw|dlc|cpu)$ ]] ;;
    MEGATRON_PATCH_PATH) [ -d "$v/megatron_patch" ] ;;
    MEGATRON_PATH) [ "$v" = none ] || { [ -d "$v" ] && [ ! -d "$v/megatron_patch" ]; } ;;
    MODEL_SIZE) [[ "$v" =~ ^[A-Za-z0-9._-]+$ && "$v" =~ [A-Za-z] ]] && [ ! -d "$v" ] ;;
    PR) [[ "$v" =~ ^(fp32|fp16|bf16|fp8)$ ]] ;;
    AC) [[ "$v" =~ ^(none|sel|full)$ ]] ;;
    DO|FL|SP|TE|MOE|SFT) [[ "$v" =~ ^(true|false)$ ]] ;;
    OPTIMIZER_OFFLOAD) [[ "$v" =~ ^(false|[0-9]*\.?[0-9]+)$ ]] ;;
    LR|MIN_LR|TOP_P|TEMPERATURE|REPETITION_PENALTY) [[ "$v" =~ ^[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?$ ]] ;;
    BATCH_SIZE|GLOBAL_BATCH_SIZE|SEQ_LEN|PAD_LEN|EXTRA_VOCAB_SIZE|TP|PP|EP|CP|ETP|SAVE_INTERVAL|TRAIN_TOKENS|WARMUP_TOKENS|EPOCH|BS|\
    TOP_K|INPUT_SEQ_LEN|OUTPUT_SEQ_LEN|TRAIN_ITERS|WARMUP_ITERS)
      [[ "$v" =~ ^[0-9]+$ ]] ;;
    *) return 0 ;;  # paths and data: anything may be a path
  esac
}

mp_parse_layouts() {  # mp_parse_layouts <script> <layouts array name> -- "$@": picks the layout, assigns its names
  MP_SCRIPT=$1
  local -n mp_layouts=$2
  shift 3
  local entry words flat best="" best_score=-1 score i value names=() counts=() all=()
  for entry in "${mp_layouts[@]}"; do
    read -r -d '' -a words <<< "$entry" || true
    flat="${words[*]}"
    read -r -a names <<< "${flat##*|}"
    all+=("${names[*]}")
    counts+=("${#names[@]}")
    [ ${#names[@]} -eq $# ] || continue
    # Same count: the layout whose positions hold the most arguments of the right shape (PR, AC, the switches,
    # the checkout, the integers sit at different positions in each).
    score=0; i=0
    for value in "$@"; do
      if mp_looks_like "${names[$i]}" "$value"; then score=$((score + 1)); fi
      i=$((i + 1))
    done
    if [ "$score" -gt "$best_score" ]; then best=$flat; best_score=$score; fi
  done
  if [ -z "$best" ]; then
    read -r -a MP_NAMES <<< "${all[0]}"
    MP_OTHER_LAYOUTS=("${all[@]:1}")
    local expected
    expected=$(printf '%s\n' "${counts[@]}" | sort -nu | paste -sd/ -)
    mp_fail "expected $expected arguments (the layouts above), got $#"
  fi
  MP_LAYOUT=${best%%|*}
  local rest=${best#*|}
  MP_LAYOUT_TEXT=${rest%%|*}
  read -r -a MP_NAMES <<< "${best##*|}"
  MP_OTHER_LAYOUTS=()
  for entry in "${all[@]}"; do [ "$entry" = "${MP_NAMES[*]}" ] || MP_OTHER_LAYOUTS+=("$entry"); done
  echo "layout: $MP_LAYOUT_TEXT, $# arguments" >&2
  # What a layout leaves out: MEGATRON_PATH none (the installed megatron-core), PAD_LEN = SEQ_LEN, TE decided by
  # PR / FL / SP, no MOE / EP / iterations: never taken from the environment (every name of every layout is cleared).
  local name
  for name in ${all[*]}; do printf -v "$name" '%s' ""; done
  MEGATRON_PATH=none
  for name in "${MP_NAMES[@]}"; do
    printf -v "$name" '%s' "$1"
    shift
  done
  # Pai's current layout names neither the checkout (it is the one holding the script) nor EXTRA_VOCAB_SIZE.
  if [ -z "$MEGATRON_PATCH_PATH" ]; then MEGATRON_PATCH_PATH=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd); fi
  if [ -z "$EXTRA_VOCAB_SIZE" ]; then EXTRA_VOCAB_SIZE=0; fi
  if [ -z "$PAD_LEN" ]; then PAD_LEN=$SEQ_LEN; fi
}

mp_validate_common() {
  mp_choice ENV dsw dlc cpu
  [ "$MEGATRON_PATH" = none ] || [ -d "$MEGATRON_PATH" ] || mp_fail "MEGATRON_PATH must be none or a directory (got '$MEGATRON_PATH')"
  [ -d "$MEGATRON_PATCH_PATH/megatron_patch" ] || mp_fail "MEGATRON_PATCH_PATH must be the megatron-patch checkout (got '$MEGATRON_PATCH_PATH')"
  [[ "$MODEL_SIZE" =~ ^[A-Za-z0-9._-]+$ ]] || mp_fail "MODEL_SIZE must be a preset name such as 7B or tiny, or auto (got '$MODEL_SIZE')"
  if [ "$MODEL_SIZE" = auto ] && [ "$PRETRAIN_CHECKPOINT_PATH" = none ]; then
    mp_fail "MODEL_SIZE=auto reads the model's shape from PRETRAIN_CHECKPOINT_PATH (got none): name a size preset to train from scratch"
  fi
  mp_int BATCH_SIZE; mp_float LR; mp_float MIN_LR; mp_int SEQ_LEN; mp_int PAD_LEN; mp_int EXTRA_VOCAB_SIZE 0
  mp_choice PR fp32 fp16 bf16 fp8
  mp_int TP; mp_int PP
  mp_choice AC none sel full
  mp_bool DO; mp_bool FL; mp_bool SP
  if [ -n "${TE:-}" ]; then mp_bool TE; fi
  if [ -n "${MOE:-}" ]; then mp_bool MOE; fi
  if [ -n "${EP:-}" ]; then mp_int EP; fi
  if [ -n "${CP:-}" ]; then  # Pai's current layout: what this toolkit does not have is refused, naming it
    mp_int CP; mp_int ETP; mp_bool SFT
    [ "$CP" -eq 1 ] || mp_fail "CP=$CP: context parallelism is not supported here (pass CP=1)"
    if [ -n "${MP_MOE_AUX_LOSS_COEFF[$MP_FAMILY]:-}" ] && [ "$ETP" -ne "$TP" ]; then  # (a dense model has no experts)
      mp_fail "ETP=$ETP: the experts are split over the TP ranks here (expert-TP = TP): pass ETP=$TP"
    fi
    [ "$OPTIMIZER_OFFLOAD" = false ] || mp_fail "OPTIMIZER_OFFLOAD=$OPTIMIZER_OFFLOAD: optimizer offload is not supported here (pass false)"
    [ "$SFT" = false ] || mp_fail "SFT=true: finetuning reads a jsonl with run_finetune_megatron_$MP_FAMILY.sh (Pai's layout with SFT=true reads indexed SFT data, which this toolkit does not)"
  fi
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

mp_gpus_exist() {  # mp_gpus_exist <env>: GPUS_PER_NODE on a machine without GPUs trains on the CPU: say so
  # (a note, not a refusal: the tests run the dsw/dlc launch paths on CPU machines on purpose)
  if [ -n "${GPUS_PER_NODE:-}" ] && [ "${MP_DRY_RUN:-0}" != 1 ] && [ "$(mp_gpu_count)" -eq 0 ]; then
    echo "note: ENV=$1 with GPUS_PER_NODE=$GPUS_PER_NODE, but this machine has no GPU (nvidia-smi finds none): the" \
      "$GPUS_PER_NODE ranks train on the CPU (gloo); ENV=cpu says so itself" >&2
  fi
}

mp_launcher() {  # sets MP_LAUNCH (array) and MP_WORLD_SIZE from ENV
  # torchrun's launcher, through megatron_patch.torchrun: same flags, but a rank's error is printed once as one
  # line (no ChildFailedError dump) and torchrun's banners stay hidden unless MP_VERBOSE=1.
  local nproc torchrun=("${PYTHON:-python}" -m megatron_patch.torchrun)
  case "$ENV" in
    cpu)
      nproc=$((TP * PP * MP_EP))  # EP is carved out of data parallelism: the smallest world it fits in
      export CUDA_VISIBLE_DEVICES=""  # gloo on the CPU even on a GPU machine
      MP_LAUNCH=("${torchrun[@]}" --nproc-per-node "$nproc" --master-addr 127.0.0.1 --master-port "${MASTER_PORT:-$((20000 + RANDOM % 20000))}")
      MP_WORLD_SIZE=$nproc ;;
    dsw)
      nproc=${GPUS_PER_NODE:-$(mp_gpu_count)}
      [[ "$nproc" =~ ^[0-9]+$ ]] && [ "$nproc" -ge 1 ] || mp_fail "ENV=dsw found no GPU (set GPUS_PER_NODE or use ENV=cpu)"
      mp_gpus_exist dsw
      MP_LAUNCH=("${torchrun[@]}" --nproc-per-node "$nproc" --master-addr 127.0.0.1 --master-port "${MASTER_PORT:-6000}")
      MP_WORLD_SIZE=$nproc ;;
    dlc)
      local v
      for v in MASTER_ADDR MASTER_PORT WORLD_SIZE RANK; do
        [ -n "${!v:-}" ] || mp_fail "ENV=dlc needs $v in the environment (set by the cluster scheduler)"
      done
      nproc=${GPUS_PER_NODE:-$(mp_gpu_count)}
      [[ "$nproc" =~ ^[0-9]+$ ]] && [ "$nproc" -ge 1 ] || mp_fail "ENV=dlc found no GPU (set GPUS_PER_NODE)"
      mp_gpus_exist dlc
      # The scheduler's WORLD_SIZE / RANK count nodes; torchrun turns them into per-process ranks.
      MP_LAUNCH=("${torchrun[@]}" --nnodes "$WORLD_SIZE" --node-rank "$RANK" --nproc-per-node "$nproc"
                 --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT")
      MP_WORLD_SIZE=$((WORLD_SIZE * nproc)) ;;
  esac
  # Whether TP x PP divides the processes is checked in Python (the pre-flight); at least 1 for the flags below.
  MP_DP=$((MP_WORLD_SIZE / (TP * PP) > 0 ? MP_WORLD_SIZE / (TP * PP) : 1))
}

mp_common_flags() {  # sets MP_FLAGS (array) from the validated common arguments
  MP_FLAGS=(--model-name "$MP_FAMILY")
  # MODEL_SIZE=auto: the checkpoint's shape, whatever it is; a preset name is checked against the checkpoint.
  if [ "$MODEL_SIZE" != auto ]; then MP_FLAGS+=(--model-size "$MODEL_SIZE"); fi
  MP_FLAGS+=(--tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
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
  # FP8, flash attention and sequence parallelism all run through Transformer Engine's layers here, so they use them
  # whatever TE says (Pai-Megatron-Patch's scripts too add them for PR=fp8; their FL=true used the flash-attn package
  # with TE=false, which megatron-core reaches only through TE). TE=true asks for TE layers without any of them.
  local needs_te=""
  if [ "$PR" = fp8 ]; then needs_te="PR=fp8"; elif [ "$FL" = true ]; then needs_te="FL=true"; elif [ "$SP" = true ]; then needs_te="SP=true"; fi
  if [ "${TE:-}" = true ] || [ -n "$needs_te" ]; then
    MP_FLAGS+=(--transformer-impl transformer_engine)
    if [ "${TE:-}" = false ]; then echo "note: $needs_te runs on Transformer Engine layers here, although TE=false" >&2; fi
  fi
  if [ "$PRETRAIN_CHECKPOINT_PATH" != none ]; then MP_FLAGS+=(--load "$PRETRAIN_CHECKPOINT_PATH"); fi
  if [ -n "${TOKENIZER_MODEL:-}" ]; then MP_FLAGS+=(--tokenizer-model "$TOKENIZER_MODEL"); fi
  return 0
}

mp_moe_flags() {  # checks MOE / EP against the family; sets MP_EP and MP_MOE_FLAGS (array), MP_EP_TAG (run name)
  MP_MOE_FLAGS=(); MP_EP_TAG=""
  local coeff=${MP_MOE_AUX_LOSS_COEFF[$MP_FAMILY]:-}
  MP_EP=${EP:-1}
  if [ -z "$coeff" ]; then
    [ "${MOE:-false}" = false ] || mp_fail "MOE=true, but $MP_FAMILY is a dense family (no experts; turning a dense" \
      "model into experts is not supported): mixture-of-experts checkpoints train with the scripts in" \
      "examples/{${!MP_MOE_AUX_LOSS_COEFF[*]}}"
    [ "$MP_EP" -eq 1 ] || mp_fail "EP=$MP_EP needs a mixture-of-experts model; $MP_FAMILY has no experts (pass EP=1)"
    return 0
  fi
  [ "${MOE:-true}" = true ] || mp_fail "MOE=false, but $MP_FAMILY is a mixture-of-experts family: pass MOE=true"
  # Rules between EP and the model or the world size (EP divides the experts and world / (TP x PP)) are the
  # pre-flight's, which reads the checkpoint.
  MP_MOE_FLAGS=(--expert-model-parallel-size "$MP_EP" --moe-token-dispatcher-type alltoall
                --moe-router-load-balancing-type aux_loss --moe-aux-loss-coeff "$coeff")
  MP_EP_TAG="-ep$MP_EP"
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

# The positional argument behind each flag, for the pre-flight's errors ("[the script's SP=true, TP=1]").
MP_FLAG_ARGUMENTS=(--model-size=MODEL_SIZE --micro-batch-size=BATCH_SIZE --global-batch-size=GLOBAL_BATCH_SIZE --lr=LR
  --min-lr=MIN_LR --seq-length=SEQ_LEN --max-padding-length=PAD_LEN --extra-vocab-size=EXTRA_VOCAB_SIZE
  --tensor-model-parallel-size=TP --pipeline-model-parallel-size=PP --use-distributed-optimizer=DO --use-flash-attn=FL
  --sequence-parallel=SP --fp8-format=PR --bf16=PR --fp16=PR --transformer-impl=TE --load=PRETRAIN_CHECKPOINT_PATH
  --data-path=DATASET_PATH --train-data-path=TRAIN_DATASET_PATH --valid-data-path=VALID_DATASET_PATH
  --train-iters=TRAIN_TOKENS --lr-warmup-iters=WARMUP_TOKENS --epochs=EPOCH --save-interval=SAVE_INTERVAL
  --train-iters=TRAIN_ITERS --dpo-beta=BETA --critic-lr=CRITIC_LR --kl-coef=KL_COEF --clip-ratio=CLIP_RATIO
  --max-new-tokens=MAX_NEW_TOKENS --prompt-data-path=PROMPT_DATASET_PATH --reward=REWARD --reward-model=REWARD
  --ptx-data-path=PTX_DATASET_PATH --ptx-coef=PTX_COEF --n-samples-per-prompt=N_SAMPLES
  --expert-model-parallel-size=EP --lr-warmup-iters=WARMUP_ITERS --train-data-path=DATASET_PATH)

mp_script_args_table() {  # lines "<flag>=<ARGUMENT>=<value>" for the arguments this launch has
  local entry flag name
  for entry in "${MP_FLAG_ARGUMENTS[@]}"; do
    flag=${entry%%=*}; name=${entry#*=}
    # Only the launch's own arguments (a TRAIN_ITERS exported in the shell is not one of a pretraining launch).
    [[ " ${MP_NAMES[*]} " == *" $name "* ]] || continue
    if [ -n "${!name:-}" ]; then printf '%s=%s=%s\n' "$flag" "$name" "${!name}"; fi
  done
}

mp_exec() {  # mp_exec <mode> <run name>: pretraining / SFT through python -m megatron_patch.train
  mp_run "$2" "megatron_patch.train $1" "megatron_patch.train check $1 --world-size"
}

mp_run() {  # mp_run <run name> <entry> <check entry>: pre-flight checks, then launch (or print with MP_DRY_RUN=1)
  # <entry>: the module (and its first words) the ranks run; <check entry>: the one-process pre-flight of the same
  # flags, ending in its world-size flag (python -m megatron_patch.train check MODE --world-size N, or an RLHF entry
  # point's --check --world-size N).
  local name=$1 entry check_entry
  read -r -a entry <<< "$2"
  read -r -a check_entry <<< "$3"
  local save="$OUTPUT_BASEPATH/checkpoint/$name"
  MP_FLAGS+=(--save "$save" --tensorboard-dir "$OUTPUT_BASEPATH/tensorboard/$name")
  # shellcheck disable=SC2206  # MP_EXTRA_ARGS is a list of flags on purpose
  local extra=(${MP_EXTRA_ARGS:-})
  mp_python_path
  local cmd=("${MP_LAUNCH[@]}" -m "${entry[@]}" "${MP_FLAGS[@]}" "${extra[@]}")
  # What can be checked in one process (flags, checkpoint metadata, data schema, FP8/TE support) is, before
  # torchrun starts a rank.
  local check=("${PYTHON:-python}" -m "${check_entry[@]}" "$MP_WORLD_SIZE" "${MP_FLAGS[@]}" "${extra[@]}")
  # The pre-flight's and the ranks' errors name the script's arguments behind the flags (errors.py).
  MEGATRON_PATCH_SCRIPT_ARGS=$(mp_script_args_table)
  export MEGATRON_PATCH_SCRIPT_ARGS
  if [ "${MP_DRY_RUN:-0}" = 1 ]; then
    printf '%q ' "${cmd[@]}"; echo
    return 0
  fi
  local log="$OUTPUT_BASEPATH/log/$name.log"
  mkdir -p "$OUTPUT_BASEPATH/log"
  echo "log: $log (appended)"
  mp_log_header "$log" "${cmd[@]}"
  local rc=0
  "${check[@]}" 2>&1 | tee -ai "$log" || rc=${PIPESTATUS[0]}  # -i: Ctrl-C must not cut the log short
  [ "$rc" -eq 0 ] || return "$rc"
  # The launch runs in the background, this shell waiting for it: bash runs a trap only between commands, and a
  # SIGTERM sent to this script (a scheduler stopping the job, e.g. to the container's first process) must reach the
  # launcher, which passes it on to the ranks (they save and exit 0).
  "${cmd[@]}" > >(tee -ai "$log") 2>&1 &
  local pid=$!
  trap 'kill -TERM "$pid" 2> /dev/null' TERM
  trap '' INT  # Ctrl-C reaches the launcher and the ranks from the terminal; this shell waits for their exit code
  while true; do
    rc=0; wait "$pid" || rc=$?  # (set -e must not end the script on the launch's exit code)
    kill -0 "$pid" 2> /dev/null || break  # still running: wait was cut short by a trapped signal
  done
  trap - TERM INT
  wait  # the log's tee
  return "$rc"
}

mp_pretrain() {  # mp_pretrain <family> "$@"
  MP_FAMILY=$1; shift
  mp_parse_layouts "run_pretrain_megatron_$MP_FAMILY.sh" MP_PRETRAIN_LAYOUTS -- "$@"
  mp_validate_common
  mp_int GLOBAL_BATCH_SIZE; mp_int SAVE_INTERVAL; mp_int TRAIN_TOKENS; mp_int WARMUP_TOKENS 0
  [ -n "$DATASET_PATH" ] || mp_fail "DATASET_PATH must name at least one indexed dataset prefix"
  local word
  for word in $DATASET_PATH; do
    [[ "$word" =~ ^[0-9]*\.?[0-9]+$ ]] || [ -f "$word.bin" ] || mp_fail "DATASET_PATH: $word.bin does not exist"
  done
  mp_moe_flags
  mp_launcher
  # Python never sees token counts: turning them into iterations, and the checks of that arithmetic, stay here.
  local tokens_per_iter=$((GLOBAL_BATCH_SIZE * SEQ_LEN))
  local train_iters=$((TRAIN_TOKENS / tokens_per_iter)) warmup_iters=$((WARMUP_TOKENS / tokens_per_iter))
  [ "$train_iters" -ge 1 ] || mp_fail "TRAIN_TOKENS ($TRAIN_TOKENS) is less than one global batch ($tokens_per_iter tokens)"
  [ "$warmup_iters" -le "$train_iters" ] || mp_fail "WARMUP_TOKENS ($WARMUP_TOKENS) exceeds TRAIN_TOKENS ($TRAIN_TOKENS)"
  mp_common_flags
  # shellcheck disable=SC2206
  local data=($DATASET_PATH)
  # Pai-Megatron-Patch's pretraining schedule and evaluation: linear decay over all iterations, 98% train / 2%
  # validation, 10 validation iterations every 100 (and at the end). PAD_LEN is checked but not used: pretraining
  # reads SEQ_LEN-token samples from the indexed dataset.
  MP_FLAGS+=(--global-batch-size "$GLOBAL_BATCH_SIZE" --train-iters "$train_iters" --lr-warmup-iters "$warmup_iters"
             --lr-decay-style linear --save-interval "$SAVE_INTERVAL" --data-path "${data[@]}" --split 98,2,0
             --eval-interval 100 --eval-iters 10 --data-cache-path "$OUTPUT_BASEPATH/data_cache" "${MP_MOE_FLAGS[@]}")
  mp_exec pretrain "pretrain-$MP_FAMILY-$MODEL_SIZE-mbs$BATCH_SIZE-gbs$GLOBAL_BATCH_SIZE-seq$SEQ_LEN-lr$LR-$PR-tp$TP-pp$PP$MP_EP_TAG"
}

mp_finetune() {  # mp_finetune <family> "$@"
  MP_FAMILY=$1; shift
  PEFT=none  # without the optional last argument every parameter trains (never taken from the environment)
  if [ $# -gt 0 ] && [[ "${!#}" =~ ^(none|lora(:.*)?)$ ]]; then PEFT=${!#}; set -- "${@:1:$(($# - 1))}"; fi
  mp_parse_layouts "run_finetune_megatron_$MP_FAMILY.sh" MP_FINETUNE_LAYOUTS -- "$@"
  mp_validate_common
  # Pai's MoE finetuning layouts name the training jsonl DATASET_PATH and count iterations (TRAIN_ITERS,
  # WARMUP_ITERS) with a global batch and a save interval; the others count epochs at micro batch x data parallel.
  if [ -n "$DATASET_PATH" ]; then TRAIN_DATASET_PATH=$DATASET_PATH; fi
  local train_name=TRAIN_DATASET_PATH
  if [ -n "$DATASET_PATH" ]; then train_name=DATASET_PATH; fi
  [ -f "$TRAIN_DATASET_PATH" ] || mp_fail "$train_name '$TRAIN_DATASET_PATH' is not a file"
  [ "$VALID_DATASET_PATH" = none ] || [ -f "$VALID_DATASET_PATH" ] || mp_fail "VALID_DATASET_PATH '$VALID_DATASET_PATH' is not a file (or none)"
  if [ -n "$TRAIN_ITERS" ]; then
    mp_int GLOBAL_BATCH_SIZE; mp_int SAVE_INTERVAL; mp_int TRAIN_ITERS; mp_int WARMUP_ITERS 0
  else
    mp_int EPOCH
  fi
  mp_moe_flags
  mp_launcher
  mp_common_flags
  MP_FLAGS+=(--max-padding-length "$PAD_LEN" --train-data-path "$TRAIN_DATASET_PATH" --lr-decay-style cosine)
  if [ -n "$TRAIN_ITERS" ]; then
    MP_FLAGS+=(--global-batch-size "$GLOBAL_BATCH_SIZE" --train-iters "$TRAIN_ITERS" --lr-warmup-iters "$WARMUP_ITERS"
               --save-interval "$SAVE_INTERVAL")
  else
    MP_FLAGS+=(--global-batch-size $((BATCH_SIZE * MP_DP)) --epochs "$EPOCH")
  fi
  if [ "$VALID_DATASET_PATH" != none ]; then MP_FLAGS+=(--valid-data-path "$VALID_DATASET_PATH"); fi
  MP_FLAGS+=("${MP_MOE_FLAGS[@]}")
  local peft_tag=""
  if [ "$PEFT" != none ]; then
    [[ "$PEFT" =~ ^lora(:([0-9]+)(:([0-9]*\.?[0-9]+))?)?$ ]] || mp_fail "PEFT must be none, lora, lora:RANK or lora:RANK:ALPHA (got '$PEFT')"
    LORA_RANK=${BASH_REMATCH[2]:-8}; mp_int LORA_RANK
    LORA_ALPHA=${BASH_REMATCH[4]:-$((2 * LORA_RANK))}
    MP_FLAGS+=(--lora-rank "$LORA_RANK" --lora-alpha "$LORA_ALPHA")
    peft_tag="-lora$LORA_RANK"
  fi
  mp_exec finetune "finetune-$MP_FAMILY-$MODEL_SIZE-mbs$BATCH_SIZE-seq$SEQ_LEN-lr$LR-$PR-tp$TP-pp$PP$MP_EP_TAG$peft_tag"
}
