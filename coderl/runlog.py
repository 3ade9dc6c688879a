"""Run logging: always local (``metrics.jsonl`` + TensorBoard under ``runs/<name>/``), trackers opt-in.

Metric names are namespaced (``train/``, ``rollout/``, ``eval/``). Every record carries the step,
so a resumed run appends to the same files and plots stay continuous: resuming from the checkpoint
of step N first cuts ``metrics.jsonl`` and ``samples.jsonl`` back to step N (the steps after it run
again) and tells TensorBoard to hide its events after N, so no step is logged twice.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from coderl.checkpoint import failpoint
from coderl.errors import UserError


def _plain(value: Any) -> Any:
    """Turn tensors / numpy scalars into JSON numbers; NaN/inf become None (JSON has no NaN)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunLogger:
    """Writes metrics to ``<run_dir>/metrics.jsonl`` and TensorBoard; W&B when ``report_to`` says so.

    ``enabled=False`` (non-main processes under accelerate) makes every call a no-op.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        config: dict | None = None,
        report_to: str = "tensorboard",
        enabled: bool = True,
        resume_step: int | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            cut_logs(self.run_dir, resume_step)
        self._metrics = open(self.run_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115
        targets = {t.strip() for t in report_to.split(",") if t.strip() and t.strip() != "none"}
        if config is not None:
            (self.run_dir / "config.json").write_text(json.dumps(config, indent=2, default=str))
        if "tensorboard" in targets:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=purge)
        if "wandb" in targets:
            import wandb

            self._wandb = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "coderl"),
                name=self.run_dir.name,
                config=config,
                resume="allow",
            )

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        clean = {k: _plain(v) for k, v in metrics.items()}
        self._metrics.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
        if self._tb is not None:
            for key, value in clean.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(clean, step=step)
        failpoint(f"logged:{step}")

    def log_samples(self, rows: list[dict], step: int) -> None:
        """Append sampled completions with their rewards and verdicts to ``samples.jsonl``."""
        if not self.enabled or not rows:
            return
        with open(self.run_dir / "samples.jsonl", "a") as fh:
            for row in rows:
                fh.write(json.dumps({"step": step, **row}, default=str) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        failpoint(f"samples:{step}")

    def close(self) -> None:
        if not self.enabled:
            return
        self._metrics.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


LOG_FILES = ("metrics.jsonl", "samples.jsonl")


def cut_logs(run_dir: str | os.PathLike, step: int) -> dict[str, int]:
    """Drop the rows after ``step`` from the run's JSON-lines logs (and a last line a kill cut
    off); each file is rewritten under a temporary name and renamed over the old one, so a kill
    here leaves the old file or the cut one. Rows dropped, by file."""
    dropped = {}
    for name in LOG_FILES:
        path = Path(run_dir) / name
        if not path.exists():
            continue
        lines = path.read_text().splitlines(keepends=True)
        kept = [
            line for number, line in enumerate(lines, 1) if _keep(line, step, number == len(lines))
        ]
        if len(kept) == len(lines):
            continue
        tmp = path.with_name(f".{name}.cut-{os.getpid()}")
        with open(tmp, "w") as fh:
            fh.writelines(line if line.endswith("\n") else line + "\n" for line in kept)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dropped[name] = len(lines) - len(kept)
    return dropped


def _keep(line: str, step: int, last: bool) -> bool:
    if not line.strip():
        return False
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        return not last  # a cut-off last line goes; damage elsewhere is left for the reader
    return not (isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] > step)


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The records of ``metrics.jsonl``, later records for the same step replacing earlier ones
    (a resumed run rewrites the steps after its last checkpoint)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    by_step: dict[tuple[int, frozenset], dict] = {}
    order = []
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            # A kill mid-write leaves the last line cut off; anything else is real corruption.
            if number == len(lines):
                print(f"warning: {path}:{number}: incomplete last line skipped", file=sys.stderr)
                continue
            raise UserError(f"{path}:{number}: not a JSON line") from None
        key = (rec["step"], frozenset(k for k in rec if k not in ("step", "time")))
        if key not in by_step:
            order.append(key)
        by_step[key] = rec
    return [by_step[k] for k in order]
