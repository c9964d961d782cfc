"""The fault suite's relay: ``twistd -n esmtpfa`` as a user runs it, with short timeouts.

Every scenario of ``docs/fault-suite.md`` starts one ``RunningRelay``: a real process
(``tests.support.processes.Twistd``) on loopback free ports, a plain SMTP listener
(AUTH allowed without TLS, so the clients spend the machine's two cores on the relay,
not on handshakes), an implicit-TLS listener with a generated certificate, the metrics
and health listener and, when asked, the HTTP API.  What the tests read from outside:
the process's resident memory (``/proc/<pid>/status``), the files it holds open
(``/proc/<pid>/fd``), and its log.
"""

from __future__ import annotations

import email.utils
import os
import smtplib
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from twisted.internet import task
from twisted.trial import unittest

from tests.support import hostile
from tests.support.builders import OFFICE_AND_LAB, write_providers
from tests.support.certs import CertificateAuthority
from tests.support.ports import free_port
from tests.support.processes import Twistd

#: The well-behaved users log in through a named provider; the attackers (tricklers)
#: through the fallback one: two identities, as in production.
PROVIDERS = OFFICE_AND_LAB
ATTACKER = ("alice", "correct horse")
CLIENT = ("lab", "carol:lab secret")
GOOD_SOURCE = "127.0.0.1"

class RelayProcess(Twistd):
    """``Twistd`` with the child's process id, for ``/proc`` readings."""

    @property
    def pid(self) -> int:
        return self._process.pid


class RunningRelay:
    """One ``twistd esmtpfa`` with its listeners; ``start``/``stop`` bound every wait."""

    def __init__(self, directory: str, *, upstream_port: int | None = None,
                 args: Sequence[str] = (),
                 env: dict[str, str] | None = None, http: bool = False):
        self.directory = os.path.abspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        self.tmpdir = os.path.join(self.directory, "tmp")
        os.makedirs(self.tmpdir, exist_ok=True)
        self.ca = CertificateAuthority(os.path.join(self.directory, "ca"))
        self.leaf = self.ca.issue("relay.test", "localhost", "127.0.0.1")
        self.config = write_providers(self.directory, PROVIDERS)
        self.smtp_port, self.tls_port, self.metrics_port = free_port(), free_port(), free_port()
        self.http_port = free_port() if http else None
        self.upstream_port = upstream_port
        self.args = list(args)
        self.env = {"TMPDIR": self.tmpdir, **(env or {})}
        self.process: RelayProcess | None = None

    def command_line(self) -> list[str]:
        args = ["--plain", "--addr", "127.0.0.1", "--port", str(self.smtp_port),
                "--tls", "--tls-port", str(self.tls_port),
                "--tls-cert", self.leaf.cert_path, "--tls-key", self.leaf.key_path,
                "--hostname", "relay.test", "--config", self.config,
                "--allow-insecure-auth", "--maildir", os.path.join(self.directory, "maildir"),
                "--metrics-addr", "127.0.0.1", "--metrics-port", str(self.metrics_port)]
        if self.http_port is not None:
            args += ["--http", "--http-addr", "127.0.0.1", "--http-port", str(self.http_port)]
        if self.upstream_port is not None:
            args += ["--relay-addr", f"127.0.0.1:{self.upstream_port}",
                     "--relay-starttls", "none"]
        return args + self.args

    async def start(self) -> None:
        self.process = RelayProcess(self.command_line(), env=self.env)
        self.process.start()
        for port in (self.smtp_port, self.tls_port, self.metrics_port, self.http_port):
            if port is not None:
                await self.process.wait_for_port(port)

    async def stop(self) -> None:
        if self.process is not None:
            await self.process.stop()

    async def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer does; fires once the process is gone."""
        assert self.process is not None
        await self.process.kill()

    # -- readings from outside the process --------------------------------------------

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def log(self) -> str:
        return self.process.output if self.process is not None else ""

    def rss_mib(self) -> float:
        """Resident memory now (``VmRSS``), in MiB."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS for the relay")

    def open_files(self) -> list[str]:
        """What the relay's file descriptors point at (sockets as ``socket:[n]``)."""
        base = f"/proc/{self.pid}/fd"
        targets = []
        for fd in os.listdir(base):
            try:
                targets.append(os.readlink(os.path.join(base, fd)))
            except OSError:
                pass  # closed while we looked
        return targets

    def temporary_files(self) -> list[str]:
        """Files the relay holds open in its ``TMPDIR`` (spooled bodies, even unlinked)."""
        return [t for t in self.open_files() if t.startswith(self.tmpdir)]

    def sockets(self) -> int:
        return sum(1 for t in self.open_files() if t.startswith("socket:"))


