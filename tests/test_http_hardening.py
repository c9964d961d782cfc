"""The HTTP listeners under hostile clients.

Each test runs the whole ``RelayService`` on loopback (``RelayFixture``), or a real
``twistd`` where the process's own limits matter, and attacks it with raw sockets, curl
or treq: a login before the body, connection caps that leave SMTP its descriptors,
deadlines no trickle can push back, clients that never read, bounded JSON, JSON errors
from every listener, and log lines that name the identity and collapse floods.  The
bounds are set through their environment variables (``docs/http-limits.md``).
"""

from __future__ import annotations

import base64
import json
import os
import resource
import select
import socket
import ssl
import tempfile
import threading
import time

from twisted.internet import defer, reactor, task, threads
from twisted.logger import formatEvent
from twisted.trial import unittest

from esmtpfa.web import submission
from esmtpfa.web.jsonbody import JSONLimits, JSONRefused, check_structure, parse_json
from tests.support.builders import write_providers
from tests.support.logcapture import capture_logs
from tests.support.ports import free_port
from tests.support.processes import Twistd, run_tool
from tests.support.relayfixture import PASSWORD, PROVIDERS, USER
from tests.support.webclient import post_json, request
from tests.test_http_submission import HTTPFixtureMixin, document

BIG = 38 * 1024 * 1024
GOOD = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
BAD = "Basic " + base64.b64encode(f"{USER}:wrong".encode()).decode()


def head(length: int | None = None, auth: str | None = None, extra: str = "",
         method: str = "POST", path: str = "/") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: relay.test", "Content-Type: application/json"]
    if auth:
        lines.append(f"Authorization: {auth}")
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


def chunked(body: bytes, size: int = 4096) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size])
                    for i in range(0, len(body), size)) + b"0\r\n\r\n"


def read_until_closed(sock: socket.socket, limit: float) -> tuple[bytes, bool]:
    """What the server sends until it closes (True) or ``limit`` seconds pass (False)."""
    received, deadline = b"", time.monotonic() + limit
    while time.monotonic() < deadline:
        ready, _, _ = select.select([sock], [], [], max(deadline - time.monotonic(), 0))
        if not ready:
            break
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, OSError):
            return received, True
        if not chunk:
            return received, True
        received += chunk
    return received, False


def json_answer(case: unittest.TestCase, answer: bytes, status: int) -> dict:
    """The JSON error of a raw HTTP answer, after checking its status and type."""
    head_, _, body = answer.partition(b"\r\n\r\n")
    case.assertTrue(head_.startswith(b"HTTP/1.1 %d " % status), answer[:300])
    case.assertIn(b"content-type: application/json", head_.lower(), answer[:300])
    document = json.loads(body)
    case.assertIsInstance(document.get("error"), str, document)
    return document


def temp_file_descriptors() -> int:
    """Open descriptors of this process on files in the temporary directory (where
    twisted.web spools request bodies; unlinked files included)."""
    directory = os.path.realpath(tempfile.gettempdir())
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        count += target.startswith(directory + "/")
    return count


def memory_mib(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field} in /proc/self/status")


def reset_peak_memory() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux)


