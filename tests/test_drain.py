"""Graceful drain on SIGTERM (docs/smtp-limits.md, "Shutdown").

Every test runs the relay as operators do (``twistd -n esmtpfa``, ``RunningRelay``) in
front of a real upstream on loopback (``MisbehavingUpstream``), sends the process a real
SIGTERM, and reads what clients and probes notice: the replies on their sockets, the
answer of ``/readyz``, whether the SMTP port still accepts, what the upstream got, and
the exit code.  Clients are blocking ``smtplib`` sessions in threads; every wait is
bounded.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import smtplib
import socket
import threading
import time
import urllib.error
import urllib.request

from twisted.internet import reactor, task, threads
from twisted.trial import unittest

from tests.faults.harness import CLIENT, RunningRelay, message, new_message_id, smtp_session
from tests.support import misbehaving as m
from tests.support.webclient import read_until

#: A message the relay must accept while it shuts down ("a 30 MB message").
BIG = 30 * 1024 * 1024
END = b"\r\n.\r\n"


def readyz(port: int) -> tuple[int, dict]:
    """``GET /readyz``: the status and the JSON body (0 when nothing answers)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())
    except OSError:
        return 0, {}


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def closed_by_peer(client: smtplib.SMTP, timeout: float = 5.0) -> bool:
    """Whether the relay closed the session (EOF or reset) within ``timeout``."""
    sock = client.sock
    if sock is None:
        return True  # smtplib already saw the connection end
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except OSError:
        return False


def start_data(client: smtplib.SMTP, sender: str = "carol@example.com") -> None:
    """MAIL, RCPT and DATA on ``client``: the relay waits for content."""
    assert client.mail(sender)[0] == 250
    assert client.rcpt("dave@example.net")[0] == 250
    client.putcmd("data")
    code, text = client.getreply()
    assert code == 354, (code, text)


async def wait_until(condition, timeout: float, what: str) -> None:
    deadline = reactor.seconds() + timeout
    while not condition():
        if reactor.seconds() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await task.deferLater(reactor, 0.05, lambda: None)


