"""Shares kept between runs (issue: devices come and go, item 4).

Peers keep the layer shares they hold, by sha256, across assignments and sessions; ASSIGN names
the hashes, the peer answers which it holds, and only the others are pushed. Real ``tpfed peer``
processes on loopback: a second ``tpfed run`` against them pushes no weight bytes and gives the
same text; a recovery onto survivors pushes only the shares that moved."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys

import pytest

from tpfed.compute.int8_forward import Int8Transformer
from tpfed.compute.share import serialize_layer_share
from tpfed.model.sampling import Sampler
from tpfed.planning.plan import LayerShare
from tpfed.runtime.localpeers import LocalPeers
from tpfed.runtime.session import Fleet, RunOptions, generate_local

PROMPT = "Once upon a time"
STEPS = 120


def _share_bytes(q8, plan) -> int:
    return sum(len(serialize_layer_share(q8, layer, s.kv_groups, s.mlp_ranges))
               for d in plan.devices for layer, s in d.layers.items())


def test_second_run_pushes_no_weights(model):
    """``tpfed run --json`` twice against the same three ``tpfed peer`` processes: the first
    pushes every share, the second none (all skipped), and the text is the same."""
    q8, _ = model

    async def scenario():
        peers = LocalPeers(3)
        async with peers as uris:
            outs = []
            for _ in range(2):
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "tpfed", "run", "--peers", ",".join(uris),
                    "--key-file", peers.key_file, "--steps", str(STEPS), "--json", PROMPT,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                out, err = await asyncio.wait_for(proc.communicate(), 120)
                assert proc.returncode == 0, err.decode()[-2000:]
                outs.append(json.loads(out))
            return outs

    first, second = asyncio.run(scenario())
    assert first["weight_bytes_pushed"] > 0 and first["weight_bytes_skipped"] == 0
    assert second["weight_bytes_pushed"] == 0
    assert second["weight_bytes_skipped"] == first["weight_bytes_pushed"]
    assert second["text"] == first["text"] and second["generated_ids"] == first["generated_ids"]
    print("\nfirst run pushed", first["weight_bytes_pushed"], "bytes; the second",
          second["weight_bytes_pushed"], "(skipped", second["weight_bytes_skipped"], ")")


def test_second_fleet_in_process_same_text_no_push(model):
    """The same through :class:`Fleet` (RunOptions with the peers' key file), with the plan
    checked: every share of the second run is skipped, none pushed."""
    q8, _ = model

    async def scenario():
        peers = LocalPeers(2)
        async with peers as uris:
            opts = RunOptions(peers=",".join(uris), prompt=PROMPT, steps=STEPS,
                              key_file=peers.key_file)
            results = []
            for _ in range(2):
                async with Fleet(opts, model=model) as fleet:
                    r = await fleet.generate(PROMPT, Sampler(0.0))
                    results.append((r, _share_bytes(q8, fleet.plan)))
            return results

    (r1, total1), (r2, total2) = asyncio.run(scenario())
    assert total1 == total2
    assert r1.weight_bytes_pushed == total1 and r1.weight_bytes_skipped == 0
    assert r2.weight_bytes_pushed == 0 and r2.weight_bytes_skipped == total2
    assert r2.text == r1.text and r2.tokens == r1.tokens
    assert r2.to_json()["weight_bytes_skipped"] == total2


def _merged(ranges):
    out: list[list[int]] = []
    for a, b in sorted(ranges):
        if out and out[-1][1] == a:
            out[-1][1] = b
        else:
            out.append([a, b])
    return tuple((a, b) for a, b in out)


@pytest.mark.slow
def test_recovery_pushes_only_what_moved(model):
    """Three peers, the third holding units of the last layer only; it is killed mid-run. Its
    units go to a survivor, whose last-layer share changes: that share is pushed, while the
    survivor's other layer shares, held already, are kept (skipped). bytes_moved is exactly
    the changed shares, and the text is the undisturbed one."""
    q8, tok = model
    undisturbed = generate_local(Int8Transformer(q8), tok, PROMPT, STEPS, Sampler(0.0))[0]
    n_layers = q8.config.n_layers

    async def scenario():
        peers = LocalPeers(3)
        async with peers as uris:
            opts = RunOptions(peers=",".join(uris), prompt=PROMPT, steps=STEPS, deadline_s=2.0,
                              key_file=peers.key_file)
            async with Fleet(opts, model=model) as fleet:
                coord = fleet.coord
                plan = coord.plan
                a, b, c = plan.devices
                for layer in range(n_layers - 1):  # c gives b every layer but the last
                    cs, bs = c.layers.pop(layer), b.layers[layer]
                    b.layers[layer] = LayerShare(tuple(sorted(bs.kv_groups + cs.kv_groups)),
                                                 _merged(bs.mlp_ranges + cs.mlp_ranges))
                coord.use_plan(plan)
                await coord.push_weights()
                old = {d.name: dict(d.layers) for d in plan.devices}
                pushed_before = coord.weight_bytes_pushed
                skipped_before = coord.weight_bytes_skipped
                victim = peers.procs[uris.index(c.name)]
                prompt_ids = fleet.tokenizer.encode(PROMPT, bos=True)
                made = [len(prompt_ids)]

                def on_token(prev: int, token: int) -> None:
                    made[0] += 1
                    if made[0] == 40:
                        os.kill(victim.pid, signal.SIGKILL)

                result = await fleet.generate_ids(prompt_ids, Sampler(0.0), on_token=on_token)
                return (result, coord.recoveries, old, coord.plan,
                        coord.weight_bytes_pushed - pushed_before,
                        coord.weight_bytes_skipped - skipped_before)

    result, recoveries, old, new, pushed, skipped = asyncio.run(scenario())
    assert result.tokens == undisturbed
    assert len(recoveries) == 1
    # Per survivor whose assignment changed: the layer shares it did not hold move, the
    # others are kept.
    moved = kept = 0
    for d in new.devices:
        before = old[d.name]
        if before == d.layers:
            continue  # unchanged: not assigned again
        for layer, s in d.layers.items():
            n = len(serialize_layer_share(q8, layer, s.kv_groups, s.mlp_ranges))
            if before.get(layer) == s:
                kept += n
            else:
                moved += n
    assert moved > 0 and kept > 0, (moved, kept)
    assert recoveries[0]["bytes_moved"] == pushed == moved
    assert skipped == kept
    print(f"\nrecovery pushed {moved} bytes (the shares that moved), kept {kept}")
