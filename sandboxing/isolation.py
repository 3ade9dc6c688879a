"""Isolation of the workers and their runs: the namespaces a worker enters at start-up, the
minimal read-only file-system view, the runs' PID namespace, per-run directories and privileges,
the rlimits and environment of a run's process, and the description of every layer.

Landlock and seccomp, the layers each run's process adds last, are in their own modules."""

from __future__ import annotations

import errno
import math
import os
import resource
import shutil
import signal
import sys
from collections.abc import Sequence

from .constants import (
    CANDIDATE_ENV,
    CANDIDATE_UID,
    FILE_SIZE_LIMIT,
    MASKED_PACKAGE_DATA,
    OPEN_FILES_LIMIT,
    PROCESS_LIMIT,
    RUN_DIR,
    WORKER_TMPFS_OPTIONS,
)
from .fdio import write_file
from .kernel import (
    CLONE_NEWNET,
    CLONE_NEWNS,
    CLONE_NEWPID,
    CLONE_NEWUSER,
    MS_BIND,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REC,
    PR_SET_CHILD_SUBREAPER,
    PR_SET_NO_NEW_PRIVS,
    PR_SET_PDEATHSIG,
    Libc,
    fork_without_hooks,
)
from .landlock import Landlock
from .seccomp import Seccomp