class DrainTests(unittest.TestCase):
    timeout = 120

    async def relay(self, upstream: m.MisbehavingUpstream, *args: str,
                    http: bool = False) -> RunningRelay:
        upstream.start()
        self.addCleanup(upstream.stop)
        relay = RunningRelay(self.mktemp(), upstream_port=upstream.port, args=list(args),
                             http=http)
        self.addCleanup(relay.stop)
        await relay.start()
        return relay

    async def terminated(self, relay: RunningRelay) -> int:
        """The exit code of the relay's process once it ended by itself."""
        return await relay.process.exited()

    async def test_message_in_data_is_delivered_and_acknowledged(self):
        """SIGTERM while a client streams a 30 MB message: the relay stops accepting and
        leaves the load balancer's rotation, takes the rest of the message, delivers it
        once, answers 250, answers the next command with 421, and exits 0."""
        upstream = m.MisbehavingUpstream()
        relay = await self.relay(upstream, "--max-message-size", str(40 * 1024 * 1024))
        message_id = new_message_id("drain-big", 1)
        content = message(message_id, size=BIG)
        half = len(content) // 2
        halfway, resume = threading.Event(), threading.Event()

        def client() -> tuple[tuple[int, bytes], tuple[int, bytes], bool]:
            session = smtp_session(relay.smtp_port, timeout=60)
            start_data(session)
            session.sock.sendall(content[:half])
            halfway.set()
            resume.wait(30)
            session.sock.sendall(content[half:] + END)
            verdict = session.getreply()
            after = session.docmd("MAIL", "FROM:<carol@example.com>")
            return verdict, after, closed_by_peer(session)

        sent = threads.deferToThread(client)
        await wait_until(halfway.is_set, 30, "the client sent half of the message")
        os.kill(relay.pid, signal.SIGTERM)
        try:
            await wait_until(lambda: not accepts(relay.smtp_port), 10,
                             "the SMTP listener stopped accepting")
            status, body = await threads.deferToThread(readyz, relay.metrics_port)
        finally:
            resume.set()
        verdict, after, closed = await sent
        code = await self.terminated(relay)

        seen = f"verdict {verdict}, then {after}; log:\n{relay.log[-3000:]}"
        self.assertEqual(status, 503, body)
        self.assertEqual(verdict[0], 250, seen)
        self.assertEqual(upstream.copies(message_id), 1, seen)
        self.assertEqual(upstream.accepted(message_id), 1, seen)
        self.assertEqual(after[0], 421, seen)
        self.assertTrue(after[1].startswith(b"4.3.2"), seen)
        self.assertTrue(closed, seen)
        self.assertEqual(code, 0, seen)

    async def test_idle_sessions_hear_421_at_once(self):
        """SIGTERM with idle sessions open (just greeted, logged in, between two
        messages): each hears ``421 4.3.2`` at once and is closed; the process exits 0
        long before the 25 s grace."""
        upstream = m.MisbehavingUpstream()
        relay = await self.relay(upstream)

        def open_sessions() -> list[smtplib.SMTP]:
            greeted = smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=30)
            logged_in = smtp_session(relay.smtp_port)
            between = smtp_session(relay.smtp_port)
            message_id = new_message_id("drain-idle", 1)
            assert between.sendmail("carol@example.com", ["dave@example.net"],
                                    message(message_id)) == {}
            return [greeted, logged_in, between]

        sessions = await threads.deferToThread(open_sessions)
        started = time.monotonic()
        os.kill(relay.pid, signal.SIGTERM)

        def replies() -> list[tuple[tuple[int, bytes], bool, float]]:
            heard = []
            for session in sessions:
                try:
                    reply = session.getreply()
                except smtplib.SMTPServerDisconnected as error:
                    reply = (0, str(error).encode())
                heard.append((reply, closed_by_peer(session),
                               time.monotonic() - started))
            return heard

        heard = await threads.deferToThread(replies)
        code = await self.terminated(relay)
        took = time.monotonic() - started
        seen = f"{heard}; exit {code} after {took:.1f} s; log:\n{relay.log[-3000:]}"
        for (reply_code, text), closed, when in heard:
            self.assertEqual(reply_code, 421, seen)
            self.assertTrue(text.startswith(b"4.3.2"), seen)
            self.assertTrue(closed, seen)
            self.assertLess(when, 5.0, seen)
        self.assertEqual(code, 0, seen)
        self.assertLess(took, 15.0, seen)

    async def test_readyz_503_while_a_verdict_is_awaited(self):
        """While the drain waits for a slow upstream's verdict on a message, ``/readyz``
        answers 503 (and ``/healthz`` 200); the verdict then reaches the client."""
        upstream = m.MisbehavingUpstream()
        relay = await self.relay(upstream)
        message_id = new_message_id("drain-ready", 1)
        sender = f"{m.STALL_EOM}@faults.test"

        def client() -> tuple[tuple[int, bytes], tuple[int, bytes]]:
            session = smtp_session(relay.smtp_port, timeout=60)
            start_data(session, sender)
            session.send(message(message_id) + END)
            verdict = session.getreply()
            return verdict, session.docmd("NOOP")

        sent = threads.deferToThread(client)
        await wait_until(lambda: upstream.copies(message_id) == 1, 30,
                         "the upstream received the message")
        os.kill(relay.pid, signal.SIGTERM)
        before = reactor.seconds()
        status, body = await threads.deferToThread(readyz, relay.metrics_port)
        answered = reactor.seconds() - before

        def healthz() -> int:
            try:
                with urllib.request.urlopen(
                        f"http://127.0.0.1:{relay.metrics_port}/healthz", timeout=5) as r:
                    return r.status
            except OSError:
                return 0

        alive = await threads.deferToThread(healthz)
        await wait_until(lambda: not accepts(relay.smtp_port), 10,
                         "the SMTP listener stopped accepting")
        # The upstream answers at last: the verdict must still reach the client.
        [stalled] = [p for p in upstream._open if p._stalled]
        transaction = upstream.of_sender(sender)[0]
        transaction.answer = b"250 2.0.0 Ok: queued late\r\n"
        stalled.transport.write(transaction.answer)
        stalled._stalled = False
        verdict, after = await sent
        code = await self.terminated(relay)

        seen = f"readyz {status} {body}; verdict {verdict}, then {after}; " \
               f"log:\n{relay.log[-3000:]}"
        self.assertEqual(status, 503, seen)
        self.assertFalse(body["ready"], seen)
        self.assertLess(answered, 2.0, seen)
        self.assertEqual(alive, 200, seen)
        self.assertEqual(verdict[0], 250, seen)
        self.assertEqual(upstream.accepted(message_id), 1, seen)
        self.assertEqual(after[0], 421, seen)
        self.assertEqual(code, 0, seen)

    async def test_past_the_grace_nothing_is_acknowledged(self):
        """With ``--shutdown-grace 2``: a client still sending DATA hears 421 and its
        message never reaches the upstream; one whose verdict never came hears 451 with
        "a duplicate is possible", then 421; the process exits 0."""
        upstream = m.MisbehavingUpstream()
        relay = await self.relay(upstream, "--shutdown-grace", "2")
        partial_id = new_message_id("drain-partial", 1)
        stalled_id = new_message_id("drain-stalled", 2)
        ready = threading.Event()

        def slow_client() -> list[tuple[int, bytes]]:
            session = smtp_session(relay.smtp_port, timeout=30)
            start_data(session)
            session.send(message(partial_id, size=100_000))  # no final dot
            ready.set()
            try:
                return [session.getreply()]
            except smtplib.SMTPServerDisconnected as error:
                return [(0, str(error).encode())]

        def unanswered_client() -> list[tuple[int, bytes]]:
            session = smtp_session(relay.smtp_port, timeout=30)
            start_data(session, f"{m.STALL_EOM}@faults.test")
            session.send(message(stalled_id) + END)
            heard = []
            try:
                heard.append(session.getreply())
                heard.append(session.getreply())
            except smtplib.SMTPServerDisconnected as error:
                heard.append((0, str(error).encode()))
            return heard

        slow = threads.deferToThread(slow_client)
        unanswered = threads.deferToThread(unanswered_client)
        await wait_until(lambda: ready.is_set() and upstream.copies(stalled_id) == 1, 30,
                         "both clients are in their transactions")
        started = reactor.seconds()
        os.kill(relay.pid, signal.SIGTERM)
        slow_heard, unanswered_heard = await slow, await unanswered
        heard_after = reactor.seconds() - started
        code = await self.terminated(relay)

        seen = f"slow {slow_heard}, unanswered {unanswered_heard} after " \
               f"{heard_after:.1f} s; log:\n{relay.log[-3000:]}"
        self.assertEqual(slow_heard[0][0], 421, seen)
        self.assertTrue(slow_heard[0][1].startswith(b"4.3.2"), seen)
        self.assertEqual(upstream.copies(partial_id), 0, seen)
        self.assertEqual(unanswered_heard[0][0], 451, seen)
        self.assertIn(b"duplicate is possible", unanswered_heard[0][1], seen)
        self.assertEqual(unanswered_heard[1][0], 421, seen)
        self.assertGreaterEqual(heard_after, 1.5, seen)  # the grace was given
        self.assertLess(heard_after, 10.0, seen)
        self.assertEqual(upstream.accepted(stalled_id), 0, seen)
        self.assertEqual(code, 0, seen)

    async def test_http_request_in_flight_finishes(self):
        """SIGTERM while an HTTP submission's body is half uploaded: the request is
        still served (202, delivered once) and the process exits 0."""
        upstream = m.MisbehavingUpstream()
        relay = await self.relay(upstream, http=True)
        message_id = new_message_id("drain-http", 1)
        body = json.dumps({"from": "carol@example.com", "to": ["dave@example.net"],
                           "data": base64.b64encode(message(message_id, 200_000)).decode()
                           }).encode()
        auth = base64.b64encode(":".join(CLIENT).encode()).decode()
        head = (f"POST / HTTP/1.1\r\nHost: relay.test\r\nContent-Type: application/json"
                f"\r\nContent-Length: {len(body)}\r\nAuthorization: Basic {auth}\r\n"
                f"\r\n").encode()
        halfway, resume = threading.Event(), threading.Event()

        def client() -> bytes:
            with socket.create_connection(("127.0.0.1", relay.http_port), timeout=30) as s:
                s.sendall(head + body[:len(body) // 2])
                halfway.set()
                resume.wait(30)
                s.sendall(body[len(body) // 2:])
                return read_until(s, b"\r\n\r\n")

        sent = threads.deferToThread(client)
        await wait_until(halfway.is_set, 30, "the client sent half of the body")
        await task.deferLater(reactor, 0.3, lambda: None)  # the relay read it
        os.kill(relay.pid, signal.SIGTERM)
        try:
            await wait_until(lambda: not accepts(relay.http_port), 10,
                             "the HTTP listener stopped accepting")
        finally:
            resume.set()
        answer = await sent
        code = await self.terminated(relay)
        seen = f"answer {answer[:200]!r}; log:\n{relay.log[-3000:]}"
        self.assertTrue(answer.startswith(b"HTTP/1.1 202 "), seen)  # accepted
        self.assertEqual(upstream.accepted(message_id), 1, seen)
        self.assertEqual(code, 0, seen)
