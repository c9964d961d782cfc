"""Generated input for the PROXY protocol header reader (``esmtpfa.smtp.proxy``, over
``internals.parse_proxy_header``).

The header is the first thing a connection sends and decides whose address every limit,
throttle and log line uses, so: any octets, split any way, give the same verdict as when
they come in one read, and that verdict is a ``Header`` or a ``HeaderProblem`` value,
never an exception; the reader never holds more than the protocol's own bound (107
octets for v1, 16 plus the 16-bit length for v2); and a header written by the
specification's grammar (section 2.1 for v1, 2.2 for v2) names exactly the addresses
and ports written in it.
"""

from __future__ import annotations

import ipaddress
import struct

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.trial import unittest

from esmtpfa.common import internals
from esmtpfa.smtp.proxy import V1_MAX, V2_FIXED, Header, HeaderProblem, HeaderReader
from tests.test_properties_smtp import PROPERTY, in_pieces

SIGNATURE = internals.PROXY_V2_SIGNATURE
IPV4 = st.ip_addresses(v=4)
IPV6 = st.ip_addresses(v=6)
PORTS = st.integers(0, 65535)


def v1(family: str, source, destination, sport: int, dport: int) -> bytes:
    return f"PROXY {family} {source} {destination} {sport} {dport}\r\n".encode()


def v2(source, destination, sport: int, dport: int, tlvs: bytes = b"",
       command: int = 0x21) -> bytes:
    if source.version == 4:
        family, body = 0x11, source.packed + destination.packed
    else:
        family, body = 0x21, source.packed + destination.packed
    body += struct.pack("!HH", sport, dport) + tlvs
    return SIGNATURE + bytes([command, family]) + struct.pack("!H", len(body)) + body


def pairs(strategy):
    return st.tuples(strategy, strategy)


V1_HEADERS = st.one_of(
    st.tuples(pairs(IPV4), pairs(PORTS)).map(
        lambda t: (v1("TCP4", *t[0], *t[1]), t)),
    st.tuples(pairs(IPV6), pairs(PORTS)).map(
        lambda t: (v1("TCP6", *t[0], *t[1]), t)))
TLVS = st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=20)), max_size=3).map(
    lambda items: b"".join(bytes([kind]) + struct.pack("!H", len(value)) + value
                           for kind, value in items))
V2_HEADERS = st.one_of(
    st.tuples(pairs(IPV4), pairs(PORTS), TLVS), st.tuples(pairs(IPV6), pairs(PORTS), TLVS)
).map(lambda t: (v2(*t[0], *t[1], t[2]), (t[0], t[1])))

#: Near-headers: a valid header's tokens with one replaced by something a broken or
#: hostile proxy might write.
V1_TOKENS = st.sampled_from([
    b"PROXY", b"TCP4", b"TCP6", b"UNKNOWN", b"UDP4", b"192.0.2.1", b"::1", b"2001:db8::7",
    b"::ffff:192.0.2.1", b"192.0.2.256", b"01.2.3.4", b"fe80::1%eth0", b"25", b"0",
    b"65535", b"65536", b"-1", b"+25", b"1_0", b" ", b"", b"\xd9\xa3", b"\xff", b"\r\n",
    b"\n", b"\r"])
NEAR_V1 = st.one_of(
    st.tuples(V1_HEADERS, st.integers(0, 6), V1_TOKENS).map(
        lambda t: b" ".join(t[0][0][:-2].split(b" ")[:t[1]] + [t[2]]
                            + t[0][0][:-2].split(b" ")[t[1] + 1:]) + b"\r\n"),
    st.lists(V1_TOKENS, max_size=8).map(lambda tokens: b" ".join(tokens) + b"\r\n"))
NEAR_V2 = st.tuples(st.binary(min_size=2, max_size=2), st.integers(0, 60),
                    st.binary(max_size=60)).map(
    lambda t: SIGNATURE + t[0] + struct.pack("!H", t[1]) + t[2])
ANY_OPENING = st.one_of(
    V1_HEADERS.map(lambda h: h[0]), V2_HEADERS.map(lambda h: h[0]), NEAR_V1, NEAR_V2,
    st.binary(max_size=40),
    st.tuples(st.sampled_from([b"PROXY ", SIGNATURE[:5], SIGNATURE]),
              st.binary(max_size=120)).map(b"".join))


