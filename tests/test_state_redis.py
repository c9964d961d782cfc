"""The login throttle and the sending rates shared through Redis.

Everything talks to a real ``redis-server`` started on a loopback port
(``tests.support.redis``).  What is checked:

* the Redis ledgers answer exactly as the in-process ones for the same sequence of
  operations (table-driven and seeded-random sequences, time from ``Clock``);
* two throttles and two rate ledgers on one Redis share one budget;
* every key expires; a reservation a dead relay never settled expires too;
* the client: AUTH with a user and a password, the database from the URL, ``NOSCRIPT``
  after a script flush, a stalled server bounded by the timeout, a dead one failing
  fast, reconnecting when it is back, the password never in a repr or a log line;
* the failure policy: open answers from this process's own counts, closed answers 4xx;
  either way a log line (once when Redis becomes degraded) and ``state_errors_total``
  (more in ``tests.test_state_resilience``);
* two real relays (``twistd``) with ``--state-url`` to one Redis share one rate and one
  login budget; with Redis killed a fail-open relay relays and counts it, a fail-closed
  one answers 4xx, never 5xx; a stalled Redis costs at most ``--state-timeout`` per step.
"""

from __future__ import annotations

import base64
import os
import random
import smtplib
import time
import urllib.request

from twisted.internet import defer, reactor, task, threads
from twisted.python import usage
from twisted.trial import unittest

from esmtpfa.auth.selection import Claim
from esmtpfa.auth.sendingrates import Limit, Rates
from esmtpfa.limits.guard import (
    FailurePolicy,
    GuardedLoginLedger,
    GuardedRateLedger,
    StateRefusedLogin,
    StateRefusedRate,
)
from esmtpfa.limits.interfaces import Exceeded, StateUnavailable
from esmtpfa.limits.ledgers import LocalLoginLedger, RateLimiter
from esmtpfa.limits.rates import Reservation
from esmtpfa.limits.redis import RedisLoginLedger, RedisRateLedger, RedisState
from esmtpfa.limits.resp import Incomplete, ProtocolError, RedisClient, RedisError, RedisURL, parse
from esmtpfa.limits.throttle import AuthThrottle, LoginThrottled, identity_depth
from esmtpfa.runtime.options import Options
from esmtpfa.web.metrics import RelayMetrics
from tests.faults.harness import (
    CLIENT,
    RunningRelay,
    message,
    new_message_id,
    send_fresh,
    send_one,
    smtp_session,
)
from tests.support.certs import CertificateAuthority
from tests.support.logcapture import capture_logs, observe_logs
from tests.support.misbehaving import MisbehavingUpstream
from tests.support.ports import free_port
from tests.support.redis import RedisServer, StalledRedis

PASSWORD = "pw-7f3a9c-never-logged"


def sleep(seconds: float) -> defer.Deferred:
    return task.deferLater(reactor, seconds, lambda: None)


class RedisCase(unittest.TestCase):
    """A fresh ``redis-server`` per test, and clients closed when the test ends."""

    timeout = 60
    password: str | None = None
    username: str | None = None

    async def start_redis(self) -> RedisServer:
        server = RedisServer(password=self.password, username=self.username)
        self.addCleanup(server.stop)
        await server.start()
        return server

    def client(self, url: str, timeout: float = 2.0, **kwargs) -> RedisClient:
        client = RedisClient(RedisURL.parse(url), reactor, timeout=timeout, **kwargs)
        self.addCleanup(client.close)
        return client


# -- the URL and the wire format -----------------------------------------------------------

class URLTests(unittest.TestCase):
    def test_fields_and_defaults(self):
        url = RedisURL.parse("redis://relay:secret@redis.internal:6380/3?prefix=eu")
        self.assertEqual((url.tls, url.host, url.port, url.db, url.username, url.prefix),
                         (False, "redis.internal", 6380, 3, "relay", "eu"))
        self.assertEqual(url.password, "secret")
        plain = RedisURL.parse("rediss://:s3cret@[::1]")
        self.assertEqual((plain.tls, plain.host, plain.port, plain.db, plain.username),
                         (True, "::1", 6379, 0, None))
        # redis-cli's short form: one word before the @ is the password
        self.assertEqual(RedisURL.parse("redis://only@h").password, "only")

    def test_the_password_never_shows(self):
        url = RedisURL.parse(f"redis://user:{PASSWORD}@h:1/2")
        for text in (repr(url), str(url), url.redacted,
                     repr(RedisClient(url, task.Clock()))):
            self.assertNotIn(PASSWORD, text)
        self.assertEqual(url.redacted, "redis://h:1/2")

    def test_bad_urls_are_startup_errors_naming_the_flag_without_the_url(self):
        for bad in (f"http://:{PASSWORD}@h", f"redis://:{PASSWORD}@h/x",
                    f"redis://:{PASSWORD}@:6379", f"redis://:{PASSWORD}@h:99999",
                    f"redis://:{PASSWORD}@h/0?ca=/x", f"redis://:{PASSWORD}@h/0?tls=1"):
            for args, env, named in ((["--state-url", bad], {}, "--state-url"),
                                     ([], {"STATE_URL": bad}, "STATE_URL")):
                options = Options(environ=env)
                with self.assertRaises(usage.UsageError) as raised:
                    options.parseOptions(args)
                self.assertIn(named, str(raised.exception))
                self.assertNotIn(PASSWORD, str(raised.exception))

    def test_options_defaults_and_choices(self):
        options = Options(environ={})
        options.parseOptions([])
        self.assertEqual((options["state-url"], options["state-timeout"],
                          options["state-failure"]), (None, 0.5, "open"))
        options = Options(environ={"STATE_FAILURE": "closed", "STATE_TIMEOUT": "0.2",
                                   "STATE_URL": "redis://h"})
        options.parseOptions([])
        self.assertEqual((options["state-url"], options["state-timeout"],
                          options["state-failure"]), ("redis://h", 0.2, "closed"))
        for args in (["--state-failure", "maybe"], ["--state-timeout", "0"]):
            with self.assertRaises(usage.UsageError) as raised:
                Options(environ={}).parseOptions(args)
            self.assertIn(args[0], str(raised.exception))


