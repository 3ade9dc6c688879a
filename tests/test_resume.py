"""Resume that loses nothing and doubles nothing, for all four trainers, on the tiny model.

Runs are real subprocesses killed with SIGKILL: at named points (``CODERL_FAILPOINT``, see
coderl/checkpoint.py) and at a random moment. After ``--resume``, the final adapter (and PPO's
value head) must equal the uninterrupted run's bit for bit, and ``metrics.jsonl`` /
``samples.jsonl`` must hold the uninterrupted run's rows, each step once. Damaged checkpoints,
leftovers of a killed prune or export, and settings changed on resume are checked on REINFORCE
(the plumbing is shared) and PPO (its value head and variant).
"""

from __future__ import annotations

import importlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from coderl.checkpoint import (
    checkpoint_problem,
    clean_leftovers,
    list_checkpoints,
    resumable_checkpoint,
    save_checkpoint,
)
from coderl.errors import UserError
from coderl.run import FIXED_ON_RESUME, check_resume_settings, parse_allow_changed
from coderl.runlog import cut_logs
from coderl.tasks import load_tasks, write_jsonl
from tests.helpers import REPO, run_args, script_env

# Fixtures tiny_model_dir, toy_data_dir and sft_adapter_dir come from conftest (its plugin).

TRAINERS = ("sft", "reinforce", "ppo", "grpo")
SCRIPTS = {
    "sft": "train_sft_lora.py",
    "reinforce": "train_rl_lora.py",
    "ppo": "train_ppo_lora.py",
    "grpo": "train_grpo_lora.py",
}
# Where the killed runs die: after step 3 is logged (its samples too, for the RL trainers), with
# checkpoint-2 on disk, so a resume has a logged step to cut away and run again.
KILL_AT = {"sft": "logged:3", "reinforce": "samples:3", "ppo": "samples:3", "grpo": "samples:3"}


def trainer_args(kind: str, tiny_model_dir: str, files: SimpleNamespace, root: Path, name: str):
    common = [
        "--model", str(tiny_model_dir),
        "--quantization", "none",
        *run_args(root, name),
        "--max_steps", "4",
        "--save_every", "2",
        "--seed", "5",
    ]  # fmt: skip
    rl = ["--train_file", str(files.rl), "--sandbox_workers", "1"]
    extra = {
        # LoRA dropout draws from the RNG on every step: a resume must restore it exactly.
        "sft": [
            "--train_file", str(files.sft), "--per_device_train_batch_size", "4",
            "--gradient_accumulation_steps", "1", "--learning_rate", "1e-3",
            "--lr_scheduler", "constant", "--lora_dropout", "0.1",
        ],
        "reinforce": [
            *rl, "--max_new_tokens", "8", "--batch_size", "2", "--num_generations", "2",
            "--learning_rate", "1e-2",
            "--length_alpha", "1.0", "--lora_dropout", "0.1",
        ],
        "ppo": [
            *rl, "--max_new_tokens", "8", "--variant", "token", "--batch_size", "2",
            "--num_generations", "2",
            "--reward", "unit_test", "--length_alpha", "1.0", "--ppo_epochs", "2",
            "--num_minibatches", "2", "--learning_rate", "1e-3",
        ],
        # From the SFT adapter: the random model's groups all score alike and GRPO would not move.
        "grpo": [
            *rl, "--init_adapter", str(files.sft_adapter), "--batch_size", "2",
            "--num_generations", "4", "--max_new_tokens", "24", "--learning_rate", "5e-3",
            "--reward", "shaped", "--temperature", "0.8",
        ],
    }[kind]  # fmt: skip
    return [sys.executable, str(REPO / SCRIPTS[kind]), *common, *extra]


def start(command: list[str], cwd: Path, failpoint: str | None = None) -> subprocess.Popen:
    env = script_env()
    env.pop("CODERL_FAILPOINT", None)
    if failpoint:
        env["CODERL_FAILPOINT"] = failpoint
    return subprocess.Popen(
        command,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # one process group: a kill takes the sandbox workers too
    )


