"""The C test of the peer core and its transport helpers (firmware/test/host/test_core.c),
built with the host's gcc as a 64-bit program, a 32-bit one (where the multilib is installed:
sizes that wrap around in 32 bits are the point) and under ASan+UBSan, and run against the
golden frames."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LIB = REPO / "firmware" / "lib" / "tpfed"

BUILDS = {
    "x86-64": [],
    "32-bit": ["-m32"],
    "asan-ubsan": ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-g"],
}


def _gcc_can(flags: list[str], tmp: Path) -> bool:
    probe = tmp / "probe.c"
    probe.write_text("#include <stdint.h>\n#include <string.h>\nint main(void){return 0;}\n")
    return subprocess.run(["gcc", *flags, str(probe), "-o", str(tmp / "probe")],
                          capture_output=True).returncode == 0


@pytest.mark.parametrize("build", list(BUILDS))
def test_core_c(build: str, tmp_path: Path) -> None:
    if shutil.which("gcc") is None:
        pytest.fail("gcc is needed to build the C core test")
    flags = BUILDS[build]
    if build == "32-bit" and not _gcc_can(flags, tmp_path):
        pytest.skip("no 32-bit gcc multilib here (Debian: gcc-multilib)")
    exe = tmp_path / "test_core"
    sources = sorted(str(p) for p in (LIB / "src").glob("*.c"))
    cmd = ["gcc", "-std=c99", "-Wall", "-Wextra", "-Werror", "-O1", "-ffp-contract=off", *flags,
           "-I", str(LIB / "include"), "-I", str(LIB / "src"),
           str(REPO / "firmware" / "test" / "host" / "test_core.c"), *sources, "-o", str(exe), "-lm"]
    build_out = subprocess.run(cmd, capture_output=True, text=True)
    assert build_out.returncode == 0, build_out.stderr[-4000:]
    run = subprocess.run([str(exe), str(REPO / "shared_protocol" / "golden")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    assert "all checks passed" in run.stdout + run.stderr
