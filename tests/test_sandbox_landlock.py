"""The Landlock and seccomp layers: what a run cannot do even where namespaces are refused.

A Sandbox is started in a process of its own, the "caller" (a training process), which holds a
secret in its environment. In the ``unprivileged`` case the caller is an ordinary user (an unused
uid and gid, no groups) and the sandbox runs with ``isolation="basic"``, as where the kernel
refuses user namespaces: untrusted code then runs as the caller's own uid, and only Landlock keeps
it from that uid's processes, files and the network. In the ``root`` case the same jobs run in the
default mode (namespaces, Landlock as a second layer).

Each hostile job is a task whose test passes only if the attack worked (it returns the secret, a
file's content, "connected", "killed"...): a pass is a leak. Every hostile job must get a verdict
other than ``passed`` (and not ``infra_error``), the caller and the worker must survive, the host's
files must be untouched, no connection may reach the test's listeners, and the honest jobs of the
same batch must pass. ``CODERL_SANDBOX_SWITCH_OFF=landlock`` (or ``seccomp``) starts the workers
without that layer, to see what it stops.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNUSED_ID = 54321
TIMEOUT = 3.0
SECRET_NAME = "CODERL_LANDLOCK_SECRET"


def landlock_abi() -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc.syscall(ctypes.c_long(444), None, ctypes.c_size_t(0), ctypes.c_uint32(1))


if landlock_abi() < 1:
    pytest.skip(
        f"the kernel has no Landlock ({os.strerror(ctypes.get_errno())})", allow_module_level=True
    )

# The caller: starts the Sandbox, fills in the pids the jobs name, runs them as one batch.
CALLER = f"""
import json, os, sys
sys.path.insert(0, {REPO!r})
from sandbox import Sandbox
from sandboxing.pool import worker_processes

jobs = json.load(sys.stdin)
with Sandbox(workers=1, timeout={TIMEOUT}, cache=False, isolation=sys.argv[1]) as box:
    worker = worker_processes(box)[0].pid
    names = {{"CALLER_PID": str(os.getpid()), "WORKER_PID": str(worker)}}
    for job in jobs:
        for name, value in names.items():
            job[1] = job[1].replace(name, value)
    results = box.run_batch([tuple(job) for job in jobs])
    print(json.dumps({{
        "describe": box.describe(),
        "results": [[r.status, r.detail] for r in results],
        "workers": [worker, worker_processes(box)[0].pid],
    }}))
"""


def function_task(name: str, wanted: str) -> dict:
    """A task whose test passes only if the candidate returns ``wanted`` (what a leak gives)."""
    test = f"def check(candidate):\n    assert candidate(0) == {wanted!r}\n"
    return {
        "task_id": f"landlock/{name}",
        "prompt": "def f(x):\n",
        "test": test,
        "entry_point": "f",
    }


def stdio_task(name: str, language: str, output: str) -> dict:
    tests = [{"input": "3\n", "output": output + "\n"}]
    return {"task_id": f"landlock/{name}", "prompt": "", "language": language, "tests": tests}


def body(*lines: str) -> str:
    return "".join(f"    {line}\n" for line in lines)


class Host:
    """What the attacks aim at: a secret in the caller's environment, a folder of the caller's
    uid outside any run (a secret file, a file to overwrite), a file name in /tmp, a TCP and an
    abstract unix listener, a process of the caller's uid."""

    def __init__(self, uid: int):
        self.uid = uid
        self.token = secrets.token_hex(8)
        self.folder = tempfile.mkdtemp(dir="/tmp", prefix="coderl-landlock-")
        self.secret_file = os.path.join(self.folder, "secret.txt")
        self.header = os.path.join(self.folder, "secret.h")
        self.victim_file = os.path.join(self.folder, "victim.txt")
        self.new_file = os.path.join(self.folder, "new.txt")
        self.tmp_file = f"/tmp/coderl-landlock-{self.token}"
        for path, text in [
            (self.secret_file, self.token),
            (self.header, f'#define SECRET "{self.token}"\n'),
            (self.victim_file, "original"),
        ]:
            with open(path, "w") as handle:
                handle.write(text)
            os.chmod(path, 0o600)
            os.chown(path, uid, uid)
        os.chmod(self.folder, 0o700)
        os.chown(self.folder, uid, uid)
        self.accepted: list[str] = []
        self.tcp = socket.create_server(("127.0.0.1", 0))
        self.port = self.tcp.getsockname()[1]
        self.unix_name = f"\0coderl-landlock-{self.token}"
        self.unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.unix.bind(self.unix_name)
        self.unix.listen()
        for listener in (self.tcp, self.unix):
            threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.udp_port = self.udp.getsockname()[1]
        threading.Thread(target=self._receive, daemon=True).start()
        self.victim = subprocess.Popen(["sleep", "300"], user=uid, group=uid, extra_groups=[])

    def _accept(self, listener) -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            self.accepted.append(str(listener.family))
            connection.close()

    def _receive(self) -> None:
        while True:
            try:
                self.udp.recv(1024)
            except OSError:
                return
            self.accepted.append("udp")

    def close(self) -> None:
        self.victim.kill()
        self.victim.wait()
        for listener in (self.tcp, self.unix, self.udp):
            listener.close()
        shutil.rmtree(self.folder, ignore_errors=True)
        if os.path.exists(self.tmp_file):
            os.remove(self.tmp_file)


