"""Scenario F: the limits under faults, against real processes.

* **Redis restarts and stalls under load** (docs/shared-state.md, "When Redis restarts",
  "When Redis is slow or down"): two ``twistd esmtpfa`` relays share one real
  ``redis-server`` and one identity's budget of ``BUDGET`` messages.  Redis is
  killed and started empty on its port, one relay restarted with it (a pod rescheduled
  beside it, a worker replaced): the pair still has one budget, not one each.  Then
  Redis is stopped with SIGSTOP while both relays keep sending: every message is
  answered within seconds, the rate still refuses (each process's own counts decide),
  and after SIGCONT the relays use Redis again.
* **A stopped worker under load** (docs/workers.md, "Restarts"): ``--workers 2`` serving
  five clients, one worker stopped with SIGSTOP.  New connections are greeted at once by
  the other worker, the stopped one is killed and replaced within seconds, what it
  counted stays in ``/metrics``, and no client hears ``250`` for a message that does not
  arrive.
* **SMTP smuggling at scale** (docs/smtp-limits.md, "NUL and smuggled end-of-data"):
  messages whose content hides an end of data (bare LF, bare CR, a NUL before or
  after the dot) followed by another transaction, through the relay in both
  ``--bare-line-ends`` modes to a real Postfix ``smtpd`` which, as shipped by Debian 12
  (``smtpd_forbid_bare_newline = no``), does take ``LF . LF`` as the end of data: the
  test first proves that by smuggling to it directly.  Through the relay, Postfix sees
  one transaction per accepted message and never the smuggled sender.

Every upstream copy is matched to the client's verdict by Message-ID: a ``250`` must be
at the upstream exactly once; anything else at most once (the worker scenario) or never
(a refusal at MAIL or at the final dot).
"""

from __future__ import annotations

import os
import re
import signal
import smtplib
import time
from collections import Counter
from collections.abc import Callable

from twisted.internet import defer, reactor, task, threads
from twisted.trial import unittest

from tests.faults.harness import (
    CLIENT,
    GOOD_SOURCE,
    Attempt,
    RunningRelay,
    keep_sending,
    message,
    new_message_id,
    send_fresh,
    send_one,
    smtp_session,
)
from tests.support.misbehaving import message_id_of
from tests.support.postfix import PostfixSubmission
from tests.support.rawsmtp import Closed, RawSMTP, greeting_times
from tests.support.redis import RedisServer
from tests.support.sink import SinkMessage
from tests.support.upstream import RecordingUpstream
from tests.support.webclient import get_blocking

#: Short upstream timeouts: a broken relay shows in seconds.
RELAY_ARGS = ("--relay-connect-timeout", "3", "--relay-timeout", "5",
              "--relay-data-timeout", "10")
#: Messages the well-behaved identity may send per hour, for the relays together.
BUDGET = 6
#: The longest any one message may take while Redis is stopped: three decisions wait
#: ``--state-timeout`` (0.5 s) before the breaker opens, and a loaded two-core machine
#: adds a little.  Tens of seconds would mean one wait per decision, or worse.
ANSWERED_WHILE_STOPPED = 4.0
#: What a loaded machine may add to a documented deadline.
GRACE = 3.0


def upstream_counts(upstream: RecordingUpstream) -> Counter:
    """Message-ID → how many copies the upstream accepted (answered 2xx at the dot)."""
    return Counter(message_id_of(m.data) for m in upstream.accepted)


def scrape(relay: RunningRelay) -> str:
    """The relay's ``/metrics`` as Prometheus reads it (blocking)."""
    status, body = get_blocking(relay.metrics_port, "/metrics")
    if status != 200:
        raise AssertionError(f"/metrics answered {status}")
    return body


