"""Generated input for everything that reads a client's SMTP bytes.

The cases in test_smtp_data.py and test_smtp_server.py are the ones we thought of; here
hypothesis writes the input: command lines and their parameters (``smtp.address``, the
server's dispatch), DATA content at any split (``smtp.data.DataReader``), BDAT chunks
(``ChunkReader``) and the upstream side's dot-stuffing (``relay.protocol.DotStuffer``).
Each parser is held to a plain reference model written from RFC 5321 §4.1.1.4 and
§4.5.2, so a difference is a bug in one of the two, and the properties say what a user
would notice: what the client meant is what the upstream receives, no octets end a
message early or run as a command, and a refusal is a reply with an enhanced code.

The server is driven over a ``StringTransport`` with a ``Clock``: every example is a
whole session in microseconds, without sockets.
"""

from __future__ import annotations

import re
from typing import Any

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from twisted.cred.checkers import AllowAnonymousAccess, ICredentialsChecker
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.trial import unittest
from zope.interface import implementer

from esmtpfa.auth.credentials import ISubmissionCredentials
from esmtpfa.auth.realm import SubmissionRealm
from esmtpfa.auth.selection import Identity
from esmtpfa.common.replies import Reply, SMTPReplyError
from esmtpfa.relay.protocol import DotStuffer
from esmtpfa.smtp.address import (
    MAX_DOMAIN,
    MAX_LOCAL,
    MAX_PATH,
    SYNTAX,
    parse_path_argument,
    valid_mailbox,
)
from esmtpfa.smtp.data import NORMALIZE, REJECT, ChunkReader, DataReader, normalize_line_ends
from esmtpfa.smtp.factory import SMTPServerFactory
from esmtpfa.smtp.server import BAD_RECIPIENT, BAD_SENDER, LOCAL_ERROR
from esmtpfa.smtp.settings import ServerSettings

#: Fixed and derandomized: the same examples in CI every time, in well under a second
#: each (a failure found once is a failure found every run).
PROPERTY = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.filter_too_much])

USER, PASSWORD = "alice@example.com", "correct horse"
ENHANCED = re.compile(r"^([245])\.\d{1,3}\.\d{1,3} ")


# --- what peers send --------------------------------------------------------------------

#: The octets that matter to line and transparency rules, and a few that matter to
#: decoders (an invalid UTF-8 byte, a NUL), to be mixed with arbitrary ones.
HOSTILE_PIECES = st.sampled_from([
    b".", b"..", b"\r", b"\n", b"\r\n", b"\0", b"a", b" ", b".\r\n", b"\r\n.\r\n",
    b"\n.\n", b"\r.\r", b"\r\n\0.\r\n", b"\r\n.\n", b"\n.\r\n", b"\xff", b"\xc3\xa9",
    b"QUIT\r\n", b"MAIL FROM:<evil@example.com>\r\n"])
HOSTILE_BYTES = st.lists(st.one_of(HOSTILE_PIECES, st.binary(max_size=6)),
                         max_size=40).map(b"".join)
#: Content: hostile pieces, then an ending (where a last line without its line end, a
#: CR waiting for its LF, or a dot line is most likely to go wrong).
ENDINGS = st.sampled_from([b"", b"\r", b"\r\r", b"\n\r", b"\r\n", b".", b".\r", b"\0"])
CONTENT = st.tuples(st.lists(st.one_of(HOSTILE_PIECES, st.binary(max_size=4)), max_size=30)
                    .map(b"".join), ENDINGS).map(b"".join)

#: Characters that trip text handling: Unicode digits ``isdigit`` accepts and ``int``
#: may not, case mappings that change length, Unicode line and space separators.
HOSTILE_CHARS = st.sampled_from([
    "²", "٣", "١٢", "ı", "ß", "\u2028", "\x85", "\xa0", "\t", "<", ">", '"', "\\",
    "@", ":", "=", " ", ",", "[", "]", ".", "é", "\U0001F600"])
PEER_TEXT = st.lists(st.one_of(HOSTILE_CHARS, st.text(max_size=6)),
                     max_size=12).map("".join)


