"""``esmtpfa-queue``, the console script, against a file spool as an operator uses it:
while a relay process has the same spool open, with ``SPOOL_URL`` in the environment.

The relay here is a real ``twistd esmtpfa --delivery-mode spool`` whose upstream is
down, so its messages stay queued for the tool to list, hold, release and delete; the
tool's answers are read from its output and exit status.
"""

from __future__ import annotations

import json
import os
import re

from twisted.internet import reactor, task, threads
from twisted.trial import unittest

from tests.faults.harness import RunningRelay, message, send_fresh
from tests.support.ports import free_port
from tests.support.processes import queue_tool
from tests.support.rabbitmq import SharedRabbitMQ
from tests.support.upstream import RecordingUpstream
from tests.support.webclient import get_blocking

QUEUE_ID = re.compile(r"urn:uuid:[0-9a-f-]+")


def pause(seconds: float):
    return task.deferLater(reactor, seconds, lambda: None)


class QueueToolTests(unittest.TestCase):
    timeout = 180

    async def setUp(self):
        self.upstream = RecordingUpstream()
        self.upstream.port = free_port("127.0.0.1")  # down until a test starts it
        self.spool = os.path.abspath(self.mktemp())
        self.url = f"file://{self.spool}"
        self.relay = RunningRelay(self.mktemp(), upstream_port=self.upstream.port, args=[
            "--delivery-mode", "spool", "--spool-url", self.url,
            "--spool-retry-min", "600", "--relay-connect-timeout", "2",
            "--relay-breaker-cooldown", "1"])
        await self.relay.start()
        self.addCleanup(self.relay.stop)
        self.addCleanup(self.upstream.stop)
        self.ids = []
        for n in range(3):
            code, text = await threads.deferToThread(
                send_fresh, self.relay.smtp_port, f"<tool{n}@faults.test>",
                message(f"<tool{n}@faults.test>"))
            self.assertEqual(code, 250, text)
            self.ids.append(QUEUE_ID.search(text).group(0))

    async def tool(self, *args: str) -> tuple[str, int]:
        return await queue_tool(*args, spool_url=self.url)

    async def listed(self) -> dict[str, dict]:
        out, code = await self.tool("--json", "list")
        self.assertEqual(code, 0, out)
        return {entry["id"]: entry for entry in json.loads(out)}

    async def test_list_shows_every_message_and_its_recipients(self):
        out, code = await self.tool("list")
        self.assertEqual(code, 0, out)
        for queue_id in self.ids:
            self.assertIn(queue_id, out)
        self.assertIn("<carol@example.com>", out)
        self.assertIn("<dave@example.net>", out)
        self.assertIn("in 3 message(s)", out)
        listed = await self.listed()
        self.assertEqual(set(listed), set(self.ids))
        entry = listed[self.ids[0]]
        self.assertEqual(entry["identity"], "lab/carol")
        self.assertEqual([r["address"] for r in entry["recipients"]], ["dave@example.net"])

    async def test_show_prints_the_header_section(self):
        out, code = await self.tool("show", self.ids[0])
        self.assertEqual(code, 0, out)
        self.assertIn("Subject: fault suite <tool0@faults.test>", out)
        self.assertIn("by relay.test", out)  # our Received header comes first
        self.assertNotIn("quick brown fox", out)  # the body is not shown

    async def test_hold_release_delete(self):
        out, code = await self.tool("hold", self.ids[0])
        self.assertEqual(code, 0, out)
        self.assertEqual((await self.listed())[self.ids[0]]["state"], "held")
        out, code = await self.tool("hold", self.ids[0])
        self.assertEqual(code, 1, out)  # already held: refused, one line, no traceback
        self.assertNotIn("Traceback", out)
        out, code = await self.tool("delete", self.ids[1])
        self.assertEqual(code, 0, out)
        self.assertNotIn(self.ids[1], await self.listed())
        out, code = await self.tool("release", self.ids[2])
        self.assertEqual(code, 1, out)  # not held
        # The upstream comes back: release and flush deliver while the relay runs.
        self.upstream.start(self.upstream.port)
        await pause(1.5)  # past the circuit breaker's cooldown
        out, code = await self.tool("release", self.ids[0])
        self.assertEqual(code, 0, out)
        out, code = await self.tool("flush")
        self.assertEqual(code, 0, out)
        for _ in range(200):
            if len(self.upstream.accepted) == 2:
                break
            await pause(0.1)
        delivered = sorted(QUEUE_ID.search(m.data.decode()).group(0)
                           for m in self.upstream.accepted)
        self.assertEqual(delivered, sorted([self.ids[0], self.ids[2]]))
        for _ in range(50):
            if not await self.listed():
                break
            await pause(0.1)
        self.assertEqual(await self.listed(), {})

    async def test_requeue_all(self):
        out, code = await self.tool("requeue")
        self.assertEqual(code, 0, out)
        self.assertIn("3 message(s) requeued", out)
        for entry in (await self.listed()).values():  # due now: tried again at once
            self.assertEqual(entry["state"], "queued")
            self.assertLessEqual(entry["attempts"], 1)

    async def test_unknown_id_and_bad_usage(self):
        out, code = await self.tool("show", "urn:uuid:00000000-0000-0000-0000-000000000000")
        self.assertEqual(code, 1, out)
        self.assertNotIn("Traceback", out)
        out, code = await self.tool("frobnicate")
        self.assertEqual(code, 2, out)
        self.assertIn("unknown command", out)
        out, code = await queue_tool("list", spool_url="ftp://example.com/spool")
        self.assertEqual(code, 2, out)
        self.assertIn("SPOOL_URL", out)

    async def test_credentials_never_shown(self):
        out, code = await queue_tool(
            "list", spool_url="amqp://spooler:s3cret-pass@127.0.0.1:1/vhost")
        self.assertNotEqual(code, 0, out)
        self.assertNotIn("s3cret-pass", out)
        self.assertNotIn("Traceback", out)


