#!/usr/bin/env python3
"""What a worker's question to its supervisor costs (docs/workers.md).

Run on demand (not a test):  python3 bench/control_channel.py [--calls N]

Both ends of a real UNIX socket pair run in this process, one ``ControlChannel`` each,
the "supervisor" end with a real ``WorkerAccount`` over the relay's own in-process
counts.  The "worker" asks what a worker asks for an SMTP connection (``conn.take``,
then the ``conn.release`` notice: once for every connection at a limit of one per
address, and as a relay far from its limits runs, with slots lent ahead) and for every
message of an identity with a rate (``rate.take``, then ``rate.give``), one round trip
at a time as a session does.  The CPU time of the process over the calls is what both
processes together spend per question (system calls included); the wall time per
question is the latency a client's greeting or MAIL waits for it.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, reactor  # noqa: E402
from twisted.internet.protocol import Factory  # noqa: E402

from esmtpfa.auth.sendingrates import Limit  # noqa: E402
from esmtpfa.common.transport import write_through  # noqa: E402
from esmtpfa.limits.ledgers import ConnectionLimits, LocalLoginLedger, RateLimiter  # noqa: E402
from esmtpfa.runtime.workers.control import ControlChannel  # noqa: E402
from esmtpfa.runtime.workers.counts import (  # noqa: E402
    HTTP,
    SMTP,
    RemoteConnections,
    RemoteRateLedger,
    SharedLimits,
)


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(calls: int) -> None:
    # SMTP far from its limits (slots lent ahead, as a relay at its defaults runs), HTTP
    # at one connection per address (never lent ahead: every connection asks).
    limits = SharedLimits(
        login=LocalLoginLedger(30, 10, 600.0, reactor), rates=RateLimiter(reactor),
        connections={SMTP: ConnectionLimits(10**9, 10**9),
                     HTTP: ConnectionLimits(10**9, 1)})
    worker = ControlChannel({}, reactor, name="worker")
    supervisor = ControlChannel(limits.for_worker(1).handlers(), reactor,
                                name="supervisor")
    ours, theirs = socket.socketpair()
    for sock, channel in ((ours, worker), (theirs, supervisor)):
        write_through(reactor).adoptStreamConnection(
            sock.fileno(), socket.AF_UNIX, Factory.forProtocol(lambda c=channel: c))
        sock.close()
    lent = RemoteConnections(worker, SMTP, 10**9, 10**9, reactor)
    asked = RemoteConnections(worker, HTTP, 10**9, 1, reactor)
    rates = RemoteRateLedger(worker)
    limit = Limit(10**9, 3600.0)
    for name, ask in (
            ("connection, every one asked: conn.take + conn.release",
             lambda n: asked.refusal("192.0.2.1").addCallback(
                 lambda _: asked.release("192.0.2.1"))),
            ("connection, slots lent ahead: mostly none", lambda n: lent.refusal(
                "192.0.2.1").addCallback(lambda _: lent.release("192.0.2.1"))),
            ("rate: rate.take + rate.give", lambda n: rates.take(
                "corp\0alice", "messages", limit, 1).addCallback(
                lambda _: rates.give("corp\0alice", "messages", limit, 1, True)))):
        for n in range(200):  # warm up
            await ask(n)
        started, used = time.perf_counter(), cpu()
        for n in range(calls):
            await ask(n)
        wall, spent = time.perf_counter() - started, cpu() - used
        print(f"{name}: {spent / calls * 1e6:.1f} µs CPU (both ends), "
              f"{wall / calls * 1e6:.1f} µs wall per question ({calls} questions)")
    worker.transport.loseConnection()
    supervisor.transport.loseConnection()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20000)
    arguments = parser.parse_args()

    def run():
        d = defer.ensureDeferred(measure(arguments.calls))
        d.addErrback(lambda failure: failure.printTraceback())
        d.addBoth(lambda _: reactor.stop())
    reactor.callWhenRunning(run)
    reactor.run()


if __name__ == "__main__":
    main()