def hostile_jobs(host: Host) -> dict[str, tuple[dict, str]]:
    """name -> (task, completion): each task's test passes only if its attack succeeded."""
    read_env = body(
        "with open('/proc/CALLER_PID/environ', 'rb') as handle:",
        "    variables = handle.read().split(b'\\0')",
        f"prefix = b'{SECRET_NAME}='",
        "return [v[len(prefix):].decode() for v in variables if v.startswith(prefix)][0]",
    )
    kill = body(
        "import os, signal",
        "os.kill(TARGET, signal.SIGKILL)",
        "return 'killed'",
    )
    kill_all = body(
        "import os, signal, time",
        "os.kill(-1, signal.SIGKILL)",
        "time.sleep(0.5)",
        "try:",
        f"    with open('/proc/{host.victim.pid}/stat') as handle:",
        "        state = handle.read().rsplit(')', 1)[1].split()[0]",
        "except OSError:",
        "    state = 'not visible'",
        "return 'killed' if state in ('Z', 'X') else state",
    )
    write = body(
        "with open(PATH, 'w') as handle:",
        "    handle.write('pwned')",
        "return 'written'",
    )
    c_read = (
        "#include <cstdio>\nint main() {\n"
        f'  FILE *f = fopen("{host.secret_file}", "r"); char s[64] = {{0}};\n'
        '  if (f) fgets(s, sizeof s, f);\n  printf("%s\\n", s);\n}\n'
    )
    jobs = [
        (
            "send a UDP datagram to 127.0.0.1",
            function_task("udp", "sent"),
            body(
                "import socket",
                "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)",
                f"s.sendto(b'leak', ('127.0.0.1', {host.udp_port}))",
                "return 'sent'",
            ),
        ),
        ("ptrace (its own child)", function_task("ptrace", "traced"), PTRACE_OWN_CHILD),
        ("process_vm_readv (of itself)", function_task("vm-read", "read"), VM_READ_SELF),
        (
            "io_uring",
            function_task("io-uring", "opened"),
            body(
                "import ctypes",
                "libc = ctypes.CDLL(None, use_errno=True)",
                "params = ctypes.create_string_buffer(120)",
                "fd = libc.syscall(425, 4, params)",
                "return 'opened' if fd >= 0 else ctypes.get_errno()",
            ),
        ),
        ("read the caller's environ", function_task("environ", host.token), read_env),
        (
            "read the caller's command line",
            function_task("cmdline", host.token),
            body(
                "with open('/proc/CALLER_PID/cmdline', 'rb') as handle:",
                "    return handle.read().split(b'\\0')[-2].decode()",
            ),
        ),
        (
            "read a file of the same uid outside the run",
            function_task("read", host.token),
            body(f"return open({host.secret_file!r}).read()"),
        ),
        (
            "write into /tmp",
            function_task("write-tmp", "written"),
            write.replace("PATH", repr(host.tmp_file)),
        ),
        (
            "overwrite a file of the same uid",
            function_task("overwrite", "written"),
            write.replace("PATH", repr(host.victim_file)),
        ),
        (
            "create a file in a folder of the same uid",
            function_task("create", "written"),
            write.replace("PATH", repr(host.new_file)),
        ),
        (
            "connect to a TCP listener on 127.0.0.1",
            function_task("tcp", "connected"),
            body(
                "import socket",
                f"socket.create_connection(('127.0.0.1', {host.port}), timeout=1).close()",
                "return 'connected'",
            ),
        ),
        (
            "connect to an abstract unix socket",
            function_task("unix", "connected"),
            body(
                "import socket",
                "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)",
                f"s.connect({host.unix_name!r})",
                "return 'connected'",
            ),
        ),
        (
            "kill the worker's parent (the caller)",
            function_task("kill-caller", "killed"),
            kill.replace("TARGET", "CALLER_PID"),
        ),
        (
            "kill the worker",
            function_task("kill-worker", "killed"),
            kill.replace("TARGET", "WORKER_PID"),
        ),
        (
            "kill the test process",
            function_task("kill-test", "killed"),
            kill.replace("TARGET", str(os.getpid())),
        ),
        (
            "kill a process of the same uid",
            function_task("kill-victim", "killed"),
            kill.replace("TARGET", str(host.victim.pid)),
        ),
        ("kill(-1)", function_task("kill-all", "killed"), kill_all),
        (
            "C++: #include a header outside the run",
            stdio_task("cpp-include", "cpp", host.token),
            f'#include <cstdio>\n#include "{host.header}"\nint main() {{ puts(SECRET); }}\n',
        ),
        (
            "C++: read a file of the same uid",
            stdio_task("cpp-read", "cpp", host.token),
            c_read,
        ),
        (
            "C++: kill the caller",
            stdio_task("cpp-kill", "cpp", "0"),
            '#include <csignal>\n#include <cstdio>\nint main() { printf("%d\\n", '
            "kill(CALLER_PID, SIGKILL)); }\n",
        ),
        (
            "Python program: read a file of the same uid",
            stdio_task("py-read", "python", host.token),
            f"print(open({host.secret_file!r}).read())\n",
        ),
    ]
    if platform.machine() == "x86_64":
        jobs.append(
            (
                "another architecture's system call",
                function_task("foreign", "ran"),
                FOREIGN_SYSCALL,
            )
        )
    return {name: (task, completion) for name, task, completion in jobs}


