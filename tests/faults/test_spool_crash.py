"""E. The spool survives SIGKILL (docs/fault-suite.md, "The spool under SIGKILL").

A real ``twistd esmtpfa --delivery-mode spool`` takes mail from clients while its
upstream flaps (up, down, and now and then a connection that dies right after the
final dot), and is killed with SIGKILL at random moments, again and again: while a
message is being written, after its 250, while it is delivered, between the upstream's
250 and the spool recording it.  Each time it is started again on the same spool.

Then the counts users care about:

* every message a client was told 250 for reached the upstream exactly once, or is
  held for an operator with the recipients whose outcome is unknown (the relay died, or
  the connection did, after the dot may have left: it never sends those again itself);
* no message reached the upstream twice.

The bounded CI run makes ``KILLS`` kills; ``bench/spool_crash.sh`` runs it longer.
"""

from __future__ import annotations

import json
import os
import random
import re
import threading
import time
import urllib.request

from twisted.internet import reactor, task, threads
from twisted.python import log
from twisted.trial import unittest

from tests.faults.harness import RunningRelay, message, new_message_id, send_fresh
from tests.support.ports import free_port
from tests.support.processes import queue_tool
from tests.support.rabbitmq import SharedRabbitMQ
from tests.support.upstream import RecordingUpstream

KILLS = int(os.environ.get("ESMTPFA_CRASH_KILLS", "100"))
#: Each of the broker's runs costs seconds more: fewer kills, broker crashes among them.
AMQP_KILLS = int(os.environ.get("ESMTPFA_CRASH_AMQP_KILLS", "30"))
CLIENTS = 4
MESSAGE_ID = re.compile(rb"^Message-ID: (<[^>]+>)", re.MULTILINE | re.IGNORECASE)


def pause(seconds: float):
    return task.deferLater(reactor, seconds, lambda: None)


