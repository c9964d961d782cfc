"""A burst of clients at once, as a user meets it (docs/smtp-limits.md, "Bursts of
connections"), against a real ``twistd esmtpfa`` relaying to Postfix's smtp-sink, once
as a single process and once with ``--workers 2``.

300 clients connect at the same instant from one address, whose limits are raised so
none is refused (the test is about the burst, not the caps); each says EHLO, logs in
with AUTH PLAIN, sends one message and QUITs.  What they notice, and what is checked:

* every client is greeted within 10 s (the slowest and the 99th percentile are in the
  failure message: a handshake dropped by a full listen queue shows as 1 s, 3 s, 7 s);
* every message gets ``250`` and reaches the sink exactly once;
* the relay still serves a fresh client afterwards.

Cleartext AUTH (``--allow-insecure-auth``) keeps TLS handshakes, measured elsewhere, out
of a test about connections.
"""

from __future__ import annotations

import os
import threading
import time

from twisted.internet import defer, threads
from twisted.python import log
from twisted.trial import unittest

from tests.support.builders import providers_document, userpass_provider, write_providers
from tests.support.ports import free_port
from tests.support.processes import Twistd
from tests.support.rawsmtp import RawSMTP
from tests.support.sink import SmtpSink

USER, PASSWORD = "burst", "many at once"
PROVIDERS = providers_document(userpass_provider("office", USER, PASSWORD, fallback=True))
CLIENTS = 300
#: What a user still calls "at once"; beyond it a client suspects the relay.
GREETING_WITHIN = 10.0
#: Each client's socket operations, and the whole burst's, are bounded by these.
PATIENCE = 20.0
BURST_DEADLINE = 60.0


class Outcome:
    """What one client saw: seconds to its greeting, the final reply to its message."""

    def __init__(self) -> None:
        self.greeted: float | None = None
        self.replies: list[int] = []
        self.error: str | None = None


def session(port: int, token: str, start: threading.Barrier, outcome: Outcome) -> None:
    """One client: connect when every client is ready, EHLO, AUTH PLAIN, one message
    carrying ``token``, QUIT."""
    try:
        start.wait(PATIENCE)
        began = time.monotonic()
        client = RawSMTP("127.0.0.1", port, timeout=PATIENCE)
        try:
            outcome.greeted = time.monotonic() - began
            outcome.replies.append(client.greeting[0])
            outcome.replies.append(client.command("EHLO burst.example")[0])
            outcome.replies.append(client.auth_plain(USER, PASSWORD)[0])
            outcome.replies.append(client.send_message(
                f"Subject: {token}\r\n\r\nburst message {token}\r\n".encode(),
                "burst@example.com", ["someone@example.net"])[0])
            outcome.replies.append(client.command("QUIT")[0])
        finally:
            client.close()
    except Exception as error:  # what a client saw, reported by the test
        outcome.error = f"{type(error).__name__}: {error}"


def burst(port: int, run: str, count: int) -> list[Outcome]:
    """``count`` clients at once, each on its own thread; every join is bounded."""
    outcomes = [Outcome() for _ in range(count)]
    start = threading.Barrier(count)
    workers = [threading.Thread(target=session, args=(port, f"{run}-{n}", start, outcome),
                                daemon=True)
               for n, outcome in enumerate(outcomes)]
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + BURST_DEADLINE
    for worker in workers:
        worker.join(max(0.0, deadline - time.monotonic()))
    return outcomes


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


class SingleProcessBurstTests(unittest.TestCase):
    """One ``twistd`` process; ``WorkersBurstTests`` runs the same with two workers."""

    timeout = 120
    #: More arguments for the relay (``--workers 2``).
    extra: tuple[str, ...] = ()
    workers = 1

    @defer.inlineCallbacks
    def setUp(self):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.sink = SmtpSink(None)
        self.addCleanup(self.sink.close)
        yield self.sink.start()
        config = write_providers(directory, PROVIDERS)
        self.port = free_port()
        self.relay = Twistd([
            "--plain", "--addr", "127.0.0.1", "--port", str(self.port),
            "--config", config, "--hostname", "relay.test", "--allow-insecure-auth",
            "--relay-addr", "127.0.0.1", "--relay-port", str(self.sink.port),
            "--relay-starttls", "none",
            # One address and one identity for all 300: raised so none is refused.
            "--max-connections", "1000", "--max-connections-per-ip", "1000",
            "--relay-pool-size", "50", "--relay-pool-client-share", "1",
            *self.extra])
        self.relay.start()
        self.addCleanup(self.relay.stop)
        yield self.relay.wait_for_port(self.port)
        yield self.all_workers_serve()

    @defer.inlineCallbacks
    def all_workers_serve(self, timeout: float = 20.0):
        """With workers, until each has said it serves (the supervisor's socket accepts
        before any worker does)."""
        if self.workers > 1:
            for slot in range(1, self.workers + 1):
                yield self.relay.wait_for_lines(rf"worker {slot} serving", timeout=timeout)

    @defer.inlineCallbacks
    def test_every_client_of_a_burst_is_greeted_and_relayed(self):
        run = f"burst{os.getpid()}-{id(self)}"
        outcomes = yield threads.deferToThread(burst, self.port, run, CLIENTS)
        greeted = [o.greeted for o in outcomes if o.greeted is not None]
        waits = (f"{len(greeted)} of {CLIENTS} greeted; slowest "
                 f"{max(greeted, default=float('nan')):.2f} s, p99 "
                 f"{percentile(greeted, 0.99) if greeted else float('nan'):.2f} s")
        log.msg(f"burst: {waits}")  # in trial's test.log, for the record
        errors = [o.error for o in outcomes if o.error]
        self.assertEqual(errors[:1], [], f"{len(errors)} clients failed; {waits}")
        self.assertEqual(len(greeted), CLIENTS, waits)
        self.assertLessEqual(max(greeted), GREETING_WITHIN, waits)
        wrong = [o.replies for o in outcomes if o.replies != [220, 250, 235, 250, 221]]
        self.assertEqual(wrong[:5], [], f"{len(wrong)} sessions went wrong; {waits}")

        tokens = [message.content.split(b"burst message ")[-1].strip().decode()
                  for message in self.sink.messages()]
        expected = {f"{run}-{n}" for n in range(CLIENTS)}
        self.assertEqual(sorted(t for t in tokens if t in expected), sorted(expected),
                         "every message at the sink exactly once")

        def fresh() -> tuple[list[int], str | None]:
            outcome = Outcome()
            session(self.port, f"{run}-after", threading.Barrier(1), outcome)
            return outcome.replies, outcome.error
        self.assertEqual((yield threads.deferToThread(fresh)),
                         ([220, 250, 235, 250, 221], None))


class WorkersBurstTests(SingleProcessBurstTests):
    """``--workers 2``: two processes accept from the supervisor's one socket, and
    every connection is counted by the supervisor before its greeting."""

    extra = ("--workers", "2")
    workers = 2
