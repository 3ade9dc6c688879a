"""Several processes under ``accelerate launch``: SFT, REINFORCE, PPO and GRPO each run two optimizer
steps as two CPU processes (gloo) and end with the same adapter in both, one that moved; the
replica check behind that claim does see a replica that drifted; the warning for a one-process
``--cpu`` launch; the accelerate config files under ``configs/accelerate/`` load.

Why the runs do not use ``accelerate launch --cpu --num_processes 2``: with ``--cpu`` accelerate
starts ONE process whatever ``--num_processes`` says (it starts several CPU processes only through
MPI, ``--mpirun_hostfile``). ``configs/accelerate/cpu_2proc.yaml``, or ``--multi_gpu
--num_processes 2``, takes its torchrun launcher instead; the scripts pick the CPU and gloo when
no GPU is visible. Both forms are run here, with ``CUDA_VISIBLE_DEVICES=`` and a private
``HF_HOME``, so neither a GPU nor a stray ``~/.cache/huggingface/accelerate/default_config.yaml``
changes what is tested.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")

from coderl.run import warn_if_launched_as_one_cpu_process  # noqa: E402
from coderl.value_model import VALUE_HEAD_FILE  # noqa: E402
from tests.helpers import (  # noqa: E402
    REPO,
    RunLogs,
    adapter_tensors,
    read_run,
    run_args,
    script_env,
    write_toy_tasks,
)

CONFIGS = REPO / "configs" / "accelerate"
CPU_CONFIG = CONFIGS / "cpu_2proc.yaml"
# Variables a launcher or an outer distributed job may have left behind: each would change how
# the launched processes find each other.
LEAKY_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK")


def launch_env(home: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in script_env().items()
        if not k.startswith("ACCELERATE_") and k not in LEAKY_VARIABLES
    }
    env.update(HF_HOME=str(home), CUDA_VISIBLE_DEVICES="")
    return env


def accelerate_launch(launch_args: list[str], script: Path, args: list[str], cwd: Path):
    """``accelerate launch <launch_args> <script> <args>`` with this interpreter's accelerate."""
    command = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch"]
    return subprocess.run(
        [*command, *launch_args, str(script), *args],
        cwd=cwd,
        env=launch_env(cwd / "hf-home"),
        capture_output=True,
        text=True,
        timeout=300,
    )


def replicas_of(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "meta.json").read_text())["replicas"]


def assert_two_identical_replicas(checkpoint: Path) -> None:
    """Both processes took part in the check, agree exactly, and hold what was saved."""
    replicas = replicas_of(checkpoint)
    assert replicas["processes"] == 2
    assert replicas["max_abs_diff"] == 0.0
    first, second = replicas["checksums"]
    assert first == second
    saved = sum(t.double().sum().item() for t in adapter_tensors(checkpoint).values())
    head = checkpoint / VALUE_HEAD_FILE  # PPO's value head is trained (and checked) too
    if head.is_file():
        saved += sum(t.double().sum().item() for t in torch.load(head).values())
    assert second == pytest.approx(saved, rel=1e-9, abs=1e-9)


@dataclass(frozen=True)
class LaunchedRun:
    proc: subprocess.CompletedProcess
    output_dir: Path
    logs: RunLogs


@pytest.fixture(scope="module")
def sft_two_processes(tiny_model_dir, toy_data_dir, tmp_path_factory) -> LaunchedRun:
    """train_sft_lora.py, 2 steps, 2 processes x 2 micro-batches of 1, through cpu_2proc.yaml."""
    root = tmp_path_factory.mktemp("sft-ddp")
    train_file = write_toy_tasks(toy_data_dir, root / "train.jsonl", 24)
    args = [
        "--model", str(tiny_model_dir),
        "--quantization", "none",
        "--train_file", str(train_file),
        *run_args(root, "sft"),
        "--max_steps", "2",
        "--per_device_train_batch_size", "1",
        "--gradient_accumulation_steps", "2",
        "--learning_rate", "3e-3",
        "--lr_scheduler", "constant",
        "--lora_dropout", "0",
        "--save_every", "1",
        "--keep_last", "5",
    ]  # fmt: skip
    proc = accelerate_launch(
        ["--config_file", str(CPU_CONFIG)], REPO / "train_sft_lora.py", args, root
    )
    return LaunchedRun(proc, root / "sft", read_run(root, "sft"))


