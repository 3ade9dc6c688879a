"""train_grpo_lora.py as a user runs it: its options and one-line errors, then end to end on the
toy families (Python and C++) with the tiny model: checkpoints and evaluation, the reward rising,
resume, resampling of flat groups, TinyLoRA, and the drop / KL / several-iterations branches."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

# Fixtures tiny_model_dir, toy_data_dir and sft_adapter_dir come from conftest (its plugin).
from tests.helpers import REPO, run_args, run_script, script_env

SCRIPT = REPO / "train_grpo_lora.py"


# --------------------------------------------------------------------------- scripts end to end


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_steps(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run_dir) if "train/loss" in r}


def grpo_args(out: Path, name: str, train_file: Path, *extra: str) -> list[str]:
    return [
        "--train_file", str(train_file),
        *run_args(out, name),
        "--quantization", "none",
        "--sandbox_workers", "2",
        "--seed", "3",
        *extra,
    ]  # fmt: skip


def check_ran(proc) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_help_lists_every_algorithm_option(capsys):
    import train_grpo_lora

    with pytest.raises(SystemExit) as exit_info:
        train_grpo_lora.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--scale_rewards", "--loss_type", "--epsilon_high", "--num_iterations", "--beta",
                 "--zero_std", "--max_resample_rounds", "--mask_truncated", "--overlong_penalty",
                 "--adapter", "--reward", "--prompt_mode", "--merge_for_generation", "--config"):  # fmt: skip
        assert flag in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--epsilon", "1.5"], "--epsilon must be in (0, 1), got 1.5"),
        (["--num_generations", "1"], "--num_generations must be in [2, inf), got 1"),
        (["--overlong_penalty", "--overlong_buffer", "0"], "--overlong_buffer must be in"),
        (["--adapter", "qlora", "--quantization", "none"], "--adapter qlora needs a 4-bit base"),
        (["--temperature", "0"], "--temperature must be in (0, inf), got 0.0"),
        (["--no_such_flag", "1"], "unknown option(s): --no_such_flag"),
        (["--init_adapter", "/nonexistent"], "no adapter_config.json"),
        (["--train_file", "/nonexistent.jsonl", "--report_to", "none"], "file not found"),
    ],
)
def test_bad_values_are_one_line_errors_with_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    import train_grpo_lora

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        train_grpo_lora.main(["--output_dir", str(tmp_path / "o"), *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


# The runs below share one budget: the SFT'd tiny model samples at temperature 0.6 (its greedy
# output is one repeated line, at 1.0 nearly everything is a syntax error), and the shaped reward
# (-0.5 error, +0.2 runs but fails, +1 pass, + style bonuses) gives its groups unequal rewards.
SHAPED = ["--reward", "shaped", "--temperature", "0.6", "--batch_size", "8",
          "--num_generations", "4", "--max_new_tokens", "32"]  # fmt: skip


def test_ratio_stays_one_until_the_weights_move_with_a_dropout_adapter(
    tiny_model_dir, sft_adapter_dir, toy_data_dir, tmp_path, capsys
):
    """An --init_adapter keeps its own LoRA dropout (here 0.5). Two updates per rollout at a
    learning rate too small to move anything: the second pass must see rho = 1 exactly, so no
    token is clipped. With dropout on in the update, its noise alone clipped most tokens."""
    import train_grpo_lora

    adapter = tmp_path / "dropout-adapter"
    shutil.copytree(sft_adapter_dir, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "lora_dropout": 0.5}))
    train_grpo_lora.main(grpo_args(
        tmp_path, "dropout", toy_data_dir / "toy_python_train.jsonl", "--model", tiny_model_dir,
        "--init_adapter", str(adapter), *SHAPED, "--num_iterations", "2", "--max_steps", "1",
        "--learning_rate", "1e-12", "--epsilon", "0.05", "--warmup_steps", "0",
    ))  # fmt: skip
    assert "dropout modules disabled: " in capsys.readouterr().err
    [step] = train_steps(tmp_path / "runs" / "dropout").values()
    assert step["train/loss_sequences"] > 0
    assert step["train/clip_ratio_low"] == step["train/clip_ratio_high"] == 0.0


def start_script(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), *args],
        cwd=cwd,
        env=script_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def merged_sft_model(sft_adapter_dir: Path, out: Path) -> Path:
    """The SFT adapter folded into its base and saved as a plain model (a base for TinyLoRA)."""
    from coderl.models import load_model

    model, tokenizer = load_model(str(sft_adapter_dir))
    model.merge_and_unload().save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, sft_adapter_dir, toy_data_dir):
    """Three runs started together (the machine's cores overlap their start-up):

    * ``python``: 8 GRPO steps from the SFT adapter on toy Python, checkpoint at 6, validation;
    * ``cpp``: the random tiny model on toy C++, zero_std=resample (every group is flat);
    * ``tinylora``: 2 steps of TinyLoRA (u=32) on the SFT model merged into its base, with
      zero_std=drop, two updates per rollout, KL to the reference, dapo, clip-higher and the
      overlong penalty.
    """
    out = tmp_path_factory.mktemp("grpo-runs")
    py_train, py_test = (
        toy_data_dir / "toy_python_train.jsonl",
        toy_data_dir / "toy_python_test.jsonl",
    )
    merged = merged_sft_model(sft_adapter_dir, out / "merged-sft")
    commands = {
        "python": grpo_args(
            out, "python", py_train, "--model", tiny_model_dir, "--init_adapter",
            str(sft_adapter_dir), *SHAPED, "--learning_rate", "5e-3", "--max_steps", "8",
            "--save_every", "6", "--keep_last", "3", "--eval_file", str(py_test),
            "--eval_tasks", "8", "--eval_max_new_tokens", "32", "--eval_at_start",
        ),
        "cpp": grpo_args(
            out, "cpp", toy_data_dir / "toy_cpp_train.jsonl", "--model", tiny_model_dir,
            "--max_steps", "1", "--batch_size", "2", "--num_generations", "2",
            "--max_new_tokens", "12", "--zero_std", "resample", "--max_resample_rounds", "1",
            "--eval_file", str(toy_data_dir / "toy_cpp_test.jsonl"), "--eval_tasks", "2",
            "--eval_max_new_tokens", "12",
        ),
        "tinylora": grpo_args(
            out, "tinylora", py_train, "--model", str(merged), "--adapter", "tinylora",
            "--tinylora_u", "32", *SHAPED, "--learning_rate", "0.05", "--max_steps", "2",
            "--save_every", "1", "--keep_last", "5",
            # the other branches of the algorithm, end to end
            "--zero_std", "drop", "--num_iterations", "2", "--beta", "0.05", "--loss_type",
            "dapo", "--epsilon_high", "0.28", "--overlong_penalty", "--overlong_buffer", "8",
        ),
    }  # fmt: skip
    procs = {name: start_script(args, out) for name, args in commands.items()}
    done = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        done[name] = SimpleNamespace(returncode=proc.returncode, stdout=stdout, stderr=stderr)
    return SimpleNamespace(out=out, commands=commands, **done)


def test_python_end_to_end(runs):
    check_ran(runs.python)
    steps = train_steps(runs.out / "runs" / "python")
    assert sorted(steps) == list(range(1, 9))
    for rec in steps.values():
        assert 0 <= rec["rollout/frac_reward_zero_std"] <= 1
        assert rec["rollout/frac_dropped"] == 0  # zero_std=keep
        # keep: every scored, non-empty completion of the 8 x 4 is in the loss
        assert rec["train/loss_sequences"] <= 32 and rec["train/trainable_params"] > 0
        assert rec["train/forward_sequences"] <= rec["train/loss_sequences"]
        assert rec["train/clip_ratio_low"] == 0 and rec["train/clip_ratio_high"] == 0  # mu = 1
        assert "train/kl" not in rec  # beta = 0: no reference pass
    samples = (runs.out / "runs" / "python" / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 8 * 32
    out = runs.out / "python"
    assert (out / "checkpoint-6").is_dir() and (out / "checkpoint-8").is_dir()
    assert (out / "final" / "adapter_config.json").is_file()
    final = json.loads((out / "final_eval.json").read_text())
    for key in ("eval/pass@1", "eval/avg_score"):
        assert 0 <= final["after"][key] <= 1 and 0 <= final["before"][key] <= 1
    assert "| Pass@1 |" in runs.python.stdout and "| Average Score |" in runs.python.stdout


def test_grpo_raises_the_training_reward(runs):
    """Fixed seed and budget: the SFT'd model's mean shaped reward over its first two steps
    against its last three (measured: about -0.2 -> +0.3, mostly by writing code that runs)."""
    check_ran(runs.python)
    rewards = [
        rec["rollout/reward_mean"]
        for _, rec in sorted(train_steps(runs.out / "runs" / "python").items())
    ]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:2]) / 2 + 0.2, rewards


def test_resume_matches_an_uninterrupted_run(runs):
    """Checkpoint 6 of the 8-step run, resumed to 8, gives steps 7-8 equal to the run itself."""
    import shutil

    check_ran(runs.python)
    resumed = runs.out / "resumed"
    shutil.copytree(runs.out / "python" / "checkpoint-6", resumed / "checkpoint-6")
    args = [a for a in runs.commands["python"]]
    args[args.index("--output_dir") + 1] = str(resumed)
    args[args.index("--run_name") + 1] = "resumed"
    args.remove("--eval_at_start")
    proc = run_script("train_grpo_lora.py", [*args, "--resume"], cwd=runs.out)
    check_ran(proc)
    full = train_steps(runs.out / "runs" / "python")
    again = train_steps(runs.out / "runs" / "resumed")
    assert sorted(again) == [7, 8]
    for step in (7, 8):
        for key in ("rollout/reward_mean", "train/loss", "train/grad_norm", "train/epoch",
                    "rollout/completion_tokens"):  # fmt: skip
            assert again[step][key] == pytest.approx(full[step][key], rel=1e-5, abs=1e-7), key


def test_cpp_end_to_end_with_resampling(runs):
    """Random tiny model on C++: every program fails to compile, every group is flat, the
    resample round is spent and the whole batch is dropped, and that is what is logged."""
    check_ran(runs.cpp)
    config = json.loads((runs.out / "runs" / "cpp" / "config.json").read_text())
    assert config["computed"]["reward"] == "partial"  # auto, for stdin/stdout tasks
    (rec,) = train_steps(runs.out / "runs" / "cpp").values()
    assert rec["rollout/compile_rate"] == 0 and rec["rollout/reward_mean"] == 0
    assert rec["rollout/frac_reward_zero_std"] == 1 and rec["rollout/resample_rounds"] == 1
    assert rec["rollout/frac_dropped"] == 1 and rec["train/loss_sequences"] == 0
    samples = (runs.out / "runs" / "cpp" / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 2 * 2 * 2  # the first draw and one resample round, all logged
    final = json.loads((runs.out / "cpp" / "final_eval.json").read_text())["after"]
    assert final["eval/compile_rate"] == 0 and final["eval/avg_score"] == 0
    assert "| Compile Rate | 0.00% |" in runs.cpp.stdout


def test_tinylora_trains_exactly_u_parameters(runs):
    """32 trainable float32 scalars; between two checkpoints they, and nothing else, change."""
    from safetensors.torch import load_file

    check_ran(runs.tinylora)
    steps = train_steps(runs.out / "runs" / "tinylora")
    assert all(rec["train/trainable_params"] == 32 for rec in steps.values())
    assert steps[1]["train/forward_sequences"] > 0  # a gradient to follow
    first = load_file(runs.out / "tinylora" / "checkpoint-1" / "adapter_model.safetensors")
    second = load_file(runs.out / "tinylora" / "checkpoint-2" / "adapter_model.safetensors")
    assert first.keys() == second.keys()
    changed = [k for k in first if not torch.equal(first[k], second[k])]
    assert len(changed) == 1 and "tinylora_v" in changed[0]
    assert first[changed[0]].numel() == 32 and first[changed[0]].dtype == torch.float32


def test_value_outside_the_choices_exits_2_naming_the_option(capsys, tmp_path):
    import train_grpo_lora

    with pytest.raises(SystemExit) as exit_info:
        train_grpo_lora.main(["--output_dir", str(tmp_path), "--loss_type", "ppo"])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--loss_type" in last and "invalid choice" in last


def test_drop_kl_and_several_iterations_end_to_end(runs):
    """The tinylora run: dropped groups are out of the loss, the KL to the reference (the base,
    adapter off) is logged and positive, and the second update of a rollout sees rho != 1."""
    check_ran(runs.tinylora)
    steps = train_steps(runs.out / "runs" / "tinylora")
    for rec in steps.values():
        assert rec["rollout/frac_dropped"] == rec["rollout/frac_reward_zero_std"]
        kept_groups = round(8 * (1 - rec["rollout/frac_dropped"]))
        assert rec["train/loss_sequences"] <= 4 * kept_groups
        assert rec["train/forward_sequences"] == rec["train/loss_sequences"]  # beta > 0: all run
        assert rec["train/kl"] > 0
    config = json.loads((runs.out / "runs" / "tinylora" / "config.json").read_text())
    assert config["computed"]["epsilon_high"] == 0.28
    rows = [json.loads(x) for x in (runs.out / "runs" / "tinylora" / "samples.jsonl").open()]
    assert len(rows) == 2 * 32  # dropped groups are logged too, without an advantage
    for step, rec in steps.items():
        unscored = [r for r in rows if r["step"] == step and r["advantage"] is None]
        assert len(unscored) == round(32 * rec["rollout/frac_dropped"])