class RESPTests(unittest.TestCase):
    def test_replies(self):
        self.assertEqual(parse(b"+OK\r\n"), ("OK", 5))
        self.assertEqual(parse(b":-3\r\n")[0], -3)
        self.assertEqual(parse(b"$3\r\nabc\r\n")[0], b"abc")
        self.assertEqual(parse(b"$-1\r\n")[0], None)
        self.assertEqual(parse(b"*2\r\n:1\r\n$1\r\nx\r\n")[0], [1, b"x"])
        error = parse(b"-NOSCRIPT No matching script\r\n")[0]
        self.assertIsInstance(error, RedisError)
        self.assertEqual(error.code, "NOSCRIPT")

    def test_partial_and_hostile_replies(self):
        for partial in (b"", b"+OK", b"$3\r\nab", b"*2\r\n:1\r\n"):
            self.assertRaises(Incomplete, parse, partial)
        for hostile in (b"$99999999\r\n", b"*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n",
                        b"?\r\n", b":x\r\n", b"$1\r\nabc\r\n"):
            self.assertRaises(ProtocolError, parse, hostile)
        # the bound holds for a whole reply, not only for each bulk string in it
        many = b"*3\r\n" + b"$4\r\nxxxx\r\n" * 3
        self.assertEqual(len(parse(many)[0]), 3)
        self.assertRaises(ProtocolError, parse, many, 0, 20)


# -- the ledgers against the in-process ones -----------------------------------------------

IDENTITY = "office\0alice"
OTHER = "office\0bob"

#: (operation, address, identities or identity, clock advance after it)
LOGIN_TABLE = [
    ("failed", "10.0.0.1", [IDENTITY], 1),
    ("refusal", "10.0.0.1", [IDENTITY], 0),
    ("failed", "10.0.0.2", [IDENTITY], 1),
    ("refusal", "10.0.0.1", [IDENTITY], 0),      # under attack, and failed from here
    ("refusal", "10.0.0.3", [IDENTITY], 0),      # a clean address is asked
    ("refusal", "10.0.0.1", [OTHER], 0),         # another identity is not refused
    ("succeeded", "10.0.0.1", IDENTITY, 0),      # the owner: this address's taken back
    ("refusal", "10.0.0.1", [IDENTITY], 0),
    ("failed", "10.0.0.1", [IDENTITY, OTHER], 2),
    ("failed", "10.0.0.1", [], 0),
    ("refusal", "10.0.0.1", [], 0),              # 3 failures: the address is refused
    ("failed", "10.0.0.4", [IDENTITY], 0),
    ("failed", "10.0.0.4", [IDENTITY], 0),
    ("failed", "10.0.0.4", [IDENTITY], 0),
    ("failed", "10.0.0.4", [IDENTITY], 0),       # depth: the count stops growing
    ("failed", "10.0.0.4", [IDENTITY], 0),
    ("failed", "10.0.0.5", [IDENTITY], 50),
    ("refusal", "10.0.0.1", [], 51),             # the window is over
    ("refusal", "10.0.0.1", [], 0),
    ("refusal", "10.0.0.4", [IDENTITY], 0),
]


