#!/usr/bin/env python3
"""Coverage-guided fuzzing (atheris, libFuzzer) of the parsers that read a peer's bytes.

Run on demand, bounded by time and input size (docs/fault-suite.md, "Coverage-guided
fuzzing")::

    python3 bench/fuzz.py --list
    python3 bench/fuzz.py --target sasl --seconds 60
    python3 bench/fuzz.py --all --seconds 60          # each target in its own process

Each target calls one parser directly and asserts what a property test would: the only
exception is the parser's documented error (an SMTP reply, a ``ConfigError``, a
``HeaderProblem`` value), what it accepts obeys the rule it enforces, and where a round
trip or a second way to reach the same answer exists, both agree (a stream fed whole and
fed in pieces; content dot-stuffed by the relay client and read back by the server).  Any
other exception or failed assertion is a finding: libFuzzer stops and writes the input
to ``--artifacts``; replay it with ``--target NAME FILE``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import atheris
from twisted.cred.checkers import AllowAnonymousAccess
from twisted.cred.portal import Portal
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher

with atheris.instrument_imports(include=["esmtpfa"]):
    from esmtpfa.auth.realm import SubmissionRealm
    from esmtpfa.common.errors import ConfigError
    from esmtpfa.common.replies import Reply, SMTPReplyError
    from esmtpfa.config.providers import parse_provider_document
    from esmtpfa.delivery.transaction import DeliveryPolicy, RelayDelivery
    from esmtpfa.relay.config import parse_relay_document
    from esmtpfa.relay.interfaces import WholeMessageTransaction
    from esmtpfa.relay.protocol import DotStuffer, Extensions, parse_limits
    from esmtpfa.smtp import server_sasl as sasl
    from esmtpfa.smtp.address import parse_path_argument, valid_mailbox
    from esmtpfa.smtp.data import (
        NORMALIZE,
        REJECT,
        DataReader,
        line_too_long,
        message_too_big,
    )
    from esmtpfa.smtp.factory import SMTPServerFactory
    from esmtpfa.smtp.proxy import Header, HeaderProblem, HeaderReader
    from esmtpfa.smtp.settings import ServerSettings

#: Longest input libFuzzer generates (-max_len): past every line and header limit the
#: parsers have, small enough that each run is microseconds.
MAX_LEN = 4096
BAD_ADDRESS = Reply(501, "5.1.7", "Bad sender address syntax")


def _split(fdp: atheris.FuzzedDataProvider, data: bytes, pieces: int = 4) -> list[bytes]:
    """``data`` cut at up to ``pieces - 1`` places the fuzzer chooses."""
    cuts = sorted({fdp.ConsumeIntInRange(0, len(data)) for _ in range(pieces - 1)})
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


# -- SMTP command arguments: MAIL FROM / RCPT TO ------------------------------------------

def target_address(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    keyword = "FROM" if fdp.ConsumeBool() else "TO"
    argument = fdp.ConsumeUnicodeNoSurrogates(MAX_LEN)
    try:
        path = parse_path_argument(argument, keyword, BAD_ADDRESS)
    except SMTPReplyError as error:
        assert error.reply.code == 501, error.reply
        return
    address = path.address
    assert not any(c in address for c in "\r\n\0"), repr(address)
    assert address == "" or valid_mailbox(address), repr(address)
    for key, value in path.params.items():
        assert key == key.upper() and " " not in key, key
        assert value is None or not any(c.isspace() for c in value), value
    # The canonical form reads back as the same path.
    again = parse_path_argument(f"{keyword}:<{address}>", keyword, BAD_ADDRESS)
    assert again.address == address, (address, again.address)


# -- SMTP sessions: command lines as a client sends them -----------------------------------

class _DiscardRelay:
    """An ``IRelay`` that takes every message and keeps none."""

    description = "discard"

    def begin(self, envelope, message_id="", connection_id="", client=()):
        return defer.succeed(WholeMessageTransaction(self))

    def deliver(self, outbound):
        return defer.succeed(Reply(250, "2.0.0", "discarded"))

    def close(self):
        return defer.succeed(None)


#: Where a session's fuzzed bytes start: deeper states are hard to reach by mutation alone.
_SESSION_STARTS = [b"", b"EHLO c.example\r\n", b"EHLO c.example\r\nAUTH ",
                   b"EHLO c.example\r\nMAIL FROM:<a@example.com>\r\n",
                   (b"EHLO c.example\r\nMAIL FROM:<a@example.com>\r\n"
                    b"RCPT TO:<b@example.net>\r\nDATA\r\n"),
                   (b"EHLO c.example\r\nMAIL FROM:<a@example.com> BODY=BINARYMIME\r\n"
                    b"RCPT TO:<b@example.net>\r\nBDAT ")]
_REPLY_LINE = re.compile(rb"[2-5][0-9][0-9][ -][^\r\n]*\Z")
_failures: list[dict] = []
globalLogPublisher.addObserver(
    lambda event: _failures.append(event) if "log_failure" in event else None)


def run_session(chunks: list[bytes]) -> bytes:
    """The server's answers to a client that sent ``chunks`` (an anonymous relay that
    discards, a StringTransport, a Clock for its deadlines), then left."""
    clock = Clock()
    policy = DeliveryPolicy("fuzz.test")
    portal = Portal(SubmissionRealm(
        lambda identity: RelayDelivery(identity, _DiscardRelay(), policy)),
        [AllowAnonymousAccess()])
    settings = ServerSettings(hostname="fuzz.test", allow_anonymous=True,
                              max_message_size=MAX_LEN * 2, max_line_length=200)
    factory = SMTPServerFactory(settings, portal, reactor=clock)
    peer = IPv4Address("TCP", "127.0.0.1", 40000)
    server = factory.buildProtocol(peer)
    transport = StringTransport(peerAddress=peer)
    server.makeConnection(transport)
    for chunk in chunks:
        if transport.disconnecting:
            break
        server.dataReceived(chunk)
        clock.advance(0)
    server.connectionLost(None)
    clock.advance(3600)
    return transport.value()


def target_session(data: bytes) -> None:
    """A whole session's bytes, in pieces, to the real server: every answer is a
    well-formed reply line and nothing is logged as a failure."""
    fdp = atheris.FuzzedDataProvider(data)
    stream = fdp.PickValueInList(_SESSION_STARTS) + fdp.ConsumeBytes(MAX_LEN)
    del _failures[:]
    output = run_session(_split(fdp, stream, pieces=6))
    assert not _failures, _failures[0].get("log_failure")
    assert output == b"" or output.endswith(b"\r\n"), output[-200:]
    for line in output.split(b"\r\n")[:-1]:
        assert _REPLY_LINE.match(line), (stream, line)


# -- DATA: the server's reader and the relay client's dot-stuffer ----------------------------

def _read_data(chunks: list[bytes], bare_line_ends: str):
    out: list[bytes] = []
    reader = DataReader(out.append, max_size=MAX_LEN * 2, max_line_length=200,
                        bare_line_ends=bare_line_ends)
    rest = None
    for index, chunk in enumerate(chunks):
        rest = reader.feed(chunk)
        if rest is not None:
            rest += b"".join(chunks[index + 1:])
            break
    return b"".join(out), reader.error, rest


def target_data(data: bytes) -> None:
    """The same octets read whole or in pieces give the same message, verdict and rest."""
    fdp = atheris.FuzzedDataProvider(data)
    mode = NORMALIZE if fdp.ConsumeBool() else REJECT
    stream = fdp.ConsumeBytes(MAX_LEN)
    whole = _read_data([stream], mode)
    pieces = _read_data(_split(fdp, stream), mode)
    if whole[1] is None and pieces[1] is None:
        assert whole == pieces, (stream, whole, pieces)
        if whole[2] is not None:  # ended: the content is clean CRLF text
            content = whole[0]
            assert content == b"" or content.endswith(b"\r\n"), content
            assert content.count(b"\r") == content.count(b"\n") == content.count(b"\r\n")
    else:
        assert (whole[1] is None) == (pieces[1] is None), (stream, whole, pieces)
        assert (whole[2] is None) == (pieces[2] is None), (stream, whole, pieces)


def target_dotstuff(data: bytes) -> None:
    """Content stuffed by the relay client in any chunking, read back by the server's
    DATA reader, is the content (CRLF-normalized, with a final CRLF), and nothing after."""
    fdp = atheris.FuzzedDataProvider(data)
    content = fdp.ConsumeBytes(MAX_LEN).replace(b"\0", b"")
    stuffer = DotStuffer()
    wire = b"".join(stuffer.feed(chunk) for chunk in _split(fdp, content)) + stuffer.finish()
    received, error, rest = _read_data([wire], NORMALIZE)
    # Only the line and size limits may refuse it: stuffing added no bare CR/LF or NUL.
    assert error is None or error in (line_too_long(200), message_too_big(MAX_LEN * 2)), \
        (content, error)
    if error is not None:
        return
    assert rest == b"", (content, wire, rest)
    expected = content.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    if expected and not expected.endswith(b"\r\n"):
        expected += b"\r\n"
    assert received == expected, (content, wire, received)


# -- SASL (server side) ----------------------------------------------------------------------

def target_sasl(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    name = fdp.PickValueInList(sorted(sasl.MECHANISMS))
    mechanism = sasl.mechanism_for(name)
    try:
        raw = sasl.decode_response(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 1024)))
        step = mechanism.start(raw if fdp.ConsumeBool() else None)
        for _ in range(3):
            if isinstance(step, sasl.Offer):
                break
            step = mechanism.respond(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 512)))
    except SMTPReplyError as error:
        assert error.reply.code in (235, 334, 501, 535), error.reply
        return
    if isinstance(step, sasl.Offer):
        for value in (step.username, step.secret):
            assert isinstance(value, str) and "\0" not in value, step
        assert step.bearer == mechanism.bearer, step
        if step.bearer:
            assert step.secret and step.secret == step.secret.strip(), step


# -- PROXY protocol headers ------------------------------------------------------------------

def _proxy(chunks: list[bytes]):
    reader = HeaderReader()
    for chunk in chunks:
        result = reader.feed(chunk)
        if result is not None:
            return result
    return None


def target_proxy(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    v2 = b"\r\n\r\n\x00\r\nQUIT\n"
    prefix = fdp.PickValueInList([b"", b"PROXY ", v2])
    header = prefix + fdp.ConsumeBytes(MAX_LEN)
    whole = _proxy([header])
    assert whole is None or isinstance(whole, (Header, HeaderProblem)), whole
    if isinstance(whole, Header):
        for address in (whole.source, whole.destination):
            # The PROXY spec's port range is 0..65535 inclusive (v1 and v2 alike).
            assert address is None or (address.type == "TCP" and 0 <= address.port < 65536)
    pieces = _proxy(_split(fdp, header))
    if isinstance(whole, HeaderProblem):
        # Read in pieces, a problem may show before the rest arrives; but never a header.
        assert not isinstance(pieces, Header), (header, whole, pieces)
    else:
        assert pieces == whole, (header, whole, pieces)


# -- upstream replies ------------------------------------------------------------------------

def target_reply(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    code = fdp.ConsumeIntInRange(100, 599)
    lines = [fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 600))
             for _ in range(fdp.ConsumeIntInRange(1, 8))]
    lines = [line.replace(b"\r", b"").replace(b"\n", b"") for line in lines]
    reply = Reply.parse(code, lines)
    assert reply.code == code
    wire = reply.to_bytes()
    assert wire.endswith(b"\r\n") and wire.count(b"\r\n") == len(lines), (lines, wire)
    extensions = Extensions.parse(reply)
    for keyword in extensions.keywords:
        assert keyword == keyword.upper() and " " not in keyword, keyword
    for limit in (extensions.size, extensions.mailmax, extensions.rcptmax):
        assert limit is None or limit > 0, (lines, limit)
    assert all(" " not in name for name in extensions.auth_mechanisms), lines
    parse_limits(lines[-1].decode("utf-8", "replace"))


# -- configuration documents -----------------------------------------------------------------

def target_providers(data: bytes) -> None:
    try:
        parse_provider_document(data, "fuzz.yaml", env={"FUZZ": "x"})
    except ConfigError:
        pass


def target_relays(data: bytes) -> None:
    try:
        parse_relay_document(data, "fuzz.yaml", env={"FUZZ": "x"})
    except ConfigError:
        pass


TARGETS: dict[str, Callable[[bytes], None]] = {
    "address": target_address, "session": target_session, "data": target_data,
    "dotstuff": target_dotstuff, "sasl": target_sasl, "proxy": target_proxy, "reply": target_reply,
    "providers": target_providers, "relays": target_relays,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=sorted(TARGETS))
    parser.add_argument("--all", action="store_true", help="run every target in turn")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--seconds", type=int, default=60, help="per target (-max_total_time)")
    parser.add_argument("--artifacts", default="fuzz-artifacts",
                        help="where libFuzzer writes an input that failed")
    parser.add_argument("inputs", nargs="*", help="replay these files (no fuzzing)")
    args = parser.parse_args()
    if args.list:
        print("\n".join(sorted(TARGETS)))
        return 0
    if args.all:
        failed = []
        for name in sorted(TARGETS):
            print(f"== {name}", flush=True)
            code = subprocess.call([sys.executable, __file__, "--target", name,
                                    "--seconds", str(args.seconds),
                                    "--artifacts", args.artifacts])
            if code:
                failed.append(name)
        print("failed: " + (", ".join(failed) or "none"))
        return 1 if failed else 0
    if args.target is None:
        parser.error("--target NAME, --all or --list")
    os.makedirs(args.artifacts, exist_ok=True)
    fuzzer_args = [sys.argv[0], f"-max_total_time={args.seconds}", f"-max_len={MAX_LEN}",
                   "-timeout=5", "-rss_limit_mb=2048",
                   f"-artifact_prefix={os.path.join(args.artifacts, args.target)}-",
                   *args.inputs]
    atheris.Setup(fuzzer_args, TARGETS[args.target])
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
