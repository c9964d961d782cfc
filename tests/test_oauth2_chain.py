"""OAuth2 toward the upstream, end to end (docs/oauth2.md).

The chain is what the issue describes, every hop a real process or server on loopback:

    smtplib → esmtpfa A (twistd) ─XOAUTH2/OAUTHBEARER over verified TLS→ esmtpfa B (twistd,
    ``jwt`` provider) → Postfix's smtp-sink

A gets its tokens from a real token endpoint (``tests.support.tokenserver``: a twisted.web
server that checks the client's secret and signs RS256 access tokens, with its keys at
``/jwks``); B verifies each token against those keys and logs whom it is for (``sub``).
What users notice is asserted: the reply to the final dot, the message at the sink
(once), and the log lines of A and B.
"""

from __future__ import annotations

import json
import smtplib

from twisted.internet import defer, threads
from twisted.trial import unittest

from tests.faults.harness import RunningRelay, message, new_message_id
from tests.faults.test_ordinary import delivered
from tests.support.sink import SmtpSink
from tests.support.tokenserver import ClientRegistration, TokenServer
from tests.support.webclient import get_blocking

SECRET = "client-secret-for-the-chain-7f3a"
MAILBOX = "printer@contoso.example"
PROVIDER = "corp-oauth"


def send(port: int, message_id: str) -> tuple[int, str]:
    """One message through A, as a printer would (its login to A is A's business)."""
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
            client.ehlo("printer.example")
            client.login("alice", "correct horse")
            code, text = client.mail(MAILBOX)
            if code != 250:
                return code, text.decode()
            code, text = client.rcpt("dave@example.net")  # the upstream is asked here
            if code != 250:
                return code, text.decode()
            code, text = client.data(message(message_id, sender=MAILBOX))
            return code, text.decode()
    except smtplib.SMTPResponseException as error:
        return error.smtp_code, error.smtp_error.decode()


class ChainCase(unittest.TestCase):
    timeout = 120
    secret = SECRET
    #: The token server's ``expires_in``.
    lifetime = 3600

    async def start(self, *a_args: str) -> None:
        self.server = TokenServer().start()
        self.addCleanup(self.server.stop)
        self.server.endpoint.lifetime = self.lifetime
        self.server.register(ClientRegistration("printer-app", secret=SECRET,
                                                subject="printer-sp"))
        self.sink = SmtpSink(None)
        self.addCleanup(self.sink.close)
        await self.sink.start()
        self.b = RunningRelay(self.mktemp(), upstream_port=self.sink.port)
        with open(self.b.config, "w") as f:
            f.write(json.dumps({"providers": [{
                "meta": {"name": PROVIDER, "type": "jwt", "fallback": True},
                "params": {"jwks_url": self.server.jwks_url, "iss": self.server.issuer,
                           "aud": self.server.audience}}]}))
        self.addCleanup(self.b.stop)
        await self.b.start()
        self.a = RunningRelay(self.mktemp(), args=[
            "--relay-addr", f"127.0.0.1:{self.b.tls_port}", "--relay-tls",
            "--relay-tls-ca-cert", self.b.ca.cert_path, "--relay-user", MAILBOX,
            "--relay-oauth2-token-url", self.server.token_url,
            "--relay-oauth2-client-id", "printer-app",
            "--relay-oauth2-scope", "https://outlook.office365.com/.default",
            "--relay-connect-timeout", "5", "--relay-timeout", "20", *a_args],
            env={"RELAY_OAUTH2_CLIENT_SECRET": self.secret})
        self.addCleanup(self.a.stop)
        await self.a.start()

    def send(self, label: str, n: int = 0) -> defer.Deferred:
        self.message_id = new_message_id(label, n)
        return threads.deferToThread(send, self.a.smtp_port, self.message_id)

    def assert_delivered_once(self) -> None:
        counts = delivered(self.sink)
        self.assertEqual(counts[self.message_id], 1, counts)

    async def until(self, condition, seconds: float = 20.0):
        from twisted.internet import reactor, task
        for _ in range(int(seconds / 0.1)):
            if condition():
                return
            await task.deferLater(reactor, 0.1, lambda: None)
        raise AssertionError("condition not reached")

    def assert_no_secret_in_logs(self) -> None:
        for log in (self.a.log, self.b.log):
            self.assertNotIn(SECRET, log)
            for token in self.server.issued:
                self.assertNotIn(token, log)


