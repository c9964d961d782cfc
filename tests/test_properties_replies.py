"""Generated input for what the upstream says to us (``esmtpfa.relay.protocol``).

Any reply we can write (``Reply.to_bytes``, the form RFC 5321 §4.2 and RFC 2034 give it)
is read back as the same reply, whatever the reads' boundaries; any other octets are
either replies or a ``protocol_violation`` stated on every pending command, never
another exception, and no reply line is held beyond ``MAX_REPLY_LINE``; the EHLO
keywords of any reply (RFC 1870 SIZE, RFC 9422 LIMITS, AUTH) read without an exception
and within their grammar.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from esmtpfa.common.replies import Reply
from esmtpfa.relay.interfaces import Kind, RelayError
from esmtpfa.relay.protocol import MAX_REPLY_LINE, Extensions, SMTPClientProtocol, parse_limits
from tests.test_properties_smtp import HOSTILE_BYTES, NUMBERS, PROPERTY, in_pieces

LINE_TEXT = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=30)
REPLIES = st.builds(
    lambda code, enhanced, lines: Reply(code, enhanced(code), "\n".join(lines)),
    # RFC 3463 classes: 2, 4, 5 (a 3xx reply has no enhanced code to round-trip).
    st.one_of(st.integers(200, 299), st.integers(400, 599)),
    st.sampled_from([lambda code: f"{code // 100}.0.0", lambda code: f"{code // 100}.7.8",
                     lambda code: f"{code // 100}.123.45"]),
    st.lists(LINE_TEXT, min_size=1, max_size=4))


class Upstream:
    """An ``SMTPClientProtocol`` on a StringTransport: ``n`` commands waiting for their
    replies (the greeting first), and what each got."""

    def __init__(self, waiting: int):
        self.protocol = SMTPClientProtocol(Clock(), command_timeout=10, data_timeout=60)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        self.results: list[Reply | Failure] = []
        self.protocol.greeting().addBoth(self.results.append)
        for _ in range(waiting - 1):
            self.protocol.command(b"NOOP").addBoth(self.results.append)

    def feed(self, pieces: list[bytes]) -> None:
        for piece in pieces:
            self.protocol.dataReceived(piece)
            assert len(self.protocol._buffer) <= MAX_REPLY_LINE + len(piece)

    def close(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionDone("closed")))


class ReplyProperties(unittest.TestCase):
    @PROPERTY
    @given(st.lists(REPLIES, min_size=1, max_size=4).flatmap(
        lambda replies: st.tuples(st.just(replies),
                                  in_pieces(b"".join(r.to_bytes() for r in replies)))))
    def test_a_reply_we_write_is_read_back_the_same_at_any_split(self, generated):
        replies, pieces = generated
        upstream = Upstream(len(replies))
        upstream.feed(pieces)
        self.assertEqual(upstream.results, replies)
        upstream.close()

    @PROPERTY
    @given(st.one_of(HOSTILE_BYTES, st.binary(max_size=60),
                     st.lists(st.sampled_from([b"250", b"250-", b"250 ", b"2.0.0 ", b"x",
                                               b"\r\n", b"\n", b"451", b"354 ", b"199 ",
                                               b"25", b"5.7.1", b"\xff"]),
                              max_size=12).map(b"".join))
           .flatmap(lambda data: st.tuples(st.just(data), in_pieces(data))))
    def test_any_bytes_are_replies_or_a_protocol_violation(self, generated):
        data, pieces = generated
        whole, split = Upstream(3), Upstream(3)
        whole.feed([data])
        split.feed(pieces)
        for upstream in (whole, split):
            upstream.close()
            for result in upstream.results:
                if isinstance(result, Failure):
                    error = result.value
                    self.assertIsInstance(error, RelayError)
                    self.assertIn(error.kind, (Kind.PROTOCOL, Kind.UNAVAILABLE))
                else:
                    self.assertIsInstance(result, Reply)
                    self.assertTrue(200 <= result.code < 600)
        # The same octets mean the same replies, however they were read.
        self.assertEqual([r if isinstance(r, Reply) else r.value.kind for r in whole.results],
                         [r if isinstance(r, Reply) else r.value.kind for r in split.results])

    @PROPERTY
    @given(st.integers(1, 3), st.binary(max_size=100), st.data())
    def test_no_line_is_held_beyond_the_limit(self, waiting, junk, data):
        line = (junk.replace(b"\n", b"") or b"x") * (MAX_REPLY_LINE // 50 + 1)
        upstream = Upstream(waiting)
        upstream.feed(data.draw(in_pieces(line[:MAX_REPLY_LINE * 2])))  # asserts the bound
        upstream.close()


KEYWORDS = st.one_of(
    st.tuples(st.sampled_from(["SIZE", "size", "LIMITS", "AUTH", "AUTH=LOGIN", "PIPELINING",
                               "8BITMIME", "STARTTLS", "X"]),
              st.lists(st.one_of(NUMBERS, LINE_TEXT,
                                 st.sampled_from(["MAILMAX=", "RCPTMAX=", "=", "PLAIN",
                                                  "0", "999999", "1000000"])),
                       max_size=3)).map(lambda pair: " ".join([pair[0], *pair[1]])),
    LINE_TEXT)


class ExtensionProperties(unittest.TestCase):
    @PROPERTY
    @given(st.lists(KEYWORDS, max_size=6))
    def test_any_ehlo_reply_reads_within_the_grammar(self, keywords):
        extensions = Extensions.parse(Reply(250, "", "\n".join(["upstream hi", *keywords])))
        size = extensions.size
        self.assertTrue(size is None or (isinstance(size, int) and size >= 0))
        for limit in (extensions.mailmax, extensions.rcptmax):
            self.assertTrue(limit is None or 1 <= limit <= 999999)
        for name, value in extensions.limits.items():
            self.assertRegex(name, r"\A[A-Z0-9_-]+\Z")
            self.assertRegex(value, r"\A[\x21-\x3a\x3c-\x7e]+\Z")
        self.assertTrue(all(m == m.upper() for m in extensions.auth_mechanisms))

    @PROPERTY
    @given(st.dictionaries(st.from_regex(r"\A[A-Z0-9_-]{1,10}\Z"),
                           st.from_regex(r"\A[\x21-\x3a\x3c-\x7e]{1,8}\Z"), max_size=4))
    def test_limits_written_by_the_grammar_read_back(self, limits):
        text = " ".join(f"{name}={value}" for name, value in limits.items())
        self.assertEqual(parse_limits(text), limits)


class FoundByGeneratedInput(unittest.TestCase):
    def test_size_in_other_digits_is_offered_without_a_limit(self):
        """``SIZE ²`` passed ``str.isdigit`` and crashed ``int()`` in ``Extensions.size``,
        read for every message; ``SIZE ٣`` was read as 3.  RFC 1870 writes the limit in
        ASCII digits: anything else is SIZE without a usable limit (0)."""
        for value, size in (("²", 0), ("٣", 0), ("1²", 0), ("1000", 1000)):
            extensions = Extensions.parse(Reply(250, "", f"upstream hi\nSIZE {value}"))
            self.assertEqual(extensions.size, size)