def finish(proc: subprocess.Popen, timeout: float = 600) -> SimpleNamespace:
    stdout, stderr = proc.communicate(timeout=timeout)
    return SimpleNamespace(returncode=proc.returncode, stdout=stdout, stderr=stderr)


def run(command, cwd, failpoint=None) -> SimpleNamespace:
    return finish(start(command, cwd, failpoint))


def with_option(command: list[str], option: str, value: str) -> list[str]:
    out = list(command)
    out[out.index(option) + 1] = value
    return out


def renamed(command: list[str], root: Path, name: str) -> list[str]:
    out = with_option(command, "--output_dir", str(root / name))
    return with_option(out, "--run_name", name)


def check(proc: SimpleNamespace, returncode: int = 0) -> None:
    assert proc.returncode == returncode, proc.stderr[-4000:]


def rows(run_dir: Path, name: str) -> list[dict]:
    """A log's rows without what differs between two runs of the same steps: wall times."""
    path = run_dir / name
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        out.append(
            {
                k: v
                for k, v in rec.items()
                if k != "time"
                and not k.startswith("time/")
                and "seconds" not in k
                and "per_second" not in k
            }
        )
    return out


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out = dict(load_file(str(folder / "adapter_model.safetensors")))
    head = folder / "value_head.pt"
    if head.is_file():
        out.update({f"value_head.{k}": v for k, v in torch.load(head).items()})
    return out


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def files(toy_data_dir, sft_adapter_dir, tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("resume-data")
    write_jsonl(root / "rl.jsonl", load_tasks(toy_data_dir / "toy_python_train.jsonl")[:8])
    write_jsonl(root / "other.jsonl", load_tasks(toy_data_dir / "toy_python_train.jsonl")[8:16])
    return SimpleNamespace(
        sft=toy_data_dir / "toy_python_train.jsonl",
        rl=root / "rl.jsonl",
        other=root / "other.jsonl",
        sft_adapter=sft_adapter_dir,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, files) -> SimpleNamespace:
    """Per trainer: ``whole`` (4 steps in one go) and ``parts`` (killed right after step 3 was
    logged, then ``--resume``d to the end). All eight first runs share the cores, then the four
    resumes do."""
    root = tmp_path_factory.mktemp("resume-runs")
    commands = {kind: trainer_args(kind, tiny_model_dir, files, root, kind) for kind in TRAINERS}
    whole = {k: start(renamed(c, root, f"{k}-whole"), root) for k, c in commands.items()}
    killed = {
        k: start(renamed(c, root, f"{k}-parts"), root, failpoint=KILL_AT[k])
        for k, c in commands.items()
    }
    out = SimpleNamespace(root=root, commands=commands, whole={}, killed={}, resumed={}, left={})
    for kind in TRAINERS:
        out.whole[kind] = finish(whole[kind])
        out.killed[kind] = finish(killed[kind])
        parts = root / f"{kind}-parts"
        out.left[kind] = {
            "folders": sorted(p.name for p in parts.iterdir()) if parts.is_dir() else [],
            "metrics": [r["step"] for r in rows(root / "runs" / f"{kind}-parts", "metrics.jsonl")],
            "samples": sorted(
                {r["step"] for r in rows(root / "runs" / f"{kind}-parts", "samples.jsonl")}
            ),
        }
    resumed = {
        k: start([*renamed(c, root, f"{k}-parts"), "--resume"], root) for k, c in commands.items()
    }
    for kind in TRAINERS:
        out.resumed[kind] = finish(resumed[kind])
    return out


@pytest.mark.parametrize("kind", TRAINERS)
def test_killed_run_resumes_to_the_uninterrupted_result(runs, kind):
    check(runs.whole[kind])
    check(runs.killed[kind], -signal.SIGKILL)
    left = runs.left[kind]
    assert left["folders"] == ["checkpoint-2"]  # killed before checkpoint-4
    assert left["metrics"] == [1, 2, 3]  # step 3 was logged after the last checkpoint
    if kind != "sft":
        assert left["samples"] == [1, 2, 3]
    check(runs.resumed[kind])
    assert "resumed from" in runs.resumed[kind].stderr
    whole, parts = runs.root / f"{kind}-whole", runs.root / f"{kind}-parts"
    assert_bitwise_equal(weights(whole / "final"), weights(parts / "final"))
    moved = weights(whole / "checkpoint-2")
    assert any(not torch.equal(moved[k], v) for k, v in weights(whole / "final").items())
    for log in ("metrics.jsonl", "samples.jsonl"):
        a = rows(runs.root / "runs" / f"{kind}-whole", log)
        b = rows(runs.root / "runs" / f"{kind}-parts", log)
        assert b == a, log
    if kind != "sft":
        assert rows(runs.root / "runs" / f"{kind}-whole", "samples.jsonl")
    steps = [r["step"] for r in rows(runs.root / "runs" / f"{kind}-parts", "metrics.jsonl")]
    assert steps == sorted(set(steps)) and steps[-1] == 4
    # Every checkpoint names its base model and lists its files with sizes and checksums.
    meta = json.loads((parts / "checkpoint-4" / "meta.json").read_text())
    assert (parts / "checkpoint-4" / "base_model.json").is_file()
    assert "trainer_state.pt" in meta["files"] and "base_model.json" in meta["files"]
    resumed = json.loads((runs.root / "runs" / f"{kind}-parts" / "config.json").read_text())
    assert resumed["computed"]["resumed"]["step"] == 2
    assert resumed["computed"]["resumed"]["changed"] == {}


def test_a_kill_at_a_random_moment_resumes_to_the_same_result(runs, tmp_path):
    """GRPO killed at a random moment after its first checkpoint (mid-step, mid-save, mid-prune
    or mid-export, wherever it lands), then resumed."""
    command = renamed(runs.commands["grpo"], tmp_path, "random")
    command = with_option(command, "--logging_dir", str(tmp_path / "runs"))
    proc = start(command, tmp_path)
    deadline = time.time() + 900  # a loaded 2-core machine can be several times slower
    while not (tmp_path / "random" / "checkpoint-2").is_dir() and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.05)
    delay = random.uniform(0, 2.0)
    time.sleep(delay)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    finish(proc)
    again = run([*command, "--resume"], tmp_path)
    check(again)
    whole = runs.root / "grpo-whole"
    print(f"killed {delay:.2f} s after checkpoint-2 appeared")
    assert_bitwise_equal(weights(whole / "final"), weights(tmp_path / "random" / "final"))
    for log in ("metrics.jsonl", "samples.jsonl"):
        assert rows(tmp_path / "runs" / "random", log) == rows(
            runs.root / "runs" / "grpo-whole", log
        ), (log, delay)
    assert not [p.name for p in (tmp_path / "random").iterdir() if p.name.startswith(".")]