class LedgerEquivalenceTests(RedisCase):
    """The same operations, the same clock readings: the same answers."""

    PER_ADDRESS, PER_IDENTITY, WINDOW = 3, 2, 100.0

    async def ledgers(self):
        server = await self.start_redis()
        redis_clock, local_clock = task.Clock(), task.Clock()
        depth = identity_depth(self.PER_IDENTITY, 8.0)
        state = RedisState(self.client(server.url), clock=redis_clock)
        shared = RedisLoginLedger(state, self.PER_ADDRESS, self.PER_IDENTITY, self.WINDOW,
                                  depth=depth)
        local = LocalLoginLedger(self.PER_ADDRESS, self.PER_IDENTITY, self.WINDOW,
                                 local_clock, depth=depth)
        return server, (shared, redis_clock), (local, local_clock)

    async def same_answer(self, ledgers, ask, label: str, advance: float):
        """``ask`` both ledgers, the in-process one first; both must answer alike.  Then
        both clocks move on by ``advance``.  Returns the answer."""
        (shared, redis_clock), (local, local_clock) = ledgers
        expected = await ask(local)
        self.assertEqual(await ask(shared), expected, label)
        local_clock.advance(advance)
        redis_clock.advance(advance)
        return expected

    @staticmethod
    def login(operation: str, address: str, who):
        return lambda ledger: getattr(ledger, operation)(address, who)

    async def test_the_login_table(self):
        _, *ledgers = await self.ledgers()
        for step, (operation, address, who, advance) in enumerate(LOGIN_TABLE):
            await self.same_answer(ledgers, self.login(operation, address, who),
                                   f"step {step}: {operation} {address} {who!r}", advance)

    async def test_a_success_takes_back_only_the_failures_its_pair_still_lists(self):
        """The (identity, address) list keeps ``per_identity`` failures, the identity's
        more: a success takes back the pair's, and the older ones stay counted."""
        _, *ledgers = await self.ledgers()
        table = [("failed", "10.0.0.7", [IDENTITY], 1)] * 3 + [
            ("failed", "10.0.0.8", [IDENTITY], 1),
            ("succeeded", "10.0.0.7", IDENTITY, 1),
            ("refusal", "10.0.0.7", [OTHER], 0),     # the address's budget is not reset
            ("refusal", "10.0.0.8", [IDENTITY], 0),  # 2 left: still under attack
            ("failed", "10.0.0.9", [IDENTITY], 0),   # 4 - 2 taken back + 1
        ]
        answers = []
        for step, (operation, address, who, advance) in enumerate(table):
            answers.append(await self.same_answer(
                ledgers, self.login(operation, address, who),
                f"step {step}: {operation} {address} {who!r}", advance))
        self.assertEqual(answers[-3:], [
            "too many failed logins from this address",
            "too many failed logins for this identity, and some from this address", [3]])

    async def test_a_success_whose_failures_the_identity_list_already_dropped(self):
        """The identity's list keeps ``identity_depth`` failures: a success takes back
        only those of its pair that are still in it (none here)."""
        _, *ledgers = await self.ledgers()
        depth = identity_depth(self.PER_IDENTITY, 8.0)
        table = [("failed", "10.0.0.7", [IDENTITY], 1)] + [
            ("failed", f"10.0.1.{n % 3}", [IDENTITY], 1) for n in range(depth)] + [
            ("succeeded", "10.0.0.7", IDENTITY, 1),
            ("failed", "10.0.0.9", [IDENTITY], 0),
        ]
        for step, (operation, address, who, advance) in enumerate(table):
            answer = await self.same_answer(
                ledgers, self.login(operation, address, who),
                f"step {step}: {operation} {address} {who!r}", advance)
        self.assertEqual(answer, [depth])

    async def test_a_random_login_sequence(self):
        _, *ledgers = await self.ledgers()
        rng = random.Random(13)
        addresses = [f"10.1.0.{i}" for i in range(4)] + ["2001:db8::/64"]
        identities = [f"p\0user{i}" for i in range(3)]
        for step in range(400):
            operation = rng.choice(["failed", "failed", "refusal", "refusal", "succeeded"])
            address = rng.choice(addresses)
            who = (rng.choice(identities) if operation == "succeeded"
                   else rng.sample(identities, rng.randint(0, 2)))
            await self.same_answer(ledgers, self.login(operation, address, who),
                                   f"step {step}: {operation} {address} {who!r}",
                                   rng.choice([0, 0, 0.5, 3, 17.25, 40]))

    async def rate_ledgers(self):
        server = await self.start_redis()
        redis_clock, local_clock = task.Clock(), task.Clock()
        redis_clock.advance(1_000_000.125)
        local_clock.advance(1_000_000.125)
        state = RedisState(self.client(server.url), clock=redis_clock)
        # Reservations never expire here: the in-process ledger has no such rule.
        shared = RedisRateLedger(state, reservation_ttl=10 ** 9)
        return server, (shared, redis_clock), (RateLimiter(local_clock), local_clock)

    @staticmethod
    def rate(operation: str, *args):
        async def ask(ledger):
            try:
                result = await getattr(ledger, operation)(*args)
            except Exceeded as error:
                return ("exceeded", error.kind, error.limit, error.retry_after)
            return ("ok", result)
        return ask

    async def test_the_rate_table(self):
        _, *ledgers = await self.rate_ledgers()
        limit = Limit(3, 60.0)
        table = [
            ("take", 1, 0), ("take", 1, 0), ("take", 1, 0), ("take", 1, 0),  # 4th: full
            ("give", 1, True, 10), ("give", 1, False, 0),                   # one counts
            ("take", 1, 0), ("take", 1, 0),
            ("give", 2, True, 55), ("take", 1, 0),                          # next window
            ("take", 1, 30), ("take", 1, 0), ("give", 5, True, 200),
            ("take", 3, 0), ("take", 1, 0),
        ]
        for step, row in enumerate(table):
            operation, n, *rest = row
            advance = rest[-1]
            args = ("alice", "messages", limit, n) + (tuple(rest[:1]) if operation == "give"
                                                      else ())
            await self.same_answer(ledgers, self.rate(operation, *args), f"step {step}: {row}",
                                   advance)

    async def test_a_random_rate_sequence(self):
        _, *ledgers = await self.rate_ledgers()
        rng = random.Random(11)
        limits = {"messages": Limit(5, 60.0), "recipients": Limit(12, 3600.0)}
        refused = 0
        for step in range(400):
            kind = rng.choice(list(limits))
            key = rng.choice(["office\0alice", "office\0bob"])
            n = rng.choice([1, 1, 1, 2, 4])
            if rng.random() < 0.6:
                args = ("take", key, kind, limits[kind], n)
            else:
                args = ("give", key, kind, limits[kind], n, rng.random() < 0.7)
            expected = await self.same_answer(
                ledgers, self.rate(*args), f"step {step}: {args}",
                round(rng.choice([0, 0, 0.25, 7.5, 31, 95.125, 700]), 3))
            refused += expected[0] == "exceeded"
        self.assertTrue(30 < refused < 300, refused)  # the sequence did test refusals


