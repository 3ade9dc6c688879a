"""The Landlock domain of every run's process: the file-system, TCP and scope rights the
kernel's ABI knows, the ruleset built for one run, and the line describe() gives it."""

from __future__ import annotations

import errno
import os

from .constants import SWITCH_OFF_ENV
from .kernel import LandlockRulesetAttr, Libc

# Rights (linux/landlock.h).
_LL_FS_EXECUTE, _LL_FS_WRITE_FILE, _LL_FS_READ_FILE, _LL_FS_READ_DIR = 1, 2, 4, 8
_LL_FS_TRUNCATE, _LL_FS_IOCTL_DEV = 1 << 14, 1 << 15
_LL_FS_REFER = 1 << 13
_LL_NET_BIND_TCP, _LL_NET_CONNECT_TCP = 1, 2
_LL_SCOPE_ABSTRACT_UNIX_SOCKET, _LL_SCOPE_SIGNAL = 1, 2
_LL_FS_READ_EXECUTE = _LL_FS_EXECUTE | _LL_FS_READ_FILE | _LL_FS_READ_DIR
# Device nodes a run may open (no ioctl): read-write, or read-only for the random sources.
_LL_DEVICES = {
    "/dev/null": _LL_FS_READ_FILE | _LL_FS_WRITE_FILE | _LL_FS_TRUNCATE,
    "/dev/zero": _LL_FS_READ_FILE | _LL_FS_WRITE_FILE | _LL_FS_TRUNCATE,
    "/dev/full": _LL_FS_READ_FILE | _LL_FS_WRITE_FILE | _LL_FS_TRUNCATE,
    "/dev/random": _LL_FS_READ_FILE,
    "/dev/urandom": _LL_FS_READ_FILE,
}


def handled_fs_rights(abi: int) -> int:
    """The file-system rights the kernel of Landlock ABI ``abi`` knows (and so can refuse)."""
    handled = (1 << 13) - 1  # ABI 1: EXECUTE .. MAKE_SYM
    if abi >= 2:
        handled |= _LL_FS_REFER
    if abi >= 3:
        handled |= _LL_FS_TRUNCATE
    if abi >= 5:
        handled |= _LL_FS_IOCTL_DEV
    return handled


class Landlock:
    """The Landlock domain every run's process enters, after its set-up and before its code.

    Files: read and execute beneath the directories of the visible tree (the system directories
    and the Python installation, as :func:`.isolation.visible_paths` lists them; the compiler
    and its headers and libraries are under ``/usr``), read beneath ``/proc`` where it is a procfs of
    the sandbox's own PID namespace (else beneath the process's own ``/proc/<pid>`` only), a
    few device nodes, and every right beneath the run's own directory; nothing else, whatever
    the file permissions say. Network (ABI 4): TCP bind and connect are handled with no rule,
    so both are refused. Scope (ABI 6): signals and abstract unix sockets reach only processes
    of the run's own domain. The domain also keeps a run from ptracing (or reading the
    ``environ`` and ``mem`` of) any process outside it. Without namespaces (they are refused,
    or ``isolation="basic"``) it is the boundary; under namespaces a second one. Only the
    rights the kernel's ABI knows are handled: an older kernel refuses fewer things, and
    describe() says which."""

    def __init__(self, libc: Libc, switched_off: bool):
        self.libc = libc
        self.abi = 0
        self.missing = ""  # why there is no Landlock layer (abi == 0)
        self.read_dirs: tuple[str, ...] = ()
        self.list_dirs: tuple[str, ...] = ()  # only their entries' names (and their subfolders')
        self.whole_proc = False  # True where /proc lists only the sandbox's own processes
        if switched_off:
            self.missing = f"switched off by ${SWITCH_OFF_ENV}"
            return
        try:
            self.abi = libc.landlock_abi()
        except OSError as exc:
            known = {errno.ENOSYS: "the kernel has none", errno.EOPNOTSUPP: "disabled at boot"}
            self.missing = known.get(exc.errno, exc.strerror or str(exc))

    def prepare(self, run_dir: str) -> int | None:
        """The run's ruleset (a descriptor), built while the child still has its privileges:
        paths are opened as the worker, not as the uid untrusted code gets."""
        if not self.abi:
            return None
        handled_fs = handled_fs_rights(self.abi)
        attr, size = LandlockRulesetAttr(handled_fs, 0, 0), 8
        if self.abi >= 4:
            attr.handled_access_net, size = _LL_NET_BIND_TCP | _LL_NET_CONNECT_TCP, 16
        if self.abi >= 6:
            attr.scoped, size = _LL_SCOPE_ABSTRACT_UNIX_SOCKET | _LL_SCOPE_SIGNAL, 24
        ruleset = self.libc.landlock_create_ruleset(attr, size)
        try:
            for path in self.read_dirs:
                self._allow(ruleset, path, _LL_FS_READ_EXECUTE, required=False)
            for path in self.list_dirs:
                self._allow(ruleset, path, _LL_FS_READ_DIR, required=False)
            # /proc/self resolves to the process's own directory: in the host's procfs, other
            # processes' command lines and status stay out of reach.
            proc = "/proc" if self.whole_proc else "/proc/self"
            self._allow(ruleset, proc, _LL_FS_READ_FILE | _LL_FS_READ_DIR, required=False)
            for path, access in _LL_DEVICES.items():
                self._allow(ruleset, path, access & handled_fs, required=False)
            self._allow(ruleset, run_dir, handled_fs, required=True)
        except BaseException:
            os.close(ruleset)
            raise
        return ruleset

    def _allow(self, ruleset: int, path: str, access: int, required: bool) -> None:
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            if required:
                raise
            return  # not there (or not reachable): nothing beneath it to allow
        try:
            self.libc.landlock_allow_beneath(ruleset, fd, access)
        finally:
            os.close(fd)

    def enforce(self, ruleset: int | None) -> None:
        """Enter the domain (needs no_new_privs, set just before); it lasts across exec."""
        if ruleset is None:
            return
        try:
            self.libc.landlock_restrict_self(ruleset)
        finally:
            os.close(ruleset)

    def describe(self) -> tuple[str | None, list[str]]:
        """The layer's line (None where it is missing) and what it cannot do here."""
        if not self.abi:
            return None, [
                f"no Landlock ({self.missing}): files guarded by the namespaces or by "
                "permissions only, signals and TCP not restricted by it"
            ]
        parts, missing = ["fs"], []
        if self.abi >= 4:
            parts.append("tcp")
        else:
            missing.append(f"Landlock ABI {self.abi} cannot refuse TCP (ABI 4 can)")
        if self.abi >= 6:
            parts.append("scope")
        else:
            missing.append(
                f"Landlock ABI {self.abi} cannot scope signals and abstract unix sockets "
                "(ABI 6 can)"
            )
        line = (
            f"landlock ABI {self.abi} ({', '.join(parts)}: read/execute beneath the system "
            "and Python directories only, write beneath the run's directory only"
            + (", TCP bind/connect refused" if self.abi >= 4 else "")
            + (", signals and abstract unix sockets within the run only" if self.abi >= 6 else "")
            + ")"
        )
        return line, missing
