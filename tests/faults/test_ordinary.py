"""Scenario A: ordinary traffic through a running relay to Postfix's smtp-sink.

Nothing misbehaves here: every message must get ``250`` and be in smtp-sink's dumps
exactly once (with a cleartext upstream hop the pooled producer was
never unregistered, so a pool of one stalled on the second message and the default pool
of twenty after about forty).  A worker stops at its first refusal so that a stalled
relay costs one pool wait, not one per message.
"""

from __future__ import annotations

import os
import re
from collections import Counter

from twisted.internet import defer, reactor, task, threads
from twisted.trial import unittest

from tests.faults.harness import CLIENT, RunningRelay, message, new_message_id, send_batch
from tests.support.processes import run_tool
from tests.support.sink import SmtpSink

#: Short enough that a stalled pool shows as ``451 4.4.5`` in seconds, not 30 s.
RELAY_TIMEOUTS = ("--relay-connect-timeout", "3", "--relay-timeout", "10",
                  "--relay-data-timeout", "20")
ORDINARY = 300          # 2 KB messages, over WORKERS sessions at once
WORKERS = 4
#: Two chunks (64 KiB each) and more: enough 100 KB ones to use every session of the
#: default pool twice (the old producer left one session unusable per such message).
LARGE = (100 * 1024,) * 45 + (5 * 1024 * 1024,)
_MESSAGE_ID = re.compile(rb"^Message-ID:[ \t]*(<[^>\n]*>)", re.IGNORECASE | re.MULTILINE)
_DOT = re.compile(r"^\s*[-~]> \.\s*$")
_REPLY = re.compile(r"^\s*<(?:-|~|\*\*)\s+(\d{3}[ -].*)$")
_ERROR = re.compile(r"^\s*<\*\*\s+(\d{3}[ -].*)$")  # swaks marks a refusal with <**


def delivered(sink: SmtpSink) -> Counter:
    """How many times each Message-ID is in smtp-sink's dumps (one file per message)."""
    found: Counter = Counter()
    for dumped in sink.messages():
        head = dumped.content.split(b"\n\n", 1)[0]
        match = _MESSAGE_ID.search(head)
        found[match.group(1).decode() if match else None] += 1
    return found


def verdict(swaks_output: str) -> str:
    """The reply that decided a swaks transaction: the first refusal, else the reply to
    the final dot ("" if none came)."""
    lines = swaks_output.splitlines()
    for line in lines:
        refusal = _ERROR.match(line)
        if refusal:
            return refusal.group(1)
    for index, line in enumerate(lines):
        if _DOT.match(line):
            for after in lines[index + 1:]:
                reply = _REPLY.match(after)
                if reply:
                    return reply.group(1)
            return ""
    return ""


class OrdinaryTrafficTests(unittest.TestCase):
    timeout = 120

    async def relay_to_sink(self, *args: str, env: dict[str, str] | None = None):
        sink = SmtpSink(None)
        self.addCleanup(sink.close)
        await sink.start()
        relay = RunningRelay(self.mktemp(), upstream_port=sink.port,
                             args=[*RELAY_TIMEOUTS, *args], env=env)
        self.addCleanup(relay.stop)
        await relay.start()
        return relay, sink

    async def send_traffic(self, relay: RunningRelay) -> list[tuple[str, int, str]]:
        """ORDINARY small messages and the LARGE ones, mixed, over WORKERS sessions at once."""
        small = [(mid, message(mid)) for mid in
                 (new_message_id("ordinary", n) for n in range(ORDINARY))]
        large = [(mid, message(mid, size)) for mid, size in
                 ((new_message_id("large", n), size) for n, size in enumerate(LARGE))]
        mixed = ([item for pair in zip(small, large, strict=False) for item in pair]
                 + small[len(large):])
        batches = [mixed[n::WORKERS] for n in range(WORKERS)]
        results = await defer.gatherResults(
            [threads.deferToThread(send_batch, relay.smtp_port, batch) for batch in batches],
            consumeErrors=True)
        self.sent = [mid for mid, _ in small + large]
        return [result for batch in results for result in batch]

    def assert_all_accepted_exactly_once(self, results, sink: SmtpSink) -> None:
        refused = [r for r in results if r[1] != 250]
        self.assertEqual(refused, [], f"{len(refused)} refused, first: {refused[:3]}")
        self.assertEqual(len(results), len(self.sent), "some messages were never sent")
        counts = delivered(sink)
        self.assertEqual({mid: counts[mid] for mid in self.sent if counts[mid] != 1}, {},
                         "a message acknowledged with 250 is missing or duplicated")
        self.assertEqual(sum(counts.values()), len(self.sent), "unexpected extra messages")

    async def test_swaks_three_times_at_pool_size_one(self):
        """250, 250, 250, not 250, 451, 451."""
        relay, sink = await self.relay_to_sink(env={"RELAY_POOL_SIZE": "1"})
        body = os.path.join(relay.directory, "body.txt")
        with open(body, "w") as f:
            f.write(("x" * 76 + "\n") * (100 * 1024 // 77))
        replies = []
        for n in range(3):
            output, _ = await run_tool(
                "swaks", "--server", "127.0.0.1", "--port", str(relay.smtp_port),
                "--auth", "PLAIN", "--auth-user", CLIENT[0], "--auth-password", CLIENT[1],
                "--from", "carol@example.com", "--to", "dave@example.net",
                "--header", f"Message-ID: {new_message_id('swaks', n)}",
                "--body", "@" + body, "--timeout", "30")
            replies.append(verdict(output))
        self.assertEqual([reply[:3] for reply in replies], ["250", "250", "250"], replies)
        counts = delivered(sink)
        self.assertEqual(sorted(counts.values()), [1, 1, 1], counts)

    async def test_hundreds_of_messages_at_pool_size_one(self):
        relay, sink = await self.relay_to_sink("--relay-pool-size", "1")
        results = await self.send_traffic(relay)
        self.assert_all_accepted_exactly_once(results, sink)

    async def test_hundreds_of_messages_at_the_default_pool_size(self):
        relay, sink = await self.relay_to_sink()
        results = await self.send_traffic(relay)
        self.assert_all_accepted_exactly_once(results, sink)

    async def test_hundreds_of_messages_through_two_worker_processes(self):
        """The same traffic through ``--workers 2`` (docs/workers.md): every message
        reaches the upstream exactly once, whichever worker the kernel gave it to."""
        relay, sink = await self.relay_to_sink("--workers", "2")
        results = await self.send_traffic(relay)
        self.assert_all_accepted_exactly_once(results, sink)
        self.assertIn("[worker 1 ", relay.log)
        self.assertIn("[worker 2 ", relay.log)

    async def test_hundreds_of_messages_through_the_spool(self):
        """``--delivery-mode spool`` (docs/spool.md): every 250 means stored, and the
        queue runner delivers each message to smtp-sink exactly once, large ones too."""
        spool = os.path.abspath(self.mktemp())
        relay, sink = await self.relay_to_sink(
            "--delivery-mode", "spool", "--spool-url", f"file://{spool}")
        results = await self.send_traffic(relay)
        for _ in range(600):  # bounded: the background delivery catches up
            if sum(delivered(sink).values()) >= len(self.sent):
                break
            await task.deferLater(reactor, 0.1, lambda: None)
        await task.deferLater(reactor, 1.0, lambda: None)  # and nothing more arrives
        self.assert_all_accepted_exactly_once(results, sink)
        self.assertTrue(all("Queued as" in text for _, _, text in results))