# -- well-behaved clients (blocking: run them with deferToThread) ---------------------------

def message(message_id: str, size: int = 2048, sender: str = "carol@example.com",
            recipient: str = "dave@example.net") -> bytes:
    """An ordinary message of about ``size`` octets, CRLF line ends, 76-octet lines."""
    head = (f"From: <{sender}>\r\nTo: <{recipient}>\r\nSubject: fault suite {message_id}\r\n"
            f"Date: {email.utils.formatdate()}\r\nMessage-ID: {message_id}\r\n\r\n").encode()
    line = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n"
    body = line * max(1, (size - len(head)) // len(line))
    return head + body


def new_message_id(label: str, n: int) -> str:
    return f"<{label}.{n}.{os.getpid()}@faults.test>"


def smtp_session(port: int, user: tuple[str, str] = CLIENT, source: str = GOOD_SOURCE,
                 timeout: float = 30.0) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", port, timeout=timeout, source_address=(source, 0))
    client.ehlo("client.faults.test")
    client.login(*user)
    return client


def send_one(client: smtplib.SMTP, content: bytes, sender: str = "carol@example.com",
             recipient: str = "dave@example.net") -> tuple[int, str]:
    """One transaction on an open session: the reply that decided it (0: connection lost)."""
    try:
        code, text = client.mail(sender)
        if code != 250:
            client.rset()
            return code, text.decode("utf-8", "replace")
        code, text = client.rcpt(recipient)
        if code not in (250, 251):
            client.rset()
            return code, text.decode("utf-8", "replace")
        code, text = client.data(content)
        return code, text.decode("utf-8", "replace")
    except smtplib.SMTPDataError as error:
        return error.smtp_code, error.smtp_error.decode("utf-8", "replace")
    except (smtplib.SMTPServerDisconnected, OSError) as error:
        return 0, f"connection lost: {error}"


def send_batch(port: int, contents: Sequence[tuple[str, bytes]],
               user: tuple[str, str] = CLIENT) -> list[tuple[str, int, str]]:
    """Send messages over one session, stopping at the first that is not accepted.

    Stopping keeps a broken relay from costing the suite one timeout per message."""
    results = []
    client = smtp_session(port, user)
    try:
        for message_id, content in contents:
            code, text = send_one(client, content)
            results.append((message_id, code, text))
            if code != 250:
                break
    finally:
        try:
            client.quit()
        except (smtplib.SMTPException, OSError):
            client.close()
    return results


def send_fresh(port: int, message_id: str, content: bytes, sender: str = "carol@example.com",
               user: tuple[str, str] = CLIENT, source: str = GOOD_SOURCE,
               timeout: float = 30.0) -> tuple[int, str]:
    """A new connection, login, one message, QUIT: what a mail client does."""
    try:
        client = smtp_session(port, user, source, timeout)
    except smtplib.SMTPConnectError as error:
        return error.smtp_code, error.smtp_error.decode("utf-8", "replace")
    except (smtplib.SMTPException, OSError) as error:
        return 0, f"no session: {error!r}"
    try:
        return send_one(client, content, sender)
    finally:
        try:
            client.quit()
        except (smtplib.SMTPException, OSError):
            client.close()


@dataclass
class Attempt:
    """One message of a well-behaved client: its verdict and when (seconds from start)."""

    message_id: str
    code: int
    text: str
    at: float
    took: float


def keep_doing(send: Callable[[str], tuple[int, str]], label: str, duration: float,
               interval: float) -> list[Attempt]:
    """A well-behaved client while an attack runs: ``send(message_id)`` once every
    ``interval`` seconds for ``duration`` seconds (blocking: run it in a thread)."""
    attempts: list[Attempt] = []
    start = time.monotonic()
    n = 0
    while time.monotonic() - start < duration:
        message_id = new_message_id(label, n)
        n += 1
        began = time.monotonic()
        code, text = send(message_id)
        attempts.append(Attempt(message_id, code, text, began - start,
                                time.monotonic() - began))
        time.sleep(interval)
    return attempts


def keep_sending(port: int, label: str, duration: float, interval: float = 0.5,
                 user: tuple[str, str] = CLIENT, source: str = GOOD_SOURCE,
                 timeout: float = 30.0) -> list[Attempt]:
    """A well-behaved mail client: a new SMTP session per message (each bounded by
    ``timeout``)."""
    return keep_doing(lambda message_id: send_fresh(
        port, message_id, message(message_id), user=user, source=source, timeout=timeout),
        label, duration, interval)


class MemoryWatch:
    """Samples the relay's resident memory in the reactor; ``peak`` is the highest seen."""

    def __init__(self, relay: RunningRelay, every: float = 0.25):
        self.relay = relay
        self.first = relay.rss_mib()
        self.peak = self.first
        self._loop = task.LoopingCall(self._sample)
        self._loop.start(every, now=False)

    def _sample(self) -> None:
        try:
            self.peak = max(self.peak, self.relay.rss_mib())
        except (OSError, AssertionError):
            self.stop()  # the process is gone: the test will say why

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()



#: Resident memory the relay may reach during a scenario, and grow by: connections'
#: buffers are bounded, so a few hundred hostile connections cost tens of MiB at most.
RSS_LIMIT_MIB = 200.0
RSS_GROWTH_MIB = 64.0


class ScenarioCase(unittest.TestCase):
    """A running relay in front of an upstream, hostile crowds, and the checks of what
    users and operators notice that every scenario shares."""

    timeout = 90

    async def start(self, upstream: Any, *args: str, http: bool = False) -> RunningRelay:
        """Start ``upstream`` (a ``MisbehavingUpstream``) and a relay in front of it."""
        upstream.start()
        self.addCleanup(upstream.stop)
        relay = RunningRelay(self.mktemp(), upstream_port=upstream.port, http=http,
                             args=list(args))
        self.addCleanup(relay.stop)
        await relay.start()
        self.memory = MemoryWatch(relay)
        self.addCleanup(self.memory.stop)
        return relay

    def crowd(self, make: Callable[[], Any]) -> hostile.Crowd:
        crowd = hostile.Crowd(make)
        self.addCleanup(crowd.abort)
        return crowd

    def assert_memory_bounded(self) -> None:
        self.memory.stop()
        seen = f"relay RSS went from {self.memory.first:.0f} to {self.memory.peak:.0f} MiB"
        self.assertLess(self.memory.peak, RSS_LIMIT_MIB, seen)
        self.assertLess(self.memory.peak - self.memory.first, RSS_GROWTH_MIB, seen)

__all__ = ["ATTACKER", "Attempt", "CLIENT", "GOOD_SOURCE", "MemoryWatch", "RSS_GROWTH_MIB",
           "RSS_LIMIT_MIB", "RunningRelay", "ScenarioCase", "keep_doing", "keep_sending",
           "message", "new_message_id", "send_batch", "send_fresh", "send_one",
           "smtp_session"]
