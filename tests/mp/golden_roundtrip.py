# ruff: noqa: UP031
"""Golden-frame checks of mp_codec, written to run unchanged under MicroPython and CPython.

main(golden_dir) reads golden_dir/manifest.json and prints one line per manifest entry
("PASS <file>" or "FAIL <file>: <reason>") and a last line "SUMMARY pass=<n> fail=<m>".
tests/unit/test_protocol_micropython.py runs it inside MicroPython (tests/mp/run_mp.mjs) and,
as a control, under CPython.
"""

import binascii
import json
import sys

import mp_codec

BIG = 4096  # frames longer than this are cut at strided lengths, not at every one


def from_json(obj):
    if isinstance(obj, dict):
        if len(obj) == 1 and '$bytes' in obj:
            return binascii.unhexlify(obj['$bytes'])
        return {k: from_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_json(v) for v in obj]
    return obj


def read(golden_dir, name):
    with open(golden_dir + '/' + name, 'rb') as f:
        return f.read()


def expect_error(data, name, max_payload=mp_codec.MAX_PAYLOAD):
    try:
        mp_codec.decode_frame(data, max_payload)
    except mp_codec.ProtocolError as e:
        if type(e).__name__ != name:
            raise AssertionError('%s instead of %s: %s' % (type(e).__name__, name, e)) from None
        return
    raise AssertionError('no error, expected %s' % name)


def with_crc(body):
    return body + mp_codec.crc32(body).to_bytes(4, 'little')


def diff(got, want, path):
    """First difference between decoded and expected values, or None."""
    if isinstance(want, dict):
        if not isinstance(got, dict) or sorted(got) != sorted(want):
            return '%s: keys %r, expected %r' % (path, sorted(got) if isinstance(got, dict) else got,
                                                 sorted(want))
        for k in want:
            d = diff(got[k], want[k], path + '.' + k)
            if d:
                return d
        return None
    if isinstance(want, list):
        if not isinstance(got, list) or len(got) != len(want):
            return '%s: %r items, expected %d' % (path, len(got) if isinstance(got, list) else got,
                                                  len(want))
        for i in range(len(want)):
            d = diff(got[i], want[i], '%s[%d]' % (path, i))
            if d:
                return d
        return None
    if type(got) is not type(want) or got != want:
        return '%s: %r, expected %r' % (path, got, want)
    return None


