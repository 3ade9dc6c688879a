"""coderl.cpu: which CPUs count as computing bfloat16 in hardware."""

from __future__ import annotations

import subprocess
import sys

from coderl.cpu import bf16_feature_in, cpu_bf16_feature
from tests.helpers import REPO

SAPPHIRE_RAPIDS = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
ZEN4 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n"
SKYLAKE = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\nbugs\t\t: amx_bf16\n"


def test_amx_is_preferred_then_avx512_bf16_and_other_lines_do_not_count():
    assert bf16_feature_in(SAPPHIRE_RAPIDS) == "AMX-bf16"
    assert bf16_feature_in(ZEN4) == "AVX512-BF16"
    assert bf16_feature_in(SKYLAKE) is None  # the name outside the flags line is no flag
    assert bf16_feature_in("") is None


def test_only_linux_reads_cpuinfo_and_an_unreadable_file_means_none(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(SAPPHIRE_RAPIDS)
    assert cpu_bf16_feature(info, "linux") == "AMX-bf16"
    assert cpu_bf16_feature(info, "darwin") is None
    assert cpu_bf16_feature(info, "win32") is None
    assert cpu_bf16_feature(tmp_path / "missing", "linux") is None


def test_the_module_prints_this_machines_feature_for_the_shell():
    done = subprocess.run(
        [sys.executable, "-m", "coderl.cpu"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == (cpu_bf16_feature() or "") + "\n"
