"""Options, seeding, logs and checkpoints: the plumbing every script shares."""

import json
import os
import random
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from coderl.checkpoint import (
    export_final,
    latest_checkpoint,
    list_checkpoints,
    load_trainer_state,
    save_checkpoint,
)
from coderl.cli import derive_seed, parse_args, seed_everything
from coderl.errors import UserError
from coderl.runlog import RunLogger, read_metrics


@dataclass
class Opts:
    lr: float = field(default=1e-3, metadata={"help": "learning rate"})
    name: str = field(default="run", metadata={"help": "run name"})
    steps: int = field(default=10, metadata={"help": "steps"})


def test_parse_args_config_file_then_flags_win(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 0.5\nsteps: 3\n")
    (opts,) = parse_args((Opts,), ["--config", str(cfg), "--steps", "7"])
    assert opts.lr == 0.5 and opts.steps == 7 and opts.name == "run"


def test_parse_args_rejects_unknown_config_key_and_missing_file(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("learning_rate: 0.5\n")
    with pytest.raises(UserError, match="unknown option.*learning_rate"):
        parse_args((Opts,), ["--config", str(cfg)])
    with pytest.raises(UserError, match="not found"):
        parse_args((Opts,), ["--config", str(tmp_path / "missing.yaml")])


def test_parse_args_unknown_flag_is_a_user_error():
    with pytest.raises(UserError, match="--nope"):
        parse_args((Opts,), ["--nope", "1"])


def test_seed_everything_and_derived_seeds():
    seed_everything(3)
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    seed_everything(3)
    assert a == (random.random(), np.random.rand(), torch.rand(1).item())
    assert derive_seed(1, 2, 3) == derive_seed(1, 2, 3)
    assert len({derive_seed(1, s, i) for s in range(10) for i in range(10)}) == 100


def test_run_logger_writes_jsonl_and_tensorboard(tmp_path):
    log = RunLogger(tmp_path / "run", config={"a": 1})
    log.log({"train/loss": torch.tensor(0.5), "rollout/reward": float("nan")}, step=1)
    log.log({"train/loss": 0.25}, step=2)
    log.log_samples([{"task_id": "t", "reward": 1.0}], step=2)
    log.close()
    recs = read_metrics(tmp_path / "run")
    assert [r["train/loss"] for r in recs] == [0.5, 0.25]
    assert recs[0]["rollout/reward"] is None  # NaN is not valid JSON
    assert json.loads((tmp_path / "run" / "samples.jsonl").read_text())["step"] == 2
    assert any((tmp_path / "run" / "tensorboard").iterdir())


class TinyModule(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Linear(3, 2)

    def save_pretrained(self, path):
        torch.save(self.state_dict(), os.path.join(path, "weights.pt"))


def test_checkpoint_roundtrip_restores_rng_and_prunes(tmp_path):
    model = TinyModule()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model.w.weight.sum().backward()
    opt.step()
    for step in (1, 2, 3):
        save_checkpoint(
            tmp_path,
            step,
            model,
            {"optimizer": opt.state_dict(), "data_pos": step},
            {"args": {"x": 1}},
            keep_last=2,
        )
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt.name == "checkpoint-3"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["step"] == 3 and meta["args"] == {"x": 1}
    expected_next = torch.rand(4)  # RNG stream right after the last save
    torch.rand(100)
    state = load_trainer_state(ckpt)
    assert torch.equal(torch.rand(4), expected_next)
    assert state["data_pos"] == 3 and state["step"] == 3
    final = export_final(tmp_path, ckpt)
    assert (final / "weights.pt").exists() and not (final / "trainer_state.pt").exists()


def test_half_written_checkpoint_is_never_picked_up(tmp_path):
    model = TinyModule()
    save_checkpoint(tmp_path, 5, model, {}, {})
    # What a kill -9 during the next save leaves behind: a temp folder without a rename.
    stale = tmp_path / ".tmp-checkpoint-6-999"
    stale.mkdir()
    (stale / "weights.pt").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path).name == "checkpoint-5"


def test_parse_args_bad_value_is_one_user_error_line():
    with pytest.raises(UserError, match="invalid int value: 'x'"):
        parse_args((Opts,), ["--steps", "x"])


@pytest.mark.parametrize("kind", ["FSDP", "DEEPSPEED"])
def test_sharded_launches_are_refused_with_one_line(kind):
    from accelerate.utils import DistributedType

    from coderl.errors import UserError
    from coderl.run import refuse_sharded_training

    fake = type("FakeAccelerator", (), {"distributed_type": getattr(DistributedType, kind)})
    with pytest.raises(UserError, match=f"^{kind} is not supported"):
        refuse_sharded_training(fake())
    for fine in ("NO", "MULTI_GPU", "MULTI_CPU"):
        fake.distributed_type = getattr(DistributedType, fine)
        refuse_sharded_training(fake())


def test_read_metrics_skips_a_cut_off_last_line_but_not_corruption(tmp_path, capsys):
    from coderl.errors import UserError
    from coderl.runlog import read_metrics

    good = '{"step": 1, "time": 0, "train/loss": 2.5}\n{"step": 2, "time": 0, "train/loss": 1.5}\n'
    (tmp_path / "metrics.jsonl").write_text(good + '{"step": 3, "ti')
    assert [r["train/loss"] for r in read_metrics(tmp_path)] == [2.5, 1.5]
    assert "incomplete last line skipped" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "ti\n' + good)
    with pytest.raises(UserError, match="metrics.jsonl:1: not a JSON line"):
        read_metrics(tmp_path)
