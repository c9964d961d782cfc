"""Sending rates per identity over SMTP and HTTP.

The windows themselves are tested with a ``Clock`` in ``test_ratelimit``; here the relay
runs for real (in-process, and once as ``twistd``) and what the client hears is asserted
at the byte level, with what reached the upstream.
"""

from __future__ import annotations

import base64

import ldap3
from twisted.internet import defer, threads
from twisted.trial import unittest

from esmtpfa.auth.policy import parse_policy
from esmtpfa.auth.sendingrates import Limit, Rates
from esmtpfa.common.errors import ConfigError
from tests.faults.harness import RunningRelay, message, new_message_id, send_fresh
from tests.support.builders import OFFICE, providers_document, submission, userpass_provider
from tests.support.misbehaving import MisbehavingUpstream
from tests.support.policyfixture import JWTFixture, SessionMixin
from tests.support.relayfixture import PASSWORD, USER, RelayFixture
from tests.support.slapd import PEOPLE, ROOT_DN, ROOT_PW, SharedSlapd, ldap_providers
from tests.support.upstream import RecordingUpstream
from tests.support.webclient import post_json

CONTENT = b"Subject: rates\r\n\r\nHello.\r\n"

#: Two providers: `office` (fallback, no rate of its own: the relay's defaults) and
#: `bulk`, whose policy allows more.
PROVIDERS = providers_document(OFFICE, userpass_provider(
    "bulk", "robot", "robot secret",
    policy="  policy:\n    rate: {messages: 5/1m, recipients: 10/1m}\n"))


class PolicyRateTests(unittest.TestCase):
    def test_rate_keys_parse_and_typos_are_load_errors(self):
        policy = parse_policy({"rate": {"messages": "100/1h", "recipients": "1000/1d"}},
                              "userpass")
        self.assertEqual(policy.rate, Rates(Limit(100, 3600.0), Limit(1000, 86400.0)))
        self.assertEqual(parse_policy({"rate_attribute": "mailRate"}, "ldap").rate_source,
                         "mailRate")
        self.assertEqual(parse_policy({"rate_claim": "mail_rate"}, "jwt").identity_attributes,
                         ("mail_rate",))
        for block, provider_type in (({"rate": {"messages": "lots"}}, "userpass"),
                                     ({"rate": {"mesages": "5/1m"}}, "userpass"),
                                     ({"rate_claim": "x"}, "ldap"),
                                     ({"rate_attribute": "x"}, "jwt")):
            self.assertRaises(ConfigError, parse_policy, block, provider_type)

    def test_identity_value_over_provider_over_default(self):
        default = Rates(Limit(10, 60.0), Limit(100, 60.0))
        policy = parse_policy({"rate": {"messages": "20/1m"}, "rate_claim": "mail_rate"}, "jwt")
        self.assertEqual(policy.rates_for((), default), Rates(Limit(20, 60.0), Limit(100, 60.0)))
        self.assertEqual(policy.rates_for(("messages=500/1h",), default),
                         Rates(Limit(500, 3600.0), Limit(100, 60.0)))
        # An IdP typo neither stops mail nor lifts the limit: the provider's rate holds.
        self.assertEqual(policy.rates_for(("five hundred",), default),
                         Rates(Limit(20, 60.0), Limit(100, 60.0)))