PTRACE_OWN_CHILD = body(
    "import ctypes, os",
    "child = os.fork()",
    "if child == 0:",
    "    traced = ctypes.CDLL(None, use_errno=True).ptrace(0, 0, 0, 0) == 0  # PTRACE_TRACEME",
    "    os._exit(0 if traced else 1)",
    "_, status = os.waitpid(child, 0)",
    "return 'traced' if os.waitstatus_to_exitcode(status) == 0 else 'refused'",
)
VM_READ_SELF = body(
    "import ctypes, os",
    "class IoVec(ctypes.Structure):",
    "    _fields_ = [('base', ctypes.c_void_p), ('len', ctypes.c_size_t)]",
    "source, target = ctypes.create_string_buffer(b'memory'), ctypes.create_string_buffer(6)",
    "local = IoVec(ctypes.cast(target, ctypes.c_void_p), 6)",
    "remote = IoVec(ctypes.cast(source, ctypes.c_void_p), 6)",
    "libc = ctypes.CDLL(None, use_errno=True)",
    "libc.process_vm_readv.restype = ctypes.c_ssize_t",
    "got = libc.process_vm_readv(os.getpid(), ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)",
    "return 'read' if got == 6 and target.raw == b'memory' else ctypes.get_errno()",
)
# i386's getpid through int 0x80: a system call of another architecture's table.
FOREIGN_SYSCALL = body(
    "import ctypes, mmap",
    "code = bytes([0xB8, 20, 0, 0, 0, 0xCD, 0x80, 0xC3])  # mov eax, 20; int 0x80; ret",
    "page = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)",
    "page.write(code)",
    "address = ctypes.addressof(ctypes.c_char.from_buffer(page))",
    "ctypes.CFUNCTYPE(ctypes.c_int)(address)()",
    "return 'ran'",
)
SECCOMP_ATTACKS = (
    "send a UDP datagram to 127.0.0.1",
    "ptrace (its own child)",
    "process_vm_readv (of itself)",
    "io_uring",
    *(("another architecture's system call",) if platform.machine() == "x86_64" else ()),
)
# Attacks whose success ends the caller or the worker: each runs in a batch of its own.
LETHAL = (
    "kill the worker's parent (the caller)",
    "kill the worker",
    "kill(-1)",
    "C++: kill the caller",
)
ATTACKS = (
    "read the caller's environ",
    "read the caller's command line",
    "read a file of the same uid outside the run",
    "write into /tmp",
    "overwrite a file of the same uid",
    "create a file in a folder of the same uid",
    "connect to a TCP listener on 127.0.0.1",
    "connect to an abstract unix socket",
    "kill the test process",
    "kill a process of the same uid",
    "C++: #include a header outside the run",
    "C++: read a file of the same uid",
    "Python program: read a file of the same uid",
    *LETHAL,
    *SECCOMP_ATTACKS,
)

