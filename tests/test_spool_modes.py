"""The delivery modes end to end: the whole relay in-process, a real file spool on disk,
a recording upstream that is up, down, refusing or stalling, and a real SMTP client.

What the users notice: the reply to the final dot (the upstream's, or "Queued as"),
how many copies reach the upstream, the bounce a sender gets, what the queue tool
shows, and whether the relay says it is ready.
"""

from __future__ import annotations

import email
import email.policy
import inspect
import json
import os
import re
import smtplib
import sqlite3
import urllib.request

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from tests.support.builders import providers_document, userpass_provider
from tests.support.ports import free_port
from tests.support.rabbitmq import SharedRabbitMQ
from tests.support.relayfixture import PASSWORD, PRINTERS, USER, RelayFixture
from tests.support.upstream import RecordingUpstream

MESSAGE = (b"From: alice@example.com\r\nTo: bob@example.net\r\nSubject: spooled\r\n"
           b"Message-ID: <m1@example.com>\r\n\r\nHello through the spool.\r\n")
#: Larger than the file spool keeps in its index (``files.INLINE_LIMIT``): a file of its own.
LARGE = MESSAGE + (b"x" * 76 + b"\r\n") * 1000
QUEUED = re.compile(r"2\.0\.0 Queued as (urn:uuid:[0-9a-f-]+)")


def send(fixture: RelayFixture, recipients=("bob@example.net",), sender="alice@example.com",
         content: bytes = MESSAGE) -> tuple[int, str, dict]:
    """One message over SMTP with smtplib (STARTTLS, AUTH): the final reply and the
    refused recipients."""
    with smtplib.SMTP("127.0.0.1", fixture.plain_port, timeout=30) as client:
        client.starttls(context=fixture.client_context())
        client.login(USER, PASSWORD)
        client.ehlo()
        refused: dict = {}
        code, text = client.mail(sender)
        assert code == 250, (code, text)
        for rcpt in recipients:
            rcode, rtext = client.rcpt(rcpt)
            if rcode != 250:
                refused[rcpt] = (rcode, rtext.decode())
        if len(refused) == len(recipients):
            return 0, "", refused
        code, text = client.data(content)
        return code, text.decode(), refused


async def eventually(check, timeout: float = 20.0, step: float = 0.1):
    """Wait (bounded) until ``check()`` (a value, a Deferred or a coroutine) is truthy;
    returns its value."""
    for _ in range(int(timeout / step)):
        value = check()
        if isinstance(value, defer.Deferred) or inspect.iscoroutine(value):
            value = await value
        if value:
            return value
        await pause(step)
    raise AssertionError(f"not within {timeout} s: {check}")


def pause(seconds: float) -> defer.Deferred:
    return task.deferLater(reactor, seconds, lambda: None)


def readyz(fixture: RelayFixture) -> tuple[int, dict]:
    url = f"http://127.0.0.1:{fixture.metrics_port}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def metrics(fixture: RelayFixture) -> str:
    url = f"http://127.0.0.1:{fixture.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as answer:
        return answer.read().decode()


class SpoolCase(unittest.TestCase):
    mode = "spool"
    extra: tuple[str, ...] = ()

    def relay(self, *args: str, upstream: RecordingUpstream | None = None,
              start_upstream: bool = True) -> RelayFixture:
        self.spool_dir = os.path.abspath(self.mktemp())
        upstream = upstream or RecordingUpstream()
        if start_upstream:
            upstream.start()
        else:
            upstream.port = free_port("127.0.0.1")  # nothing listens there yet
        fixture = RelayFixture(
            self.mktemp(), "--delivery-mode", self.mode,
            "--spool-url", f"file://{self.spool_dir}", "--spool-retry-min", "1",
            "--spool-retry-max", "2", *self.extra, *args, upstream=upstream)
        self.addCleanup(fixture.stop)
        return fixture

    def queue(self, fixture: RelayFixture):
        """The relay's own spool, as the queue tool sees it (``IQueueAdmin``)."""
        return fixture.service.spool_service.spool

    async def held(self, fixture: RelayFixture) -> list:
        return [s for s in await self.queue(fixture).list() if s.state == "held"]


