"""Tokens per second of ``coderl.generation.generate`` against plain ``model.generate`` and the old path.

Three paths on the same batch (``--num_prompts`` toy Python function tasks, one generate call of
that many rows, left-padded alike) and the same seeds:

* ``new``: the module as it is: its own decode loop over the key/value cache, one inverse-CDF
  draw for the whole batch from per-row uniform streams (each row reproducible whatever the
  batch), one Rust-level decode per live row per step for the stop strings, and finished rows
  dropped from the batch;
* ``hf``: what a user would otherwise write: plain ``model.generate`` with its own sampling
  (``do_sample=True``, temperature, top-p, ``top_k=0``) and its own ``stop_strings``
  (:func:`hf_generate_batch`); one random stream for the batch, so not reproducible per row;
* ``old``: the implementation before the vectorised sampler, kept here as a reference
  (:func:`reference_generate_batch`): ``model.generate`` in greedy mode with a logits processor
  that calls ``torch.multinomial`` once per row per step with the row's own ``torch.Generator``,
  and a stopping criterion that decodes every row's tail once per stop string per step.

They alternate old, new, hf, old, new, hf... so that a change in machine load hits all alike.
By default every row generates exactly ``--max_new_tokens`` tokens: the end tokens are masked out
of the logits by a hook on the output head. ``--ends natural`` lets rows end where the model ends
them, as evaluation and rollouts do: there ``new`` drops finished rows, while ``model.generate``
carries them to the end of the batch; tokens counted are those sampled (end tokens included),
the same for every path in the greedy setting. With ``--stops base`` (the default) the base-mode stop
strings stay on (on a random model they rarely match, so the criteria pay their full price every
step); a real model would match them and end rows early, so give it ``--stops none``. Two
settings: sampling (``--temperature``, ``--top_p``) and greedy. Greedy outputs of the three paths
must be identical, and the run checks it. Printed: median tokens per second of each path over
``--repeats`` measured calls after ``--warmup`` unmeasured ones, and the ratios new / old and
new / hf; the same per CPU second of this process (less sensitive to other load on a shared
machine).

    OMP_NUM_THREADS=1 python bench/bench_generation.py
    OMP_NUM_THREADS=1 python bench/bench_generation.py --model /tmp/gen-tiny --repeats 5
    python bench/bench_generation.py --model checkpoints/smollm2-135m-instruct --stops none \
        --num_prompts 16
    python bench/bench_generation.py --model checkpoints/smollm2-135m-instruct --ends natural \
        --num_prompts 32 --max_new_tokens 128

The old path can stand in for the new one anywhere, e.g. to time a whole RL step before and
after (``bench/bench_rl_step.py``)::

    python -c "import sys; sys.path[:0] = ['.', 'bench']; import bench_generation as g, \\
bench_rl_step as r; g.use_reference_generation(); r.main(sys.argv[1:])" --steps 5
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
for path in (BENCH.parent, BENCH):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402

import coderl.generation as generation  # noqa: E402
from coderl.cli import parse_args  # noqa: E402
from coderl.errors import UserError, exit_on_user_error  # noqa: E402


@dataclass
class BenchOptions:
    model: str = field(
        default="",
        metadata={
            "help": "Model folder: used as it is when it holds a model, else the tiny model "
            "(vocab 2048, hidden 128, 4 layers) is built there; empty = a temp folder."
        },
    )
    num_prompts: int = field(default=32, metadata={"help": "Prompts (rows) per generate call."})
    max_new_tokens: int = field(default=64, metadata={"help": "Exact completion length."})
    temperature: float = field(default=1.0, metadata={"help": "Temperature of the sampled runs."})
    top_p: float = field(default=1.0, metadata={"help": "Top-p of the sampled runs."})
    repeats: int = field(default=3, metadata={"help": "Measured calls per path and setting."})
    warmup: int = field(default=1, metadata={"help": "Unmeasured calls per path and setting."})
    threads: int = field(default=1, metadata={"help": "torch threads."})
    seed: int = field(default=0, metadata={"help": "Sampling seed (the same for both paths)."})
    stops: str = field(
        default="base",
        metadata={
            "help": "Stop strings: 'base' (the base-mode ones, rarely matched by a random model) "
            "or 'none' (for a real model, which would match them and end rows early).",
            "choices": ["base", "none"],
        },
    )
    ends: str = field(
        default="suppressed",
        metadata={
            "help": "'suppressed': the end tokens are masked out, so every row runs to "
            "--max_new_tokens (tokens per second of a full batch); 'natural': rows end where "
            "the model ends them (end token or stop string), at different lengths, as in "
            "evaluation and rollouts; every path decodes the same greedy rows, so the greedy "
            "ratio is a ratio of times for the same work.",
            "choices": ["suppressed", "natural"],
        },
    )
    output: str = field(default="", metadata={"help": "Write the figures to this JSON file."})


# --------------------------------------------------------------------------- the old path


def _reference_sampler(seeds: list[int], temperature: float, top_p: float):
    from transformers import LogitsProcessor

    class PerRowSampler(LogitsProcessor):
        """The old sampler: one ``torch.multinomial`` per row per step, each with its own
        generator."""

        def __init__(self):
            self.generators: list[torch.Generator] | None = None

        def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
            if self.generators is None:
                self.generators = [
                    torch.Generator(device=scores.device).manual_seed(s) for s in seeds
                ]
            probs = generation.sampling_probs(scores, temperature, top_p)
            chosen = torch.stack(
                [
                    torch.multinomial(probs[i], 1, generator=g)[0]
                    for i, g in enumerate(self.generators)
                ]
            )
            only_chosen = torch.full_like(scores, float("-inf"))
            only_chosen.scatter_(1, chosen[:, None], 0.0)
            return only_chosen

    return PerRowSampler()


def _reference_stop_criteria(tokenizer, stops_per_row: list[tuple[str, ...]], prompt_width: int):
    from transformers import StoppingCriteria

    class StopStrings(StoppingCriteria):
        """The old criterion: every row's tail decoded once per stop string, every step."""

        def __init__(self):
            longest = max((len(s.encode()) for stops in stops_per_row for s in stops), default=0)
            self.window = longest + 1

        def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
            tails = input_ids[:, prompt_width:][:, -self.window :].tolist()
            done = [
                bool(stops) and any(s in generation.decode(tokenizer, tail) for s in stops)
                for tail, stops in zip(tails, stops_per_row)
            ]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return StopStrings()


