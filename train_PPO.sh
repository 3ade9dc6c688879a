#!/usr/bin/env bash
# SFT, then PPO-Clip with unit-test rewards; every checkpoint (base, SFT, each PPO run) is then
# evaluated greedily on the same held-out tasks with the same settings.
#
#   PRESET=tiny bash train_PPO.sh   # CPU, offline: the tiny local model on the toy Python tasks
#   PRESET=small bash train_PPO.sh  # CPU, offline, ~40 minutes: SmolLM2-135M-Instruct
#                                   # (converted by prepare_model.py) on clean toy Python tasks
#   bash train_PPO.sh               # one 16-24 GB GPU: the seed's four PPO runs on
#                                   # deepseek-coder-1.3b-base (alpha 0.01 / 0.03 x batch 4 / 8)
#
# Chain: prepare data -> build (tiny) or load (full) the base -> SFT -> PPO -> evaluate every
# checkpoint -> $OUT/table.md (the seed's columns), $OUT/chart_ppo.png (pass@1 and average length
# per checkpoint), $OUT/curves_sft.png and $OUT/curves_ppo.png (training curves); the small
# preset adds $OUT/table_humaneval.md (base and the last PPO row, greedy on the 164 HumanEval
# tasks) and $OUT/table_pass8.md (base, SFT and that row: pass@8 at temperature 0.8).
# Hyperparameters live in configs/<PRESET>/{sft,ppo,eval}.yaml. A rerun skips finished stages and
# resumes a killed one (scripts/pipeline_lib.sh); delete a stage's folder to redo it. With the
# same OUT as train_SFT_RL.sh the data, base, SFT and their rows are shared (one table).
set -euo pipefail

# ---- settings: environment variables, defaults shown ----------------------------------------------
PRESET=${PRESET:-full}          # full: the seed's experiment (GPU); tiny: CPU, offline, minutes;
#                                 small: SmolLM2-135M-Instruct on CPU, offline, ~40 minutes
OUT=${OUT:-results/ppo}         # everything this run writes; the table is $OUT/table.md
SEED=${SEED:-42}                # training seed (evaluation is greedy)
DATA=${DATA:-$OUT/data}         # task files, written by prepare_data.py when missing
MODEL=${MODEL:-}                # base model; empty: full = deepseek-ai/deepseek-coder-1.3b-base,
#                                 tiny = $OUT/base (a local folder, built when missing),
#                                 small = $OUT/base (SmolLM2-135M-Instruct, converted when missing)
PYTHON=${PYTHON:-python}        # the interpreter that has requirements.txt installed
ALPHAS=${ALPHAS:-}              # PPO length-penalty alphas; empty: full = "0.01 0.03", tiny = the config's
BATCHES=${BATCHES:-}            # PPO tasks per iteration; empty: full = "4 8", tiny = the config's
#                                 (full: one run per alpha x batch, as the seed)
EVAL_TASKS=${EVAL_TASKS:-0}     # held-out tasks evaluated per checkpoint (0 = all)
HUMANEVAL_TASKS=${HUMANEVAL_TASKS:-0} # small: HumanEval tasks evaluated per row (0 = all 164)
PASS8_TASKS=${PASS8_TASKS:-0}   # small: held-out tasks of the pass@8 rows (0 = the config's 100)
# Quick checks (0 = the config's value): they override the YAML configs on the command line.
SFT_MAX_STEPS=${SFT_MAX_STEPS:-0}   # SFT optimizer steps
SFT_BATCH=${SFT_BATCH:-0}           # examples per SFT step (one micro-batch, no accumulation)
RL_MAX_STEPS=${RL_MAX_STEPS:-0}     # PPO iterations
RL_PROMPTS=${RL_PROMPTS:-0}         # tasks per PPO iteration (also replaces BATCHES)
RL_GENERATIONS=${RL_GENERATIONS:-0} # completions sampled per task
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-0} # every generation budget (RL, validation, evaluation)
VAL_TASKS=${VAL_TASKS:-0}           # validation tasks per training run's validation
# OMP_NUM_THREADS (tiny, small: defaults to the number of cores), HF_HUB_OFFLINE (tiny, small: 1)
# pass through.

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/pipeline_lib.sh
source "$REPO/scripts/pipeline_lib.sh"
check_preset "$PRESET"
setup_preset
log "train_PPO.sh: PRESET=$PRESET MODEL=$MODEL OUT=$OUT SEED=$SEED"

# ---- data, base, SFT ---------------------------------------------------------------------------
prepare_preset_data
prepare_base
train_sft
clear_rows
add_row base "Base" "$MODEL"
add_row sft "$SFT_METHOD" "$(final_adapter sft)"

# ---- PPO ---------------------------------------------------------------------------------------
if [ "$PRESET" = full ]; then
  ALPHAS=${ALPHAS:-0.01 0.03}
  BATCHES=${BATCHES:-4 8}
fi
if [ "${RL_PROMPTS:-0}" -gt 0 ]; then BATCHES=""; fi
rl_overrides
PPO_ARGS=(--config "$CONFIGS/ppo.yaml" --model "$MODEL" --init_adapter "$(final_adapter sft)"
  --train_file "$RL_FILE")
RL_RUNS=()
if [ -z "$ALPHAS" ] && [ -z "$BATCHES" ]; then
  train ppo train_ppo_lora.py "${PPO_ARGS[@]}" ${RL_FLAGS[@]+"${RL_FLAGS[@]}"}
  RL_RUNS+=(ppo)
  add_row ppo "PPO" "$(final_adapter ppo)"
else
  # One run per alpha x batch; an empty list keeps the config's value for that dimension.
  for batch in ${BATCHES:-config}; do
    for alpha in ${ALPHAS:-config}; do
      name=ppo
      label=()
      grid=()
      if [ "$alpha" != config ]; then
        name+=_a$alpha
        label+=("α = $alpha")
        grid+=(--length_alpha "$alpha")
      fi
      if [ "$batch" != config ]; then
        name+=_b$batch
        label+=("batch = $batch")
        grid+=(--batch_size "$batch")
      fi
      train "$name" train_ppo_lora.py "${PPO_ARGS[@]}" ${grid[@]+"${grid[@]}"} \
        ${RL_FLAGS[@]+"${RL_FLAGS[@]}"}
      RL_RUNS+=("$name")
      add_row "$name" "PPO ($(join ", " ${label[@]+"${label[@]}"}))" "$(final_adapter "$name")"
    done
  done
fi

# ---- evaluation and comparison -----------------------------------------------------------------
evaluate_rows "$TEST_FILE" "$OUT/table.md" --config "$CONFIGS/eval.yaml" --limit "$EVAL_TASKS"
chart "$OUT/chart_ppo.png" "${ROW_NAMES[@]}"
curves "$OUT/curves_sft.png" "SFT" sft
curves "$OUT/curves_ppo.png" "PPO" "${RL_RUNS[@]}"
if [ "$PRESET" = small ]; then
  evaluate_small_extras "${RL_RUNS[-1]}"
  show_table "$OUT/table_humaneval.md"
  show_table "$OUT/table_pass8.md"
fi
show_table "$OUT/table.md"
log "train_PPO.sh finished in $(elapsed)"
