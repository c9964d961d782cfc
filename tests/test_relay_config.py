"""``--relay-config``: upstreams from a file, each with its own address, TLS and credentials."""

from __future__ import annotations

import os
import smtplib

from twisted.internet import defer, threads
from twisted.python import usage
from twisted.trial import unittest

from esmtpfa.common.errors import ConfigError
from esmtpfa.relay.config import UpstreamEntry, parse_relay_document
from esmtpfa.runtime.service import build_relay
from tests.support.options import parse_options
from tests.support.relayfixture import PASSWORD, USER, RelayFixture
from tests.support.resources import resources
from tests.support.upstream import RecordingUpstream

EXAMPLE = """\
relays:
- addr: smtp.sendgrid.net:587
  user: apikey
  pass: ${SENDGRID_API_KEY}
  starttls: required
- addr: email-smtp.eu-west-1.amazonaws.com
  port: 465
  tls: true
  user: ${SES_USER}
  pass: ${SES_PASSWORD}
  auth_mech: LOGIN
- addr: "[2001:db8::25]"
"""
ENV = {"SENDGRID_API_KEY": "SG.s3cret", "SES_USER": "AKIA1", "SES_PASSWORD": "ses-s3cret"}


class ParseTests(unittest.TestCase):

    def test_example(self):
        entries = parse_relay_document(EXAMPLE, "relays.yaml", ENV, default_port=25)
        self.assertEqual(entries, [
            UpstreamEntry("smtp.sendgrid.net", 587, {
                "username": "apikey", "password": "SG.s3cret", "starttls": "required"}),
            UpstreamEntry("email-smtp.eu-west-1.amazonaws.com", 465, {
                "implicit_tls": True, "username": "AKIA1", "password": "ses-s3cret",
                "auth_mechanism": "login"}),
            UpstreamEntry("2001:db8::25", 25, {}),
        ])

    def test_repr_hides_the_password(self):
        entry, = parse_relay_document("relays:\n- {addr: a.example, user: u, pass: s3cret}\n",
                                      "relays.yaml", {})
        self.assertNotIn("s3cret", repr(entry))
        self.assertIn("password='<redacted>'", repr(entry))
        self.assertIn("username='u'", repr(entry))

    def test_json(self):
        entries = parse_relay_document(
            '{"relays": [{"addr": "a.example", "tls_skip_verify": true}]}', "r.json", {},
            default_port=587)
        self.assertEqual(entries, [UpstreamEntry("a.example", 587, {"skip_verify": True})])

    def assertRefused(self, text: str, *expected: str, env=None) -> str:
        with self.assertRaises(ConfigError) as caught:
            parse_relay_document(text, "relays.yaml", env or {})
        message = str(caught.exception)
        for part in expected:
            self.assertIn(part, message)
        return message

    def test_errors_name_the_file_entry_and_key(self):
        self.assertRefused("relays:\n- {addr: a.example, passwd: x}\n",
                           "relays.yaml: relays[0]", "'passwd' (did you mean 'pass'?)")
        self.assertRefused("relays:\n- {port: 25}\n", "relays[0]", "'addr' is required")
        self.assertRefused("relays:\n- {addr: 'a.example,b.example'}\n",
                           "relays[0]: addr: one address per entry")
        self.assertRefused("relays:\n- {addr: a.example, user: u}\n",
                           "'user' and 'pass' go together")
        self.assertRefused("relays:\n- {addr: a.example, tls: true, starttls: required}\n",
                           "'starttls' does not apply")
        self.assertRefused("relays:\n- {addr: a.example, starttls: maybe}\n",
                           "relays[0]: starttls: must be one of opportunistic, required, none")
        self.assertRefused("relays:\n- {addr: a.example, port: 70000}\n", "addr:", "port")
        self.assertRefused("relays:\n- {addr: a.example, tls_ca_cert: /nonexistent/ca.pem}\n",
                           "tls_ca_cert: no such file: /nonexistent/ca.pem")
        self.assertRefused("relays:\n- {addr: a.example, auth_mech: NTLM}\n",
                           "auth_mech: must be one of")
        self.assertRefused("relays:\n- {addr: a.example}\n- {addr: A.example:25}\n",
                           "relays[1]", "listed twice")
        self.assertRefused("relays: []\n", "'relays' is empty")
        self.assertRefused("upstreams: []\n", "expected a mapping with a 'relays' list")
        self.assertRefused("relays:\n- a.example\n", "relays[0]: must be a mapping")

    def test_no_secret_in_any_error(self):
        message = self.assertRefused("relays:\n- {addr: a.example, user: u, pass: [s3cret]}\n",
                                     "relays[0]: pass: must be a non-empty string")
        self.assertNotIn("s3cret", message)
        message = self.assertRefused(
            "relays:\n- {addr: a.example, user: u, pass: '${MISSING}'}\n",
            "relays[0]: pass:", "'MISSING' is not set")
        self.assertNotIn("s3cret", message)


