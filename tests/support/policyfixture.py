"""Whole SMTP sessions against a running relay whose providers carry a ``policy`` block
(docs/policy.md): the fixture the sender-authorization, device and rate tests share.

A test class mixes in ``SessionMixin`` (or ``JWTFixture``, which adds a real JWKS
endpoint and tokens for it), says which providers the relay loads, and asserts on the
replies a client sees, byte for byte, and on what reached the upstream.
"""

from __future__ import annotations

import json
import time

from twisted.internet import defer, threads

from tests.support.httpservers import (
    JWKSEndpoint,
    LoopbackHTTPServer,
    make_key,
    mint,
    standard_claims,
)
from tests.support.logcapture import capture_logs
from tests.support.relayfixture import RelayFixture

NS = "esmtpfa"


def wire(client, line: str) -> bytes:
    """Send a command; the reply's first line exactly as the server wrote it."""
    client.send(line.encode() + b"\r\n")
    return client._line()


def transaction(client, sender: str, content: bytes,
                recipient: str = "friend@example.net") -> list[bytes]:
    """MAIL, RCPT, DATA and ``content``: each reply, stopping after a refused MAIL."""
    replies = [wire(client, f"MAIL FROM:<{sender}>")]
    if not replies[0].startswith(b"250"):
        return replies
    replies.append(wire(client, f"RCPT TO:<{recipient}>"))
    replies.append(wire(client, "DATA"))
    client.send(content + b".\r\n")
    replies.append(client._line())
    return replies


class SessionMixin:
    """A relay (``RelayFixture``) loading ``providers()``, every log event captured."""

    timeout = 60
    fixture_args: tuple = ()

    def providers(self) -> str:
        raise NotImplementedError

    @defer.inlineCallbacks
    def start_relay(self):
        self.events = capture_logs(self)
        self.fixture = RelayFixture(self.mktemp(), *self.fixture_args,
                                    providers=self.providers())
        self.addCleanup(self.fixture.stop)
        yield self.fixture.start()

    def session(self, user: str, password: str, *transactions):
        """Log in, run ``(sender, content)`` transactions; each one's replies."""
        def script():
            client = self.fixture.secure_session()
            try:
                code, text = client.auth_plain(user, password)
                assert code == 235, (code, text)
                return [transaction(client, sender, content)
                        for sender, content in transactions]
            finally:
                client.close()
        return threads.deferToThread(script)

    def delivered(self) -> list[tuple[str, bytes]]:
        return [(m.mail_from, m.data) for m in self.fixture.upstream.messages]

    def rejections(self, provider: str, reason: str) -> float:
        return self.fixture.service.metrics.registry.get_sample_value(
            f"{NS}_policy_rejections_total", {"provider": provider, "reason": reason}) or 0


class JWTFixture(SessionMixin):
    """A jwt provider ``idp`` on a real JWKS endpoint; ``token`` mints for it.

    The issuer and audience are said once, here: ``jwt_providers`` configures the
    provider with the same ones ``token`` signs, so a refusal a test sees comes from the
    policy under test and never from a mismatched claim.
    """

    ISSUER, AUDIENCE = "https://sso.test", "smtp-relay"

    @defer.inlineCallbacks
    def setUp(self):
        self.key = make_key("ES256", kid="signing-1")
        self.server = LoopbackHTTPServer({"jwks": JWKSEndpoint([self.key])})
        yield defer.maybeDeferred(self.server.start)
        self.addCleanup(self.server.stop)
        yield self.start_relay()

    def jwt_providers(self, policy: dict) -> str:
        """The provider document: ``idp`` alone, with ``policy``."""
        return json.dumps({"providers": [{
            "meta": {"name": "idp", "type": "jwt"},
            "params": {"jwks_url": self.server.url("/jwks"), "iss": self.ISSUER,
                       "aud": self.AUDIENCE},
            "policy": policy}]})

    def token(self, sub: str, **claims) -> str:
        return mint(self.key, standard_claims(time.time(), iss=self.ISSUER,
                                              aud=self.AUDIENCE, sub=sub, **claims))


__all__ = ["NS", "JWTFixture", "SessionMixin", "transaction", "wire"]