def copy_run(runs, kind: str, source: str, dest: Path, name: str) -> list[str]:
    """A copy of one run's checkpoints and logs under ``dest``; its command, renamed."""
    shutil.copytree(runs.root / source, dest / name, symlinks=True)
    if (runs.root / "runs" / source).is_dir():
        shutil.copytree(runs.root / "runs" / source, dest / "runs" / name)
    command = renamed(runs.commands[kind], dest, name)
    return with_option(command, "--logging_dir", str(dest / "runs"))


def test_kill_inside_pruning_leaves_nothing_a_resume_trips_on(runs, tmp_path):
    """keep_last 1: saving checkpoint-4 prunes checkpoint-2; killed after it is renamed away."""
    command = [*copy_run(runs, "reinforce", "reinforce-parts", tmp_path, "p"), "--keep_last", "1"]
    shutil.rmtree(tmp_path / "p" / "checkpoint-4")
    shutil.rmtree(tmp_path / "p" / "final")
    check(run([*command, "--resume"], tmp_path, failpoint="pruning:checkpoint-2"), -9)
    left = sorted(p.name for p in (tmp_path / "p").iterdir())
    assert left[0].startswith(".pruned-checkpoint-2-") and left[1:] == ["checkpoint-4"]
    assert [s for s, _ in list_checkpoints(tmp_path / "p")] == [4]
    again = run([*command, "--resume"], tmp_path)
    check(again)
    assert "removed leftovers of a killed run: .pruned-checkpoint-2-" in again.stderr
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["checkpoint-4", "final"]
    assert_bitwise_equal(
        weights(runs.root / "reinforce-whole" / "final"), weights(tmp_path / "p" / "final")
    )