class OptionTests(unittest.TestCase):

    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_entries_override_the_flags(self):
        path = self.write(EXAMPLE)
        options = parse_options("--relay-config", path, "--relay-timeout", "12",
                                "--relay-user", "flag-user", "--relay-pass", "flag-pass",
                                "--relay-tls-server-name", "smtp.example.com", **ENV)
        relay = build_relay(options, resources(), "relay.test")
        self.addCleanup(relay.close)
        first, second, third = [u.settings for u in relay.upstreams]
        self.assertEqual((first.address, first.username, first.password, first.starttls,
                          first.implicit_tls, first.command_timeout),
                         ("smtp.sendgrid.net:587", "apikey", "SG.s3cret", "required", False,
                          12.0))
        self.assertEqual((second.address, second.username, second.implicit_tls,
                          second.starttls, second.auth_mechanism),
                         ("email-smtp.eu-west-1.amazonaws.com:465", "AKIA1", True, "none",
                          "LOGIN"))
        # What an entry leaves out comes from the flags.
        self.assertEqual((third.address, third.username, third.password, third.server_name),
                         ("[2001:db8::25]:25", "flag-user", "flag-pass", "smtp.example.com"))
        self.assertIn("failover", relay.description)
        self.assertNotIn("s3cret", repr(relay.upstreams[0].settings))

    def test_starttls_entry_under_implicit_tls_flag(self):
        path = self.write("relays:\n- {addr: a.example, starttls: required}\n"
                          "- {addr: b.example}\n")
        relay = build_relay(parse_options("--relay-config", path, "--relay-tls"), resources(),
                            "relay.test")
        self.addCleanup(relay.close)
        a, b = [u.settings for u in relay.upstreams]
        self.assertEqual((a.implicit_tls, a.starttls), (False, "required"))
        self.assertEqual((b.implicit_tls, b.starttls), (True, "none"))

    def test_environment_variable_and_port_default(self):
        path = self.write("relays:\n- {addr: a.example}\n")
        options = parse_options(RELAY_CONFIG=path, RELAY_PORT="2525")
        self.assertEqual(options["relay-upstreams"], [UpstreamEntry("a.example", 2525, {})])

    def test_startup_errors(self):
        path = self.write("relays:\n- {addr: a.example}\n")
        with self.assertRaises(usage.UsageError) as caught:
            parse_options("--relay-config", path, "--relay-addr", "b.example")
        self.assertIn("--relay-addr and --relay-config", str(caught.exception))
        with self.assertRaises(usage.UsageError) as caught:
            parse_options("--relay-config", self.write("relays:\n- {adr: a.example}\n"))
        self.assertIn("--relay-config:", str(caught.exception))
        self.assertIn("did you mean 'addr'?", str(caught.exception))
        with self.assertRaises(usage.UsageError) as caught:
            parse_options("--relay-config", "/nonexistent/relays.yaml")
        self.assertIn("/nonexistent/relays.yaml: cannot read", str(caught.exception))


