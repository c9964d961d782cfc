"""The listening sockets' backlog: a burst of clients arriving while the relay is busy
waits in the kernel's queue, not in SYN retransmissions (docs/smtp-limits.md, "Bursts of
connections").

A real ``twistd esmtpfa``: its sockets' backlog is read with ``ss`` (for a listening
socket its Send-Q is the backlog), and a burst is sent while the relay is stopped with
SIGSTOP, the way a relay busy with a reactor-long task meets one.
"""

from __future__ import annotations

import os
import signal
import subprocess

from twisted.internet import reactor, task, threads
from twisted.trial import unittest

from esmtpfa.runtime.sockets import bind_listener
from tests.faults.harness import RunningRelay
from tests.support.ports import free_port
from tests.support.rawsmtp import greeting_times

#: Connections of the burst: more than Twisted's default backlog of 50, fewer than ours.
BURST = 200
#: How long the relay is stopped while the burst arrives.  A SYN the kernel drops is
#: sent again after 1 s, then 3 s after the first: a client that waited past
#: ``STOPPED + 0.9`` s had its handshake dropped.
STOPPED = 2.0


def listen_backlog(port: int) -> int:
    """The backlog of the socket listening on ``port``, as the kernel reports it."""
    lines = subprocess.run(["ss", "-ltnH", "sport", "=", f":{port}"], capture_output=True,
                           text=True, timeout=10, check=True).stdout.split("\n")
    [line] = [line for line in lines if line.strip()]
    return int(line.split()[2])


class BacklogTests(unittest.TestCase):
    timeout = 120

    async def relay(self, *args: str) -> RunningRelay:
        relay = RunningRelay(self.mktemp(), http=True, args=list(args))
        self.addCleanup(relay.stop)
        await relay.start()
        return relay

    async def test_every_listener_queues_511_by_default(self) -> None:
        relay = await self.relay()
        for port in (relay.smtp_port, relay.tls_port, relay.http_port, relay.metrics_port):
            self.assertEqual(listen_backlog(port), 511, port)

    async def test_the_setting(self) -> None:
        relay = await self.relay("--listen-backlog", "64")
        for port in (relay.smtp_port, relay.tls_port, relay.http_port, relay.metrics_port):
            self.assertEqual(listen_backlog(port), 64, port)

    def test_the_workers_sockets(self) -> None:
        port = free_port()
        sock = bind_listener("127.0.0.1", port, 77)
        self.addCleanup(sock.close)
        self.assertEqual(listen_backlog(port), 77)

    async def test_a_burst_while_busy_waits_in_the_queue_not_for_retransmissions(self):
        """200 clients arrive while the relay cannot accept: every one is greeted as
        soon as it can again, none after a dropped handshake's retransmission."""
        relay = await self.relay("--max-connections", "1000",
                                 "--max-connections-per-ip", "1000")
        os.kill(relay.pid, signal.SIGSTOP)
        resumed = task.deferLater(reactor, STOPPED,
                                  lambda: os.kill(relay.pid, signal.SIGCONT))
        try:
            waits = await threads.deferToThread(greeting_times, relay.smtp_port, BURST,
                                                15.0)
        finally:
            await resumed
        late = sorted(w if w is not None else float("inf") for w in waits
                      if w is None or w > STOPPED + 0.9)
        self.assertEqual(late, [], f"{len(late)} of {BURST} clients waited for a "
                                   f"retransmitted handshake")