def reference_generate_batch(
    model, tokenizer, prompts, seeds, stops, cfg, end_ids, pad_id
) -> list[tuple[str, list[int], str]]:
    """``coderl.generation._generate_batch`` as it was before the vectorised sampler."""
    from transformers import LogitsProcessorList, StoppingCriteriaList

    processors = LogitsProcessorList()
    if cfg.temperature > 0:
        processors.append(_reference_sampler(seeds, cfg.temperature, cfg.top_p))
    criteria = StoppingCriteriaList()
    if any(stops):
        width = max(len(p) for p in prompts)  # the left-padded prompt width
        criteria.append(_reference_stop_criteria(tokenizer, stops, width))
    return _generate_rows(
        model, tokenizer, prompts, stops, cfg, end_ids, pad_id,
        do_sample=False, logits_processor=processors, stopping_criteria=criteria,
    )  # fmt: skip


@contextlib.contextmanager
def plain_generation_config(model, eos_ids: set[int], pad_id: int):
    """Swap in a generation config with only our special ids, so the model's shipped defaults
    (repetition penalty, top-k, temperature...) cannot slip into ``generate``."""
    from transformers import GenerationConfig

    base = generation.unwrap_model(model)  # a peft wrapper generates with its base model's config
    saved = base.generation_config
    base.generation_config = GenerationConfig(eos_token_id=sorted(eos_ids), pad_token_id=pad_id)
    try:
        yield
    finally:
        base.generation_config = saved


def _generate_rows(model, tokenizer, prompts, stops, cfg, end_ids, pad_id, /, **decoding):
    """One ``model.generate`` call on the left-padded batch under the plain generation config,
    each row finished (cut, end id) as ``coderl.generation`` finishes it. ``decoding`` may hold
    ``tokenizer`` too (for ``stop_strings``): the arguments before it are positional only."""
    device = next(model.parameters()).device
    input_ids, mask = generation._left_pad(prompts, pad_id, device)
    with plain_generation_config(model, end_ids, pad_id), torch.no_grad():
        sequences = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=cfg.max_new_tokens,
            num_beams=1,
            use_cache=True,
            **decoding,
        )
    generated = sequences[:, input_ids.shape[1] :].tolist()
    return [
        generation.finish_completion(tokenizer, row, end_ids, s) for row, s in zip(generated, stops)
    ]


