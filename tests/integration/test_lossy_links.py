"""Bad UDP links (issue 9, Links): with loss, duplication, reordering and jitter on every link
between the coordinator and its keyed peers, the text is exactly the clean text.

Every peer is a real keyed ``tpfed peer`` process on loopback, reached through its own seeded
:class:`proxies.LossyUdpProxy`; the reference is the single-process int8 forward
(``generate_local``). Run times are printed next to a clean run of the same fleet."""

from __future__ import annotations

import asyncio
import time

import pytest
from proxies import Impairment, LossyUdpProxy, udp_addr

from tpfed.compute.int8_forward import Int8Transformer
from tpfed.model.sampling import Sampler
from tpfed.runtime.localpeers import LocalPeers
from tpfed.runtime.session import Fleet, RunOptions, generate_local

PROMPT = "Once upon a time"
STEPS = 96

HARSH = Impairment(loss=0.10, duplicate=0.05, reorder=0.25, jitter_s=0.002)
LIGHT = Impairment(loss=0.01)


@pytest.fixture(scope="module")
def clean_text(model):
    q8, tok = model
    ids, _ = generate_local(Int8Transformer(q8), tok, PROMPT, STEPS, Sampler(0.0))
    return ids


async def _run(model, impairment: Impairment | None, seed: int, n_peers: int = 3,
               deadline_s: float = 5.0):
    """Generate on ``n_peers`` keyed local peers, each behind a proxy with ``impairment`` both
    ways (none: direct). Returns (token ids, setup s, generation s, proxies)."""
    peers = LocalPeers(n_peers)
    async with peers as uris:
        proxies = []
        if impairment is not None:
            proxies = [LossyUdpProxy(udp_addr(u), up=impairment, seed=seed * 100 + i).start()
                       for i, u in enumerate(uris)]
        try:
            targets = [p.uri for p in proxies] if proxies else uris
            opts = RunOptions(peers=",".join(targets), prompt=PROMPT, steps=STEPS,
                              deadline_s=deadline_s, key_file=peers.key_file)
            t0 = time.perf_counter()
            async with Fleet(opts, model=model) as fleet:
                setup = time.perf_counter() - t0
                t1 = time.perf_counter()
                result = await fleet.generate(PROMPT, Sampler(0.0))
                gen = time.perf_counter() - t1
                resends = fleet.coord.stats.resends
        finally:
            for p in proxies:
                p.stop()
        return result.tokens, setup, gen, proxies, resends


def _report(label: str, setup: float, gen: float, proxies, resends: int) -> None:
    up = sum(p.counts.up.datagrams for p in proxies)
    down = sum(p.counts.down.datagrams for p in proxies)
    lost = sum(p.counts.up.dropped + p.counts.down.dropped for p in proxies)
    dup = sum(p.counts.up.duplicated + p.counts.down.duplicated for p in proxies)
    reo = sum(p.counts.up.reordered + p.counts.down.reordered for p in proxies)
    print(f"\n{label}: setup {setup:.2f} s, {STEPS} positions in {gen:.2f} s; "
          f"{up + down} datagrams, {lost} dropped, {dup} duplicated, {reo} delayed out of order; "
          f"{resends} ACTIVATIONs resent")


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_harsh_links_give_the_clean_text(model, clean_text, seed):
    """10% loss, 5% duplication, 25% reordering, 2 ± 1 ms jitter, both ways on every link."""
    tokens, setup, gen, proxies, resends = asyncio.run(_run(model, HARSH, seed))
    _report(f"harsh links (seed {seed})", setup, gen, proxies, resends)
    assert tokens == clean_text
    assert sum(p.counts.up.dropped + p.counts.down.dropped for p in proxies) > 0


def test_one_percent_loss_gives_the_clean_text(model, clean_text):
    tokens, setup, gen, proxies, resends = asyncio.run(_run(model, LIGHT, 7))
    _report("1% loss", setup, gen, proxies, resends)
    assert tokens == clean_text


def test_clean_links_through_the_proxy_and_direct(model, clean_text):
    """The proxy itself changes nothing; the direct run is the time the others compare with."""
    tokens, setup, gen, proxies, resends = asyncio.run(_run(model, Impairment(), 0))
    _report("clean proxy", setup, gen, proxies, resends)
    assert tokens == clean_text
    tokens, setup, gen, _, resends = asyncio.run(_run(model, None, 0))
    _report("direct", setup, gen, [], resends)
    assert tokens == clean_text
