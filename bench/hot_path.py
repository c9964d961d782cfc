#!/usr/bin/env python3
"""esmtpfa's own CPU per relayed message, in-process, without sockets.

Run on demand (not a test):  python3 bench/hot_path.py [--messages N] [--profile FILE]

The whole service (``RelayService``: server, Portal, delivery, pooled upstream client,
metrics, logging at ``info`` to a file) runs on a ``MemoryReactorClock``; the client and
the upstream are byte scripts on in-memory transports, pumped until quiet.  What is left
is the Python work esmtpfa does per message (plus the small scripts): no system calls, no
scheduler, no other process on the shared cores, so two versions of the code compare to
a few percent where the loopback benchmark (``relay_throughput.py``) moves by ±10%.

The reference measured in the same run is the cost of the pieces every relayed message
needs whatever the design (one log line, the Received header, an id, parsing the client's
MAIL/RCPT and the upstream's replies, reading DATA, dot-stuffing it): esmtpfa's total
over that sum says how much is control flow and bookkeeping around the necessary work.
The client pipelines MAIL, RCPT and DATA like the loopback benchmark's load generator;
the upstream pipelines and answers like Postfix's ``smtp-sink``.
"""

from __future__ import annotations

import argparse
import base64
import cProfile
import gc
import os
import sys
import tempfile
import time
import timeit

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(PROJECT, "bench"))
sys.path.insert(0, PROJECT)

from relay_throughput import PASSWORD, USER, esmtpfa_arguments, message_of  # noqa: E402  (the loopback benchmark's account and message)
from twisted.internet.address import IPv4Address  # noqa: E402
from twisted.internet.testing import MemoryReactorClock  # noqa: E402
from twisted.logger import globalLogPublisher, textFileLogObserver  # noqa: E402

MAIL = b"MAIL FROM:<bench@example.com>\r\nRCPT TO:<sink@example.net>\r\nDATA\r\n"


class Wire:
    """One direction of an in-memory connection: written bytes wait for the pump."""

    def __init__(self, host: IPv4Address, peer: IPv4Address):
        self.pending: list[bytes] = []
        self.protocol = None  # the receiving side
        self.disconnecting = False
        self.producer = None
        self._host, self._peer = host, peer

    def write(self, data: bytes) -> None:
        self.pending.append(data)

    def writeSequence(self, data) -> None:
        self.pending.extend(data)

    def registerProducer(self, producer, streaming: bool) -> None:
        # A streaming producer is resumed only after the transport paused it, which an
        # unbounded in-memory wire never does; only a pull producer is driven by pump.
        self.producer = None if streaming else producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def loseConnection(self) -> None:
        self.disconnecting = True

    abortConnection = loseConnection

    def pauseProducing(self) -> None:
        pass

    resumeProducing = stopProducing = pauseProducing

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass

    def getHost(self) -> IPv4Address:
        return self._host

    def getPeer(self) -> IPv4Address:
        return self._peer


def pump(wires: list[Wire]) -> None:
    """Deliver written bytes (and pull producers) until nothing moves."""
    moved = True
    while moved:
        moved = False
        for wire in wires:
            if wire.producer is not None:
                wire.producer.resumeProducing()
            if wire.pending:
                data = b"".join(wire.pending)
                wire.pending.clear()
                wire.protocol.dataReceived(data)
                moved = True


