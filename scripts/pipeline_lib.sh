# Shared shell helpers for the train_*.sh pipelines (sourced, not run).
# Each stage is skipped when its output is complete and resumed when a run was killed.

log() { printf '\n== %s\n' "$*" >&2; }

# stage_done DIR: a training stage is complete when DIR/final holds an adapter.
stage_done() { [ -f "$1/final/adapter_config.json" ]; }

# resume_flag DIR: --resume when an interrupted run left checkpoints behind.
resume_flag() {
  if compgen -G "$1/checkpoint-*" > /dev/null; then echo "--resume"; fi
}

# train SCRIPT OUTDIR ARGS...: run a training script unless its output is already complete.
train() {
  local script=$1 out=$2
  shift 2
  if stage_done "$out"; then
    log "$script -> $out: done, skipping"
    return 0
  fi
  log "$script -> $out"
  # shellcheck disable=SC2046
  python "$script" --output_dir "$out" $(resume_flag "$out") "$@"
}

# evaluate NAME METHOD MODEL TASKS OUTDIR TABLE ARGS...: one row of the comparison table.
evaluate() {
  local name=$1 method=$2 model=$3 tasks=$4 out=$5 table=$6
  shift 6
  if [ -f "$out/$name/summary.json" ]; then
    log "eval $name: done, skipping"
  else
    log "eval $name ($method)"
  fi
  # Rerunning a finished evaluation only re-reads it; a killed one resumes where it stopped.
  python eval_humaneval.py --model "$model" --problems "$tasks" --output_dir "$out/$name" \
    --method "$method" --table "$table" "$@"
}
