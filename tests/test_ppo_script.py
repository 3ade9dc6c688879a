"""PPO's script (train_ppo_lora.py) as a user runs it: its options and one-line errors, then
two-step runs end to end on the tiny model (both variants, fp32 LoRA, 4-bit LoRA, TinyLoRA), resume
equal to an uninterrupted run, and a learning check from the SFT adapter."""

from __future__ import annotations

import dataclasses
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import train_ppo_lora as ppo
from coderl.models import load_model
from coderl.rewards import RewardArgs
from coderl.value_model import VALUE_HEAD_FILE
from tests.helpers import PPO_SEQUENCE as SEQUENCE
from tests.helpers import PPO_TOKEN as TOKEN
from tests.helpers import adapter_tensors, read_run, run_args, run_script, write_toy_tasks

# Fixtures toy_data_dir, sft_run and sft_adapter_dir come from conftest (its plugin): one
# session-wide SFT run shared with the other modules.

# --------------------------------------------------------------------------- the script


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        ppo.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for args_type in (ppo.RLModelArgs, ppo.PPOTrainArgs, ppo.RolloutArgs, ppo.PPOArgs, RewardArgs):
        for f in dataclasses.fields(args_type):
            assert f"--{f.name}" in out, f.name
            assert f.metadata.get("help"), f"--{f.name} has no help"


def test_bad_value_as_a_user_sees_it(tmp_path):
    """One subprocess, exactly as a user runs it: one line on stderr, exit status 2."""
    args = ["--output_dir", str(tmp_path / "o"), "--ppo_epochs", "0"]
    proc = run_script("train_ppo_lora.py", args, tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --ppo_epochs must be in [1, inf), got 0"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--num_minibatches", "9", "--batch_size", "2"], "--num_minibatches must be between"),
        (["--gamma", "1.5"], "--gamma must be in [0, 1], got 1.5"),
        (["--temperature", "0"], "--temperature must be in (0, inf), got 0.0"),
        (["--kl_coef", "-1"], "--kl_coef must be in [0, inf), got -1.0"),
        (["--max_steps", "0"], "--max_steps must be in [1, inf), got 0"),
    ],
)
def test_bad_values_give_one_error_line_and_exit_2(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        ppo.main(["--output_dir", str(tmp_path / "o"), *flags])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), lines
    assert not (tmp_path / "o").exists()


def test_unknown_variant_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_info:
        ppo.main(["--output_dir", "x", "--variant", "grpo"])
    assert exit_info.value.code == 2
    assert "--variant" in capsys.readouterr().err


# --------------------------------------------------------------------------- end to end

REQUIRED_METRICS = (
    "rollout/reward_mean",
    "rollout/pass_rate",
    "rollout/completion_tokens",
    "train/policy_loss",
    "train/entropy",
    "train/kl_ref",
    "train/approx_kl",
    "train/clip_frac",
    "train/grad_norm",
    "train/lr",
    "time/generate",
    "time/score",
    "time/update",
)
TOKEN_METRICS = ("train/value_loss", "train/explained_variance")


@dataclass(frozen=True)
class Inputs:
    root: Path
    train_file: Path
    model: Path  # the SFT fixture merged into the tiny base: produces code-like text


@pytest.fixture(scope="module")
def inputs(sft_adapter_dir, toy_data_dir, tmp_path_factory) -> Inputs:
    root = tmp_path_factory.mktemp("ppo")
    train_file = write_toy_tasks(toy_data_dir, root / "train.jsonl", 24)
    model, tokenizer = load_model(str(sft_adapter_dir), quantization="none", dtype="float32")
    merged = root / "sft-merged"
    model.merge_and_unload().save_pretrained(str(merged))
    tokenizer.save_pretrained(str(merged))
    return Inputs(root, train_file, merged)


