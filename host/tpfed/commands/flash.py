"""``tpfed flash``: build and upload the firmware to a board with PlatformIO."""

from __future__ import annotations

import argparse

NAME = "flash"
HELP = "build the board firmware and upload it with PlatformIO (pio run -e ENV -t upload)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--env", required=True,
                        help="PlatformIO environment, e.g. esp32dev, esp32-s3-devkitc-1, esp32-c3-devkitm-1")
    parser.add_argument("--port", required=True, help="serial port of the board, e.g. /dev/ttyUSB0")
    parser.add_argument("--key-file", default=None, metavar="PATH",
                        help="bake this federation key into the firmware (default: $TPFED_KEY_FILE, "
                             "else ~/.config/tpfed/federation.key if it exists; with no key the "
                             "board takes one PROVISION frame on its serial line after each boot)")


def run(args: argparse.Namespace) -> int:
    import configparser
    import shutil
    import subprocess
    import sys
    from importlib.util import find_spec
    from pathlib import Path

    from tpfed.errors import TpfedError
    from tpfed.runtime.emulator import EMULATED_PROFILES, firmware_dir, pio_env

    firmware = firmware_dir()  # a checkout's firmware/, or the sources the package carries
    ini = firmware / "platformio.ini"
    cfg = configparser.ConfigParser(interpolation=None, strict=False)
    cfg.read(ini)
    envs = sorted(s[4:] for s in cfg.sections() if s.startswith("env:"))
    if args.env not in envs:
        raise TpfedError(f"unknown env {args.env!r}; {ini} has: {', '.join(envs)}")

    if args.env in EMULATED_PROFILES:
        raise TpfedError(f"{args.env} is an emulated board (QEMU): it is not flashed; "
                         f"use `--peers emu:N@{args.env}`")
    if find_spec("platformio") is None and shutil.which("pio") is None:
        raise TpfedError("PlatformIO is not installed (pip install platformio)")
    port = Path(args.port)
    if "://" not in args.port and not port.exists():
        raise TpfedError(f"serial port {args.port} does not exist (is the board plugged in?)")
    cmd = [sys.executable, "-m", "platformio", "run", "-d", str(firmware), "-e", args.env,
           "-t", "upload", "--upload-port", args.port]
    env = pio_env()  # an installed package builds in ~/.cache/tpfed
    from tpfed.protocol.auth import key_hex_define
    from tpfed.runtime import keys

    src = keys.key_source(args.key_file)
    if src is not None:
        define = key_hex_define(keys.load_key(src))
        env["PLATFORMIO_BUILD_FLAGS"] = f"{env.get('PLATFORMIO_BUILD_FLAGS', '')} {define}".strip()
        print(f"tpfed flash: building {args.env} with the federation key of {src}", file=sys.stderr)
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise TpfedError(f"PlatformIO could not build or upload env {args.env} to {args.port} "
                         f"(exit {proc.returncode}; see its output above)")
    return 0