@pytest.mark.slow
def test_sft_two_processes_train_one_adapter(sft_two_processes):
    run = sft_two_processes
    assert run.proc.returncode == 0, run.proc.stderr[-4000:]
    assert "running as 1 process" not in run.proc.stderr
    assert run.logs.config["computed"]["num_processes"] == 2
    metrics = run.logs.metrics
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(math.isfinite(m["train/loss"]) for m in metrics)
    # A step takes 1 example x 2 micro-batches x 2 processes = 4 of the 24.
    assert [m["train/epoch"] for m in metrics] == pytest.approx([4 / 24, 8 / 24])

    for checkpoint in ("checkpoint-1", "checkpoint-2", "final"):
        assert_two_identical_replicas(run.output_dir / checkpoint)
    final = adapter_tensors(run.output_dir / "final")
    after_one = adapter_tensors(run.output_dir / "checkpoint-1")
    assert final and all("lora_" in k for k in final)
    # A fresh LoRA starts with B = 0; the second step moves A too (B is no longer 0).
    assert all(t.abs().max() > 0 for k, t in final.items() if "lora_B" in k)
    assert all(not torch.equal(t, after_one[k]) for k, t in final.items())


RL_OPTIONS = {
    "reinforce": ["--baseline", "rloo"],
    "ppo": ["--num_minibatches", "2", "--ppo_epochs", "1", "--kl_reference", "init"],
    "grpo": ["--zero_std", "resample", "--max_resample_rounds", "1"],
}


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["reinforce", "ppo", "grpo"])
def test_rl_two_processes_train_one_adapter(
    algorithm, sft_two_processes, tiny_model_dir, toy_data_dir, tmp_path
):
    """Each RL trainer from the SFT adapter, 2 steps, one prompt x 2 samples per process, two
    micro-batches each, through ``--multi_gpu`` flags: --batch_size is the global count, the
    logged samples are both processes', and both end with the same adapter, which moved."""
    assert sft_two_processes.proc.returncode == 0, "the SFT run above failed"
    init = sft_two_processes.output_dir / "final"
    args = [
        "--model", str(tiny_model_dir),
        "--init_adapter", str(init),
        "--quantization", "none",
        "--train_file", str(toy_data_dir / "toy_python_rl.jsonl"),
        *run_args(tmp_path, "rl"),
        "--max_steps", "2",
        "--batch_size", "2",
        "--num_generations", "2",
        "--micro_batch_size", "1",
        "--max_new_tokens", "16",
        "--learning_rate", "1e-2",
        "--length_alpha", "1.0",  # rewards nonzero and unequal even when every sample fails
        "--sandbox_workers", "1",
        "--save_every", "1",
        "--keep_last", "5",
        *RL_OPTIONS[algorithm],
    ]  # fmt: skip
    flags = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    flags += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    script = {"reinforce": "train_rl_lora.py", "ppo": "train_ppo_lora.py"}.get(
        algorithm, "train_grpo_lora.py"
    )
    proc = accelerate_launch(flags, REPO / script, args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]

    logs = read_run(tmp_path, "rl")
    config = logs.config
    assert config["computed"]["num_processes"] == 2
    assert config["computed"]["prompts_per_process"] == 1
    assert [m["step"] for m in logs.metrics] == [1, 2]
    # The logged samples are gathered from both processes: two prompts, two samples each (GRPO's
    # resampling may draw more).
    rows = logs.samples
    for step in (1, 2):
        at_step = [r for r in rows if r["step"] == step]
        assert len(at_step) >= 4 and len({r["task_id"] for r in at_step}) >= 2
        if algorithm != "grpo":  # (GRPO's resampled prompts may hold an empty completion)
            assert all(r["reward"] != 0 for r in at_step)

    for checkpoint in ("checkpoint-1", "checkpoint-2", "final"):
        assert_two_identical_replicas(tmp_path / "rl" / checkpoint)
    start = adapter_tensors(init)
    final = adapter_tensors(tmp_path / "rl" / "final")
    assert final.keys() == start.keys()
    assert all(not torch.equal(t, start[k]) for k, t in final.items())


