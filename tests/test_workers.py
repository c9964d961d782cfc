"""``--workers N`` against real processes (docs/workers.md).

Every test runs ``twistd -n esmtpfa --workers 2`` as an operator would (the fault
suite's ``RunningRelay``) and reads what users and operators notice: SMTP replies,
``/metrics``, ``/healthz`` and ``/readyz``, the log, the processes left, the exit code.
The limits are set low so that two workers that each kept their own counts would let
through twice as much: every limit test fails on a relay whose workers do not share.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import smtplib
import socket
import ssl
import time
import urllib.error
import urllib.request

from twisted.internet import defer, reactor, task, threads
from twisted.trial import unittest
from twisted.web.resource import Resource
from twisted.web.server import Site

from esmtpfa.runtime.workers.counts import LEASE_IDLE
from tests.faults.harness import (
    CLIENT,
    RunningRelay,
    message,
    new_message_id,
    send_fresh,
    send_one,
    smtp_session,
)
from tests.support.rawsmtp import greeting_times
from tests.support.webclient import get_blocking

WORKERS = 2


def metric(text: str, name: str) -> float:
    """The sum of a metric's samples in an exposition (0 when absent)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def greeting(port: int) -> bytes:
    """Connect and read the first line; the socket is kept by the caller."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return sock, sock.recv(200)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


class WorkersCase(unittest.TestCase):
    """A relay of ``WORKERS`` workers, started and stopped around each test."""

    args: tuple[str, ...] = ()
    http = False
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        self.relay = RunningRelay(self.mktemp(), http=self.http,
                                  args=["--workers", str(WORKERS), *self.args])
        self.addCleanup(self.relay.stop)
        yield defer.ensureDeferred(self.relay.start())
        yield self.until_serving()

    @defer.inlineCallbacks
    def until(self, condition, seconds: float = 20.0, what: str = "condition"):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            result = yield threads.deferToThread(condition)
            if result:
                return result
            yield task.deferLater(reactor, 0.1, lambda: None)
        raise AssertionError(f"{what} not reached within {seconds} s:\n{self.relay.log}")

    def until_serving(self):
        return self.until(lambda: get_blocking(self.relay.metrics_port, "/healthz")[0] == 200,
                          what="every worker serving")

    def worker_pids(self) -> dict[int, int]:
        """Slot → pid of the latest process of each slot, from the supervisor's log."""
        found = {}
        for slot, pid in re.findall(r"worker (\d+) serving \(pid (\d+)\)", self.relay.log):
            found[int(slot)] = int(pid)
        return found

    def in_thread(self, function, *args):
        return threads.deferToThread(function, *args)


class ServingTests(WorkersCase):
    @defer.inlineCallbacks
    def test_both_workers_serve_one_port_and_the_metrics_add_up(self):
        count = 24

        def send_all():
            return [send_fresh(self.relay.smtp_port, new_message_id("w", n),
                               message(new_message_id("w", n)))[0] for n in range(count)]
        codes = yield self.in_thread(send_all)
        self.assertEqual(codes, [250] * count)
        served = {int(slot) for slot in re.findall(
            r"\[worker (\d+) esmtpfa\.smtp#info\] \S+ connect from", self.relay.log)}
        self.assertEqual(served, {1, 2}, "the kernel should spread connections over both")
        status, text = yield self.in_thread(get_blocking, self.relay.metrics_port, "/metrics")
        self.assertEqual(status, 200)
        self.assertEqual(metric(text, "esmtpfa_messages_sent_total"), count)
        self.assertEqual(metric(text, "esmtpfa_workers_running"), WORKERS)
        status, body = yield self.in_thread(get_blocking, self.relay.metrics_port, "/readyz")
        self.assertEqual(status, 200, body)
        self.assertEqual(json.loads(body)["checks"]["workers"]["detail"],
                         f"{WORKERS} of {WORKERS} workers serving")

    @defer.inlineCallbacks
    def test_implicit_tls_is_served_by_the_workers(self):
        def over_tls():
            context = ssl.create_default_context(cafile=self.relay.ca.cert_path)
            codes = []
            for n in range(6):
                with smtplib.SMTP_SSL("127.0.0.1", self.relay.tls_port, timeout=30,
                                      context=context) as client:
                    client.ehlo("client.test")
                    client.login(*CLIENT)
                    client.mail("carol@example.com")
                    client.rcpt("dave@example.net")
                    codes.append(client.data(message(new_message_id("t", n)))[0])
            return codes
        codes = yield self.in_thread(over_tls)
        self.assertEqual(codes, [250] * 6)