def check_frame(golden_dir, e):
    data = read(golden_dir, e['file'])
    h, payload = mp_codec.decode_frame(data)
    for k in e['header']:
        if h[k] != e['header'][k]:
            raise AssertionError('header %s=%r, expected %r' % (k, h[k], e['header'][k]))
    if mp_codec.TYPE_NAMES[h['type']] != e['type']:
        raise AssertionError('type %r, expected %s' % (h['type'], e['type']))
    d = diff(payload, from_json(e['payload']), 'payload')
    if d:
        raise AssertionError(d)
    if mp_codec.crc32_soft(data[:-4]) != int.from_bytes(data[-4:], 'little'):
        raise AssertionError('crc32_soft disagrees with the frame CRC')
    a = e.get('auth')
    if a and (h['counter'] != a['counter'] or h['tag'] != binascii.unhexlify(a['tag'])):
        raise AssertionError('AUTH trailer differs from the manifest')
    if e['reencode']:
        out = mp_codec.encode_frame(h['type'], payload, h['src'], h['dst'], h['seq'],
                                    h['session'], h['flags'], h.get('counter', 0), h.get('tag'))
        if out != data:
            raise AssertionError('re-encoded frame differs')
    if a and mp_codec._sha256 is not None:
        check_sealed(data, a)
    if mp_codec.cobs_decode(mp_codec.cobs_encode(data)) != data:
        raise AssertionError('COBS round trip differs')
    n = len(data)
    step = 1 if n <= BIG else n // 300
    for cut in range(0, n, step):
        expect_error(data[:cut], 'TruncatedFrame')
    for bit in range(32):
        bad = bytearray(data)
        bad[n - 4 + bit // 8] ^= 1 << (bit % 8)
        expect_error(bytes(bad), 'BadCrc')
    expect_error(with_crc(b'\xa6' + data[1:-4]), 'BadMagic')
    expect_error(with_crc(data[:1] + bytes([0x20 | (data[1] & 15)]) + data[2:-4]),
                 'VersionMismatch')


def check_sealed(data, a):
    """The tag verifies with the manifest's session key (unless it was tampered with), and
    sealing the unsealed frame again gives the same bytes."""
    ks = binascii.unhexlify(a['key'])
    try:
        counter = mp_codec.verify(ks, data)
    except mp_codec.BadTag:
        if a['valid']:
            raise AssertionError('tag does not verify') from None
        return
    if not a['valid'] or counter != a['counter']:
        raise AssertionError('tampered tag verifies, or counter %r' % counter)
    plen = len(data) - mp_codec.HEADER_SIZE - mp_codec.AUTH_TRAILER_SIZE - mp_codec.CRC_SIZE
    bare = bytearray(data[:mp_codec.HEADER_SIZE + plen])
    bare[3] &= ~mp_codec.FLAG_AUTH & 0xFF
    bare = bytes(bare) + mp_codec.crc32(bytes(bare)).to_bytes(4, 'little')
    if mp_codec.seal(ks, bare, counter) != data:
        raise AssertionError('sealed again differs')


def check_vectors(golden_dir, e):
    if mp_codec._sha256 is None:
        return
    u = binascii.unhexlify
    args = (u(e['nonce_c']), u(e['nonce_p']), e['device_id'], e['session'])
    names = ('proof_p', 'proof_c', 'session_key')
    for i in range(3):  # (no zip(strict=) in MicroPython)
        want = names[i]
        if mp_codec.auth_derive(u(e['key']), mp_codec.AUTH_LABELS[i], *args) != u(e[want]):
            raise AssertionError('%s differs' % want)


def check_invalid(golden_dir, e):
    data = read(golden_dir, e['file'])
    try:
        mp_codec.decode_frame(data, e.get('max_payload', mp_codec.MAX_PAYLOAD))
    except mp_codec.ProtocolError as x:
        if type(x).__name__ != e['error']:
            raise AssertionError('%s instead of %s: %s' % (type(x).__name__, e['error'], x)) from None
        if x.status != getattr(mp_codec, 'STATUS_' + e['status']):
            raise AssertionError('status %d, expected %s' % (x.status, e['status'])) from None
        return
    raise AssertionError('decoded without error, expected %s' % e['error'])


def check_stream(golden_dir, e):
    data = read(golden_dir, e['file'])
    want = [read(golden_dir, f) for f in e['frames']]
    s = mp_codec.CobsStream()
    got = s.feed(data)
    if got != want or s.dropped != e['dropped']:
        raise AssertionError('%d frames (%d dropped), expected %d (%d dropped)'
                             % (len(got), s.dropped, len(want), e['dropped']))
    s = mp_codec.CobsStream()
    got = []
    for i in range(0, len(data), 97):  # arbitrary chunking
        got += s.feed(data[i:i + 97])
    if got != want:
        raise AssertionError('chunked feed gave %d frames, expected %d' % (len(got), len(want)))
    for frame in want:
        mp_codec.decode_frame(frame)


CHECKS = {'frame': check_frame, 'invalid': check_invalid, 'cobs_stream': check_stream,
          'auth_vectors': check_vectors}


def main(golden_dir):
    with open(golden_dir + '/manifest.json') as f:
        manifest = json.load(f)
    impl = sys.implementation
    print('IMPL %s %s' % (impl.name, '.'.join([str(x) for x in impl.version[:3]])))
    print('CRC %s' % ('binascii' if mp_codec.crc32 is not mp_codec.crc32_soft else 'soft'))
    print('SHA256 %s' % ('hashlib' if mp_codec._sha256 is not None else 'none'))
    passed = failed = 0
    for e in manifest['entries']:
        check = CHECKS.get(e['kind'])
        if check is None:
            continue
        try:
            check(golden_dir, e)
        except Exception as x:  # report and go on: one line per entry
            failed += 1
            print('FAIL %s: %s: %s' % (e.get('file', e['kind']), type(x).__name__, x))
        else:
            passed += 1
            print('PASS %s' % e.get('file', e['kind']))
    print('SUMMARY pass=%d fail=%d' % (passed, failed))
