#!/usr/bin/env bash
# SFT, then GRPO with unit-test rewards; every checkpoint (base, SFT, GRPO) is then evaluated
# greedily on the same held-out tasks with the same settings. On the full preset a second track
# reproduces the TinyLoRA seed: GRPO with 32 shared trainable parameters on C++ stdin/stdout tasks.
#
#   PRESET=tiny bash train_GRPO.sh   # CPU, offline: the tiny local model on the toy Python tasks
#   PRESET=small bash train_GRPO.sh  # CPU, offline, ~40 minutes: SmolLM2-135M-Instruct on clean
#                                    # toy Python tasks: GRPO (LoRA) from the SFT adapter, and
#                                    # GRPO with TinyLoRA (32 shared parameters) from the base
#   bash train_GRPO.sh               # one 16-24 GB GPU (internet for the C++ data and models):
#                                    # HumanEval track: deepseek-coder-1.3b-base, 4-bit QLoRA SFT,
#                                    #   then GRPO (LoRA) from the SFT adapter;
#                                    # C++ track: Qwen2.5-Coder-3B-Instruct, GRPO with TinyLoRA
#                                    #   on DeepCoder (lcbv5) C++ tasks, tested on code_contests.
#
# Chain: prepare data -> build (tiny) or load (full) the base -> SFT -> GRPO -> evaluate every
# checkpoint -> $OUT/table.md (the seed's columns), $OUT/chart_grpo.png (pass@1 and average length
# per checkpoint), $OUT/curves_sft.png and $OUT/curves_grpo.png (training curves); the C++ track
# writes $OUT/table_cpp.md, $OUT/chart_grpo_cpp.png and $OUT/curves_grpo_cpp.png. The C++ track
# has no SFT stage: the seed trains the instruct model by RL alone, and a TinyLoRA adapter does not
# continue a LoRA one; for the same reasons the small preset's TinyLoRA row (grpo_tinylora, in
# table.md) starts from the base. The small preset adds $OUT/table_humaneval.md (base and GRPO
# (LoRA), greedy on the 164 HumanEval tasks) and $OUT/table_pass8.md (base, SFT and GRPO (LoRA):
# pass@8 at temperature 0.8). Hyperparameters live in
# configs/<PRESET>/{sft,grpo,grpo_cpp,grpo_tinylora,eval,eval_cpp,eval_humaneval,eval_pass8}.yaml.
# A rerun skips finished stages and resumes a killed one (scripts/pipeline_lib.sh); delete a
# stage's folder to redo it.
set -euo pipefail

# ---- settings: environment variables, defaults shown ----------------------------------------------
PRESET=${PRESET:-full}          # full: the seeds' experiments (GPU); tiny: CPU, offline, minutes;
#                                 small: SmolLM2-135M-Instruct on CPU, offline, ~40 minutes
OUT=${OUT:-results/grpo}        # everything this run writes; the table is $OUT/table.md
SEED=${SEED:-42}                # training seed (evaluation is greedy)
DATA=${DATA:-$OUT/data}         # task files, written by prepare_data.py when missing
MODEL=${MODEL:-}                # base model; empty: full = deepseek-ai/deepseek-coder-1.3b-base,
#                                 tiny = $OUT/base (a local folder, built when missing),
#                                 small = $OUT/base (SmolLM2-135M-Instruct, converted when missing)
CPP_MODEL=${CPP_MODEL-Qwen/Qwen2.5-Coder-3B-Instruct}  # full: the C++ TinyLoRA track's model
#                                 (an instruct model: configs/full/grpo_cpp.yaml uses its chat
#                                 template); set it empty to skip the C++ track
PYTHON=${PYTHON:-python}        # the interpreter that has requirements.txt installed
EVAL_TASKS=${EVAL_TASKS:-0}     # held-out tasks evaluated per checkpoint (0 = all)
HUMANEVAL_TASKS=${HUMANEVAL_TASKS:-0} # small: HumanEval tasks evaluated per row (0 = all 164)
PASS8_TASKS=${PASS8_TASKS:-0}   # small: held-out tasks of the pass@8 rows (0 = the config's 100)
# Quick checks (0 = the config's value): they override the YAML configs on the command line.
SFT_MAX_STEPS=${SFT_MAX_STEPS:-0}   # SFT optimizer steps
SFT_BATCH=${SFT_BATCH:-0}           # examples per SFT step (one micro-batch, no accumulation)
RL_MAX_STEPS=${RL_MAX_STEPS:-0}     # GRPO steps
RL_PROMPTS=${RL_PROMPTS:-0}         # prompts (groups) per GRPO step
RL_GENERATIONS=${RL_GENERATIONS:-0} # completions sampled per prompt (the group size)
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-0} # every generation budget (RL, validation, evaluation)
VAL_TASKS=${VAL_TASKS:-0}           # validation tasks per training run's validation
# OMP_NUM_THREADS (tiny, small: defaults to the number of cores), HF_HUB_OFFLINE (tiny, small: 1)
# pass through.

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/pipeline_lib.sh
source "$REPO/scripts/pipeline_lib.sh"
check_preset "$PRESET"
setup_preset
log "train_GRPO.sh: PRESET=$PRESET MODEL=$MODEL OUT=$OUT SEED=$SEED"
CPP_TRACK=false
if [ "$PRESET" = full ] && [ -n "$CPP_MODEL" ]; then CPP_TRACK=true; fi
if [ -e "$CPP_MODEL" ]; then CPP_MODEL=$(absolute "$CPP_MODEL"); fi

