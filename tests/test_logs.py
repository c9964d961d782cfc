"""Structured logs: ``--log-format json`` and ``--log-level`` for every
module.

The end-to-end case runs a real ``twistd esmtpfa --log-format json`` relaying to a real
upstream on loopback and reads its log as an operator's log shipper would: every line
must be one JSON object, the relayed message's line must carry the fields a dashboard
filters on, and neither a password nor a token sent in a login may appear anywhere.
"""

from __future__ import annotations

import base64
import io
import json
import smtplib

from twisted.internet import threads
from twisted.logger import Logger, formatEvent
from twisted.trial import unittest

from esmtpfa.auth.credentials import UserPassword
from esmtpfa.auth.errors import REASONS, UnauthorizedLogin
from esmtpfa.auth.provider import ProviderMeta
from esmtpfa.common import logs
from esmtpfa.common.context import ConnectionContext
from esmtpfa.common.jsonlog import JSONLinesObserver
from esmtpfa.providers.http_basic import HTTPBasicProvider
from esmtpfa.providers.ldap import LDAPProvider
from tests.faults.harness import CLIENT, RunningRelay, message, new_message_id, send_fresh
from tests.support.httpservers import AuthEndpoint, LoopbackHTTPServer
from tests.support.logcapture import observe_logs
from tests.support.resources import resources
from tests.support.slapd import PEOPLE, SERVICE_DN, SERVICE_PW, SlapdServer
from tests.support.upstream import RecordingUpstream

PASSWORD = "SECRET-pw-9f3b"
TOKEN = "SECRET-token-c71e.eyJzdWIiOiJ4In0.sig"
CONTEXT = ConnectionContext("urn:uuid:00000000-0000-0000-0000-0000000000c7", "smtp")


def restore_level(case: unittest.TestCase) -> None:
    threshold = logs._threshold
    case.addCleanup(setattr, logs, "_threshold", threshold)