class SpoolModeTests(SpoolCase):
    """``--delivery-mode spool``: 250 once stored; delivered in the background."""

    async def test_queued_then_delivered_once(self):
        fixture = self.relay()
        await fixture.start()
        code, text, _ = await fixture.run(send, fixture)
        self.assertEqual(code, 250)
        message_id = QUEUED.search(text).group(1)
        upstream = fixture.upstream
        await eventually(lambda: upstream.accepted)
        await pause(1.5)  # a second runner pass sends nothing
        self.assertEqual(len(upstream.accepted), 1)
        received = upstream.accepted[0]
        self.assertEqual(received.rcpts, ["bob@example.net"])
        self.assertIn(message_id.encode(), received.data)
        self.assertTrue(received.data.endswith(b"Hello through the spool.\r\n"))
        self.assertEqual(await self.queue(fixture).list(), [])

    async def test_upstream_down_then_up(self):
        """The point of the spool: the upstream is down when the client sends."""
        fixture = self.relay(start_upstream=False)
        await fixture.start()
        code, text, _ = await fixture.run(send, fixture)
        self.assertEqual(code, 250, text)
        status, body = await fixture.run(readyz, fixture)
        self.assertEqual(status, 200, body)  # ready: the spool accepts
        listed = await self.queue(fixture).list()
        self.assertEqual(len(listed), 1)
        async def deferred_once():
            text = await fixture.run(metrics, fixture)
            return 'spool_delivery_attempts_total{result="deferred"} 0.0' not in text
        await eventually(deferred_once)
        fixture.upstream.start(fixture.upstream.port)
        await self.queue(fixture).flush()
        await eventually(lambda: fixture.upstream.accepted, timeout=30)
        self.assertEqual(len(fixture.upstream.accepted), 1)

        async def empty():
            return await self.queue(fixture).list() == []
        await eventually(empty, timeout=10)


    async def test_permanent_refusal_bounces_to_the_sender(self):
        upstream = RecordingUpstream(rcpt_replies={
            "gone@example.net": "550 5.1.1 <gone@example.net>: no such user"})
        fixture = self.relay(upstream=upstream)
        await fixture.start()
        code, text, _ = await fixture.run(
            send, fixture, ("bob@example.net", "gone@example.net"))
        self.assertEqual(code, 250, text)
        await eventually(lambda: len(upstream.accepted) >= 2)
        original = [m for m in upstream.accepted if m.mail_from]
        bounces = [m for m in upstream.accepted if not m.mail_from]
        self.assertEqual([m.rcpts for m in original], [["bob@example.net"]])
        self.assertEqual([m.rcpts for m in bounces], [["alice@example.com"]])
        report = email.message_from_bytes(bounces[0].data, policy=email.policy.default)
        self.assertEqual(report.get_content_type(), "multipart/report")
        self.assertEqual(report.get_param("report-type"), "delivery-status")
        status = report.get_payload()[1]
        self.assertEqual(status.get_content_type(), "message/delivery-status")
        text = bounces[0].data.decode("utf-8", "replace")
        self.assertIn("gone@example.net", text)
        self.assertIn("5.1.1", text)
        self.assertNotIn("bob@example.net", text.split("text/rfc822-headers")[0]
                         .split("message/delivery-status")[1])
        self.assertIn('spool_bounces_total 1.0', await fixture.run(metrics, fixture))

    async def test_null_sender_is_held_not_bounced(self):
        upstream = RecordingUpstream(rcpt_replies={
            "gone@example.net": "550 5.1.1 no such user"})
        fixture = self.relay(upstream=upstream)
        await fixture.start()
        code, text, _ = await fixture.run(send, fixture, ("gone@example.net",), "")
        self.assertEqual(code, 250, text)
        listed = await eventually(lambda: self.held(fixture))
        self.assertIn("never bounced", listed[0].hold_reason)
        self.assertEqual(upstream.accepted, [])

    async def test_after_the_dot_is_held_never_resent(self):
        """The upstream takes the dot and the connection dies: the outcome is unknown,
        so the message is held for an operator, never sent again by the relay."""
        upstream = RecordingUpstream(script=lambda index, verb, line:
                                     "CLOSE" if verb == "EOM" and index == 0 else None)
        fixture = self.relay(upstream=upstream)
        await fixture.start()
        code, text, _ = await fixture.run(send, fixture)
        self.assertEqual(code, 250, text)
        held = await eventually(lambda: self.held(fixture))
        self.assertIn("outcome unknown", held[0].hold_reason)
        self.assertEqual([r.state for r in held[0].recipients], ["unknown"])
        await pause(2.5)  # retries would have come by now
        self.assertEqual(sum("DATA" in s.verbs() for s in upstream.sessions), 1)
        self.assertEqual(upstream.accepted, [])
        # The operator checked the upstream's log and releases it: sent once more.
        await self.queue(fixture).release(held[0].id)
        await eventually(lambda: upstream.accepted)

    async def test_the_250_comes_after_the_commit_of_content_and_rows(self):
        """Durable means durable: when the client reads its 250 for a small message,
        its content and its rows are committed together (another connection to the
        database sees both), and no file was written for it."""
        fixture = self.relay(start_upstream=False)
        await fixture.start()

        def send_and_look():
            code, text, _ = send(fixture)
            database = sqlite3.connect(
                f"file:{os.path.join(self.spool_dir, 'queue.sqlite')}?mode=ro", uri=True)
            try:
                rows = database.execute(
                    "SELECT id, data FROM messages JOIN contents "
                    "ON contents.message_id = messages.id").fetchall()
            finally:
                database.close()
            return code, text, rows
        code, text, rows = await fixture.run(send_and_look)
        self.assertEqual(code, 250, text)
        [(message_id, data)] = rows
        self.assertEqual(message_id, QUEUED.search(text).group(1))
        self.assertTrue(data.endswith(MESSAGE), data[-200:])
        self.assertEqual([names for _, _, names in os.walk(self.spool_dir + "/msg")
                          if names], [])

    async def test_the_250_comes_after_the_fsync_and_the_commit(self):
        """Durable means durable: when the client reads its 250 for a large message,
        the message file and its directory were fsync'd and the queue's row is
        committed (another connection to the database sees it)."""
        fixture = self.relay(start_upstream=False)
        await fixture.start()
        synced: list[str] = []
        real_fsync = os.fsync

        def recording_fsync(fd: int) -> None:
            real_fsync(fd)
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        self.patch(os, "fsync", recording_fsync)

        def send_and_look():
            code, text, _ = send(fixture, content=LARGE)
            seen_synced = list(synced)  # what was fsync'd when the reply arrived
            database = sqlite3.connect(
                f"file:{os.path.join(self.spool_dir, 'queue.sqlite')}?mode=ro", uri=True)
            try:
                rows = database.execute("SELECT id FROM messages").fetchall()
            finally:
                database.close()
            return code, text, seen_synced, rows
        code, text, seen_synced, rows = await fixture.run(send_and_look)
        self.assertEqual(code, 250, text)
        message_id = QUEUED.search(text).group(1)
        self.assertEqual(rows, [(message_id,)])
        # The content was fsync'd (written under tmp/), then the directory it was
        # renamed into; that directory now holds it.
        written = [p for p in seen_synced
                   if p.startswith(os.path.join(self.spool_dir, "tmp") + os.sep)]
        directories = [p for p in seen_synced
                       if os.path.dirname(p) == os.path.join(self.spool_dir, "msg")]
        self.assertEqual(len(written), 1, seen_synced)
        self.assertEqual(len(directories), 1, seen_synced)
        self.assertLess(seen_synced.index(written[0]), seen_synced.index(directories[0]))
        self.assertIn(os.path.basename(written[0]), os.listdir(directories[0]))

    async def test_an_upstream_back_from_its_breaker_gets_the_whole_backlog(self):
        """While the circuit breaker lets one trial through, the other messages are not
        tried at all: they learnt nothing and must not wait a whole backoff (here 600 s)
        for the upstream that just came back."""
        fixture = self.relay("--spool-retry-min", "600", "--spool-retry-max", "600",
                             "--relay-breaker-cooldown", "1", start_upstream=False)
        await fixture.start()
        for _ in range(6):
            code, text, _ = await fixture.run(send, fixture)
            self.assertEqual(code, 250, text)
        fixture.upstream.start(fixture.upstream.port)
        await pause(1.2)  # the breaker's cooldown passes
        await self.queue(fixture).flush()
        await eventually(lambda: len(fixture.upstream.accepted) == 6, timeout=40)

    async def test_a_backlog_drains_over_the_connections_nobody_else_wants(self):
        """docs/spool.md, "Fairness and bounds": with no live client, the runner goes
        beyond its client share (2 of 4 connections here) to the whole pool."""
        fixture = self.relay("--relay-pool-size", "4", "--spool-concurrency", "4",
                             "--relay-breaker-failures", "1000", start_upstream=False)
        await fixture.start()
        for _ in range(8):
            code, text, _ = await fixture.run(send, fixture)
            self.assertEqual(code, 250, text)
        fixture.upstream.start(fixture.upstream.port)
        await self.queue(fixture).flush()
        await eventually(lambda: len(fixture.upstream.accepted) == 8, timeout=30)
        self.assertGreater(len(fixture.upstream.sessions), 2)  # borrowed beyond the share
        self.assertLessEqual(len(fixture.upstream.sessions), 4)  # never beyond the pool

    async def test_content_lost_after_started_keeps_the_message(self):
        """The content cannot be read once the recipients were recorded as started: the
        upstream transaction is dropped before any content, and the message stays
        queued (never forgotten as if it were finished)."""
        fixture = self.relay("--relay-breaker-cooldown", "1", start_upstream=False)
        await fixture.start()
        code, text, _ = await fixture.run(lambda: send(fixture, content=LARGE))  # a file
        self.assertEqual(code, 250, text)
        for directory, _, names in os.walk(os.path.join(self.spool_dir, "msg")):
            for name in names:
                os.unlink(os.path.join(directory, name))
        fixture.upstream.start(fixture.upstream.port)
        await pause(1.2)
        await self.queue(fixture).flush()
        await eventually(lambda: any("RCPT" in s.verbs() for s in fixture.upstream.sessions))
        await pause(1.0)
        listed = await self.queue(fixture).list()
        self.assertEqual(len(listed), 1)
        self.assertEqual([r.state for r in listed[0].recipients], ["pending"])
        self.assertEqual(fixture.upstream.messages, [])
        self.flushLoggedErrors()  # the attempt's failure is logged loudly, as it should

    async def test_full_spool_refuses_at_mail(self):
        fixture = self.relay("--spool-max-size", "1")
        await fixture.start()
        status, body = await fixture.run(readyz, fixture)
        self.assertEqual(status, 503, body)  # not ready: it cannot store
        self.assertIn("the spool is full", body["checks"]["spool"]["detail"])

        def script():
            with smtplib.SMTP("127.0.0.1", fixture.plain_port, timeout=30) as client:
                client.starttls(context=fixture.client_context())
                client.login(USER, PASSWORD)
                return client.mail("alice@example.com")
        code, text = await fixture.run(script)
        self.assertEqual((code, text[:5]), (452, b"4.3.1"))


