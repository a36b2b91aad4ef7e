#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what the tests need (Debian's ARM
# cross compiler and QEMU for the emulated boards, the Python test dependencies, PlatformIO's
# offline pieces), checks generated files and lint, then runs pytest. Extra arguments go to
# pytest (e.g. `tools/test.sh -m "not hil"` or `tools/test.sh --board-port /dev/ttyUSB0`).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v arm-none-eabi-gcc >/dev/null || need_apt+=(gcc-arm-none-eabi)
[ -e /usr/lib/arm-none-eabi/newlib/libc.a ] || need_apt+=(libnewlib-arm-none-eabi)
command -v qemu-system-arm >/dev/null || need_apt+=(qemu-system-arm)
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${need_apt[@]}"
fi

python -m pip install -q --disable-pip-version-check -e ".[test]"
[ -f tools/pio_offline.py ] && python tools/pio_offline.py
python tools/gen_protocol_c.py --check
python tools/gen_golden.py --check
ruff check .
python -m pytest "$@"