class FailoverWithOwnCredentialsTests(unittest.TestCase):
    """smtplib → esmtpfa → two real upstreams, each requiring its own account."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.primary = RecordingUpstream(auth=("PLAIN",), credentials=("primary", "p-pass"),
                                         replies={"MAIL": "451 4.3.0 Primary is busy"})
        self.backup = RecordingUpstream(auth=("PLAIN", "LOGIN"),
                                        credentials=("backup", "b:pass"))
        for upstream in (self.primary, self.backup):
            yield upstream.start()
            self.addCleanup(upstream.stop)
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "relays.yaml")
        with open(path, "w") as f:
            f.write(f"relays:\n"
                    f"- {{addr: '127.0.0.1:{self.primary.port}', user: primary,\n"
                    f"   pass: p-pass, starttls: none, allow_insecure_auth: true}}\n"
                    f"- {{addr: '127.0.0.1:{self.backup.port}', user: backup,\n"
                    f"   pass: '${{BACKUP_PASS}}', starttls: none, allow_insecure_auth: true,\n"
                    f"   auth_mech: login}}\n")
        self.fixture = RelayFixture(directory, "--relay-config", path, relay=False,
                                    env={"BACKUP_PASS": "b:pass"})
        self.addCleanup(self.fixture.stop)
        yield self.fixture.start()

    def test_each_upstream_gets_its_own_credentials(self):
        fixture = self.fixture

        def send():
            with smtplib.SMTP("127.0.0.1", fixture.plain_port, timeout=20) as client:
                client._host = "relay.test"  # the name the certificate is checked against
                client.starttls(context=fixture.client_context())
                client.login(USER, PASSWORD)
                return client.sendmail("alice@example.com", ["bob@example.net"],
                                       b"Subject: failover\r\n\r\nhello\r\n")

        def check(refused):
            self.assertEqual(refused, {})
            # The primary logged in with its account and refused the message (451 to MAIL)…
            self.assertEqual([(s.auth_mechanism, s.auth_user) for s in self.primary.sessions],
                             [("PLAIN", "primary")])
            self.assertEqual(self.primary.messages, [])
            # …the backup took it, with its own account and its forced mechanism.
            self.assertEqual([(s.auth_mechanism, s.auth_user) for s in self.backup.sessions],
                             [("LOGIN", "backup")])
            self.assertEqual([m.mail_from for m in self.backup.messages], ["alice@example.com"])
        return threads.deferToThread(send).addCallback(check)


OAUTH2_EXAMPLE = """\
relays:
- addr: smtp.office365.com:587
  starttls: required
  user: printer@contoso.example
  oauth2:
    token_url: https://login.microsoftonline.com/contoso/oauth2/v2.0/token
    client_id: ${M365_CLIENT_ID}
    client_secret: ${M365_CLIENT_SECRET}
    scope: https://outlook.office365.com/.default
- addr: smtp.gmail.com:465
  tls: true
  user: alerts@example.com
  auth_mech: xoauth2
  oauth2: {token_url: "https://oauth2.googleapis.com/token", client_id: gmail-app,
           client_secret: "${GMAIL_SECRET}", refresh_token: "${GMAIL_REFRESH_TOKEN}"}
- addr: backup.example
  user: u
  pass: p4ss-backup
