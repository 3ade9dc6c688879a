#!/usr/bin/env bash
# SFT, then REINFORCE with unit-test rewards; every checkpoint (base, SFT, each RL run) is then
# evaluated greedily on the same held-out tasks with the same settings.
#
#   PRESET=tiny bash train_SFT_RL.sh   # CPU, offline: the tiny local model on the toy Python tasks
#   bash train_SFT_RL.sh               # one 16-24 GB GPU: the seed's runs on deepseek-coder-1.3b-base
#                                      # (4-bit QLoRA; REINFORCE with length penalty 0.01 and 0.03)
#
# Chain: prepare data -> build (tiny) or load (full) the base -> SFT -> REINFORCE -> evaluate every
# checkpoint -> $OUT/table.md (the seed's columns), $OUT/chart_sft_rl.png (pass@1 and average
# length per checkpoint), $OUT/curves_sft.png and $OUT/curves_sft_rl.png (training curves).
# Hyperparameters live in configs/<PRESET>/{sft,reinforce,eval}.yaml. A rerun skips finished
# stages and resumes a killed one (scripts/pipeline_lib.sh); delete a stage's folder to redo it.
set -euo pipefail

# ---- settings: environment variables, defaults shown ----------------------------------------------
PRESET=${PRESET:-full}          # full: the seed's experiment (GPU); tiny: CPU, offline, minutes
OUT=${OUT:-results/sft_rl}      # everything this run writes; the table is $OUT/table.md
SEED=${SEED:-42}                # training seed (evaluation is greedy)
DATA=${DATA:-$OUT/data}         # task files, written by prepare_data.py when missing
MODEL=${MODEL:-}                # base model; empty: full = deepseek-ai/deepseek-coder-1.3b-base,
#                                 tiny = $OUT/base (a local folder, built when missing)
PYTHON=${PYTHON:-python}        # the interpreter that has requirements.txt installed
ALPHAS=${ALPHAS:-}              # REINFORCE length-penalty alphas, one run each; empty: full =
#                                 "0.01 0.03" (the seed's), tiny = one run with the config's reward
EVAL_TASKS=${EVAL_TASKS:-0}     # held-out tasks evaluated per checkpoint (0 = all)
# Quick checks (0 = the config's value): they override the YAML configs on the command line.
SFT_MAX_STEPS=${SFT_MAX_STEPS:-0}   # SFT optimizer steps
RL_MAX_STEPS=${RL_MAX_STEPS:-0}     # RL steps
RL_PROMPTS=${RL_PROMPTS:-0}         # prompts per RL step
RL_GENERATIONS=${RL_GENERATIONS:-0} # completions sampled per prompt
# OMP_NUM_THREADS (tiny: defaults to the number of cores), HF_HUB_OFFLINE (tiny: 1) pass through.

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/pipeline_lib.sh
source "$REPO/scripts/pipeline_lib.sh"
check_preset "$PRESET"
setup_preset
log "train_SFT_RL.sh: PRESET=$PRESET MODEL=$MODEL OUT=$OUT SEED=$SEED"

# ---- data, base, SFT ---------------------------------------------------------------------------
prepare_preset_data
prepare_base
train_sft
clear_rows
add_row base "Base" "$MODEL"
add_row sft "$SFT_METHOD" "$(final_adapter sft)"

# ---- REINFORCE ---------------------------------------------------------------------------------
if [ "$PRESET" = full ]; then ALPHAS=${ALPHAS:-0.01 0.03}; fi
rl_overrides --batch_size
RL_RUNS=()
if [ -z "$ALPHAS" ]; then
  train reinforce train_rl_lora.py --config "$CONFIGS/reinforce.yaml" --model "$MODEL" \
    --init_adapter "$(final_adapter sft)" --train_file "$RL_FILE" \
    ${RL_FLAGS[@]+"${RL_FLAGS[@]}"}
  RL_RUNS+=(reinforce)
  add_row reinforce "RL (REINFORCE)" "$(final_adapter reinforce)"
else
  for alpha in $ALPHAS; do
    name=reinforce_a$alpha
    train "$name" train_rl_lora.py --config "$CONFIGS/reinforce.yaml" --model "$MODEL" \
      --init_adapter "$(final_adapter sft)" --train_file "$RL_FILE" --length_alpha "$alpha" \
      ${RL_FLAGS[@]+"${RL_FLAGS[@]}"}
    RL_RUNS+=("$name")
    add_row "$name" "RL (REINFORCE, α = $alpha)" "$(final_adapter "$name")"
  done
fi

# ---- evaluation and comparison -----------------------------------------------------------------
evaluate_rows "$TEST_FILE" "$OUT/table.md" --config "$CONFIGS/eval.yaml" --limit "$EVAL_TASKS"
chart "$OUT/chart_sft_rl.png" "${ROW_NAMES[@]}"
curves "$OUT/curves_sft.png" "SFT" sft
curves "$OUT/curves_sft_rl.png" "REINFORCE" "${RL_RUNS[@]}"
show_table "$OUT/table.md"
log "train_SFT_RL.sh finished in $(elapsed)"