def in_pieces(data: bytes) -> st.SearchStrategy[list[bytes]]:
    """``data`` cut at points hypothesis chooses: network reads split anywhere."""
    return st.lists(st.integers(0, len(data)), max_size=6).map(
        lambda cuts: [data[a:b] for a, b in zip([0, *sorted(cuts)],
                                                [*sorted(cuts), len(data)], strict=True)])


# --- reference models -------------------------------------------------------------------

def stuffed(content: bytes) -> bytes:
    """What a correct client sends for ``content`` (CRLF lines): RFC 5321 §4.5.2."""
    lines = content.split(b"\r\n")[:-1] if content else []
    return b"".join((b"." if line.startswith(b".") else b"") + line + b"\r\n"
                    for line in lines) + b".\r\n"


def end_of_data(stream: bytes) -> tuple[int, int] | None:
    """Where the content ends and the next command starts: the first CRLF "." CRLF, the
    terminator's CRLF belonging to the last line (RFC 5321 §4.1.1.4), or a "." line
    first of all (the empty message)."""
    if stream.startswith(b".\r\n"):
        return 0, 3
    index = stream.find(b"\r\n.\r\n")
    return None if index < 0 else (index + 2, index + 5)


def unstuffed(raw: bytes) -> bytes:
    """Transparency undone on CRLF text: one leading dot off every line."""
    lines = raw.split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


def lines_of(raw: bytes) -> list[bytes]:
    """Lines as the reader measures them: split on LF, without the CR before it."""
    return [line[:-1] if line.endswith(b"\r") else line for line in raw.split(b"\n")]


def data_violations(raw: bytes, mode: str, max_line: int, max_size: int,
                    dots: bool = True) -> set[str]:
    """The rules (RFC 5321/5322, docs/smtp-limits.md) raw content breaks, by enhanced
    code: 5.3.4 size, 5.6.0 line length or NUL, 5.6.11 bare CR or LF."""
    broken = set()
    if len(raw) > max_size:
        broken.add("5.3.4")
    for line in lines_of(raw):
        if len(line) - (dots and line.startswith(b".")) > max_line:
            broken.add("5.6.0")
    crlf = raw.count(b"\r\n")
    if mode == REJECT and (raw.count(b"\r") != crlf or raw.count(b"\n") != crlf):
        broken.add("5.6.11")
    if mode == REJECT and b"\0" in raw:
        broken.add("5.6.0")
    return broken


def data_reference(stream: bytes, mode: str, max_line: int = 998,
                   max_size: int = 10**7):
    """(content, rest, violated rules) for a DATA stream, or None without an end."""
    end = end_of_data(stream)
    if end is None:
        return None
    raw = stream[:end[0]]
    content = unstuffed(normalize_line_ends(raw)).replace(b"\0", b"")
    return content, stream[end[1]:], data_violations(raw, mode, max_line, max_size)


def upstream_reads(wire: bytes) -> tuple[bytes, bytes]:
    """What a line-at-a-time upstream (Postfix) takes from our DATA stream: the content
    up to its first end-of-data, and what it would read as the next command."""
    end = end_of_data(wire)
    assert end is not None, "the upstream never saw the end of the data"
    return unstuffed(wire[:end[0]]), wire[end[1]:]


def read_data(stream: list[bytes], mode: str, max_line: int = 998, max_size: int = 10**7):
    sink: list[bytes] = []
    reader = DataReader(sink.append, max_size, max_line, mode)
    for index, piece in enumerate(stream):
        rest = reader.feed(piece)
        # The bound: a partial line never costs more than the longest legal line.
        assert len(reader._tail) <= max_line + 2, len(reader._tail)
        if rest is not None:
            return b"".join(sink), rest + b"".join(stream[index + 1:]), reader.error
    return None