HONEST = [
    ("honest function", function_task("honest", 0), body("return x * 2")),
    (
        "honest use of an AF_UNIX socket pair",
        function_task("honest-unix", 0),
        body(
            "import socket",
            "a, b = socket.socketpair()",
            "a.send(b'x')",
            "return x * 2 if b.recv(1) == b'x' else -1",
        ),
    ),
    (
        "honest Python program",
        stdio_task("honest-py", "python", "6"),
        "print(2 * int(input()))\n",
    ),
    (
        "honest C++ program",
        stdio_task("honest-cpp", "cpp", "6"),
        '#include <cstdio>\nint main() { int n; scanf("%d", &n); printf("%d\\n", 2 * n); }\n',
    ),
]


def interpreter_for(uid: int) -> str:
    """An interpreter the unused uid can start (the test's own may live in a private home)."""
    for python in (sys.executable, "/usr/bin/python3"):
        try:
            ran = subprocess.run(
                [python, "-c", "import sys; assert sys.version_info >= (3, 10)"],
                user=uid,
                group=uid,
                extra_groups=[],
                capture_output=True,
                timeout=60,
            )
        except OSError:
            continue
        if ran.returncode == 0:
            return python
    pytest.skip(f"no Python 3.10+ that uid {uid} may run")


def run_caller(user: str, isolation: str, host: Host, jobs: list) -> dict:
    """Run ``jobs`` ((name, task, completion) triples) as one batch in a fresh caller."""
    drop = {}
    python = sys.executable
    if user == "unprivileged":
        python = interpreter_for(host.uid)
        drop = {"user": host.uid, "group": host.uid, "extra_groups": []}
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), SECRET_NAME: host.token}
    if os.environ.get("CODERL_SANDBOX_SWITCH_OFF"):
        env["CODERL_SANDBOX_SWITCH_OFF"] = os.environ["CODERL_SANDBOX_SWITCH_OFF"]
    finished = subprocess.run(
        [python, "-c", CALLER, isolation, host.token],  # a secret on its command line too
        input=json.dumps([[task, completion] for _, task, completion in jobs]),
        capture_output=True,
        text=True,
        cwd="/",
        env=env,
        timeout=300,
        **drop,
    )
    if finished.returncode != 0:
        return {"caller": f"exit status {finished.returncode}: {finished.stderr[-500:]}"}
    outcome = json.loads(finished.stdout.splitlines()[-1])
    outcome["caller"] = "survived"
    outcome["verdicts"] = dict(zip([name for name, _, _ in jobs], outcome["results"]))
    return outcome


@pytest.fixture(scope="module", params=[("unprivileged", "basic"), ("root", "auto")], ids=str)
def outcome(request):
    """Every attack, in batches: the lethal ones one per batch, the others all in one, each
    followed by an honest job; the honest programs at the end of every batch."""
    user, isolation = request.param
    if os.geteuid() != 0:
        pytest.skip("needs root, to become an unused uid or to run as root")
    host = Host(UNUSED_ID if user == "unprivileged" else 0)
    try:
        hostile = hostile_jobs(host)
        assert sorted(hostile) == sorted(ATTACKS)
        groups = [[name for name in ATTACKS if name not in LETHAL], *([name] for name in LETHAL)]
        batches = {}
        for number, names in enumerate(groups):
            jobs = []
            for name in names:
                honest_name, task, completion = HONEST[0]
                jobs += [(name, *hostile[name]), (f"{honest_name} {len(jobs)}", task, completion)]
            jobs += HONEST if number == 0 else HONEST[:1]
            batch = run_caller(user, isolation, host, jobs)
            batches.update({name: batch for name in names})
        yield {
            "batches": batches,
            "victim alive": host.victim.poll() is None,
            "victim file": open(host.victim_file).read(),
            "new file": os.path.exists(host.new_file),
            "tmp file": os.path.exists(host.tmp_file),
            "accepted": list(host.accepted),
        }
    finally:
        host.close()


