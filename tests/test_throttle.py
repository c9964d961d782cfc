"""The failed-login throttle (docs/design.md, "Configuration, reload and limits",
docs/login-throttle.md).

Unit tests drive ``ThrottlingChecker`` in front of the real ``ProviderSelector`` with a
``Clock``, so what they see is what a client would: accepted, refused (``535``),
throttled (``454``/``429``), and *when* the answer came.  The wire tests at the end run
the whole relay against a real slapd and log in over SMTP and HTTP from several loopback
addresses (127.0.0.x), as an attacker's and an owner's clients would.
"""

from __future__ import annotations

import base64
import json
import socket

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial import unittest

from esmtpfa.auth.credentials import (
    IBearerTokenCredentials,
    IUserPasswordCredentials,
    SubmissionCredentials,
)
from esmtpfa.auth.errors import ProviderUnavailable
from esmtpfa.auth.provider import Provider, ProviderMeta
from esmtpfa.auth.selection import ProviderDirectory, ProviderSelector, ProviderSet
from esmtpfa.common.context import ConnectionContext, normalize_domain
from esmtpfa.limits.ledgers import FailureWindow
from esmtpfa.limits.throttle import AuthThrottle, LoginThrottled, ThrottlingChecker
from tests.support.logcapture import observe_logs
from tests.support.relayfixture import RelayFixture
from tests.support.slapd import SharedSlapd, ldap_providers
from tests.support.webclient import read_until
from tests.test_smtp_server import send_message

WINDOW = 600.0


class FailureWindowTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.window = FailureWindow(limit=3, window=60, clock=self.clock)

    def test_blocks_at_the_limit_and_forgets_after_the_window(self):
        for _ in range(2):
            self.window.failed("a")
        self.assertFalse(self.window.blocked("a"))
        self.window.failed("a")
        self.assertTrue(self.window.blocked("a"))
        self.assertFalse(self.window.blocked("b"))
        self.clock.advance(61)
        self.assertFalse(self.window.blocked("a"))
        self.assertEqual(len(self.window), 0)

    def test_sliding_not_fixed(self):
        self.window.failed("a")
        self.clock.advance(40)
        self.window.failed("a")
        self.window.failed("a")
        self.clock.advance(30)  # the first failure is now outside the window
        self.assertFalse(self.window.blocked("a"))

    def test_memory_is_bounded_oldest_forgotten_first(self):
        window = FailureWindow(limit=1, window=60, clock=self.clock, max_keys=100)
        for i in range(1000):
            window.failed(f"user{i}")
        self.assertEqual(len(window), 100)
        self.assertTrue(window.blocked("user999"))
        self.assertFalse(window.blocked("user0"))

    def test_depth_bounds_one_key(self):
        window = FailureWindow(limit=2, window=60, clock=self.clock, depth=5)
        for _ in range(1000):
            window.failed("a")
        self.assertEqual(window.count("a"), 5)

    def test_forget_takes_back_only_the_given_failures(self):
        first = self.window.failed("a")
        self.clock.advance(1)
        self.window.failed("a")
        self.window.forget("a", [first, first])  # twice: still only one taken back
        self.assertEqual(self.window.count("a"), 1)


# -- providers for the unit tests ---------------------------------------------------

def meta(name: str, fallback: bool = False, domain: str | None = None,
         unique: bool = False) -> ProviderMeta:
    return ProviderMeta(name=name, type="test", domain=normalize_domain(domain),
                        fallback=fallback, unique_domain_auth=unique)


class Accounts(Provider):
    """A user+password provider with several users, case-insensitive like LDAP; it
    records who it was asked about, so a test can tell "refused early" from "asked"."""

    credentialInterfaces = (IUserPasswordCredentials,)

    def __init__(self, meta: ProviderMeta, users: dict[str, str]):
        super().__init__(meta)
        self.users = users
        self.asked: list[str] = []
        self.down = False
        self.pending: Deferred | None = None
        self.hold = False

    def requestAvatarId(self, credentials):
        self.asked.append(credentials.username)
        if self.hold:
            self.pending = Deferred()
            return self.pending
        if self.down:
            return fail(ProviderUnavailable("directory down"))
        user = credentials.username.casefold()
        if self.users.get(user) == credentials.password:
            return succeed(user)
        return fail(UnauthorizedLogin())


class Tokens(Provider):
    """A bearer-token provider (like jwt): a token names its user only once it verifies."""

    credentialInterfaces = (IBearerTokenCredentials,)

    def __init__(self, meta: ProviderMeta, tokens: dict[str, str]):
        super().__init__(meta)
        self.tokens = tokens
        self.asked = 0

    def requestAvatarId(self, credentials):
        self.asked += 1
        if credentials.token in self.tokens:
            return succeed(self.tokens[credentials.token])
        return fail(UnauthorizedLogin())


