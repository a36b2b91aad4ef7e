#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what the tests need (Debian's ARM
# cross compiler and QEMU for the emulated boards, node for MicroPython's WebAssembly build, the
# Python test dependencies, PlatformIO's offline pieces), checks generated files and lint, then
# runs pytest. Extra arguments go to
# pytest (e.g. `tools/test.sh -m "not hil"` or `tools/test.sh --board-port /dev/ttyUSB0`).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v arm-none-eabi-gcc >/dev/null || need_apt+=(gcc-arm-none-eabi)
[ -e /usr/lib/arm-none-eabi/newlib/libc.a ] || need_apt+=(libnewlib-arm-none-eabi)
command -v qemu-system-arm >/dev/null || need_apt+=(qemu-system-arm)
command -v npm >/dev/null || need_apt+=(nodejs npm)  # MicroPython's WebAssembly build runs on node
# the C core's 32-bit test build and the fuzzers (libFuzzer + ASan/UBSan, 64 and 32 bits)
dpkg -s g++-multilib >/dev/null 2>&1 || need_apt+=(g++-multilib)   # brings gcc-multilib
command -v clang >/dev/null || need_apt+=(clang)
dpkg -s libclang-rt-14-dev >/dev/null 2>&1 || need_apt+=(libclang-rt-14-dev)
command -v mosquitto >/dev/null || need_apt+=(mosquitto)   # the MQTT fleet bus tests
command -v chromium >/dev/null || need_apt+=(chromium)     # the dashboard test (headless)
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${need_apt[@]}"
fi

python -m pip install -q --disable-pip-version-check -e ".[test]"
[ -f tools/pio_offline.py ] && python tools/pio_offline.py
python tools/gen_protocol_c.py --check
python tools/gen_golden.py --check
python tools/gen_mp_codec.py --check
# MicroPython's WebAssembly build, for the board codec's test (tests/unit/test_protocol_micropython.py);
# installed once into a cache outside the repo, where the test looks for it.
MP_NPM="${XDG_CACHE_HOME:-$HOME/.cache}/tpfed/npm"
MP_PKG="@micropython/micropython-webassembly-pyscript"
MP_VERSION="1.27.0"  # keep in step with MP_VERSION in that test
if ! grep -qs "\"version\": \"$MP_VERSION\"" "$MP_NPM/node_modules/$MP_PKG/package.json"; then
  npm install --prefix "$MP_NPM" --no-audit --no-fund --loglevel=error "$MP_PKG@$MP_VERSION"
fi
ruff check .
# the fuzzers, briefly (each harness 64- and 32-bit; longer runs: tools/fuzz.sh --runs 1000000)
bash tools/fuzz.sh "${TPFED_FUZZ_SECONDS:-5}"
python -m pytest "$@"
