"""End to end: the login throttle counts per identity, so an attack on
one account cannot lock out the other users of its provider.

Everything is real: the whole relay in-process (``RelayFixture``) with the throttle's
default settings, a real ``slapd`` behind an ldap provider, a real JWKS endpoint behind
a jwt provider, and clients on loopback that connect from many source addresses
(127.0.0.2, 127.0.0.3, …) as an attacker's botnet and the victims' clients would.  SMTP
is spoken byte by byte on blocking sockets in a thread; HTTP goes through curl.

The expected answers follow docs/login-throttle.md with the defaults (10 failures per
identity, 30 per address, 600 s window, tarpit from 1 s):

* an attacker who guesses ``alice``'s password in rounds over 10 addresses gets 10 real
  answers (``535``); the identity is then under attack, and every address that failed
  against it is refused for it before the directory is asked (``454 4.7.0`` / ``429``);
* ``bob`` of the same provider logs in at once, from an attacking address and from a
  clean one, and his messages reach the upstream;
* ``alice`` logs in at once from a clean address; from an address that guessed at her
  account she is refused for one window (the documented cost of sharing it);
* refused tokens name nobody, so 12 of them from 12 addresses refuse no one else.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import time
from dataclasses import dataclass

from twisted.internet import defer
from twisted.trial import unittest

from tests.support.builders import b64
from tests.support.httpservers import (
    JWKSEndpoint,
    LoopbackHTTPServer,
    make_key,
    mint,
    standard_claims,
)
from tests.support.processes import run_tool
from tests.support.relayfixture import RelayFixture
from tests.support.slapd import SharedSlapd, ldap_providers

#: Every blocking socket operation of a client gives up after this long.
CLIENT_TIMEOUT = 15.0
#: The shortest tarpit delay (``--auth-failure-max-delay``'s first step, 1 s): a login
#: answered sooner was not held back by the throttle.
FIRST_DELAY = 1.0

LDAP = "corp-ldap"
ATTACKERS = [f"127.0.0.{i}" for i in range(2, 12)]   # 10 addresses
CLEAN_BOB, CLEAN_ALICE = "127.0.0.12", "127.0.0.13"
ROUNDS = 5                                           # 5 × 10 = 50 attempts
#: Who logs in once the attack is over, from where, with the right password: the owner
#: and another user, each from an attacking and from a clean address.
AFTER_THE_ATTACK = (
    ("bob from an attacking address", ATTACKERS[0], "bob:bob-pw"),
    ("bob from a clean address", CLEAN_BOB, "bob:bob-pw"),
    ("alice from a clean address", CLEAN_ALICE, "alice:alice-pw"),
    ("alice from an attacking address", ATTACKERS[1], "alice:alice-pw"))

#: ``--max-auth-failures``, left at its default: the 3rd 535 on a connection is
#: followed by 421 and the server closes it.
MAX_AUTH_FAILURES = 3

AUTH_OK = b"235 2.7.0 "
AUTH_INVALID = b"535 5.7.8 "
#: The throttle's refusal, told apart from a provider's temporary failure (also 454 4.7.0).
THROTTLED = b"454 4.7.0 Too many failed authentications, try again later"
MAIL_OK, RCPT_OK, DATA_GO = b"250 2.1.0 ", b"250 2.1.5 ", b"354 "
#: MAIL, RCPT, DATA and the final dot all accepted: the message went to the upstream.
DELIVERED = [b"250 2.1.0", b"250 2.1.5", b"354", b"250 2.0.0"]

CONTENT = b"Subject: throttle e2e\r\n\r\nHello.\r\n"


class Session:
    """One SMTP client connection over implicit TLS from a chosen source address; every
    reply is returned as the exact bytes of its lines."""

    def __init__(self, fixture: RelayFixture, source: str):
        raw = socket.create_connection(("127.0.0.1", fixture.tls_port),
                                       timeout=CLIENT_TIMEOUT, source_address=(source, 0))
        self.sock = fixture.client_context().wrap_socket(raw, server_hostname="relay.test")
        self._buffer = b""
        self.closed = False
        self.auth_failures = 0
        self.farewell: bytes | None = None  # the 421 after too many failures
        self.greeting = self.reply()
        ehlo = self.exchange("EHLO client.example")
        assert ehlo[-1].startswith(b"250 "), ehlo

    def _line(self) -> bytes:
        while b"\r\n" not in self._buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                self.closed = True
                raise ConnectionError(f"closed by the server after {self._buffer!r}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\r\n", 1)
        return line

    def reply(self) -> list[bytes]:
        lines = [self._line()]
        while lines[-1][3:4] == b"-":
            lines.append(self._line())
        return lines

    def exchange(self, line: str | bytes) -> list[bytes]:
        self.sock.sendall((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.reply()

    def auth_plain(self, user: str, password: str) -> bytes:
        token = b64(f"\0{user}\0{password}")
        [line] = self.exchange(f"AUTH PLAIN {token}")
        if line.startswith(AUTH_INVALID):
            self.auth_failures += 1
            if self.auth_failures >= MAX_AUTH_FAILURES:
                [self.farewell] = self.reply()
                self.closed = True
        return line

    def auth_token(self, mechanism: str, provider: str, token: str) -> list[bytes]:
        """XOAUTH2 or OAUTHBEARER naming ``provider``; on a refusal the server first sends
        an error challenge (RFC 7628 §3.2.2) that the client acknowledges with ``^A``."""
        if mechanism == "XOAUTH2":
            initial = f"user={provider}\x01auth=Bearer {token}\x01\x01"
        else:
            initial = f"n,a={provider},\x01auth=Bearer {token}\x01\x01"
        [line] = self.exchange(f"AUTH {mechanism} {b64(initial)}")
        if not line.startswith(b"334 "):
            return [line]
        [final] = self.exchange(b64("\x01"))
        return [line, final]

    def send(self, sender: str, recipient: str) -> list[bytes]:
        """One transaction; the first line of each reply, up to the one after the dot."""
        replies = [self.exchange(f"MAIL FROM:<{sender}>")[0]]
        if replies[-1].startswith(MAIL_OK):
            replies.append(self.exchange(f"RCPT TO:<{recipient}>")[0])
        if replies[-1].startswith(RCPT_OK):
            replies.append(self.exchange("DATA")[0])
        if replies[-1].startswith(DATA_GO):
            replies.append(self.exchange(CONTENT + b".")[0])
        return replies

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def code(line: bytes) -> bytes:
    """The reply code and its enhanced status code (RFC 3463) when it has one, as on the
    wire: ``b"535 5.7.8"``, ``b"354"``."""
    parts = line.split(b" ", 2)
    if len(parts) > 1 and re.fullmatch(rb"[245]\.\d{1,3}\.\d{1,3}", parts[1]):
        return b" ".join(parts[:2])
    return parts[0]


def verdict(line: bytes) -> bytes:
    """What a test compares: the code and enhanced code, or the whole line for a 454,
    where only the text tells the throttle's refusal from a provider that is down."""
    return line if line.startswith(b"454 ") else code(line)