def offer(username: str, secret: str, peer: str, *, bearer: bool = False,
          sni: str | None = None) -> SubmissionCredentials:
    context = ConnectionContext("urn:uuid:00000000-0000-0000-0000-000000000002", "smtp",
                                peer_host=peer, tls=True, sni=sni)
    return SubmissionCredentials(username, secret, context, bearer=bearer,
                                 mechanism="OAUTHBEARER" if bearer else "PLAIN")


class ThrottleMixin:
    """A checker in front of: ``corp`` (by name: ``corp`` / ``alice:pw``), ``lab`` (by
    name, another provider with an alice of its own), ``tokens`` (a token provider, by
    name and as a fallback: OAUTHBEARER without ``a=`` reaches it with no username)."""

    per_address = 1000
    per_identity = 3

    def setUp(self):
        self.clock = Clock()
        self.corp = Accounts(meta("corp"), {"alice": "alice-pw", "bob": "bob-pw"})
        self.lab = Accounts(meta("lab"), {"alice": "lab-pw"})
        self.tokens = Tokens(meta("tokens", fallback=True), {"good-token": "ci-bot"})
        # Positional, as the constructor has always taken them.
        self.throttle = AuthThrottle(self.per_address, self.per_identity, WINDOW,
                                     clock=self.clock)
        selector = ProviderSelector(ProviderDirectory(ProviderSet(
            [self.corp, self.lab, self.tokens])))
        self.checker = ThrottlingChecker(selector, self.throttle)

    def login(self, username: str, secret: str, peer: str, **kwargs) -> Deferred:
        return self.checker.requestAvatarId(offer(username, secret, peer, **kwargs))

    def outcome(self, d: Deferred):
        """The login's result once any delay has run out: the identity, or the failure.
        The clock moves only as far as the answer needs."""
        results: list = []
        d.addBoth(results.append)
        for _ in range(120):
            if results:
                break
            self.clock.advance(0.5)
        [result] = results
        return result

    def accepted_at_once(self, d: Deferred):
        return self.successResultOf(d)  # no clock advanced: answered at once

    def refused(self, d: Deferred) -> None:
        """Asked, and refused as a wrong password (``535``), now or after a delay."""
        self.assertIsInstance(self.outcome(d).value, UnauthorizedLogin)

    def throttled(self, d: Deferred) -> None:
        self.failureResultOf(d, LoginThrottled)  # at once, and no provider asked

    def attack(self, username: str, secret: str, addresses, **kwargs) -> None:
        """Wrong guesses from ``addresses``, each waited for; the attacker takes whatever
        refusal comes (tests that need them asked say so with the provider's record)."""
        for peer in addresses:
            failure = self.outcome(self.login(username, secret, peer, **kwargs))
            self.assertIsInstance(failure.value, (UnauthorizedLogin, LoginThrottled))


def peers(count: int, net: str = "198.51.100") -> list[str]:
    return [f"{net}.{i}" for i in range(1, count + 1)]


class IdentityTests(ThrottleMixin, unittest.TestCase):
    """Failures count per provider + user, never per provider name."""

    def test_alices_failures_from_many_addresses_never_refuse_bob(self):
        # Regression: the username is the provider's name here.
        self.attack("corp", "alice:guess", peers(10))
        for peer in peers(10) + ["203.0.113.9"]:
            identity = self.accepted_at_once(self.login("corp", "bob:bob-pw", peer))
            self.assertEqual((identity.provider, identity.username), ("corp", "bob"))
        self.assertEqual(len(self.corp.asked), 10 + 11)  # every guess was asked too

    def test_same_user_of_another_provider_is_another_identity(self):
        self.attack("corp", "alice:guess", ["192.0.2.7"] * self.per_identity)
        self.throttled(self.login("corp", "alice:alice-pw", "192.0.2.7"))
        self.accepted_at_once(self.login("lab", "alice:lab-pw", "192.0.2.7"))

    def test_user_is_case_folded(self):
        self.attack("corp", "Alice:guess", ["192.0.2.7"])
        self.attack("corp", "ALICE:guess", ["192.0.2.7"] * 2)
        self.throttled(self.login("corp", "alice:alice-pw", "192.0.2.7"))
        self.assertEqual(len(self.corp.asked), 3)

    def test_token_failures_count_per_address_only(self):
        # Regression: OAUTHBEARER without a= made every login share the empty username.
        self.attack("", "forged", peers(10), bearer=True)
        self.attack("", "forged", ["192.0.2.7"] * 10, bearer=True)
        self.assertEqual(self.accepted_at_once(
            self.login("", "good-token", "203.0.113.9", bearer=True)).username, "ci-bot")
        self.assertEqual(self.accepted_at_once(
            self.login("", "good-token", "192.0.2.7", bearer=True)).username, "ci-bot")
        self.assertEqual(self.tokens.asked, 20 + 2)

    def test_token_provider_named_by_the_username_counts_per_address_only(self):
        # Regression: with ``tokens`` as the username, every token user shared its name.
        self.attack("tokens", "forged", peers(10))
        self.accepted_at_once(self.login("tokens", "good-token", "203.0.113.9"))
        self.assertEqual(self.tokens.asked, 10 + 1)

    def test_fallback_failures_count_against_the_user_asked_about(self):
        fallback = Accounts(meta("office", fallback=True), {"carol": "carol-pw"})
        self.checker.checker = ProviderSelector(ProviderDirectory(ProviderSet(
            [self.corp, fallback])))
        self.attack("carol", "guess", peers(5))
        self.throttled(self.login("carol", "carol-pw", "198.51.100.1"))
        self.assertEqual(self.accepted_at_once(
            self.login("carol", "carol-pw", "203.0.113.9")).username, "carol")


