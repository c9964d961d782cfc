"""The relay's flags and environment variables, and ``twistd esmtpfa`` with two upstreams."""

from __future__ import annotations

from twisted.python import usage
from twisted.trial import unittest

from esmtpfa.relay.rewrite import RelayFromRewriter
from esmtpfa.relay.upstream import SMTPRelay
from esmtpfa.runtime.service import build_relay
from tests.support.options import parse_options
from tests.support.ports import free_port
from tests.support.processes import Twistd, run_tool
from tests.support.resources import resources
from tests.support.sink import SmtpSink
from tests.test_end_to_end import swaks_args


class OptionTests(unittest.TestCase):

    def test_defaults(self):
        options = parse_options("--relay-addr", "smtp.example.com")
        self.assertEqual((options["relay-pool-size"], options["relay-pool-idle-timeout"],
                          options["relay-breaker-failures"], options["relay-breaker-cooldown"],
                          options["relay-auth-mech"], options["relay-data-timeout"]),
                         (20, 30.0, 3, 30.0, None, 600.0))

    def test_several_upstreams(self):
        options = parse_options("--relay-addr", "a.example, b.example:2525,[::1]:587,192.0.2.9",
                                "--relay-port", "587",
                                "--relay-user", "u", "--relay-pass", "p", "--relay-auth-mech",
                                "SCRAM-SHA-1", "--relay-pool-size", "4")
        relay = build_relay(options, resources(), "relay.test")
        self.addCleanup(relay.close)
        self.assertIsInstance(relay, SMTPRelay)
        settings = [u.settings for u in relay.upstreams]
        self.assertEqual([(s.host, s.port) for s in settings],
                         [("a.example", 587), ("b.example", 2525), ("::1", 587),
                          ("192.0.2.9", 587)])
        # Each is verified for its own name unless --relay-tls-server-name says otherwise.
        self.assertEqual([s.tls_server_name for s in settings],
                         ["a.example", "b.example", "::1", "192.0.2.9"])
        self.assertTrue(all(s.auth_mechanism == "SCRAM-SHA-1" for s in settings))
        self.assertEqual(relay.pool_settings.size, 4)
        self.assertIn("failover", relay.description)

    def test_environment(self):
        options = parse_options(RELAY_ADDR="a.example,b.example:26", RELAY_AUTH_MECH="cram-md5",
                                RELAY_POOL_SIZE="7", RELAY_POOL_IDLE_TIMEOUT="2.5",
                                RELAY_BREAKER_FAILURES="5", RELAY_BREAKER_COOLDOWN="9",
                                RELAY_TLS_SERVER_NAME="smtp.example.com",
                                RELAY_FROM="r@example.com")
        relay = build_relay(options, resources(), "relay.test")
        self.addCleanup(relay.close)
        self.assertIsInstance(relay, RelayFromRewriter)
        inner = relay.inner
        self.assertEqual([u.settings.tls_server_name for u in inner.upstreams],
                         ["smtp.example.com"] * 2)
        self.assertEqual(inner.upstreams[0].settings.auth_mechanism, "CRAM-MD5")
        p = inner.pool_settings
        self.assertEqual((p.size, p.idle_timeout, p.breaker_failures, p.breaker_cooldown),
                         (7, 2.5, 5, 9.0))

    def test_bad_values_name_the_flag_or_variable(self):
        for args, env, expected in (
                (("--relay-addr", "a.example:99999"), {}, "--relay-addr"),
                (("--relay-addr", "a,,b"), {}, "--relay-addr"),
                ((), {"RELAY_ADDR": "[::1"}, "--relay-addr"),
                (("--relay-auth-mech", "GSSAPI"), {}, "--relay-auth-mech"),
                ((), {"RELAY_POOL_SIZE": "0"}, "RELAY_POOL_SIZE"),
                ((), {"RELAY_BREAKER_COOLDOWN": "-1"}, "RELAY_BREAKER_COOLDOWN")):
            with self.assertRaises(usage.UsageError) as caught:
                parse_options(*args, **env)
            self.assertIn(expected, str(caught.exception))


class TwistdFailoverTests(unittest.TestCase):
    """``twistd esmtpfa`` as users run it: the first upstream is down, swaks is answered
    250 and the message is at the second one (smtp-sink)."""

    timeout = 60

    async def test_first_upstream_down(self):
        sink = SmtpSink()
        self.addCleanup(sink.close)
        await sink.start()
        port = free_port()
        relay = Twistd(["--demo", "--port", str(port), "--metrics-port", "0"],
                       env={"RELAY_ADDR": f"127.0.0.1:{free_port()},127.0.0.1:{sink.port}",
                            "RELAY_STARTTLS": "none"})
        relay.start()
        self.addCleanup(relay.stop)
        await relay.wait_for_port(port)
        output, code = await run_tool("swaks", *swaks_args(port))
        self.assertEqual(code, 0, output)
        self.assertIn("250 2.0.0 Message accepted as urn:uuid:", output)
        message_id = output.split("Message accepted as ")[1].split()[0]
        [message] = sink.messages()
        self.assertIn(f"id {message_id};".encode(), message.content)
        await relay.stop()
        self.assertIn("relay attempt failed", relay.output)  # the dead one, logged
        self.assertIn("at connect", relay.output)