class DataReaderProperties(unittest.TestCase):
    """``DataReader`` equals the line-at-a-time reading of RFC 5321, at any split."""

    @PROPERTY
    @given(CONTENT.flatmap(lambda b: st.tuples(st.just(b), in_pieces(b))),
           st.sampled_from([REJECT, NORMALIZE]), st.integers(4, 40),
           st.one_of(st.just(10**7), st.integers(0, 150)))
    def test_any_bytes_end_where_the_reference_ends(self, generated, mode, max_line,
                                                    max_size):
        """The end, the content and the verdict (size, line length, bare line ends,
        NUL) are those of the line-at-a-time reading, whatever the reads."""
        stream, pieces = generated
        expected = data_reference(stream, mode, max_line, max_size)
        result = read_data(pieces, mode, max_line, max_size)
        if expected is None:
            self.assertIsNone(result)  # no end: nothing after it is ever a command
            return
        content, rest, violations = expected
        self.assertIsNotNone(result)
        got_content, got_rest, error = result
        self.assertEqual(got_rest, rest)  # the next command starts exactly there
        if not violations:
            self.assertIsNone(error)
            self.assertEqual(got_content, content)
        else:
            self.assertIsNotNone(error, violations)
            self.assertEqual(error.code // 100, 5)
            self.assertIn(error.enhanced, violations)

    @PROPERTY
    @given(CONTENT, st.binary(max_size=20), st.data())
    def test_content_meant_by_the_client_is_what_it_gets(self, meant, after, data):
        """Any bytes the client means, stuffed as RFC 5321 says, come out exactly as
        meant (normalized) and the bytes after the end are the next commands."""
        content = normalize_line_ends(meant)
        if content and not content.endswith(b"\r\n"):
            content += b"\r\n"
        stream = stuffed(content) + after
        pieces = data.draw(in_pieces(stream))
        self.assertEqual(read_data(pieces, NORMALIZE),
                         (content.replace(b"\0", b""), after, None))
        if b"\0" not in content:
            self.assertEqual(read_data(pieces, REJECT), (content, after, None))

    @PROPERTY
    @given(st.integers(1, 60), st.binary(min_size=1, max_size=300), st.data())
    def test_a_partial_line_never_costs_more_than_the_limit(self, max_line, junk, data):
        line = junk.replace(b"\n", b"") * 3
        pieces = data.draw(in_pieces(line + b"\r\n.\r\nNOOP\r\n"))
        result = read_data(pieces, REJECT, max_line=max_line)  # asserts the bound
        self.assertIsNotNone(result)
        self.assertEqual(result[1], b"NOOP\r\n")


# --- BDAT ---------------------------------------------------------------------------------

def chunk_reference(content: bytes, mode: str, max_line: int):
    """A text body in BDAT chunks: no transparency; a last line without its line end gets
    CRLF (a CR at the very end is taken as the CR of that CRLF)."""
    if content and not content.endswith(b"\n"):
        content = (content[:-1] if content.endswith(b"\r") else content) + b"\r\n"
    violations = data_violations(content, mode, max_line, 10**7, dots=False)
    return normalize_line_ends(content).replace(b"\0", b""), violations


class ChunkReaderProperties(unittest.TestCase):
    @PROPERTY
    @given(CONTENT.flatmap(lambda b: st.tuples(st.just(b), in_pieces(b))),
           st.sampled_from([REJECT, NORMALIZE]), st.integers(4, 40))
    def test_text_chunks_equal_the_reference_at_any_split(self, generated, mode, max_line):
        content, chunks = generated
        sink: list[bytes] = []
        reader = ChunkReader(sink.append, 10**7, max_line, mode)
        for chunk in chunks:
            reader.feed(chunk)
            self.assertLessEqual(len(reader._tail), max_line + 1)
        reader.finish()
        expected, violations = chunk_reference(content, mode, max_line)
        if violations:
            self.assertIsNotNone(reader.error, violations)
            self.assertIn(reader.error.enhanced, violations)
        else:
            self.assertIsNone(reader.error)
            self.assertEqual(b"".join(sink), expected)

    @PROPERTY
    @given(st.binary(max_size=200).flatmap(lambda b: st.tuples(st.just(b), in_pieces(b))),
           st.integers(0, 250))
    def test_binary_chunks_are_passed_as_they_are_within_the_size(self, generated, size):
        content, chunks = generated
        sink: list[bytes] = []
        reader = ChunkReader(sink.append, size, 10, REJECT, binary=True)
        for chunk in chunks:
            reader.feed(chunk)
        reader.finish()
        if len(content) > size:
            self.assertEqual((reader.error.code, reader.error.enhanced), (552, "5.3.4"))
        else:
            self.assertEqual((reader.error, b"".join(sink)), (None, content))


# --- the upstream side: dot-stuffing ------------------------------------------------------

def stuff_in_chunks(chunks: list[bytes]) -> tuple[bytes, DotStuffer]:
    stuffer = DotStuffer()
    return b"".join(stuffer.feed(chunk) for chunk in chunks) + stuffer.finish(), stuffer


class DotStufferProperties(unittest.TestCase):
    @PROPERTY
    @given(CONTENT.flatmap(lambda b: st.tuples(st.just(b), in_pieces(b))))
    def test_stuffing_then_unstuffing_is_the_identity(self, generated):
        """Whatever the content and its chunks, the upstream reads exactly the content
        (bare line ends repaired), ends it only at our final dot, and reads nothing
        after it: no content can become a command there."""
        content, chunks = generated
        wire, _ = stuff_in_chunks(chunks)
        expected = normalize_line_ends(content)
        if expected and not expected.endswith(b"\r\n"):
            expected += b"\r\n"
        self.assertEqual(upstream_reads(wire), (expected, b""))
        crlf = wire.count(b"\r\n")
        self.assertEqual((wire.count(b"\r"), wire.count(b"\n")), (crlf, crlf))

    @PROPERTY
    @given(CONTENT, st.data())
    def test_client_to_upstream_in_any_reads_and_chunks(self, meant, data):
        """The whole path: a client's content, read by DataReader in any pieces, then
        stuffed toward the upstream in any chunks, is what the upstream reads."""
        content = normalize_line_ends(meant)
        if content and not content.endswith(b"\r\n"):
            content += b"\r\n"
        for mode in (NORMALIZE, REJECT):
            if mode == REJECT and b"\0" in content:
                continue
            result = read_data(data.draw(in_pieces(stuffed(content))), mode)
            received, rest, error = result
            self.assertEqual((rest, error), (b"", None))
            wire, _ = stuff_in_chunks(data.draw(in_pieces(received)))
            self.assertEqual(upstream_reads(wire), (content.replace(b"\0", b""), b""))


# --- addresses and parameters ---------------------------------------------------------------

ATEXT = st.sampled_from("abcXYZ09!#$%&'*+/=?^_`{|}~-é")
ATOM = st.text(ATEXT, min_size=1, max_size=8)
DOT_ATOM = st.lists(ATOM, min_size=1, max_size=3).map(".".join)
QUOTED = st.lists(st.one_of(st.sampled_from(list(' !#<>@,:;.[]é') + ["a", "Z"]),
                            st.sampled_from(['\\"', "\\\\", "\\>", "\\ "])),
                  max_size=8).map(lambda parts: '"' + "".join(parts) + '"')
LABEL = st.from_regex(r"\A[a-z0-9](?:[a-z0-9-]{0,8}[a-z0-9])?\Z")
DOMAIN = st.one_of(
    st.lists(LABEL, min_size=1, max_size=4).map(".".join),
    st.tuples(*[st.integers(0, 255)] * 4).map(
        lambda quad: "[{}.{}.{}.{}]".format(*quad)),
    st.just("[IPv6:2001:db8::1]"))
MAILBOX = st.tuples(st.one_of(DOT_ATOM, QUOTED), DOMAIN).map("@".join).filter(valid_mailbox)
PARAM_KEY = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9-]{0,10}\Z")
PARAM_VALUE = st.one_of(st.none(), st.text(st.characters(
    min_codepoint=0x21, max_codepoint=0x7e, blacklist_characters="="), min_size=1,
    max_size=12))