class Isolation:
    """The layers a worker managed to set up, and the per-run operations built on them."""

    def __init__(
        self, mode: str, interpreter_prefixes: Sequence[str] = (), switched_off: Sequence[str] = ()
    ):
        self.mode = mode
        self.libc = Libc()
        self.landlock = Landlock(self.libc, "landlock" in switched_off)
        self.seccomp = Seccomp(self.libc, "seccomp" in switched_off)
        self.interpreter_prefixes = tuple(interpreter_prefixes)  # as the caller's Python sees them
        self.user_ns = self.mount_ns = self.net_ns = self.pid_ns = False
        self.minimal_root = self.read_only = self.fresh_proc = False
        self.candidate_uid: int | None = None  # uid untrusted code switches to (None: drop caps)
        self.per_run_tmpfs = False  # untrusted code shares our uid: each run gets a fresh tmpfs
        # Parts of the Python installation under /tmp, bound back onto every private /tmp.
        self.tmp_binds: list[tuple[str, int]] = []
        self.own_proc_fd = -1
        # The zygote is init of a PID namespace nested in ours, which holds only it and the run.
        self.runs_pid_ns = self.runs_proc = False  # runs_proc: that namespace's procfs on /proc
        self.worker_pid_ns_fd = -1
        self.fallbacks: list[str] = []

    # -- start-up -------------------------------------------------------------------------------

    def enter(self, keep_fds: Sequence[int]) -> None:
        """Set up every layer the kernel allows. With a PID namespace this forks: the original
        process only waits for the namespace's init (the real worker) and never returns."""
        os.umask(0o022)
        if self.mode == "basic":
            self.fallbacks.append("namespaces not requested (isolation='basic')")
        else:
            self._enter_namespaces()
        if os.geteuid() == 0 and not self.user_ns:
            self.candidate_uid = CANDIDATE_UID
        if self.pid_ns:
            self._become_namespace_init(keep_fds)
        else:
            self.libc.prctl(PR_SET_CHILD_SUBREAPER, 1)  # escaped descendants come back to us
            self.fallbacks.append("no PID namespace: runs are killed by process group + sweep")
        self.landlock.read_dirs = tuple(
            t for t, _ in visible_paths(self.interpreter_prefixes)["binds"]
        )
        if self.mount_ns:
            self._build_file_system_view()
        if self.minimal_root:  # the names in it are those of the visible tree and private /tmp
            self.landlock.list_dirs = ("/",)
            self.landlock.whole_proc = self.fresh_proc
        self.fallbacks += self._what_stands_in_for_namespaces()

    def _what_stands_in_for_namespaces(self) -> list[str]:
        """The fallback lines of missing namespaces, naming what Landlock and seccomp (when
        active) still refuse there."""
        landlock, lines = self.landlock.abi, []
        if not self.read_only:
            guard = "Landlock" if landlock else "permissions only"
            lines.append(
                f"no private read-only file system: host files guarded by {guard}, "
                "a throwaway directory per run"
            )
        if not self.net_ns:
            if landlock >= 4 and self.seccomp.program is not None:
                lines.append(
                    "no network namespace: TCP refused by Landlock, other sockets but AF_UNIX "
                    "by seccomp; unix sockets bound to a path are reachable"
                )
            else:
                lines.append("no network namespace: the network is reachable")
        if self.candidate_uid is None and not self.user_ns:
            shield = ", whose other processes Landlock shields from it" if landlock >= 6 else ""
            lines.append(f"untrusted code runs as the caller's own uid{shield}")
        return lines

    def _enter_namespaces(self) -> None:
        try:
            self._unshare_with_user_namespace()
            self.user_ns = self.mount_ns = self.net_ns = self.pid_ns = True
            return
        except OSError as exc:
            reason = exc.strerror or str(exc)
        if os.geteuid() == 0:
            try:  # root where user namespaces are refused (e.g. some containers)
                self.libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID)
                self.mount_ns = self.net_ns = self.pid_ns = True
                self.fallbacks.append(f"no user namespace ({reason}): namespaces owned by root")
                return
            except OSError as exc:
                reason = f"{reason}; {exc.strerror or exc}"
        self.fallbacks.append(f"no namespaces ({reason})")

    def _unshare_with_user_namespace(self) -> None:
        """Enter new user, mount, network and PID namespaces and write the id maps.

        As root, a helper forked before the unshare (so it stays outside) maps both 0 and 65534:
        untrusted code can then run as an unprivileged uid that owns nothing. Otherwise only our
        own uid can be mapped (to 0), and untrusted children drop every capability instead."""
        flags = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID
        uid, gid = os.geteuid(), os.getegid()
        if uid != 0:
            self.libc.unshare(flags)
            write_file("/proc/self/setgroups", b"deny")
            write_file("/proc/self/uid_map", f"0 {uid} 1\n".encode())
            write_file("/proc/self/gid_map", f"0 {gid} 1\n".encode())
            self.per_run_tmpfs = True
            return
        go_r, go_w = os.pipe()
        helper = os.fork()
        if helper == 0:
            status = 1
            try:
                os.close(go_w)
                if os.read(go_r, 1) == b"1":
                    mapping = f"0 0 1\n{CANDIDATE_UID} {CANDIDATE_UID} 1\n"
                    write_file(f"/proc/{os.getppid()}/uid_map", mapping.encode())
                    write_file(f"/proc/{os.getppid()}/gid_map", mapping.encode())
                    status = 0
            finally:
                os._exit(status)
        os.close(go_r)
        try:
            self.libc.unshare(flags)
        except OSError:
            os.write(go_w, b"0")
            raise
        else:
            os.write(go_w, b"1")
        finally:
            os.close(go_w)
            _, status = os.waitpid(helper, 0)
        if status != 0:
            raise OSError(errno.EPERM, "could not write the user namespace's id maps")
        self.candidate_uid = CANDIDATE_UID

    def _become_namespace_init(self, keep_fds: Sequence[int]) -> None:
        """Fork the real worker as init of the new PID namespace; the original process waits.

        The init gets SIGKILL when the original process dies (the parent killed it), and with it
        the kernel kills every process of every run."""
        child = os.fork()
        if child != 0:
            for fd in keep_fds:
                os.close(fd)
            _, status = os.waitpid(child, 0)
            os._exit(os.waitstatus_to_exitcode(status) & 0x7F)
        self.libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getpid() != 1:  # kill(-1) below is only safe for the init of our own namespace
            raise RuntimeError("the worker is not the init of its PID namespace")

    def _build_file_system_view(self) -> None:
        self.libc.mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing propagates to the host
        view = visible_paths(self.interpreter_prefixes)
        try:
            self._pivot_into_minimal_root(view)
            self.minimal_root = True
        except OSError as exc:
            self.fallbacks.append(f"no minimal root ({exc.strerror or exc}): the host tree")
            self._limit_nested_namespaces("/proc")
        try:
            self.libc.make_tree_read_only("/")
            self.read_only = True
        except OSError as exc:
            self.fallbacks.append(f"read-only remount failed ({exc.strerror or exc})")
            return
        # Opened now, before the private /tmp covers them: in the minimal root they are the
        # read-only bind mounts just made, in the host tree the host's own directories.
        self.tmp_binds = [
            (target, os.open(target, os.O_PATH | os.O_CLOEXEC))
            for target, _ in view["binds"]
            if target.startswith("/tmp/") and os.path.isdir(target)
        ]
        self.own_proc_fd = os.open("/proc", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self._mount_private_tmp()

    def _mount_private_tmp(self) -> None:
        """A fresh tmpfs on /tmp, with the parts of the Python installation that live under /tmp
        (a virtual environment made by tox or a CI runner...) bound back on top of it,
        read-only: nothing else of the host's /tmp is there."""
        self.libc.mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, WORKER_TMPFS_OPTIONS)
        for target, source_fd in self.tmp_binds:
            os.makedirs(target, mode=0o755, exist_ok=True)
            self._bind_from_fd(source_fd, target)
            # A bind keeps its source's read-only flag; made explicit, the boundary relies on it.
            self.libc.make_tree_read_only(target)

    def _bind_from_fd(self, fd: int, target: str) -> None:
        """Bind mount the tree ``fd`` refers to (covered by /tmp's tmpfs by now) on ``target``.

        The source goes through this process's procfs, reached by a descriptor opened at
        start-up: the procfs on /proc is the runs' one by then, in which we have no entry."""
        os.fchdir(self.own_proc_fd)
        try:
            self.libc.mount(f"self/fd/{fd}", target, None, MS_BIND | MS_REC)
        finally:
            os.chdir("/")

    def _pivot_into_minimal_root(self, view: dict) -> None:
        """Build a tmpfs root holding only what programs and compilers need, and pivot into it.

        Sources are opened before the new root's tmpfs is mounted (over /tmp), so that mount
        cannot hide any of them; bind mounts then go through /proc/self/fd."""
        sources = {target: os.open(src, os.O_PATH | os.O_CLOEXEC) for target, src in view["binds"]}
        devices = {}
        for name in ("null", "zero", "full", "random", "urandom"):
            if os.path.exists(f"/dev/{name}"):
                devices[name] = os.open(f"/dev/{name}", os.O_PATH | os.O_CLOEXEC)
        root = "/tmp"
        self.libc.mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=16m,mode=0755")
        try:
            self._fill_minimal_root(root, view, sources, devices)
            os.chdir(root)
            self.libc.pivot_root_here()
        except OSError:
            os.chdir("/")
            try:  # the host tree is used instead: its /tmp as it was, not a half-built root
                self.libc.umount(root)
            except OSError:
                pass
            raise
        os.chdir("/")

    def _fill_minimal_root(self, root: str, view: dict, sources: dict, devices: dict) -> None:
        """Links, bind mounts (the sources are closed here), masks, /dev, /proc and /tmp."""
        for link, target in view["links"].items():
            os.symlink(target, root + link)
        for target, fd in sources.items():
            os.makedirs(root + target, mode=0o755, exist_ok=True)
            self.libc.mount(f"/proc/self/fd/{fd}", root + target, None, MS_BIND | MS_REC)
            os.close(fd)
        for path in view["masked"]:
            self.libc.mount("tmpfs", root + path, "tmpfs", MS_NOSUID | MS_NODEV, "size=4k")
        os.makedirs(root + "/dev", mode=0o755)
        for name, fd in devices.items():
            with open(f"{root}/dev/{name}", "w"):
                pass
            self.libc.mount(f"/proc/self/fd/{fd}", f"{root}/dev/{name}", None, MS_BIND)
            os.close(fd)
        links = {"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1"}
        links["stderr"] = "/proc/self/fd/2"
        for name, target in links.items():
            os.symlink(target, f"{root}/dev/{name}")
        os.makedirs(root + "/proc", mode=0o555)
        os.makedirs(root + "/tmp", mode=0o755, exist_ok=True)  # holds binds of what is under /tmp
        try:  # a procfs of our own PID namespace: host processes are not listed
            self.libc.mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
            self.fresh_proc = True
        except OSError:
            self.libc.mount("/proc", root + "/proc", None, MS_BIND | MS_REC)
            self.fallbacks.append("host procfs (own procfs refused): host processes are listed")
        self._limit_nested_namespaces(root + "/proc")

    def _limit_nested_namespaces(self, proc: str) -> None:
        """Untrusted code may not create user, mount or network namespaces of its own."""
        if not self.user_ns:
            return
        for kind in ("user", "mnt", "net", "ipc", "uts", "cgroup"):
            try:
                write_file(f"{proc}/sys/user/max_{kind}_namespaces", b"0")
            except OSError:
                pass

    # -- the zygote's PID namespace --------------------------------------------------------------

    def fork_zygote(self) -> int:
        """fork() for the zygote: as init of a new PID namespace nested in ours, where a run
        finds no process but its own and the zygote, which as init of the namespace ignores
        every signal it has no handler for (and, when root, has another uid than runs). Where
        the kernel refuses that namespace, a plain fork: runs then share ours."""
        self.runs_pid_ns = False
        if self.pid_ns:
            try:
                if self.worker_pid_ns_fd < 0:  # while /proc is still our procfs
                    self.worker_pid_ns_fd = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
                self.libc.unshare(CLONE_NEWPID)
                self.runs_pid_ns = True
            except OSError as exc:
                refused = f"runs share the worker's PID namespace ({exc.strerror or exc})"
                if refused not in self.fallbacks:
                    self.fallbacks.append(refused)
        pid = -1
        try:
            pid = fork_without_hooks()
        finally:
            if pid != 0 and self.runs_pid_ns:
                # Our later children (a new zygote) are born in our own namespace again.
                self.libc.setns(self.worker_pid_ns_fd, CLONE_NEWPID)
        return pid

    def mount_runs_proc(self) -> bool:
        """In the zygote: a procfs of the runs' namespace on /proc (read-only, as the rest), so
        that the pids a run finds there are its own. The worker keeps its own by descriptor."""
        if not (self.runs_pid_ns and self.mount_ns):
            return False
        try:
            self.libc.mount("proc", "/proc", "proc", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
        except OSError:
            return False
        return True

    def unmount_runs_proc(self) -> None:
        """The procfs of a dead zygote's namespace, before a new zygote mounts its own."""
        if self.runs_proc:
            self.libc.umount("/proc")
            self.runs_proc = False

    # -- per run --------------------------------------------------------------------------------

    def drop_privileges(self) -> None:
        """In a child, before untrusted code: no capabilities and no new privileges, ever."""
        if self.candidate_uid is not None:
            os.setgroups([])
            os.setresgid(self.candidate_uid, self.candidate_uid, self.candidate_uid)
            os.setresuid(self.candidate_uid, self.candidate_uid, self.candidate_uid)
        elif self.user_ns:
            self.libc.drop_all_capabilities()
        self.libc.prctl(PR_SET_NO_NEW_PRIVS, 1)

    def make_run_dir(self) -> str:
        """A fresh private working directory for one run."""
        if not self.read_only:
            import tempfile

            path = tempfile.mkdtemp(prefix="coderl-sandbox-")
            if self.candidate_uid is not None:
                os.chown(path, self.candidate_uid, self.candidate_uid)
            return path
        if self.per_run_tmpfs:
            self._mount_private_tmp()
        os.mkdir(RUN_DIR, 0o700)
        if self.candidate_uid is not None:
            os.chown(RUN_DIR, self.candidate_uid, self.candidate_uid)
        return RUN_DIR

    def remove_run_dir(self, path: str) -> None:
        if self.read_only and self.per_run_tmpfs:
            self.libc.umount("/tmp")
            return
        try:
            shutil.rmtree(path)
        except OSError:
            if not self.read_only:
                raise
            # Whatever the run left behind, a fresh tmpfs gets rid of it.
            self.libc.umount("/tmp")
            self._mount_private_tmp()

    def describe(self, probe: dict) -> dict:
        layers, fallbacks = [], list(self.fallbacks)
        if self.user_ns:
            layers.append("user namespace")
        if self.runs_pid_ns:
            layers.append(
                "PID namespace (runs get one nested in the worker's, whose init is the zygote: "
                "a run can signal no process but its own; after each run every other process "
                "in it is killed with kill(-1) and reaped)"
            )
        elif self.pid_ns:
            layers.append(
                "PID namespace (the worker is its init; after each run every other process in "
                "it is killed with kill(-1) and reaped)"
            )
        if self.net_ns:
            layers.append("network namespace (no interface up)")
        if self.mount_ns:
            view = "minimal read-only root" if self.minimal_root else "host tree"
            if not self.minimal_root and self.read_only:
                view += ", read-only"
            proc = "own procfs" if self.fresh_proc else "host procfs"
            if self.runs_proc:
                proc = "the runs' own procfs"
            elif self.runs_pid_ns:
                fallbacks.append("runs see the worker's procfs (their own refused), not own pids")
            layers.append(f"mount namespace ({view}, {proc}, private tmpfs /tmp)")
        layers.append(
            f"untrusted code as uid {probe['uid']} with CapEff={probe['cap_eff']}, "
            f"NoNewPrivs={probe['no_new_privs']}"
        )
        layers.append("rlimits (cpu, address space, file size, open files, processes, core)")
        layers.append("own working directory, scrubbed environment, stdin /dev/null")
        landlock, landlock_missing = self.landlock.describe()
        if landlock:
            layers.append(landlock)
        fallbacks += landlock_missing
        seccomp, seccomp_missing = self.seccomp.describe()
        if seccomp:
            layers.append(seccomp)
        fallbacks += seccomp_missing
        layers.append("output drained and capped")
        return {"layers": layers, "fallbacks": fallbacks, "probe": probe}


def visible_paths(interpreter_prefixes: Sequence[str] = ()) -> dict:
    """What the minimal root shows: (target, source) bind mounts, top-level links, masked dirs.

    The Python installation is the worker's prefixes and sys.path (its site-packages included)
    and the prefixes of the caller's interpreter: a worker started with -S does not know it
    runs in a virtual environment, whose directory then holds the site-packages."""
    binds: dict[str, str] = {}
    links: dict[str, str] = {}
    for path in ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(path):
            links[path] = os.readlink(path)
        elif os.path.isdir(path):
            binds[path] = path
    prefixes = (sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix)
    for path in {*prefixes, *interpreter_prefixes, *sys.path}:
        # Bound at the path Python knows (sys.path uses it), from wherever it really is; never
        # the whole root or /tmp, whose private tmpfs gets only what lies below it.
        target = os.path.abspath(path)
        if target not in ("/", "/tmp") and os.path.isdir(path):
            binds[target] = os.path.realpath(path)
    targets = sorted(binds)
    kept = [t for t in targets if not any(t.startswith(o + "/") for o in targets if o != t)]
    masked = []
    for package in MASKED_PACKAGE_DATA:
        data_dir = _package_data_dir(package)
        if data_dir and any(data_dir.startswith(t + "/") for t in kept):
            masked.append(data_dir)
    return {"binds": [(t, binds[t]) for t in kept], "links": links, "masked": masked}


def _package_data_dir(package: str) -> str | None:
    import importlib.util

    try:
        spec = importlib.util.find_spec(package)  # finds, does not import, a top-level package
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    data_dir = os.path.join(list(spec.submodule_search_locations)[0], "data")
    return os.path.abspath(data_dir) if os.path.isdir(data_dir) else None


def confine(iso, run_dir: str, limits: dict, preset: bool) -> None:
    """Limits, privileges and environment of a run's process. Every step costs CPU on each run
    (copy-on-write faults), so only what differs from the forking process's state is done: the
    worker already has the scrubbed environment, and the zygote the per-worker limits."""
    os.setsid()
    if not iso.pid_ns:  # with PID namespaces the worker's death kills every run anyway
        iso.libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    os.chdir(run_dir)
    _set_limit(resource.RLIMIT_CPU, cpu_limit(limits))
    _set_limit(resource.RLIMIT_AS, limits["memory_mb"] << 20)
    _set_limit(resource.RLIMIT_FSIZE, limits.get("file_size", FILE_SIZE_LIMIT))
    if "stack" in limits:
        _set_limit(resource.RLIMIT_STACK, limits["stack"])
    if not preset:
        set_per_worker_limits()
    ruleset = iso.landlock.prepare(run_dir)
    iso.drop_privileges()
    iso.landlock.enforce(ruleset)
    iso.seccomp.enforce()
    if run_dir != os.environ.get("TMPDIR"):  # fallback mode: a per-run directory
        os.environ.clear()
        os.environ.update(candidate_env(run_dir))
    if "tempfile" in sys.modules:
        sys.modules["tempfile"].tempdir = None
    signal.signal(signal.SIGALRM, signal.SIG_DFL)  # the worker's deadline handler


def set_per_worker_limits() -> None:
    _set_limit(resource.RLIMIT_NOFILE, OPEN_FILES_LIMIT)
    _set_limit(resource.RLIMIT_NPROC, PROCESS_LIMIT)
    # 1, not 0: at 1 the kernel skips core dumps even when core_pattern is a pipe.
    _set_limit(resource.RLIMIT_CORE, 1)


def _set_limit(kind: int, value: int) -> None:
    """soft = hard = value, or the inherited hard limit if that is lower (raising it is not
    allowed, and a lower limit is only stricter)."""
    _, hard = resource.getrlimit(kind)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(kind, (value, value))


def cpu_limit(limits: dict) -> int:
    return int(math.ceil(limits["cpu"]))


def candidate_env(run_dir: str) -> dict[str, str]:
    env = dict(CANDIDATE_ENV)
    env["HOME"] = env["TMPDIR"] = run_dir
    return env