# ---- data, base, SFT ---------------------------------------------------------------------------
prepare_preset_data
if $CPP_TRACK; then
  # Hub data (needs internet once): DeepCoder lcbv5 C++ tasks to train on, code_contests test
  # tasks held out (the TinyLoRA seed's choice).
  CPP_TRAIN=$DATA/deepcoder_lcbv5_train.jsonl
  CPP_TEST=$DATA/code_contests_test.jsonl
  prepare_data "$DATA" deepcoder_lcbv5_train.jsonl -- --source deepcoder \
    --deepcoder_subsets lcbv5 --splits train --languages cpp
  prepare_data "$DATA" code_contests_test.jsonl -- --source code_contests --splits test \
    --languages cpp
fi
prepare_base
train_sft
clear_rows
add_row base "Base" "$MODEL"
add_row sft "$SFT_METHOD" "$(final_adapter sft)"

# ---- GRPO --------------------------------------------------------------------------------------
rl_overrides
train grpo train_grpo_lora.py --config "$CONFIGS/grpo.yaml" --model "$MODEL" \
  --init_adapter "$(final_adapter sft)" --train_file "$RL_FILE" ${RL_FLAGS[@]+"${RL_FLAGS[@]}"}
add_row grpo "GRPO (LoRA)" "$(final_adapter grpo)"
GRPO_RUNS=(grpo)
if [ "$PRESET" = small ]; then
  # The TinyLoRA seed's setting beside it: 32 shared parameters, from the base, no SFT.
  train grpo_tinylora train_grpo_lora.py --config "$CONFIGS/grpo_tinylora.yaml" --model "$MODEL" \
    --train_file "$RL_FILE" ${RL_FLAGS[@]+"${RL_FLAGS[@]}"}
  GRPO_RUNS+=(grpo_tinylora)
  add_row grpo_tinylora "GRPO (TinyLoRA)" "$(final_adapter grpo_tinylora)"
fi

if $CPP_TRACK; then
  train grpo_cpp train_grpo_lora.py --config "$CONFIGS/grpo_cpp.yaml" --model "$CPP_MODEL" \
    --train_file "$CPP_TRAIN" ${RL_FLAGS[@]+"${RL_FLAGS[@]}"}
fi

# ---- evaluation and comparison -----------------------------------------------------------------
evaluate_rows "$TEST_FILE" "$OUT/table.md" --config "$CONFIGS/eval.yaml" --limit "$EVAL_TASKS"
chart "$OUT/chart_grpo.png" "${ROW_NAMES[@]}"
curves "$OUT/curves_sft.png" "SFT" sft
curves "$OUT/curves_grpo.png" "GRPO" "${GRPO_RUNS[@]}"
if [ "$PRESET" = small ]; then
  evaluate_small_extras grpo # the LoRA chain's RL row, comparable with base and SFT
  show_table "$OUT/table_humaneval.md"
  show_table "$OUT/table_pass8.md"
fi
if $CPP_TRACK; then
  clear_rows
  add_row cpp_base "Base (instruct)" "$CPP_MODEL"
  add_row grpo_cpp "GRPO (TinyLoRA, C++)" "$(final_adapter grpo_cpp)"
  evaluate_rows "$CPP_TEST" "$OUT/table_cpp.md" --config "$CONFIGS/eval_cpp.yaml" \
    --limit "$EVAL_TASKS"
  chart "$OUT/chart_grpo_cpp.png" "${ROW_NAMES[@]}"
  curves "$OUT/curves_grpo_cpp.png" "GRPO with TinyLoRA on C++ tasks" grpo_cpp
  show_table "$OUT/table_cpp.md"
fi
show_table "$OUT/table.md"
log "train_GRPO.sh finished in $(elapsed)"
