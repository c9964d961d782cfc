"""``twistd esmtpfa --check-config [--check-connect]``, run as an
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


# -- a bad value for every option ---------------------------------------------------------

#: Values tried, in order, until the option's parser refuses one.  An option whose
#: parser takes any text (a path, a name, a password) has no bad value of its own: its
#: problems are found by the checks that use it (a missing file, a relay address).
CANDIDATES = ("not-a-value", "-1", "0", "99999", "100/week")


def bad_values() -> dict:
    """``{setting: (flag argument or None, environment variable or None, value)}`` for
    every option of ``esmtpfa.runtime.options.SETTINGS`` that has a bad value: a new option is
    covered without touching this test."""
    from esmtpfa.runtime.options import SETTINGS
    found = {}
    for setting in SETTINGS:
        if setting.parse is None:  # a boolean: only its variable can be given a value
            if setting.env:
                found[setting] = (None, setting.env, "maybe")
            continue
        for candidate in CANDIDATES:
            try:
                setting.parse(candidate)
            except ValueError:
                found[setting] = (f"--{setting.flag}={candidate}", setting.env, candidate)
                break
    return found


class EveryOptionTests(CheckConfigCase):
    """``--check-config`` with a bad value for each option: exit status 1, one PROBLEM
    line naming the option, never a traceback (before, the first bad value left the
    others unparsed and the checks that read them raised TypeError/AttributeError)."""

    def problems(self, output: str) -> list[str]:
        return [line for line in output.splitlines() if line.startswith("PROBLEM")]

    def assertOneLineEach(self, output: str, names: dict) -> None:
        self.assertNotIn("Traceback", output)
        problems = self.problems(output)
        self.assertEqual(len(problems), len(names), output)
        for setting, name in names.items():
            naming = [line for line in problems if f"{name}:" in line or f"{name} (" in line]
            self.assertEqual(len(naming), 1, f"{setting.flag}: {naming}\n{output}")

    def test_the_sweep_covers_the_options_that_parse(self):
        from esmtpfa.runtime.options import SETTINGS
        covered = {setting.flag for setting in bad_values()}
        strict = {s.flag for s in SETTINGS if s.parse not in (None, str)}
        self.assertEqual(strict - covered, set())
        self.assertGreater(len(covered), 60)

    async def test_every_flag_bad_at_once(self):
        values = {s: v for s, v in bad_values().items() if v[0] is not None}
        code, output = await self.check(*[flag for flag, _, _ in values.values()])
        self.assertEqual(code, 1, output)
        self.assertOneLineEach(output, {s: f"--{s.flag}" for s in values})

    async def test_every_environment_variable_bad_at_once(self):
        values = {s: v for s, v in bad_values().items() if v[1] is not None}
        code, output = await self.check(env={env: value for _, env, value in values.values()})
        self.assertEqual(code, 1, output)
        self.assertOneLineEach(output, {s: f"environment variable {s.env}" for s in values})

    def test_each_option_alone_is_one_problem_and_the_checks_still_run(self):
        """In process, one option at a time (a twistd each would take minutes): the
        problem names it, and every check after the options runs on typed values."""
        import io

        from esmtpfa.runtime import checkconfig
        from esmtpfa.runtime.options import Options, OptionsProblems
        maildir = os.path.join(self.directory, "maildir")
        for setting, (flag, env, value) in bad_values().items():
            for argv, environ in (([flag], {}), ([], {env: value})):
                if (flag if argv else env) is None:
                    continue
                options = Options(environ)
                with self.assertRaises(OptionsProblems) as caught:
                    options.parseOptions([*argv, "--maildir", maildir])
                [problem] = caught.exception.problems
                self.assertIn(f"--{setting.flag}", problem)
                self.assertEqual(options.problems, caught.exception.problems)
                out = io.StringIO()
                self.assertEqual(checkconfig.run(options, out=out), 1, out.getvalue())
                self.assertEqual(len(self.problems(out.getvalue())), 1, out.getvalue())

    async def test_what_the_operator_met(self):
        for args, env, name in (
                (["--log-level", "verbose"], None, "--log-level"),
                (["--workers", "two"], None, "--workers"),
                (["--rate-messages", "100/week"], None, "--rate-messages"),
                ([], {"SMTP_PORT": "25x"}, "environment variable SMTP_PORT (--port)")):
            code, output = await self.check(*args, env=env)
            self.assertEqual(code, 1, output)
            self.assertNotIn("Traceback", output)
            [problem] = self.problems(output)
            self.assertIn(name, problem)


def _spawn(argv: list[str], cwd: str, env: dict | None = None):
    """``twistd ARGV`` in ``cwd``, exactly as written (no -n or --pidfile added)."""
    import sys

    from twisted.internet import reactor

    from tests.support.processes import Collector, child_environment
    collector = Collector()
    process = reactor.spawnProcess(
        collector, sys.executable,
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", *argv],
        env=child_environment(env), path=cwd)
    return collector, process


class BesideARunningRelayTests(CheckConfigCase):
    """``twistd -n esmtpfa --check-config`` as the docs write it, in the directory of a
    running relay whose pidfile (twistd.pid, twistd's default) is there: it answered
    "Another twistd server is running" before, as twistd looked at its pidfile first."""

    async def test_check_and_print_beside_a_relay_with_a_pidfile(self):
        from twisted.internet import reactor

        from tests.support.processes import terminate, until_serving
        port, metrics = free_port(), free_port()
        common = ["--demo", "--port", str(port), "--metrics-port", str(metrics),
                  "--maildir", os.path.join(self.directory, "maildir")]
        relay, process = _spawn(["-n", "esmtpfa", *common], self.directory)
        self.addCleanup(lambda: terminate(process, relay.ended, grace=15)
                        if not relay.ended.called else None)
        await until_serving("relay", port, relay, timeout=20)
        self.assertTrue(os.path.exists(os.path.join(self.directory, "twistd.pid")))
        for action, answer in (("--check-config", "configuration ok"),
                               ("--print-config", f"port = {port}  # --port")):
            check, _ = _spawn(["-n", "esmtpfa", action, *common], self.directory)
            code = await check.ended.addTimeout(30, reactor)
            self.assertEqual(code, 0, check.text)
            self.assertIn(answer, check.text)


# -- --print-config --------------------------------------------------------------------------

class PrintConfigTests(CheckConfigCase):
    """``--print-config``: every setting, its effective value and its source, like
    ``postconf``; ``-n`` only the ones not at their default, like ``postconf -n``."""

    async def print_config(self, *args: str, env: dict | None = None) -> tuple[int, str]:
        process = Twistd(["--print-config", *args], env=env)
        process.start()
        self.addCleanup(process.stop)
        code = await process.exited()
        return code, process.output

    @staticmethod
    def parsed(output: str) -> dict[str, tuple[str, str]]:
        settings = {}
        for line in output.splitlines():
            name, _, rest = line.partition(" = ")
            value, _, source = rest.partition("  # ")
            settings[name] = (value, source)
        return settings

    async def test_every_setting_once_with_value_and_source(self):
        from esmtpfa.runtime.options import ACTIONS, SETTINGS
        code, output = await self.print_config(
            "--port", "42587", "--log-level", "debug",
            env={"SMTP_PORT": "42599", "SMTP_MAX_RECIPIENTS": "7"})
        self.assertEqual(code, 0, output)
        names = [line.partition(" = ")[0] for line in output.splitlines()]
        self.assertEqual(names, sorted(s.flag for s in SETTINGS if s.flag not in ACTIONS))
        settings = self.parsed(output)
        self.assertEqual(settings["port"], ("42599", "env SMTP_PORT (overrides --port)"))
        self.assertEqual(settings["log-level"], ("debug", "--log-level"))
        self.assertEqual(settings["max-recipients"], ("7", "env SMTP_MAX_RECIPIENTS"))
        self.assertEqual(settings["idle-timeout"], ("300", "default"))
        self.assertEqual(settings["plain"], ("false", "default"))

    async def test_non_default_only(self):
        for flag in ("-n", "--non-default"):
            code, output = await self.print_config(
                flag, "--port", "2526", "--demo", env={"LOG_LEVEL": "debug"})
            self.assertEqual(code, 0, output)
            settings = self.parsed(output)
            # --metrics-port: the test's own (tests/support/processes.py)
            self.assertEqual(set(settings), {"port", "log-level", "metrics-port", "demo",
                                             "plain", "allow-insecure-auth", "addr",
                                             "http-addr"})
            self.assertEqual(settings["port"], ("2526", "--port"))
            self.assertEqual(settings["plain"], ("true", "--demo"))

    async def test_credentials_are_redacted(self):
        secrets = {"RELAY_PASS": "relay-pass-S1", "LOG_RECIPIENTS_KEY": "hmac-key-S6",
                   "STATE_URL": "redis://:redis-pw-S2@127.0.0.1:6379/0",
                   "SPOOL_URL": "amqp://mailer:amqp-pw-S3@127.0.0.1/mail",
                   "PROVIDER_CONFIG_SERVICE": "https://ops:svc-pw-S4@cfg.example/p.json",
                   "PROVIDER_CONFIG_SERVICE_TOKEN": "bearer-S5"}
        code, output = await self.print_config(
            "--relay-addr", "127.0.0.1:2525", "--relay-user", "mailer",
            "--log-recipients", "hash", env=secrets)
        self.assertEqual(code, 0, output)
        for secret in ("relay-pass-S1", "redis-pw-S2", "amqp-pw-S3", "svc-pw-S4",
                       "bearer-S5", "hmac-key-S6"):
            self.assertNotIn(secret, output)
        settings = self.parsed(output)
        self.assertEqual(settings["relay-pass"], ("(redacted)", "env RELAY_PASS"))
        self.assertEqual(settings["state-url"][0], "redis://(redacted)@127.0.0.1:6379/0")
        self.assertEqual(settings["spool-url"][0], "amqp://(redacted)@127.0.0.1/mail")
        self.assertEqual(settings["relay-user"], ("mailer", "--relay-user"))

    async def test_a_bad_value_is_named_and_the_status_is_not_zero(self):
        code, output = await self.print_config(env={"SMTP_PORT": "25x"})
        self.assertEqual(code, 1, output)
        self.assertNotIn("Traceback", output)
        self.assertEqual(self.parsed(output)["port"], ("(invalid)", "env SMTP_PORT"))
        self.assertIn("esmtpfa: environment variable SMTP_PORT (--port): expected a whole "
                      "number, got '25x'", output)


class VersionTests(CheckConfigCase):
    async def test_esmtpfa_version_from_the_package_metadata(self):
        from importlib import metadata

        import twisted
        process = Twistd(["--version"])
        process.start()
        self.addCleanup(process.stop)
        code = await process.exited()
        self.assertEqual(code, 0, process.output)
        self.assertEqual(process.output.splitlines()[:2],
                         [f"esmtpfa {metadata.version('esmtpfa')}",
                          f"Twisted {twisted.__version__}"])
