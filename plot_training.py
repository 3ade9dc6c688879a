"""Plot training curves from the ``metrics.jsonl`` of one or more runs into one PNG.

Each chosen metric gets its own panel, with one line per run against the optimizer step, so runs
of one method with different settings (or REINFORCE, PPO and GRPO on the same tasks) can be read
side by side. Records come from ``coderl.runlog.read_metrics``: a resumed run's rewritten steps
replace the earlier ones, so a killed and resumed run plots as one continuous line.

By default the panels are the metrics a run of this project logs that say how RL is going, in this
order, each only when some run has it: reward, pass rate, loss, KL (``train/kl`` for REINFORCE and
GRPO, ``train/kl_ref`` for PPO), entropy, completion length, held-out pass@1. ``--keys`` picks
others (any name in ``metrics.jsonl``, e.g. ``train/lr``).

    python plot_training.py --runs runs/tiny-sft-seed42 --output results/sft_curves.png
    python plot_training.py --runs results/ppo/runs/ppo_a0.01_b4 results/ppo/runs/ppo_a0.01_b8 \\
        --keys rollout/reward_mean,rollout/completion_tokens --output results/ppo/curves.png
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from coderl.cli import parse_args
from coderl.errors import UserError, exit_on_user_error
from coderl.runlog import read_metrics

DEFAULT_KEYS = (
    "rollout/reward_mean",
    "rollout/pass_rate",
    "train/loss",
    "train/kl",
    "train/kl_ref",
    "train/entropy",
    "rollout/completion_tokens",
    "eval/pass@1",
)


@dataclass
class PlotOptions:
    runs: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Run folders (runs/<name>/, holding metrics.jsonl) or metrics.jsonl files; "
            "one line per run in every panel."
        },
    )
    output: str = field(default="training_curves.png", metadata={"help": "PNG file to write."})
    keys: str = field(
        default="",
        metadata={
            "help": "Comma-separated metric names, one panel each (default: reward, pass rate, "
            "loss, KL, entropy, completion length and eval pass@1, those some run has)."
        },
    )
    labels: str = field(
        default="",
        metadata={"help": "Comma-separated legend names, one per run (default: run folder names)."},
    )
    smooth: int = field(
        default=1,
        metadata={
            "help": "Moving-average window over steps (1 = raw values).",
            "range": "[1, inf)",
        },
    )
    title: str = field(default="", metadata={"help": "Figure title."})


def run_folder(path: str) -> Path:
    """The folder holding ``metrics.jsonl`` for a run folder or a metrics file path."""
    given = Path(path)
    folder = given.parent if given.name == "metrics.jsonl" else given
    if not (folder / "metrics.jsonl").is_file():
        raise UserError(f"{path}: no metrics.jsonl there (not a run folder)")
    return folder


def load_run(folder: Path) -> list[dict]:
    try:
        records = read_metrics(folder)
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise UserError(f"{folder / 'metrics.jsonl'}: not a metrics log ({err})") from None
    if not records:
        raise UserError(f"{folder / 'metrics.jsonl'}: no records")
    return records


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """Step-sorted values of one metric; a later record for the same step wins, nulls are gaps."""
    by_step: dict[int, float] = {}
    for record in records:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            by_step[int(record["step"])] = float(value)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` values (the first points average what exists)."""
    out = []
    total = 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def choose_keys(option: str, runs: dict[str, list[dict]]) -> list[str]:
    present = {key for records in runs.values() for record in records for key in record}
    if option:
        keys = list(dict.fromkeys(k.strip() for k in option.split(",") if k.strip()))
        if not keys:
            raise UserError("--keys is empty")
        missing = [k for k in keys if k not in present]
        if missing:
            raise UserError(f"--keys: no run logs {', '.join(missing)}")
        return keys
    keys = [k for k in DEFAULT_KEYS if k in present]
    if not keys:
        raise UserError(
            f"none of the default metrics ({', '.join(DEFAULT_KEYS)}) is in these runs; "
            "choose some with --keys"
        )
    return keys


def run_labels(option: str, folders: list[Path]) -> list[str]:
    if not option:
        return [folder.name for folder in folders]
    labels = [label.strip() for label in option.split(",")]
    if len(labels) != len(folders):
        raise UserError(f"--labels gives {len(labels)} names for {len(folders)} runs")
    return labels


def plot(runs: dict[str, list[dict]], keys: list[str], options: PlotOptions) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    ncols = min(3, len(keys))
    nrows = -(-len(keys) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.4 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        # A run keeps its colour in every panel, also in panels where other runs have no line.
        for index, (label, records) in enumerate(runs.items()):
            steps, values = series(records, key)
            if steps:
                smoothed = moving_average(values, options.smooth)
                ax.plot(steps, smoothed, label=label, color=f"C{index % 10}", marker=".")
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    spare = list(axes.flat)[len(keys) :]
    for ax in spare:
        ax.set_visible(False)
    handles: dict = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    if options.title:
        fig.suptitle(options.title)
    if spare:  # the legend fills the first empty panel
        spare[0].set_visible(True)
        spare[0].axis("off")
        spare[0].legend(handles.values(), handles.keys(), loc="center")
        fig.tight_layout()
    else:
        fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(4, len(handles)))
        fig.tight_layout(rect=(0, 0.08, 1, 1))
    output = Path(options.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=100)
    plt.close(fig)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    (options,) = parse_args((PlotOptions,), argv, description=__doc__.split("\n\n")[0])
    if not options.runs:
        raise UserError("--runs: give at least one run folder")
    if options.smooth < 1:
        raise UserError(f"--smooth must be at least 1, got {options.smooth}")
    if not options.output.lower().endswith(".png"):
        raise UserError(f"--output must be a .png file, got {options.output}")
    folders = [run_folder(path) for path in options.runs]
    labels = run_labels(options.labels, folders)
    if len(set(labels)) != len(labels):
        raise UserError(f"two runs share a legend name ({', '.join(labels)}); use --labels")
    runs = {label: load_run(folder) for label, folder in zip(labels, folders, strict=True)}
    keys = choose_keys(options.keys, runs)
    plot(runs, keys, options)
    print(f"wrote {options.output} ({len(runs)} run(s): {', '.join(keys)})")


if __name__ == "__main__":
    main()