# -- sharing, expiry, the digest key --------------------------------------------------------

class SharingTests(RedisCase):
    async def test_two_throttles_share_one_address_and_identity_budget(self):
        server = await self.start_redis()
        throttles = [
            AuthThrottle(per_address=4, per_identity=3, window=600, clock=reactor,
                         ledger=RedisLoginLedger(RedisState(self.client(server.url)),
                                                 4, 3, 600))
            for _ in range(2)]
        claim = [Claim("office", "Alice")]
        for attempt in range(4):
            throttle = throttles[attempt % 2]
            self.assertIsNone(await throttle.refusal("192.0.2.1", []))
            await throttle.failed("192.0.2.1", [] if attempt else claim)
        for throttle in throttles:  # four failures, two relays: the address is refused
            self.assertEqual(await throttle.refusal("192.0.2.1", []),
                             "too many failed logins from this address")
        # the identity, case-folded, counted by both: under attack after 3
        await throttles[0].failed("192.0.2.2", [Claim("office", "ALICE")])
        delay = await throttles[1].failed("192.0.2.3", [Claim("office", "alice")])
        self.assertEqual(delay, 1.0)
        self.assertIsNotNone(await throttles[0].refusal("192.0.2.3", claim))
        self.assertIsNone(await throttles[0].refusal("192.0.2.9", claim))
        # both relays made the same digest key: one key in Redis, no user name anywhere
        keys = server.command("KEYS", "*")
        self.assertNotIn(b"alice", keys.lower())
        self.assertEqual(keys.count(b"esmtpfa:digest-key"), 1)

    async def test_two_rate_ledgers_share_one_budget(self):
        server = await self.start_redis()
        ledgers = [RedisRateLedger(RedisState(self.client(server.url))) for _ in range(2)]
        rates = Rates(messages=Limit(3, 3600.0))
        reservations = []
        for n in range(3):
            reservation = Reservation(ledgers[n % 2], "office\0carol", rates)
            await reservation.message()
            reservations.append(reservation)
        with self.assertRaises(Exceeded) as raised:  # three held in flight fill it
            await Reservation(ledgers[1], "office\0carol", rates).message()
        self.assertEqual(raised.exception.kind, "messages")
        self.assertGreaterEqual(raised.exception.retry_after, 1.0)
        reservations[0].release()   # not sent: given back, through either relay
        await sleep(0.2)
        await Reservation(ledgers[1], "office\0carol", rates).message()
        for reservation in reservations[1:]:
            reservation.commit()
        await sleep(0.2)  # settled (never waited on) before the client closes
        self.assertEqual(server.command("HGET", [k for k in server.command(
            "KEYS", "esmtpfa:rate:messages:*").split(b"\r\n") if k.startswith(b"esmtpfa")
            and not k.endswith(b":held")][0].decode(), "cur"), b"$1\r\n2\r\n")

    async def test_every_key_expires_but_the_digest_key(self):
        server = await self.start_redis()
        state = RedisState(self.client(server.url))
        login = RedisLoginLedger(state, 5, 3, 600)
        await login.failed("192.0.2.7", [IDENTITY])
        await RedisRateLedger(state).take("k", "messages", Limit(5, 3600.0), 1)
        await RedisRateLedger(state).give("k", "recipients", Limit(5, 60.0), 1, True)
        keys = [key for key in server.command("KEYS", "*").split(b"\r\n")
                if key.startswith(b"esmtpfa:")]
        # address, identity, pair, digest key, two rate counters, one reservation list
        self.assertEqual(len(keys), 7, keys)
        ttls = {}
        for key in keys:
            ttls[key] = int(server.command("TTL", key.decode())[1:].strip())
        for key, ttl in ttls.items():
            if key == b"esmtpfa:digest-key":
                self.assertEqual(ttl, -1)
            elif key.startswith(b"esmtpfa:login:"):
                self.assertTrue(595 <= ttl <= 600, (key, ttl))
            elif key.endswith(b":held"):
                self.assertTrue(895 <= ttl <= 900, (key, ttl))
            elif b":messages:" in key:
                self.assertTrue(7195 <= ttl <= 7200, (key, ttl))   # two windows
            else:
                self.assertTrue(115 <= ttl <= 120, (key, ttl))

    async def test_a_reservation_nobody_settles_expires(self):
        """A relay died between MAIL and the end of DATA: its reservation stops holding
        the identity's budget after the reservation TTL, not never."""
        server = await self.start_redis()
        clock = task.Clock()
        clock.advance(5000)
        ledger = RedisRateLedger(RedisState(self.client(server.url), clock=clock),
                                 reservation_ttl=900)
        limit = Limit(1, 86400.0)
        await ledger.take("office\0dave", "messages", limit, 1)   # ... and the relay dies
        clock.advance(899)
        with self.assertRaises(Exceeded):
            await ledger.take("office\0dave", "messages", limit, 1)
        clock.advance(2)
        await ledger.take("office\0dave", "messages", limit, 1)
        # a give after the expiry takes back nothing that is not there
        await ledger.give("office\0dave", "messages", limit, 5, False)
        await ledger.take("office\0dave", "messages", limit, 0)

    async def test_a_prefix_keeps_two_relays_apart(self):
        server = await self.start_redis()
        plain = RedisLoginLedger(RedisState(self.client(server.url)), 1, 5, 600)
        other_url = server.url + "?prefix=staging"
        other = RedisLoginLedger(RedisState(self.client(other_url),
                                            prefix=RedisURL.parse(other_url).prefix), 1, 5, 600)
        await plain.failed("192.0.2.8", [])
        self.assertIsNotNone(await plain.refusal("192.0.2.8", []))
        self.assertIsNone(await other.refusal("192.0.2.8", []))
        self.assertIn(b"esmtpfa:staging:digest-key", server.command("KEYS", "*"))


