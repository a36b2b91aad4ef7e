import pytest

from tpfed.runtime.peerspec import PeerSpecError, parse_peers


def test_local_and_uris_mix_in_order():
    peers = parse_peers("local:2,udp://127.0.0.1:9000,emu:1,socket://localhost:4321")
    assert [p.kind for p in peers] == ["local", "local", "udp", "emu", "socket"]
    assert peers[2].host == "127.0.0.1" and peers[2].port == 9000
    assert peers[4].uri == "socket://localhost:4321"
    assert peers[3].is_stream and not peers[0].is_stream


def test_serial_forms():
    (a,) = parse_peers("serial:///dev/ttyUSB0?baud=115200")
    assert (a.kind, a.device, a.baud) == ("serial", "/dev/ttyUSB0", 115200)
    (b,) = parse_peers("/dev/ttyACM1")
    assert (b.device, b.baud) == ("/dev/ttyACM1", 921600)


@pytest.mark.parametrize(
    "bad",
    ["", "local:0", "local:x", "udp://host", "udp://host:0", "udp://:80", "tcp://a:1",
     "serial://?baud=9", "serial:///dev/x?baud=fast", "local:2,,local:1", "local:1000"],
)
def test_bad_specs_give_one_clear_error(bad):
    with pytest.raises(PeerSpecError):
        parse_peers(bad)


def test_emulated_board_kind_is_chosen_with_at():
    peers = parse_peers("emu:2@lm3s6965evb,emu:1")
    assert [(p.kind, p.device) for p in peers] == [("emu", "lm3s6965evb")] * 2 + [("emu", "")]
    with pytest.raises(PeerSpecError):
        parse_peers("local:2@lm3s6965evb")