class OwnerTests(ThrottleMixin, unittest.TestCase):
    """An attacker's guesses from other addresses never stop the owner."""

    def test_attacker_from_other_addresses_never_refuses_the_owner(self):
        # Regression.
        self.attack("corp", "alice:guess", peers(50))
        identity = self.accepted_at_once(self.login("corp", "alice:alice-pw", "203.0.113.9"))
        self.assertEqual(str(identity), "corp/alice")
        self.assertEqual(len(self.corp.asked), 50 + 1)

    def test_one_address_guessing_for_an_hour_never_keeps_the_owner_out(self):
        # Regression: refused attempts cost nothing, so one address kept the lock up.
        attacker, owner = "192.0.2.66", "203.0.113.9"
        for minute in range(60):
            self.attack("corp", f"alice:guess{minute}", [attacker])
            if minute % 10 == 5:
                self.accepted_at_once(self.login("corp", "alice:alice-pw", owner))
            self.clock.advance(60)
        guesses_asked = len(self.corp.asked) - 6
        # The identity's budget from that address, per window, and no more.
        self.assertLessEqual(guesses_asked, self.per_identity * 6)

    def test_failed_attempts_under_attack_are_answered_late_growing_and_capped(self):
        self.attack("corp", "alice:guess", peers(self.per_identity - 1))
        delays = []
        for peer in peers(6, net="203.0.113"):
            answers: list = []
            self.login("corp", "alice:guess", peer).addBoth(answers.append)
            started = self.clock.seconds()
            for _ in range(40):  # 20 s at most
                if answers:
                    break
                self.clock.advance(0.5)
            self.assertIsInstance(answers[0].value, UnauthorizedLogin)
            delays.append(self.clock.seconds() - started)
        self.assertEqual(delays, [1.0, 2.0, 4.0, 8.0, 8.0, 8.0])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_below_the_limit_failures_are_answered_at_once(self):
        for peer in peers(self.per_identity - 1):
            self.failureResultOf(self.login("corp", "alice:guess", peer), UnauthorizedLogin)

    def test_addresses_that_failed_are_refused_for_that_identity_only(self):
        self.attack("corp", "alice:guess", peers(self.per_identity))
        asked = len(self.corp.asked)
        self.throttled(self.login("corp", "alice:alice-pw", "198.51.100.1"))
        self.assertEqual(len(self.corp.asked), asked)  # refused before asking
        self.accepted_at_once(self.login("corp", "bob:bob-pw", "198.51.100.1"))

    def test_owner_success_does_not_end_the_tarpit_for_attackers(self):
        self.attack("corp", "alice:guess", peers(self.per_identity))
        self.accepted_at_once(self.login("corp", "alice:alice-pw", "203.0.113.9"))
        d = self.login("corp", "alice:guess", "203.0.113.10")
        self.assertNoResult(d)
        self.refused(d)

    def test_owner_success_takes_back_its_own_failures_not_its_address_budget(self):
        throttle = self.throttle = AuthThrottle(5, 3, WINDOW, clock=self.clock)
        self.checker.throttle = throttle
        home = "192.0.2.50"
        self.attack("corp", "alice:typo", [home] * 2)
        self.accepted_at_once(self.login("corp", "alice:alice-pw", home))
        # Her two typos are taken back: a third is not "under attack" yet.
        self.failureResultOf(self.login("corp", "alice:typo", home), UnauthorizedLogin)
        # The address keeps every failure it made: 3 + 2 reaches its limit of 5.
        self.attack("corp", "mallory:x", [home] * 2)
        self.throttled(self.login("corp", "bob:bob-pw", home))