def greetings_of(port: int, n: int) -> list[bytes]:
    """The reply codes of ``n`` connections held open together, then closed."""
    held, greetings = [], []
    for _ in range(n):
        sock, line = greeting(port)
        held.append(sock)
        greetings.append(line[:3])
    for sock in held:
        sock.close()
    return greetings


class ConnectionCapTests(WorkersCase):
    args = ("--max-connections-per-ip", "3")

    @defer.inlineCallbacks
    def test_the_per_address_cap_holds_for_the_relay(self):
        greetings = yield self.in_thread(greetings_of, self.relay.smtp_port, 8)
        self.assertEqual(greetings.count(b"220"), 3, greetings)
        self.assertEqual(greetings.count(b"421"), 5, greetings)


class LentSlotsCapTests(WorkersCase):
    """At 8 per address, slots are lent ahead up to 4: whichever worker takes a
    connection, the relay admits exactly 8, before and after they close (the slots a
    worker keeps are called back before anyone is refused)."""

    args = ("--max-connections-per-ip", "8")

    @defer.inlineCallbacks
    def test_the_cap_is_exact_with_slots_lent_ahead(self):
        for _ in range(3):
            greetings = yield self.in_thread(greetings_of, self.relay.smtp_port, 10)
            self.assertEqual(greetings, [b"220"] * 8 + [b"421"] * 2)
            yield self.in_thread(time.sleep, 0.5)  # the workers see the closes


class HTTPCapTests(WorkersCase):
    http = True
    args = ("--http-max-connections-per-ip", "3")

    @defer.inlineCallbacks
    def test_http_submissions_are_served_by_the_workers(self):
        def submit_all():
            statuses = []
            credentials = base64.b64encode(f"{CLIENT[0]}:{CLIENT[1]}".encode()).decode()
            for n in range(6):
                body = json.dumps({"from": "carol@example.com", "to": ["dave@example.net"],
                                   "data": base64.b64encode(message(
                                       new_message_id("h", n))).decode()}).encode()
                request = urllib.request.Request(
                    f"http://127.0.0.1:{self.relay.http_port}/", data=body, method="POST",
                    headers={"content-type": "application/json",
                             "authorization": f"Basic {credentials}"})
                try:
                    with urllib.request.urlopen(request, timeout=30) as response:
                        statuses.append(response.status)
                except urllib.error.HTTPError as error:
                    statuses.append((error.code, error.read()))
            return statuses
        statuses = yield self.in_thread(submit_all)
        self.assertEqual(statuses, [202] * 6)

    @defer.inlineCallbacks
    def test_the_http_per_address_cap_holds_for_the_relay(self):
        def open_many():
            held = [socket.create_connection(("127.0.0.1", self.relay.http_port), timeout=10)
                    for _ in range(8)]
            time.sleep(1.0)  # the refused ones are closed as soon as the count answers
            open_now = 0
            for sock in held:
                sock.setblocking(False)
                try:
                    open_now += sock.recv(1) != b""
                except BlockingIOError:
                    open_now += 1  # nothing to read and not closed: still open
                except OSError:
                    pass
                sock.close()
            return open_now
        still_open = yield self.in_thread(open_many)
        self.assertEqual(still_open, 3)


class RateTests(WorkersCase):
    args = ("--rate-messages", "4/1h")

    @defer.inlineCallbacks
    def test_a_sending_rate_holds_for_the_relay(self):
        def send_all():
            return [send_fresh(self.relay.smtp_port, new_message_id("r", n),
                               message(new_message_id("r", n))) for n in range(8)]
        results = yield self.in_thread(send_all)
        codes = [code for code, _ in results]
        self.assertEqual(codes, [250] * 4 + [451] * 4, results)
        self.assertIn("4.7.1", results[-1][1])


class ThrottleTests(WorkersCase):
    args = ("--max-auth-failures-per-ip", "4")

    @defer.inlineCallbacks
    def test_failed_logins_count_for_the_relay(self):
        def login(password: str) -> int:
            """One AUTH PLAIN on a new connection (smtplib's ``login`` would try the
            next mechanism after a refusal: two failures per call)."""
            client = smtplib.SMTP("127.0.0.1", self.relay.smtp_port, timeout=30)
            client.ehlo("client.test")
            client.user, client.password = CLIENT[0], password
            try:
                return client.auth("PLAIN", client.auth_plain)[0]
            except smtplib.SMTPAuthenticationError as error:
                return error.smtp_code
            finally:
                client.close()

        def attempts():
            return [login("wrong password") for _ in range(4)] + [login(CLIENT[1])]
        codes = yield self.in_thread(attempts)
        self.assertEqual(codes, [535] * 4 + [454], "the 5th login, right or wrong, from an "
                         "address that failed 4 times anywhere in the relay is refused")


