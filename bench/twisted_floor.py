#!/usr/bin/env python3
"""The floor of the platform: a Twisted SMTP pass-through with no logic at all.

Run on demand (not a test):  python3 bench/twisted_floor.py [--messages N] [--rounds R]

Same load generator and smtp-sink as ``relay_throughput.py``, and the same I/O pattern as
esmtpfa: one persistent upstream connection per client connection, the client's MAIL,
RCPT and DATA forwarded in one flight, the content forwarded in one write, the upstream's
replies passed back.  No parsing beyond line ends, no authentication check, no ids, no
Received header, no spool, no logging, no metrics, no timeouts.  Whatever ratio this
reaches against the direct path is the most any Twisted relay can reach on the machine,
so it tells how much of esmtpfa's gap is the platform and how much is esmtpfa.

``--logic-us 30,60,90`` adds floors that spend that many microseconds of CPU per message
(a busy loop where a relay would do its work): the curve says how much logic per message
a Python relay can afford for a given ratio on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import time

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(PROJECT, "bench"))
sys.path.insert(0, PROJECT)

import relay_throughput as bench  # noqa: E402  (the shared load generator and sink)


def spend(seconds: float) -> None:
    """Stand-in for a relay's per-message work: CPU time, nothing else."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def serve(port: int, upstream_port: int, write_through: bool, logic_us: float) -> None:
    from twisted.internet import endpoints, reactor
    from twisted.internet.protocol import Factory, Protocol

    tcp_reactor = reactor
    if write_through:
        from esmtpfa.common.transport import write_through as wrap
        tcp_reactor = wrap(reactor)

    class Upstream(Protocol):
        def __init__(self, client: "Client") -> None:
            self.client, self.buffer, self.expected, self.replies = client, b"", [], []

        def connectionMade(self) -> None:
            self.transport.setTcpNoDelay(True)
            self.expect(1, lambda _: (self.transport.write(b"EHLO floor.test\r\n"),
                                      self.expect(1, lambda _: self.client.ready(self))))

        def expect(self, count: int, then) -> None:
            self.expected.append((count, then))

        def dataReceived(self, data: bytes) -> None:
            self.buffer += data
            *lines, self.buffer = self.buffer.split(b"\r\n")
            for line in lines:
                self.replies.append(line)
                if line[3:4] == b"-":
                    continue
                count, then = self.expected[0]
                if sum(r[3:4] != b"-" for r in self.replies) == count:
                    self.expected.pop(0)
                    replies, self.replies = self.replies, []
                    then(replies)

    class Client(Protocol):
        def connectionMade(self) -> None:
            self.transport.setTcpNoDelay(True)
            self.buffer, self.envelope, self.in_data = b"", [], False
            self.upstream: Upstream | None = None
            endpoints.TCP4ClientEndpoint(tcp_reactor, "127.0.0.1", upstream_port).connect(
                Factory.forProtocol(lambda: Upstream(self)))

        def ready(self, upstream: Upstream) -> None:
            self.upstream = upstream
            self.transport.write(b"220 floor.test ESMTP\r\n")

        def relay(self, replies: list[bytes]) -> None:
            self.transport.write(b"".join(r + b"\r\n" for r in replies))

        def dataReceived(self, data: bytes) -> None:
            self.buffer += data
            if self.in_data:
                if self.buffer.endswith(b"\r\n.\r\n"):
                    content, self.buffer, self.in_data = self.buffer, b"", False
                    self.upstream.expect(1, self.relay)
                    if logic_us:
                        spend(logic_us / 1e6)
                    self.upstream.transport.write(content)
                return
            *lines, self.buffer = self.buffer.split(b"\r\n")
            for line in lines:
                verb = line[:4].upper()
                if verb == b"EHLO":
                    self.transport.write(b"250-floor.test\r\n250-PIPELINING\r\n"
                                         b"250 AUTH PLAIN\r\n")
                elif verb == b"AUTH":
                    self.transport.write(b"235 2.7.0 ok\r\n")
                elif verb in (b"MAIL", b"RCPT"):
                    self.envelope.append(line)
                elif verb == b"DATA":
                    group, self.envelope = self.envelope + [line], []
                    self.in_data = True  # the client waits for our 354 before content
                    self.upstream.expect(len(group), self.relay)
                    self.upstream.transport.write(b"".join(c + b"\r\n" for c in group))
                elif verb == b"QUIT":
                    self.transport.write(b"221 bye\r\n")
                    self.transport.loseConnection()
                    self.upstream.transport.loseConnection()

    endpoints.TCP4ServerEndpoint(tcp_reactor, port, interface="127.0.0.1").listen(
        Factory.forProtocol(Client))
    reactor.run()


def start_floor(port: int, sink_port: int, write_through: bool, logic_us: float
                ) -> subprocess.Popen:
    args = [sys.executable, os.path.abspath(__file__), "--serve", str(port), str(sink_port),
            "--logic-us", str(logic_us)]
    process = subprocess.Popen(args + (["--write-through"] if write_through else []))
    bench.wait_for_port(port, process)
    return process


def main() -> None:
    parser = bench.load_arguments(__doc__.split("\n")[0])
    parser.add_argument("--serve", nargs=2, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--write-through", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--logic-us", default="",
                        help="comma-separated CPU microseconds per message to add "
                             "(extra write-through floors)")
    args = parser.parse_args()
    if args.serve:
        serve(args.serve[0], args.serve[1], args.write_through, float(args.logic_us or 0))
        return
    variants = [("floor", False, 0.0), ("floor+write-through", True, 0.0)] + [
        (f"floor+write-through+{n}us", True, float(n))
        for n in args.logic_us.split(",") if n]
    print("command:", " ".join([os.path.relpath(sys.argv[0], PROJECT)] + sys.argv[1:]))
    sink_port = bench.free_port()
    sink = bench.start_sink(sink_port)
    floors = {}
    try:
        for name, write_through, logic_us in variants:
            port = bench.free_port()
            floors[name] = (port, start_floor(port, sink_port, write_through, logic_us))
            asyncio.run(bench.load(port, args.connections, 200, args.size))
        ratios: dict[str, list[float]] = {name: [] for name in floors}
        for round_ in range(args.rounds):
            direct = bench.measured([sink_port], [], sink.pid, args)
            line = f"round {round_ + 1}: direct {direct['msg_per_s']:.0f} msg/s"
            for name, (port, process) in floors.items():
                result = bench.measured([port], [process.pid], sink.pid, args)
                ratio = round(result["msg_per_s"] / direct["msg_per_s"], 3)
                ratios[name].append(ratio)
                line += (f" | {name} {result['msg_per_s']:.0f} msg/s, "
                         f"{result['esmtpfa_cpu_us_per_msg']} us CPU/msg, ratio {ratio}")
            print(line)
        for name, values in ratios.items():
            print(f"median ratio {name}: {statistics.median(values)}")
    finally:
        for _, process in floors.values():
            process.send_signal(signal.SIGTERM)
        sink.send_signal(signal.SIGTERM)
        for process in [p for _, p in floors.values()] + [sink]:
            process.wait(timeout=30)


if __name__ == "__main__":
    main()