class AddressTests(ThrottleMixin, unittest.TestCase):
    per_address = 5
    per_identity = 100

    def test_an_address_over_its_limit_is_refused_before_any_provider_is_asked(self):
        for i in range(self.per_address):
            self.refused(self.login("corp", f"user{i}:guess", "192.0.2.7"))
        asked = len(self.corp.asked)
        self.throttled(self.login("corp", "bob:bob-pw", "192.0.2.7"))
        self.assertEqual(len(self.corp.asked), asked)
        self.accepted_at_once(self.login("corp", "bob:bob-pw", "192.0.2.8"))

    def test_refused_attempts_do_not_extend_the_refusal(self):
        # Regression: a refused attempt must not keep the lock in place for nothing.
        for i in range(self.per_address):
            self.refused(self.login("corp", f"user{i}:guess", "192.0.2.7"))
        self.clock.advance(1)
        for _ in range(int(WINDOW // 10) - 1):  # knocking every 10 s for a whole window
            self.throttled(self.login("corp", "bob:bob-pw", "192.0.2.7"))
            self.clock.advance(10)
        self.throttled(self.login("corp", "bob:bob-pw", "192.0.2.7"))  # still in it
        self.clock.advance(WINDOW - self.clock.seconds() + 1)
        self.accepted_at_once(self.login("corp", "bob:bob-pw", "192.0.2.7"))

    def test_ipv6_counts_per_64(self):
        for i in range(self.per_address):
            self.refused(self.login("corp", "bob:guess", f"2001:db8:1:2::{i + 1:x}"))
        self.throttled(self.login("corp", "bob:bob-pw", "2001:db8:1:2:ffff::1"))
        self.accepted_at_once(self.login("corp", "bob:bob-pw", "2001:db8:1:3::1"))

    def test_ipv4_mapped_is_the_ipv4_address(self):
        for _ in range(self.per_address):
            self.refused(self.login("corp", "bob:guess", "::ffff:192.0.2.7"))
        self.throttled(self.login("corp", "bob:bob-pw", "192.0.2.7"))


class IdentityLockExpiryTests(ThrottleMixin, unittest.TestCase):
    def test_identity_refusal_of_an_address_ends_one_window_after_its_last_failure(self):
        self.attack("corp", "alice:guess", ["192.0.2.7"] * (self.per_identity - 1))
        last_failure = self.clock.seconds()  # counted when the provider answers
        self.refused(self.login("corp", "alice:guess", "192.0.2.7"))
        while self.clock.seconds() < last_failure + WINDOW - 5:
            self.throttled(self.login("corp", "alice:alice-pw", "192.0.2.7"))
            self.clock.advance(5)
        self.clock.advance(6)
        self.accepted_at_once(self.login("corp", "alice:alice-pw", "192.0.2.7"))


class FaultTests(ThrottleMixin, unittest.TestCase):
    def test_an_unavailable_provider_is_nobodys_fault(self):
        self.corp.down = True
        for _ in range(20):
            d = self.login("corp", "alice:alice-pw", "192.0.2.7")
            self.failureResultOf(d, ProviderUnavailable)
        self.corp.down = False
        self.accepted_at_once(self.login("corp", "alice:alice-pw", "192.0.2.7"))
        self.assertEqual(len(self.throttle.ledger.addresses), 0)

    def test_cancelling_a_late_answer_cancels_its_timer(self):
        self.attack("corp", "alice:guess", peers(self.per_identity))
        d = self.login("corp", "alice:guess", "203.0.113.9")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cancelling_while_the_provider_is_asked_counts_nothing(self):
        self.corp.hold = True
        d = self.login("corp", "alice:guess", "192.0.2.7")
        self.assertIsNotNone(self.corp.pending)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(len(self.throttle.ledger.addresses), 0)

    def test_memory_is_bounded(self):
        throttle = AuthThrottle(30, 3, WINDOW, clock=self.clock, max_keys=100)
        self.checker.throttle = throttle
        for i in range(1000):
            self.failureResultOf(self.login(
                "corp", f"user{i}:guess", f"10.0.{i // 256}.{i % 256}"), UnauthorizedLogin)
        self.assertEqual((len(throttle.ledger.addresses), len(throttle.ledger.identities),
                          len(throttle.ledger.pairs)), (100, 100, 100))


class NoSecretTests(ThrottleMixin, unittest.TestCase):
    """Under the provider-name convention the user comes out of the password field; a
    client that got the convention wrong put (part of) a password there."""

    def test_no_user_from_the_password_field_in_logs_or_errors(self):
        events = observe_logs(self)
        self.attack("corp", "hunter2-secret:rest", peers(self.per_identity))
        throttled = self.failureResultOf(
            self.login("corp", "hunter2-secret:rest", "198.51.100.1"), LoginThrottled)
        texts = [str(event.get("log_text", event)) for event in events]
        self.assertTrue(any("corp/<user from the password field>" in t for t in texts),
                        texts)
        for text in texts + [str(throttled.value), repr(throttled.value)]:
            self.assertNotIn("hunter2", text)


# -- over the wire: a real relay, a real slapd, several client addresses -------------

LDAP = "corp-ldap"
DOCUMENT = json.dumps({"from": "alice@example.com", "to": ["bob@example.net"],
                       "data": base64.b64encode(b"Subject: hi\r\n\r\nHello\r\n").decode()})


def http_post(port: int, source: str, user: str, password: str) -> int:
    """One submission over a raw socket from ``source``; the status code (blocking)."""
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    body = DOCUMENT.encode()
    head = (f"POST / HTTP/1.1\r\nHost: relay.test\r\nAuthorization: Basic {auth}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=20,
                                  source_address=(source, 0)) as s:
        s.sendall(head + body)
        received = read_until(s, b"\r\n")
    return int(received.split(b" ", 2)[1])


class OverTheWireTests(SharedSlapd, unittest.TestCase):
    """``AUTH PLAIN \\0corp-ldap\\0alice:guess`` from three addresses, then the owner,
    another user, and an attacking address try with the right passwords."""

    timeout = 60
    attackers = ("127.0.0.2", "127.0.0.3", "127.0.0.4")

    @defer.inlineCallbacks
    def relay(self, *args):
        fixture = RelayFixture(self.mktemp(), "--max-auth-failures-per-user", "3", *args,
                               providers=ldap_providers(self.slapd, LDAP, tls=True))
        self.addCleanup(fixture.stop)
        yield fixture.start()
        return fixture

    @defer.inlineCallbacks
    def test_smtp_attacker_never_refuses_the_owner_nor_another_user(self):
        fixture = yield self.relay()
        clients = []

        def session(source):
            client = fixture.connect(source=source)
            clients.append(client)
            client.command("EHLO client.example")
            assert client.starttls(fixture.client_context(),
                                   server_hostname="relay.test")[0] == 220
            client.command("EHLO client.example")
            return client

        def script():
            try:
                attacks = [session(a).auth_plain(LDAP, f"alice:guess{i}")[0]
                           for i, a in enumerate(self.attackers)]
                owner = session("127.0.0.10")
                owner_auth = owner.auth_plain(LDAP, "alice:alice-pw")
                sent = send_message(owner)[0] if owner_auth[0] == 235 else None
                bob = session(self.attackers[0]).auth_plain(LDAP, "bob:bob-pw")
                attacker = session(self.attackers[1]).auth_plain(LDAP, "alice:alice-pw")
                return attacks, owner_auth, sent, bob, attacker
            finally:
                for client in clients:
                    client.close()

        attacks, owner, sent, bob, attacker = yield fixture.run(script)
        self.assertEqual(attacks, [535, 535, 535])
        self.assertEqual((owner[0], sent), (235, 250), owner)
        self.assertEqual(bob[0], 235, bob)
        self.assertEqual((attacker[0], attacker[1].split()[0]), (454, "4.7.0"))
        self.assertEqual(len(fixture.upstream.messages), 1)

    @defer.inlineCallbacks
    def test_http_attacker_never_refuses_the_owner_nor_another_user(self):
        fixture = yield self.relay("--http")
        port = fixture.http_port

        def script():
            attacks = [http_post(port, a, LDAP, f"alice:guess{i}")
                       for i, a in enumerate(self.attackers)]
            return (attacks, http_post(port, "127.0.0.10", LDAP, "alice:alice-pw"),
                    http_post(port, self.attackers[0], LDAP, "bob:bob-pw"),
                    http_post(port, self.attackers[1], LDAP, "alice:alice-pw"))

        attacks, owner, bob, attacker = yield fixture.run(script)
        self.assertEqual((attacks, owner, bob, attacker), ([401, 401, 401], 202, 202, 429))
        self.assertEqual(len(fixture.upstream.messages), 2)