def hf_generate_batch(
    model, tokenizer, prompts, seeds, stops, cfg, end_ids, pad_id
) -> list[tuple[str, list[int], str]]:
    """What a user would otherwise write: plain ``model.generate`` with its own sampling
    (``do_sample``, temperature, top-p, top-k off) and its own ``stop_strings``, on the same
    left-padded batch. Not reproducible per row (one random stream for the batch), so only its
    greedy outputs can be compared with ours."""
    sampling = (
        {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": 0}
        if cfg.temperature > 0
        else {"do_sample": False}
    )
    stop_strings = sorted({s for row in stops for s in row})
    extra = {"stop_strings": stop_strings, "tokenizer": tokenizer} if stop_strings else {}
    return _generate_rows(
        model, tokenizer, prompts, stops, cfg, end_ids, pad_id, **sampling, **extra
    )


def use_reference_generation() -> None:
    """From now on, ``coderl.generation.generate`` decodes with the old path."""
    generation._generate_batch = reference_generate_batch


@contextlib.contextmanager
def reference_generation(batch_function=reference_generate_batch):
    """``coderl.generation.generate`` decodes with ``batch_function`` (by default the old path)
    inside this block."""
    current = generation._generate_batch
    generation._generate_batch = batch_function
    try:
        yield
    finally:
        generation._generate_batch = current


SIDES = {"old": reference_generate_batch, "new": None, "hf": hf_generate_batch}


# --------------------------------------------------------------------------- the race


def load_tiny_model(folder: str, workdir: Path):
    from coderl.models import load_model
    from coderl.tiny_model import build_tiny_model

    model_dir = Path(folder) if folder else workdir / "tiny"
    if not (model_dir / "config.json").is_file():
        build_tiny_model(model_dir)
    model, tokenizer = load_model(str(model_dir), dtype="float32")
    return model.eval(), tokenizer


def timed_generate(model, tokenizer, tasks, cfg, seed: int, side: str):
    """``(wall seconds, CPU seconds of this process, completions)`` of one generate call."""
    batch_function = SIDES[side]
    with reference_generation(batch_function) if batch_function else contextlib.nullcontext():
        wall, cpu = time.perf_counter(), time.process_time()
        completions = generation.generate(model, tokenizer, tasks, cfg, seed=seed)
        return time.perf_counter() - wall, time.process_time() - cpu, completions


def race(model, tokenizer, tasks, cfg, opts: BenchOptions) -> dict:
    """Alternate old, new and hf calls; median tokens per wall second and per CPU second of each."""
    wall: dict[str, list[float]] = {side: [] for side in SIDES}
    cpu: dict[str, list[float]] = {side: [] for side in SIDES}
    outputs: dict[str, list] = {}
    full = len(tasks) * cfg.max_new_tokens
    made: dict[str, int] = {}
    for call in range(opts.warmup + opts.repeats):
        for side in SIDES:
            elapsed, busy, completions = timed_generate(
                model, tokenizer, tasks, cfg, opts.seed, side
            )
            made[side] = sum(len(c.sampled_ids) for c in completions)  # end tokens included
            if opts.ends == "suppressed" and made[side] != full:
                raise RuntimeError(
                    f"{side}: {made[side]} tokens, expected every row to run to the end "
                    "(a stop string matched: try --stops none)"
                )
            outputs[side] = completions
            if call >= opts.warmup:
                wall[side].append(elapsed)
                cpu[side].append(busy)
    result: dict = {"tokens": made, "wall_seconds": wall, "cpu_seconds": cpu}
    for side in SIDES:
        result[side] = made[side] / statistics.median(wall[side])
        result[f"{side}_per_cpu_second"] = made[side] / statistics.median(cpu[side])
    for other in ("old", "hf"):
        result[f"ratio_new_over_{other}"] = result["new"] / result[other]
        result[f"cpu_ratio_new_over_{other}"] = (
            result["new_per_cpu_second"] / result[f"{other}_per_cpu_second"]
        )
    ids = {side: [c.token_ids for c in outputs[side]] for side in SIDES}
    result["identical_outputs"] = ids["old"] == ids["new"]
    result["identical_to_hf"] = ids["hf"] == ids["new"]
    return result


@exit_on_user_error
def main(argv=None) -> None:
    from bench_rl_step import suppress_end_tokens, toy_tasks

    (opts,) = parse_args((BenchOptions,), argv, description=__doc__)
    if opts.repeats < 1 or opts.warmup < 0 or opts.num_prompts < 1 or opts.max_new_tokens < 1:
        raise UserError("--repeats, --num_prompts and --max_new_tokens must be >= 1, --warmup >= 0")
    torch.set_num_threads(opts.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer = load_tiny_model(opts.model, Path(tmp))
    if opts.ends == "suppressed":
        suppress_end_tokens(model, generation.end_token_ids(model, tokenizer))
    tasks = toy_tasks(opts.num_prompts, opts.seed)
    stop = None if opts.stops == "base" else ()
    settings = {
        "sampled": generation.SamplingConfig(
            max_new_tokens=opts.max_new_tokens,
            temperature=opts.temperature,
            top_p=opts.top_p,
            batch_size=opts.num_prompts,
            stop=stop,
        ),
        "greedy": generation.SamplingConfig(
            max_new_tokens=opts.max_new_tokens, batch_size=opts.num_prompts, stop=stop
        ),
    }
    summary = {"options": asdict(opts), "torch": torch.__version__, "threads": opts.threads}
    print(
        f"{opts.num_prompts} prompts x {opts.max_new_tokens} new tokens at most, {opts.threads} "
        f"thread(s), stop strings: {opts.stops}, end tokens: {opts.ends}"
    )
    print(
        "| setting | old tokens/s | hf tokens/s | new tokens/s | new / old | new / hf | "
        "new / old (CPU) | new / hf (CPU) |\n| --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    for name, cfg in settings.items():
        result = race(model, tokenizer, tasks, cfg, opts)
        if name == "greedy" and not (result["identical_outputs"] and result["identical_to_hf"]):
            raise RuntimeError("greedy outputs of the three paths differ")
        summary[name] = result
        print(
            f"| {name} | {result['old']:.0f} | {result['hf']:.0f} | {result['new']:.0f} | "
            f"{result['ratio_new_over_old']:.2f} | {result['ratio_new_over_hf']:.2f} | "
            f"{result['cpu_ratio_new_over_old']:.2f} | {result['cpu_ratio_new_over_hf']:.2f} |"
        )
    if opts.output:
        Path(opts.output).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.output).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