class SMTPRateTests(unittest.TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        self.upstream = RecordingUpstream()
        self.fixture = RelayFixture(self.mktemp(), "--http", "--rate-messages", "3/1m",
                                    "--rate-recipients", "4/1m", providers=PROVIDERS,
                                    upstream=self.upstream)
        self.addCleanup(self.fixture.stop)
        yield self.fixture.start()

    def session(self, user: str = USER, password: str = PASSWORD):
        client = self.fixture.secure_session()
        assert client.auth_plain(user, password)[0] == 235
        return client

    def test_fourth_message_in_a_minute_is_451_and_never_relayed(self):
        def script():
            client = self.session()
            replies = [client.send_message(CONTENT, "alice@example.com",
                                           ["bob@example.net"])[0] for _ in range(3)]
            client.send(b"MAIL FROM:<alice@example.com>\r\n")
            refusal = client._line()
            client.close()
            return replies, refusal

        def check(result):
            replies, refusal = result
            self.assertEqual(replies, [250, 250, 250])
            self.assertEqual(refusal, b"451 4.7.1 Message rate limit of this login "
                                      b"reached (3/1m), try again later")
            self.assertEqual(len(self.upstream.messages), 3)
        return self.fixture.run(script).addCallback(check)

    def test_recipient_budget_is_452_per_recipient(self):
        def script():
            client = self.session()
            client.command("MAIL FROM:<alice@example.com>")
            codes = [client.command(f"RCPT TO:<r{n}@example.net>")[0] for n in range(4)]
            client.send(b"RCPT TO:<r4@example.net>\r\n")
            refusal = client._line()
            final = client.command("DATA")[0], None
            client.send(CONTENT + b".\r\n")
            final = final[0], client.reply()[0]
            client.close()
            return codes, refusal, final

        def check(result):
            codes, refusal, final = result
            self.assertEqual(codes, [250] * 4)
            self.assertEqual(refusal, b"452 4.5.3 Recipient rate limit of this login "
                                      b"reached (4/1m), try again later")
            self.assertEqual(final, (354, 250))  # the four accepted ones are sent
            [relayed] = self.upstream.messages
            self.assertEqual(len(relayed.rcpts), 4)
        return self.fixture.run(script).addCallback(check)

    def test_a_provider_rate_and_other_identities_are_apart(self):
        """`bulk` has 5/1m of its own; alice's budget is not bob's, nor robot's."""
        def script():
            alice = self.session()
            for _ in range(3):
                alice.send_message(CONTENT, "alice@example.com", ["bob@example.net"])
            robot = self.session("bulk", "robot:robot secret")
            codes = [robot.send_message(CONTENT, "robot@example.com",
                                        ["bob@example.net"])[0] for _ in range(5)]
            robot.send(b"MAIL FROM:<robot@example.com>\r\n")
            refusal = robot._line()[:9]
            alice.close()
            robot.close()
            return codes, refusal
        return self.fixture.run(script).addCallback(
            self.assertEqual, ([250] * 5, b"451 4.7.1"))

    @defer.inlineCallbacks
    def test_http_gets_429_with_retry_after(self):
        document = {"from": "alice@example.com", "to": ["bob@example.net"],
                    "data": base64.b64encode(CONTENT).decode()}
        url = f"http://127.0.0.1:{self.fixture.http_port}/"
        codes = []
        for _ in range(3):
            response = yield post_json(url, document, auth=(USER, PASSWORD))
            codes.append(response.code)
        response = yield post_json(url, document, auth=(USER, PASSWORD))
        self.assertEqual(codes, [202, 202, 202])
        self.assertEqual(response.code, 429, response.body)
        self.assertEqual(response.json()["reply"]["code"], 451)
        self.assertTrue(1 <= int(response.header("retry-after")) <= 120)
        self.assertEqual(len(self.upstream.messages), 3)


class RejectedMessagesDoNotCountTests(unittest.TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def test_a_message_the_upstream_refused_costs_nothing(self):
        upstream = RecordingUpstream(
            rcpt_replies={"nobody@example.net": "550 5.1.1 No such user here"})
        fixture = RelayFixture(self.mktemp(), "--rate-messages", "2/1m", upstream=upstream)
        self.addCleanup(fixture.stop)
        yield fixture.start()

        def script():
            client = fixture.secure_session()
            client.auth_plain(USER, PASSWORD)
            client.command("MAIL FROM:<alice@example.com>")
            refused = client.command("RCPT TO:<nobody@example.net>")[0]
            client.command("RSET")
            sent = [client.send_message(CONTENT, "alice@example.com",
                                        ["bob@example.net"])[0] for _ in range(2)]
            client.close()
            return refused, sent
        result = yield fixture.run(script)
        self.assertEqual(result, (550, [250, 250]))


class RunningRelayRateTests(unittest.TestCase):
    """The end-to-end check the issue asks for: a real `twistd` at 3 per minute."""

    timeout = 60

    async def test_three_per_minute_through_twistd(self):
        upstream = MisbehavingUpstream().start()
        self.addCleanup(upstream.stop)
        relay = RunningRelay(self.mktemp(), upstream_port=upstream.port,
                             args=["--rate-messages", "3/1m"])
        self.addCleanup(relay.stop)
        await relay.start()
        ids = [new_message_id("rate", n) for n in range(4)]
        replies = []
        for message_id in ids:
            replies.append(await threads.deferToThread(
                send_fresh, relay.smtp_port, message_id, message(message_id)))
        self.assertEqual([code for code, _ in replies], [250, 250, 250, 451])
        self.assertIn("4.7.1 Message rate limit", replies[3][1])
        self.assertEqual([upstream.accepted(i) for i in ids], [1, 1, 1, 0])


class IdentityRateTests(JWTFixture, unittest.TestCase):
    """Item 5: a JWT claim gives one identity its own rate (an IdP admin's lever),
    over the provider's own (1 per minute here)."""

    def providers(self):
        return self.jwt_providers({"rate": {"messages": "1/1m"}, "rate_claim": "mail_rate"})

    @defer.inlineCallbacks
    def test_a_claim_raises_one_identity_s_rate(self):
        sent = [("svc@example.com", submission("svc@example.com"))] * 3
        big = yield self.session("idp", self.token("svc-big", mail_rate="messages=2/1m"),
                                 *sent)
        small = yield self.session("idp", self.token("svc-small"), *sent)
        typo = yield self.session("idp", self.token("svc-typo", mail_rate="lots"), *sent)
        self.assertEqual([r[-1][:9] for r in big],
                         [b"250 2.0.0", b"250 2.0.0", b"451 4.7.1"])
        self.assertEqual([r[-1][:9] for r in small],
                         [b"250 2.0.0", b"451 4.7.1", b"451 4.7.1"])
        self.assertEqual([r[-1][:9] for r in typo],
                         [b"250 2.0.0", b"451 4.7.1", b"451 4.7.1"])
        self.assertEqual(len(self.delivered()), 4)
        self.assertEqual(self.fixture.service.metrics.registry.get_sample_value(
            "esmtpfa_rate_limited_total", {"provider": "idp", "kind": "messages"}), 5)



class LDAPRateTests(SharedSlapd, SessionMixin, unittest.TestCase):
    """Item 5 with a real slapd: ``rate_attribute`` gives one user its own rate."""

    def providers(self):
        return ldap_providers(self.slapd, "corp-ldap", policy={
            "rate": {"messages": "1/1m"}, "rate_attribute": "description"})

    @defer.inlineCallbacks
    def setUp(self):
        yield defer.maybeDeferred(super().setUp)
        yield threads.deferToThread(self.add_user)
        yield self.start_relay()

    def add_user(self):
        server = ldap3.Server("127.0.0.1", port=self.slapd.port)
        with ldap3.Connection(server, ROOT_DN, ROOT_PW, auto_bind=True) as conn:
            conn.add(f"uid=batch,{PEOPLE}", ["inetOrgPerson"], {
                "uid": "batch", "cn": "batch", "sn": "batch", "userPassword": "batch-pw",
                "description": "messages=2/1m"})

    @defer.inlineCallbacks
    def test_an_attribute_raises_one_user_s_rate(self):
        sent = [("x@example.com", submission("x@example.com"))] * 3
        batch = yield self.session("corp-ldap", "batch:batch-pw", *sent)
        alice = yield self.session("corp-ldap", "alice:alice-pw", *sent)
        self.assertEqual([r[-1][:9] for r in batch],
                         [b"250 2.0.0", b"250 2.0.0", b"451 4.7.1"])
        self.assertEqual([r[-1][:9] for r in alice],
                         [b"250 2.0.0", b"451 4.7.1", b"451 4.7.1"])
        self.assertEqual(len(self.delivered()), 3)
