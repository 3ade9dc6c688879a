"""The shell pipelines (train_SFT_RL.sh, train_PPO.sh, train_GRPO.sh) end to end with
``PRESET=tiny``, cut to seconds of training by their quick-check variables, and plot_training.py.

The three pipelines share one output folder, as a user may share it: the first builds the toy
data, the tiny base and the SFT adapter, the other two find them and skip those stages, and the
one table collects every row. Checked: each run exits 0; the table has the base, SFT and RL rows
and their numbers are the ones in each evaluation's summary.json; every row was evaluated on the
held-out file with the same settings; SFT trained on the demonstrations and RL on the RL pool; the
charts are PNGs; a second run skips every stage, takes seconds and prints the same table; a run
whose final adapter is missing resumes from its checkpoint; an unknown PRESET is one line, exit 2.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import plot_training
from tests.helpers import REPO

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Script -> (its chart/curve name, its RL rows).
PIPELINES = {
    "train_SFT_RL.sh": ("sft_rl", ["reinforce"]),
    "train_PPO.sh": ("ppo", ["ppo"]),
    "train_GRPO.sh": ("grpo", ["grpo"]),
}

# Seconds of work per stage: a few SFT steps, one RL step of 2 prompts x 2 samples, 4 test tasks.
QUICK = {
    "PRESET": "tiny",
    "SFT_MAX_STEPS": "3",
    "RL_MAX_STEPS": "1",
    "RL_PROMPTS": "2",
    "RL_GENERATIONS": "2",
    "EVAL_TASKS": "4",
}
ROW = re.compile(r"^\| `(?P<name>[^`]+)` \| (?P<method>[^|]+) \| (?P<p1>[0-9.]+) \| "
                 r"(?P<passed>\d+) / (?P<tasks>\d+) \| (?P<length>[0-9.]+) \|$")  # fmt: skip


def run_pipeline(script: str, out: Path, cwd: Path, **env_overrides) -> dict:
    env = dict(os.environ)
    env.update(
        QUICK,
        OUT=str(out),
        PYTHON=sys.executable,
        OMP_NUM_THREADS="1",  # the machine's cores are shared; one thread per process is fastest
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        **env_overrides,
    )
    started = time.perf_counter()
    proc = subprocess.run(
        ["bash", str(REPO / script)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    return {
        "rc": proc.returncode,
        "stdout": proc.stdout,
        "stderr": proc.stderr,
        "seconds": time.perf_counter() - started,
    }


def stage_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("== [")]


def table_rows(text: str) -> dict[str, dict]:
    rows = {}
    for line in text.splitlines():
        match = ROW.match(line)
        if match:
            rows[match["name"]] = match.groupdict()
    return rows


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """Each pipeline run twice into one shared OUT (first runs, then reruns), from another cwd."""
    root = tmp_path_factory.mktemp("pipelines")
    out = root / "out"
    first = {script: run_pipeline(script, out, cwd=root) for script in PIPELINES}
    for script, run in first.items():
        assert run["rc"] == 0, f"{script} failed:\n{run['stderr'][-4000:]}"
    again = {script: run_pipeline(script, out, cwd=root) for script in PIPELINES}
    return out, first, again


@pytest.mark.slow
def test_each_pipeline_runs_its_stages_and_shares_the_first_ones(pipelines):
    _, first, _ = pipelines
    sft_rl = "\n".join(stage_lines(first["train_SFT_RL.sh"]["stderr"]))
    for stage in ("data ->", "build tiny base model ->", "train sft (", "train reinforce (",
                  "eval base (", "eval sft (", "eval reinforce ("):  # fmt: skip
        assert stage in sft_rl
    for script, (_, rl_rows) in list(PIPELINES.items())[1:]:
        lines = "\n".join(stage_lines(first[script]["stderr"]))
        assert f"train {rl_rows[0]} (" in lines and f"eval {rl_rows[0]} (" in lines
        for shared in ("data toy_python", "base model (", "train sft", "eval base", "eval sft"):
            assert re.search(re.escape(shared) + r".*done, skipping", lines), (script, shared)


@pytest.mark.slow
def test_table_rows_match_the_evaluation_summaries(pipelines):
    out, _, _ = pipelines
    rows = table_rows((out / "table.md").read_text())
    assert list(rows) == ["base", "sft", "reinforce", "ppo", "grpo"]
    settings = {}
    for name, row in rows.items():
        summary = json.loads((out / "eval" / name / "summary.json").read_text())
        p1 = summary["pass@k"]["pass@1"]
        assert 0.0 <= float(row["p1"]) <= 1.0
        assert float(row["p1"]) == pytest.approx(p1, abs=5e-4)
        assert int(row["passed"]) == summary["passed_tasks"]
        assert int(row["tasks"]) == summary["num_tasks"] == 4
        assert float(row["length"]) == pytest.approx(summary["avg_num_tokens"], abs=5e-3)
        assert 0 < summary["avg_num_tokens"] <= 64
        free = {"model", "method", "model_info"}
        settings[name] = {k: v for k, v in summary["settings"].items() if k not in free}
    # Every row: the held-out file, the settings of configs/tiny/eval.yaml, nothing different.
    reference = settings["base"]
    assert reference["problems"].endswith("data/toy_python_test.jsonl")
    eval_config = tiny_config("eval")
    for key in ("temperature", "max_new_tokens", "timeout"):
        assert reference[key] == eval_config[key]
    assert all(s == reference for s in settings.values())
    assert [r["method"].strip() for r in rows.values()] == [
        "Base", "SFT (LoRA)", "RL (REINFORCE)", "PPO", "GRPO (LoRA)",
    ]  # fmt: skip


def train_args(out: Path, run: str) -> dict:
    """The parsed options a training run recorded (all its option groups merged)."""
    config = json.loads((out / "runs" / run / "config.json").read_text())
    merged = {}
    for group in config.values():
        merged.update(group)
    return merged


def tiny_config(name: str) -> dict:
    return yaml.safe_load((REPO / "configs" / "tiny" / f"{name}.yaml").read_text())


def assert_config_applied(args: dict, config: dict, overridden: set[str]) -> None:
    for key, value in config.items():
        if key not in overridden:
            assert args[key] == value, key


@pytest.mark.slow
def test_stages_train_on_their_splits_with_the_config_and_overrides(pipelines):
    out, _, _ = pipelines
    sft = train_args(out, "sft")
    assert sft["train_file"].endswith("data/toy_python_train.jsonl")
    assert sft["max_steps"] == 3  # SFT_MAX_STEPS wins over the config
    assert_config_applied(sft, tiny_config("sft"), {"max_steps"})
    for run in ("reinforce", "ppo", "grpo"):
        prompts_option = "batch_size"  # prompts per step over all processes, in every trainer
        args = train_args(out, run)
        assert args["train_file"].endswith("data/toy_python_rl.jsonl")
        assert args["init_adapter"] == str(out / "checkpoints" / "sft" / "final")
        assert args["max_steps"] == 1 and args[prompts_option] == 2
        assert args["num_generations"] == 2
        overridden = {"max_steps", prompts_option, "num_generations"}
        config = {"reinforce": "reinforce", "ppo": "ppo", "grpo": "grpo"}[run]
        assert_config_applied(args, tiny_config(config), overridden)
        assert (out / "checkpoints" / run / "final" / "adapter_config.json").is_file()


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.mark.slow
def test_charts_and_training_curves_are_pngs(pipelines):
    out, first, _ = pipelines
    assert png_size(out / "curves_sft.png")[0] > 100
    for script, (name, _) in PIPELINES.items():
        for png in (out / f"chart_{name}.png", out / f"curves_{name}.png"):
            width, height = png_size(png)
            assert width > 100 and height > 100
        assert str(out / f"chart_{name}.png") in first[script]["stdout"]


@pytest.mark.slow
def test_a_second_run_skips_every_stage_and_prints_the_same_table(pipelines):
    out, first, again = pipelines
    table = (out / "table.md").read_text()
    for script in PIPELINES:
        run = again[script]
        assert run["rc"] == 0, run["stderr"][-2000:]
        stages = stage_lines(run["stderr"])[1:-2]  # all but the header, results and wall time
        assert len(stages) >= 9
        assert all(line.endswith("done, skipping") for line in stages), stages
        # Bounds with room for a loaded 2-core machine; a stage that ran again would take longer.
        assert run["seconds"] < 45 and run["seconds"] < first[script]["seconds"] / 2
        assert run["stdout"].strip() == table.strip()
        assert "finished in" in run["stderr"].splitlines()[-1]


@pytest.mark.slow
def test_a_run_whose_final_adapter_is_missing_resumes_from_its_checkpoint(pipelines, tmp_path):
    out, _, _ = pipelines
    final = out / "checkpoints" / "grpo" / "final"
    adapter = (final / "adapter_model.safetensors").read_bytes()
    # What a run killed after its last checkpoint but before the export leaves behind.
    shutil.rmtree(final)
    run = run_pipeline("train_GRPO.sh", out, cwd=tmp_path)
    assert run["rc"] == 0, run["stderr"][-3000:]
    assert "train grpo (train_grpo_lora.py): resuming from the last checkpoint" in run["stderr"]
    assert (final / "adapter_model.safetensors").read_bytes() == adapter
    assert "eval grpo: done, skipping" in run["stderr"]  # the same adapter: nothing to redo


def test_an_unknown_preset_is_one_line_and_exit_2(tmp_path):
    for script in PIPELINES:
        run = run_pipeline(script, tmp_path / "out", cwd=tmp_path, PRESET="huge")
        assert run["rc"] == 2
        assert run["stderr"].strip() == "error: unknown PRESET=huge (choose tiny, small or full)"
        assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- plot_training.py


def write_metrics(folder: Path, records: list[dict]) -> Path:
    folder.mkdir(parents=True)
    lines = [json.dumps({"time": 0.0, **r}) for r in records]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_plot_training_writes_one_png_for_several_runs(tmp_path, capsys):
    a = write_metrics(
        tmp_path / "runs" / "a",
        [{"step": s, "rollout/reward_mean": s / 10, "train/loss": 1.0 / s} for s in (1, 2, 3)]
        + [{"step": 2, "eval/pass@1": 0.5}],
    )
    b = write_metrics(tmp_path / "runs" / "b", [{"step": 1, "train/kl_ref": 0.1}])
    png = tmp_path / "plots" / "curves.png"
    plot_training.main(["--runs", str(a), str(b / "metrics.jsonl"), "--output", str(png)])
    assert png_size(png)[0] > 100
    # Default panels: those of the default metrics some run has, in the default order.
    printed = capsys.readouterr().out.strip()
    assert printed.endswith(
        "(2 run(s): rollout/reward_mean, train/loss, train/kl_ref, eval/pass@1)"
    )


def test_plot_training_series_takes_the_last_record_of_a_step_and_skips_nulls():
    records = [
        {"step": 2, "train/loss": 4.0},
        {"step": 1, "train/loss": 5.0},
        {"step": 2, "train/loss": 3.0},  # a resumed run rewrote step 2
        {"step": 3, "train/loss": None},  # NaN is logged as null
    ]
    assert plot_training.series(records, "train/loss") == ([1, 2], [5.0, 3.0])
    assert plot_training.moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--runs", "nowhere/run"], "error: nowhere/run: no metrics.jsonl there (not a run folder)"),
        (["--runs", "{run}", "--keys", "train/nothing"], "error: --keys: no run logs train/nothing"),
        (["--runs", "{run}", "--output", "x.pdf"], "error: --output must be a .png file, got x.pdf"),
        (["--runs", "{empty}"], "error: {empty}/metrics.jsonl: no records"),
    ],
)  # fmt: skip
def test_plot_training_bad_input_is_one_line_and_exit_2(
    tmp_path, monkeypatch, capsys, args, message
):
    run = write_metrics(tmp_path / "run", [{"step": 1, "train/loss": 1.0}])
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    monkeypatch.chdir(tmp_path)
    subst = {"{run}": str(run), "{empty}": str(empty)}
    argv = [subst.get(a, a) for a in args]
    with pytest.raises(SystemExit) as exit_info:
        plot_training.main(argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == message.replace("{empty}", str(empty))
    assert not list(tmp_path.rglob("*.png"))