class HoldModeTests(SpoolCase):
    extra = ("--spool-undeliverable", "hold")

    async def test_refused_message_is_held_and_listed(self):
        upstream = RecordingUpstream(replies={"MAIL": "550 5.7.1 sender refused"})
        fixture = self.relay(upstream=upstream)
        await fixture.start()
        code, text, _ = await fixture.run(send, fixture)
        self.assertEqual(code, 250, text)
        held = await eventually(lambda: self.held(fixture))
        self.assertEqual(held[0].recipients[0].state, "failed")
        self.assertIn("5.7.1", held[0].recipients[0].reply)
        self.assertIn("spool_holds_total 1.0", await fixture.run(metrics, fixture))


class FallbackModeTests(SpoolCase):
    """``--delivery-mode fallback``: passthrough while the upstream works."""

    mode = "fallback"
    async def test_upstream_up_is_passthrough(self):
        fixture = self.relay()
        await fixture.start()
        code, text, _ = await fixture.run(send, fixture)
        self.assertEqual(code, 250)
        self.assertIn("Message accepted as", text)
        self.assertEqual(len(fixture.upstream.accepted), 1)
        self.assertEqual(await self.queue(fixture).list(), [])

    async def test_upstream_down_is_queued(self):
        fixture = self.relay(start_upstream=False)
        await fixture.start()
        code, text, _ = await fixture.run(send, fixture)
        self.assertEqual(code, 250, text)
        self.assertIn("upstream unavailable, delivery will be retried", text)
        self.assertIn('spool_accepted_total{mode="fallback"} 1.0',
                      await fixture.run(metrics, fixture))
        fixture.upstream.start(fixture.upstream.port)
        await self.queue(fixture).flush()
        await eventually(lambda: fixture.upstream.accepted, timeout=30)

    async def test_permanent_refusal_stays_permanent(self):
        fixture = self.relay(upstream=RecordingUpstream(
            eom_reply="554 5.6.0 content refused"))
        await fixture.start()
        code, text, _ = await fixture.run(send, fixture)
        self.assertEqual(code, 554)
        self.assertEqual(await self.queue(fixture).list(), [])

    async def test_recipient_verdict_is_the_recipients(self):
        fixture = self.relay(upstream=RecordingUpstream(rcpt_replies={
            "busy@example.net": "450 4.2.1 mailbox busy"}))
        await fixture.start()
        code, text, refused = await fixture.run(
            send, fixture, ("bob@example.net", "busy@example.net"))
        self.assertEqual(code, 250)
        self.assertIn("Message accepted as", text)
        self.assertEqual(refused["busy@example.net"][0], 450)

    async def test_lost_after_the_dot_is_not_queued(self):
        """Spooling a message the upstream may have would send it twice."""
        upstream = RecordingUpstream(script=lambda index, verb, line:
                                     "CLOSE" if verb == "EOM" else None)
        fixture = self.relay(upstream=upstream)
        await fixture.start()
        code, text, _ = await fixture.run(send, fixture)
        self.assertEqual(code, 451)
        self.assertIn("duplicate is possible", text)
        self.assertEqual(await self.queue(fixture).list(), [])

    async def test_temporary_refusal_of_the_message_is_queued(self):
        ends: list[bytes] = []

        def first_end_refused(index: int, verb: str, line: bytes) -> str | None:
            if verb == "EOM":
                ends.append(line)
                return "451 4.3.0 try later" if len(ends) == 1 else None
            return None
        upstream = RecordingUpstream(script=first_end_refused)
        fixture = self.relay(upstream=upstream)
        await fixture.start()
        code, text, _ = await fixture.run(send, fixture)
        self.assertEqual(code, 250, text)
        self.assertIn("Queued as", text)
        await self.queue(fixture).flush()
        await eventually(lambda: upstream.accepted, timeout=30)
        self.assertEqual(len(upstream.accepted), 1)