class MechanismTests(ChainCase):
    async def test_xoauth2(self):
        await self.start("--relay-auth-mech", "xoauth2")
        code, text = await self.send("xoauth2")
        self.assertEqual(code, 250, text)
        self.assert_delivered_once()
        self.assertIn(f"AUTH XOAUTH2 ok as {PROVIDER}/printer-sp", self.b.log)
        self.assert_no_secret_in_logs()

    async def test_oauthbearer_is_preferred(self):
        await self.start()
        code, text = await self.send("oauthbearer")
        self.assertEqual(code, 250, text)
        self.assert_delivered_once()
        self.assertIn(f"AUTH OAUTHBEARER ok as {PROVIDER}/printer-sp", self.b.log)
        # a second message: the cached token, no new request
        hits = self.server.hits
        code, text = await self.send("oauthbearer", 1)
        self.assertEqual(code, 250, text)
        self.assertEqual(self.server.hits, hits)
        self.assert_no_secret_in_logs()
        status, metrics = await threads.deferToThread(
            get_blocking, self.a.metrics_port, "/metrics")
        upstream = f'upstream="127.0.0.1:{self.b.tls_port}"'
        self.assertIn(f'esmtpfa_oauth2_token_refreshes_total{{result="ok",{upstream}}} 1.0',
                      metrics)
        expiry = [line for line in metrics.splitlines()
                  if line.startswith("esmtpfa_oauth2_token_expiry_seconds{")]
        self.assertEqual(len(expiry), 1, metrics)
        self.assertGreater(float(expiry[0].rsplit(" ", 1)[1]), 0)

    async def test_check_connect_logs_in_with_a_token(self):
        await self.start()
        import sys

        from twisted.internet import reactor

        from tests.support.processes import PROJECT, Collector, child_environment
        collector = Collector()
        argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                "-n", "--pidfile=", "esmtpfa", "--check-connect",
                *self.a.command_line()]
        reactor.spawnProcess(collector, sys.executable, argv, path=PROJECT,
                             env=child_environment({"RELAY_OAUTH2_CLIENT_SECRET": SECRET}))
        code = await collector.ended.addTimeout(60, reactor)
        output = collector.output.decode()
        self.assertEqual(code, 0, output)
        self.assertIn("AUTH OAUTHBEARER", output)
        self.assertNotIn(SECRET, output)


class RefusedTokenTests(ChainCase):
    async def test_a_revoked_token_is_refreshed_once_and_the_message_goes(self):
        await self.start("--relay-auth-mech", "xoauth2")
        # A fetched a token at startup; the server now signs with a new key, so B (which
        # has not seen any key yet) refuses the old token.
        await self.until(lambda: self.server.hits >= 1)
        self.server.revoke_all()
        code, text = await self.send("revoked")
        self.assertEqual(code, 250, text)
        self.assert_delivered_once()
        self.assertEqual(self.server.hits, 2, "one refresh, not more")
        self.assertIn("OAuth2 token was refused; trying once more with a new one", self.a.log)
        self.assert_no_secret_in_logs()


class HangingRenewalTests(ChainCase):
    """The token endpoint hangs when the token is due for renewal: messages go on with
    the token that is still valid, without waiting for the endpoint.

    A 10-second token is renewed after 8 s (80% of its life); the endpoint then never
    answers, so the broker's request hangs until its 10-second deadline.  A message sent
    in the remaining 2 seconds of the token's life must not wait for that request."""

    lifetime = 10

    async def test_a_hanging_renewal_holds_no_message(self):
        import time
        await self.start()
        await self.until(lambda: self.server.hits >= 1)
        self.server.endpoint.hang = True
        await self.until(lambda: self.server.hits >= 2)  # the renewal, now hanging
        started = time.monotonic()
        code, text = await self.send("hanging-renewal")
        elapsed = time.monotonic() - started
        self.assertEqual(code, 250, text)
        self.assertLess(elapsed, 1.5, "the message waited for the token endpoint")
        self.assert_delivered_once()
        self.assertEqual(self.server.hits, 2)


class EndpointDownTests(ChainCase):
    async def test_no_token_means_451_and_the_message_goes_later(self):
        await self.start()
        await self.server.stop()
        code, text = await self.send("down")
        self.assertEqual(code, 451, text)
        self.assertIn("4.7.0", text)
        self.assertEqual(delivered(self.sink)[self.message_id], 0)
        self.server.start()  # the endpoint is back: the client's retry goes through
        for _ in range(30):  # the broker holds a failure for a few seconds
            code, text = await self.send("down")
            if code == 250:
                break
            from twisted.internet import reactor, task
            await task.deferLater(reactor, 1.0, lambda: None)
        self.assertEqual(code, 250, text)
        self.assert_delivered_once()


class WrongSecretTests(ChainCase):
    secret = "not-the-secret"

    async def test_a_wrong_client_secret_is_451_with_a_clear_log_line(self):
        await self.start()
        code, text = await self.send("wrong-secret")
        self.assertEqual(code, 451, text)
        self.assertIn("4.7.0", text)
        self.assertIn("invalid_client", self.a.log)
        self.assertNotIn("not-the-secret", self.a.log)
        self.assertEqual(delivered(self.sink)[self.message_id], 0)
        status, body = await threads.deferToThread(get_blocking, self.a.metrics_port, "/readyz")
        self.assertEqual(status, 503, body)
        [detail] = [check["detail"] for check in json.loads(body)["checks"].values()
                    if "invalid_client" in check["detail"]]
        # The upstream is named once, in front of the broker's reason.
        self.assertEqual(detail.count(f"127.0.0.1:{self.b.tls_port}"), 1, detail)
        self.assertTrue(detail.startswith(f"127.0.0.1:{self.b.tls_port}: token endpoint "
                                          "answered HTTP 401"), detail)
