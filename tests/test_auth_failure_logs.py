"""A failed login an operator can act on, and a log that answers "did mail to X leave?".

The end-to-end cases run a real ``twistd esmtpfa`` (text and JSON log formats), log in
over SMTP with ``smtplib`` and over the HTTP API from several loopback addresses, then
hand the log to the real ``fail2ban-regex`` with ``deploy/fail2ban/filter.d/esmtpfa.conf``:
it must find exactly the failed logins, with their client addresses, and nothing else.
The same runs check the message line's recipients (plain, and hashed with the documented
``openssl`` command) and the TLS protocol and cipher on the session's last line.

The in-process cases check what each part can tell: the reason a provider gives (its
``kind``), whom the login claimed to be, and the session id on every provider line.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import smtplib
import ssl

from twisted.internet import threads
from twisted.logger import formatEvent
from twisted.python import usage
from twisted.trial import unittest

from esmtpfa.auth.credentials import BearerToken, SubmissionCredentials, UserPassword
from esmtpfa.auth.errors import (
    BAD_PASSWORD,
    MALFORMED,
    POLICY,
    REASONS,
    THROTTLED,
    UNKNOWN_USER,
    LoginRefused,
    ProviderUnavailable,
    reason_of,
)
from esmtpfa.auth.provider import ProviderMeta
from esmtpfa.auth.selection import Identity, ProviderDirectory, ProviderSelector, ProviderSet
from esmtpfa.common import logs
from esmtpfa.common.context import ConnectionContext
from esmtpfa.common.jsonlog import record
from esmtpfa.common.logs import RecipientLog
from esmtpfa.common.replies import Reply
from esmtpfa.delivery.transaction import MAIL_FROM, DeliveryPolicy, RelayDelivery
from esmtpfa.limits.throttle import LoginThrottled
from esmtpfa.providers.http_basic import HTTPBasicProvider
from esmtpfa.providers.jwt import JWTProvider
from esmtpfa.providers.ldap import LDAPProvider
from esmtpfa.providers.userpass import UserPassProvider
from esmtpfa.runtime.options import Options
from tests.faults.harness import RunningRelay
from tests.support.builders import OFFICE_AND_LAB
from tests.support.httpservers import AuthEndpoint, LoopbackHTTPServer
from tests.support.logcapture import capture_logs
from tests.support.processes import PROJECT, run_tool
from tests.support.resources import resources
from tests.support.slapd import PEOPLE, SERVICE_DN, SERVICE_PW, SlapdServer
from tests.support.upstream import RecordingUpstream

FILTER = os.path.join(PROJECT, "deploy", "fail2ban", "filter.d", "esmtpfa.conf")
SESSION = "urn:uuid:00000000-0000-0000-0000-0000000000f1"
CONTEXT = ConnectionContext(SESSION, "smtp", peer_host="192.0.2.7")
WRONG = "Wrong-pw-7d1c"  # never in a log
HASH_KEY = "log-hash-key-for-tests"


def userpass(name: str, user: str, password: str, **meta) -> UserPassProvider:
    return UserPassProvider(ProviderMeta(name=name, type="userpass", **meta), user, password)


def offer(user: str, secret: str, context: ConnectionContext = CONTEXT):
    return SubmissionCredentials(user, secret, context)


# -- in process: the reason and the identity -------------------------------------------

class ReasonTests(unittest.TestCase):
    """Provider selection over real userpass providers: why a login failed, and whom it
    was for, as values on the error (never parsed from a class name)."""

    def setUp(self):
        self.selector = ProviderSelector(ProviderDirectory(ProviderSet([
            userpass("lab", "carol", "lab secret"),
            userpass("office", "alice", "correct horse", fallback=True),
            userpass("branch", "bob", "bob pw", fallback=True),
            userpass("annex", "dave", "dave pw", domain="annex.example"),
        ])))

    def refusal(self, user: str, secret: str, context=CONTEXT) -> LoginRefused:
        failure = self.failureResultOf(self.selector.requestAvatarId(
            offer(user, secret, context)), LoginRefused)
        return failure.value

    def test_wrong_password_of_a_named_provider(self):
        refusal = self.refusal("lab", f"carol:{WRONG}")
        self.assertEqual(refusal.kind, BAD_PASSWORD)
        self.assertEqual(str(refusal.attempted), "lab/carol")

    def test_unknown_user_from_the_password_field_is_not_named(self):
        """It may be a password put in the wrong place: no provider knows it."""
        refusal = self.refusal("lab", f"{WRONG}:x")
        self.assertEqual(refusal.kind, UNKNOWN_USER)
        self.assertEqual(str(refusal.attempted), "lab/<user from the password field>")
        self.assertIsNone(refusal.attempted.username)

    def test_no_colon_for_a_named_provider_is_malformed(self):
        refusal = self.refusal("lab", WRONG)
        self.assertEqual(refusal.kind, MALFORMED)
        self.assertNotIn(WRONG, str(refusal.attempted))

    def test_fallbacks_report_the_one_that_knows_the_user(self):
        refusal = self.refusal("alice", WRONG)
        self.assertEqual(refusal.kind, BAD_PASSWORD)
        self.assertEqual(str(refusal.attempted), "office/alice")
        refusal = self.refusal("nobody", WRONG)
        self.assertEqual(refusal.kind, UNKNOWN_USER)
        self.assertEqual(str(refusal.attempted), "office/nobody")

    def test_provider_of_another_domain_is_policy(self):
        refusal = self.refusal("annex", "dave:dave pw")
        self.assertEqual(refusal.kind, POLICY)

    def test_typed_user_is_escaped_for_one_line(self):
        refusal = self.refusal('eve "x"\nclient=1.2.3.4', WRONG)
        text = str(refusal.attempted)
        self.assertNotIn(" ", text)
        self.assertNotIn("\n", text)
        self.assertNotIn('"', text)

    def test_every_failure_has_a_reason_from_the_vocabulary(self):
        self.assertEqual(reason_of(ProviderUnavailable("down")), "backend-unavailable")
        self.assertEqual(reason_of(LoginThrottled("too many")), THROTTLED)
        self.assertEqual(reason_of(ValueError("a bug")), "backend-unavailable")
        self.assertEqual(reason_of(LoginRefused("no-such-kind")), "rejected")
        for kind in REASONS:
            self.assertEqual(reason_of(LoginRefused(kind)), kind)

    def test_the_user_typed_in_a_token_login_is_named(self):
        context = CONTEXT
        credentials = SubmissionCredentials("carol", "not-a-jwt", context, bearer=True)
        failure = self.failureResultOf(self.selector.requestAvatarId(credentials),
                                       LoginRefused)
        self.assertEqual(failure.value.attempted.username, "carol")


# -- in process: the session id on every provider line ---------------------------------

class ProviderSessionTests(unittest.TestCase):
    """Each provider's lines about a login carry its session id (from the credentials'
    context, passed in with them), and its refusal carries a kind."""

    timeout = 30

    def setUp(self):
        self.events = capture_logs(self)

    def provider_lines(self) -> list[str]:
        return [formatEvent(e) for e in self.events
                if e.get("log_namespace", "").startswith("esmtpfa.providers")]

    def assert_session_on_every_line(self) -> None:
        lines = self.provider_lines()
        self.assertTrue(lines, "the provider logged nothing")
        for line in lines:
            self.assertIn(SESSION, line)
            self.assertNotIn(WRONG, line)

    def test_userpass(self):
        provider = userpass("lab", "carol", "lab secret")
        failure = self.failureResultOf(provider.requestAvatarId(
            UserPassword("carol", WRONG, CONTEXT)), LoginRefused)
        self.assertEqual(failure.value.kind, BAD_PASSWORD)
        failure = self.failureResultOf(provider.requestAvatarId(
            UserPassword("mallory", WRONG, CONTEXT)), LoginRefused)
        self.assertEqual(failure.value.kind, UNKNOWN_USER)
        self.assert_session_on_every_line()

    def test_jwt(self):
        provider = JWTProvider.from_params(
            ProviderMeta(name="sso", type="jwt"),
            {"jwks_url": "http://127.0.0.1:9/jwks", "iss": "https://idp.test"},
            resources=resources())
        self.addCleanup(provider.stopProvider)
        del self.events[:]  # the lines about its configuration are no login's
        failure = self.failureResultOf(provider.requestAvatarId(
            BearerToken("not.a-jwt", CONTEXT)), LoginRefused)
        self.assertEqual(failure.value.kind, MALFORMED)
        self.assert_session_on_every_line()

    async def test_http_check(self):
        server = LoopbackHTTPServer(
            {"auth": AuthEndpoint(expect_basic=("alice", "right"), expect_header=None)}
        ).start()
        self.addCleanup(server.stop)
        provider = HTTPBasicProvider.from_params(
            ProviderMeta(name="idp-basic", type="http_basic"),
            {"url": server.url("/auth")}, resources=resources())
        self.addCleanup(provider.stopProvider)
        with self.assertRaises(LoginRefused) as caught:
            await provider.requestAvatarId(UserPassword("alice", WRONG, CONTEXT))
        self.assertEqual(caught.exception.kind, "rejected")  # a 401 says no more
        self.assert_session_on_every_line()

    async def test_ldap_tells_unknown_user_from_wrong_password(self):
        slapd = SlapdServer().start()
        self.addCleanup(slapd.stop)
        provider = LDAPProvider.from_params(
            ProviderMeta(name="corp-ldap", type="ldap"),
            {"server": "127.0.0.1", "port": slapd.port, "bind_user": SERVICE_DN,
             "bind_pass": SERVICE_PW, "base_dn": PEOPLE, "timeout": 3,
             "filter_string": "(&(objectClass=inetOrgPerson)(uid=%s))"}, resources=resources())
        self.addCleanup(provider.stopProvider)
        del self.events[:]  # the lines about its configuration are no login's
        for user, kind in (("alice", BAD_PASSWORD), ("mallory", UNKNOWN_USER)):
            with self.assertRaises(LoginRefused) as caught:
                await provider.requestAvatarId(UserPassword(user, WRONG, CONTEXT))
            self.assertEqual(caught.exception.kind, kind)
        await provider.requestAvatarId(UserPassword("alice", "alice-pw", CONTEXT))
        self.assert_session_on_every_line()
        self.assertTrue(any(f"uid=alice,{PEOPLE}" in line for line in self.provider_lines()))


# -- in process: the policy refusal's record, the recipients' hash ----------------------

class PolicyRecordTests(unittest.TestCase):
    def test_what_names_the_refused_command_or_message(self):
        events = capture_logs(self)
        delivery = RelayDelivery(Identity("lab", "carol"), None, DeliveryPolicy("relay.test"))
        reply = Reply(553, "5.7.1", "Sender address <x@example.com> is not allowed")
        delivery.policy_refusal(reply, MAIL_FROM, SESSION)
        delivery.policy_refusal(reply, "header_from", SESSION, "urn:uuid:m1")
        records = [record(e) for e in events if "policy" in e.get("log_template", "")]
        self.assertEqual([r["what"] for r in records], ["MAIL FROM", "message urn:uuid:m1"])
        self.assertIn(f"{SESSION} MAIL FROM refused for lab/carol", records[0]["event"])


class RecipientHashTests(unittest.TestCase):
    async def test_documented_openssl_command_finds_the_hash(self):
        """docs/logging.md: printf '%s' ADDRESS | tr A-Z a-z | openssl dgst -sha256
        -hmac KEY -r | cut -c1-16"""
        shown = RecipientLog("hash", HASH_KEY.encode()).hashed("Bob@Example.NET")
        output, code = await run_tool(
            "sh", "-c", "printf '%s' \"$ADDRESS\" | tr A-Z a-z | "
            "openssl dgst -sha256 -hmac \"$KEY\" -r | cut -c1-16",
            env={"ADDRESS": "Bob@Example.NET", "KEY": HASH_KEY})
        self.assertEqual(code, 0, output)
        self.assertEqual(shown, "hmac:" + output.strip())

    def test_hash_needs_a_key(self):
        options = Options()
        options.environ = {}
        with self.assertRaises(usage.UsageError) as caught:
            options.parseOptions(["--log-recipients", "hash"])
        self.assertIn("--log-recipients-key", str(caught.exception))


# -- a real relay: the lines, and fail2ban on them -------------------------------------

PROVIDERS = OFFICE_AND_LAB


def smtp_login(port: int, source: str, user: str, password: str) -> int:
    """One SMTP session from ``source`` with one AUTH PLAIN; its reply code."""
    client = smtplib.SMTP("127.0.0.1", port, timeout=20, source_address=(source, 0))
    try:
        client.ehlo("client.test")
        client.user, client.password = user, password
        try:
            client.auth("PLAIN", client.auth_plain)  # one attempt (login() tries LOGIN too)
        except smtplib.SMTPAuthenticationError as error:
            return error.smtp_code
        return 235
    finally:
        client.quit()


def http_login(port: int, source: str, user: str, password: str) -> int:
    """One HTTP API submission from ``source`` with Basic credentials; its status."""
    body = json.dumps({"from": "carol@example.com", "to": ["bob@example.net"],
                       "data": base64.b64encode(b"Subject: x\r\n\r\nx\r\n").decode()})
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=20,
                                            source_address=(source, 0))
    try:
        connection.request("POST", "/", body=body, headers={
            "Authorization": f"Basic {auth}", "Content-Type": "application/json"})
        return connection.getresponse().status
    finally:
        connection.close()


def send_over_tls(port: int) -> None:
    """A logged-in session over implicit TLS that relays one message."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    client = smtplib.SMTP_SSL("127.0.0.1", port, timeout=20, context=context)
    try:
        client.login("lab", "carol:lab secret")
        client.sendmail("carol@example.com", ["Bob@Example.NET", "dan@example.org"],
                        b"Subject: hello\r\n\r\nhello\r\n")
    finally:
        client.quit()


