"""Bit flips on an emulated board's serial line (issue 9, Links): a seeded
:class:`proxies.BitFlipTcpProxy` sits between the board's QEMU TCP chardev and the coordinator's
pyserial ``socket://`` link and flips one random bit in a byte with probability 1e-3, in both
directions, from the first byte on (PROVISION and the key handshake included). A run with that
board and one local peer must give exactly the clean text (the single-process int8 forward).

The board is a fresh QEMU board per run, booted without a key: the coordinator provisions it
over the (damaged) serial line (``RunOptions(provision=True)``). The time of each run is printed
next to a run through the same proxy with no flips."""

from __future__ import annotations

import asyncio
import time

import pytest
from proxies import BitFlipTcpProxy
from tpfed.protocol import auth

from tpfed.compute.int8_forward import Int8Transformer, Q8Model
from tpfed.model.sampling import Sampler
from tpfed.model.tokenizer import Tokenizer
from tpfed.runtime.emulator import BoardSpec, EmulatedBoard, board_type
from tpfed.runtime.session import Fleet, RunOptions, generate_local

pytestmark = pytest.mark.hil

PROMPT = "Once upon a time"
STEPS = 48
RATE = 1e-3
ENV = "musca-b1"


@pytest.fixture(scope="module")
def model(stories260k_dir):
    q8 = Q8Model.load(stories260k_dir / "stories260K.bin")
    return q8, Tokenizer.load(stories260k_dir / "tok512.bin", vocab_size=q8.config.vocab_size)


@pytest.fixture(scope="module")
def clean_tokens(model):
    q8, tok = model
    return generate_local(Int8Transformer(q8), tok, PROMPT, STEPS, Sampler(0.0))[0]


@pytest.fixture(scope="module")
def key_file(tmp_path_factory) -> str:
    return str(auth.write_key_file(tmp_path_factory.mktemp("key") / "federation.key",
                                   auth.new_key()))


def _run(model, elf, key_file: str, rate: float, seed: int):
    """One run: a fresh board behind a bit-flipping proxy (``rate`` per byte, both ways) and
    one local peer. Returns (tokens, setup s, generation s, proxy, resends, board output)."""
    spec = BoardSpec(firmware=elf, machine=board_type(ENV).machine, name=f"flips-{seed}")
    with EmulatedBoard(spec) as board, \
            BitFlipTcpProxy(("127.0.0.1", board.port), rate=rate, seed=seed) as proxy:
        opts = RunOptions(peers=f"{proxy.url},local:1", prompt=PROMPT, steps=STEPS,
                          deadline_s=10.0, key_file=key_file, provision=True)

        async def go():
            t0 = time.perf_counter()
            async with Fleet(opts, model=model) as fleet:
                setup = time.perf_counter() - t0
                t1 = time.perf_counter()
                result = await fleet.generate(PROMPT, Sampler(0.0))
                return result, setup, time.perf_counter() - t1, fleet.coord.stats.resends

        try:
            result, setup, gen, resends = asyncio.run(go())
        finally:
            output, alive = board.output(), board.alive  # QEMU still up: the board did not fault
    return result.tokens, setup, gen, proxy, resends, output, alive


def _report(label: str, setup: float, gen: float, proxy: BitFlipTcpProxy, resends: int) -> None:
    print(f"\n{label}: setup {setup:.2f} s, {STEPS} positions in {gen:.2f} s; "
          f"{proxy.bytes['up']} bytes to the board ({proxy.flipped['up']} flipped), "
          f"{proxy.bytes['down']} back ({proxy.flipped['down']} flipped); {resends} resends")


def test_clean_serial_line_through_the_proxy(model, clean_tokens, firmware_elf_of, key_file):
    """The baseline: the same proxy without flips changes nothing (and times a clean run)."""
    tokens, setup, gen, proxy, resends, _, _ = _run(model, firmware_elf_of(ENV), key_file, 0.0, 0)
    _report("clean serial line", setup, gen, proxy, resends)
    assert tokens == clean_tokens
    assert proxy.flipped == {"up": 0, "down": 0}


@pytest.mark.xfail(reason=(
    "at 1e-3 flips/byte a 1 KB frame arrives intact ~35% of the time one way: the coordinator's "
    "bandwidth PROBE (a frame near the board's 1024-byte max_frame, 13% per round trip) exceeds "
    "the deadline, and WEIGHTS chunks of ~1 KB fail after max_tries=8 (~3% per chunk, ~150 "
    "chunks); the coordinator needs smaller probes/chunks on lossy links (reported to the lead)"))
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_bit_flips_on_the_serial_line_give_the_clean_text(model, clean_tokens, firmware_elf_of,
                                                          key_file, seed):
    """1e-3 flips per byte both ways, from PROVISION on: exactly the clean text."""
    tokens, setup, gen, proxy, resends, output, alive = _run(model, firmware_elf_of(ENV),
                                                             key_file, RATE, seed)
    _report(f"bit flips 1e-3/byte (seed {seed})", setup, gen, proxy, resends)
    assert alive, output[-2000:]
    assert tokens == clean_tokens
    assert proxy.flipped["up"] > 0 and proxy.flipped["down"] > 0
