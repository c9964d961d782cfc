#!/usr/bin/env python3
"""CPU cost of receiving DATA: esmtpfa's chunked reader vs twisted.mail.smtp's per-line server.

Run on demand:  python3 bench/data_path.py [--messages N] [--size BYTES]

Both servers are fed the same bytes in-process (64 KiB reads, as a socket delivers them)
through a StringTransport, so only protocol CPU is measured: no network, no relay.  The
reference (docs/twisted-defects.md server #11) is twisted.mail.smtp.ESMTP measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.cred.checkers import AllowAnonymousAccess  # noqa: E402
from twisted.cred.portal import Portal  # noqa: E402
from twisted.internet import defer, reactor  # noqa: E402
from twisted.internet.address import IPv4Address  # noqa: E402
from twisted.internet.testing import StringTransport  # noqa: E402
from twisted.mail import smtp  # noqa: E402
from zope.interface import implementer  # noqa: E402

from esmtpfa.auth.realm import SubmissionRealm  # noqa: E402
from esmtpfa.common.replies import Reply  # noqa: E402
from esmtpfa.delivery.transaction import DeliveryPolicy, RelayDelivery  # noqa: E402
from esmtpfa.smtp.factory import SMTPServerFactory  # noqa: E402
from esmtpfa.smtp.settings import ServerSettings  # noqa: E402

PEER = IPv4Address("TCP", "127.0.0.1", 40000)
READ = 65536


def message(size: int) -> bytes:
    line = b"The quick brown fox jumps over the lazy dog; " * 1 + b"x" * 30 + b"\r\n"
    body = line * (size // len(line))
    return b"Subject: bench\r\n\r\n" + body.replace(b"\r\nT", b"\r\n.T", 5)


def session_bytes(count: int, size: int) -> list[bytes]:
    stream = b"EHLO bench.example\r\n"
    one = (b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
           + message(size) + b".\r\n")
    stream += one * count + b"QUIT\r\n"
    return [stream[i:i + READ] for i in range(0, len(stream), READ)]


class DiscardRelay:
    description = "discard"

    def deliver(self, outbound):
        return defer.succeed(Reply(250, "2.0.0", "discarded"))

    def close(self):
        return defer.succeed(None)


def esmtpfa_protocol():
    relay = DiscardRelay()
    policy = DeliveryPolicy("bench.test")
    portal = Portal(SubmissionRealm(lambda identity: RelayDelivery(identity, relay, policy)),
                    [AllowAnonymousAccess()])
    settings = ServerSettings(hostname="bench.test", allow_anonymous=True,
                              max_message_size=1 << 30, idle_timeout=3600)
    return SMTPServerFactory(settings, portal, reactor=reactor).buildProtocol(PEER)


@implementer(smtp.IMessage)
class DiscardMessage:
    def lineReceived(self, line):
        pass

    def eomReceived(self):
        return defer.succeed(b"ok")

    def connectionLost(self):
        pass


@implementer(smtp.IMessageDelivery)
class DiscardDelivery:
    def receivedHeader(self, helo, origin, recipients):
        return b"Received: bench"

    def validateFrom(self, helo, origin):
        return origin

    def validateTo(self, user):
        return DiscardMessage


def twisted_protocol():
    protocol = smtp.ESMTP()
    protocol.delivery = DiscardDelivery()
    return protocol


def measure(build, chunks: list[bytes]) -> float:
    protocol = build()
    transport = StringTransport(peerAddress=PEER)
    protocol.makeConnection(transport)
    started = time.process_time()
    for chunk in chunks:
        protocol.dataReceived(chunk)
    elapsed = time.process_time() - started
    replies = transport.value()
    assert replies.count(b"\r\n250 ") + replies.startswith(b"250 ") >= 1, replies[-300:]
    protocol.connectionLost(None)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=50)
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print("command: bench/data_path.py " + " ".join(sys.argv[1:]))
    chunks = session_bytes(args.messages, args.size)
    megabytes = sum(map(len, chunks)) / 1e6
    ours, theirs = [], []
    for _ in range(args.rounds):
        ours.append(measure(esmtpfa_protocol, chunks))
        theirs.append(measure(twisted_protocol, chunks))
    ours_best, theirs_best = min(ours), min(theirs)
    print(f"{args.messages} messages of {args.size} bytes ({megabytes:.1f} MB), "
          f"best of {args.rounds} rounds, CPU seconds:")
    print(f"  esmtpfa chunked reader : {ours_best:.3f} s = {megabytes / ours_best:6.0f} MB/s")
    print(f"  twisted.mail.smtp.ESMTP: {theirs_best:.3f} s = {megabytes / theirs_best:6.0f} MB/s")
    print(f"  ratio (twisted / esmtpfa CPU): {theirs_best / ours_best:.1f}x")


if __name__ == "__main__":
    main()