PARAMS = st.dictionaries(PARAM_KEY.map(str.upper), PARAM_VALUE, max_size=4)


def written(params: dict[str, str | None]) -> str:
    return "".join(f" {key}" if value is None else f" {key}={value}"
                   for key, value in params.items())


class AddressProperties(unittest.TestCase):
    @PROPERTY
    @given(MAILBOX, PARAMS, st.sampled_from(["FROM", "from", "To", "TO"]),
           st.sampled_from(["", " ", "  "]), st.booleans())
    def test_a_valid_path_and_its_parameters_round_trip(self, mailbox, params, keyword,
                                                        space, source_route):
        route = "@relay.example,@hop.example:" if source_route else ""
        argument = f"{keyword}:{space}<{route}{mailbox}>{written(params)}"
        parsed = parse_path_argument(argument, keyword.upper(), BAD_SENDER)
        self.assertEqual((parsed.address, parsed.params), (mailbox, params))

    @PROPERTY
    @given(st.one_of(PEER_TEXT, st.tuples(st.sampled_from(["FROM:", "TO:", "FROM:<", ""]),
                                          PEER_TEXT).map("".join)),
           st.sampled_from([("FROM", BAD_SENDER), ("TO", BAD_RECIPIENT)]))
    def test_any_argument_parses_clean_or_gets_a_501(self, argument, keyword_reply):
        keyword, bad = keyword_reply
        try:
            parsed = parse_path_argument(argument, keyword, bad)
        except SMTPReplyError as error:
            reply = error.reply
            self.assertEqual(reply.code, 501)
            self.assertIn(reply.enhanced, (SYNTAX.enhanced, bad.enhanced))
            return
        address = parsed.address
        self.assertTrue(address == "" or valid_mailbox(address), address)
        self.assertFalse(set(address) & set("\r\n\0"))
        self.assertLessEqual(len(address.encode()), MAX_PATH - 2)
        if address:
            local, _, domain = address.rpartition("@")
            self.assertLessEqual(len(local.encode()), MAX_LOCAL)
            self.assertLessEqual(len(domain.encode()), MAX_DOMAIN)
        for key, value in parsed.params.items():
            self.assertRegex(key, r"\A[A-Z0-9][A-Z0-9-]*\Z")
            self.assertTrue(value is None or not set(value) & set(" =\r\n\0"))