def attempts(smtp_port: int, http_port: int) -> dict[str, int]:
    """The logins an operator's fail2ban must see (and must not): reply codes by kind."""
    return {
        "bad password": smtp_login(smtp_port, "127.0.0.2", "lab", f"carol:{WRONG}"),
        "bad password again": smtp_login(smtp_port, "127.0.0.2", "alice", WRONG),
        "unknown user": smtp_login(smtp_port, "127.0.0.3", "mallory", WRONG),
        "http": http_login(http_port, "127.0.0.4", "lab", f"carol:{WRONG}"),
        "success": smtp_login(smtp_port, "127.0.0.5", "lab", "carol:lab secret"),
    }


class RealRelayTests(unittest.TestCase):
    """A real ``twistd esmtpfa`` in each log format, read as an operator would."""

    timeout = 120

    async def run_relay(self, *args: str) -> tuple[RunningRelay, str]:
        upstream = RecordingUpstream().start()
        self.addCleanup(upstream.stop)
        relay = RunningRelay(self.mktemp(), upstream_port=upstream.port, http=True,
                             args=list(args))
        with open(relay.config, "w") as f:
            f.write(PROVIDERS)
        self.addCleanup(relay.stop)
        await relay.start()
        codes = await threads.deferToThread(attempts, relay.smtp_port, relay.http_port)
        # The client hears the same refusal whatever the reason (RFC 4954 §6).
        self.assertEqual(codes, {"bad password": 535, "bad password again": 535,
                                 "unknown user": 535, "http": 401, "success": 235})
        await threads.deferToThread(send_over_tls, relay.tls_port)
        await relay.stop()
        path = os.path.join(relay.directory, "esmtpfa.log")
        with open(path, "w") as f:
            f.write(relay.log)
        self.assertNotIn(WRONG, relay.log)
        return relay, path

    async def fail2ban(self, path: str) -> list[str]:
        """The hosts fail2ban-regex finds in the log, one per matched line."""
        output, code = await run_tool("fail2ban-regex", "-o", "<ip>", path, FILTER)
        self.assertEqual(code, 0, output)
        hosts = [line.strip() for line in output.splitlines() if line.strip()]
        summary, code = await run_tool("fail2ban-regex", path, FILTER)
        matched = re.search(r"^Lines: \d+ lines, \d+ ignored, (\d+) matched", summary, re.M)
        self.assertIsNotNone(matched, summary)
        self.assertEqual(int(matched.group(1)), len(hosts), summary)
        return hosts

    async def test_text_log(self):
        relay, path = await self.run_relay()
        failed = [line for line in relay.log.splitlines() if "login failed:" in line]
        self.assertEqual(len(failed), 4, relay.log)
        self.assertRegex(failed[0], r"\[esmtpfa\.auth#warn\] urn:uuid:[0-9a-f-]{36} "
                         r"login failed: client=127\.0\.0\.2 reason=bad-password "
                         r"protocol=smtp mechanism=PLAIN identity=lab/carol$")
        self.assertIn("client=127.0.0.2 reason=bad-password protocol=smtp mechanism=PLAIN "
                      "identity=office/alice", failed[1])
        self.assertIn("client=127.0.0.3 reason=unknown-user protocol=smtp mechanism=PLAIN "
                      "identity=office/mallory", failed[2])
        self.assertIn("client=127.0.0.4 reason=bad-password protocol=http "
                      "mechanism=HTTP-BASIC identity=lab/carol", failed[3])

        self.assertEqual(sorted(await self.fail2ban(path)),
                         ["127.0.0.2", "127.0.0.2", "127.0.0.3", "127.0.0.4"])

        # The message line names its recipients, as Postfix's to=<...> does.
        [relayed] = [line for line in relay.log.splitlines() if "relayed for" in line]
        self.assertIn("from <carol@example.com> to <Bob@Example.NET>,<dan@example.org>, ",
                      relayed)
        # The session's last line says which TLS it used (none for cleartext).
        disconnects = [line for line in relay.log.splitlines() if " disconnect (" in line]
        self.assertTrue(any("tls=none cipher=none" in line for line in disconnects),
                        disconnects)
        self.assertTrue(any(re.search(r"tls=TLSv1\.[23] cipher=[A-Z0-9_-]+\)$", line)
                            for line in disconnects), disconnects)

    async def test_json_log_with_hashed_recipients(self):
        relay, path = await self.run_relay(
            "--log-format", "json", "--log-recipients", "hash",
            "--log-recipients-key", HASH_KEY)
        records = [json.loads(line) for line in relay.log.splitlines() if line.strip()]
        failed = [r for r in records if "login failed:" in r["event"]]
        self.assertEqual(len(failed), 4, relay.log)
        first = failed[0]
        self.assertEqual((first["level"], first["namespace"]), ("warn", "esmtpfa.auth"))
        self.assertEqual({key: first[key] for key in (
            "client", "reason", "protocol", "mechanism", "identity")},
            {"client": "127.0.0.2", "reason": "bad-password", "protocol": "smtp",
             "mechanism": "PLAIN", "identity": {"provider": "lab", "user": "carol"}})
        self.assertEqual(failed[3]["protocol"], "http")

        self.assertEqual(sorted(await self.fail2ban(path)),
                         ["127.0.0.2", "127.0.0.2", "127.0.0.3", "127.0.0.4"])

        # Hashed: no recipient address anywhere, yet each one can be found.
        self.assertNotIn("Bob@Example.NET", relay.log)
        self.assertNotIn("dan@example.org", relay.log)
        [relayed] = [r for r in records if "relayed for" in r["event"]]
        hashing = RecipientLog("hash", HASH_KEY.encode())
        self.assertEqual(relayed["recipients"], [hashing.hashed("bob@example.net"),
                                                 hashing.hashed("dan@example.org")])
        self.assertEqual(relayed["count"], 2)
        [tls] = [r for r in records if " disconnect (" in r["event"]
                 and r["tls_version"] != "none"]
        self.assertRegex(tls["tls_version"], r"^TLSv1\.[23]$")
        self.assertTrue(tls["tls_cipher"])


class LevelTests(unittest.TestCase):
    """The failed-login line is a warning: still there at ``--log-level warn``."""

    def test_failed_login_line_at_warn(self):
        self.addCleanup(setattr, logs, "_threshold", logs._threshold)
        from esmtpfa.auth.failures import log_failed_login
        from tests.support.logcapture import observe_logs
        logs.set_level("warn")
        events = observe_logs(self)
        log_failed_login(CONTEXT, "LOGIN", LoginRefused(BAD_PASSWORD))
        [line] = [formatEvent(e) for e in events]
        self.assertEqual(line, f"{SESSION} login failed: client=192.0.2.7 "
                               "reason=bad-password protocol=smtp mechanism=LOGIN "
                               "identity=-/-")
