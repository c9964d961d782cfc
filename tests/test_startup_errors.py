"""How ``twistd esmtpfa`` starts, and how it refuses to, as an operator sees it: real
twistd processes (tests/support/processes.py) on loopback.

* A bad value is one line naming the setting: not twistd's 329-line ``--help`` first.
* A listener that cannot bind is one line naming the listener, address and port, with
  exit status 1: not a traceback.  For every listener (SMTP, submissions, HTTP,
  metrics), with and without ``--workers``.
* An environment variable that overrides a flag given on the command line is one
  warning naming both (never a secret's value).
* The Twisted self-check's port and factories say nothing in the info log.
* ``--workers`` with twistd's ``--logfile``: the supervisor writes every worker's lines
  to that file, which SIGUSR1 rotates as twistd's own.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sys

from twisted.internet import reactor, task
from twisted.trial import unittest

from tests.support.certs import CertificateAuthority
from tests.support.ports import free_port
from tests.support.processes import (
    PROJECT,
    Collector,
    Twistd,
    child_environment,
    terminate,
    until_serving,
)

RELAY_SECRET_FLAG = "flag-SECRET-5e7a"
RELAY_SECRET_ENV = "env-SECRET-0b3c"


class StartupCase(unittest.TestCase):
    timeout = 120

    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)

    def twistd(self, *args: str, env: dict | None = None) -> Twistd:
        process = Twistd([*args, "--maildir", os.path.join(self.directory, "maildir")],
                         env=env)
        process.start()
        self.addCleanup(process.stop)
        return process

    async def run_to_end(self, *args: str, env: dict | None = None) -> tuple[int, str]:
        process = self.twistd(*args, env=env)
        code = await process.exited()
        return code, process.output


class OneLineTests(StartupCase):
    """A value that does not parse: one line naming it, exit status 1."""

    async def test_bad_values_are_one_line_naming_the_setting(self):
        for args, env, name in (
                (["--log-level", "verbose"], None, "--log-level"),
                (["--workers", "two"], None, "--workers"),
                (["--rate-messages", "100/week"], None, "--rate-messages"),
                (["--demo"], {"SMTP_PORT": "25x"}, "SMTP_PORT"),
                (["--prot", "25"], None, "--prot")):
            code, output = await self.run_to_end(*args, env=env)
            self.assertEqual(code, 1, output)
            lines = [line for line in output.splitlines() if line.strip()]
            self.assertEqual(len(lines), 1, output)
            self.assertTrue(lines[0].startswith("esmtpfa: "), output)
            self.assertIn(name, lines[0])

    async def test_several_bad_values_say_the_first_and_how_many_more(self):
        code, output = await self.run_to_end("--port", "25x", "--workers", "two")
        self.assertEqual(code, 1, output)
        [line] = [line for line in output.splitlines() if line.strip()]
        self.assertIn("--port", line)
        self.assertIn("and 1 more: --check-config lists them", line)


class BindErrorTests(StartupCase):
    """Each listener on a port something else holds, and on an address this host does
    not have: one line naming it, exit status 1, no traceback."""

    def setUp(self):
        super().setUp()
        ca = CertificateAuthority(os.path.join(self.directory, "ca"))
        self.leaf = ca.issue("relay.test", "127.0.0.1")

    def hold(self) -> int:
        """A port held by another listener for the test's duration."""
        holder = socket.socket()
        holder.bind(("127.0.0.1", free_port()))
        holder.listen(1)
        self.addCleanup(holder.close)
        return holder.getsockname()[1]

    def listeners(self, port: int) -> list[tuple[str, list[str]]]:
        """(what the error names, the arguments that put that listener on ``port``)."""
        tls = ["--tls-cert", self.leaf.cert_path, "--tls-key", self.leaf.key_path]
        return [
            ("SMTP listener (--addr, --port)", ["--plain", "--port", str(port)]),
            ("submissions (implicit TLS) listener (--addr, --tls-port)",
             ["--tls", "--tls-port", str(port), *tls]),
            ("HTTP listener (--http-addr, --http-port)",
             ["--http", "--http-port", str(port), "--http-allow-anonymous"]),
            ("metrics listener (--metrics-addr, --metrics-port)",
             ["--plain", "--metrics-port", str(port)]),
            ("legacy-plain listener for old devices (--legacy-plain)",
             ["--plain", "--legacy-plain", f"127.0.0.1:{port}",
              "--legacy-networks", "127.0.0.0/8"]),
            ("legacy-tls listener for old devices (--legacy-tls)",
             ["--plain", "--legacy-tls", f"127.0.0.1:{port}",
              "--legacy-networks", "127.0.0.0/8", *tls]),
        ]

    async def assertOneLine(self, args: list[str], what: str, address: str, port: int):
        defaults = ["--addr", "127.0.0.1", "--http-addr", "127.0.0.1",
                    "--port", str(free_port())]
        if "--metrics-port" not in args:
            defaults += ["--metrics-port", str(free_port())]
        code, output = await self.run_to_end(*defaults, *args)
        self.assertEqual(code, 1, output)
        self.assertNotIn("Traceback", output)
        [line] = [line for line in output.splitlines() if "cannot listen" in line]
        self.assertIn(f"esmtpfa: {what}: cannot listen on [{address}]:{port}: ", line)

    async def check_every_listener(self, *mode: str):
        port = self.hold()
        for what, args in self.listeners(port):
            await self.assertOneLine([*mode, *args], what, "127.0.0.1", port)
        port = free_port()
        await self.assertOneLine([*mode, "--plain", "--port", str(port), "--addr",
                                  "192.0.2.1"],  # TEST-NET-1: on no host; nothing is sent
                                 "SMTP listener (--addr, --port)", "192.0.2.1", port)

    async def test_one_process(self):
        await self.check_every_listener()

    async def test_workers(self):
        await self.check_every_listener("--workers", "2")