def test_kill_inside_the_export_leaves_nothing_a_resume_trips_on(runs, tmp_path):
    command = copy_run(runs, "reinforce", "reinforce-whole", tmp_path, "e")
    shutil.rmtree(tmp_path / "e" / "final")  # as if the first run was killed before exporting
    check(run([*command, "--resume"], tmp_path, failpoint="exporting"), -9)
    assert [p.name for p in (tmp_path / "e").iterdir() if p.name.startswith(".tmp-final-")]
    assert not (tmp_path / "e" / "final").exists()
    again = run([*command, "--resume"], tmp_path)
    check(again)
    assert "removed leftovers" in again.stderr
    assert not [p.name for p in (tmp_path / "e").iterdir() if p.name.startswith(".")]
    assert_bitwise_equal(
        weights(runs.root / "reinforce-whole" / "final"), weights(tmp_path / "e" / "final")
    )
    # Nothing ran again, so nothing was logged again.
    assert rows(tmp_path / "runs" / "e", "metrics.jsonl") == rows(
        runs.root / "runs" / "reinforce-whole", "metrics.jsonl"
    )


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_truncated_checkpoint_falls_back_to_the_newest_intact_one(runs, tmp_path):
    command = copy_run(runs, "reinforce", "reinforce-whole", tmp_path, "t")
    shutil.rmtree(tmp_path / "t" / "final")
    truncate(tmp_path / "t" / "checkpoint-4" / "adapter_model.safetensors")
    again = run([*command, "--resume"], tmp_path)
    check(again)
    assert "warning: skipping damaged checkpoint-4 (adapter_model.safetensors has" in again.stderr
    assert "resumed from" in again.stderr and "checkpoint-2 at step 2" in again.stderr
    assert_bitwise_equal(
        weights(runs.root / "reinforce-whole" / "final"), weights(tmp_path / "t" / "final")
    )
    assert rows(tmp_path / "runs" / "t", "metrics.jsonl") == rows(
        runs.root / "runs" / "reinforce-whole", "metrics.jsonl"
    )


def test_no_intact_checkpoint_is_one_line_and_exit_2(runs, tmp_path):
    command = copy_run(runs, "reinforce", "reinforce-whole", tmp_path, "n")
    truncate(tmp_path / "n" / "checkpoint-4" / "trainer_state.pt")
    # Same size, other bytes: only the checksum tells.
    state = tmp_path / "n" / "checkpoint-2" / "trainer_state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    proc = run([*command, "--resume"], tmp_path)
    check(proc, 2)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --resume: no intact checkpoint"), lines
    assert "checkpoint-4 (trainer_state.pt has" in lines[0]
    assert "checkpoint-2 (trainer_state.pt does not match the checksum" in lines[0]


CHANGES = [
    ("reinforce", "--learning_rate", "0.02", "--learning_rate 0.01 -> 0.02"),
    ("reinforce", "--batch_size", "4", "--batch_size 2 -> 4"),
    ("reinforce", "--num_generations", "3", "--num_generations 2 -> 3"),
    ("reinforce", "--train_file", "OTHER", "--train_file"),
    ("reinforce", "--temperature", "0.5", "--temperature 1.0 -> 0.5"),
    ("sft", "--per_device_train_batch_size", "8", "--per_device_train_batch_size 4 -> 8"),
    ("ppo", "--gamma", "0.9", "--gamma 1.0 -> 0.9"),
    ("grpo", "--batch_size", "3", "--batch_size 2 -> 3"),
]