def slowest_smtp_reply(port: int, stop: threading.Event) -> float:
    """Seconds the slowest NOOP of one SMTP session waited for its reply, sending one
    every 20 ms until ``stop`` is set: how long the relay's reactor was frozen."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as smtp:
        replies = smtp.makefile("rb")
        assert replies.readline().startswith(b"220 ")
        slowest = 0.0
        while not stop.is_set():
            started = time.monotonic()
            smtp.sendall(b"NOOP\r\n")
            assert replies.readline().startswith(b"250")
            slowest = max(slowest, time.monotonic() - started)
            time.sleep(0.02)
        smtp.sendall(b"QUIT\r\n")
    return slowest


class HardeningFixture(HTTPFixtureMixin):
    timeout = 60
    env: dict = {}

    @defer.inlineCallbacks
    def setUp(self):
        self.fixture_kwargs = {"env": dict(self.env)}
        yield super().setUp()
        self.sockets: list[socket.socket] = []
        self.addCleanup(self.close_sockets)

    def connect(self, port: int | None = None, source: str = "127.0.0.1") -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port or self.fixture.http_port),
                                        timeout=10, source_address=(source, 0))
        self.sockets.append(sock)
        return sock

    def ask(self, data: bytes, wait: float = 8.0, port: int | None = None) -> bytes:
        """Send ``data`` on a new connection; what comes back until the server closes."""
        sock = self.connect(port)
        sock.sendall(data)
        return read_until_closed(sock, wait)[0]

    def listener(self, name: str = "http"):
        return self.fixture.service.getServiceNamed(name).factory

    @defer.inlineCallbacks
    def close_sockets(self):
        for sock in self.sockets:
            sock.close()
        yield self.until(lambda: all(self.listener(name).limits.active == 0
                                     for name in ("http", "metrics")
                                     if hasattr(self.listener(name), "limits")), 15)

    @defer.inlineCallbacks
    def until(self, condition, seconds: float):
        for _ in range(int(seconds / 0.05)):
            if condition():
                return
            yield task.deferLater(reactor, 0.05, lambda: None)
        raise AssertionError("condition not reached in time")


def collapsed(lines: list[str], what: str, key: str) -> int:
    """How many events of ``key`` the summary lines of ``what`` counted."""
    total = 0
    for line in lines:
        if line.startswith(f"{what}: ") and " more in the last " in line:
            counts = line.rpartition("(")[2].rstrip(")")
            for item in counts.split(", "):
                name, _, count = item.rpartition(": ")
                total += int(count) if name == key else 0
    return total


# -- 1. the login comes before the body ------------------------------------------------------

class HTTPSFixture(HardeningFixture):
    """The submission listener over HTTPS, with a certificate the test generates."""

    @defer.inlineCallbacks
    def setUp(self):
        from tests.support.certs import CertificateAuthority
        self.ca = CertificateAuthority(os.path.join(self.mktemp(), "http-ca"))
        leaf = self.ca.issue("relay.test", "localhost", "127.0.0.1")
        self.fixture_args = ("--http-tls-cert", leaf.cert_path, "--http-tls-key",
                             leaf.key_path)
        yield super().setUp()


class LoginBeforeBodyTests(HardeningFixture, unittest.TestCase):
    env = {"HTTP_CLOSE_GRACE": "2"}

    @defer.inlineCallbacks
    def test_unauthenticated_big_upload_gets_401_before_the_body_is_sent(self):
        for auth in (None, BAD):
            answer = yield threads.deferToThread(self.ask, head(BIG, auth))
            body = json_answer(self, answer, 401)
            self.assertIn(b"www-authenticate: basic", answer.lower())
            self.assertIn(body["error"], ("authentication required", "authentication failed"))
        self.assertNothingRelayed()

    @defer.inlineCallbacks
    def test_curl_expecting_100_continue_gets_401_and_no_100(self):
        path = os.path.abspath(self.mktemp())
        with open(path, "wb") as f:
            f.truncate(BIG)  # a sparse 38 MB file
        output, code = yield run_tool(
            "curl", "--verbose", "--silent", "--max-time", "30", "--expect100-timeout", "20",
            "--user", f"{USER}:wrong", "-H", "Content-Type: application/json",
            "-H", "Expect: 100-continue", "--data-binary", f"@{path}",
            "--write-out", "\nstatus=%{http_code} sent=%{size_upload}\n", self.url)
        self.assertIn("status=401", output)
        self.assertNotIn("100 Continue", output)
        sent = int(output.rpartition("sent=")[2].split()[0])
        self.assertLess(sent, 1024 * 1024, output[-500:])
        self.assertNothingRelayed()

    @defer.inlineCallbacks
    def test_curl_logged_in_gets_100_continue_and_202(self):
        output, code = yield run_tool(
            "curl", "--verbose", "--silent", "--max-time", "30",
            "--user", f"{USER}:{PASSWORD}", "-H", "Content-Type: application/json",
            "-H", "Expect: 100-continue", "--data-binary", json.dumps(document()),
            "--write-out", "\nstatus=%{http_code}\n", self.url)
        self.assertIn("100 Continue", output)
        self.assertIn("status=202", output)
        self.assertEqual(len(self.upstream.messages), 1)

    @defer.inlineCallbacks
    def test_twenty_unfinished_unauthenticated_uploads_spool_nothing(self):
        baseline = temp_file_descriptors()
        start = b"[" * (1024 * 1024)  # the start of a body the server must not take

        def upload(i: int) -> bytes:
            sock = self.connect()
            auth = BAD if i % 2 else None
            if i % 4 < 2:
                sock.sendall(head(BIG, auth))
            else:  # chunked: no declared length (Twisted spools those at once too)
                sock.sendall(head(None, auth, "Transfer-Encoding: chunked\r\n"))
                start_chunk = b"%x\r\n" % len(start) + start
                try:
                    sock.sendall(start_chunk)
                except OSError:
                    pass
                return read_until_closed(sock, 4)[0]
            try:
                sock.sendall(start)
            except OSError:
                pass
            return read_until_closed(sock, 4)[0]

        answers = yield defer.gatherResults([
            threads.deferToThread(upload, i) for i in range(20)])
        spooled = temp_file_descriptors() - baseline
        self.assertEqual(spooled, 0, "request bodies spooled to temporary files")
        for answer in answers:
            json_answer(self, answer, 401)
        self.assertNothingRelayed()

    @defer.inlineCallbacks
    def test_logged_in_client_over_the_size_limit_gets_413_without_100(self):
        answer = yield threads.deferToThread(
            self.ask, head(BIG * 2, GOOD, "Expect: 100-continue\r\n"))
        json_answer(self, answer, 413)
        self.assertNotIn(b"100 Continue", answer)

    @defer.inlineCallbacks
    def test_body_sent_with_the_head_is_held_and_used_after_the_login(self):
        body = json.dumps(document()).encode()
        answer = yield threads.deferToThread(
            self.ask, head(len(body), GOOD, "Connection: close\r\n") + body)
        self.assertTrue(answer.startswith(b"HTTP/1.1 202 "), answer[:300])
        self.assertEqual(len(self.upstream.messages), 1)

    @defer.inlineCallbacks
    def test_chunked_body_after_login(self):
        body = json.dumps(document()).encode()
        answer = yield threads.deferToThread(
            self.ask, head(None, GOOD, "Transfer-Encoding: chunked\r\nConnection: close\r\n")
            + chunked(body, 10))
        self.assertTrue(answer.startswith(b"HTTP/1.1 202 "), answer[:300])


class HTTPSLoginBeforeBodyTests(HTTPSFixture, unittest.TestCase):
    scheme = "https"


    def curl(self, user_password: str, path: str):
        return run_tool(
            "curl", "--verbose", "--silent", "--max-time", "30", "--expect100-timeout", "20",
            "--cacert", os.path.abspath(self.ca.cert_path), "--user", user_password,
            "-H", "Content-Type: application/json", "-H", "Expect: 100-continue",
            "--data-binary", f"@{path}", "--write-out", "\nstatus=%{http_code}\n", self.url)

    @defer.inlineCallbacks
    def test_https_refused_before_body_and_accepted_after_login(self):
        big = os.path.abspath(self.mktemp())
        with open(big, "wb") as f:
            f.truncate(BIG)
        output, _ = yield self.curl(f"{USER}:wrong", big)
        self.assertIn("status=401", output)
        self.assertNotIn("100 Continue", output)
        small = os.path.abspath(self.mktemp())
        with open(small, "w") as f:
            json.dump(document(), f)
        output, _ = yield self.curl(f"{USER}:{PASSWORD}", small)
        self.assertIn("status=202", output)
        self.assertEqual(len(self.upstream.messages), 1)


# -- 2. connection caps --------------------------------------------------------------------

class ConnectionCapTests(HardeningFixture, unittest.TestCase):
    env = {"HTTP_MAX_CONNECTIONS": "5", "HTTP_MAX_CONNECTIONS_PER_IP": "3"}

    def closed_at_once(self, sock: socket.socket) -> bool:
        return read_until_closed(sock, 1)[1]

    def busy(self, source: str = "127.0.0.1") -> socket.socket:
        """A logged-in client in the middle of its body: nothing a cap may close."""
        sock = self.connect(source=source)
        sock.sendall(head(1000, GOOD) + b"[")
        return sock

    @defer.inlineCallbacks
    def test_per_address_and_total_caps_close_at_once_and_smtp_still_answers(self):
        def scenario():
            held = [self.busy() for _ in range(3)]
            over_ip = self.connect()
            results = {"over_ip": self.closed_at_once(over_ip)}
            held += [self.busy(source="127.0.0.2") for _ in range(2)]
            time.sleep(0.5)  # the relay reads the heads and logs the clients in
            results["over_total"] = self.closed_at_once(self.connect(source="127.0.0.3"))
            results["held_open"] = not any(read_until_closed(s, 0.1)[1] for s in held)
            smtp = socket.create_connection(("127.0.0.1", self.fixture.plain_port), timeout=10)
            results["smtp"] = smtp.recv(100)
            smtp.close()
            held[0].close()
            return results

        results = yield threads.deferToThread(scenario)
        self.assertTrue(results["over_ip"], "a 4th connection from one address stayed open")
        self.assertTrue(results["over_total"], "a 6th connection stayed open")
        self.assertTrue(results["held_open"])
        self.assertTrue(results["smtp"].startswith(b"220 "), results["smtp"])
        yield self.until(lambda: self.listener().limits.active == 4, 10)
        response = yield post_json(self.url, document(), auth=(USER, PASSWORD))
        self.assertEqual(response.code, 202, response.body)

    @defer.inlineCallbacks
    def test_metrics_listener_is_capped_too(self):
        port = self.fixture.metrics_port

        def scenario():
            [self.connect(port) for _ in range(3)]
            return self.closed_at_once(self.connect(port))

        self.assertTrue((yield threads.deferToThread(scenario)))

    @defer.inlineCallbacks
    def test_refused_connections_are_collapsed_in_the_log(self):
        events = capture_logs(self)

        def scenario():
            [self.connect() for _ in range(3)]
            for _ in range(30):
                self.closed_at_once(self.connect())

        yield threads.deferToThread(scenario)
        yield self.close_sockets()
        yield self.fixture.stop()  # ends the summary window
        lines = [formatEvent(e) for e in events]
        full = [line for line in lines if "connection limit reached" in line]
        self.assertLessEqual(len(full), 3, full)
        counted = collapsed(lines, "HTTP submission refusals", "connection cap")
        self.assertEqual(len(full) + counted, 30, lines[-10:])


class DescriptorProcess(Twistd):
    @property
    def pid(self) -> int:
        return self._process.pid


class DescriptorBudgetTests(unittest.TestCase):
    """A running ``twistd`` with 256 open files: an HTTP flood must not take the
    descriptors SMTP needs."""

    timeout = 90
    FILES = 256

    @defer.inlineCallbacks
    def test_http_flood_leaves_descriptors_for_smtp(self):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        config = write_providers(directory, PROVIDERS)
        smtp_port, http_port = free_port(), free_port()
        relay = DescriptorProcess([
            "--plain", "--addr", "127.0.0.1", "--port", str(smtp_port), "--http",
            "--http-addr", "127.0.0.1", "--http-port", str(http_port),
            "--metrics-addr", "127.0.0.1", "--config", config, "--hostname", "relay.test",
            "--maildir", os.path.join(directory, "maildir")])
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.FILES, hard))
        try:
            relay.start()  # the child inherits the limit
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        self.addCleanup(relay.stop)
        yield relay.wait_for_port(smtp_port)
        yield relay.wait_for_port(http_port)
        with open(f"/proc/{relay.pid}/limits") as f:
            self.assertRegex(f.read(), rf"Max open files\s+{self.FILES}\s")

        def flood_then_smtp() -> tuple[bytes, bytes]:
            held = []
            try:
                for i in range(2 * self.FILES):  # 15 per address: under the per-IP cap
                    sock = socket.socket()
                    held.append(sock)
                    sock.bind((f"127.0.0.{2 + i // 15}", 0))
                    sock.setblocking(False)
                    sock.connect_ex(("127.0.0.1", http_port))
                time.sleep(2)  # the relay accepts (or refuses) what it can
                with socket.create_connection(("127.0.0.1", smtp_port), timeout=10) as smtp:
                    smtp.settimeout(10)
                    try:
                        greeting = smtp.recv(1024)
                        smtp.sendall(b"EHLO client.test\r\n")
                        ehlo = smtp.recv(1024)
                    except OSError as error:
                        return repr(error).encode(), b""
                    return greeting, ehlo
            finally:
                for sock in held:
                    sock.close()

        greeting, ehlo = yield threads.deferToThread(flood_then_smtp)
        self.assertTrue(greeting.startswith(b"220 "), (greeting, relay.output[-2000:]))
        self.assertTrue(ehlo.startswith(b"250"), ehlo)
        yield relay.wait_for_lines("--http-max-connections 200 lowered to 32")


# -- 3. deadlines ---------------------------------------------------------------------------

class DeadlineTests(HardeningFixture, unittest.TestCase):
    env = {"HTTP_HEADER_TIMEOUT": "2", "HTTP_CLOSE_GRACE": "1", "HTTP_IDLE_TIMEOUT": "2",
           "HTTP_BODY_TIMEOUT": "2", "HTTP_MIN_BODY_RATE": "1000"}
    #: header timeout + grace, and generous room for a loaded machine
    CUT = 2 + 1 + 4

    def trickle(self, port: int, prefix: bytes, payload: bytes,
                step: float = 0.5) -> tuple[bytes, bool, float]:
        """Send ``prefix``, then ``payload`` one byte per ``step`` seconds until the
        server answers and closes, or for ``2 * CUT`` seconds at most; (what it sent,
        whether the server cut the connection, seconds)."""
        sock = self.connect(port)
        started = time.monotonic()
        sock.sendall(prefix)
        received = b""
        for byte in payload:
            if time.monotonic() - started > 2 * self.CUT:
                break
            try:
                sock.send(bytes([byte]))
            except OSError:
                return received, True, time.monotonic() - started
            data, closed = read_until_closed(sock, step)
            received += data
            if closed:
                return received, True, time.monotonic() - started
        return received, False, time.monotonic() - started

    @defer.inlineCallbacks
    def test_slowloris_head_is_cut_within_the_header_timeout(self):
        answer, cut, seconds = yield threads.deferToThread(
            self.trickle, self.fixture.http_port, b"", head(None, GOOD) * 2)
        self.assertTrue(cut, "a head trickled one byte at a time was never cut")
        self.assertLess(seconds, self.CUT)
        self.assertIn("request head not received", json_answer(self, answer, 408)["error"])

    @defer.inlineCallbacks
    def test_slowloris_on_the_metrics_listener(self):
        get = b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + b"X-Padding: " + b"a" * 200 + b"\r\n\r\n"
        answer, cut, seconds = yield threads.deferToThread(
            self.trickle, self.fixture.metrics_port, b"", get)
        self.assertTrue(cut, "a head trickled one byte at a time was never cut")
        self.assertLess(seconds, self.CUT)

    @defer.inlineCallbacks
    def test_body_below_the_minimum_rate_is_cut_with_408(self):
        body = json.dumps(document()).encode()
        answer, cut, seconds = yield threads.deferToThread(
            self.trickle, self.fixture.http_port, head(len(body), GOOD), body)
        self.assertTrue(cut, "a body trickled one byte at a time was never cut")
        self.assertLess(seconds, self.CUT + 1)
        self.assertIn("request body not received in time",
                      json_answer(self, answer, 408)["error"])
        self.assertNothingRelayed()

    @defer.inlineCallbacks
    def test_idle_kept_alive_connection_is_closed(self):
        def scenario():
            sock = self.connect()
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # 405, kept alive
            started = time.monotonic()
            answer, closed = read_until_closed(sock, 15)
            return answer, closed, time.monotonic() - started

        answer, closed, seconds = yield threads.deferToThread(scenario)
        json_answer(self, answer, 405)
        self.assertTrue(closed, "an idle kept-alive connection stayed open")
        self.assertLess(seconds, self.CUT)

    @defer.inlineCallbacks
    def test_silent_connection_is_closed_without_an_answer(self):
        def scenario():
            sock = self.connect()
            started = time.monotonic()
            answer, closed = read_until_closed(sock, 15)
            return answer, closed, time.monotonic() - started

        answer, closed, seconds = yield threads.deferToThread(scenario)
        self.assertEqual((answer, closed), (b"", True))
        self.assertLess(seconds, self.CUT)

    @defer.inlineCallbacks
    def test_client_that_never_reads_is_aborted_and_its_answers_do_not_pile_up(self):
        """Pipelined requests whose answers are never read: the relay stops reading and
        serving, the deadline fires, the close cannot complete, and the connection is
        aborted after the grace; the unread answers never pile up in memory."""
        def scenario() -> tuple[str, float, float]:
            sock = socket.socket()
            self.sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", self.fixture.metrics_port))
            sock.settimeout(0.2)
            requests = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 100
            started, before = time.monotonic(), memory_mib()
            while time.monotonic() - started < 20:
                try:
                    sock.send(requests)
                except TimeoutError:
                    continue
                except OSError as error:  # reset by the relay: it aborted
                    return repr(error), time.monotonic() - started, memory_mib() - before
            return "still open", time.monotonic() - started, memory_mib() - before

        outcome, seconds, growth = yield threads.deferToThread(scenario)
        self.assertNotEqual(outcome, "still open", "a client that never reads kept its "
                                                   "connection for 20 s")
        self.assertLess(seconds, self.CUT + 3)  # + the time to fill the socket buffers
        self.assertLess(growth, 30, f"memory grew by {growth:.0f} MiB")


class TLSDeadlineTests(HTTPSFixture, unittest.TestCase):
    """Deadlines on the HTTPS listener, where a close needs the TLS layer."""

    env = DeadlineTests.env
    CUT = DeadlineTests.CUT


    @defer.inlineCallbacks
    def test_tls_handshake_that_never_finishes_is_aborted(self):
        def scenario(partial: bytes):
            sock = self.connect()
            sock.sendall(partial)  # a ClientHello record header, then nothing
            started = time.monotonic()
            answer, closed = read_until_closed(sock, 20)
            return closed, time.monotonic() - started

        for partial in (b"", b"\x16\x03\x01\x02\x00\x01"):
            closed, seconds = yield threads.deferToThread(scenario, partial)
            self.assertTrue(closed, f"a stalled TLS handshake ({partial!r}) stayed open")
            self.assertLess(seconds, self.CUT)


# -- 4. bounded JSON -----------------------------------------------------------------------

# -- 4. near the cap: silent connections give way ------------------------------------------

def read_response(sock: socket.socket, limit: float = 10) -> bytes:
    """One HTTP answer with a ``Content-Length``, leaving the connection open."""
    received, deadline = b"", time.monotonic() + limit
    while time.monotonic() < deadline:
        head_, found, body = received.partition(b"\r\n\r\n")
        if found:
            length = next((int(line.split(b":")[1]) for line in head_.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            if len(body) >= length:
                return received
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    raise AssertionError(f"no whole answer within {limit} s: {received[:300]!r}")


class NearTheCapTests(HTTPSFixture, unittest.TestCase):
    """Idle connections that fill the HTTPS listener's cap keep nobody out: at the cap a
    new connection closes the oldest one waiting for a request that never logged in,
    and near the cap a new connection gets ``HTTP_BUSY_TIMEOUT`` for its TLS handshake
    and first byte (docs/http-limits.md, "Near the cap")."""

    scheme = "https"
    env = {"HTTP_MAX_CONNECTIONS": "12", "HTTP_MAX_CONNECTIONS_PER_IP": "4",
           # long deadlines: here only the cap itself may close a squatter
           "HTTP_HEADER_TIMEOUT": "30", "HTTP_BUSY_TIMEOUT": "30"}

    def tls(self, source: str = "127.0.0.1") -> ssl.SSLSocket:
        context = ssl.create_default_context(cafile=self.ca.cert_path)
        sock = context.wrap_socket(self.connect(source=source), server_hostname="relay.test")
        self.sockets.append(sock)
        return sock

    def squat(self, count: int) -> list[socket.socket]:
        """``count`` TCP connections that never start TLS, four per address."""
        return [self.connect(source=f"127.0.0.{10 + i // 4}") for i in range(count)]

    @defer.inlineCallbacks
    def test_squatters_at_the_cap_give_way_to_a_real_client(self):
        body = json.dumps(document()).encode()
        keep_alive = yield threads.deferToThread(self.tls)
        answer = yield threads.deferToThread(
            lambda: keep_alive.sendall(head(len(body), GOOD) + body) or
            read_response(keep_alive))
        self.assertTrue(answer.startswith(b"HTTP/1.1 202 "), answer[:300])
        squatters = yield threads.deferToThread(self.squat, 11)
        yield self.until(lambda: self.listener().limits.active == 12, 10)

        path = os.path.abspath(self.mktemp())
        with open(path, "wb") as f:
            f.write(body)
        started = time.monotonic()
        output, _ = yield run_tool(
            "curl", "--silent", "--show-error", "--max-time", "5",
            "--cacert", os.path.abspath(self.ca.cert_path), "--user", f"{USER}:{PASSWORD}",
            "-H", "Content-Type: application/json", "--data-binary", f"@{path}",
            "--write-out", "\nstatus=%{http_code}\n", self.url)
        seconds = time.monotonic() - started
        self.assertIn("status=202", output)
        self.assertLess(seconds, 3, "the real client waited for a squatter to time out")

        def afterwards():
            # the oldest squatter made room; the logged-in client kept its connection
            closed = [read_until_closed(sock, 0.2)[1] for sock in squatters]
            keep_alive.sendall(head(len(body), GOOD) + body)
            return closed, read_response(keep_alive)

        closed, again = yield threads.deferToThread(afterwards)
        self.assertEqual(closed, [True] + [False] * 10)
        self.assertTrue(again.startswith(b"HTTP/1.1 202 "), again[:300])
        self.assertEqual(len(self.upstream.messages), 3)


class BusyDeadlineTests(HTTPSFixture, unittest.TestCase):
    env = {"HTTP_MAX_CONNECTIONS": "8", "HTTP_MAX_CONNECTIONS_PER_IP": "8",
           "HTTP_HEADER_TIMEOUT": "10", "HTTP_BUSY_TIMEOUT": "1", "HTTP_CLOSE_GRACE": "1"}

    @defer.inlineCallbacks
    def test_tls_and_first_byte_deadline_tightens_near_the_cap(self):
        def scenario():
            quiet = [self.connect() for _ in range(5)]  # 5 of 8: under three quarters
            time.sleep(0.3)
            probe = self.connect()  # the 6th: three quarters
            started = time.monotonic()
            closed = read_until_closed(probe, 4)[1]
            seconds = time.monotonic() - started
            return closed, seconds, [read_until_closed(s, 0.05)[1] for s in quiet]

        closed, seconds, quiet_closed = yield threads.deferToThread(scenario)
        self.assertTrue(closed, "a silent connection near the cap kept 10 s")
        self.assertLess(seconds, 3)
        self.assertEqual(quiet_closed, [False] * 5, "the quiet listener's connections "
                                                   "lost their 10 s")


class JSONBoundTests(HardeningFixture, unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_json_nested_100000_deep_is_400(self):
        events = capture_logs(self)
        body = b"[" * 100_000 + b"]" * 100_000
        response = yield request("POST", self.url, body=body, auth=(USER, PASSWORD))
        self.assertEqual(response.code, 400, response.body[:300])
        self.assertIn("nested deeper", response.json()["error"])
        text = "\n".join(formatEvent(e) for e in events)
        self.assertNotIn("Traceback", text)
        self.assertNotIn("RecursionError", text)

    @defer.inlineCallbacks
    def test_36_mb_of_empty_lists_neither_freezes_the_relay_nor_takes_memory(self):
        body = b"[" + b"[]," * (12 * 1024 * 1024) + b"[]]"  # 36 MiB
        reset_peak_memory()
        before = memory_mib("VmHWM")
        stop = threading.Event()
        smtp = threads.deferToThread(slowest_smtp_reply, self.fixture.plain_port, stop)
        yield task.deferLater(reactor, 0.2, lambda: None)
        big = request("POST", self.url, body=body, auth=(USER, PASSWORD))
        del body
        other = post_json(self.url, document(), auth=(USER, PASSWORD))
        ready = request("GET", f"http://127.0.0.1:{self.fixture.metrics_port}/healthz")
        try:
            big, other, ready = yield defer.gatherResults([big, other, ready])
        finally:
            stop.set()
        slowest = yield smtp
        # Parsed as Python lists in the reactor, it froze SMTP for seconds.
        self.assertLess(slowest, 1.5, f"an SMTP NOOP waited {slowest:.1f} s")
        growth = memory_mib("VmHWM") - before
        # the body itself is held by the client and the server's spool (2 × 36 MiB);
        # building it as Python lists took about a gigabyte
        self.assertLess(growth, 300, f"peak memory grew by {growth:.0f} MiB")
        self.assertEqual(big.code, 400, big.body[:300])
        self.assertIn("more than", big.json()["error"])
        self.assertEqual(other.code, 202, other.body)
        self.assertEqual(ready.code, 200)

    @defer.inlineCallbacks
    def test_large_body_is_parsed_off_the_reactor_thread(self):
        parsed: list[tuple[int, bool]] = []
        original = submission.parse_submission

        def recording(body, settings):
            in_reactor = threading.current_thread() is threading.main_thread()
            parsed.append((len(body), in_reactor))
            return original(body, settings)

        self.patch(submission, "parse_submission", recording)
        content = b"Subject: big\r\n\r\n" + b"0123456789" * 60 + b"\r\n"
        response = yield post_json(self.url, document(content * 200), auth=(USER, PASSWORD))
        self.assertEqual(response.code, 202, response.body)
        small = yield post_json(self.url, document(), auth=(USER, PASSWORD))
        self.assertEqual(small.code, 202, small.body)
        self.assertEqual([in_reactor for _, in_reactor in parsed], [False, True], parsed)


class JSONScanTests(unittest.TestCase):
    """The scanner alone (a pure function over bytes)."""

    limits = JSONLimits(max_bytes=10_000, max_depth=4, max_values=20)

    def test_valid_documents_parse(self):
        doc = {"from": "a@b.c", "to": ["x@y.z", 'q"uo\\te@x.y'], "data": "QUJD\n",
               "n": [1, -2.5e3, True, None]}
        self.assertEqual(parse_json(json.dumps(doc).encode(), self.limits), doc)
        self.assertEqual(parse_json(b'  "x\\"]["  ', self.limits), 'x"][')

    def test_limits_and_bad_input_are_refusals(self):
        for body, fragment in [
            (b"[[[[[1]]]]]", "nested deeper"),
            (b"[" + b"1," * 30 + b"1]", "more than 20"),
            (b"[" + b"," * 100 + b"]", "more than 20"),
            (b"[1" + b"0" * 200 + b"]", "not valid JSON"),
            (b'"unterminated', "not valid JSON"),
            (b"]", "not valid JSON"),
            (b"[1 2]", "not valid JSON"),
            (b"\xff", "not valid JSON"),
            (b"x" * 10_001, "larger than"),
        ]:
            with self.assertRaises(JSONRefused, msg=body[:40]) as caught:
                parse_json(body, self.limits)
            self.assertIn(fragment, str(caught.exception), body[:40])

    def test_refusal_work_is_bounded_by_the_limits_not_the_body(self):
        check_structure(b"[]", self.limits)
        with self.assertRaises(JSONRefused):
            check_structure(b"[" * 5_000_000, JSONLimits(max_bytes=10**8, max_depth=4))


# -- 5. every error is JSON ------------------------------------------------------------------

class ErrorFormatTests(HardeningFixture, unittest.TestCase):
    """Whatever is refused, and by whom (the channel before any resource, a resource, the
    metrics listener), the client gets a JSON body that says why."""

    env = {"HTTP_CLOSE_GRACE": "1"}

    @defer.inlineCallbacks
    def expect(self, data: bytes, status: int, fragment: str, port: int | None = None):
        answer = yield threads.deferToThread(self.ask, data, 5.0, port)
        document = json_answer(self, answer, status)
        self.assertIn(fragment, document["error"])
        return answer

    @defer.inlineCallbacks
    def test_submission_listener(self):
        close = "Connection: close\r\n"
        yield self.expect(head(0, extra=close, method="GET"), 405, "use POST")
        yield self.expect(head(0, GOOD, close, path="/send"), 404, "not found")
        yield self.expect(head(10), 401, "authentication required")
        yield self.expect(head(BIG * 2, GOOD), 413, "message larger than")
        overlong = b"POST / HTTP/1.1\r\nX-Long: " + b"a" * 20_000 + b"\r\n\r\n"
        yield self.expect(overlong, 431, "longer than")
        self.assertNothingRelayed()

    @defer.inlineCallbacks
    def test_metrics_listener(self):
        port = self.fixture.metrics_port
        yield self.expect(b"GET /nothing-here HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                          404, "/metrics", port)
        answer = yield self.expect(
            b"POST /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 405,
            "use GET", port)
        self.assertIn(b"allow: get, head", answer.lower())
        answer = yield self.expect(
            b"POST /metrics HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            b"Content-Length: 100000\r\n\r\n", 413, "larger than", port)
        self.assertNotIn(b"100 Continue", answer)
        response = yield request("GET", f"http://127.0.0.1:{port}/metrics")
        self.assertEqual(response.code, 200)


# -- 6. logs ----------------------------------------------------------------------------------

class LogTests(HardeningFixture, unittest.TestCase):
    env = {"AUTH_MAX_FAILURES_PER_IP": "1000", "AUTH_MAX_FAILURES_PER_USER": "1000",
           "HTTP_BODY_TIMEOUT": "1", "HTTP_MIN_BODY_RATE": "100000",
           "HTTP_CLOSE_GRACE": "1"}

    @defer.inlineCallbacks
    def test_401_flood_is_collapsed_without_secrets(self):
        events = capture_logs(self)
        secret = "Zebra-Unicorn-42"
        for _ in range(20):
            response = yield post_json(self.url, document(), auth=(USER, secret))
            self.assertEqual(response.code, 401)
            response = yield request("POST", self.url, auth=(USER, secret))  # no body
            self.assertEqual(response.code, 401)
        yield self.fixture.stop()
        lines = [formatEvent(e) for e in events]
        full = [line for line in lines if "refused: 401 " in line]
        self.assertLessEqual(len(full), 3, full)
        self.assertEqual(len(full) + collapsed(lines, "HTTP submission refusals", "401"), 40,
                         lines)
        everything = "\n".join(lines + [repr(e) for e in events])
        for forbidden in (secret, BAD.split()[1], base64.b64encode(
                f"{USER}:{secret}".encode()).decode()):
            self.assertNotIn(forbidden, everything)

    @defer.inlineCallbacks
    def test_every_line_about_a_logged_in_request_names_its_identity(self):
        events = capture_logs(self)
        response = yield post_json(self.url, document(), auth=(USER, PASSWORD))
        self.assertEqual(response.code, 202)
        response = yield request("POST", self.url, body=b"{bad json", auth=(USER, PASSWORD))
        self.assertEqual(response.code, 400)
        answer = yield threads.deferToThread(self.ask, head(BIG * 2, GOOD))  # 413
        json_answer(self, answer, 413)
        answer = yield threads.deferToThread(self.ask, head(1000, GOOD) + b"{", 10.0)  # 408
        json_answer(self, answer, 408)
        lines = [formatEvent(e) for e in events]
        for outcome in (": message ", " refused: 400 ", " refused: 413 ", " refused: 408 "):
            self.assertTrue(any(f"as office/alice{outcome}" in line for line in lines),
                            (outcome, lines))
        everything = "\n".join(lines + [repr(e) for e in events])
        for forbidden in (PASSWORD, GOOD.split()[1]):
            self.assertNotIn(forbidden, everything)

