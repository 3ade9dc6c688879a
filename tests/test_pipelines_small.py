"""The shell pipelines with ``PRESET=small`` on the real converted SmolLM2-135M-Instruct, cut to
a few steps, tasks and tokens by the quick-check variables, so that the preset's wiring cannot rot.

The three pipelines share one output folder (as in tests/test_pipelines.py): the first writes the
data and the SFT adapter, the others reuse them. Checked: each run exits 0 and says which dtype
it chose; the data are the preset's (clean demonstrations, a validation slice held back from the
RL pool, at least 200 held-out tasks); every training run got the small configs, instruct
prompts, the chosen dtype and the validation file, and the TinyLoRA row trained 32 shared
parameters from the base; table.md, table_humaneval.md and table_pass8.md hold the rows the
preset promises, with the settings of configs/small. What the settings are worth is measured by
full runs, not here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from coderl.cpu import cpu_bf16_feature
from coderl.tasks import load_tasks
from tests.helpers import REPO
from tests.test_pipelines import PIPELINES, run_pipeline, table_rows, train_args

QUICK_SMALL = {
    "PRESET": "small",
    "SFT_MAX_STEPS": "2",
    "SFT_BATCH": "2",
    "RL_MAX_STEPS": "1",
    "RL_PROMPTS": "2",
    "RL_GENERATIONS": "2",
    "MAX_NEW_TOKENS": "16",
    "VAL_TASKS": "2",
    "EVAL_TASKS": "4",
    "HUMANEVAL_TASKS": "2",
    "PASS8_TASKS": "2",
}
RL_ROWS = {"train_SFT_RL.sh": "reinforce", "train_PPO.sh": "ppo", "train_GRPO.sh": "grpo"}
PASS8_HEADER = "| Model / Checkpoint | Method | pass@8 | #solved / #tasks | Avg. length |"


def small_config(name: str) -> dict:
    return yaml.safe_load((REPO / "configs" / "small" / f"{name}.yaml").read_text())


def expected_dtype() -> tuple[str, str]:
    feature = cpu_bf16_feature()
    if feature:
        return "bfloat16", f"small preset: bf16 (CPU has {feature})"
    return "float32", "small preset: fp32 (no bf16 support detected)"


def summary(out: Path, folder: str, name: str) -> dict:
    return json.loads((out / folder / name / "summary.json").read_text())


@pytest.fixture(scope="module")
def small_pipelines(real_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    out = root / "out"
    runs = {}
    for script in PIPELINES:
        runs[script] = run_pipeline(script, out, cwd=root, **QUICK_SMALL, MODEL=real_model_dir)
        assert runs[script]["rc"] == 0, f"{script} failed:\n{runs[script]['stderr'][-4000:]}"
    return out, runs


@pytest.mark.slow
def test_small_preset_data_dtype_and_training_runs(small_pipelines, real_model_dir):
    out, runs = small_pipelines
    dtype, line = expected_dtype()
    for run in runs.values():
        assert re.search(r"^== \[\d+m\d\ds\] " + re.escape(line) + "$", run["stderr"], re.M)
    data = out / "data"
    assert not any("flaw" in t for t in load_tasks(data / "toy_python_train.jsonl"))
    assert len(load_tasks(data / "toy_python_test.jsonl")) >= 200
    val, pool = load_tasks(data / "toy_python_val.jsonl"), load_tasks(data / "toy_python_rl.jsonl")
    assert len(val) == 64 and not {t["prompt"] for t in val} & {t["prompt"] for t in pool}
    sft = train_args(out, "sft")
    assert sft["train_file"] == str(data / "toy_python_train.jsonl") and sft["max_steps"] == 2
    assert sft["per_device_train_batch_size"] == 2 and sft["gradient_accumulation_steps"] == 1
    adapter = json.loads((out / "checkpoints/sft/final/adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == real_model_dir
    for run in ("sft", "reinforce", "ppo", "grpo", "grpo_tinylora"):
        args = train_args(out, run)
        assert args["dtype"] == dtype and args["prompt_mode"] == "instruct", run
        assert args["eval_file"] == str(data / "toy_python_val.jsonl") and args["eval_tasks"] == 2
        assert (out / "checkpoints" / run / "final" / "adapter_config.json").is_file()
        if run != "sft":
            assert args["train_file"] == str(data / "toy_python_rl.jsonl")
            assert args["max_new_tokens"] == 16 and args["max_steps"] == 1
    for run in ("reinforce", "ppo", "grpo"):
        assert train_args(out, run)["init_adapter"] == str(out / "checkpoints" / "sft" / "final")
    tinylora = train_args(out, "grpo_tinylora")
    assert tinylora["init_adapter"] == "" and tinylora["adapter"] == "tinylora"
    assert tinylora["tinylora_u"] == 32 and tinylora["tinylora_weight_tying"] == 1.0
    for key in ("learning_rate", "num_iterations", "epsilon_high", "temperature"):
        assert tinylora[key] == small_config("grpo_tinylora")[key], key


@pytest.mark.slow
def test_small_preset_tables_hold_the_promised_rows_and_settings(small_pipelines):
    out, _ = small_pipelines
    dtype, _ = expected_dtype()
    rows = table_rows((out / "table.md").read_text())
    assert list(rows) == ["base", "sft", "reinforce", "ppo", "grpo", "grpo_tinylora"]
    assert rows["grpo_tinylora"]["method"].strip() == "GRPO (TinyLoRA)"
    for name in rows:
        settings = summary(out, "eval", name)["settings"]
        assert (
            settings["problems"].endswith("data/toy_python_test.jsonl") and settings["limit"] == 4
        )
        assert settings["prompt_mode"] == "instruct" and settings["temperature"] == 0.0
        assert settings["dtype"] == dtype and settings["max_new_tokens"] == 16
    humaneval = table_rows((out / "table_humaneval.md").read_text())
    assert list(humaneval) == ["base", *RL_ROWS.values()]
    for name, row in humaneval.items():
        settings = summary(out, "eval_humaneval", name)["settings"]
        assert settings["problems"].endswith("data/humaneval.jsonl") and row["tasks"] == "2"
        assert settings["temperature"] == 0.0 and settings["dtype"] == dtype
    pass8_text = (out / "table_pass8.md").read_text()
    assert pass8_text.splitlines()[0] == PASS8_HEADER
    pass8 = table_rows(pass8_text)
    assert list(pass8) == ["base", "sft", *RL_ROWS.values()]
    config = small_config("eval_pass8")
    for name, row in pass8.items():
        result = summary(out, "eval_pass8", name)
        assert result["settings"]["n_samples"] == 8 == config["n_samples"]
        assert result["settings"]["temperature"] == 0.8 == config["temperature"]
        assert result["settings"]["problems"].endswith("data/toy_python_test.jsonl")
        assert result["num_tasks"] == 2 and int(row["tasks"]) == 2
        assert float(row["p1"]) == pytest.approx(result["pass@k"]["pass@8"], abs=5e-4)