class RestartTests(WorkersCase):
    args = ("--max-connections-per-ip", "2")

    @defer.inlineCallbacks
    def test_a_dead_worker_is_restarted_logged_and_frees_its_slots(self):
        pids = self.worker_pids()
        self.assertEqual(sorted(pids), [1, 2])
        # Hold both slots of this address with connections of worker 1, if the kernel
        # puts them there; connections of worker 2 are closed and tried again.
        mine = []

        def hold_on_worker_one():
            for _ in range(40):
                sock, line = greeting(self.relay.smtp_port)
                port = sock.getsockname()[1]
                time.sleep(0.2)
                if re.search(rf"\[worker 1 esmtpfa\.smtp#info\] \S+ connect from "
                             rf"\[127\.0\.0\.1\]:{port} ", self.relay.log):
                    mine.append(sock)
                    if len(mine) == 2:
                        return
                else:
                    sock.close()
                    time.sleep(0.2)  # its slot is given back when worker 2 sees it go
        yield self.in_thread(hold_on_worker_one)
        self.assertEqual(len(mine), 2)
        _, line = yield self.in_thread(greeting, self.relay.smtp_port)
        self.assertTrue(line.startswith(b"421"), line)  # the cap is full

        os.kill(pids[1], signal.SIGKILL)
        yield self.until(lambda: re.search(
            rf"worker 1 \(pid {pids[1]}\) was killed by SIGKILL; restarting it",
            self.relay.log), what="the death logged")
        yield self.until(lambda: self.worker_pids()[1] != pids[1], what="a new worker 1")
        yield self.until_serving()

        def two_new():
            lines = []
            for _ in range(2):
                sock, line = greeting(self.relay.smtp_port)
                lines.append(line[:3])
            return lines
        lines = yield self.in_thread(two_new)
        self.assertEqual(lines, [b"220", b"220"], "the dead worker's slots were given back")
        status, text = yield self.in_thread(get_blocking, self.relay.metrics_port, "/metrics")
        self.assertEqual(metric(text, "esmtpfa_worker_restarts_total"), 1)
        for sock in mine:
            sock.close()



class HungWorkerTests(WorkersCase):
    """A worker whose reactor does not run (SIGSTOP here, a loop in real life)."""

    @defer.inlineCallbacks
    def test_new_clients_go_around_a_stopped_worker_which_is_soon_replaced(self):
        """The other worker greets every new client at once, and the supervisor kills
        the stopped one within seconds (its own clients wait no longer than that)."""
        pids = self.worker_pids()
        os.kill(pids[2], signal.SIGSTOP)
        stopped = time.monotonic()
        self.addCleanup(lambda: alive(pids[2]) and os.kill(pids[2], signal.SIGKILL))
        waits = yield self.in_thread(greeting_times, self.relay.smtp_port, 20, 3.0)
        self.assertEqual([wait for wait in waits if wait is None or wait > 2.0], [],
                         f"every new client is greeted within 2 s: {waits}")
        yield self.until(lambda: re.search(
            rf"worker 2 \(pid {pids[2]}\) has not answered for 5 s: killing it",
            self.relay.log), 15, what="the stopped worker killed")
        self.assertLess(time.monotonic() - stopped, 9.0, "killed within seconds")
        yield self.until(lambda: self.worker_pids()[2] != pids[2], what="a new worker 2")
        yield self.until_serving()
        self.assertFalse(alive(pids[2]))

    @defer.inlineCallbacks
    def test_a_worker_busy_for_two_seconds_is_not_killed(self):
        """A reactor held for a while (a burst of work) is not a hung one."""
        pids = self.worker_pids()
        os.kill(pids[2], signal.SIGSTOP)
        try:
            yield task.deferLater(reactor, 2.0, lambda: None)
        finally:
            os.kill(pids[2], signal.SIGCONT)
        yield task.deferLater(reactor, 5.0, lambda: None)  # the kill would be in by now
        self.assertNotIn("has not answered", self.relay.log)
        self.assertTrue(alive(pids[2]))
        self.assertEqual(self.worker_pids(), pids)