"""
OAUTH2_ENV = {"M365_CLIENT_ID": "11111111-app", "M365_CLIENT_SECRET": "m365-s3cret~value",
              "GMAIL_SECRET": "gmail-s3cret", "GMAIL_REFRESH_TOKEN": "1//refresh-s3cret"}


class OAuth2ConfigTests(unittest.TestCase):
    """The ``oauth2`` block of a relay entry, and the ``--relay-oauth2-*`` flags."""

    def test_example(self):
        m365, gmail, backup = parse_relay_document(OAUTH2_EXAMPLE, "relays.yaml", OAUTH2_ENV)
        oauth2 = m365.overrides["oauth2"]
        self.assertEqual((oauth2.token_url, oauth2.client_id, oauth2.client_secret,
                          oauth2.scope, oauth2.grant, oauth2.auth_method),
                         ("https://login.microsoftonline.com/contoso/oauth2/v2.0/token",
                          "11111111-app", "m365-s3cret~value",
                          "https://outlook.office365.com/.default", "client_credentials",
                          "client_secret_basic"))
        self.assertEqual((m365.overrides["username"], m365.overrides["password"]),
                         ("printer@contoso.example", None))
        self.assertEqual((gmail.overrides["oauth2"].grant, gmail.overrides["auth_mechanism"]),
                         ("refresh_token", "xoauth2"))
        self.assertNotIn("oauth2", backup.overrides)
        for entry in (m365, gmail, backup):
            for secret in list(OAUTH2_ENV.values())[1:] + ["p4ss-backup"]:
                self.assertNotIn(secret, repr(entry))

    def test_private_key_jwt(self):
        from tests.support.tokenserver import client_key_files
        keys = client_key_files(self.mktemp())
        text = (f"relays:\n- addr: smtp.office365.com:587\n  user: u@contoso.example\n"
                f"  oauth2:\n    token_url: https://login.example/token\n    client_id: app\n"
                f"    private_key: {keys.key_path}\n    certificate: {keys.cert_path}\n")
        entry, = parse_relay_document(text, "relays.yaml", {})
        oauth2 = entry.overrides["oauth2"]
        self.assertEqual((oauth2.auth_method, oauth2.private_key, oauth2.certificate),
                         ("private_key_jwt", keys.key_path, keys.cert_path))

    def assertRefused(self, text: str, *expected: str, env=None) -> str:
        message = ParseTests.assertRefused(self, text, *expected, env=env)
        for secret in ("s3cret", "r3fresh"):
            self.assertNotIn(secret, message)
        return message

    def test_errors_name_the_file_entry_and_key_never_a_value(self):
        head = "relays:\n- addr: a.example\n  user: u\n  oauth2: "
        good = "token_url: https://t.example/token, client_id: app, "
        self.assertRefused(head + "yes\n", "relays.yaml: relays[0]: oauth2: must be a mapping")
        self.assertRefused(head + "{" + good + "client_secrett: s3cret}\n",
                           "relays[0]: oauth2:", "'client_secrett' (did you mean "
                           "'client_secret'?)")
        self.assertRefused(head + "{client_id: app, client_secret: s3cret}\n",
                           "relays[0]: oauth2.token_url is required")
        self.assertRefused(head + "{token_url: 'ftp://s3cret@x/', client_id: app, "
                           "client_secret: s3cret}\n",
                           "relays[0]: oauth2: token_url must be an http(s) URL")
        self.assertRefused(head + "{" + good + "}\n", "needs client_secret")
        self.assertRefused(head + "{" + good + "client_secret: [s3cret]}\n",
                           "relays[0]: oauth2.client_secret: must be a non-empty string")
        self.assertRefused(head + "{" + good + "client_secret: s3cret, "
                           "auth_method: tls_client_auth}\n",
                           "oauth2.auth_method: must be one of client_secret_basic")
        self.assertRefused(head + "{" + good + "private_key: /nonexistent/k.pem}\n",
                           "oauth2.private_key: no such file: /nonexistent/k.pem")
        self.assertRefused(head + "{" + good + "client_secret: '${MISSING}'}\n",
                           "oauth2.client_secret:", "'MISSING' is not set")
        self.assertRefused("relays:\n- addr: a.example\n  user: u\n  pass: s3cret\n"
                           "  oauth2: {" + good + "client_secret: s3cret}\n",
                           "'oauth2' replaces 'pass'")
        self.assertRefused("relays:\n- addr: a.example\n  user: u\n  auth_mech: plain\n"
                           "  oauth2: {" + good + "client_secret: s3cret}\n",
                           "auth_mech: an oauth2 entry logs in with oauthbearer or xoauth2")

    def test_build_relay_from_the_file(self):
        path = self.mktemp()
        with open(path, "w") as file:
            file.write(OAUTH2_EXAMPLE)
        options = parse_options("--relay-config", path, "--relay-user", "flag-user",
                                "--relay-pass", "flag-pass", **OAUTH2_ENV)
        relay = build_relay(options, resources(), "relay.test")
        self.addCleanup(relay.close)
        m365, gmail, backup = [u.settings for u in relay.upstreams]
        self.assertTrue(m365.uses_oauth2)
        self.assertIsNone(m365.password)  # not the --relay-pass default
        self.assertFalse(m365.authenticates)  # no password login for it
        self.assertEqual(gmail.auth_mechanism, "XOAUTH2")
        self.assertEqual((backup.password, backup.oauth2), ("p4ss-backup", None))
        self.assertNotIn("s3cret", repr(m365))

    def test_flags(self):
        options = parse_options("--relay-addr", "smtp.office365.com:587",
                                "--relay-user", "printer@contoso.example",
                                "--relay-oauth2-token-url", "https://login.example/token",
                                "--relay-oauth2-client-id", "app",
                                "--relay-oauth2-scope", "https://outlook.office365.com/.default",
                                "--relay-auth-mech", "OAUTHBEARER",
                                RELAY_OAUTH2_CLIENT_SECRET="flag-s3cret")
        entry, = options["relay-upstreams"]
        oauth2 = entry.overrides["oauth2"]
        self.assertEqual((oauth2.client_id, oauth2.client_secret, oauth2.scope),
                         ("app", "flag-s3cret", "https://outlook.office365.com/.default"))
        self.assertNotIn("flag-s3cret", repr(entry))
        relay = build_relay(options, resources(), "relay.test")
        self.addCleanup(relay.close)
        settings = relay.upstreams[0].settings
        self.assertEqual((settings.oauth2, settings.auth_mechanism), (oauth2, "OAUTHBEARER"))

    def test_flags_are_the_default_of_entries_without_credentials(self):
        path = self.mktemp()
        with open(path, "w") as file:
            file.write("relays:\n- {addr: a.example}\n- {addr: b.example, user: u, pass: p}\n")
        options = parse_options("--relay-config", path, "--relay-user", "mailbox@example.com",
                                RELAY_OAUTH2_TOKEN_URL="https://t.example/token",
                                RELAY_OAUTH2_CLIENT_ID="app", RELAY_OAUTH2_REFRESH_TOKEN="r3fresh",
                                RELAY_OAUTH2_CLIENT_SECRET="x")
        a, b = options["relay-upstreams"]
        self.assertEqual(a.overrides["oauth2"].grant, "refresh_token")
        self.assertNotIn("oauth2", b.overrides)

    def test_flag_errors(self):
        for args, env, expected in (
                (("--relay-oauth2-client-id", "app"), {}, "--relay-oauth2-token-url is required"),
                (("--relay-oauth2-token-url", "https://t.example/t",
                  "--relay-oauth2-client-id", "app"), {}, "needs client_secret"),
                (("--relay-oauth2-token-url", "https://t.example/t", "--relay-oauth2-client-id",
                  "app", "--relay-pass", "s3cret"), {"RELAY_OAUTH2_CLIENT_SECRET": "s3cret"},
                 "replaces --relay-pass"),
                (("--relay-oauth2-token-url", "https://t.example/t", "--relay-oauth2-client-id",
                  "app"), {"RELAY_OAUTH2_CLIENT_SECRET": "s3cret"}, "needs --relay-user"),
                (("--relay-oauth2-private-key", "/nonexistent/k.pem",
                  "--relay-oauth2-token-url", "https://t.example/t",
                  "--relay-oauth2-client-id", "app"), {}, "no such file: /nonexistent/k.pem"),
                (("--relay-oauth2-auth-method", "magic"), {}, "--relay-oauth2-auth-method")):
            with self.assertRaises(usage.UsageError) as caught:
                parse_options("--relay-addr", "a.example", *args, **env)
            self.assertIn(expected, str(caught.exception))
            self.assertNotIn("s3cret", str(caught.exception))

    def test_token_mechanism_without_oauth2_is_refused_at_startup(self):
        options = parse_options("--relay-addr", "a.example", "--relay-user", "u",
                                "--relay-pass", "p", "--relay-auth-mech", "xoauth2")
        with self.assertRaises(ValueError) as caught:
            build_relay(options, resources(), "relay.test")
        self.assertIn("XOAUTH2 needs an oauth2 block", str(caught.exception))
