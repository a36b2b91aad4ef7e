"""CFFI (API mode) build of the firmware's C library for the host.

The host compiles exactly the sources the boards compile: every ``.c`` file in
``firmware/lib/tpfed/src``, plus the host's own port in ``firmware/ports/host`` (the desktop
peer's UDP loop and the coordinator's stage exchange, POSIX sockets). The public headers in
``firmware/lib/tpfed/include`` and ``firmware/ports/host`` are the ABI; the part of each header
between ``// cffi:begin`` and ``// cffi:end`` is handed to ``ffibuilder.cdef`` as is, so it must stay plain C declarations (no preprocessor lines except
integer ``#define`` constants).

Set ``TPFED_KERNELS=ref`` at build time to compile without the optimised variants (the
reference kernels are then the ones selected at run time).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from cffi import FFI

ROOT = Path(__file__).resolve().parents[3]
LIB = ROOT / "firmware" / "lib" / "tpfed"
INCLUDE = LIB / "include"
SRC = LIB / "src"
HOST_PORT = ROOT / "firmware" / "ports" / "host"

_REGION = re.compile(r"//\s*cffi:begin\s*\n(.*?)//\s*cffi:end", re.S)


def _rel(path: Path) -> str:
    # setuptools wants sources relative to the project root (the directory setup.py runs in).
    try:
        return os.path.relpath(path, Path.cwd())
    except ValueError:
        return str(path)


_INCLUDE_LINE = re.compile(r'^#include "([^"]+)"', re.M)


def public_headers() -> list[Path]:
    """Headers with a cffi region, each after the headers it includes (cdef needs the types it
    uses declared first), otherwise in name order."""
    headers = [*sorted(INCLUDE.glob("*.h")), *sorted(HOST_PORT.glob("*.h"))]
    by_name = {h.name: h for h in headers}
    ordered: list[Path] = []

    def visit(h: Path, seen: frozenset[str] = frozenset()) -> None:
        if h in ordered or h.name in seen:
            return
        for dep in _INCLUDE_LINE.findall(h.read_text()):
            if dep in by_name:
                visit(by_name[dep], seen | {h.name})
        ordered.append(h)

    for h in headers:
        visit(h)
    return [p for p in ordered if _REGION.search(p.read_text())]


def cdef_text() -> str:
    return "\n".join(m for h in public_headers() for m in _REGION.findall(h.read_text()))


def c_sources() -> list[Path]:
    return [*sorted(SRC.glob("*.c")), *sorted(HOST_PORT.glob("*.c"))]


ffibuilder = FFI()
ffibuilder.cdef(cdef_text())

_defines = [("TPFED_HOST", "1")]
if os.environ.get("TPFED_KERNELS", "").lower() == "ref":
    _defines.append(("TPFED_REFERENCE_ONLY", "1"))

ffibuilder.set_source(
    "tpfed.compute._native",
    "\n".join(f'#include "{h.name}"' for h in public_headers()),
    sources=[_rel(p) for p in c_sources()],
    include_dirs=[_rel(INCLUDE), _rel(SRC), _rel(HOST_PORT)],
    define_macros=_defines,
    extra_compile_args=["-std=c99", "-O3", "-ffp-contract=off", "-Wall", "-Wextra"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
