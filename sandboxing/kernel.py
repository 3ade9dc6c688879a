"""Kernel interfaces the os module lacks: system-call numbers, flags and structures, the libc
calls made through ctypes (namespaces, mounts, prctl, capabilities, Landlock, seccomp), and a
fork without Python's at-fork hooks."""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_SECUREBITS = 1, 4, 24, 28
PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT = 36, 38, 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
# SECBIT_NOROOT, NO_SETUID_FIXUP, KEEP_CAPS, NO_CAP_AMBIENT_RAISE, each with its _LOCKED bit.
_LOCKED_SECUREBITS = 0b11101111
_SYS_MOUNT_SETATTR = 442  # the same number on every architecture
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}
_MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID, _AT_RECURSIVE, _AT_FDCWD = 0x1, 0x2, 0x8000, -100


# Landlock (linux/landlock.h). The system call numbers are the same on every architecture.
_SYS_LANDLOCK_CREATE_RULESET, _SYS_LANDLOCK_ADD_RULE, _SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
_LANDLOCK_CREATE_RULESET_VERSION = 1
_LANDLOCK_RULE_PATH_BENEATH = 1


class LandlockRulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _LandlockPathBeneathAttr(ctypes.Structure):
    _pack_ = 1  # packed in the kernel's header: 12 bytes
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


# seccomp: a classic BPF filter (linux/seccomp.h, linux/filter.h, linux/audit.h).
PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 22, 2


class SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


class Libc:
    """The few libc calls the os module lacks; failures raise OSError as os does."""

    def __init__(self):
        self.lib = ctypes.CDLL(None, use_errno=True)
        self.lib.syscall.restype = ctypes.c_long

    @staticmethod
    def _check(result: int, what: str) -> None:
        if result == -1:
            code = ctypes.get_errno()
            raise OSError(code, f"{what}: {os.strerror(code)}")

    def unshare(self, flags: int) -> None:
        self._check(self.lib.unshare(ctypes.c_int(flags)), "unshare")

    def setns(self, fd: int, nstype: int) -> None:
        self._check(self.lib.setns(ctypes.c_int(fd), ctypes.c_int(nstype)), "setns")

    def mount(self, source: str | None, target: str, fstype: str | None, flags: int, data=None):
        def encode(value):
            return None if value is None else value.encode()

        result = self.lib.mount(
            encode(source), encode(target), encode(fstype), ctypes.c_ulong(flags), encode(data)
        )
        self._check(result, f"mount {target}")

    def umount(self, target: str) -> None:
        self._check(self.lib.umount2(target.encode(), ctypes.c_int(MNT_DETACH)), "umount")

    def prctl(self, option: int, arg: int = 0) -> None:
        zero = ctypes.c_ulong(0)
        result = self.lib.prctl(ctypes.c_int(option), ctypes.c_ulong(arg), zero, zero, zero)
        self._check(result, f"prctl({option})")

    def pivot_root_here(self) -> None:
        """pivot_root(".", ".") and detach the old root: the current directory becomes /."""
        number = _SYS_PIVOT_ROOT.get(platform.machine())
        if number is None:
            raise OSError(errno.ENOSYS, f"pivot_root is unknown on {platform.machine()}")
        self._check(self.lib.syscall(ctypes.c_long(number), b".", b"."), "pivot_root")
        self.umount(".")

    def make_tree_read_only(self, path: str) -> None:
        attr = _MountAttr(_MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID, 0, 0, 0)
        result = self.lib.syscall(
            ctypes.c_long(_SYS_MOUNT_SETATTR),
            ctypes.c_int(_AT_FDCWD),
            path.encode(),
            ctypes.c_uint(_AT_RECURSIVE),
            ctypes.byref(attr),
            ctypes.c_size_t(ctypes.sizeof(attr)),
        )
        self._check(result, "mount_setattr")

    def landlock_abi(self) -> int:
        """The kernel's Landlock ABI version; OSError where it has none or it is disabled."""
        result = self.lib.syscall(
            ctypes.c_long(_SYS_LANDLOCK_CREATE_RULESET),
            None,
            ctypes.c_size_t(0),
            ctypes.c_uint32(_LANDLOCK_CREATE_RULESET_VERSION),
        )
        self._check(result, "landlock_create_ruleset")
        return int(result)

    def landlock_create_ruleset(self, attr: LandlockRulesetAttr, size: int) -> int:
        result = self.lib.syscall(
            ctypes.c_long(_SYS_LANDLOCK_CREATE_RULESET),
            ctypes.byref(attr),
            ctypes.c_size_t(size),
            ctypes.c_uint32(0),
        )
        self._check(result, "landlock_create_ruleset")
        return int(result)

    def landlock_allow_beneath(self, ruleset_fd: int, path_fd: int, access: int) -> None:
        attr = _LandlockPathBeneathAttr(access, path_fd)
        result = self.lib.syscall(
            ctypes.c_long(_SYS_LANDLOCK_ADD_RULE),
            ctypes.c_int(ruleset_fd),
            ctypes.c_int(_LANDLOCK_RULE_PATH_BENEATH),
            ctypes.byref(attr),
            ctypes.c_uint32(0),
        )
        self._check(result, "landlock_add_rule")

    def landlock_restrict_self(self, ruleset_fd: int) -> None:
        result = self.lib.syscall(
            ctypes.c_long(_SYS_LANDLOCK_RESTRICT_SELF), ctypes.c_int(ruleset_fd), ctypes.c_uint32(0)
        )
        self._check(result, "landlock_restrict_self")

    def install_seccomp_filter(self, program: SockFprog) -> None:
        zero = ctypes.c_ulong(0)
        result = self.lib.prctl(
            ctypes.c_int(PR_SET_SECCOMP),
            ctypes.c_ulong(_SECCOMP_MODE_FILTER),
            ctypes.byref(program),
            zero,
            zero,
        )
        self._check(result, "prctl(PR_SET_SECCOMP)")

    def drop_all_capabilities(self) -> None:
        """Lose every capability for good (a child that keeps uid 0 inside a user namespace)."""
        self.prctl(PR_SET_SECUREBITS, _LOCKED_SECUREBITS)
        for cap in range(64):
            try:
                self.prctl(PR_CAPBSET_DROP, cap)
            except OSError:  # EINVAL past the last capability this kernel knows
                break
        self.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
        header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
        data = (_CapData * 2)()
        self._check(self.lib.capset(ctypes.byref(header), ctypes.byref(data)), "capset")


def fork_without_hooks() -> int:
    """fork() without Python's at-fork machinery, which costs about a millisecond of CPU per run
    here (threading's and logging's hooks copy-on-write many pages). Safe in the worker only:
    it is single-threaded and holds the GIL across this call (PyDLL), so no lock can be held by
    another thread. glibc >= 2.34 exports _Fork; elsewhere os.fork() is used."""
    if _RAW_FORK is None:
        return os.fork()
    pid = _RAW_FORK()
    if pid < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"fork: {os.strerror(code)}")
    if pid == 0 and "random" in sys.modules:  # what the skipped hook did: a fresh seed per process
        sys.modules["random"].seed()
    return pid


def _load_raw_fork():
    try:
        raw_fork = ctypes.PyDLL(None, use_errno=True)._Fork
    except AttributeError:
        return None
    raw_fork.restype = ctypes.c_int
    raw_fork.argtypes = []
    return raw_fork


_RAW_FORK = _load_raw_fork()