class PolicyModeTests(SpoolCase):
    """A provider's policy chooses its own mode: printers spool, the app passes through."""

    mode = "passthrough"
    async def test_per_provider_mode(self):
        providers = providers_document(
            userpass_provider("office", USER, PASSWORD, fallback=True,
                              policy="  policy: {delivery: spool}\n"), PRINTERS)
        fixture = self.relay(start_upstream=False)
        fixture.providers = providers
        await fixture.start()
        code, text, _ = await fixture.run(send, fixture)
        self.assertEqual(code, 250, text)
        self.assertIn("Queued as", text)

        def printer():
            with smtplib.SMTP("127.0.0.1", fixture.plain_port, timeout=30) as client:
                client.starttls(context=fixture.client_context())
                client.login("printers", "printer1:p:with:colons")
                try:
                    client.sendmail("scan@example.com", ["bob@example.net"], MESSAGE)
                except smtplib.SMTPDataError as error:
                    return error.smtp_code
                except smtplib.SMTPRecipientsRefused as error:
                    return list(error.recipients.values())[0][0]
                return 250
        self.assertEqual(await fixture.run(printer), 451)  # passthrough: upstream down


class HTTPSpoolTests(SpoolCase):
    async def test_http_submission_says_queued(self):
        import base64
        fixture = self.relay("--http", start_upstream=False)
        await fixture.start()

        def post():
            body = json.dumps({"from": "alice@example.com", "to": ["bob@example.net"],
                               "data": base64.b64encode(MESSAGE).decode()}).encode()
            request = urllib.request.Request(
                f"http://127.0.0.1:{fixture.http_port}/", data=body,
                headers={"Content-Type": "application/json",
                         "Authorization": "Basic " + base64.b64encode(
                             f"{USER}:{PASSWORD}".encode()).decode()})
            with urllib.request.urlopen(request, timeout=30) as answer:
                return answer.status, json.loads(answer.read())
        status, body = await fixture.run(post)
        self.assertEqual(status, 202)
        self.assertTrue(body["queued"])
        self.assertTrue(body["id"].startswith("urn:uuid:"))