def script_args(inputs: Inputs, name: str, variant: str, *extra: str) -> list[str]:
    """Two small PPO iterations. Reward = -tokens/100 (length penalty only) so that rewards
    differ between samples even when none passes: the sequence variant then has a gradient."""
    return [
        "--model", str(inputs.model),
        "--train_file", str(inputs.train_file),
        *run_args(inputs.root, name),
        "--variant", variant,
        "--max_steps", "2",
        "--batch_size", "3",
        "--num_generations", "2",
        "--max_new_tokens", "24",
        "--temperature", "0.6",
        "--reward", "unit_test",
        "--length_alpha", "1.0",
        "--ppo_epochs", "2",
        "--num_minibatches", "2",
        "--learning_rate", "1e-3",
        "--sandbox_workers", "1",
        "--save_every", "1",
        "--keep_last", "5",
        *extra,
    ]  # fmt: skip


def run_ppo(inputs: Inputs, name: str, variant: str, *extra: str) -> Path:
    proc = run_script("train_ppo_lora.py", script_args(inputs, name, variant, *extra), inputs.root)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return inputs.root / name


def check_two_step_run(inputs: Inputs, name: str, variant: str, adapter_params: int | None):
    out = inputs.root / name
    run = read_run(inputs.root, name)
    records = run.metrics
    assert [r["step"] for r in records] == [1, 2]
    expected = REQUIRED_METRICS + (TOKEN_METRICS if variant == TOKEN else ())
    for record in records:
        missing = [k for k in expected if k not in record]
        assert not missing, missing
        assert record["rollout/reward_std"] > 0, "equal rewards: nothing to learn from"
        # Old log-probs were recomputed in the update's mode: ratio 1 at the first minibatch.
        assert record["train/ratio_dev_first"] < 1e-4
        assert record["train/updates"] == 4
    samples = run.samples
    assert [s["step"] for s in samples] == [1] * 6 + [2] * 6
    assert all({"reward", "status", "completion", "task_id"} <= s.keys() for s in samples)

    first, second = adapter_tensors(out / "checkpoint-1"), adapter_tensors(out / "checkpoint-2")
    assert first.keys() == second.keys()
    assert all("lora" in key for key in first)  # only adapter tensors: the base is not saved
    assert any(not torch.equal(first[k], second[k]) for k in first)
    assert adapter_tensors(out / "final").keys() == first.keys()
    meta = json.loads((out / "final" / "meta.json").read_text())
    computed = meta["args"]["computed"]
    if adapter_params is not None:
        assert computed["trainable_params_adapter"] == adapter_params
    if variant == TOKEN:
        heads = [torch.load(out / c / VALUE_HEAD_FILE) for c in ("checkpoint-1", "checkpoint-2")]
        assert not torch.equal(heads[0]["linear.weight"], heads[1]["linear.weight"])
        assert (out / "final" / VALUE_HEAD_FILE).is_file()
        hidden = json.loads((inputs.model / "config.json").read_text())["hidden_size"]
        assert computed["trainable_params_value_head"] == hidden + 1
    else:
        assert not (out / "checkpoint-2" / VALUE_HEAD_FILE).exists()
        assert computed["trainable_params_value_head"] == 0


ADAPTERS = {
    "lora-fp32": ((), None),
    "lora-4bit": (("--quantization", "4bit"), None),
    "tinylora": (("--adapter", "tinylora"), 32),  # the 32 shared scalars, value head apart
}


def resume_chain(inputs: Inputs) -> None:
    """2 steps, then --resume to 4 (keeping a copy of the 2-step state), and 4 steps straight.
    --kl_reference init: the frozen starting adapter must come back from the checkpoint too."""
    run_ppo(inputs, "interrupted", TOKEN, "--kl_reference", "init")
    shutil.copytree(inputs.root / "interrupted", inputs.root / "two-steps")
    shutil.copytree(inputs.root / "runs" / "interrupted", inputs.root / "runs" / "two-steps")
    run_ppo(inputs, "interrupted", TOKEN, "--kl_reference", "init", "--resume", "--max_steps", "4")
    run_ppo(inputs, "straight", TOKEN, "--kl_reference", "init", "--max_steps", "4")