def test_landlock_is_reported_active(outcome):
    described = {batch.get("describe", "") for batch in outcome["batches"].values()}
    assert all("landlock ABI" in text for text in described), described


@pytest.mark.parametrize("attack", ATTACKS)
def test_the_attack_fails_and_the_harness_survives(outcome, attack):
    batch = outcome["batches"][attack]
    assert batch["caller"] == "survived"
    status, detail = batch["verdicts"][attack]
    assert status not in ("passed", "infra_error"), (status, detail)
    before, after = batch["workers"]
    assert before == after  # the worker was never replaced: no run killed it
    honest = {name: v for name, v in batch["verdicts"].items() if name.startswith("honest")}
    assert honest and all(status == "passed" for status, _ in honest.values()), honest


def test_the_host_is_untouched(outcome):
    assert outcome["victim file"] == "original"
    assert not outcome["new file"] and not outcome["tmp file"]
    assert outcome["accepted"] == []
    assert outcome["victim alive"]


def test_describe_names_each_layer_or_why_it_is_missing(monkeypatch):
    from sandbox import Sandbox

    abi = landlock_abi()
    with Sandbox(workers=1, timeout=TIMEOUT) as box:
        layers, _, fallback = box.describe().partition("FALLBACK")
    parts = "fs" + (", tcp" if abi >= 4 else "") + (", scope" if abi >= 6 else "")
    assert f"landlock ABI {abi} ({parts}:" in layers, layers
    assert "seccomp filter (EPERM: socket() but AF_UNIX" in layers, layers
    with Sandbox(workers=1, timeout=TIMEOUT, isolation="basic") as box:
        fallback = box.describe().partition("FALLBACK")[2]
    assert "host files guarded by Landlock" in fallback, fallback
    if abi >= 4:
        assert "TCP refused by Landlock, other sockets but AF_UNIX by seccomp" in fallback
    monkeypatch.setenv("CODERL_SANDBOX_SWITCH_OFF", "landlock,seccomp")
    with Sandbox(workers=1, timeout=TIMEOUT, isolation="basic") as box:
        layers, _, fallback = box.describe().partition("FALLBACK")
    assert "landlock" not in layers and "seccomp filter (" not in layers, layers
    assert "no Landlock (switched off by $CODERL_SANDBOX_SWITCH_OFF)" in fallback, fallback
    assert "no seccomp filter (switched off by $CODERL_SANDBOX_SWITCH_OFF)" in fallback, fallback
    assert "guarded by permissions only" in fallback and "the network is reachable" in fallback


@pytest.mark.parametrize(
    ("abi", "handled", "missing"),
    [
        (1, 0x1FFF, ["TCP", "signals"]),
        (2, 0x3FFF, ["TCP", "signals"]),
        (3, 0x7FFF, ["TCP", "signals"]),
        (4, 0x7FFF, ["signals"]),
        (5, 0xFFFF, ["signals"]),
        (6, 0xFFFF, []),
        (7, 0xFFFF, []),
    ],
)
def test_only_the_rights_an_abi_knows_are_handled(tmp_path, abi, handled, missing):
    """The kernel refuses a ruleset naming rights it does not know: each ABI version's ruleset
    is the one its kernel accepts (those up to this kernel's are tried here, in a child)."""
    from sandboxing.kernel import PR_SET_NO_NEW_PRIVS, Libc
    from sandboxing.landlock import Landlock, handled_fs_rights

    assert handled_fs_rights(abi) == handled
    landlock = Landlock(Libc(), switched_off=False)
    landlock.abi = abi
    _, said = landlock.describe()
    assert [word for word in ("TCP", "signals") if any(word in line for line in said)] == missing
    if abi > landlock_abi():
        return
    landlock.read_dirs = ("/usr",)
    pid = os.fork()
    if pid == 0:
        try:
            ruleset = landlock.prepare(str(tmp_path))
            landlock.libc.prctl(PR_SET_NO_NEW_PRIVS, 1)
            landlock.enforce(ruleset)
            os.listdir(tmp_path)
            try:
                os.listdir("/etc")
            except PermissionError:
                os._exit(0)
            os._exit(2)  # the domain does not hold
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
