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

The bounded CI run makes ``KILLS`` kills; ``bench/spool_crash.py`` runs it longer.
"""

from __future__ import annotations

import json
import os
import random
import re
import threading
import time

from twisted.internet import reactor, task, threads
from twisted.python import log
from twisted.trial import unittest

from tests.faults.harness import RunningRelay, message, new_message_id, send_fresh
from tests.support.ports import free_port
from tests.support.processes import queue_tool
from tests.support.upstream import RecordingUpstream

KILLS = int(os.environ.get("ESMTPFA_CRASH_KILLS", "100"))
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


class SpoolCrashTests(unittest.TestCase):
    timeout = 900

    async def test_sigkill_at_random_points(self):
        rng = random.Random(int(os.environ.get("ESMTPFA_CRASH_SEED", time.time())))
        flapping = FlappingUpstream(rng)
        flapping.start()
        self.addCleanup(flapping.stop)
        spool = os.path.abspath(self.mktemp())
        relay = RunningRelay(self.mktemp(), upstream_port=flapping.port, args=[
            "--delivery-mode", "spool", "--spool-url", f"file://{spool}",
            "--spool-retry-min", "1", "--spool-retry-max", "2",
            "--relay-connect-timeout", "2", "--relay-timeout", "5",
            "--relay-data-timeout", "5", "--relay-breaker-cooldown", "1"])
        await relay.start()
        self.addCleanup(relay.stop)
        clients = Clients(relay.smtp_port)
        sending = clients.start()
        kills = 0
        try:
            while kills < KILLS:
                await pause(rng.uniform(0.1, 0.8))
                if rng.random() < 0.3:  # the upstream flaps
                    if flapping.up:
                        await flapping.stop()
                    else:
                        flapping.start()
                await relay.kill()
                kills += 1
                await relay.start()
        finally:
            clients.stop()
            await threads.deferToThread(lambda: None)
            for d in sending:
                await d
        flapping.start()
        # Drain: everything queued is delivered, or held.
        url = f"file://{spool}"
        for _ in range(120):
            out, code = await queue_tool("--json", "list", spool_url=url)
            self.assertEqual(code, 0, out)
            listed = json.loads(out)
            if all(m["state"] == "held" for m in listed):
                break
            await queue_tool("flush", spool_url=url)
            await pause(0.5)
        else:
            self.fail(f"the queue did not drain: {len(listed)} left")
        await relay.stop()
        held = {m["id"]: m for m in listed}
        log.msg(f"spool crash test: {kills} kills, {len(clients.acked)} acknowledged, "
                f"{clients.refused} refused or cut, {len(flapping.copies())} at the "
                f"upstream, {len(held)} held, {flapping.after_dot_losses} connections lost "
                f"after the dot")
        copies = flapping.copies()
        self.assertGreater(len(clients.acked), 100, "too few messages to say anything")
        duplicates = {k: v for k, v in copies.items() if v > 1}
        self.assertEqual(duplicates, {}, "a message reached the upstream twice")
        lost = []
        for message_id, text in clients.acked.items():
            queue_id = re.search(r"urn:uuid:[0-9a-f-]+", text).group(0)
            if copies.get(message_id.encode()) == 1:
                continue
            entry = held.get(queue_id)
            if entry is not None and any(r["state"] in ("unknown", "started")
                                         for r in entry["recipients"]):
                continue
            lost.append((message_id, queue_id, entry))
        self.assertEqual(lost, [], f"acknowledged but neither delivered nor held "
                                   f"({kills} kills, {len(clients.acked)} acknowledged)")
        for entry in held.values():  # held only for an unknown outcome
            self.assertTrue(any(r["state"] == "unknown" for r in entry["recipients"]),
                            entry)