# -- the client -----------------------------------------------------------------------------

class AuthenticatedClientTests(RedisCase):
    password, username = PASSWORD, "relay"

    async def test_user_password_and_database_from_the_url(self):
        server = await self.start_redis()
        base = f"redis://relay:{PASSWORD}@127.0.0.1:{server.port}"
        client = self.client(base + "/2")
        self.assertEqual(await client.execute("SET", "where", "two"), "OK")
        self.assertEqual(await self.client(base + "/0").execute("GET", "where"), None)
        self.assertEqual(await self.client(base + "/2").execute("GET", "where"), b"two")

    async def test_a_wrong_password_fails_and_is_never_logged(self):
        server = await self.start_redis()
        events = capture_logs(self)
        client = self.client(f"redis://relay:wrong-{PASSWORD}@127.0.0.1:{server.port}/0")
        with self.assertRaises(StateUnavailable) as raised:
            await client.execute("PING")
        self.assertIn("WRONGPASS", str(raised.exception))
        text = repr(events)
        self.assertIn("cannot connect to Redis", text)
        self.assertNotIn(PASSWORD, text)


class TLSClientTests(RedisCase):
    """``rediss://``: the server's certificate is verified, always."""

    async def test_verified_against_the_ca_and_the_name(self):
        ca = CertificateAuthority(os.path.abspath(self.mktemp()))
        server = RedisServer(tls=ca.issue("127.0.0.1"))
        self.addCleanup(server.stop)
        await server.start()
        trusted = self.client(f"{server.url}?ca={ca.cert_path}")
        self.assertEqual(await trusted.execute("PING"), "PONG")
        # the system's trust roots do not know this CA: no connection
        with self.assertRaises(StateUnavailable) as raised:
            await self.client(server.url).execute("PING")
        self.assertIn("certificate verify failed", str(raised.exception))

    async def test_a_certificate_for_another_name_is_refused(self):
        ca = CertificateAuthority(os.path.abspath(self.mktemp()))
        server = RedisServer(tls=ca.issue("redis.other.test"))
        self.addCleanup(server.stop)
        await server.start()
        with self.assertRaises(StateUnavailable) as raised:
            await self.client(f"{server.url}?ca={ca.cert_path}").execute("PING")
        self.assertIn("IPAddressMismatch", str(raised.exception))