REPLICA_PROBE = """
import json
import torch
from accelerate import Accelerator
from coderl.run import replica_agreement

accelerator = Accelerator(cpu=True)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
model[1].weight.requires_grad_(False)
wrapped = accelerator.prepare(model)
before = replica_agreement(accelerator, wrapped)
with torch.no_grad():
    if accelerator.process_index == 1:
        model[0].weight[0, 0] += 0.25
        model[1].weight[0, 0] += 100.0  # frozen: not part of the comparison
after = replica_agreement(accelerator, wrapped)
if accelerator.is_main_process:
    print("RESULT " + json.dumps({"before": before, "after": after}))
"""


@pytest.mark.slow
def test_replica_check_sees_a_replica_that_drifted(tmp_path):
    """The check behind ``replicas`` in meta.json reports a difference when there is one: one
    trainable value moved by 0.25 on the second process only."""
    probe = tmp_path / "probe.py"
    probe.write_text(REPLICA_PROBE)
    # Plain torchrun: the launcher is not what is tested here, and it starts faster.
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    proc = subprocess.run(
        [*torchrun, "--nproc_per_node", "2", str(probe)],
        cwd=tmp_path,
        env=launch_env(tmp_path / "hf-home"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    before, after = result["before"], result["after"]
    assert before["processes"] == 2 and before["max_abs_diff"] == 0.0
    assert before["checksums"][0] == before["checksums"][1]
    assert after["max_abs_diff"] == pytest.approx(0.25, abs=1e-6)
    assert after["checksums"][0] == before["checksums"][0]
    assert after["checksums"][1] - after["checksums"][0] == pytest.approx(0.25, abs=1e-6)


def test_replica_check_is_off_without_ddp():
    from accelerate import Accelerator

    from coderl.run import replica_agreement

    assert replica_agreement(Accelerator(cpu=True), torch.nn.Linear(2, 2)) is None


# --------------------------------------------------------------------------- launch guard


@pytest.mark.parametrize(
    "env, processes, warned",
    [
        ({"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1"}, 1, True),
        ({"ACCELERATE_USE_CPU": "True"}, 1, False),  # `accelerate launch --cpu`, one asked for
        ({"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1"}, 2, False),
        ({"MASTER_ADDR": "127.0.0.1"}, 1, False),
    ],
)
def test_one_process_from_accelerate_cpu_launch_is_named(
    monkeypatch, capsys, env, processes, warned
):
    for name in ("ACCELERATE_USE_CPU", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    warn_if_launched_as_one_cpu_process(types.SimpleNamespace(num_processes=processes))
    err = capsys.readouterr().err
    assert ("running as 1 process" in err) == warned
    if warned:
        assert "configs/accelerate/cpu_2proc.yaml" in err and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------- config files


@pytest.mark.parametrize(
    "name, distributed_type",
    [
        ("cpu_2proc.yaml", "MULTI_GPU"),
        ("multi_gpu.yaml", "MULTI_GPU"),
        ("fsdp.yaml", "FSDP"),
        ("deepspeed_zero3.yaml", "DEEPSPEED"),
    ],
)
def test_config_file_loads_with_accelerate(name, distributed_type):
    from accelerate.commands.config.config_args import load_config_from_file

    path = CONFIGS / name
    config = load_config_from_file(str(path))  # unknown keys or a bad value raise here
    assert config.distributed_type == distributed_type
    assert (config.num_machines, config.num_processes, config.machine_rank) == (1, 2, 0)
    assert config.mixed_precision == "no"
    text = path.read_text()
    assert text.startswith("# ")  # the header says when to use it
    assert f"accelerate launch --config_file configs/accelerate/{name}" in text


def test_fsdp_config_shards_fully_and_keeps_original_parameters():
    from accelerate.commands.config.config_args import load_config_from_file

    fsdp = load_config_from_file(str(CONFIGS / "fsdp.yaml")).fsdp_config
    assert fsdp["fsdp_version"] == 1
    assert fsdp["fsdp_sharding_strategy"] == "FULL_SHARD"
    # LoRA leaves most of each wrapped layer frozen: FSDP v1 needs the original parameters then.
    assert fsdp["fsdp_use_orig_params"] is True
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"


def test_deepspeed_config_is_zero_stage_3():
    from accelerate.commands.config.config_args import load_config_from_file

    deepspeed = load_config_from_file(str(CONFIGS / "deepspeed_zero3.yaml")).deepspeed_config
    assert deepspeed["zero_stage"] == 3
    assert deepspeed["zero3_save_16bit_model"] is True