class AMQPQueueToolTests(SharedRabbitMQ, unittest.TestCase):
    """The same tool on RabbitMQ (docs/spool.md, "RabbitMQ"): messages waiting for
    their retry are listed and flushed; the broker's password never shows."""

    timeout = 180

    async def test_list_and_flush_on_the_broker(self):
        upstream = RecordingUpstream()
        upstream.port = free_port("127.0.0.1")
        self.addCleanup(upstream.stop)
        url = self.rabbitmq.url
        relay = RunningRelay(self.mktemp(), upstream_port=upstream.port, args=[
            "--delivery-mode", "spool", "--spool-url", url, "--spool-retry-min", "600",
            "--relay-connect-timeout", "2", "--relay-breaker-cooldown", "1"])
        await relay.start()
        self.addCleanup(relay.stop)
        for _ in range(100):  # ready once the broker's connection is up (docs/spool.md)
            status = await threads.deferToThread(
                get_blocking, relay.metrics_port, "/readyz")
            if status[0] == 200:
                break
            await pause(0.1)
        code, text = await threads.deferToThread(
            send_fresh, relay.smtp_port, "<amqp-tool@faults.test>",
            message("<amqp-tool@faults.test>"))
        self.assertEqual(code, 250, text)
        queue_id = QUEUE_ID.search(text).group(0)
        listed: dict = {}
        for _ in range(100):  # until its first attempt failed and it waits for a retry
            out, code = await queue_tool("--json", "list", spool_url=url)
            self.assertEqual(code, 0, out)
            listed = {entry["id"]: entry for entry in json.loads(out)}
            if queue_id in listed:
                break
            await pause(0.1)
        self.assertEqual(listed[queue_id]["state"], "queued")
        self.assertEqual(listed[queue_id]["attempts"], 1)
        self.assertNotIn(self.rabbitmq.password, out)
        upstream.start(upstream.port)
        await pause(1.2)  # the breaker's cooldown
        out, code = await queue_tool("flush", spool_url=url)
        self.assertEqual(code, 0, out)
        for _ in range(150):
            if upstream.accepted:
                break
            await pause(0.1)
        self.assertEqual(len(upstream.accepted), 1)
        self.assertIn(queue_id.encode(), upstream.accepted[0].data)