class KilledWorkerCountTests(WorkersCase):
    @defer.inlineCallbacks
    def test_what_a_killed_worker_counted_is_kept(self):
        """SIGKILL right after the 250s, with no scrape since: the relay's
        ``messages_sent_total`` still counts every message a client was told was
        accepted."""
        _, text = yield self.in_thread(get_blocking, self.relay.metrics_port, "/metrics")
        self.assertEqual(metric(text, "esmtpfa_messages_sent_total"), 0)
        client = yield self.in_thread(smtp_session, self.relay.smtp_port)
        port = client.sock.getsockname()[1]
        found = yield self.until(lambda: re.search(
            rf"\[worker (\d) esmtpfa\.smtp#info\] \S+ connect from \[127\.0\.0\.1\]:{port} ",
            self.relay.log), what="the worker of the session")
        pid = self.worker_pids()[int(found.group(1))]

        def send_then_kill():
            codes = [send_one(client, message(new_message_id("k", n)))[0]
                     for n in range(7)]
            os.kill(pid, signal.SIGKILL)
            client.close()
            return codes
        codes = yield self.in_thread(send_then_kill)
        self.assertEqual(codes, [250] * 7)
        yield self.until(lambda: re.search(rf"\(pid {pid}\) was killed by SIGKILL",
                                           self.relay.log), what="the death logged")
        yield self.until_serving()
        _, text = yield self.in_thread(get_blocking, self.relay.metrics_port, "/metrics")
        self.assertEqual(metric(text, "esmtpfa_messages_sent_total"), 7)
        self.assertEqual(metric(text, 'esmtpfa_relay_outcomes_total{reason="accepted"}'), 7)


class StalledSupervisorTests(WorkersCase):
    """The supervisor keeps the counts; when it stops answering (SIGSTOP: a stuck reactor,
    a host swapping), a worker waits for a connection's count no longer than the control
    channel's call deadline (5 s), then refuses it as a full relay would.  Sessions
    already open go on delivering, and new connections are served again once the
    supervisor answers."""

    http = True

    @defer.inlineCallbacks
    def test_new_connections_wait_a_bounded_time_and_open_sessions_go_on(self):
        def open_session():
            return smtp_session(self.relay.smtp_port)
        held = yield self.in_thread(open_session)
        # Slots lent ahead (the readiness checks' HTTP connections, the session's
        # spares) serve without a question until they go back unused: let them, so
        # that the connections below must ask the stopped supervisor.
        yield self.in_thread(time.sleep, 2 * LEASE_IDLE + 0.5)
        os.kill(self.relay.pid, signal.SIGSTOP)
        self.addCleanup(lambda: alive(self.relay.pid) and os.kill(self.relay.pid, signal.SIGCONT))

        def knock():
            started = time.monotonic()
            sock, line = greeting(self.relay.smtp_port)
            sock.close()
            return line, time.monotonic() - started
        def knock_http():
            started = time.monotonic()
            with socket.create_connection(("127.0.0.1", self.relay.http_port),
                                          timeout=15) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n")
                answer = sock.recv(200)
            return answer, time.monotonic() - started
        (line, waited), (answer, http_waited) = yield defer.gatherResults(
            [self.in_thread(knock), self.in_thread(knock_http)])
        self.assertTrue(line.startswith(b"421 4.3.0 "), line)
        self.assertGreater(waited, 4.0, "refused before the count was even asked?")
        self.assertLess(waited, 9.0, "the wait for the supervisor is bounded by 5 s")
        self.assertEqual(answer, b"", "an HTTP connection is closed as over a cap")
        self.assertLess(http_waited, 9.0, "the HTTP wait is bounded too")

        mid = new_message_id("stall", 1)
        code, text = yield self.in_thread(send_one, held, message(mid))
        self.assertEqual(code, 250, text)
        os.kill(self.relay.pid, signal.SIGCONT)
        lines = []

        def knock_again():
            sock, line = greeting(self.relay.smtp_port)
            sock.close()
            lines.append(line)
            return line.startswith(b"220")
        yield self.until(knock_again, what="a greeting once the supervisor answers")
        yield self.in_thread(held.quit)
        # One line per kind of refusal, not a traceback per connection.
        self.assertNotIn("Traceback", self.relay.log)
        self.assertIn("refused: the connection count could not be had", self.relay.log)
        self.assertIn("closed: the connection count could not be had", self.relay.log)