@pytest.fixture(scope="module")
def script_runs(inputs) -> dict[tuple[str, str], str]:
    """Every subprocess run of this file, two at a time: (variant, adapter) -> run name.

    The fp32 LoRA token case is the resume test's interrupted run as it was after 2 steps."""
    names = {(TOKEN, "lora-fp32"): "two-steps"}
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(resume_chain, inputs)]
        for variant in (TOKEN, SEQUENCE):
            for adapter, (flags, _) in ADAPTERS.items():
                if (variant, adapter) not in names:
                    names[variant, adapter] = f"e2e-{variant}-{adapter}"
                    futures.append(
                        pool.submit(run_ppo, inputs, names[variant, adapter], variant, *flags)
                    )
        for future in futures:
            future.result()
    return names


@pytest.mark.slow
@pytest.mark.parametrize("variant", [TOKEN, SEQUENCE])
@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_two_steps_end_to_end(inputs, script_runs, variant, adapter):
    check_two_step_run(inputs, script_runs[variant, adapter], variant, ADAPTERS[adapter][1])


@pytest.mark.slow
def test_resume_equals_an_uninterrupted_run(inputs, script_runs):
    names = ("interrupted", "straight")
    resumed, straight = (inputs.root / name for name in names)
    runs = [read_run(inputs.root, name) for name in names]
    by_step = [{r["step"]: r for r in run.metrics} for run in runs]
    for step in (3, 4):
        a, b = by_step[0][step], by_step[1][step]
        for key in REQUIRED_METRICS + TOKEN_METRICS:
            if key.startswith("time/"):
                continue
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (step, key)
    samples = [
        [
            (s["step"], s["task_id"], s["completion"], s["reward"])
            for s in run.samples
            if s["step"] >= 3
        ]
        for run in runs
    ]
    assert samples[0] == samples[1] and len(samples[0]) == 12
    state = [
        torch.load(d / "checkpoint-4" / "trainer_state.pt", weights_only=False)
        for d in (resumed, straight)
    ]
    assert state[0]["data_position"] == state[1]["data_position"] == 4 * 3
    a, b = (adapter_tensors(d / "final") for d in (resumed, straight))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)
    heads = [torch.load(d / "final" / VALUE_HEAD_FILE) for d in (resumed, straight)]
    for key in heads[0]:
        torch.testing.assert_close(heads[0][key], heads[1][key], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_ppo_raises_the_training_reward_from_the_sft_adapter(
    tiny_model_dir, sft_adapter_dir, toy_data_dir, tmp_path
):
    """From the SFT fixture (it writes Python-looking lines but no correct program yet) with the
    ``partial`` reward (0 syntax error, 0.5 runs but fails, 1 passes): PPO must make more of its
    samples run. The KL penalty is off because the reference is the random-init base the SFT
    adapter sits on (a KL of ~150 nats per completion, meaningless here). Fixed seed, fixed budget.
    """
    train_file = write_toy_tasks(toy_data_dir, tmp_path / "train.jsonl", 32)
    ppo.main(
        [
            "--model", str(tiny_model_dir),
            "--init_adapter", str(sft_adapter_dir),
            "--train_file", str(train_file),
            "--output_dir", str(tmp_path / "out"),
            "--logging_dir", str(tmp_path / "runs"),
            "--run_name", "learn",
            "--report_to", "none",
            "--max_steps", "6",
            "--batch_size", "8",
            "--num_generations", "4",
            "--max_new_tokens", "32",
            "--temperature", "0.6",
            "--reward", "partial",
            "--kl_coef", "0",
            "--ent_coef", "0",
            "--learning_rate", "1e-3",
            "--sandbox_workers", "1",
            "--save_every", "100",
        ]
    )  # fmt: skip
    records = read_run(tmp_path, "learn").metrics
    rewards = [r["rollout/reward_mean"] for r in records]
    assert len(rewards) == 6
    start, later = sum(rewards[:2]) / 2, sum(rewards[3:]) / 3
    assert later > start + 0.1, rewards
    # The value head learns: a head that stays at its zero init explains exactly 0 of the
    # returns' variance (None: returns all equal; one batch can be far below 0 when they vary
    # little, so the best step is checked).
    explained = [r["train/explained_variance"] for r in records[1:]]
    assert max(e for e in explained if e is not None) > 0.1, explained
