"""A stage over UDP in one C call each way (``firmware/ports/host/tpfed_udp_fleet.h``).

The peers of a :class:`UdpFleet` are links of one :class:`~tpfed.transport.udp.UdpEndpoint`.
``send_all`` hands the same frame to all of them with one ``sendmmsg``; ``gather`` blocks in
C (the GIL released) until each has sent its float32 PARTIAL of the stage, and writes them into
rows of a matrix. Whatever else arrives meanwhile (an ERROR, a fragment, a frame of another
stage) goes back through the endpoint's normal receive path, so the coordinator's slower,
general path sees it and reports or retries.
"""

from __future__ import annotations

import os

import numpy as np

from tpfed.compute._native import ffi, lib

from .udp import UdpEndpoint, UdpLink

SIDE_BYTES = 1 << 20  # datagrams the gather passes back to Python, per call


class UdpFleet:
    """The links of one UDP endpoint, addressable from C."""

    def __init__(self, endpoint: UdpEndpoint, links: list[UdpLink], sessions: list | None = None) -> None:
        """``sessions[i]`` is the ``tpfed_auth_session *`` of links[i] (sealing to it and opening
        from it), or None to talk in clear."""
        self.endpoint = endpoint
        self.links = list(links)
        self.index = {id(link): i for i, link in enumerate(self.links)}
        n = max(len(self.links), 1)
        self._mem = ffi.new("char[]", lib.tpfed_udp_fleet_bytes(n))
        self._fleet = lib.tpfed_udp_fleet_init(self._mem, len(self._mem), endpoint.fileno(), n)
        if self._fleet == ffi.NULL:
            raise RuntimeError("tpfed_udp_fleet_init refused its memory")
        for i, link in enumerate(self.links):
            if lib.tpfed_udp_fleet_add(self._fleet, link.addr[0].encode(), link.addr[1]) < 0:
                raise ValueError(f"{link.addr[0]} is not a numeric address")
            if sessions is not None and sessions[i] is not None:
                lib.tpfed_udp_fleet_set_auth(self._fleet, i, sessions[i])
        self._sessions = sessions  # kept alive with the fleet
        self._side_buf = ffi.new("uint8_t[]", SIDE_BYTES)
        self._side = ffi.new("tpfed_udp_side *")
        self._side.buf = self._side_buf
        self._side.cap = SIDE_BYTES

    def covers(self, links: list) -> bool:
        return all(id(link) in self.index for link in links)

    def indices(self, links: list) -> np.ndarray:
        return np.array([self.index[id(link)] for link in links], np.int32)

    @property
    def auth_dropped(self) -> int:
        return int(lib.tpfed_udp_fleet_auth_dropped(self._fleet))

    def send_all(self, frame: bytes | bytearray, peers: np.ndarray) -> None:
        """``frame`` to every fleet peer in ``peers`` (a frame within the endpoint's MTU); a
        frame laid out sealed is stamped for each peer in its own session."""
        n = lib.tpfed_udp_send_all(self._fleet, ffi.from_buffer(frame), len(frame),
                                   ffi.from_buffer("int[]", peers), len(peers))
        if n < 0:
            raise OSError(-n, f"sending to the fleet failed: {os.strerror(-n)}")
        st = self.endpoint.stats
        st.bytes_sent += len(frame) * len(peers)
        st.frames_sent += len(peers)

    def gather(self, peers: np.ndarray, group_of: np.ndarray, n_groups: int, session: int,
               seq: int, layer: int, stage: int, pos: int, partials: np.ndarray, got: np.ndarray,
               timeout_s: float) -> int:
        """Wait up to ``timeout_s`` until every replica set (``group_of[i]`` is peer i's) has
        one PARTIAL (rows of ``partials``, frame sizes in ``got``; rows already got are kept).
        Returns how many sets are served; datagrams not taken are then delivered to the
        endpoint as if it had received them."""
        side = self._side
        bytes_before, frames_before = int(got.sum()), int(np.count_nonzero(got))
        side.used = 0
        side.count = 0
        n = len(peers)
        r = lib.tpfed_udp_gather(self._fleet, ffi.from_buffer("int[]", peers), n,
                                 ffi.from_buffer("int[]", group_of), n_groups, session, seq,
                                 layer, stage, pos, partials.shape[1],
                                 ffi.from_buffer("float[]", partials),
                                 ffi.from_buffer("uint32_t[]", got),
                                 max(int(timeout_s * 1000), 0), side)
        st = self.endpoint.stats
        st.bytes_received += int(got.sum()) - bytes_before
        st.frames_received += int(np.count_nonzero(got)) - frames_before
        if side.count:
            self._deliver_side()
        if r < 0:
            raise OSError(-r, f"receiving from the fleet failed: {os.strerror(-r)}")
        return r

    def _deliver_side(self) -> None:
        raw = bytes(ffi.buffer(self._side_buf, self._side.used))
        off = 0
        ep = self.endpoint
        while off < len(raw):
            length = int.from_bytes(raw[off:off + 4], "little")
            peer = int.from_bytes(raw[off + 4:off + 8], "little", signed=True)
            data = raw[off + 8:off + 8 + length]
            off += 8 + length
            if peer < 0:  # not from a peer of this fleet: nobody asked for it
                ep.stats.dropped += 1
                continue
            ep._on_datagram(data, self.links[peer].addr)