# --- the server, over a string transport ------------------------------------------------------

class _Transaction:
    """Records what the server hands on; content goes through the relay's own
    DotStuffer, as it would toward the upstream."""

    id = "urn:uuid:property"

    def __init__(self, session: Session, mail_from: str):
        self.session, self.mail_from = session, mail_from
        self.recipients: list[str] = []
        self.stuffer = DotStuffer()
        self.wire: list[bytes] = []

    def addRecipient(self, recipient, params, data_follows=False):
        self.recipients.append(recipient)

    def write(self, data: bytes) -> None:
        self.wire.append(self.stuffer.feed(data))

    def finish(self):
        self.wire.append(self.stuffer.finish())
        self.session.delivered.append(b"".join(self.wire))
        return defer.succeed(Reply(250, "2.0.0", "Queued"))

    def abort(self) -> None:
        self.session.aborted += 1


class _Delivery:
    def __init__(self, session: Session, identity):
        self.session, self.identity = session, identity

    def startTransaction(self, context, mail_from, params):
        self.session.senders.append(mail_from)
        return _Transaction(self.session, mail_from)


@implementer(ICredentialsChecker)
class _OneUser:
    credentialInterfaces = (ISubmissionCredentials,)

    def requestAvatarId(self, credentials):
        if (credentials.username, credentials.secret) == (USER, PASSWORD):
            return defer.succeed(Identity(provider="test", username=USER))
        return defer.fail(UnauthorizedLogin())


class Session:
    """One ESMTPServer session on a StringTransport and a Clock."""

    def __init__(self, **overrides: Any):
        self.senders: list[str] = []
        self.delivered: list[bytes] = []
        self.aborted = 0
        options: dict[str, Any] = {"hostname": "relay.test", "allow_insecure_auth": True,
                                   "allow_anonymous": True}
        options.update(overrides)
        self.clock = task.Clock()
        portal = Portal(SubmissionRealm(lambda identity: _Delivery(self, identity)),
                        [_OneUser(), AllowAnonymousAccess()])
        self.factory = SMTPServerFactory(ServerSettings(**options), portal,
                                         reactor=self.clock)
        peer = IPv4Address("TCP", "192.0.2.7", 40000)
        self.server = self.factory.buildProtocol(peer)
        self.transport = StringTransport(peerAddress=peer)
        self.server.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        if not self.transport.disconnecting:
            self.server.dataReceived(data)

    def replies(self) -> list[tuple[int, list[str]]]:
        """Every reply written so far, as (code, text lines); asserts the wire form."""
        out: list[tuple[int, list[str]]] = []
        lines: list[str] = []
        wire = self.transport.value()
        assert wire.endswith(b"\r\n"), wire[-80:]
        for raw in wire[:-2].split(b"\r\n"):
            line = raw.decode("utf-8")
            assert re.match(r"\A[2-5]\d\d[ -]", line), line
            lines.append(line[4:])
            if line[3] == " ":
                out.append((int(line[:3]), lines))
                lines = []
        assert not lines, "a multi-line reply never ended"
        return out

    def close(self) -> None:
        self.server.connectionLost(None)
        self.factory.stopFactory()