def metric(exposition: str, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    total = 0.0
    for line in exposition.splitlines():
        if not line.startswith((name + "{", name + " ")):
            continue
        if all(f'{key}="{value}"' in line for key, value in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def alive(pid: int) -> bool:
    """Running (or stopped), not gone and not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def until(condition: Callable[[], object], seconds: float, what: str,
                log: Callable[[], str] = lambda: "") -> float:
    """Poll ``condition`` (in the reactor) until true; the seconds it took."""
    started = reactor.seconds()
    while not condition():
        if reactor.seconds() - started > seconds:
            raise AssertionError(f"{what}: not within {seconds:g} s\n{log()[-4000:]}")
        await task.deferLater(reactor, 0.05, lambda: None)
    return reactor.seconds() - started


class LimitsCase(unittest.TestCase):
    timeout = 50

    def upstream(self) -> RecordingUpstream:
        upstream = RecordingUpstream().start()
        self.addCleanup(upstream.stop)
        return upstream

    async def relay(self, upstream_port: int, *args: str,
                    env: dict[str, str] | None = None) -> RunningRelay:
        relay = RunningRelay(self.mktemp(), upstream_port=upstream_port,
                             args=[*RELAY_ARGS, *args], env=env)
        self.addCleanup(relay.stop)
        await relay.start()
        return relay

    def assert_acknowledged_exactly_once(self, attempts: list[Attempt],
                                         upstream: RecordingUpstream,
                                         others_at_most: int = 0) -> None:
        """Every ``250`` at the upstream once; every other verdict at most
        ``others_at_most`` times (0: a refusal never reaches it)."""
        counts = upstream_counts(upstream)
        wrong = [(a.message_id, a.code, a.text[:60], counts[a.message_id]) for a in attempts
                 if (counts[a.message_id] != 1 if a.code == 250
                     else counts[a.message_id] > others_at_most)]
        self.assertEqual(wrong, [], "(message, verdict, copies at the upstream)")
        unknown = set(counts) - {a.message_id for a in attempts}
        self.assertEqual(unknown, set(), "the upstream accepted messages nobody sent")


# -- Redis restarts and stalls ----------------------------------------------------------------

def send_alternately(relays: list[RunningRelay], label: str, count: int,
                     first: int = 0) -> list[tuple[int, Attempt]]:
    """``count`` messages, one after another, each on a new session, through the relays in
    turn (starting with ``relays[first]``): (which relay, the attempt)."""
    results = []
    start = time.monotonic()
    for n in range(count):
        which = (first + n) % len(relays)
        message_id = new_message_id(label, n)
        began = time.monotonic()
        code, text = send_fresh(relays[which].smtp_port, message_id, message(message_id),
                                timeout=15)
        results.append((which, Attempt(message_id, code, text, began - start,
                                       time.monotonic() - began)))
    return results


class RedisUnderLoadTests(LimitsCase):

    async def test_one_budget_across_a_restart_and_a_stall(self):
        redis = RedisServer()
        await redis.start()
        self.addCleanup(redis.stop)
        upstream = self.upstream()
        limits = ("--rate-messages", f"{BUDGET}/1h")
        env = {"STATE_URL": redis.url}
        relays = [await self.relay(upstream.port, *limits, env=env),
                  await self.relay(upstream.port, *limits, env=env)]
        everything: list[Attempt] = []

        def verdicts(results) -> list[tuple[int, str]]:
            everything.extend(a for _, a in results)
            return [(a.code, a.text[:5]) for _, a in results]

        # 1. Both relays, one budget.
        before = await threads.deferToThread(send_alternately, relays, "before", BUDGET + 2)
        self.assertEqual(Counter(verdicts(before)),
                         Counter({(250, "2.0.0"): BUDGET, (451, "4.7.1"): 2}), before)

        # 2. Redis comes back empty, and relay 2 with it (a new process: no digest key
        # yet).  Relay 2 decides first and stores a fresh key; relay 1, which still has
        # the old one, must adopt it rather than count apart.
        await relays[1].stop()
        await redis.restart()
        relays[1] = await self.relay(upstream.port, *limits, env=env)
        after = await threads.deferToThread(send_alternately, relays, "after", BUDGET + 4,
                                            first=1)
        self.assertEqual(Counter(verdicts(after)),
                         Counter({(250, "2.0.0"): BUDGET, (451, "4.7.1"): 4}),
                         f"the pair must have one budget again: {after}")
        self.assertIn("the identity digest key in Redis is not the one this relay had",
                      relays[0].log)
        rates = redis.command("KEYS", "esmtpfa:rate:messages:*").decode()
        self.assertEqual(len(re.findall(r"rate:messages:[0-9a-f]+\r\n", rates)), 1, rates)

        # 3. Redis stopped: the kernel still accepts, nothing answers.  Eight messages
        # per relay: each process's own count (the same budget) refuses the last two.
        redis.pause()
        stopped_at = reactor.seconds()
        during = await threads.deferToThread(send_alternately, relays, "stopped",
                                             2 * (BUDGET + 2))
        states = await threads.deferToThread(lambda: [scrape(r) for r in relays])
        redis.resume()
        stopped_for = reactor.seconds() - stopped_at
        slow = [(a.message_id, round(a.took, 2)) for _, a in during
                if a.took > ANSWERED_WHILE_STOPPED]
        self.assertEqual(slow, [], "a message waited on the stopped Redis")
        self.assertEqual(Counter(verdicts(during)),
                         Counter({(250, "2.0.0"): 2 * BUDGET, (451, "4.7.1"): 4}), during)
        for relay, exposition in zip(relays, states, strict=True):
            self.assertEqual(metric(exposition, "esmtpfa_state_degraded"), 1.0)
            self.assertGreater(metric(exposition, "esmtpfa_state_errors_total",
                                      operation="rate_take", outcome="open"), 0)
            self.assertIn("is degraded", relay.log)

        # 4. Redis answers again: at the breaker's next probe (5 s after it opened) each
        # relay counts in it again, where the budget is spent.  Until then each process's
        # own count, full too, refuses: every message is refused either way.
        back: list[tuple[int, Attempt]] = []
        for round_ in range(40):  # bounded: 5 s of cool-down and a loaded machine
            if all("answers again: the limits count in it again" in r.log for r in relays):
                break
            back += await threads.deferToThread(send_alternately, relays, f"back{round_}", 2)
            await task.deferLater(reactor, 0.25, lambda: None)
        self.assertTrue(all("answers again" in r.log for r in relays),
                        "\n".join(r.log[-3000:] for r in relays))
        errors = await threads.deferToThread(lambda: [scrape(r) for r in relays])
        back += await threads.deferToThread(send_alternately, relays, "back", 4)
        self.assertEqual(set(verdicts(back)), {(451, "4.7.1")})
        states = await threads.deferToThread(lambda: [scrape(r) for r in relays])
        for old, new in zip(errors, states, strict=True):
            self.assertEqual(metric(new, "esmtpfa_state_degraded"), 0.0)
            self.assertEqual(metric(new, "esmtpfa_state_errors_total"),
                             metric(old, "esmtpfa_state_errors_total"),
                             "a decision was made without Redis after it came back")
        self.assertLess(stopped_for, 15)
        self.assert_acknowledged_exactly_once(everything, upstream)


# -- a stopped worker --------------------------------------------------------------------------

class Traffic:
    """Well-behaved clients for ``seconds``: some keep one session for message after
    message (so some sit on the worker that will be stopped), some open one per message.
    A session that breaks is replaced; every attempt is kept."""

    def __init__(self, port: int, seconds: float):
        self.port = port
        self.seconds = seconds
        self.attempts: dict[str, list[Attempt]] = {}
        self.start = time.monotonic()

    def keeping(self, label: str) -> list[Attempt]:
        attempts = self.attempts.setdefault(label, [])
        client = None
        n = 0
        while time.monotonic() - self.start < self.seconds:
            began = time.monotonic()
            message_id = new_message_id(label, n)
            n += 1
            if client is None:
                try:
                    client = smtp_session(self.port, timeout=15)
                except (smtplib.SMTPException, OSError) as error:
                    attempts.append(Attempt(message_id, 0, f"no session: {error!r}",
                                            began - self.start, time.monotonic() - began))
                    time.sleep(0.2)
                    continue
            code, text = send_one(client, message(message_id))
            attempts.append(Attempt(message_id, code, text, began - self.start,
                                    time.monotonic() - began))
            if code == 0:
                client.close()
                client = None
            time.sleep(0.05)
        if client is not None:
            client.close()
        return attempts

    def fresh(self, label: str) -> list[Attempt]:
        attempts = self.attempts.setdefault(label, [])
        attempts.extend(keep_sending(self.port, label, self.seconds - (
            time.monotonic() - self.start), interval=0.05, timeout=15))
        return attempts

    def all(self) -> list[Attempt]:
        return [a for attempts in self.attempts.values() for a in attempts]


def greeting_waits(port: int, count: int, patience: float) -> list[float]:
    """``count`` new connections at once; how long each waited for its ``220`` (ten
    times ``patience`` for one that got none)."""
    return [patience * 10 if wait is None else wait
            for wait in greeting_times(port, count, patience, GOOD_SOURCE)]


class StoppedWorkerTests(LimitsCase):
    #: Traffic for this long; the worker is stopped STOP_AT seconds in.
    SECONDS = 16.0
    STOP_AT = 3.0
    #: A new connection is greeted by the running worker at once; a second is generous.
    GREETED = 2.0
    #: A stopped worker is killed after five missed heartbeats of one second.
    KILLED = 5.0 + GRACE

    def worker_pids(self, relay: RunningRelay) -> dict[int, int]:
        return {int(slot): int(pid) for slot, pid in
                re.findall(r"worker (\d+) serving \(pid (\d+)\)", relay.log)}

    async def test_clients_are_served_and_nothing_acknowledged_is_lost(self):
        upstream = self.upstream()
        relay = await self.relay(upstream.port, "--workers", "2")
        await until(lambda: len(self.worker_pids(relay)) == 2, 20, "two workers serving",
                    lambda: relay.log)
        pids = self.worker_pids(relay)
        self.addCleanup(lambda: alive(pids[2]) and os.kill(pids[2], signal.SIGKILL))

        traffic = Traffic(relay.smtp_port, self.SECONDS)
        running = defer.gatherResults(
            [threads.deferToThread(traffic.keeping, f"keeping{n}") for n in range(3)] +
            [threads.deferToThread(traffic.fresh, f"fresh{n}") for n in range(2)],
            consumeErrors=True)
        await task.deferLater(reactor, self.STOP_AT, lambda: None)
        os.kill(pids[2], signal.SIGSTOP)
        stopped = time.monotonic() - traffic.start
        waits = await threads.deferToThread(greeting_waits, relay.smtp_port, 10,
                                            self.GREETED + 5)
        killed_after = stopped + await until(
            lambda: f"worker 2 (pid {pids[2]}) has not answered for 5 s: killing it"
            in relay.log, self.KILLED + 2, "the stopped worker killed", lambda: relay.log)
        killed_after -= stopped
        await until(lambda: self.worker_pids(relay)[2] != pids[2], 10, "a new worker 2",
                    lambda: relay.log)
        await running
        await until(lambda: len(self.worker_pids(relay)) == 2, 5, "two workers serving",
                    lambda: relay.log)
        exposition = await threads.deferToThread(scrape, relay)
        attempts = traffic.all()
        acknowledged = [a for a in attempts if a.code == 250]

        self.assertFalse(alive(pids[2]), "the stopped worker is still there")
        self.assertLessEqual(killed_after, self.KILLED)
        self.assertEqual([round(w, 2) for w in waits if w > self.GREETED], [],
                         "new connections waited on the stopped worker")
        # A client whose session was on the stopped worker loses it when the worker is
        # killed; it never hears anything but 250 or a lost connection.
        self.assertEqual([(a.message_id, a.code, a.text) for a in attempts
                          if a.code not in (0, 250)], [])
        late = [a for a in attempts if a.at > stopped + self.KILLED]
        self.assertTrue(late and all(a.code == 250 for a in late),
                        f"after the kill every message must be served: "
                        f"{[(a.code, a.text) for a in late if a.code != 250]}")
        fresh = [a for label, some in traffic.attempts.items() if label.startswith("fresh")
                 for a in some if a.at > stopped + 0.5]
        self.assertEqual([(a.code, round(a.took, 1)) for a in fresh
                          if a.code != 250 or a.took > self.GREETED + GRACE], [],
                         "a new session was held up by the stopped worker")
        # Not lost, not duplicated: a 250 arrived exactly once; a lost connection at most
        # once (the worker may have been stopped between the upstream's 250 and ours).
        self.assert_acknowledged_exactly_once(attempts, upstream, others_at_most=1)
        # What the killed worker counted is still in the relay's /metrics.
        sent = metric(exposition, "esmtpfa_messages_sent_total")
        self.assertGreaterEqual(sent, len(acknowledged))
        self.assertLessEqual(sent, len(upstream.accepted))
        self.assertEqual(metric(exposition, "esmtpfa_worker_restarts_total"), 1.0)


# -- SMTP smuggling -----------------------------------------------------------------------------

SMUGGLED_SENDER = "smuggled@evil.test"
#: The control's own smuggled sender, sent straight to Postfix.
CONTROL_SENDER = "stowaway@control.test"
#: Hidden ends of data (SEC Consult, "SMTP Smuggling", 2023, and its follow-ups), each
#: with the reply the relay gives in ``reject`` mode.  The content line before each
#: begins with "text".
VARIANTS = {
    "lf-dot-lf": (b"\n.\n", "5.6.11"),
    "lf-dot-crlf": (b"\n.\r\n", "5.6.11"),
    "crlf-dot-lf": (b"\r\n.\n", "5.6.11"),
    "cr-dot-cr": (b"\r.\r", "5.6.11"),
    "crlf-dot-cr": (b"\r\n.\r", "5.6.11"),
    "cr-dot-crlf": (b"\r.\r\n", "5.6.11"),
    "nul-dot": (b"\r\n\x00.\r\n", "5.6.0"),
    "dot-nul": (b"\r\n.\x00\r\n", "5.6.0"),
}
ROUNDS = 4          # of every variant, per mode
SMUGGLERS = 4       # sessions at once
UPSTREAM_USER, UPSTREAM_PASSWORD = "relayuser", "s3cret pencil"


def smuggling_message(message_id: str, hidden_end: bytes,
                      smuggled_sender: str = SMUGGLED_SENDER) -> bytes:
    """A message with an end of data hidden in its content and a whole second
    transaction after it; ends with CRLF, ready for the true ``.CRLF``."""
    return (f"From: <carol@example.com>\r\nTo: <dave@example.net>\r\n"
            f"Subject: smuggling\r\nMessage-ID: {message_id}\r\n\r\n"
            f"text").encode() + hidden_end + (
        f"MAIL FROM:<{smuggled_sender}>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\n"
        f"From: <ceo@example.net>\r\nSubject: smuggled\r\n\r\nPay the invoice.\r\n"
    ).encode()


def smuggle(port: int, messages: list[tuple[str, bytes]], user: tuple[str, str],
            source: str | None = None) -> list[tuple[str, int, str]]:
    """Send ``messages`` as they are, octet for octet, on one authenticated session."""
    results = []
    client = RawSMTP("127.0.0.1", port, timeout=20, source=source)
    try:
        client.command("EHLO smuggler.faults.test")
        code, text = client.auth_plain(*user)
        if code != 235:
            raise AssertionError(f"AUTH: {code} {text}")
        for message_id, content in messages:
            code, text = client.send_message(content, "carol@example.com",
                                             ["dave@example.net"])
            results.append((message_id, code, text))
        client.command("QUIT")
    finally:
        client.close()
    return results


def sink_counts(dumps: list[SinkMessage]) -> Counter:
    return Counter(message_id_of(d.content.replace(b"\n", b"\r\n")) for d in dumps)


class SmugglingTests(unittest.TestCase):
    """One Postfix for both modes; each mode has its own relay in front of it."""

    timeout = 50

    async def test_no_transaction_is_smuggled_in_either_mode(self):
        postfix = PostfixSubmission(users={UPSTREAM_USER: UPSTREAM_PASSWORD})
        self.addCleanup(postfix.stop)
        await postfix.start()

        # The control: this Postfix does take LF.LF as the end of data, so a smuggled
        # transaction would reach its sink.
        control = new_message_id("control", 0)
        await threads.deferToThread(self.smuggle_directly, postfix.port, control)
        await until(lambda: any(CONTROL_SENDER in d.mail_args
                                for d in postfix.sink.messages()), 10,
                    "the control transaction smuggled into Postfix", postfix.log)
        self.assertEqual(len(postfix.sink.messages()), 2)  # the control and its stowaway

        accepted: list[str] = []
        for mode in ("reject", "normalize"):
            accepted += await self.through_the_relay(postfix, mode)

        await until(lambda: len(postfix.sink.messages()) >= 2 + len(accepted), 10,
                    "every accepted message at Postfix's sink", postfix.log)
        await task.deferLater(reactor, 0.5, lambda: None)  # and nothing more arrives
        dumps = [d for d in postfix.sink.messages() if control.encode() not in d.content
                 and CONTROL_SENDER not in d.mail_args]
        counts = sink_counts(dumps)
        self.assertEqual({m: counts[m] for m in accepted if counts[m] != 1}, {},
                         "an accepted message is missing or duplicated")
        self.assertEqual(len(dumps), len(accepted), "Postfix took more transactions "
                                                    "than the relay accepted messages")
        self.assertEqual([d.mail_args for d in dumps if SMUGGLED_SENDER in d.mail_args], [])
        # No NUL reaches the upstream, so one that drops NULs reads no end of data either.
        self.assertEqual([message_id_of(d.content.replace(b"\n", b"\r\n")) for d in dumps
                          if b"\x00" in d.content], [])
        smuggling = [d for d in dumps if b"Subject: smuggling" in d.content]
        self.assertEqual(len(smuggling), len(VARIANTS) * ROUNDS)
        self.assertTrue(all(b"MAIL FROM:<" + SMUGGLED_SENDER.encode() + b">" in d.content
                            for d in smuggling), "the smuggled lines are the message's text")

    def smuggle_directly(self, port: int, message_id: str) -> None:
        client = RawSMTP("127.0.0.1", port, timeout=20)
        try:
            client.command("EHLO control.faults.test")
            self.assertEqual(client.auth_plain(UPSTREAM_USER, UPSTREAM_PASSWORD)[0], 235)
            content = smuggling_message(message_id, VARIANTS["lf-dot-lf"][0],
                                        CONTROL_SENDER)
            self.assertEqual(client.send_message(content, "carol@example.com",
                                                 ["dave@example.net"])[0], 250)
            # MAIL, RCPT, DATA, the smuggled message's own end.
            self.assertEqual([client.reply()[0] for _ in range(4)], [250, 250, 354, 250])
        except Closed as closed:
            raise AssertionError(f"Postfix closed the control session: {closed}") from closed
        finally:
            client.close()

    async def through_the_relay(self, postfix: PostfixSubmission, mode: str) -> list[str]:
        """Smugglers and a well-behaved client through a relay in ``mode``; the
        Message-IDs the relay accepted."""
        relay = RunningRelay(self.mktemp(), upstream_port=postfix.port, args=[
            *RELAY_ARGS, "--bare-line-ends", mode, "--relay-user", UPSTREAM_USER,
            "--relay-pass", UPSTREAM_PASSWORD, "--relay-allow-insecure-auth"])
        self.addCleanup(relay.stop)
        await relay.start()
        batches: list[list[tuple[str, bytes]]] = [[] for _ in range(SMUGGLERS)]
        expected: dict[str, str] = {}
        n = 0
        for _ in range(ROUNDS):
            for name, (hidden_end, refusal) in VARIANTS.items():
                message_id = new_message_id(f"{mode}-{name}", n)
                batches[n % SMUGGLERS].append((message_id, smuggling_message(
                    message_id, hidden_end)))
                expected[message_id] = "2.0.0" if mode == "normalize" else refusal
                n += 1
        well_behaved = threads.deferToThread(keep_sending, relay.smtp_port,
                                             f"beside-{mode}", 4.0, 0.1, timeout=15)
        results = await defer.gatherResults(
            [threads.deferToThread(smuggle, relay.smtp_port, batch, CLIENT,
                                   f"127.0.0.{2 + index}")
             for index, batch in enumerate(batches)], consumeErrors=True)
        attempts = await well_behaved
        verdicts = {mid: (code, text.split(" ", 1)[0]) for batch in results
                    for mid, code, text in batch}
        want = {mid: (250 if enhanced == "2.0.0" else 550, enhanced)
                for mid, enhanced in expected.items()}
        self.assertEqual(verdicts, want, f"{mode}: the relay's verdicts")
        self.assertEqual([(a.code, a.text) for a in attempts if a.code != 250], [],
                         f"{mode}: the well-behaved client was not served")
        self.assertTrue(attempts)
        return [mid for mid, (code, _) in verdicts.items() if code == 250] + [
            a.message_id for a in attempts]
