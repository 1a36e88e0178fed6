#!/usr/bin/env bash
# GPU smoke check: the whole user path on one GPU in a few minutes, one result line per step.
#
#   toolkits/gpu_check.sh [--workdir DIR] [--wheel PATH] [--dry-run]
#
#   --workdir DIR  where checkpoints, data and logs go (must be empty or absent; default: a new temporary folder)
#   --wheel PATH   install this megatron-core wheel even if one is importable
#   --dry-run      run the install step, print every other step's commands instead of running them
#
# Each step prints one line: PASS|FAIL|SKIP|DRY <step> <seconds> <key number>; a FAIL names the step's log. Exit
# code 1 when a step failed. Steps (a step whose input failed is skipped):
#   install     megatron-core importable: as installed, or from a wheel (pip install --no-index --no-deps --target)
#   gpu         torch sees a CUDA GPU
#   tiny-hf     a tiny llama HF checkpoint and its tokenizer, built offline
#   hf2mcore    toolkits/model_checkpoints_convertor/model_convertor.sh, TP1 PP1
#   verify      python -m megatron_patch.convert verify (HF vs Megatron logits)
#   data        the shipped corpus -> an indexed dataset
#   pretrain    examples/llama/run_pretrain_megatron_llama.sh with ENV=dsw, bf16, 30 steps planned, stopped at 15
#   resume      the same command again: resumes at iteration 15 and finishes the 30
#   generate    examples/llama/run_text_generation_megatron_llama.sh with ENV=dsw, greedy, bf16
#   mcore2hf    model_convertor.sh MG2HF=true on the trained checkpoint; transformers loads the result
#   reward-model  rlhf/run_reward_model_megatron_llama.sh, 10 bf16 steps on the toy preference pairs, validated
#   dpo         rlhf/run_dpo_megatron_llama.sh, 10 bf16 steps on the same pairs, validated
#   ppo         rlhf/run_ppo_megatron_llama.sh, 3 iterations, the reward model (and critic) from the reward-model step
#   grpo        rlhf/run_grpo_megatron_llama.sh, 3 iterations, 4 samples per prompt, the digit_match reward on the
#               copy task, with the held-out line (greedy answers to prompts never trained on)
#   rl-demo     python -m megatron_patch.rlhf.examples.demo (SFT on mixed demonstrations, then 20 GRPO iterations on
#               the copy task): its held-out line (greedy exact match on 128 prompts never trained on, before -> after)
#   moe-convert a tiny Qwen2-MoE (4 experts top-2, a gated shared expert, a dense layer) built offline, converted by
#               model_convertor.sh (torch_dist, EP=1) and verified against transformers
#   moe-train   examples/qwen_moe/run_pretrain_megatron_qwen_moe.sh with ENV=dsw (MOE=true, EP=1: one GPU), bf16,
#               10 steps on the corpus tokenized for it; the load-balancing loss and the expert load in the log
#   benchmark   toolkits/benchmarks/train_throughput.py (on the GPU where it takes --device; operator tables of both
#               sides in logs/profile/)
#   benchmark-moe  the same with its MoE shape (--shape moe-gpu: against transformers' MixtralForCausalLM)
#   pytest-gpu  python -m pytest tests/gpu
#
# Without an importable megatron-core the wheel (megatron_core-*.whl) is looked for in $MEGATRON_CORE_WHEEL_DIR,
# the repository's .whl/ and the folder holding the repository. PYTHON (default python3) is the interpreter.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HELPERS=$REPO/toolkits/gpu_check_helpers.py
PY=${PYTHON:-python3}
WORK="" WHEEL="" DRY_RUN=0