def timed(call, *args):
    started = time.monotonic()
    result = call(*args)
    return result, time.monotonic() - started


@dataclass(frozen=True)
class HTTPAnswer:
    """What curl received: the status (protocol and code, as on the wire; the reason
    phrase is only for humans) and the headers a client acts on, as bytes."""

    status: bytes
    challenge: bytes | None   # WWW-Authenticate
    retry_after: bytes | None
    body: dict


@defer.inlineCallbacks
def curl_post(port: int, source: str, user: str, password: str, sender: str,
              recipient: str):
    """One submission with curl from ``source`` (``--interface``), Basic auth."""
    document = json.dumps({"from": sender, "to": [recipient], "data": b64(CONTENT)})
    output, exit_code = yield run_tool(
        "curl", "--silent", "--show-error", "--max-time", str(CLIENT_TIMEOUT),
        "--interface", source, "--include", "--user", f"{user}:{password}",
        "-H", "Content-Type: application/json", "--data-binary", document,
        f"http://127.0.0.1:{port}/")
    if exit_code != 0:
        raise AssertionError(f"curl from {source} failed ({exit_code}): {output}")
    head, _, body = output.encode("utf-8", "surrogateescape").partition(b"\r\n\r\n")
    status_line, *lines = head.split(b"\r\n")
    status = b" ".join(status_line.split(b" ")[:2])
    headers = {}
    for line in lines:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return HTTPAnswer(status, headers.get(b"www-authenticate"), headers.get(b"retry-after"),
                      json.loads(body) if body else {})


UNAUTHORIZED = HTTPAnswer(b"HTTP/1.1 401",
                          b'Basic realm="esmtpfa", charset="UTF-8"', None,
                          {"error": "authentication failed"})
TOO_MANY = HTTPAnswer(b"HTTP/1.1 429", None, b"60",
                      {"error": "too many failed authentications, try again later"})