class SpoolOptionTests(unittest.TestCase):
    """The ``--spool-*`` settings: sizes and durations as operators write them, and a
    one-line error naming the setting, never a URL's password."""

    def parse(self, *args: str, env: dict | None = None):
        from esmtpfa.runtime.options import Options
        options = Options(environ=env or {})
        options.parseOptions(["--config", "/dev/null", *args])
        return options

    def refused(self, *args: str, env: dict | None = None) -> str:
        from twisted.python import usage
        with self.assertRaises(usage.UsageError) as raised:
            self.parse(*args, env=env)
        return str(raised.exception)

    def test_defaults_are_postfix_s(self):
        options = self.parse()
        self.assertEqual(options["delivery-mode"], "passthrough")
        self.assertEqual((options["spool-retry-min"], options["spool-retry-max"],
                          options["spool-lifetime"]), (300.0, 4000.0, 5 * 86400.0))
        self.assertEqual(options["spool-max-size"], 5 << 30)

    def test_sizes_and_durations(self):
        spool = os.path.abspath(self.mktemp())
        options = self.parse("--delivery-mode", "spool", "--spool-url", f"file://{spool}",
                             "--spool-max-size", "512M", "--spool-lifetime", "2d",
                             "--spool-retry-min", "90s", "--spool-retry-max", "1h")
        self.assertEqual(options["spool-max-size"], 512 << 20)
        self.assertEqual(options["spool-lifetime"], 2 * 86400.0)
        self.assertEqual((options["spool-retry-min"], options["spool-retry-max"]),
                         (90.0, 3600.0))
        self.assertTrue(os.path.isdir(spool))  # made at startup, not at the first message

    def test_mistakes_are_one_line_naming_the_setting(self):
        self.assertIn("--spool-max-size", self.refused("--spool-max-size", "lots"))
        self.assertIn("SPOOL_LIFETIME", self.refused(env={"SPOOL_LIFETIME": "forever"}))
        self.assertIn("--delivery-mode", self.refused("--delivery-mode", "queue"))
        self.assertIn("must not exceed", self.refused("--spool-retry-min", "2h"))
        text = self.refused(env={"SPOOL_URL": "ftp://user:spool-SECRET@host/"})
        self.assertIn("SPOOL_URL", text)
        self.assertNotIn("spool-SECRET", text)


class AMQPSpoolModeTests(SharedRabbitMQ, SpoolCase):
    """``spool`` mode on RabbitMQ, in-process, with a small window (a prefetch and a
    concurrency of two): thirty messages accepted are all delivered within seconds."""

    timeout = 120

    async def test_delivered_as_the_broker_hands_them_over(self):
        fixture = RelayFixture(
            self.mktemp(), "--delivery-mode", "spool", "--spool-url", self.rabbitmq.url,
            "--spool-concurrency", "2", upstream=RecordingUpstream())
        self.addCleanup(fixture.stop)
        await fixture.start()

        async def accepting():
            status, _ = await fixture.run(readyz, fixture)
            return status == 200
        await eventually(accepting)  # the broker's connection is up

        def thirty():
            with smtplib.SMTP("127.0.0.1", fixture.plain_port, timeout=30) as client:
                client.starttls(context=fixture.client_context())
                client.login(USER, PASSWORD)
                for _ in range(30):
                    client.sendmail("alice@example.com", ["bob@example.net"], MESSAGE)
        await fixture.run(thirty)
        await eventually(lambda: len(fixture.upstream.accepted) == 30, timeout=5)
