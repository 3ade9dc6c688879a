"""The seccomp filter of every run's process: a classic BPF program refusing a few system
calls (sockets but AF_UNIX ones, ptrace, process_vm_readv/writev, io_uring), checked once
against the kernel."""

from __future__ import annotations

import errno
import os
import platform

from .constants import SWITCH_OFF_ENV
from .kernel import PR_SET_NO_NEW_PRIVS, Libc, SockFilter, SockFprog

# linux/seccomp.h, linux/filter.h, linux/audit.h
_SECCOMP_RET_KILL_PROCESS, _SECCOMP_RET_ERRNO, _SECCOMP_RET_ALLOW = 0x80000000, 0x50000, 0x7FFF0000
_BPF_LD_W_ABS, _BPF_JEQ_K, _BPF_JSET_K, _BPF_RET_K = 0x20, 0x15, 0x45, 0x06
_SECCOMP_DATA_NR, _SECCOMP_DATA_ARCH, _SECCOMP_DATA_ARG0 = 0, 4, 16  # arg0's low half (LE)
_X32_SYSCALL_BIT = 0x40000000
# Per architecture: its AUDIT_ARCH value and the numbers of the system calls refused.
_SECCOMP_ARCHES = {
    "x86_64": (
        0xC000003E,
        {
            "socket": 41,
            "ptrace": 101,
            "process_vm_readv": 310,
            "process_vm_writev": 311,
            "io_uring_setup": 425,
        },
    ),
    "aarch64": (
        0xC00000B7,
        {
            "socket": 198,
            "ptrace": 117,
            "process_vm_readv": 270,
            "process_vm_writev": 271,
            "io_uring_setup": 425,
        },
    ),
}
_AF_UNIX = 1


def seccomp_program(machine: str) -> list[tuple[int, int, int, int]] | None:
    """The filter as (code, jt, jf, k) rows, or None for an architecture it does not know.

    A system call of another architecture's table (i386's socketcall on x86_64, which would
    dodge the socket rule) kills the process; x32 calls, ptrace, process_vm_readv/writev,
    io_uring (whose requests can open sockets unseen by this filter) and socket() of any family
    but AF_UNIX fail with EPERM; everything else is allowed."""
    if machine not in _SECCOMP_ARCHES:
        return None
    arch, numbers = _SECCOMP_ARCHES[machine]
    refused = [numbers[name] for name in ("ptrace", "process_vm_readv", "process_vm_writev")]
    refused.append(numbers["io_uring_setup"])
    # Rows with symbolic jump targets ("eperm", "kill", "socket"), resolved below.
    rows: list[tuple] = [
        (_BPF_LD_W_ABS, 0, 0, _SECCOMP_DATA_ARCH),
        (_BPF_JEQ_K, None, "kill", arch),
        (_BPF_LD_W_ABS, 0, 0, _SECCOMP_DATA_NR),
    ]
    if machine == "x86_64":
        rows.append((_BPF_JSET_K, "eperm", None, _X32_SYSCALL_BIT))
    rows += [(_BPF_JEQ_K, "eperm", None, number) for number in refused]
    rows.append((_BPF_JEQ_K, "socket", None, numbers["socket"]))
    rows.append((_BPF_RET_K, 0, 0, _SECCOMP_RET_ALLOW))
    labels = {"socket": len(rows)}
    rows.append((_BPF_LD_W_ABS, 0, 0, _SECCOMP_DATA_ARG0))
    rows.append((_BPF_JEQ_K, None, "eperm", _AF_UNIX))
    rows.append((_BPF_RET_K, 0, 0, _SECCOMP_RET_ALLOW))
    labels["eperm"] = len(rows)
    rows.append((_BPF_RET_K, 0, 0, _SECCOMP_RET_ERRNO | errno.EPERM))
    labels["kill"] = len(rows)
    rows.append((_BPF_RET_K, 0, 0, _SECCOMP_RET_KILL_PROCESS))

    def offset(target, index: int) -> int:  # None: the next row; jumps only go forward
        jump = 0 if target in (None, 0) else labels[target] - index - 1
        assert 0 <= jump <= 255, (target, index)
        return jump

    return [(code, offset(jt, i), offset(jf, i), k) for i, (code, jt, jf, k) in enumerate(rows)]


class Seccomp:
    """The seccomp filter every run's process installs after its Landlock domain (see
    :func:`seccomp_program`): no socket but AF_UNIX ones (UDP and raw sockets are beyond
    Landlock), no ptrace or process_vm_readv/writev even of the run's own processes, no
    io_uring. It lasts across exec and is inherited by children."""

    def __init__(self, libc: Libc, switched_off: bool):
        self.libc = libc
        self.missing = ""
        self.program: SockFprog | None = None
        rows = seccomp_program(platform.machine())
        if switched_off:
            self.missing = f"switched off by ${SWITCH_OFF_ENV}"
        elif rows is None:
            self.missing = f"no filter written for {platform.machine()}"
        else:
            self._rows = (SockFilter * len(rows))(*(SockFilter(*row) for row in rows))
            self.program = SockFprog(len(rows), self._rows)
            self.missing = self._refused_here()
            if self.missing:
                self.program = None

    def _refused_here(self) -> str:
        """Install it once in a throwaway child: a kernel without seccomp filters refuses it,
        and then no run would start."""
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                self.libc.prctl(PR_SET_NO_NEW_PRIVS, 1)
                self.enforce()
            except OSError as exc:
                code = exc.errno or 1
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        return "" if code == 0 else f"refused by the kernel ({os.strerror(abs(code))})"

    def enforce(self) -> None:
        if self.program is not None:
            self.libc.install_seccomp_filter(self.program)

    def describe(self) -> tuple[str | None, list[str]]:
        if self.program is None:
            return None, [
                f"no seccomp filter ({self.missing}): UDP and raw sockets and ptrace of "
                "the run's own processes are not refused"
            ]
        return (
            "seccomp filter (EPERM: socket() but AF_UNIX, ptrace, process_vm_readv/writev, "
            "io_uring; another architecture's system calls kill the process)",
            [],
        )