class JSONObserverTests(unittest.TestCase):
    """The observer alone: one parseable line per event, the fields as keys."""

    def write(self, **fields) -> dict:
        out = io.StringIO()
        log = Logger(namespace="esmtpfa.test", observer=JSONLinesObserver(out))
        log.info("message {message_id} for {identity}", **fields)
        text = out.getvalue()
        self.assertEqual(text.count("\n"), 1)
        self.assertTrue(text.endswith("\n"))
        return json.loads(text)

    def test_fields_become_keys(self):
        line = self.write(message_id="urn:uuid:1", identity="corp-ldap/alice", size=1234,
                          sender="a@example.com", count=2, duration=0.25,
                          upstream="127.0.0.1:2525", upstream_reply="250 2.0.0 ok")
        self.assertEqual(line["level"], "info")
        self.assertEqual(line["namespace"], "esmtpfa.test")
        self.assertEqual(line["event"], "message urn:uuid:1 for corp-ldap/alice")
        self.assertRegex(line["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
        self.assertEqual(line["identity"], {"provider": "corp-ldap", "user": "alice"})
        self.assertEqual((line["size"], line["count"], line["duration"]), (1234, 2, 0.25))
        self.assertEqual(line["upstream"], "127.0.0.1:2525")
        self.assertNotIn("log_format", line)

    def test_newlines_and_odd_values_stay_on_one_line(self):
        line = self.write(message_id="a\nb\r\n{}\"", identity=object(), size=b"\xff\n")
        self.assertEqual(line["message_id"], "a\nb\r\n{}\"")
        self.assertIn("object", line["identity"])

    def test_fields_named_like_credentials_are_left_out(self):
        line = self.write(message_id="m", identity="p/u", password=PASSWORD,
                          bind_pass=PASSWORD, token=TOKEN, params={"client_secret": TOKEN})
        text = json.dumps(line)
        self.assertNotIn(PASSWORD, text)
        self.assertNotIn("SECRET-token", text)


class ProviderLevelTests(unittest.TestCase):
    """``--log-level`` holds for providers too: a provider's debug line (here an HTTP
    provider's "endpoint answered 401: rejected") is not logged at info."""

    timeout = 20

    def setUp(self):
        restore_level(self)
        self.server = LoopbackHTTPServer(
            {"auth": AuthEndpoint(expect_basic=("alice", "right"), expect_header=None)}).start()
        self.addCleanup(self.server.stop)
        self.provider = HTTPBasicProvider.from_params(
            ProviderMeta(name="idp-basic", type="http_basic"),
            {"url": self.server.url("/auth")}, resources=resources())
        self.addCleanup(self.provider.stopProvider)
        self.events = observe_logs(self)

    async def rejected_login_lines(self) -> list[str]:
        del self.events[:]
        with self.assertRaises(UnauthorizedLogin):
            await self.provider.requestAvatarId(UserPassword("alice", "wrong", CONTEXT))
        return [formatEvent(e) for e in self.events
                if e.get("log_namespace", "").startswith("esmtpfa.providers")]

    async def test_debug_line_only_at_debug(self):
        logs.set_level("info")
        self.assertEqual(await self.rejected_login_lines(), [])
        logs.set_level("debug")
        lines = await self.rejected_login_lines()
        self.assertTrue(any("rejected" in line for line in lines), lines)


class LDAPLevelTests(unittest.TestCase):
    """The LDAP provider's per-login lines name the user's DN: debug only."""

    timeout = 30

    def setUp(self):
        restore_level(self)
        self.slapd = SlapdServer().start()
        self.addCleanup(self.slapd.stop)
        self.provider = LDAPProvider.from_params(
            ProviderMeta(name="corp-ldap", type="ldap"),
            {"server": "127.0.0.1", "port": self.slapd.port, "bind_user": SERVICE_DN,
             "bind_pass": SERVICE_PW, "base_dn": PEOPLE, "timeout": 3,
             "filter_string": "(&(objectClass=inetOrgPerson)(uid=%s))"}, resources=resources())
        self.addCleanup(self.provider.stopProvider)
        self.events = observe_logs(self)

    async def login_lines(self) -> str:
        del self.events[:]
        await self.provider.requestAvatarId(UserPassword("alice", "alice-pw", CONTEXT))
        return "\n".join(formatEvent(e) for e in self.events)

    async def test_dn_only_at_debug(self):
        logs.set_level("info")
        self.assertNotIn(PEOPLE, await self.login_lines())
        logs.set_level("debug")
        self.assertIn(f"uid=alice,{PEOPLE}", await self.login_lines())


class TwistdJSONLogTests(unittest.TestCase):
    """A real ``twistd esmtpfa --log-format json``: what an operator's shipper reads."""

    timeout = 90

    async def test_relayed_message_line_and_no_secret(self):
        upstream = RecordingUpstream().start()
        self.addCleanup(upstream.stop)
        relay = RunningRelay(self.mktemp(), upstream_port=upstream.port,
                             args=["--log-format", "json", "--log-level", "debug"])
        self.addCleanup(relay.stop)
        await relay.start()

        message_id = new_message_id("jsonlog", 1)
        code, text = await threads.deferToThread(
            send_fresh, relay.smtp_port, message_id, message(message_id))
        self.assertEqual(code, 250, text)
        await threads.deferToThread(self.failed_logins, relay.smtp_port)
        await relay.stop()

        lines = [line for line in relay.log.splitlines() if line.strip()]
        records = []
        for line in lines:
            try:
                records.append(json.loads(line))
            except ValueError:
                self.fail(f"not a JSON line: {line!r}\n{relay.log}")
        for record in records:
            self.assertTrue({"time", "level", "event"} <= record.keys(), record)

        [relayed] = [r for r in records if "relayed for" in r["event"]]
        self.assertRegex(relayed["connection_id"], r"^urn:uuid:[0-9a-f-]{36}$")
        self.assertRegex(relayed["message_id"], r"^urn:uuid:[0-9a-f-]{36}$")
        self.assertEqual(relayed["identity"], {"provider": CLIENT[0], "user": "carol"})
        self.assertEqual(relayed["sender"], "carol@example.com")
        self.assertEqual(relayed["count"], 1)
        self.assertGreater(relayed["size"], len(message(message_id)))
        self.assertEqual(relayed["upstream"], f"127.0.0.1:{upstream.port}")
        self.assertTrue(relayed["upstream_reply"].startswith("250"), relayed)
        self.assertIsInstance(relayed["duration"], float)
        self.assertEqual(relayed["level"], "info")

        self.assertNotIn(PASSWORD, relay.log)
        self.assertNotIn("SECRET-token", relay.log)
        self.assertNotIn(base64.b64encode(PASSWORD.encode()).decode(), relay.log)
        self.assertNotIn("lab secret", relay.log)  # the successful login's password
        self.assertTrue(any("fail" in r["event"].lower() or "refus" in r["event"].lower()
                            for r in records), "the failed logins left no line")
        # One failed-login record each, with the fields fail2ban and a dashboard key on.
        failed = [r for r in records if "login failed:" in r["event"]]
        self.assertEqual([(r["level"], r["client"], r["protocol"], r["mechanism"])
                          for r in failed], [("warn", "127.0.0.1", "smtp", "PLAIN"),
                                             ("warn", "127.0.0.1", "smtp", "XOAUTH2")])
        self.assertTrue(all(r["reason"] in REASONS for r in failed), failed)

    @staticmethod
    def failed_logins(port: int) -> None:
        """A wrong password (PLAIN) and a bearer token (XOAUTH2) nobody accepts."""
        client = smtplib.SMTP("127.0.0.1", port, timeout=30)
        try:
            client.ehlo("client.test")
            plain = base64.b64encode(f"\0carol\0{PASSWORD}".encode()).decode()
            code, _ = client.docmd("AUTH", f"PLAIN {plain}")
            assert code == 535, code
            xoauth = base64.b64encode(
                f"user=carol\x01auth=Bearer {TOKEN}\x01\x01".encode()).decode()
            code, _ = client.docmd("AUTH", f"XOAUTH2 {xoauth}")
            assert code in (334, 535, 504), code
        finally:
            client.close()
