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

from .udp import UdpEndpoint

SIDE_BYTES = 1 << 20  # datagrams the gather passes back to Python, per call


class UdpFleet:
    """The links of one UDP endpoint, addressable from C."""

    def __init__(self, endpoint: UdpEndpoint | None, links: list, sessions: list | None = None) -> None:
        """``links`` are links of ``endpoint`` or in-process links (with ``in_process()``
        giving their ``tpfed_mem_peer *`` and ``tpfed_peer *``; ``endpoint`` may then be None).
        ``sessions[i]`` is the ``tpfed_auth_session *`` of links[i] (sealing to it and opening
        from it), or None to talk in clear."""
        self.endpoint = endpoint
        self.links = list(links)
        self.index = {id(link): i for i, link in enumerate(self.links)}
        n = max(len(self.links), 1)
        self._mem = ffi.new("char[]", lib.tpfed_udp_fleet_bytes(n))
        fd = endpoint.fileno() if endpoint is not None else -1
        self._fleet = lib.tpfed_udp_fleet_init(self._mem, len(self._mem), fd, n)
        if self._fleet == ffi.NULL:
            raise RuntimeError("tpfed_udp_fleet_init refused its memory")
        for i, link in enumerate(self.links):
            if hasattr(link, "in_process"):
                if lib.tpfed_udp_fleet_add_local(self._fleet, *link.in_process()) < 0:
                    raise ValueError("the fleet refused an in-process peer")
            elif lib.tpfed_udp_fleet_add(self._fleet, link.addr[0].encode(), link.addr[1]) < 0:
                raise ValueError(f"{link.addr[0]} is not a numeric address")
            if sessions is not None and sessions[i] is not None:
                lib.tpfed_udp_fleet_set_auth(self._fleet, i, sessions[i])
        self._sessions = sessions  # kept alive with the fleet
        self._side_buf = ffi.new("uint8_t[]", SIDE_BYTES)
        self._side = ffi.new("tpfed_udp_side *")
        self._side.buf = self._side_buf
        self._side.cap = SIDE_BYTES
        self._frame = ffi.new("uint8_t[]", 65536)
        self._frame_len = ffi.new("uint32_t *")
        self._p = ffi.from_buffer

    def covers(self, links: list) -> bool:
        return all(id(link) in self.index for link in links)

    def indices(self, links: list) -> np.ndarray:
        return np.array([self.index[id(link)] for link in links], np.int32)

    def set_spin(self, spin_us: int) -> None:
        """How long a gather looks again for partials (yielding) before sleeping in poll."""
        lib.tpfed_udp_fleet_set_spin(self._fleet, max(0, int(spin_us)))

    def unreachable(self, i: int, check: bool = False) -> bool:
        """Whether a datagram to fleet peer ``i`` came back unreachable (its process is gone);
        ``check`` reads the socket's error queue first."""
        if check:
            lib.tpfed_udp_fleet_check_errors(self._fleet)
        return lib.tpfed_udp_fleet_unreachable(self._fleet, int(i)) > 0

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
        if self.endpoint is not None:
            st = self.endpoint.stats
            st.bytes_sent += len(frame) * len(peers)
            st.frames_sent += len(peers)

    def stage(self, peers: np.ndarray, group_of: np.ndarray, n_groups: int, session: int,
              seq: int, layer: int, stage: int, pos: int, qs_ptr, d_ptr, dim: int,
              partials: np.ndarray, got: np.ndarray, chosen: np.ndarray, timeout_s: float,
              out: np.ndarray) -> int:
        """One stage in one C call (``tpfed_udp_stage``): build the ACTIVATION from the Q8_0
        vector at ``qs_ptr``/``d_ptr``, send it sealed to every peer, gather the first partial of
        each set and sum them in set order into ``out``. Returns the sets served (``out`` holds
        the sum only when all are); :attr:`frame` is the ACTIVATION for resends."""
        side = self._side
        side.used = 0
        side.count = 0
        p = self._p
        r = lib.tpfed_udp_stage(self._fleet, p("int[]", peers), len(peers), p("int[]", group_of),
                                n_groups, session, seq, layer, stage, pos, qs_ptr, d_ptr, dim,
                                p("float[]", partials), p("uint32_t[]", got), p("int[]", chosen),
                                max(int(timeout_s * 1000), 0), side, p("float[]", out),
                                self._frame, len(self._frame), self._frame_len)
        if side.count:
            self._deliver_side()
        if r < 0:
            raise OSError(-r, f"a stage over the fleet failed: {os.strerror(-r)}")
        return r

    @property
    def frame(self) -> bytes:
        """The last ACTIVATION :meth:`stage` built (laid out sealed, not yet stamped)."""
        return bytes(ffi.buffer(self._frame, self._frame_len[0]))

    def _deliver_side(self) -> None:
        raw = bytes(ffi.buffer(self._side_buf, self._side.used))
        off = 0
        ep = self.endpoint
        while off < len(raw):
            length = int.from_bytes(raw[off:off + 4], "little")
            peer = int.from_bytes(raw[off + 4:off + 8], "little", signed=True)
            data = raw[off + 8:off + 8 + length]
            off += 8 + length
            link = self.links[peer] if peer >= 0 else None
            if link is not None and hasattr(link, "in_process"):  # its link's queue
                link._queue.put(data)
            elif link is not None and ep is not None:
                ep._on_datagram(data, link.addr)
            elif ep is not None:  # not from a peer of this fleet: nobody asked for it
                ep.stats.dropped += 1