class LDAPAttackTests(SharedSlapd, unittest.TestCase):
    """50 wrong passwords for ``alice`` through ``corp-ldap`` from 10 addresses."""

    timeout = 40
    maxDiff = None

    @defer.inlineCallbacks
    def relay(self, *args: str):
        fixture = RelayFixture(self.mktemp(), *args,
                               providers=ldap_providers(self.slapd, LDAP, tls=True))
        self.addCleanup(fixture.stop)
        yield fixture.start()
        return fixture

    @defer.inlineCallbacks
    def test_smtp_bob_and_alice_log_in_at_once_after_50_guesses_at_alice(self):
        fixture = yield self.relay()

        def script():
            sessions: dict[str, Session] = {}

            def session(source: str) -> Session:
                """The address's connection; a new one once the server closed it after
                the per-connection limit.  (With this attack no connection gets there:
                after round 1 the answers are refusals, which that limit does not count.)"""
                if source not in sessions or sessions[source].closed:
                    sessions[source] = Session(fixture, source)
                return sessions[source]

            try:
                attacks = []
                for round_ in range(ROUNDS):
                    attacks.append([verdict(session(a).auth_plain(LDAP, f"alice:wrong{round_}"))
                                    for a in ATTACKERS])
                results = {}
                for name, source, password in AFTER_THE_ATTACK:
                    client = Session(fixture, source)
                    sessions[name] = client
                    auth, elapsed = timed(client.auth_plain, LDAP, password)
                    sent = None
                    if auth.startswith(AUTH_OK):
                        user = password.partition(":")[0]
                        sent = [code(line) for line in client.send(
                            f"{user}@example.com", f"{user}-rcpt@example.net")]
                    results[name] = (verdict(auth), elapsed < FIRST_DELAY, sent)
                farewells = [c.farewell for c in sessions.values() if c.farewell]
                return attacks, results, farewells
            finally:
                for client in sessions.values():
                    client.close()

        attacks, results, farewells = yield fixture.run(script)
        self.assertEqual(set(map(code, farewells)) - {b"421 4.7.0"}, set())
        # Round 1: each address's first guess is asked (the 10th makes alice's identity
        # "under attack"); every later guess is refused before slapd is asked.
        self.assertEqual(attacks, [[b"535 5.7.8"] * 10] + [[THROTTLED] * 10] * (ROUNDS - 1))
        self.assertEqual(results, {
            "bob from an attacking address": (b"235 2.7.0", True, DELIVERED),
            "bob from a clean address": (b"235 2.7.0", True, DELIVERED),
            "alice from a clean address": (b"235 2.7.0", True, DELIVERED),
            # docs/login-throttle.md: refused for her identity only, for one window.
            "alice from an attacking address": (THROTTLED, True, None),
        })
        self.assertEqual(
            [(m.mail_from, m.rcpts, m.data.endswith(CONTENT))
             for m in fixture.upstream.messages],
            [("bob@example.com", ["bob-rcpt@example.net"], True)] * 2
            + [("alice@example.com", ["alice-rcpt@example.net"], True)])

    @defer.inlineCallbacks
    def test_http_bob_and_alice_log_in_at_once_after_50_guesses_at_alice(self):
        fixture = yield self.relay("--http")
        port = fixture.http_port
        attacks = []
        for round_ in range(ROUNDS):
            answers = []
            for source in ATTACKERS:
                answers.append((yield curl_post(port, source, LDAP, f"alice:wrong{round_}",
                                                "alice@example.com", "x@example.net")))
            attacks.append(answers)
        # As over SMTP: 10 real refusals, then every attacking address is refused for
        # alice (429, Retry-After) before the directory is asked.
        self.assertEqual(attacks, [[UNAUTHORIZED] * 10] + [[TOO_MANY] * 10] * (ROUNDS - 1))

        results = {}
        for name, source, password in AFTER_THE_ATTACK:
            user = password.partition(":")[0]
            answer = yield curl_post(port, source, LDAP, password, f"{user}@example.com",
                                     f"{user}-rcpt@example.net")
            results[name] = answer if answer.status.startswith(b"HTTP/1.1 4") else (
                answer.status, sorted(answer.body))
        accepted = (b"HTTP/1.1 202", ["id"])
        self.assertEqual(results, {
            "bob from an attacking address": accepted,
            "bob from a clean address": accepted,
            "alice from a clean address": accepted,
            "alice from an attacking address": TOO_MANY,
        })
        self.assertEqual(
            [(m.mail_from, m.rcpts, m.data.endswith(CONTENT))
             for m in fixture.upstream.messages],
            [("bob@example.com", ["bob-rcpt@example.net"], True)] * 2
            + [("alice@example.com", ["alice-rcpt@example.net"], True)])


