"""Firmware size figures and what of stories260K fits on N emulated boards.

Prints, for each PlatformIO env of firmware/platformio.ini that builds here, flash and RAM use
(text/data/bss of firmware.elf, via arm-none-eabi-size), then the arena a stories260K shard
needs on 1, 2 and 4 boards: int8 weights (Q8_0: rows*cols + rows*ceil(cols/32)*2 bytes per
matrix; wo quantised per KV group) plus the float32 KV cache for a stated sequence length, and,
for each emulated board (lm3s6965evb, musca-b1), whether that fits its arena and the longest
sequence that would.

Usage: python tools/firmware_sizes.py [--seq-len 256] [--no-build]
"""

from __future__ import annotations

import argparse
import configparser
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIRMWARE = REPO / "firmware"
OFFLINE_ENVS = ("lm3s6965evb", "musca-b1")  # the envs that build without PlatformIO's registry
PEER_MAX_FRAME = 1024  # TPFED_BOARD_MAX_FRAME (firmware/ports/common/main.c)
# tpfed_peer_init: the peer's own state (sizeof(struct tpfed_peer) on a 32-bit board, 8-aligned)
# and the transmit buffer lead the arena. (The COBS receive buffer is a separate static array.)
PEER_STATE = 144
PEER_FIXED = -(-PEER_STATE // 8) * 8 + -(-PEER_MAX_FRAME // 8) * 8
PEER_WORK_RESERVE = 4096  # tpfed_peer: announced arena excludes this (compute buffers)

# stories260K geometry
DIM, HIDDEN, N_LAYERS, N_HEADS, N_KV, HEAD = 64, 172, 5, 8, 4, 8
GQ = (N_HEADS // N_KV) * HEAD  # query width of one KV group


def q8(rows: int, cols: int) -> int:
    return rows * cols + rows * -(-cols // 32) * 2


def group_bytes() -> int:
    """One KV group of one layer: wq rows, wk/wv rows, its wo columns (dim, gq)."""
    return q8(GQ, DIM) + 2 * q8(HEAD, DIM) + q8(DIM, GQ)


def mlp_bytes(n: int) -> int:
    return 2 * q8(n, DIM) + q8(DIM, n)


def split_hidden(n_boards: int) -> list[int]:
    """Hidden columns per board when ranges are 32-aligned and split as evenly as can be."""
    blocks = -(-HIDDEN // 32)
    per = [blocks // n_boards + (1 if i < blocks % n_boards else 0) for i in range(n_boards)]
    widths, start = [], 0
    for b in per:
        end = min(start + 32 * b, HIDDEN)
        widths.append(end - start)
        start = end
    return widths


@dataclass
class Shard:
    boards: int
    weights: int  # largest board's weight bytes, all layers
    kv_per_pos: int  # its KV bytes per position, all layers

    def need(self, seq_len: int) -> int:
        return self.weights + self.kv_per_pos * seq_len


def shards(n_boards: int) -> Shard:
    groups = [N_KV // n_boards + (1 if i < N_KV % n_boards else 0) for i in range(n_boards)]
    widths = split_hidden(n_boards)
    per_board = [N_LAYERS * (g * group_bytes() + mlp_bytes(w)) for g, w in zip(groups, widths, strict=True)]
    worst = max(range(n_boards), key=lambda i: per_board[i])
    return Shard(n_boards, per_board[worst], N_LAYERS * groups[worst] * 2 * HEAD * 4)


def env_sizes(env: str, build: bool) -> dict[str, int] | str:
    elf = FIRMWARE / ".pio" / "build" / env / "firmware.elf"
    if build:
        subprocess.run([sys.executable, str(REPO / "tools" / "pio_offline.py")], check=True,
                       capture_output=True)
        proc = subprocess.run([sys.executable, "-m", "platformio", "run", "-e", env, "-d", str(FIRMWARE)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            return "build failed: " + (proc.stdout + proc.stderr).strip().splitlines()[-1]
    if not elf.is_file():
        return "not built"
    if not shutil.which("arm-none-eabi-size"):
        return "arm-none-eabi-size not installed"
    out = subprocess.run(["arm-none-eabi-size", "-A", "-d", str(elf)], capture_output=True, text=True,
                         check=True).stdout
    sec = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\.\S+)\s+(\d+)", out, re.M)}
    text = sec.get(".isr_vector", 0) + sec.get(".text", 0) + sec.get(".ARM.exidx", 0)
    return {"text": text, "data": sec.get(".data", 0), "bss": sec.get(".bss", 0),
            "stack": sec.get(".stack", 0)}


def arena_size(env: str) -> int | None:
    cfg = configparser.ConfigParser(interpolation=None, strict=False)
    cfg.read(FIRMWARE / "platformio.ini")
    flags = cfg.get(f"env:{env}", "build_flags", fallback="")
    m = re.search(r"-DTPFED_ARENA_SIZE=(\d+)", flags)
    return int(m.group(1)) if m else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=256, help="KV cache length to size for (default 256)")
    ap.add_argument("--no-build", action="store_true", help="use existing builds only")
    args = ap.parse_args(argv)
    if args.seq_len < 1:
        ap.error("--seq-len must be at least 1")
    cfg = configparser.ConfigParser(interpolation=None, strict=False)
    cfg.read(FIRMWARE / "platformio.ini")
    print("firmware (bytes)")
    print(f"  {'env':<22}{'flash':>8}{'text':>8}{'data':>7}{'bss':>8}{'stack':>7}{'RAM':>8}")
    for env in sorted(s[4:] for s in cfg.sections() if s.startswith("env:")):
        if env not in OFFLINE_ENVS:
            print(f"  {env:<22}needs PlatformIO's registry (espressif32); not buildable offline")
            continue
        s = env_sizes(env, build=not args.no_build)
        if isinstance(s, str):
            print(f"  {env:<22}{s}")
            continue
        ram = s["data"] + s["bss"] + s["stack"]
        print(f"  {env:<22}{s['text'] + s['data']:>8}{s['text']:>8}{s['data']:>7}{s['bss']:>8}"
              f"{s['stack']:>7}{ram:>8}")

    # What the peer can give to weights + KV: the arena less its frame buffers and work reserve.
    room = {env: max((arena_size(env) or 0) - PEER_FIXED - PEER_WORK_RESERVE, 0) for env in OFFLINE_ENVS}
    print(f"\nstories260K int8 shards (Q8_0 weights + f32 KV for seq_len {args.seq_len}), "
          f"largest board's share")
    print(f"  whole model weights: {N_LAYERS * (N_KV * group_bytes() + mlp_bytes(HIDDEN))} bytes")
    for env in OFFLINE_ENVS:
        print(f"  {env} arena: {arena_size(env) or 0} bytes, about {room[env]} for weights + KV "
              f"(after the peer's frame buffers and {PEER_WORK_RESERVE} B work reserve)")
    head = "".join(f"  {'fits ' + env:>18}{'max seq':>8}" for env in OFFLINE_ENVS)
    print(f"  {'boards':>6}{'weights':>10}{'KV/pos':>8}{'need':>10}{head}")
    for n in (1, 2, 4):
        sh = shards(n)
        need = sh.need(args.seq_len)
        cols = ""
        for env in OFFLINE_ENVS:
            longest = (room[env] - sh.weights) // sh.kv_per_pos
            fits = "yes" if need <= room[env] else "no"
            cols += f"  {fits:>18}{longest if longest > 0 else 'none':>8}"
        print(f"  {n:>6}{sh.weights:>10}{sh.kv_per_pos:>8}{need:>10}{cols}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
