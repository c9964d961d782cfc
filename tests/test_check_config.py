"""``twistd esmtpfa --check-config [--check-connect]`` (issue 12, item 6), run as an
operator runs it: a real ``twistd`` process that must exit by itself, with 0 for a sound
configuration and non-zero naming the file, entry and key of a problem, never a secret.

``--check-connect`` goes to real servers on loopback: an SMTP upstream that offers
STARTTLS and requires AUTH (``RecordingUpstream``), a closed port, and OpenLDAP's slapd.
"""

from __future__ import annotations

import os

from twisted.trial import unittest

from tests.support.certs import CertificateAuthority
from tests.support.httpservers import AuthEndpoint, JWKSEndpoint, LoopbackHTTPServer, make_key
from tests.support.ports import free_port
from tests.support.processes import Twistd
from tests.support.slapd import PEOPLE, SERVICE_DN, SERVICE_PW, SlapdServer
from tests.support.upstream import RecordingUpstream

USERPASS_SECRET = "pw-SECRET-4e1d"
RELAY_SECRET = "relay-SECRET-77ab"
LDAP_WRONG = "wrong-SECRET-bind-9c2"

GOOD = f"""\
providers:
- meta: {{name: office, type: userpass, fallback: true}}
  params: {{username: alice, password: "{USERPASS_SECRET}"}}
  policy: {{allowed_senders: ["alice@example.com"]}}
"""

TYPO = f"""\
providers:
- meta: {{name: office, type: userpass}}
  params: {{username: alice, password: "{USERPASS_SECRET}"}}
- meta: {{name: lab, type: userpass}}
  params: {{usrname: carol, password: "{USERPASS_SECRET}"}}
"""