class FlappingUpstream:
    """A recording upstream that goes down and comes back on its port, and sometimes
    drops the connection right after the final dot (before answering it)."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.upstream = RecordingUpstream(script=self._script)
        self.port = free_port("127.0.0.1")
        self.up = False
        self.after_dot_losses = 0

    def _script(self, index: int, verb: str, line: bytes) -> str | None:
        if verb == "EOM" and self.rng.random() < 0.05:
            self.after_dot_losses += 1
            return "CLOSE"
        return None

    def start(self) -> None:
        if not self.up:
            self.upstream.start(self.port)
            self.up = True

    async def stop(self) -> None:
        if self.up:
            self.up = False
            await self.upstream.stop()

    def copies(self) -> dict[bytes, int]:
        """Message-ID -> how many times the upstream accepted it (its 250 was sent)."""
        counts: dict[bytes, int] = {}
        for received in self.upstream.messages:
            if not received.accepted:
                continue
            found = MESSAGE_ID.search(received.data)
            if found:
                counts[found.group(1)] = counts.get(found.group(1), 0) + 1
        return counts



class Clients:
    """``CLIENTS`` threads, each sending a message per new connection until stopped."""

    def __init__(self, port: int):
        self.port = port
        self.acked: dict[str, str] = {}  # Message-ID -> queue id
        self.refused = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def run(self, index: int) -> None:
        n = 0
        while not self._stop.is_set() and n < 10_000:
            message_id = new_message_id(f"crash{index}", n)
            n += 1
            size = 200_000 if n % 25 == 0 else 1500
            code, text = send_fresh(self.port, message_id, message(message_id, size),
                                    timeout=10)
            with self._lock:
                if code == 250:
                    self.acked[message_id] = text
                else:
                    self.refused += 1
            if code != 250:
                time.sleep(0.05)

    def start(self):
        return [threads.deferToThread(self.run, i) for i in range(CLIENTS)]

    def stop(self) -> None:
        self._stop.set()


class CrashScenario:
    """The scenario, for one backend: ``spool_url()`` names it, ``disturb()`` may do
    more between kills (restart the broker)."""

    timeout = 900
    kills = KILLS

    def spool_url(self) -> str:
        raise NotImplementedError

    async def disturb(self, kills: int, rng: random.Random) -> None:
        """Called after each kill, before the relay starts again."""

    async def test_sigkill_at_random_points(self):
        rng = random.Random(int(os.environ.get("ESMTPFA_CRASH_SEED", time.time())))
        flapping = FlappingUpstream(rng)
        flapping.start()
        self.addCleanup(flapping.stop)
        url = self.spool_url()
        relay = RunningRelay(self.mktemp(), upstream_port=flapping.port, args=[
            "--delivery-mode", "spool", "--spool-url", url,
            "--spool-retry-min", "1", "--spool-retry-max", "2",
            "--relay-connect-timeout", "2", "--relay-timeout", "5",
            "--relay-data-timeout", "5", "--relay-breaker-cooldown", "1"])
        await relay.start()
        self.addCleanup(relay.stop)
        clients = Clients(relay.smtp_port)
        sending = clients.start()
        kills = 0
        try:
            while kills < self.kills:
                await pause(rng.uniform(0.1, 0.8))
                if rng.random() < 0.3:  # the upstream flaps
                    if flapping.up:
                        await flapping.stop()
                    else:
                        flapping.start()
                await relay.kill()
                kills += 1
                await self.disturb(kills, rng)
                await relay.start()
        finally:
            clients.stop()
            for d in sending:
                await d
        flapping.start()
        listed = await drained(relay, url)
        await relay.stop()
        held = {m["id"]: m for m in listed}
        copies = flapping.copies()
        log.msg(f"spool crash test ({url.partition(':')[0]}): {kills} kills, "
                f"{len(clients.acked)} acknowledged, {clients.refused} refused or cut, "
                f"{len(copies)} at the upstream, {len(held)} held, "
                f"{flapping.after_dot_losses} connections lost after the dot")
        self.assertGreater(len(clients.acked), 100, "too few messages to say anything")
        assert_exactly_once_or_held(self, clients.acked, copies, held)


async def drained(relay: RunningRelay, url: str, seconds: float = 60.0) -> list[dict]:
    """Wait (bounded) until the relay's spool has nothing queued (by its metrics, which
    count a broker's queues too), flushing as an operator would; then the held
    messages as ``esmtpfa-queue --json list`` shows them."""
    metrics = f"http://127.0.0.1:{relay.metrics_port}/metrics"
    queued = None
    for _ in range(int(seconds / 0.5)):
        text = await threads.deferToThread(_get, metrics)
        found = re.search(r'^esmtpfa_spool_messages\{state="queued"\} (\S+)$', text,
                          re.MULTILINE)
        queued = float(found.group(1)) if found else None
        if queued == 0:
            await pause(6)  # the gauge is read every 5 s: confirm with a fresh reading
            text = await threads.deferToThread(_get, metrics)
            if re.search(r'^esmtpfa_spool_messages\{state="queued"\} 0\.0$', text,
                         re.MULTILINE):
                break
        await queue_tool("flush", spool_url=url)
        await pause(0.5)
    else:
        raise AssertionError(f"the queue did not drain: {queued} still queued; the "
                             f"relay's log ends with:\n{relay.log[-6000:]}")
    out, code = await queue_tool("--json", "list", spool_url=url)
    assert code == 0, out
    listed = json.loads(out)
    assert all(m["state"] == "held" for m in listed), listed
    return listed


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return answer.read().decode()


def assert_exactly_once_or_held(case: unittest.TestCase, acked: dict[str, str],
                                copies: dict[bytes, int], held: dict[str, dict]) -> None:
    """What users notice: no message reached the upstream twice; every message a client
    was told 250 for is there once, or held with recipients whose outcome is unknown
    (the relay never sends those again on its own); nothing is held for another
    reason."""
    duplicates = {k: v for k, v in copies.items() if v > 1}
    case.assertEqual(duplicates, {}, "a message reached the upstream twice")
    lost = []
    for message_id, text in acked.items():
        queue_id = re.search(r"urn:uuid:[0-9a-f-]+", text).group(0)
        if copies.get(message_id.encode()) == 1:
            continue
        entry = held.get(queue_id)
        if entry is not None and any(r["state"] == "unknown" for r in entry["recipients"]):
            continue
        lost.append((message_id, queue_id, entry))
    case.assertEqual(lost, [], f"acknowledged but neither delivered nor held "
                               f"({len(acked)} acknowledged)")
    for entry in held.values():
        case.assertTrue(any(r["state"] == "unknown" for r in entry["recipients"]), entry)


class FileSpoolCrashTests(CrashScenario, unittest.TestCase):
    """The file spool (SQLite and fsync'd files) under SIGKILL."""

    def spool_url(self) -> str:
        return f"file://{os.path.abspath(self.mktemp())}"


class AMQPSpoolCrashTests(CrashScenario, SharedRabbitMQ, unittest.TestCase):
    """RabbitMQ quorum queues under SIGKILL of the relay, and of the broker itself now
    and then (it comes back; the relay reconnects)."""

    kills = AMQP_KILLS

    def spool_url(self) -> str:
        assert self.rabbitmq is not None
        return self.rabbitmq.url

    async def disturb(self, kills: int, rng: random.Random) -> None:
        if kills % 10 == 5:  # a broker crash while the relay is down, then back
            await self.rabbitmq.kill()
            await self.rabbitmq.start()


class SpoolWorkersTests(unittest.TestCase):
    """``--workers 2`` on one file spool: both workers accept and deliver from the same
    queue, a message is delivered by one of them only, and SIGKILL of a worker (its
    supervisor starts another) loses nothing."""

    timeout = 300

    async def test_two_workers_share_the_spool(self):
        upstream = RecordingUpstream()
        upstream.start()
        self.addCleanup(upstream.stop)
        url = f"file://{os.path.abspath(self.mktemp())}"
        relay = RunningRelay(self.mktemp(), upstream_port=upstream.port, args=[
            "--workers", "2", "--delivery-mode", "spool", "--spool-url", url,
            "--spool-retry-min", "1", "--spool-retry-max", "2"])
        await relay.start()
        self.addCleanup(relay.stop)
        clients = Clients(relay.smtp_port)
        sending = clients.start()
        killed: set[int] = set()
        try:
            for _ in range(3):
                await pause(1.5)
                alive = [int(pid) for _, pid in
                         re.findall(r"worker (\d+) serving \(pid (\d+)\)", relay.log)
                         if int(pid) not in killed and os.path.exists(f"/proc/{pid}")]
                if alive:
                    os.kill(alive[-1], 9)  # a worker, mid-traffic
                    killed.add(alive[-1])
            await pause(1.5)
        finally:
            clients.stop()
            for d in sending:
                await d
        self.assertEqual(len(killed), 3)
        listed = await drained(relay, url)
        counts: dict[bytes, int] = {}
        for received in upstream.accepted:
            found = MESSAGE_ID.search(received.data)
            counts[found.group(1)] = counts.get(found.group(1), 0) + 1
        self.assertGreater(len(clients.acked), 50)
        assert_exactly_once_or_held(self, clients.acked, counts,
                                    {m["id"]: m for m in listed})