class OverrideWarningTests(StartupCase):
    """``SMTP_PORT`` beat ``--port`` in silence: now the log says so, once, naming the
    variable and the flag (with their values, except a secret's)."""

    async def test_environment_over_a_flag_is_one_warning(self):
        flag_port, env_port = free_port(), free_port()
        process = self.twistd(
            "--demo", "--port", str(flag_port), "--relay-addr", f"127.0.0.1:{free_port()}",
            "--relay-user", "mailer", "--relay-pass", RELAY_SECRET_FLAG,
            env={"SMTP_PORT": str(env_port), "RELAY_PASS": RELAY_SECRET_ENV})
        await process.wait_for_port(env_port)
        port_line = (await process.wait_for_lines(r"SMTP_PORT.*overrides --port"))[0]
        self.assertIn(f"SMTP_PORT={env_port} overrides --port {flag_port}", port_line)
        self.assertIn("#warn]", port_line)
        pass_line = (await process.wait_for_lines(r"RELAY_PASS.*overrides --relay-pass"))[0]
        self.assertIn("#warn]", pass_line)
        self.assertEqual(len([line for line in process.output.splitlines()
                              if "overrides --" in line]), 2, process.output)
        for secret in (RELAY_SECRET_FLAG, RELAY_SECRET_ENV):
            self.assertNotIn(secret, process.output)
        # The Twisted self-check (esmtpfa.common.internals) opened and closed a port of its
        # own: none of that is news in the info log.
        self.assertNotRegex(process.output, r"\[-\] Factory starting on \d+")
        self.assertNotIn("Starting factory <twisted.internet.protocol", process.output)
        self.assertNotIn("Closed)", process.output)


class WorkersLogFileTests(StartupCase):
    """``twistd --logfile FILE esmtpfa --workers 2``: refused before; now the
    supervisor owns FILE, every worker's lines are in it, and SIGUSR1 rotates it."""

    async def test_workers_log_to_the_supervisors_file_which_rotates(self):
        log_file = os.path.join(self.directory, "relay.log")
        port = free_port()
        collector = Collector()
        argv = ["-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
                "--logfile", log_file, "esmtpfa", "--demo", "--workers", "2",
                "--port", str(port), "--metrics-port", str(free_port()),
                "--maildir", os.path.join(self.directory, "maildir")]
        process = reactor.spawnProcess(collector, sys.executable, [sys.executable, *argv],
                                       env=child_environment(), path=PROJECT)
        self.addCleanup(lambda: None if collector.ended.called
                        else terminate(process, collector.ended, grace=30))
        await until_serving("twistd", port, collector, timeout=30)
        for slot in (1, 2):
            await self.file_has(log_file, rf"\[worker {slot} esmtpfa#info\] SMTP plain")
            await self.file_has(log_file, rf"\[esmtpfa.workers#info\] worker {slot} serving")

        process.signalProcess(signal.SIGUSR1)
        await self.file_has(log_file + ".1", r"\[worker 1 esmtpfa#info\]")
        # A session after the rotation: its worker's lines go to the new file.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            client.settimeout(5)
            self.assertTrue(client.recv(512).startswith(b"220 "))
            client.sendall(b"QUIT\r\n")
            client.recv(512)
            session = f"connect from [127.0.0.1]:{client.getsockname()[1]} "
        await self.file_has(log_file, re.escape(session))
        self.assertNotIn(session, self.read(log_file + ".1"))
        await terminate(process, collector.ended, grace=30)
        self.assertEqual(collector.text, "")  # nothing on the terminal: all in the file

    @staticmethod
    def read(path: str) -> str:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    async def file_has(self, path: str, pattern: str, timeout: float = 15.0) -> None:
        deadline = reactor.seconds() + timeout
        while not re.search(pattern, self.read(path)):
            if reactor.seconds() > deadline:
                raise AssertionError(f"{path}: no line matching {pattern!r}:\n"
                                     f"{self.read(path)}")
            await task.deferLater(reactor, 0.1, lambda: None)