# -- jwt: tokens name nobody until they verify ------------------------------------------

JWT = "corp-sso"
ISS, AUD = "https://sso.example.test", "esmtpfa"
TOKEN_ATTACKERS = [f"127.0.0.{i}" for i in range(2, 14)]   # 12 addresses
CLEAN_TOKEN_CLIENTS = ("127.0.0.14", "127.0.0.15")


class JWTAttackTests(unittest.TestCase):
    """12 refused tokens (expired; signed by a key not in the JWKS) from 12 addresses,
    then good tokens, over XOAUTH2 and OAUTHBEARER, naming the provider."""

    timeout = 40
    maxDiff = None

    @defer.inlineCallbacks
    def setUp(self):
        self.key = make_key("ES256", kid="sso-1")
        self.forger = make_key("ES256", kid="sso-1")  # the same kid, another key
        self.server = LoopbackHTTPServer({"jwks": JWKSEndpoint([self.key])}).start()
        self.addCleanup(self.server.stop)
        providers = json.dumps({"providers": [{
            "meta": {"name": JWT, "type": "jwt"},
            "params": {"jwks_url": self.server.url("/jwks"), "iss": ISS, "aud": AUD}}]})
        self.fixture = RelayFixture(self.mktemp(), providers=providers)
        self.addCleanup(self.fixture.stop)
        yield self.fixture.start()

    def token(self, key, issued: float, sub: str) -> str:
        return mint(key, standard_claims(issued, iss=ISS, aud=AUD, sub=sub))

    @defer.inlineCallbacks
    def test_smtp_a_good_token_is_accepted_after_12_bad_ones_from_12_addresses(self):
        now = time.time()
        bad = ([self.token(self.key, now - 3600, "ci-bot")] * 6         # expired an hour ago
               + [self.token(self.forger, now, "ci-bot")] * 6)          # wrong signature
        good = self.token(self.key, now, "ci-bot")
        mechanisms = ("XOAUTH2", "OAUTHBEARER")
        fixture = self.fixture

        def script():
            clients = []

            def session(source: str) -> Session:
                clients.append(Session(fixture, source))
                return clients[-1]

            try:
                attacks = []
                for i, (source, token) in enumerate(zip(TOKEN_ATTACKERS, bad, strict=True)):
                    replies = session(source).auth_token(mechanisms[i % 2], JWT, token)
                    challenge = (json.loads(base64.b64decode(replies[0][4:]))
                                 if replies[0].startswith(b"334 ") else None)
                    attacks.append(([verdict(line) for line in replies[-1:]], challenge))
                results = {}
                for mechanism, source in zip(mechanisms, CLEAN_TOKEN_CLIENTS, strict=True):
                    client = session(source)
                    auth, elapsed = timed(client.auth_token, mechanism, JWT, good)
                    sent = None
                    if auth[-1].startswith(AUTH_OK):
                        sent = [code(line) for line in client.send(
                            "ci-bot@example.com", f"{mechanism.lower()}@example.net")]
                    results[mechanism] = ([verdict(line) for line in auth],
                                          elapsed < FIRST_DELAY, sent)
                # An address that sent a bad token has spent 1 of its 30 failures.
                client = session(TOKEN_ATTACKERS[-1])
                results["from an attacking address"] = [
                    verdict(line) for line in client.auth_token("XOAUTH2", JWT, good)]
                return attacks, results
            finally:
                for client in clients:
                    client.close()

        attacks, results = yield fixture.run(script)
        self.assertEqual(results, {
            "XOAUTH2": ([b"235 2.7.0"], True, DELIVERED),
            "OAUTHBEARER": ([b"235 2.7.0"], True, DELIVERED),
            "from an attacking address": [b"235 2.7.0"],
        })
        # Each refused token was asked (none was refused early): an error challenge
        # (RFC 7628 §3.2.2), then 535.
        refused = ([b"535 5.7.8"], {"status": "invalid_token", "schemes": "bearer"})
        self.assertEqual(attacks, [refused] * 12)
        self.assertEqual(
            [(m.mail_from, m.rcpts, m.data.endswith(CONTENT))
             for m in fixture.upstream.messages],
            [("ci-bot@example.com", ["xoauth2@example.net"], True),
             ("ci-bot@example.com", ["oauthbearer@example.net"], True)])