class ClientTests(RedisCase):
    async def test_pipelined_requests_are_answered_in_order(self):
        server = await self.start_redis()
        client = self.client(server.url)
        results = await defer.gatherResults(
            [client.execute("INCR", "n") for _ in range(200)])
        self.assertEqual(results, list(range(1, 201)))

    async def test_scripts_survive_a_script_flush(self):
        server = await self.start_redis()
        state = RedisState(self.client(server.url))
        ledger = RedisLoginLedger(state, 2, 5, 600)
        await ledger.failed("192.0.2.1", [IDENTITY])
        self.assertEqual(server.command("SCRIPT", "FLUSH"), b"+OK\r\n")
        self.assertEqual(await ledger.failed("192.0.2.1", [IDENTITY]), [2])  # NOSCRIPT → EVAL
        self.assertIsNotNone(await ledger.refusal("192.0.2.1", []))

    async def test_a_reply_over_the_bound_drops_the_connection(self):
        """A reply bigger than ``max_reply`` is never buffered whole: the request fails,
        the connection is dropped, and the next request works on a new one."""
        server = await self.start_redis()
        self.assertEqual(server.command("SET", "big", "x" * 4096), b"+OK\r\n")
        client = self.client(server.url, max_reply=1024)
        with self.assertRaises(StateUnavailable):
            await client.execute("GET", "big")
        self.assertEqual(await client.execute("STRLEN", "big"), 4096)

    async def test_a_stalled_server_costs_one_timeout_per_request(self):
        stalled = StalledRedis().start()
        self.addCleanup(stalled.stop)
        client = self.client(stalled.url, timeout=0.3)
        for _ in range(3):
            started = time.monotonic()
            with self.assertRaises(StateUnavailable) as raised:
                await client.execute("PING")
            took = time.monotonic() - started
            self.assertTrue(0.25 <= took < 1.0, took)
            self.assertIn("did not answer within 0.3 s", str(raised.exception))
        await sleep(0.1)
        # each timed-out connection was dropped (its late replies would be misread)
        self.assertEqual(len(stalled.connections), 3)
        self.assertTrue(all(not c.transport.connected for c in stalled.connections))

    async def test_a_dead_server_fails_fast_and_is_found_again(self):
        port = free_port()
        client = self.client(f"redis://127.0.0.1:{port}/0", timeout=0.5)
        started = time.monotonic()
        with self.assertRaises(StateUnavailable):
            await client.execute("PING")
        with self.assertRaises(StateUnavailable) as raised:  # within the pause: at once
            await client.execute("PING")
        self.assertIn("next attempt in", str(raised.exception))
        self.assertLess(time.monotonic() - started, 0.4)
        server = RedisServer(port=port)
        self.addCleanup(server.stop)
        await server.start()
        deadline = time.monotonic() + 10
        while True:
            try:
                self.assertEqual(await client.execute("PING"), "PONG")
                break
            except StateUnavailable:
                self.assertLess(time.monotonic(), deadline)
                await sleep(0.1)
        # killed under the client's feet: the next request fails, a later one reconnects
        await server.kill()
        with self.assertRaises(StateUnavailable):
            await client.execute("PING")


# -- the failure policy ---------------------------------------------------------------------

