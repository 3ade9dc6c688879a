"""train_sft_lora.py end to end on the tiny model, as a user runs it: LoRA fp32 with validation,
QLoRA 4-bit, TinyLoRA (exactly 32 trained values), exact resume, that SFT learns the toy family,
and two processes matching one with the same global batch."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import train_sft_lora as sft
from coderl import sft_data
from coderl.models import load_tokenizer
from coderl.runlog import read_metrics
from coderl.tasks import load_tasks, write_jsonl
from coderl.training import TaskStream
from tests.helpers import (
    REPO,
    adapter_tensors,
    read_run,
    run_args,
    run_script,
    script_env,
    write_toy_tasks,
)


def base_args(tiny_model_dir, train_file: Path, tmp_path: Path, name: str) -> list[str]:
    return [
        "--model", str(tiny_model_dir),
        "--quantization", "none",
        "--train_file", str(train_file),
        *run_args(tmp_path, name),
        "--learning_rate", "3e-3",
        "--per_device_train_batch_size", "2",
        "--gradient_accumulation_steps", "2",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def small_train_file(toy_data_dir, tmp_path_factory) -> Path:
    """The first 24 toy Python training tasks: enough for a few steps, quick to tokenize."""
    return write_toy_tasks(toy_data_dir, tmp_path_factory.mktemp("sft-data") / "train.jsonl", 24)


# --------------------------------------------------------------------------- end to end


def assert_only_the_adapter_was_trained(output_dir: Path, config: dict) -> dict:
    """Between the first checkpoint and the final adapter exactly the trainable values moved.

    The saved files hold adapter tensors only (the base is never written); TinyLoRA also saves
    its frozen SVD factors and projections, which must not move.
    """
    final = adapter_tensors(output_dir / "final")
    first = adapter_tensors(output_dir / "checkpoint-1")
    assert final.keys() == first.keys()
    moved = sum(t.numel() for k, t in final.items() if not torch.equal(t, first[k]))
    assert moved == config["computed"]["trainable_params"] > 0
    meta = json.loads((output_dir / "final" / "meta.json").read_text())
    assert meta["args"]["computed"]["trainable_params"] == moved
    return final


@pytest.mark.slow
def test_end_to_end_lora_fp32_with_validation(
    tiny_model_dir, toy_data_dir, small_train_file, tmp_path
):
    config_file = tmp_path / "sft.yaml"
    config_file.write_text("max_steps: 3\nsave_every: 1\nkeep_last: 5\n")
    args = [
        *base_args(tiny_model_dir, small_train_file, tmp_path, "fp32"),
        "--config", str(config_file),
        "--eval_file", str(toy_data_dir / "toy_python_test.jsonl"),
        "--eval_every", "2",
        "--eval_tasks", "3",
        "--eval_max_new_tokens", "16",
        "--sandbox_workers", "1",
    ]  # fmt: skip
    proc = run_script("train_sft_lora.py", args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = read_run(tmp_path, "fp32")
    metrics, config = run.metrics, run.config
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert set(m) >= {
            "train/loss",
            "train/lr",
            "train/grad_norm",
            "train/tokens",
            "train/epoch",
        }
        assert math.isfinite(m["train/loss"]) and m["train/lr"] == pytest.approx(
            3e-3 * (4 - m["step"]) / 3
        )
    # 2 x 2 examples per step out of 24: the epoch and token counters move with the data.
    assert [m["train/epoch"] for m in metrics] == pytest.approx([4 / 24, 8 / 24, 12 / 24])
    assert metrics[0]["train/tokens"] < metrics[1]["train/tokens"] < metrics[2]["train/tokens"]
    # Validation at step 2 (eval_every) and at the end.
    assert [m["step"] for m in metrics if "eval/pass@1" in m] == [2, 3]
    assert all(0.0 <= m["eval/pass@1"] <= 1.0 for m in metrics if "eval/pass@1" in m)
    assert config["computed"]["max_steps"] == 3 and config["computed"]["examples"] == 24
    # The first step's examples are the seeded stream's first four: count their tokens by hand.
    tokenizer = load_tokenizer(tiny_model_dir)
    tasks = load_tasks(small_train_file)
    first = [
        sft_data.encode_example(tasks[i], tokenizer, "base") for i in TaskStream(24, 42).take(4)
    ]
    assert metrics[0]["train/tokens"] == sum(ex.num_tokens for ex in first)
    assert metrics[0]["train/loss_tokens"] == sum(len(ex.target_ids) for ex in first)
    assert config["computed"]["model"]["quantization"] == "none"
    assert_only_the_adapter_was_trained(tmp_path / "fp32", config)
    assert (tmp_path / "fp32" / "final" / "adapter_config.json").is_file()


@pytest.mark.slow
def test_end_to_end_qlora_4bit(tiny_model_dir, small_train_file, tmp_path):
    args = [
        *base_args(tiny_model_dir, small_train_file, tmp_path, "q4"),
        "--quantization", "4bit",
        "--max_steps", "2",
        "--save_every", "1",
    ]  # fmt: skip
    proc = run_script("train_sft_lora.py", args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = read_run(tmp_path, "q4")
    metrics, config = run.metrics, run.config
    assert config["computed"]["model"]["quantization"] == "4bit"
    assert all(math.isfinite(m["train/loss"]) for m in metrics) and len(metrics) == 2
    final = assert_only_the_adapter_was_trained(tmp_path / "q4", config)
    assert all("lora_" in k for k in final)


@pytest.mark.slow
def test_end_to_end_tinylora_trains_exactly_32_parameters(
    tiny_model_dir, small_train_file, tmp_path
):
    args = [
        *base_args(tiny_model_dir, small_train_file, tmp_path, "tiny"),
        "--adapter", "tinylora",
        "--tinylora_u", "32",
        "--tinylora_weight_tying", "1.0",
        "--max_steps", "2",
        "--save_every", "1",
        "--learning_rate", "1e-2",
    ]  # fmt: skip
    proc = run_script("train_sft_lora.py", args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = read_run(tmp_path, "tiny").config
    assert config["computed"]["trainable_params"] == 32
    assert config["computed"]["model"]["trainable_params"] == 32
    assert "trainable_params=32" in proc.stderr
    assert_only_the_adapter_was_trained(tmp_path / "tiny", config)


@pytest.mark.slow
def test_resume_continues_exactly_like_an_uninterrupted_run(
    tiny_model_dir, small_train_file, tmp_path
):
    """3 steps, then --resume to 6, against 6 steps in one go: the same batches (epoch, tokens)
    and the same losses, learning rates (warm-up crosses the resume) and gradient norms."""
    common = [
        "--lr_scheduler", "constant",
        "--warmup_steps", "4",
        "--save_every", "3",
        "--lora_dropout", "0.1",  # dropout draws from the RNG, so the restored RNG state matters
    ]  # fmt: skip
    whole = [*base_args(tiny_model_dir, small_train_file, tmp_path, "whole"), *common]
    sft.main([*whole, "--max_steps", "6"])
    parts = [*base_args(tiny_model_dir, small_train_file, tmp_path, "parts"), *common]
    sft.main([*parts, "--max_steps", "3"])
    sft.main([*parts, "--max_steps", "6", "--resume"])

    uninterrupted = read_run(tmp_path, "whole").metrics
    resumed = read_run(tmp_path, "parts").metrics
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5, 6]
    keys = ("train/loss", "train/lr", "train/grad_norm", "train/tokens", "train/epoch")
    for a, b in zip(uninterrupted, resumed):
        for key in keys:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)
    # Warm-up over 4 steps crosses the resume: step 4 runs at 3/4 of the peak (the first at 0).
    assert [m["train/lr"] for m in resumed[2:5]] == pytest.approx([1.5e-3, 2.25e-3, 3e-3])
    a = adapter_tensors(tmp_path / "whole" / "final")
    b = adapter_tensors(tmp_path / "parts" / "final")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)

    # Resuming onto other data would silently change what the rest of the run sees: refused.
    other = tmp_path / "other.jsonl"
    write_jsonl(other, load_tasks(small_train_file)[:20])
    with pytest.raises(SystemExit) as exit_info:
        sft.main([*parts, "--train_file", str(other), "--max_steps", "8", "--resume"])
    assert exit_info.value.code == 2


@pytest.mark.slow
def test_sft_learns_the_toy_family(sft_run):
    metrics = read_metrics(sft_run.run_dir)
    losses = [m["train/loss"] for m in metrics]
    assert len(losses) == 40
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.5 * first, (first, last)
    assert (sft_run.adapter_dir / "adapter_config.json").is_file()


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(
    tiny_model_dir, small_train_file, tmp_path
):
    """DDP on CPU (gloo, 2 processes x batch 2 x accumulation 2) against one process with
    accumulation 4: the same examples per step, the same per-token loss and gradient norm."""
    import subprocess
    import sys

    common = ["--lora_dropout", "0", "--lr_scheduler", "constant", "--max_steps", "2"]
    one = base_args(tiny_model_dir, small_train_file, tmp_path, "one")
    sft.main([*one, *common, "--gradient_accumulation_steps", "4"])
    two = base_args(tiny_model_dir, small_train_file, tmp_path, "two")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
    proc = subprocess.run(
        [*launcher, "2", str(REPO / "train_sft_lora.py"), *two, *common],
        cwd=tmp_path,
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = read_run(tmp_path, "one").metrics
    ddp_run = read_run(tmp_path, "two")
    ddp, config = ddp_run.metrics, ddp_run.config
    assert config["computed"]["num_processes"] == 2
    assert [m["step"] for m in ddp] == [1, 2]
    for a, b in zip(single, ddp):
        for key in ("train/loss", "train/grad_norm", "train/tokens", "train/epoch"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)