usage() {
  sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  [ $# -gt 0 ] && echo "error: $*" >&2
  exit 2
}

while [ $# -gt 0 ]; do
  case $1 in
    --workdir) [ $# -ge 2 ] || usage "--workdir needs a folder"; WORK=$2; shift 2 ;;
    --wheel) [ $# -ge 2 ] || usage "--wheel needs a file"; WHEEL=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage ;;
    *) usage "unknown argument '$1'" ;;
  esac
done
command -v "$PY" > /dev/null || usage "PYTHON '$PY' is not an executable"
if [ -n "$WHEEL" ] && [ ! -f "$WHEEL" ]; then usage "--wheel '$WHEEL' is not a file"; fi
if [ -z "$WORK" ]; then
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/mp-gpu-check.XXXXXX")
elif [ -e "$WORK" ] && [ -n "$(ls -A "$WORK")" ]; then
  usage "--workdir '$WORK' is not empty"
fi
mkdir -p "$WORK/logs" "$WORK/bin"
WORK=$(cd "$WORK" && pwd)
LOGS=$WORK/logs SITE=$WORK/site
HF=$WORK/hf MCORE=$WORK/mcore DATA=$WORK/data/corpus_text_document TRAIN=$WORK/train HF_OUT=$WORK/hf_out
GEN_IN=$WORK/prompts.txt GEN_OUT=$WORK/completions.jsonl

# The launch scripts call `python` (and torchrun, or `python -m torch.distributed.run` without it): make `python`
# the interpreter chosen here, also on machines that only have python3. A wrapper, not a link: a virtual
# environment's interpreter finds its packages only when started by its own path.
printf '#!/bin/sh\nexec %q "$@"\n' "$(command -v "$PY")" > "$WORK/bin/python"
chmod +x "$WORK/bin/python"
export PATH="$WORK/bin:$PATH" PYTHON=$PY PYTHONUNBUFFERED=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

declare -A STATUS=()
FAILED=0

# --- step machinery ------------------------------------------------------------------------------------------------

run() {  # a command of the current step: run it (output to the step's log), or record it in a dry run
  if [ "$DRY_RUN" = 1 ]; then printf '%q ' "$@" >> "$STEP_CMDS"; printf '; ' >> "$STEP_CMDS"; return 0; fi
  "$@"
}

live() { [ "$DRY_RUN" = 0 ]; }

key() { printf '%s' "$*" > "$STEP_KEY"; }  # the step's key number(s) for its result line

step() {  # step NAME [NEEDS...]: run step_NAME (in a subshell, errexit on) and print its one result line
  local name=$1 start=$SECONDS rc status detail need
  shift
  for need in "$@"; do
    if [ "${STATUS[$need]:-}" != PASS ]; then
      STATUS[$name]=SKIP
      printf '%-4s %-12s %4s  needs %s\n' SKIP "$name" - "$need"
      return 0
    fi
  done
  STEP_LOG=$LOGS/$name.log STEP_KEY=$LOGS/$name.key STEP_CMDS=$LOGS/$name.cmds
  : > "$STEP_KEY"; : > "$STEP_CMDS"
  set +e
  ( set -euo pipefail; "step_${name//-/_}" ) > "$STEP_LOG" 2>&1
  rc=$?
  set -e
  if [ "$rc" -eq 0 ] && [ "$DRY_RUN" = 1 ] && [ -s "$STEP_CMDS" ]; then
    status=DRY detail=$(sed 's/; $//' "$STEP_CMDS")
  elif [ "$rc" -eq 0 ]; then
    status=PASS detail=$(cat "$STEP_KEY")
  else
    status=FAIL FAILED=1
    detail="$(grep -v '^\s*$' "$STEP_LOG" | tail -n 1 | cut -c1-200) (log: $STEP_LOG)"
  fi
  STATUS[$name]=$([ "$status" = FAIL ] && echo FAIL || echo PASS)
  printf '%-4s %-12s %4ds %s\n' "$status" "$name" $((SECONDS - start)) "$detail"
}

# --- the steps -----------------------------------------------------------------------------------------------------

find_wheel() {
  local dir
  for dir in ${MEGATRON_CORE_WHEEL_DIR:-} "$REPO/.whl" "$REPO/.."; do
    if [ -d "$dir" ]; then
      find "$dir" -maxdepth 1 -name 'megatron_core-*.whl' | sort | tail -n 1 | grep . && return 0
    fi
  done
  return 1
}

step_install() {
  local wheel=$WHEEL
  if [ -z "$wheel" ] && "$PY" -c 'import megatron.core' 2> /dev/null; then
    key "megatron-core $("$PY" -c 'import megatron.core as m; print(m.__version__)') (installed)"
    return 0
  fi
  if [ -z "$wheel" ]; then
    wheel=$(find_wheel) || { echo "no importable megatron-core and no megatron_core-*.whl next to the repo"; return 1; }
  fi
  # No network and no dependency resolution: torch, numpy and packaging come with the machine.
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$wheel"
  local version
  version=$(PYTHONPATH="$SITE:$PYTHONPATH" "$PY" -c 'import megatron.core as m; print(m.__version__)')
  key "megatron-core $version (wheel $(basename "$wheel") -> $SITE)"
}

step_gpu() {
  run "$PY" "$HELPERS" gpu-info
  live || return 0
  key "$(tail -n 1 "$STEP_LOG")"
}

step_tiny_hf() {
  run "$PY" "$HELPERS" tiny-hf "$HF"
  live || return 0
  key "$(tail -n 1 "$STEP_LOG")"
}

step_hf2mcore() {
  run bash "$REPO/toolkits/model_checkpoints_convertor/model_convertor.sh" none "$HF" "$MCORE" 1 1 llama 0 false
  live || return 0
  key "TP1 PP1 -> $MCORE"
}

step_verify() {
  run "$PY" -m megatron_patch.convert verify --hf "$HF" --mcore "$MCORE"
  live || return 0
  key "$(grep -o 'max_abs_diff=[^ ]*' "$STEP_LOG" | tail -n 1)"
}

step_data() {
  run "$PY" "$HELPERS" corpus "$WORK/corpus.jsonl"
  run mkdir -p "$(dirname "$DATA")"
  # Megatron-LM's naming: --output-prefix P writes P_text_document.bin/.idx
  run "$PY" -m megatron_patch.data.preprocess --input "$WORK/corpus.jsonl" --output-prefix "${DATA%_text_document}" \
    --tokenizer "$HF" --workers 1
  live || return 0
  [ -f "$DATA.bin" ] && [ -f "$DATA.idx" ] || { echo "no indexed dataset at $DATA.bin/.idx"; return 1; }
  key "$(du -k "$DATA.bin" | cut -f1) KiB indexed"
}

# 30 steps of 8 x 128 tokens; the first run stops after 15 (saving), the second resumes there. The 24 positional
# arguments: ENV MEGATRON_PATH MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE GLOBAL_BATCH_SIZE LR MIN_LR SEQ_LEN PAD_LEN
# EXTRA_VOCAB_SIZE PR TP PP AC DO FL SP SAVE_INTERVAL DATASET_PATH PRETRAIN_CHECKPOINT_PATH TRAIN_TOKENS
# WARMUP_TOKENS OUTPUT_BASEPATH.
GBS=8 SEQ=128 STEPS=30
PRETRAIN_ARGS=(dsw none "$REPO" tiny 4 "$GBS" 1e-3 1e-4 "$SEQ" "$SEQ" 0 bf16 1 1 none false false false 15 "$DATA"
               "$MCORE" $((STEPS * GBS * SEQ)) $((3 * GBS * SEQ)) "$TRAIN")
PRETRAIN=$REPO/examples/llama/run_pretrain_megatron_llama.sh

# Megatron-LM's iteration line: "... elapsed time per iteration (ms): 189.0 | ... | lm loss: 6.766904E+00 | ..."
last_loss() { grep -o 'lm loss: [0-9.E+-]*' "$1" | tail -n 1 | cut -d' ' -f3; }
last_ms() { grep -o 'per iteration (ms): [0-9.]*' "$1" | tail -n 1 | cut -d' ' -f4; }

step_pretrain() {
  run env GPUS_PER_NODE=1 MP_EXTRA_ARGS="--exit-interval 15 --log-interval 5" bash "$PRETRAIN" "${PRETRAIN_ARGS[@]}"
  live || return 0
  local tracker
  tracker=$(cat "$TRAIN"/checkpoint/pretrain-*/latest_checkpointed_iteration.txt)
  [ "$tracker" = 15 ] || { echo "expected a checkpoint of iteration 15, found '$tracker'"; return 1; }
  local loss
  loss=$(last_loss "$STEP_LOG")
  [ -n "$loss" ] || { echo "no 'lm loss' in the training log"; return 1; }
  key "iteration 15 loss $loss, $(last_ms "$STEP_LOG") ms/iteration"
}

step_resume() {
  run env GPUS_PER_NODE=1 MP_EXTRA_ARGS="--log-interval 5" bash "$PRETRAIN" "${PRETRAIN_ARGS[@]}"
  live || return 0
  grep -q 'resumed at iteration 15' "$STEP_LOG" || { echo "the second run did not resume at iteration 15"; return 1; }
  local first last
  first=$(last_loss "$LOGS/pretrain.log") last=$(last_loss "$STEP_LOG")
  [ -n "$last" ] || { echo "no 'lm loss' in the resumed run's log"; return 1; }
  awk "BEGIN{exit !($last < $first)}" || { echo "loss did not fall after the resume: $first -> $last"; return 1; }
  key "resumed at 15, iteration $STEPS loss $last (from $first)"
}

step_generate() {
  local ckpt
  ckpt=$(find "$TRAIN/checkpoint" -maxdepth 1 -name 'pretrain-*' 2> /dev/null | head -n 1 || true)
  run "$PY" "$HELPERS" prompts "$GEN_IN"
  run env GPUS_PER_NODE=1 bash "$REPO/examples/llama/run_text_generation_megatron_llama.sh" dsw none "$REPO" \
    "${ckpt:-$TRAIN/checkpoint/pretrain-llama-tiny}" tiny 1 2 "$SEQ" "$SEQ" 0 bf16 1 64 32 "$GEN_IN" "$GEN_OUT" 0 1.0 1.0
  live || return 0
  key "$("$PY" "$HELPERS" completions "$GEN_OUT" 2)"
}

step_mcore2hf() {
  local ckpt
  ckpt=$(find "$TRAIN/checkpoint" -maxdepth 1 -name 'pretrain-*' 2> /dev/null | head -n 1 || true)
  run bash "$REPO/toolkits/model_checkpoints_convertor/model_convertor.sh" none \
    "${ckpt:-$TRAIN/checkpoint/pretrain-llama-tiny}" "$HF_OUT" 1 1 llama 0 true
  run "$PY" "$HELPERS" load-hf "$HF_OUT"
  live || return 0
  key "$(tail -n 1 "$STEP_LOG")"
}

# Mixture of experts: a tiny Qwen2-MoE converted, verified and trained for 10 steps through the MoE launch script
# (the 26-argument layout: ... SP TE MOE EP SAVE_INTERVAL ...). Its tokenizer is its own: the corpus is indexed again.
MOE_HF=$WORK/moe_hf MOE_MCORE=$WORK/moe_mcore MOE_DATA=$WORK/moe_data/corpus_text_document MOE_TRAIN=$WORK/moe_train

step_moe_convert() {
  run "$PY" "$HELPERS" tiny-hf "$MOE_HF" qwen_moe
  run bash "$REPO/toolkits/model_checkpoints_convertor/model_convertor.sh" none "$MOE_HF" "$MOE_MCORE" 1 1 qwen_moe 0 \
    false torch_dist 1
  run "$PY" -m megatron_patch.convert verify --hf "$MOE_HF" --mcore "$MOE_MCORE"
  live || return 0
  key "$(grep -o 'qwen_moe tiny: .*' "$STEP_LOG" | head -n 1); $(grep -o 'max_abs_diff=[^ ]*' "$STEP_LOG" | tail -n 1)"
}

step_moe_train() {
  run mkdir -p "$(dirname "$MOE_DATA")"
  run "$PY" -m megatron_patch.data.preprocess --input "$WORK/corpus.jsonl" --output-prefix "${MOE_DATA%_text_document}" \
    --tokenizer "$MOE_HF" --workers 1
  run env GPUS_PER_NODE=1 MP_EXTRA_ARGS="--log-interval 5" bash "$REPO/examples/qwen_moe/run_pretrain_megatron_qwen_moe.sh" \
    dsw "$REPO" tiny 4 "$GBS" 1e-3 1e-4 "$SEQ" "$SEQ" 0 bf16 1 1 none false false false false true 1 10 "$MOE_DATA" \
    "$MOE_MCORE" $((10 * GBS * SEQ)) $((GBS * SEQ)) "$MOE_TRAIN"
  live || return 0
  local loss lb load
  loss=$(last_loss "$STEP_LOG")
  lb=$(grep -o 'load_balancing_loss: [0-9.E+-]*' "$STEP_LOG" | tail -n 1 | cut -d' ' -f2)
  load=$(grep -o 'expert load max/mean: [0-9.E+-]*' "$STEP_LOG" | tail -n 1 | cut -d' ' -f4)
  [ -n "$loss" ] && [ -n "$lb" ] && [ -n "$load" ] || { echo "no lm loss / load_balancing_loss / expert load in the log"; return 1; }
  ls -d "$MOE_TRAIN"/checkpoint/pretrain-qwen_moe-*-ep1/iter_0000010 > /dev/null \
    || { echo "no iteration-10 checkpoint under $MOE_TRAIN/checkpoint"; return 1; }
  key "iteration 10 loss $loss, load_balancing_loss $lb, expert load max/mean $load, $(last_ms "$STEP_LOG") ms/iteration"
}

# RLHF on the converted tiny model, a few bf16 iterations each through the positional scripts: the reward model (on
# the toy preference pairs), DPO, PPO with that reward model (the critic starts from it), GRPO with a programmatic
# reward.
RLHF=$REPO/rlhf RM_OUT=$WORK/rm TOY=$WORK/toy RL=$WORK/rl

step_reward_model() {
  run "$PY" "$HELPERS" toy-preferences "$TOY"
  run env GPUS_PER_NODE=1 MP_EXTRA_ARGS="--train-iters 10 --log-interval 5 --eval-interval 10" \
    bash "$RLHF/run_reward_model_megatron_llama.sh" dsw none "$REPO" tiny 4 16 1e-3 1e-4 64 bf16 1 1 none false false \
    false "$TOY/train.jsonl" "$TOY/valid.jsonl" "$MCORE" 1 "$RM_OUT"
  live || return 0
  key "$(grep -o 'validation at iteration .*' "$STEP_LOG" | tail -n 1)"
}

step_dpo() {
  run "$PY" "$HELPERS" toy-preferences "$TOY"
  run env GPUS_PER_NODE=1 MP_EXTRA_ARGS="--train-iters 10 --log-interval 5 --eval-interval 10" \
    bash "$RLHF/run_dpo_megatron_llama.sh" dsw none "$REPO" tiny 4 16 1e-3 1e-4 0.1 64 bf16 1 1 none false false false \
    "$TOY/train.jsonl" "$TOY/valid.jsonl" "$MCORE" 1 "$WORK/dpo"
  live || return 0
  key "$(grep -o 'validation at iteration .*' "$STEP_LOG" | tail -n 1)"
}

rl_summary() {  # "N iterations, reward first -> last" from an RL log
  grep -o '| reward [-0-9.]*' "$1" | awk '{r[NR]=$3} END {if (NR == 0) exit 1; printf "%d iterations, reward %s -> %s", NR, r[1], r[NR]}'
}

step_ppo() {
  local rm_run
  rm_run=$(find "$RM_OUT/checkpoint" -maxdepth 1 -name 'rm-*' 2> /dev/null | head -n 1 || true)
  run "$PY" "$HELPERS" rl-prompts "$RL"
  run env GPUS_PER_NODE=1 MP_EXTRA_ARGS="--log-interval 1" bash "$RLHF/run_ppo_megatron_llama.sh" dsw none "$REPO" tiny \
    4 8 1e-4 1e-5 1e-4 0.05 0.2 64 8 bf16 1 1 none false false false "$RL/prompts.jsonl" "${rm_run:-$RM_OUT}" "$MCORE" \
    none 0 3 "$WORK/ppo"
  live || return 0
  key "$(rl_summary "$STEP_LOG") (reward model from the reward-model step)"
}

step_grpo() {
  run "$PY" "$HELPERS" rl-prompts "$RL"
  run env GPUS_PER_NODE=1 MP_EXTRA_ARGS="--log-interval 1 --eval-prompt-data-path $RL/eval.jsonl --eval-interval 3" \
    bash "$RLHF/run_grpo_megatron_llama.sh" dsw none "$REPO" tiny 4 4 1e-4 1e-5 0.05 0.2 4 64 8 bf16 1 1 none false \
    false false "$RL/prompts.jsonl" fn:digit_match "$MCORE" 3 "$WORK/grpo"
  live || return 0
  key "$(rl_summary "$STEP_LOG") (digit_match), $(grep -o 'held-out .*exact match [0-9.]*' "$STEP_LOG" | \
    awk '{e[NR]=$NF} END {if (NR) printf "held-out exact_match %s -> %s", e[1], e[NR]}')"
}

step_rl_demo() {
  run "$PY" -m megatron_patch.rlhf.examples.demo --algo grpo --workdir "$WORK/rl-demo"
  live || return 0
  key "$(grep -o 'held-out exact_match .*' "$STEP_LOG" | tail -n 1)"
}

step_benchmark() {
  local bench=$REPO/toolkits/benchmarks/train_throughput.py
  # Where the benchmark takes --device (added with the GPU work) both of its sides run on the GPU; an older one is
  # run with the GPU hidden, so that both sides share the CPU and the ratio means what it says.
  if "$PY" "$bench" --help | grep -q -- '--device'; then
    # Operator tables of both sides (two profiled steps each) land next to the logs: where the time goes.
    run "$PY" "$bench" --skip-preprocessing --rounds 1 --warmup 3 --steps 10 --device cuda --profile "$LOGS/profile"
    live || return 0
    key "cuda: $(grep -i 'ratio' "$STEP_LOG" | tail -n 1)"
  else
    run env CUDA_VISIBLE_DEVICES= "$PY" "$bench" --skip-preprocessing --rounds 1 --warmup 3 --steps 10
    live || return 0
    key "cpu (this benchmark has no --device): $(grep -i 'ratio' "$STEP_LOG" | tail -n 1)"
  fi
}

step_benchmark_moe() {
  run "$PY" "$REPO/toolkits/benchmarks/train_throughput.py" --skip-preprocessing --rounds 1 --warmup 3 --steps 10 \
    --device cuda --shape moe-gpu --profile "$LOGS/profile-moe"
  live || return 0
  key "cuda moe-gpu: $(grep -i 'ratio' "$STEP_LOG" | tail -n 1)"
}

step_pytest_gpu() {
  run "$PY" -m pytest -q -p no:cacheprovider "$REPO/tests/gpu"
  live || return 0
  key "$(grep -E '[0-9]+ (passed|failed)' "$STEP_LOG" | tail -n 1)"
}

# --- the run -------------------------------------------------------------------------------------------------------

echo "megatron-patch GPU check: $REPO -> $WORK$([ "$DRY_RUN" = 1 ] && echo ' (dry run)')"
start=$SECONDS
step install
if [ -d "$SITE/megatron" ]; then export PYTHONPATH="$SITE:$PYTHONPATH"; fi
step gpu install
step tiny-hf gpu
step hf2mcore tiny-hf
step verify hf2mcore
step data tiny-hf
step pretrain hf2mcore data
step resume pretrain
step generate resume
step mcore2hf resume
step reward-model hf2mcore
step dpo hf2mcore
step ppo reward-model
step grpo hf2mcore
step rl-demo gpu
step moe-convert gpu
step moe-train moe-convert data
step benchmark gpu
step benchmark-moe gpu
step pytest-gpu gpu
echo "total $((SECONDS - start))s; $([ "$FAILED" = 0 ] && echo 'no step failed' || echo 'FAILED')"
exit "$FAILED"