def main_in_process(kind: str, command: list[str], capsys) -> tuple[int, list[str]]:
    """The script's ``main`` on ``command``'s options, in this process (the refusals come before
    any model is loaded, so no subprocess start-up is needed); exit status and stderr lines."""
    module = importlib.import_module(SCRIPTS[kind].removesuffix(".py"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        module.main(command[2:])
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize(("kind", "option", "value", "message"), CHANGES)
def test_a_setting_that_changes_the_run_is_refused_on_resume(
    runs, tmp_path, files, capsys, kind, option, value, message
):
    value = str(files.other) if value == "OTHER" else value
    command = copy_run(runs, kind, f"{kind}-parts", tmp_path, "c")
    before = sorted(p.name for p in (tmp_path / "c").iterdir())
    args = [*command, "--resume", "--max_steps", "6"]  # a longer run is not a change
    args = [*args, option, value] if option not in args else with_option(args, option, value)
    code, lines = main_in_process(kind, args, capsys)
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("error: --resume: "), lines
    assert message in lines[0] and "would change the run" in lines[0]
    assert f"--allow_changed {option.lstrip('-')} " in lines[0]
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == before


@pytest.mark.parametrize(
    ("kind", "option", "value"),
    [
        ("reinforce", "--seed", "6"),
        ("reinforce", "--lora_r", "4"),
        ("ppo", "--variant", "sequence"),
        ("grpo", "--tinylora_u", "16"),
    ],
)
def test_a_setting_the_checkpoint_decides_is_refused_even_when_allowed(
    runs, tmp_path, capsys, kind, option, value
):
    command = copy_run(runs, kind, f"{kind}-parts", tmp_path, "f")
    args = [*command, "--resume"]
    args = [*args, option, value] if option not in args else with_option(args, option, value)
    code, lines = main_in_process(kind, args, capsys)
    assert code == 2
    assert len(lines) == 1 and "cannot change on resume" in lines[0], lines
    assert option in lines[0]
    code, lines = main_in_process(kind, [*args, "--allow_changed", option.lstrip("-")], capsys)
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith("error: --allow_changed: ") and "cannot change on resume" in lines[0]


def test_an_allowed_change_is_used_and_recorded(runs, tmp_path):
    """The saved optimizer state would keep the old learning rate; the new one must be used."""
    command = copy_run(runs, "reinforce", "reinforce-parts", tmp_path, "a")
    for folder in ("checkpoint-4", "final"):
        shutil.rmtree(tmp_path / "a" / folder)
    args = with_option([*command, "--resume"], "--learning_rate", "0.02")
    proc = run([*args, "--allow_changed", "learning_rate"], tmp_path)
    check(proc)
    metrics = {r["step"]: r for r in rows(tmp_path / "runs" / "a", "metrics.jsonl")}
    assert [metrics[s]["train/lr"] for s in (1, 2, 3, 4)] == [0.01, 0.01, 0.02, 0.02]
    config = json.loads((tmp_path / "runs" / "a" / "config.json").read_text())
    changed = config["computed"]["resumed"]["changed"]
    assert changed == {"learning_rate": {"checkpoint": 0.01, "now": 0.02}}
    meta = json.loads((tmp_path / "a" / "checkpoint-4" / "meta.json").read_text())
    assert meta["args"]["TrainArgs"]["learning_rate"] == 0.02


# --------------------------------------------------------------------------- units


class TinyAdapter(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.arange(4.0))

    def save_pretrained(self, path: str) -> None:
        torch.save(self.state_dict(), Path(path) / "adapter.pt")


def test_completeness_is_judged_by_every_file_and_damaged_folders_are_pruned(tmp_path):
    model = TinyAdapter()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, {"x": step}, {"args": {}}, keep_last=0)
    assert checkpoint_problem(tmp_path / "checkpoint-3") is None
    # What a kill in the middle of the old prune left: meta.json without the rest.
    (tmp_path / "checkpoint-2" / "adapter.pt").unlink()
    (tmp_path / "checkpoint-2" / "trainer_state.pt").unlink()
    assert checkpoint_problem(tmp_path / "checkpoint-2") == "adapter.pt is missing"
    emptied = tmp_path / "checkpoint-0"
    emptied.mkdir()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1, 3]
    save_checkpoint(tmp_path, 4, model, {"x": 4}, {"args": {}}, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "checkpoint-4"]