class ShutdownTests(WorkersCase):
    @defer.inlineCallbacks
    def test_sigterm_drains_every_worker_and_exits_zero(self):
        pids = self.worker_pids()

        def open_idle():
            sessions = []
            for _ in range(6):
                client = smtp_session(self.relay.smtp_port)
                sessions.append(client)
            return sessions
        sessions = yield self.in_thread(open_idle)
        os.kill(self.relay.pid, signal.SIGTERM)
        code = yield self.relay.process.exited()
        self.assertEqual(code, 0, self.relay.log)

        def heard():
            replies = []
            for client in sessions:
                try:
                    replies.append(client.getreply()[0])
                except (smtplib.SMTPException, OSError):
                    replies.append(0)
            return replies
        replies = yield self.in_thread(heard)
        self.assertEqual(replies, [421] * 6, "every idle session hears 421 4.3.2")
        self.assertFalse([pid for pid in pids.values() if alive(pid)],
                         "no worker outlives the supervisor")

    @defer.inlineCallbacks
    def test_workers_leave_when_the_supervisor_is_killed(self):
        pids = self.worker_pids()
        os.kill(self.relay.pid, signal.SIGKILL)
        yield self.until(lambda: not any(alive(pid) for pid in pids.values()), 40,
                         what="the workers gone")


class ReloadCase(WorkersCase):

    NEW = ("- meta: {name: extra, type: userpass}\n"
           "  params: {username: erin, password: \"erin's secret\"}\n")

    def logins(self, count: int = 12) -> list[int]:
        codes = []
        for _ in range(count):
            client = smtplib.SMTP("127.0.0.1", self.relay.smtp_port, timeout=30)
            client.ehlo("client.test")
            try:
                client.login("extra", "erin:erin's secret")
                codes.append(235)
            except smtplib.SMTPAuthenticationError as error:
                codes.append(error.smtp_code)
            client.close()
        return codes

    def until_everywhere(self):
        """Until a dozen fresh logins as the new user all work (both workers have it)."""
        return self.until(lambda: self.logins() == [235] * 12,
                          what="the new provider in every worker")


class FileWatchTests(ReloadCase):
    args = ("--config-poll-interval", "0.3")

    @defer.inlineCallbacks
    def test_a_changed_file_reaches_every_worker(self):
        codes = yield self.in_thread(self.logins, 2)
        self.assertNotIn(235, codes)
        with open(self.relay.config, "a") as f:
            f.write(self.NEW)
        yield self.until_everywhere()


class SighupTests(ReloadCase):
    args = ("--config-poll-interval", "3600")  # no file watch to speak of: SIGHUP alone

    @defer.inlineCallbacks
    def test_sighup_reaches_every_worker(self):
        with open(self.relay.config, "a") as f:
            f.write(self.NEW)
        os.kill(self.relay.pid, signal.SIGHUP)
        yield self.until_everywhere()


class CountingConfigService(Resource):
    isLeaf = True

    def __init__(self, document: bytes):
        super().__init__()
        self.document = document
        self.requests = 0

    def render_GET(self, request) -> bytes:
        self.requests += 1
        request.setHeader(b"content-type", b"application/yaml")
        return self.document


class ConfigServiceTests(WorkersCase):
    @defer.inlineCallbacks
    def setUp(self):
        from tests.faults.harness import PROVIDERS
        self.service = CountingConfigService(PROVIDERS.encode())
        self.port = reactor.listenTCP(0, Site(self.service), interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.args = ("--config-svc", f"http://127.0.0.1:{self.port.getHost().port}/",
                     "--config-svc-interval", "0.5")
        yield super().setUp()

    @defer.inlineCallbacks
    def test_the_service_is_polled_once_per_relay_and_feeds_every_worker(self):
        before = self.service.requests
        yield task.deferLater(reactor, 3.0, lambda: None)
        polls = self.service.requests - before
        self.assertLessEqual(polls, 8, "polled once per relay (every 0.5 s), not per worker")
        self.assertGreaterEqual(polls, 4)

        def sessions():
            return [send_fresh(self.relay.smtp_port, new_message_id("c", n),
                               message(new_message_id("c", n)))[0] for n in range(10)]
        codes = yield self.in_thread(sessions)
        self.assertEqual(codes, [250] * 10, "every worker got the providers")


class RefusalTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_workers_need_a_log_they_can_write_lines_to(self):
        """Standard output or twistd's --logfile (tests/test_startup_errors.py), not
        --syslog."""
        import sys

        from tests.support.processes import PROJECT, Collector, child_environment
        collector = Collector()
        argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                "-n", "--pidfile=", "--syslog", "esmtpfa", "--demo",
                "--port", "0", "--metrics-port", "0", "--workers", "2"]
        reactor.spawnProcess(collector, sys.executable, argv, env=child_environment(),
                             path=PROJECT)
        code = yield collector.ended.addTimeout(60, reactor)
        self.assertNotEqual(code, 0)
        self.assertIn("--workers: the supervisor writes every worker's log lines",
                      collector.output.decode())