class FailurePolicyTests(RedisCase):
    def dead_ledgers(self, policy: str, metrics: RelayMetrics, clock=None):
        client = self.client(f"redis://127.0.0.1:{free_port()}/0", timeout=0.3)
        state = RedisState(client)
        guard = FailurePolicy(policy, clock or reactor, observer=metrics, timeout=2.0)
        self.addCleanup(guard.stop)
        return (GuardedLoginLedger(RedisLoginLedger(state, 3, 3, 600), guard),
                GuardedRateLedger(RedisRateLedger(state), guard))

    @staticmethod
    def errors(metrics: RelayMetrics) -> dict:
        return {tuple(sample.labels.values()): sample.value
                for family in metrics.registry.collect() if family.name.endswith("state_errors")
                for sample in family.samples if sample.name.endswith("_total")}

    async def test_open_answers_from_this_process_counts(self):
        """No Redis: the limits still hold, counted in this process alone (each decision
        counted in the metric), and the log says so once, not once per call."""
        metrics = RelayMetrics("esmtpfa")
        events = observe_logs(self)
        login, rates = self.dead_ledgers("open", metrics)
        self.assertIsNone(await login.refusal("192.0.2.1", [IDENTITY]))
        self.assertEqual(await login.failed("192.0.2.1", [IDENTITY]), [1])
        self.assertIsNone(await login.succeeded("192.0.2.1", IDENTITY))
        self.assertIsNone(await rates.take("k", "messages", Limit(1, 60.0), 1))
        with self.assertRaises(Exceeded):   # the budget of one, counted here
            await rates.take("k", "messages", Limit(1, 60.0), 1)
        self.assertIsNone(await rates.give("k", "messages", Limit(1, 60.0), 1, True))
        for _ in range(2):
            self.assertEqual(await login.failed("192.0.2.1", []), [])
        self.assertEqual(await login.refusal("192.0.2.1", [IDENTITY]),
                         "too many failed logins from this address")
        self.assertEqual(self.errors(metrics), {
            ("login_refusal", "open"): 2.0, ("login_failed", "open"): 3.0,
            ("login_succeeded", "open"): 1.0, ("rate_take", "open"): 2.0})
        blips = [e for e in events
                 if "shared state unavailable" in e.get("log_template", "")]
        # the first failures, before the breaker opens, one line each; then one line
        degraded = [e for e in events if "is degraded" in e.get("log_template", "")]
        self.assertEqual(len(blips), 2)
        self.assertIn("own failure counts decide", blips[0]["consequence"])
        self.assertEqual(len(degraded), 1)

    async def test_closed_refuses_temporarily(self):
        metrics = RelayMetrics("esmtpfa")
        login, rates = self.dead_ledgers("closed", metrics)
        with self.assertRaises(StateRefusedLogin):
            await login.refusal("192.0.2.1", [IDENTITY])
        with self.assertRaises(StateRefusedRate) as raised:
            await rates.take("k", "messages", Limit(1, 60.0), 1)
        reply = raised.exception.reply
        self.assertEqual((reply.code, reply.enhanced), (451, "4.3.0"))
        self.assertEqual(await login.failed("192.0.2.1", [IDENTITY]), [])
        self.assertIsNone(await rates.give("k", "messages", Limit(1, 60.0), 1, False))
        self.assertEqual(self.errors(metrics)[("login_refusal", "closed")], 1.0)
        self.assertEqual(self.errors(metrics)[("rate_take", "closed")], 1.0)
        # a refused login is a temporary failure to the throttle's checker (454), and an
        # exceeded rate is still an answer, not an error
        self.assertFalse(issubclass(StateRefusedLogin, LoginThrottled))

    async def test_exceeded_passes_through_the_guard(self):
        server = await self.start_redis()
        guard = FailurePolicy("closed", reactor)
        rates = GuardedRateLedger(RedisRateLedger(RedisState(self.client(server.url))), guard)
        await rates.take("k", "messages", Limit(1, 60.0), 1)
        with self.assertRaises(Exceeded):
            await rates.take("k", "messages", Limit(1, 60.0), 1)

    async def test_a_ledger_that_never_answers_is_cut_off(self):
        class Silent:
            per_address, per_identity, window = 1, 1, 1.0

            def refusal(self, address, identities):
                return defer.Deferred()

        clock = task.Clock()
        guard = FailurePolicy("open", clock, timeout=1.0)
        self.addCleanup(guard.stop)
        answer = GuardedLoginLedger(Silent(), guard).refusal("192.0.2.1", [])
        clock.advance(1.0)
        self.assertIsNone(self.successResultOf(answer))


# -- two real relays ------------------------------------------------------------------------

def metrics_text(relay: RunningRelay) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{relay.metrics_port}/metrics",
                                timeout=10) as response:
        return response.read().decode()


def login_code(port: int, source: str, user: str = "lab",
               password: str = "carol:wrong password") -> int:
    """One ``AUTH PLAIN`` on a new connection from ``source``: its reply code.  (Not
    ``smtplib.login``: after a refusal it tries the next mechanism, a second attempt.)"""
    client = smtplib.SMTP("127.0.0.1", port, timeout=15, source_address=(source, 0))
    try:
        client.ehlo("client.test")
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        code, _ = client.docmd("AUTH", "PLAIN " + token)
        return code
    finally:
        client.close()


def failed_login(port: int, source: str) -> int:
    return login_code(port, source)


