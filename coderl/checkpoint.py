"""Step-numbered, atomically written checkpoints and resume.

Layout of ``<output_dir>/checkpoint-<step>/``: the adapter (``save_pretrained``), ``meta.json``
(args, step, metrics, git revision, time) and ``trainer_state.pt`` (optimizer, scheduler, RNG
states, data position and anything else the script needs to continue bit-for-bit). A checkpoint
is written into a temporary folder and renamed into place, so a kill at any moment leaves either
the previous complete checkpoint or the new complete one, never a half-written folder that resume
would pick up.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def git_revision() -> str | None:
    """The code's git revision (with ``-dirty`` when there are uncommitted changes), if known."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("-dirty" if dirty else "")


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())


def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    model,
    trainer_state: dict[str, Any],
    meta: dict[str, Any],
    keep_last: int = 2,
) -> Path:
    """Write ``checkpoint-<step>`` atomically and prune older ones beyond ``keep_last``.

    ``model`` is saved with ``save_pretrained`` (a PEFT model saves only its adapter).
    ``trainer_state`` is anything ``torch.save`` accepts; RNG states are added here.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".tmp-checkpoint-{step}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    model.save_pretrained(str(tmp))
    if hasattr(model, "peft_config"):
        from coderl.models import write_base_fingerprint

        write_base_fingerprint(model, tmp)  # lets a load onto the wrong base fail clearly
    torch.save({**trainer_state, "rng": rng_state(), "step": step}, tmp / "trainer_state.pt")
    full_meta = {"step": step, "time": time.time(), "git_revision": git_revision(), **meta}
    (tmp / "meta.json").write_text(json.dumps(full_meta, indent=2, default=str))
    _fsync_tree(tmp)
    replace_dir(tmp, final)  # a rerun of the same step replaces it, atomically for readers
    _prune(output_dir, keep_last)
    return final


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints (those with ``meta.json``), oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for child in output_dir.iterdir():
        match = CHECKPOINT_RE.match(child.name)
        if match and (child / "meta.json").is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def load_trainer_state(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """The saved trainer state; RNG states are restored as a side effect."""
    state = torch.load(Path(checkpoint) / "trainer_state.pt", weights_only=False)
    set_rng_state(state["rng"])
    return state


def _prune(output_dir: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for _, path in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)
    for stale in output_dir.glob(".tmp-checkpoint-*"):
        # Left by a run killed mid-save; never read, safe to drop once a newer save succeeded.
        shutil.rmtree(stale, ignore_errors=True)


def export_final(output_dir: str | os.PathLike, checkpoint: str | os.PathLike) -> Path:
    """Copy a checkpoint's adapter files to ``<output_dir>/final`` (atomically) for evaluation."""
    output_dir = Path(output_dir)
    final = output_dir / "final"
    tmp = output_dir / f".tmp-final-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(checkpoint, tmp, ignore=shutil.ignore_patterns("trainer_state.pt"))
    _fsync_tree(tmp)
    replace_dir(tmp, final)
    return final


def replace_dir(tmp: Path, final: Path) -> None:
    """Put the complete folder ``tmp`` at ``final``. An existing ``final`` is renamed aside
    first and deleted last, so a reader (or a kill) finds the old folder or the new one, never
    neither nor half of one."""
    if final.exists():
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
