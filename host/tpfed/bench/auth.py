"""``tpfed bench auth``: what authenticating every frame costs a run, measured in one run.

There is no unauthenticated mode to compare with (a peer answers nothing unsealed), so the
cost is measured where it is spent and compared with a real run of the same run: the C
sealing (copy, HMAC-SHA256 tag, CRC) of an ACTIVATION and the opening (CRC, tag, replay
window) of a PARTIAL, at the model's frame sizes, on the coordinator's side and on a peer's,
against the time per token of stories260K (or ``--model``) over ``--peers`` local peers.

- The coordinator's share is on every token's critical path: per stage it seals one
  ACTIVATION per owner and opens one PARTIAL per owner.
- A peer opens an ACTIVATION and seals a PARTIAL per stage it takes part in; its share of the
  critical path is one peer's, as the peers work in parallel (on this host they also share its
  cores: the CPU figure counts every peer).
"""

from __future__ import annotations

import numpy as np

from tpfed.compute._native import ffi, lib
from tpfed.protocol import auth
from tpfed.protocol.fastpath import encode_activation, encode_partial
from tpfed.protocol.schema import BROADCAST
from tpfed.runtime import aio
from tpfed.runtime.calibration import best_per_call
from tpfed.runtime.peer_auth import PeerAuth
from tpfed.runtime.session import RunOptions, load_model, run


def seal_open_costs(dim: int) -> tuple[float, float, float, float]:
    """Seconds of C work per frame at this dim: (seal ACTIVATION, open ACTIVATION, seal
    PARTIAL, open PARTIAL), each including the copy or decode the real path does. The
    Python call overhead of this measuring loop is measured and taken off."""
    ks = auth.new_key()
    tx, rx = PeerAuth(ks, 7), PeerAuth(ks, 7)
    q = np.ones(dim, np.int8)
    d = np.full((dim + 31) // 32, 0x3C00, np.uint16)
    act = bytearray(tx.seal(encode_activation(0, 0, 0, q, d, dst=BROADCAST, session=7)))
    part = bytearray(tx.seal(encode_partial(0, 0, 0, np.ones(dim, np.float32), seq=1, session=7,
                                            src=1)))
    results = []
    for frame in (act, part):
        buf = ffi.from_buffer(frame)
        n = len(frame)
        stamp = best_per_call(lambda b=buf, n=n: lib.tpfed_auth_session_stamp(tx.c, b, n), calls=2000)
        window = rx.c.rx  # a fresh counter every time: reset the receiver's window first

        def open_one(b=buf, n=n, w=window) -> None:
            lib.tpfed_auth_session_stamp(tx.c, b, n)
            lib.tpfed_replay_init(ffi.addressof(w))
            lib.tpfed_auth_session_open(rx.c, b, n)

        both = best_per_call(open_one, calls=2000)
        empty = best_per_call(lambda: lib.tpfed_kernels_variant(), calls=2000)  # one Python-to-C call
        # open_one makes three calls (stamp, window reset, open): take off the stamp and the
        # two other calls' overhead; the stamp alone is one call
        results += [max(stamp - empty, 0.0), max(both - stamp - 2 * empty, 0.0)]
    return results[0], results[1], results[2], results[3]


def run_auth_bench(peers: int = 4, steps: int = 200, model: str | None = None,
                   tokenizer: str | None = None, repeat: int = 3) -> dict:
    q8, tok = load_model(model, tokenizer)
    c = q8.config
    seal_act, open_act, seal_part, open_part = seal_open_costs(c.dim)
    best = 0.0
    for _ in range(repeat):
        res = aio.run(run(RunOptions(peers=f"local:{peers}", steps=min(steps, c.seq_len)),
                          model=(q8, tok)))
        best = max(best, res.stats.tokens_per_s)
    token_s = 1.0 / best
    stages = 2 * c.n_layers
    coordinator_s = stages * peers * (seal_act + open_part)
    peer_s = stages * (open_act + seal_part)
    critical = coordinator_s + peer_s
    return {
        "model": c.name, "peers": peers, "tokens_per_s": round(best, 1),
        "ms_per_token": round(1e3 * token_s, 4),
        "seal_activation_us": round(1e6 * seal_act, 3), "open_activation_us": round(1e6 * open_act, 3),
        "seal_partial_us": round(1e6 * seal_part, 3), "open_partial_us": round(1e6 * open_part, 3),
        "coordinator_auth_us_per_token": round(1e6 * coordinator_s, 2),
        "one_peer_auth_us_per_token": round(1e6 * peer_s, 2),
        "critical_path_share": round(critical / token_s, 4),
        "cpu_share": round((coordinator_s + peers * peer_s) / (token_s * 2), 4),
        "note": "auth on the critical path (coordinator + one peer) as a share of the measured "
                "time per token; cpu_share: all auth work over both cores' time",
    }


__all__ = ["run_auth_bench", "seal_open_costs"]
