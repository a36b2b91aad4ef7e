"""Generation with boards in the plan (issue: board firmware, emulated boards in the loop).

By default the boards are emulated (``emu:N``: QEMU running the real firmware, driven over its
UART through the serial transport). With ``--board-port PORT`` (repeatable) the same runs go
to real boards instead. Every run must produce exactly the single-device int8 text."""

from __future__ import annotations

import asyncio
import time

import pytest

from tpfed.compute.int8_forward import Int8Transformer, Q8Model
from tpfed.errors import PeerError
from tpfed.model.sampling import Sampler
from tpfed.model.tokenizer import Tokenizer
from tpfed.runtime.session import RunOptions, generate_local, run

pytestmark = pytest.mark.hil

PROMPT = "Once upon a time"
STEPS = 48


@pytest.fixture(scope="module")
def model(stories260k_dir):
    q8 = Q8Model.load(stories260k_dir / "stories260K.bin")
    return q8, Tokenizer.load(stories260k_dir / "tok512.bin", vocab_size=q8.config.vocab_size)


@pytest.fixture(scope="module")
def single_device_tokens(model):
    q8, tok = model
    return generate_local(Int8Transformer(q8), tok, PROMPT, STEPS, Sampler(0.0))[0]


def boards(n: int, ports: list[str]) -> str:
    """``emu:n``, or the first n real boards given with --board-port."""
    if not ports:
        return f"emu:{n}"
    if len(ports) < n:
        pytest.skip(f"needs {n} boards, {len(ports)} given with --board-port")
    return ",".join(p if "://" in p else f"serial://{p}" for p in ports[:n])


@pytest.mark.parametrize("spec", ["boards:2,local:1", "boards:4"])
def test_boards_in_the_plan_give_the_single_device_text(model, single_device_tokens, board_ports, spec):
    parts = [boards(int(s.split(":")[1]), board_ports) if s.startswith("boards:") else s
             for s in spec.split(",")]
    # round-robin: every device, board or desktop, computes its share of every layer
    opts = RunOptions(peers=",".join(parts), prompt=PROMPT, steps=STEPS, strategy="round-robin",
                      deadline_s=10.0)
    result = asyncio.run(run(opts, model=model))
    assert result.tokens == single_device_tokens
    on_boards = [p for p in result.peers if not p["name"].startswith("local")]
    assert on_boards and all(p["kv_groups"] > 0 and p["mlp_columns"] > 0 for p in on_boards)
    s = result.stats
    assert s.min_wire_bytes_per_token <= s.wire_bytes_per_token <= 1.15 * s.min_wire_bytes_per_token


def test_board_reset_mid_run_is_reported(model, board_ports):
    if board_ports:
        pytest.skip("resetting a real board needs a person at the bench")
    from tpfed.runtime.emulator import EmulatedBoards

    async def scenario():
        with EmulatedBoards(2) as emu:
            opts = RunOptions(peers=",".join(b.url for b in emu), prompt=PROMPT, steps=160,
                              strategy="round-robin", deadline_s=2.0)
            statuses: list[str] = []
            task = asyncio.create_task(run(opts, model=model, on_status=statuses.append))
            while not any("weights pushed" in s for s in statuses):
                await asyncio.sleep(0.01)
                assert not task.done(), task.exception()
            await asyncio.sleep(0.2)
            emu[1].stop()  # the board goes away mid-sequence (QEMU runs with -no-reboot)
            t0 = time.monotonic()
            with pytest.raises(PeerError) as err:
                await task
            assert time.monotonic() - t0 < 10
            return str(err.value), emu[1].url

    message, url = asyncio.run(scenario())
    assert url in message