class Sink:
    """The upstream: answers like ``smtp-sink`` (PIPELINING, one reply per command)."""

    def __init__(self) -> None:
        self.wire: Wire | None = None
        self.in_data = False
        self.buffer = b""
        self.messages = 0

    def greet(self) -> None:
        self.wire.write(b"220 sink.test ESMTP\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        out = []
        while True:
            if self.in_data:
                end = self.buffer.find(b"\r\n.\r\n")
                if end < 0:
                    break
                self.buffer = self.buffer[end + 5:]
                self.in_data = False
                self.messages += 1
                out.append(b"250 2.0.0 Ok: queued\r\n")
                continue
            end = self.buffer.find(b"\r\n")
            if end < 0:
                break
            verb = self.buffer[:4].upper()
            self.buffer = self.buffer[end + 2:]
            if verb == b"EHLO":
                out.append(b"250-sink.test\r\n250-PIPELINING\r\n250-SIZE 0\r\n"
                           b"250-8BITMIME\r\n250 ENHANCEDSTATUSCODES\r\n")
            elif verb == b"DATA":
                self.in_data = True
                out.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
            elif verb == b"QUIT":
                out.append(b"221 Bye\r\n")
            else:
                out.append(b"250 2.0.0 Ok\r\n")
        if out:
            self.wire.write(b"".join(out))


class Client:
    """The submitting client: AUTH PLAIN once, then pipelined transactions."""

    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def expect(self, *codes: bytes) -> None:
        lines = [line for line in self.received.split(b"\r\n") if line[3:4] == b" "]
        self.received = b""
        if [line[:3] for line in lines] != list(codes):
            raise SystemExit(f"expected {codes}, got {lines}")


def relay_under_test(upstream_port: int, workdir: str, reactor):
    from esmtpfa.common.logs import set_level
    from esmtpfa.runtime.options import Options
    from esmtpfa.runtime.service import RelayService

    options = Options()
    options.parseOptions(esmtpfa_arguments(0, upstream_port, workdir, "info"))
    service = RelayService(options, reactor=reactor)
    set_level("info")
    return service.smtp_factories[0]


def connect_upstream(reactor, wires: list[Wire], sinks: list[Sink]) -> None:
    """Complete the connections the relay asked the memory reactor for."""
    while reactor.tcpClients:
        host, port, factory, _, _ = reactor.tcpClients.pop(0)
        local, remote = IPv4Address("TCP", "127.0.0.1", 50000 + len(wires)), \
            IPv4Address("TCP", host, port)
        protocol = factory.buildProtocol(remote)
        sink = Sink()
        to_sink, to_relay = Wire(local, remote), Wire(remote, local)
        to_sink.protocol, to_relay.protocol = sink, protocol
        sink.wire = to_relay
        protocol.makeConnection(to_sink)
        wires += [to_sink, to_relay]
        sinks.append(sink)
        sink.greet()


def measure(messages: int, size: int, profile: str | None) -> dict:
    reactor = MemoryReactorClock()
    workdir = tempfile.mkdtemp(prefix="esmtpfa-hot-")
    factory = relay_under_test(25025, workdir, reactor)  # a port only in name
    client = Client()
    server = factory.buildProtocol(None)
    local, peer = IPv4Address("TCP", "127.0.0.1", 25), IPv4Address("TCP", "127.0.0.1", 40000)
    to_server, to_client = Wire(local, peer), Wire(peer, local)
    to_server.protocol, to_client.protocol = server, client
    wires, sinks = [to_server, to_client], []
    server.makeConnection(to_client)
    token = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode())

    def send(data: bytes) -> None:
        to_server.write(data)
        for _ in range(10):  # the Portal and the pool may answer through the reactor
            pump(wires)
            connect_upstream(reactor, wires, sinks)
            reactor.advance(0)
            if not reactor.tcpClients and not any(wire.pending for wire in wires):
                return
        raise SystemExit("the relay did not settle")

    send(b"EHLO bench.example\r\nAUTH PLAIN " + token + b"\r\n")
    client.expect(b"220", b"250", b"235")
    body = message_of(size) + b".\r\n"
    for _ in range(50):  # warm up: the pooled upstream session exists, caches are hot
        send(MAIL)
        client.expect(b"250", b"250", b"354")
        send(body)
        client.expect(b"250")
    gc.collect()
    profiler = cProfile.Profile() if profile else None
    if profiler:
        profiler.enable()
    started = time.process_time()
    for _ in range(messages):
        send(MAIL)
        client.expect(b"250", b"250", b"354")
        send(body)
        client.expect(b"250")
    elapsed = time.process_time() - started
    if profiler:
        profiler.disable()
        profiler.dump_stats(profile)
    assert sum(s.messages for s in sinks) == messages + 50
    return {"messages": messages, "cpu_s": round(elapsed, 3),
            "us_per_msg": round(elapsed / messages * 1e6, 1)}


def necessary_pieces(size: int) -> dict[str, float]:
    """Microseconds of each piece of work a relayed message cannot do without."""
    from esmtpfa.common.context import ConnectionContext
    from esmtpfa.common.ids import new_id
    from esmtpfa.common.logs import logger
    from esmtpfa.common.replies import Reply
    from esmtpfa.delivery.received import received_header
    from esmtpfa.relay.protocol import DotStuffer
    from esmtpfa.smtp.address import parse_path_argument
    from esmtpfa.smtp.data import DataReader

    log = logger("esmtpfa.bench")
    context = ConnectionContext(connection_id="c", protocol="smtp", peer_host="127.0.0.1",
                                helo="bench.example")
    content = message_of(size)
    body = content + b".\r\n"

    def log_line() -> None:
        log.info("{connection_id} message {message_id} from <{sender}> to {count} "
                 "recipient(s), {size} bytes, relayed for {identity}: {upstream}",
                 connection_id="c", message_id="urn:uuid:x", sender="bench@example.com",
                 count=1, size=size, identity="bench via bench-users",
                 upstream="250 2.0.0 Ok: queued")

    def read_data() -> None:
        DataReader(lambda data: None, 10 ** 8, 998, "reject").feed(body)

    def stuff() -> None:
        stuffer = DotStuffer()
        stuffer.feed(content)
        stuffer.finish()

    pieces = {
        "one log line (info, to a file)": log_line,
        "Received header": lambda: received_header(context, "bench.test", "urn:uuid:x",
                                                   authenticated=True),
        "message id": new_id,
        "parse MAIL FROM and RCPT TO": lambda: (
            parse_path_argument("FROM:<bench@example.com>", "FROM", None),
            parse_path_argument("TO:<sink@example.net>", "TO", None)),
        "parse 5 upstream replies": lambda: [Reply.parse(250, [b"2.0.0 Ok"])
                                             for _ in range(5)],
        f"read DATA ({size} bytes)": read_data,
        f"dot-stuff toward the upstream ({size} bytes)": stuff,
    }
    return {name: min(timeit.repeat(piece, number=5000, repeat=3)) / 5000 * 1e6
            for name, piece in pieces.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", help="write cProfile stats of the last round here")
    args = parser.parse_args()
    log_file = open(os.path.join(tempfile.mkdtemp(prefix="esmtpfa-hot-log-"), "esmtpfa.log"),
                    "a")
    globalLogPublisher.addObserver(textFileLogObserver(log_file))
    results = [measure(args.messages, args.size,
                       args.profile if i == args.rounds - 1 else None)
               for i in range(args.rounds)]
    pieces = necessary_pieces(args.size)
    for result in results:
        print(result)
    median = sorted(r["us_per_msg"] for r in results)[len(results) // 2]
    print(f"esmtpfa, whole message, median: {median:7.1f} us")
    for name, us in pieces.items():
        print(f"  necessary piece: {us:7.1f} us  {name}")
    total = sum(pieces.values())
    print(f"necessary pieces, sum:          {total:7.1f} us")
    print(f"ratio esmtpfa / necessary pieces: {median / total:.2f}")


if __name__ == "__main__":
    main()