def test_resumable_checkpoint_checks_sums_and_warns(tmp_path):
    model = TinyAdapter()
    for step in (1, 2):
        save_checkpoint(tmp_path, step, model, {"x": step}, {"args": {}}, keep_last=0)
    path = tmp_path / "checkpoint-2" / "adapter.pt"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    assert checkpoint_problem(tmp_path / "checkpoint-2") is None  # sizes agree
    warnings = []
    assert resumable_checkpoint(tmp_path, warn=warnings.append).name == "checkpoint-1"
    assert warnings == [
        "warning: skipping damaged checkpoint-2 (adapter.pt does not match the checksum it "
        "was written with); resuming from checkpoint-1"
    ]
    (tmp_path / "checkpoint-1" / "meta.json").write_text('{"step": 1, "fi')
    with pytest.raises(UserError, match="checkpoint-1 \\(meta.json is unreadable\\)"):
        resumable_checkpoint(tmp_path)
    assert resumable_checkpoint(tmp_path / "none") is None


def test_clean_leftovers_removes_every_kind(tmp_path):
    names = [".tmp-checkpoint-4-77", ".tmp-final-77", ".old-final-77", ".pruned-checkpoint-2-77"]
    for name in [*names, "checkpoint-2", "final", "notes"]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text("x")
    assert sorted(clean_leftovers(tmp_path)) == sorted(names)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "final", "notes"]


def test_cut_logs_drops_the_steps_after_the_checkpoint(tmp_path):
    lines = [{"step": s, "v": s} for s in (1, 2, 3, 4)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    samples = "".join(json.dumps({"step": s}) + "\n" for s in (1, 1, 2, 3)) + '{"step": 3, "te'
    (tmp_path / "samples.jsonl").write_text(samples)
    assert cut_logs(tmp_path, 2) == {"metrics.jsonl": 2, "samples.jsonl": 2}
    kept = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in kept] == [1, 2]
    assert (tmp_path / "samples.jsonl").read_text().count("\n") == 3
    assert cut_logs(tmp_path, 2) == {}
    assert not list(tmp_path.glob(".*"))


def saved(tmp_path: Path, args: dict, processes: int = 1) -> Path:
    folder = tmp_path / "checkpoint-2"
    folder.mkdir(exist_ok=True)
    meta = {"step": 2, "args": {**args, "computed": {"num_processes": processes}}}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def config_of(args: dict, processes: int = 1) -> dict:
    return {**args, "computed": {"num_processes": processes}}


def test_settings_check_units(tmp_path):
    old = {
        "TrainArgs": {
            "learning_rate": 0.01,
            "max_steps": 4,
            "lr_scheduler": "constant",
            "eval_every": 0,
            "train_file": "a.jsonl",
        },
        "ModelArgs": {"lora_r": 8},
    }
    ckpt = saved(tmp_path, old)
    same = json.loads(json.dumps(old))
    same["TrainArgs"].update(eval_every=5, max_steps=10, brand_new_option=1)
    assert check_resume_settings(ckpt, config_of(same), set()) == {}
    (tmp_path / "a.jsonl").write_text("")
    same["TrainArgs"]["train_file"] = str(tmp_path / "a.jsonl")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:  # one file named relatively and absolutely is one setting
        assert check_resume_settings(ckpt, config_of(same), set()) == {}
    finally:
        os.chdir(cwd)
    linear = json.loads(json.dumps(old))
    linear["TrainArgs"]["lr_scheduler"] = "linear"
    ckpt = saved(tmp_path, linear)
    longer = json.loads(json.dumps(linear))
    longer["TrainArgs"]["max_steps"] = 8  # stretches a linear schedule: a change
    with pytest.raises(UserError, match="--max_steps 4 -> 8"):
        check_resume_settings(ckpt, config_of(longer), set())
    assert check_resume_settings(ckpt, config_of(longer), {"max_steps"}) == {"max_steps": (4, 8)}
    with pytest.raises(UserError, match="--num_processes 1 -> 2"):
        check_resume_settings(ckpt, config_of(linear, processes=2), set())
    with pytest.raises(UserError, match="no option named lerning_rate"):
        parse_allow_changed("lerning_rate", config_of(old))
    assert parse_allow_changed("learning_rate, --max_steps", config_of(old)) == {
        "learning_rate",
        "max_steps",
    }
    assert {"seed", "lora_r", "model", "variant"} <= FIXED_ON_RESUME
