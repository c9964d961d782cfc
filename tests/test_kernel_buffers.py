"""Kernel memory that clients which do not read can pin (docs/smtp-limits.md, "Clients
that do not read").

Five clients that pipelined commands and never read a reply held 14.9 MB of the
relay's socket send buffers until their command deadline, about 65 s later: the kernel
grows a send buffer to megabytes on its own.  Now every client socket's send buffer is
fixed small (``--client-send-buffer``), and replies that wait unread for
``--write-stall-timeout`` end the connection.

Real listeners on loopback (``RelayFixture``), hostile clients in the reactor
(``tests.support.hostile``), and the kernel's own view of the relay's sockets from
``ss`` (iproute2).
"""

from __future__ import annotations

import re
import socket
import subprocess
import time

from twisted.internet import defer, reactor, threads
from twisted.internet.task import Clock
from twisted.trial import unittest

from esmtpfa.common.timeouts import Sweeper
from esmtpfa.smtp.deadlines import RESOLUTION, WriteStall
from esmtpfa.smtp.settings import ServerSettings
from tests.support import hostile
from tests.support.logcapture import observe_logs
from tests.support.relayfixture import RelayFixture

STALL = 1.0
#: What a loaded two-core machine may add before a stalled connection is gone: filling
#: the buffers, the sweep's resolution, scheduling.
GRACE = 4.0
#: The command deadline, far beyond STALL + GRACE: only the write stall can end the
#: pipeliners in time.
COMMAND_TIMEOUT = 30.0
#: Linux reserves twice the SO_SNDBUF asked for (socket(7)).
SEND_BUFFER_BOUND = 2 * ServerSettings.send_buffer


def send_buffers(port: int) -> list[int]:
    """The kernel's send buffer size (``skmem`` ``tb``) of every established socket whose
    local port is ``port``: the relay's side of its clients' connections."""
    result = subprocess.run(
        ["ss", "-tmnH", "state", "established", "sport", "=", f":{port}"],
        capture_output=True, text=True, timeout=10, check=True)
    return [int(size) for size in re.findall(r"\btb(\d+)", result.stdout)]


class WriteStallTests(unittest.TestCase):
    """The deadline itself, on a ``Clock``: output that moves earns time, output that
    drains disarms it, output that does not move ends the connection once."""

    def setUp(self):
        self.clock = Clock()
        self.sweeper = Sweeper(self.clock, lambda owner: owner.fire(), RESOLUTION)
        self.since: float | None = None
        self.stalls = 0

        def stalled():
            self.stalls += 1
        self.stall = WriteStall(self.sweeper, self.clock, 10.0, lambda: self.since, stalled)

    def advance(self, seconds: float) -> None:
        for _ in range(int(seconds / RESOLUTION)):
            self.clock.advance(RESOLUTION)

    def test_output_that_leaves_at_once_arms_nothing(self):
        self.stall.check()
        self.assertEqual(len(self.sweeper), 0)

    def test_output_that_does_not_move_stalls_once(self):
        self.since = self.clock.seconds()
        self.stall.check()
        self.advance(9.5)
        self.assertEqual(self.stalls, 0)
        self.advance(1.0)
        self.assertEqual(self.stalls, 1)
        self.advance(30)
        self.assertEqual(self.stalls, 1)

    def test_output_that_moves_earns_time_from_its_last_move(self):
        self.since = self.clock.seconds()
        self.stall.check()
        self.advance(8)
        self.since = self.clock.seconds()  # the client read some
        self.advance(8)
        self.assertEqual(self.stalls, 0)
        self.advance(3)
        self.assertEqual(self.stalls, 1)

    def test_output_that_drains_disarms(self):
        self.since = self.clock.seconds()
        self.stall.check()
        self.since = None  # the client read everything
        self.advance(30)
        self.assertEqual((self.stalls, len(self.sweeper)), (0, 0))


class KernelBufferTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.events = observe_logs(self)
        self.fixture = RelayFixture(
            self.mktemp(), "--http", "--write-stall-timeout", str(STALL),
            "--command-timeout", str(COMMAND_TIMEOUT), "--idle-timeout", "60",
            "--close-grace", "1")
        self.addCleanup(self.fixture.stop)
        yield self.fixture.start()

    def stall_lines(self) -> list[str]:
        return [e.get("log_text", "") for e in self.events
                if "write stall" in e.get("log_text", "")]

    @defer.inlineCallbacks
    def test_clients_that_never_read_are_cut_at_the_write_stall(self):
        """Pipelining clients that never read are aborted once their replies have not
        moved for the write-stall deadline, long before their command deadline; a client
        on another connection is served meanwhile."""
        fixture = self.fixture
        crowd = hostile.Crowd(lambda: hostile.Pipeliner(reactor, limit=64 * 2 ** 20))
        self.addCleanup(crowd.abort)
        crowd.connect(fixture.plain_port, 4, hostile.sources(4, first=700))
        yield defer.ensureDeferred(crowd.settle())

        def served():
            client = fixture.connect()
            try:
                return [client.command("EHLO client.example")[0],
                        client.command("NOOP")[0], client.command("QUIT")[0]]
            finally:
                client.close()
        codes = yield threads.deferToThread(served)
        yield defer.ensureDeferred(crowd.wait_closed(STALL + GRACE + 2))

        self.assertEqual(codes, [250, 250, 221])
        connected = crowd.connected()
        self.assertEqual(len(connected), 4)
        late = [round(c.closed_at - c.connected_at, 1) if c.closed_at else None
                for c in connected
                if c.closed_at is None or c.closed_at - c.connected_at > STALL + GRACE]
        self.assertEqual(late, [], f"clients that never read were not cut within "
                                   f"{STALL + GRACE:g} s (seconds open; None: still open)")
        self.assertEqual(len(self.stall_lines()), 4, self.stall_lines())
        self.assertIn(f"client read nothing for {STALL:g} s", self.stall_lines()[0])

    def test_send_buffer_is_bounded_on_every_listener(self):
        """The kernel's send buffer of the relay's side of a client connection stays at
        ``--client-send-buffer`` on the SMTP listeners (plain and implicit TLS) and the
        HTTP submission listener, instead of growing by itself."""
        fixture = self.fixture
        ports = {"plain": fixture.plain_port, "tls": fixture.tls_port,
                 "http": fixture.http_port}

        def script():
            clients = [fixture.connect(), fixture.connect(implicit_tls=True),
                       socket.create_connection(("127.0.0.1", fixture.http_port), timeout=5)]
            try:
                deadline = time.monotonic() + 5
                while True:
                    sizes = {name: send_buffers(port) for name, port in ports.items()}
                    settled = all(len(found) == 1 and 0 < found[0] <= SEND_BUFFER_BOUND
                                  for found in sizes.values())
                    if settled or time.monotonic() > deadline:
                        return sizes
                    time.sleep(0.1)
            finally:
                for client in clients:
                    client.close()

        def check(sizes):
            for name, found in sizes.items():
                self.assertEqual(len(found), 1, f"{name}: {found}")
                self.assertLessEqual(found[0], SEND_BUFFER_BOUND,
                                     f"{name}: the relay's send buffer grew to {found[0]}")
        return threads.deferToThread(script).addCallback(check)


class DefaultSendBufferTests(unittest.TestCase):
    """``--client-send-buffer 0`` leaves the kernel's own sizing, as before."""

    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        self.fixture = RelayFixture(self.mktemp(), "--client-send-buffer", "0")
        self.addCleanup(self.fixture.stop)
        yield self.fixture.start()

    def test_zero_keeps_the_kernel_sizing(self):
        fixture = self.fixture

        def script():
            client = fixture.connect()
            try:
                return send_buffers(fixture.plain_port)
            finally:
                client.close()

        def check(found):
            self.assertEqual(len(found), 1, found)
            self.assertGreater(found[0], SEND_BUFFER_BOUND)
        return threads.deferToThread(script).addCallback(check)


__all__ = ["send_buffers"]
