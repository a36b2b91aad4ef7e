"""Generation with boards in the plan (issue: board firmware, emulated boards in the loop).

By default the boards are emulated (``emu:N``: QEMU running the real firmware, driven over its
UART through the serial transport). With ``--board-port PORT`` (repeatable) the same runs go
to real boards instead. Every run must produce exactly the single-device int8 text."""

from __future__ import annotations

import asyncio

import pytest

from tpfed.compute.int8_forward import Int8Transformer, Q8Model
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
    assert s.min_wire_bytes_per_token <= s.wire_bytes_per_token <= 1.3 * s.min_wire_bytes_per_token


def test_board_killed_mid_run_gives_the_undisturbed_text(model, single_device_tokens, board_ports,
                                                         tmp_path):
    """A QEMU board killed mid-sequence: its units move to the survivors (a board and a local
    peer), their KV caches are replayed, and the text is exactly the undisturbed one."""
    if board_ports:
        pytest.skip("killing a real board needs a person at the bench")
    from tpfed.protocol import auth

    from tpfed.runtime.emulator import EmulatedBoards
    from tpfed.runtime.localpeers import LocalPeers
    from tpfed.runtime.session import Fleet

    key = auth.new_key()
    key_file = str(auth.write_key_file(tmp_path / "key", key))

    async def scenario():
        with EmulatedBoards(2) as emu:
            async with LocalPeers(1, key=key) as uris:
                opts = RunOptions(peers=",".join([b.url for b in emu] + uris), steps=STEPS,
                                  strategy="round-robin", deadline_s=3.0, key_file=key_file,
                                  provision=True)
                async with Fleet(opts, model=model) as fleet:
                    prompt_ids = fleet.tokenizer.encode(PROMPT, bos=True)
                    made = [len(prompt_ids)]

                    def on_token(prev: int, token: int) -> None:
                        made[0] += 1
                        if made[0] == 20:
                            emu[1].stop()  # QEMU is gone: its serial link closes

                    result = await fleet.generate_ids(prompt_ids, Sampler(0.0), on_token=on_token)
                    return result, list(fleet.coord.recoveries), emu[1].url

    result, recoveries, url = asyncio.run(scenario())
    assert result.tokens == single_device_tokens
    assert len(recoveries) == 1 and recoveries[0]["devices_left"] == 2
    assert url.split("//")[-1] in recoveries[0]["device"]
    print("\nrecovery:", recoveries)
