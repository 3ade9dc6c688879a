"""Step-numbered, atomically written checkpoints and resume.

Layout of ``<output_dir>/checkpoint-<step>/``: the adapter (``save_pretrained``), ``meta.json``
(args, step, metrics, git revision, time) and ``trainer_state.pt`` (optimizer, scheduler, RNG
states, data position and anything else the script needs to continue bit-for-bit). A checkpoint
is written into a temporary folder and renamed into place, so a kill at any moment leaves either
the previous complete checkpoint or the new complete one, never a half-written folder that resume
would pick up. ``meta.json`` lists every other file with its size and sha256: listing checks the
sizes, resume checks the checksums too and falls back to the newest intact checkpoint.

A kill leaves only dot-named folders behind (``.tmp-checkpoint-*`` mid-save, ``.tmp-final-*``
mid-export, ``.old-*`` mid-swap, ``.pruned-*`` mid-prune: an old checkpoint is renamed away before
it is deleted, so a half-deleted one never looks complete); :func:`clean_leftovers` removes them
when a run starts.

``CODERL_FAILPOINT=<point>`` kills the process with SIGKILL at a named point (``saved:<folder>``
after a checkpoint is in place, ``pruning:<folder>`` after an old checkpoint is renamed away,
``exporting`` with the copy for ``final/`` written, ``swap:<folder>`` between the two renames of
a folder swap; ``logged:<step>`` and ``samples:<step>`` after the run log wrote that step's
metrics or samples), so the tests can kill a real run exactly there.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from coderl.errors import UserError

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
LEFTOVERS = (".tmp-checkpoint-*", ".tmp-final-*", ".old-*", ".pruned-*")
# What a checkpoint written before meta.json listed its files needs to resume.
REQUIRED_FILES = ("meta.json", "trainer_state.pt")


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
        from coderl.adapters import write_base_fingerprint

        write_base_fingerprint(model, tmp)  # lets a load onto the wrong base fail clearly
    torch.save({**trainer_state, "rng": rng_state(), "step": step}, tmp / "trainer_state.pt")
    full_meta = {"step": step, "time": time.time(), "git_revision": git_revision(), **meta}
    full_meta["files"] = file_digests(tmp)
    (tmp / "meta.json").write_text(json.dumps(full_meta, indent=2, default=str))
    _fsync_tree(tmp)
    replace_dir(tmp, final)  # a rerun of the same step replaces it, atomically for readers
    failpoint(f"saved:{final.name}")
    _prune(output_dir, keep_last)
    return final


def file_digests(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file under ``folder`` but ``meta.json``, by relative path."""
    digests = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != "meta.json":
            sha = hashlib.sha256()
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    sha.update(block)
            rel = path.relative_to(folder).as_posix()
            digests[rel] = {"size": path.stat().st_size, "sha256": sha.hexdigest()}
    return digests


def checkpoint_problem(folder: Path, checksums: bool = False) -> str | None:
    """Why ``folder`` cannot be resumed from (a missing, cut or changed file), or None.

    Sizes only by default (cheap, enough for listing and pruning); ``checksums=True`` also
    compares every file's sha256 with the one recorded when it was written."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except FileNotFoundError:
        return "meta.json is missing"
    except (OSError, ValueError):
        return "meta.json is unreadable"
    files = meta.get("files") if isinstance(meta, dict) else None
    if files is None:  # written before checkpoints listed their files
        missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
        return f"{missing[0]} is missing" if missing else None
    for rel, want in files.items():
        path = folder / rel
        if not path.is_file():
            return f"{rel} is missing"
        size = path.stat().st_size
        if size != want["size"]:
            return f"{rel} has {size} bytes, {want['size']} were written"
    if checksums:
        found = file_digests(folder)
        for rel, want in files.items():
            if found[rel]["sha256"] != want["sha256"]:
                return f"{rel} does not match the checksum it was written with"
    return None


def checkpoint_folders(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Every ``checkpoint-<step>`` folder, complete or not, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for child in output_dir.iterdir():
        match = CHECKPOINT_RE.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints (every file their ``meta.json`` lists, at its size), oldest first."""
    return [(s, p) for s, p in checkpoint_folders(output_dir) if checkpoint_problem(p) is None]


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def resumable_checkpoint(output_dir: str | os.PathLike, warn=None) -> Path | None:
    """The newest checkpoint whose files all match their recorded checksums.

    A damaged newer one is passed over with a warning through ``warn``; None when there is no
    checkpoint folder at all; a :class:`UserError` naming each problem when none is intact."""
    problems = []
    for _, path in reversed(checkpoint_folders(output_dir)):
        problem = checkpoint_problem(path, checksums=True)
        if problem is None:
            if problems and warn is not None:
                warn(f"warning: skipping damaged {'; '.join(problems)}; resuming from {path.name}")
            return path
        problems.append(f"{path.name} ({problem})")
    if problems:
        raise UserError(f"--resume: no intact checkpoint in {output_dir}: {'; '.join(problems)}")
    return None


def clean_leftovers(output_dir: str | os.PathLike) -> list[str]:
    """Remove what killed saves, exports, swaps and prunes left behind; their names."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    removed = []
    for pattern in LEFTOVERS:
        for stale in sorted(output_dir.glob(pattern)):
            shutil.rmtree(stale, ignore_errors=True)
            removed.append(stale.name)
    return removed


def load_trainer_state(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """The saved trainer state; RNG states are restored as a side effect."""
    state = torch.load(Path(checkpoint) / "trainer_state.pt", weights_only=False)
    set_rng_state(state["rng"])
    return state


def _prune(output_dir: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` complete checkpoints; drop every other checkpoint folder
    (older ones, and damaged or emptied ones, which resume would only skip)."""
    if keep_last <= 0:
        return
    keep = {path for _, path in list_checkpoints(output_dir)[-keep_last:]}
    for _, path in checkpoint_folders(output_dir):
        if path not in keep:
            # Renamed first: a kill during the delete leaves a dot-named folder, not a
            # checkpoint-N that has lost some of its files.
            doomed = output_dir / f".pruned-{path.name}-{os.getpid()}"
            os.rename(path, doomed)
            failpoint(f"pruning:{path.name}")
            shutil.rmtree(doomed, ignore_errors=True)
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
    failpoint("exporting")
    replace_dir(tmp, final)
    return final


def replace_dir(tmp: Path, final: Path) -> None:
    """Put the complete folder ``tmp`` at ``final``. An existing ``final`` is renamed aside
    first and deleted last, so a reader (or a kill) finds the old folder or the new one, never
    neither nor half of one."""
    if final.exists():
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        os.rename(final, old)
        failpoint(f"swap:{final.name}")
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)


def failpoint(point: str) -> None:
    """SIGKILL this process when ``CODERL_FAILPOINT`` names ``point`` (see the module docstring)."""
    if os.environ.get("CODERL_FAILPOINT") == point:
        os.kill(os.getpid(), signal.SIGKILL)