class CheckConfigCase(unittest.TestCase):
    timeout = 60

    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)

    def write(self, name: str, text: str) -> str:
        path = os.path.join(self.directory, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    async def check(self, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
        """Run ``twistd -n esmtpfa --check-config ARGS``: its exit code and output."""
        process = Twistd(["--check-config", "--maildir",
                          os.path.join(self.directory, "maildir"), *args], env=env)
        process.start()
        self.addCleanup(process.stop)
        code = await process.exited()  # bounded: it must end by itself
        return code, process.output

    def assertNoSecret(self, output: str) -> None:
        for secret in (USERPASS_SECRET, RELAY_SECRET, LDAP_WRONG, SERVICE_PW):
            self.assertNotIn(secret, output)


class StaticTests(CheckConfigCase):

    async def test_good_configuration(self):
        config = self.write("providers.yaml", GOOD)
        code, output = await self.check("--config", config)
        self.assertEqual(code, 0, output)
        self.assertIn("office (userpass)", output)
        self.assertIn("with a policy", output)
        self.assertIn(config, output)
        self.assertIn("configuration ok", output)
        self.assertNoSecret(output)

    async def test_typo_in_providers_names_file_entry_and_key(self):
        config = self.write("providers.yaml", TYPO)
        code, output = await self.check("--config", config)
        self.assertNotEqual(code, 0, output)
        problems = [line for line in output.splitlines() if line.startswith("PROBLEM")]
        self.assertEqual(len(problems), 1, output)
        self.assertIn(config, problems[0])
        self.assertIn("'lab'", problems[0])
        self.assertIn("'usrname'", problems[0])
        self.assertNoSecret(output)

    async def test_missing_tls_file_is_named(self):
        config = self.write("providers.yaml", GOOD)
        ca = CertificateAuthority(os.path.join(self.directory, "ca"))
        leaf = ca.issue("relay.test")
        missing = os.path.join(self.directory, "gone-key.pem")
        code, output = await self.check("--config", config, "--plain", "--tls",
                                        "--tls-cert", leaf.cert_path, "--tls-key", missing)
        self.assertNotEqual(code, 0, output)
        self.assertIn(f"--tls-key: no such file: {missing}", output)
        self.assertNoSecret(output)

    async def test_unreadable_certificate_is_named(self):
        config = self.write("providers.yaml", GOOD)
        ca = CertificateAuthority(os.path.join(self.directory, "ca"))
        leaf = ca.issue("relay.test")
        garbage = self.write("cert.pem", "not a certificate\n")
        code, output = await self.check("--config", config, "--tls-cert", garbage,
                                        "--tls-key", leaf.key_path)
        self.assertNotEqual(code, 0, output)
        [problem] = [line for line in output.splitlines() if line.startswith("PROBLEM")]
        self.assertIn("SMTP TLS", problem)
        self.assertIn(garbage, problem)


class ConnectTests(CheckConfigCase):

    async def test_upstream_with_starttls_and_auth(self):
        ca = CertificateAuthority(os.path.join(self.directory, "ca"))
        upstream = RecordingUpstream(tls=ca.issue("upstream.test", "127.0.0.1"),
                                     auth=("PLAIN",), credentials=("relayuser", RELAY_SECRET),
                                     auth_requires_tls=True).start()
        self.addCleanup(upstream.stop)
        config = self.write("providers.yaml", GOOD)
        code, output = await self.check(
            "--config", config, "--check-connect",
            "--relay-addr", f"127.0.0.1:{upstream.port}", "--relay-starttls", "required",
            "--relay-tls-ca-cert", ca.cert_path, "--relay-tls-server-name", "upstream.test",
            "--relay-user", "relayuser", env={"RELAY_PASS": RELAY_SECRET})
        self.assertEqual(code, 0, output)
        self.assertIn(f"ok       upstream 127.0.0.1:{upstream.port}: connected, TLS, AUTH PLAIN",
                      output)
        [session] = upstream.sessions
        self.assertTrue(session.tls)
        self.assertEqual(session.auth_user, "relayuser")
        self.assertEqual(session.transactions, 0)  # nothing was sent
        self.assertNoSecret(output)

    async def test_closed_port_names_the_upstream(self):
        config = self.write("providers.yaml", GOOD)
        port = free_port()
        code, output = await self.check(
            "--config", config, "--check-connect", "--relay-addr", f"127.0.0.1:{port}",
            "--relay-connect-timeout", "5")
        self.assertNotEqual(code, 0, output)
        [problem] = [line for line in output.splitlines() if line.startswith("PROBLEM")]
        self.assertIn(f"upstream 127.0.0.1:{port}", problem)
        self.assertIn("refused", problem.lower())

    async def test_without_check_connect_nothing_is_contacted(self):
        upstream = RecordingUpstream().start()
        self.addCleanup(upstream.stop)
        config = self.write("providers.yaml", GOOD)
        code, output = await self.check("--config", config,
                                        "--relay-addr", f"127.0.0.1:{upstream.port}")
        self.assertEqual(code, 0, output)
        self.assertEqual(upstream.sessions, [])


class LDAPConnectTests(CheckConfigCase):

    def setUp(self):
        super().setUp()
        self.slapd = SlapdServer().start()
        self.addCleanup(self.slapd.stop)

    def ldap_config(self, bind_pass: str) -> str:
        return self.write("providers.yaml", f"""\
providers:
- meta: {{name: corp-ldap, type: ldap, fallback: true}}
  params:
    server: 127.0.0.1
    port: {self.slapd.port}
    bind_user: "{SERVICE_DN}"
    bind_pass: "${{LDAP_BIND_PASS}}"
    base_dn: "{PEOPLE}"
    filter_string: "(&(objectClass=inetOrgPerson)(uid=%s))"
    timeout: 3
""")

    async def test_service_bind(self):
        code, output = await self.check("--config", self.ldap_config(SERVICE_PW),
                                        "--check-connect", env={"LDAP_BIND_PASS": SERVICE_PW})
        self.assertEqual(code, 0, output)
        self.assertIn("ok       provider 'corp-ldap' (ldap): ", output)
        self.assertIn("bound as bind_user", output)
        self.assertNoSecret(output)

    async def test_wrong_service_password(self):
        code, output = await self.check("--config", self.ldap_config(LDAP_WRONG),
                                        "--check-connect", env={"LDAP_BIND_PASS": LDAP_WRONG})
        self.assertNotEqual(code, 0, output)
        [problem] = [line for line in output.splitlines() if line.startswith("PROBLEM")]
        self.assertIn("provider 'corp-ldap' (ldap)", problem)
        self.assertIn("bind_user", problem)
        self.assertNoSecret(output)


class HTTPBackEndConnectTests(CheckConfigCase):
    """A JWT provider's JWKS and an HTTP provider's endpoint, served on loopback."""

    def setUp(self):
        super().setUp()
        self.jwks = JWKSEndpoint([make_key("RS256", "k1")])
        self.auth = AuthEndpoint(expect_basic=("alice", USERPASS_SECRET), expect_header=None)
        self.server = LoopbackHTTPServer({"jwks": self.jwks, "auth": self.auth}).start()
        self.addCleanup(self.server.stop)

    def config(self, base: str) -> str:
        return self.write("providers.yaml", f"""\
providers:
- meta: {{name: idp, type: jwt}}
  params: {{jwks_url: "{base}/jwks", iss: "https://idp.example"}}
- meta: {{name: scripts, type: http_basic, fallback: true}}
  params: {{url: "{base}/auth"}}
""")

    async def test_jwks_fetched_and_endpoint_answers(self):
        code, output = await self.check("--config", self.config(self.server.url("")),
                                        "--check-connect")
        self.assertEqual(code, 0, output)
        self.assertIn("ok       provider 'idp' (jwt): JWKS fetched", output)
        self.assertIn("1 key(s)", output)
        self.assertIn("ok       provider 'scripts' (http_basic): endpoint", output)
        self.assertEqual((self.jwks.fetches, self.auth.count), (1, 1))

    async def test_unreachable_back_ends_are_named(self):
        base = f"http://127.0.0.1:{free_port()}"
        code, output = await self.check("--config", self.config(base), "--check-connect")
        self.assertNotEqual(code, 0, output)
        problems = [line for line in output.splitlines() if line.startswith("PROBLEM")]
        self.assertEqual(len(problems), 2, output)
        self.assertTrue(any("provider 'idp' (jwt)" in p for p in problems), output)
        self.assertTrue(any("provider 'scripts' (http_basic)" in p for p in problems), output)


class SharedStateTests(CheckConfigCase):
    """``--state-url``: named (without its password) by --check-config, pinged through the
    relay's own Redis client by --check-connect (a real redis-server)."""

    PASSWORD = "redis-pass-for-the-check-9c1"

    async def test_redis_answers(self):
        from tests.support.redis import RedisServer
        redis = RedisServer(password=self.PASSWORD)
        await redis.start()
        self.addCleanup(redis.stop)
        code, output = await self.check("--check-connect", "--demo",
                                        env={"STATE_URL": redis.url})
        self.assertEqual(code, 0, output)
        self.assertIn(f"shared state redis://127.0.0.1:{redis.port}/0", output)
        self.assertIn("answered PONG", output)
        self.assertNotIn(self.PASSWORD, output)

    async def test_a_wrong_password_and_a_bad_url_are_named(self):
        from tests.support.redis import RedisServer
        redis = RedisServer(password=self.PASSWORD)
        await redis.start()
        self.addCleanup(redis.stop)
        wrong = redis.url.replace(self.PASSWORD, "not-the-redis-password")
        code, output = await self.check("--check-connect", "--demo", env={"STATE_URL": wrong})
        self.assertEqual(code, 1, output)
        self.assertIn(f"shared state redis://127.0.0.1:{redis.port}/0", output)
        self.assertNotIn("not-the-redis-password", output)
        code, output = await self.check("--demo", env={
            "STATE_URL": "http://user:secret-in-url@example.com/"})
        self.assertEqual(code, 1, output)
        self.assertIn("STATE_URL", output)
        self.assertNotIn("secret-in-url", output)


class SpoolCheckTests(CheckConfigCase):
    """The spool a delivery mode uses: its directory must be writable; with
    ``--check-connect`` it is opened and counted, and a broker that refuses is named,
    never its password."""

    async def test_file_spool_is_opened_and_counted(self):
        spool = os.path.join(self.directory, "spool")
        code, output = await self.check("--check-connect", "--demo", "--delivery-mode",
                                        "fallback", "--spool-url", f"file://{spool}")
        self.assertEqual(code, 0, output)
        self.assertIn(f"spool: {spool} (delivery mode fallback", output)
        self.assertIn("0 queued, 0 held", output)

    async def test_unwritable_spool_directory_is_named(self):
        blocker = self.write("not-a-directory", "a file")
        code, output = await self.check("--demo", "--delivery-mode", "spool",
                                        "--spool-url", f"file://{blocker}/spool")
        self.assertEqual(code, 1, output)
        self.assertIn("--spool-url: cannot create", output)
        self.assertNotIn("Traceback", output)

    async def test_broker_that_refuses_is_named_without_its_password(self):
        closed = free_port()
        code, output = await self.check(
            "--check-connect", "--demo", "--delivery-mode", "spool",
            env={"SPOOL_URL": f"amqp://esmtpfa:broker-SECRET-31@127.0.0.1:{closed}/mail"})
        self.assertEqual(code, 1, output)
        self.assertIn(f"spool: RabbitMQ amqp://127.0.0.1:{closed}/mail", output)
        self.assertIn("PROBLEM  spool", output)
        self.assertNotIn("broker-SECRET-31", output)