def read(pieces: list[bytes]) -> Header | HeaderProblem | None:
    """Feed ``pieces`` until a verdict; the bytes after the header stay in ``rest``."""
    reader = HeaderReader()
    for index, piece in enumerate(pieces):
        result = reader.feed(piece)
        # The bound: never more than one header's worth of octets held.
        assert len(reader._buffer) <= max(V1_MAX, V2_FIXED + 0xFFFF), len(reader._buffer)
        if result is None:
            assert len(reader._buffer) < V1_MAX or reader._buffer.startswith(SIGNATURE[:1])
            continue
        if isinstance(result, Header):
            return Header(result.source, result.destination,
                          result.rest + b"".join(pieces[index + 1:]))
        return result
    return None


def address(ip, port: int):
    kind = IPv4Address if ip.version == 4 else IPv6Address
    return kind("TCP", str(ip), port)


class HeaderProperties(unittest.TestCase):
    @PROPERTY
    @given(ANY_OPENING.flatmap(lambda b: st.tuples(st.just(b), in_pieces(b))))
    def test_any_split_gives_the_verdict_of_one_read(self, generated):
        data, pieces = generated
        whole, split = read([data]), read(pieces)
        if isinstance(whole, HeaderProblem):
            self.assertIsInstance(split, HeaderProblem)
            self.assertEqual(split.kind, whole.kind)
        else:
            self.assertEqual(split, whole)

    @PROPERTY
    @given(V1_HEADERS, st.binary(max_size=30), st.data())
    def test_a_v1_header_names_what_it_says(self, header, after, data):
        raw, ((source, destination), (sport, dport)) = header
        result = read(data.draw(in_pieces(raw + after)))
        self.assertEqual(result, Header(address(source, sport),
                                        address(destination, dport), after))

    @PROPERTY
    @given(V2_HEADERS, st.binary(max_size=30), st.data())
    def test_a_v2_header_names_what_it_says(self, header, after, data):
        raw, ((source, destination), (sport, dport)) = header
        result = read(data.draw(in_pieces(raw + after)))
        self.assertEqual(result, Header(address(source, sport),
                                        address(destination, dport), after))

    @PROPERTY
    @given(NEAR_V1)
    def test_an_accepted_v1_line_is_in_the_grammar(self, line):
        """What the reader accepts is what section 2.1 allows: the protocol, two
        addresses of its family written the standard way and two decimal ports."""
        result = read([line])
        if not isinstance(result, Header) or result.source is None:
            return
        fields = line[:line.index(b"\r\n")].split(b" ")
        self.assertEqual(len(fields), 6, line)
        _, family, source, destination, sport, dport = fields
        for text, ip in ((source, result.source), (destination, result.destination)):
            parsed = ipaddress.ip_address(text.decode())
            self.assertEqual(parsed.version, 4 if family == b"TCP4" else 6)
            self.assertEqual(ip.host, str(parsed))
        for text, port in ((sport, result.source.port), (dport, result.destination.port)):
            self.assertTrue(text.isdigit(), line)
            self.assertEqual(int(text), port)

    @PROPERTY
    @given(st.binary(max_size=300))
    def test_parse_proxy_header_raises_only_its_own_error(self, header):
        for candidate in (header, b"PROXY " + header, SIGNATURE + header):
            try:
                internals.parse_proxy_header(candidate)
            except internals.ProxyHeaderInvalid:
                pass


class FoundByGeneratedInput(unittest.TestCase):
    def test_a_v2_signature_alone_is_an_invalid_header(self):
        """Twisted's V2Parser reads the version octet with ``ord(line[12:13])``: on the
        bare signature that is ``ord(b"")``, a TypeError that escaped
        ``parse_proxy_header``'s documented ``ProxyHeaderInvalid``."""
        for header in (SIGNATURE, SIGNATURE + b"\x21"):
            with self.assertRaises(internals.ProxyHeaderInvalid):
                internals.parse_proxy_header(header)

    def test_a_v1_line_outside_the_grammar_is_malformed(self):
        """Twisted's V1Parser ignored fields after the ports and read ports with
        ``int()``, which also takes ``+25``, ``1_0`` and `` 25``: a line no proxy
        writes named a client all the same."""
        for tail in (b"+25 25", b"1_0 25", b"25 25 PROXY", b"25 25 ", b"25 \xd9\xa3"):
            line = b"PROXY TCP4 192.0.2.1 198.51.100.2 " + tail + b"\r\n"
            result = HeaderReader().feed(line)
            self.assertIsInstance(result, HeaderProblem, repr(line))
            self.assertEqual(result.kind, "malformed PROXY header")
        header = HeaderReader().feed(b"PROXY TCP4 192.0.2.1 198.51.100.2 025 25\r\nEHLO")
        self.assertEqual((header.source.port, header.rest), (25, b"EHLO"))