class TwoRelaysTests(RedisCase):
    """``twistd`` twice, one Redis: one budget."""

    timeout = 120
    password = PASSWORD

    async def relays(self, server_url: str, *args_each: list[str], upstream_port: int):
        relays = []
        for args in args_each:
            relay = RunningRelay(self.mktemp(), upstream_port=upstream_port,
                                 args=args, env={"STATE_URL": server_url})
            self.addCleanup(relay.stop)
            relays.append(relay)
        await defer.gatherResults([defer.ensureDeferred(r.start()) for r in relays])
        return relays

    async def upstream(self) -> MisbehavingUpstream:
        upstream = MisbehavingUpstream().start()
        self.addCleanup(upstream.stop)
        return upstream

    async def test_messages_and_failed_logins_share_one_budget(self):
        server = await self.start_redis()
        upstream = await self.upstream()
        flags = ["--rate-messages", "3/1h", "--max-auth-failures-per-ip", "4"]
        relays = await self.relays(server.url, flags, flags, upstream_port=upstream.port)
        ids = [new_message_id("shared", n) for n in range(5)]
        replies = []
        for n, message_id in enumerate(ids):
            replies.append(await threads.deferToThread(
                send_fresh, relays[n % 2].smtp_port, message_id, message(message_id)))
        self.assertEqual([code for code, _ in replies], [250, 250, 250, 451, 451])
        self.assertIn("4.7.1 Message rate limit", replies[3][1])
        self.assertEqual([upstream.accepted(i) for i in ids], [1, 1, 1, 0, 0])
        # failed logins from one address, spread over both relays: refused after 4
        codes = [await threads.deferToThread(failed_login, relays[n % 2].smtp_port,
                                             "127.0.0.5") for n in range(6)]
        self.assertEqual(codes, [535, 535, 535, 535, 454, 454])
        for relay in relays:
            self.assertNotIn(PASSWORD, relay.log)
            self.assertIn("shared through Redis at redis://127.0.0.1:", relay.log)

    async def test_redis_killed_open_relays_and_closed_answers_4xx(self):
        server = await self.start_redis()
        upstream = await self.upstream()
        flags = ["--rate-messages", "100/1h", "--state-timeout", "0.3"]
        open_relay, closed_relay = await self.relays(
            server.url, flags + ["--state-failure", "open"],
            flags + ["--state-failure", "closed"], upstream_port=upstream.port)
        # a session that logged in while Redis was up
        session = await threads.deferToThread(smtp_session, closed_relay.smtp_port, CLIENT)
        self.addCleanup(session.close)
        await server.kill()
        # fail open: messages keep flowing, each decision without Redis is counted
        ids = [new_message_id("open", n) for n in range(3)]
        for message_id in ids:
            code, text = await threads.deferToThread(
                send_fresh, open_relay.smtp_port, message_id, message(message_id))
            self.assertEqual(code, 250, text)
        self.assertEqual([upstream.accepted(i) for i in ids], [1, 1, 1])
        counted = await threads.deferToThread(metrics_text, open_relay)
        self.assertIn('esmtpfa_state_errors_total{operation="login_refusal",outcome="open"} 3',
                      counted)
        self.assertIn('esmtpfa_state_errors_total{operation="rate_take",outcome="open"}',
                      counted)
        self.assertIn("shared state unavailable for login_refusal", open_relay.log)
        self.assertIn("(--state-failure open)", open_relay.log)
        # fail closed: 4xx, never 5xx; a logged-in session's MAIL, a new session's AUTH
        code, text = await threads.deferToThread(
            send_one, session, message(new_message_id("closed", 0)))
        self.assertEqual(code, 451, text)
        self.assertIn("4.3.0 Sending limits cannot be checked now", text)
        self.assertEqual(await threads.deferToThread(
            failed_login, closed_relay.smtp_port, "127.0.0.6"), 454)
        user, password = CLIENT   # the right password: still 454, never 535
        self.assertEqual(await threads.deferToThread(
            login_code, closed_relay.smtp_port, "127.0.0.1", user, password), 454)
        self.assertIn("(--state-failure closed)", closed_relay.log)
        counted = await threads.deferToThread(metrics_text, closed_relay)
        self.assertIn('esmtpfa_state_errors_total{operation="rate_take",outcome="closed"} 1',
                      counted)
        for relay in (open_relay, closed_relay):
            self.assertNotIn(PASSWORD, relay.log)
            self.assertIn("cannot connect to Redis at redis://127.0.0.1:", relay.log)


class StalledRedisRelayTests(RedisCase):
    """Redis accepts and never answers: each step waits ``--state-timeout``, no more."""

    timeout = 120

    async def test_a_stalled_redis_is_bounded_by_the_state_timeout(self):
        stalled = StalledRedis().start()
        self.addCleanup(stalled.stop)
        upstream = MisbehavingUpstream().start()
        self.addCleanup(upstream.stop)
        relays = []
        for policy in ("open", "closed"):
            relay = RunningRelay(self.mktemp(), upstream_port=upstream.port, args=[
                "--rate-messages", "100/1h", "--state-url", stalled.url,
                "--state-timeout", "0.3", "--state-failure", policy])
            self.addCleanup(relay.stop)
            relays.append(relay)
        await defer.gatherResults([defer.ensureDeferred(r.start()) for r in relays])
        open_relay, closed_relay = relays
        message_id = new_message_id("stalled", 0)
        started = time.monotonic()
        code, text = await threads.deferToThread(
            send_fresh, open_relay.smtp_port, message_id, message(message_id))
        took = time.monotonic() - started
        self.assertEqual(code, 250, text)
        self.assertEqual(upstream.accepted(message_id), 1)
        # AUTH's refusal, MAIL's and RCPT's takes: at most three waits of 0.3 s (a take
        # may share the wait of a fetch already under way)
        self.assertTrue(0.3 <= took < 4.0, took)
        self.assertIn("did not answer within 0.3 s", open_relay.log)
        started = time.monotonic()
        code = await threads.deferToThread(failed_login, closed_relay.smtp_port, "127.0.0.7")
        self.assertEqual(code, 454)
        self.assertLess(time.monotonic() - started, 2.0)