def assert_enhanced(test: unittest.TestCase, replies: list[tuple[int, list[str]]]) -> None:
    """Every reply carries an enhanced code of its own class (RFC 2034), except those
    RFC 2034 and RFC 4954 leave without: the greeting, EHLO/HELO, 334 and 354."""
    for index, (code, lines) in enumerate(replies):
        test.assertNotEqual((code, lines[0]), (LOCAL_ERROR.code, LOCAL_ERROR.to_bytes()[4:-2]
                                               .decode()))
        if index == 0 or code in (334, 354) or (code == 250 and not ENHANCED.match(lines[0])
                                                and (lines[0] == "relay.test"
                                                     or "greets" in lines[0])):
            continue
        match = ENHANCED.match(lines[0])
        test.assertIsNotNone(match, (code, lines))
        test.assertEqual(int(match.group(1)), code // 100, (code, lines))


VERBS = st.sampled_from(["EHLO", "HELO", "MAIL", "RCPT", "DATA", "BDAT", "RSET", "NOOP",
                         "VRFY", "EXPN", "HELP", "AUTH", "STARTTLS", "ehlo", "Mail",
                         "QUIT", "BOGUS", ""])
#: Numbers as a peer may write them: ASCII digits, or characters ``str.isdigit`` also
#: accepts (superscripts, other scripts' digits) that RFC 5321's Digit is not.
NUMBERS = st.lists(st.sampled_from(["0", "7", "12", "²", "٣", "१", "𝟗"]), min_size=1,
                   max_size=3).map("".join)
PARAMETER = st.one_of(
    st.tuples(st.sampled_from(["SIZE", "size", "BODY", "SMTPUTF8", "AUTH", "REQUIRETLS",
                               "RET", "X-Y"]),
              st.one_of(st.none(), NUMBERS, PEER_TEXT,
                        st.sampled_from(["7BIT", "8bitmime", "BINARYMIME", "<>"])))
    .map(lambda pair: pair[0] if pair[1] is None else f"{pair[0]}={pair[1]}"),
    PEER_TEXT)
PATHS = st.one_of(st.sampled_from(["<a@example.com>", "<>", "<é@example.com>",
                                    "<c@[192.0.2.1]>", "", "a@example.com", "<a@b"]),
                  MAILBOX.map("<{}>".format), PEER_TEXT)
COMMANDS = st.one_of(
    st.tuples(st.sampled_from(["MAIL FROM:", "mail from: ", "RCPT TO:", "Rcpt To:"]),
              PATHS, st.lists(PARAMETER, max_size=3)).map(
        lambda parts: parts[0] + " ".join([parts[1], *parts[2]])),
    st.tuples(st.sampled_from(["BDAT ", "bdat "]), NUMBERS,
              st.sampled_from(["", " LAST", " last", " LAST x", " "])).map("".join),
    st.tuples(st.sampled_from(["AUTH ", "auth "]),
              st.sampled_from(["PLAIN", "LOGIN", "XOAUTH2", "OAUTHBEARER", "plaın", "X"]),
              st.sampled_from(["", " =", " *", " AGFsaWNlQGV4YW1wbGUuY29tAGNvcnJlY3QgaG9yc2U=",
                               " !!", " AAAA"])).map("".join),
    st.sampled_from(["RSET", "DATA", "NOOP", "EHLO client.example", "HELO c", "QUIT",
                     "STARTTLS", "=", "*", "AAAA"]),
    st.tuples(VERBS, PEER_TEXT).map(" ".join))
COMMAND_LINES = st.lists(
    st.one_of(COMMANDS.map(lambda line: line.encode("utf-8", "surrogatepass")),
              HOSTILE_BYTES), max_size=12)


class ServerCommandProperties(unittest.TestCase):
    @PROPERTY
    @given(COMMAND_LINES, st.sampled_from(["\r\n", "\n"]), st.booleans(), st.booleans(),
           st.data())
    def test_every_command_gets_a_well_formed_reply(self, lines, end, utf8, binary, data):
        """Whatever the lines, every reply is a well-formed SMTP reply with an enhanced
        code of its class, and none is the 451 of an unexpected exception."""
        session = Session(smtputf8=utf8, binarymime=binary)
        self.addCleanup(session.close)
        stream = b"EHLO client.example\r\n" + b"".join(
            line + end.encode() for line in lines)
        for piece in data.draw(in_pieces(stream)):
            session.send(piece)
        assert_enhanced(self, session.replies())

    @PROPERTY
    @given(MAILBOX, st.sampled_from(["", " "]))
    def test_a_valid_sender_reaches_the_transaction_as_written(self, mailbox, space):
        session = Session(smtputf8=True)
        self.addCleanup(session.close)
        utf8 = "" if mailbox.isascii() else " SMTPUTF8"
        session.send(f"EHLO c\r\nMAIL FROM:{space}<{mailbox}>{utf8}\r\n".encode())
        self.assertEqual(session.replies()[-1][0], 250)
        self.assertEqual(session.senders, [mailbox])


class ServerDataProperties(unittest.TestCase):
    """DATA through the whole server: a client's content reaches the upstream's wire,
    stuffed, exactly; hostile content never ends a message early or runs a command."""

    def transaction(self, mode: str) -> Session:
        session = Session(bare_line_ends=mode)
        self.addCleanup(session.close)
        session.send(b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\n"
                     b"DATA\r\n")
        self.assertEqual([code for code, _ in session.replies()], [220, 250, 250, 250, 354])
        return session

    @PROPERTY
    @given(CONTENT, st.sampled_from([REJECT, NORMALIZE]), st.data())
    def test_what_the_client_means_is_what_the_upstream_reads(self, meant, mode, data):
        content = normalize_line_ends(meant)
        if content and not content.endswith(b"\r\n"):
            content += b"\r\n"
        session = self.transaction(mode)
        for piece in data.draw(in_pieces(stuffed(content) + b"NOOP\r\n")):
            session.send(piece)
        replies = session.replies()[5:]
        if mode == REJECT and b"\0" in content:
            self.assertEqual([(code, lines[0][:6]) for code, lines in replies],
                             [(550, "5.6.0 "), (250, "2.0.0 ")])
            self.assertEqual(session.delivered, [])
            return
        self.assertEqual([code for code, _ in replies], [250, 250])
        [wire] = session.delivered
        self.assertEqual(upstream_reads(wire), (content.replace(b"\0", b""), b""))

    @PROPERTY
    @given(HOSTILE_BYTES, st.sampled_from([REJECT, NORMALIZE]), st.data())
    def test_no_bytes_end_the_message_early_or_run_as_commands(self, hostile, mode, data):
        stream = hostile + b"\r\n.\r\nNOOP\r\n"
        expected = data_reference(stream, mode)
        assume(expected is not None and expected[1] == b"NOOP\r\n")
        content, _, violations = expected
        session = self.transaction(mode)
        for piece in data.draw(in_pieces(stream)):
            session.send(piece)
        replies = session.replies()[5:]
        self.assertEqual(len(replies), 2, replies)  # the verdict, then NOOP's 250
        (code, lines), noop = replies
        self.assertEqual(noop[0], 250)
        if violations:
            self.assertEqual(code, 550)
            self.assertIn(lines[0].split(" ")[0], violations)
            self.assertEqual(session.delivered, [])
        else:
            self.assertEqual(code, 250)
            self.assertEqual(upstream_reads(session.delivered[0]), (content, b""))


class ServerChunkProperties(unittest.TestCase):
    @PROPERTY
    @given(CONTENT, st.sampled_from([REJECT, NORMALIZE]), st.data())
    def test_bdat_chunks_deliver_the_content_and_nothing_runs_as_a_command(
            self, content, mode, data):
        """RFC 3030: a chunk's octets are data whatever they hold (a CRLF.CRLF, a
        ``QUIT``); the transaction gets the reference content, then NOOP is answered."""
        session = Session(binarymime=True, bare_line_ends=mode)
        self.addCleanup(session.close)
        chunks = data.draw(in_pieces(content))
        stream = b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\n"
        for index, chunk in enumerate(chunks):
            last = " LAST" if index == len(chunks) - 1 else ""
            stream += f"BDAT {len(chunk)}{last}\r\n".encode() + chunk
        stream += b"NOOP\r\n"
        for piece in data.draw(in_pieces(stream)):
            session.send(piece)
        replies = session.replies()[4:]
        expected, violations = chunk_reference(content, mode, 998)
        self.assertEqual(replies[-1][0], 250)  # NOOP: the chunks ran as no command
        self.assertEqual(len(replies), len(chunks) + 1)  # one reply per chunk
        if violations:
            # The chunk that breaks a rule is refused and fails the transaction
            # (RFC 3030 §2); the chunks after it are refused for want of one.
            codes = [code for code, _ in replies[:-1]]
            refused = codes.index(550)
            self.assertEqual(codes, [250] * refused + [550] + [503] * (len(codes) - refused - 1))
            self.assertIn(replies[refused][1][0].split(" ")[0], violations)
            self.assertEqual(session.delivered, [])
        else:
            self.assertEqual([code for code, _ in replies], [250] * (len(chunks) + 1))
            [wire] = session.delivered
            if expected and not expected.endswith(b"\r\n"):
                expected += b"\r\n"
            self.assertEqual(upstream_reads(wire), (expected, b""))


class FoundByGeneratedInput(unittest.TestCase):
    """The concrete inputs the properties above found, each a plain regression test."""

    def session(self, **overrides: Any) -> Session:
        session = Session(**overrides)
        self.addCleanup(session.close)
        return session

    def test_bdat_size_in_other_digits_is_malformed_and_closes(self):
        """``BDAT ²`` passed ``str.isdigit`` and crashed ``int()``: a 451 "local error"
        with a traceback, and the chunk's octets then ran as commands.  RFC 3030 §2: a
        size that is not ASCII digits cannot be skipped, so the connection closes."""
        for size in ("²", "٣", "1𝟗"):
            session = self.session(binarymime=True)
            session.send(f"EHLO c\r\nBDAT {size}\r\nNOOP\r\n".encode())
            self.assertEqual(session.replies()[2:],
                             [(501, ["5.5.4 Malformed BDAT command, closing connection"])])
            self.assertTrue(session.transport.disconnecting)

    def test_mail_size_in_other_digits_is_a_syntax_error(self):
        """``SIZE=1²`` crashed ``int()`` (451 and a traceback); ``SIZE=٣`` was read as 3.
        RFC 1870's size-value is ASCII digits."""
        for value in ("1²", "٣", "²"):
            session = self.session()
            session.send(f"EHLO c\r\nMAIL FROM:<a@example.com> SIZE={value}\r\n".encode())
            self.assertEqual(session.replies()[2:], [(501, ["5.5.4 SIZE requires a number"])])

    def test_bdat_text_ending_in_two_bare_crs(self):
        """A last chunk ending ``\\r\\r`` lost both CRs: accepted under ``reject`` (a bare
        CR let through), one line end dropped under ``normalize``.  Only one CR can be
        the CR of the missing CRLF."""
        sink: list[bytes] = []
        reader = ChunkReader(sink.append, 1000, 998, REJECT)
        reader.feed(b"x\r\r")
        reader.finish()
        self.assertEqual((reader.error.code, reader.error.enhanced), (550, "5.6.11"))
        self.assertEqual(sink, [])
        reader = ChunkReader(sink.append, 1000, 998, NORMALIZE)
        for chunk in (b"x\r", b"\r"):
            reader.feed(chunk)
        reader.finish()
        self.assertEqual((reader.error, b"".join(sink)), (None, b"x\r\n\r\n"))
