"""A real RabbitMQ (Debian ``rabbitmq-server``) of the test's own, on loopback.

Nothing is shared with a system broker: the node has its own name
(``RABBITMQ_NODENAME``), data directory (``RABBITMQ_MNESIA_BASE``), log directory
(``RABBITMQ_LOG_BASE``), configuration file (``RABBITMQ_CONFIG_FILE``: listeners on
``127.0.0.1`` only, a user with a password, no plugins), Erlang cookie (in a
temporary ``HOME``) and ``epmd``: one started by the test on a free port with
``-address 127.0.0.1`` (``ERL_EPMD_PORT``), so neither the distribution port
(``RABBITMQ_DIST_PORT``, bound to 127.0.0.1 by ``-kernel inet_dist_use_interface``)
nor the port mapper is reachable from elsewhere, and a system epmd is never used.
Every port comes from ``free_port()`` (outside the ephemeral range), so a restart
gets its ports back.

The broker runs in the foreground as the test's child (``subprocess``, polled from the
reactor: it outlives the test that started it, which trial would not allow of a
reactor process).  ``ctl`` runs ``rabbitmqctl`` against it.  Debian's
``/usr/lib/rabbitmq/bin/rabbitmq-server`` is a shell script that starts the Erlang VM
as its own child and stops it gracefully when it gets SIGTERM: ``stop`` signals the
script, and if that takes too long, SIGKILLs the VM by the PID it wrote to
``RABBITMQ_PID_FILE``.  ``kill`` SIGKILLs the VM at once (a crash).  ``start`` after
``stop`` is a broker restart with the same data.  ``close`` also stops epmd and
removes the directory.  Booting takes several seconds: test classes share one broker
(``SharedRabbitMQ``).

A missing ``rabbitmq-server`` fails the test loudly (``.ci/run`` installs it); the tests
are never skipped.

Run as ``python -m tests.support.rabbitmq claim|start PREFIX`` (URL in
``$SPOOL_TEST_URL``) it is a relay's consumer that claims one message (and with
``start`` records it as started), prints ``CLAIMED <id>`` and waits to be killed:
the crash the redelivery rule is about.
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile

from twisted.internet import defer, reactor, task

from tests.support.ports import free_port

SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
EPMD = "epmd"
INSTALL_HINT = ("rabbitmq-server is not installed: the AMQP spool tests need a real "
                "broker; run .ci/run (apt-get install rabbitmq-server)")
USER = "esmtpfa-test"
#: What the broker answers to the AMQP 0-9-1 protocol header: a method frame on
#: channel 0 (connection.start).
_PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"

CONFIG = """\
listeners.tcp.1 = 127.0.0.1:{port}
default_user = {user}
default_pass = {password}
default_vhost = /
loopback_users = none
log.console = true
log.console.level = warning
log.file = false
"""

TLS_CONFIG = """\
listeners.ssl.1 = 127.0.0.1:{tls_port}
ssl_options.cacertfile = {ca}
ssl_options.certfile = {cert}
ssl_options.keyfile = {key}
ssl_options.verify = verify_none
ssl_options.fail_if_no_peer_cert = false
"""

_running: dict[int, "RabbitMQServer"] = {}


def require_server() -> str:
    if not os.path.exists(SERVER):
        raise AssertionError(INSTALL_HINT)
    epmd = shutil.which(EPMD)
    if epmd is None:
        raise AssertionError(INSTALL_HINT + " (epmd, from erlang-base, is missing)")
    return epmd


class RabbitMQServer:
    """One broker node.  ``url`` (and ``tls_url`` when ``tls`` is a
    ``tests.support.certs.Leaf``; ``ca_path`` is then the CA that signed it) is what a
    spool is given."""

    def __init__(self, password: str | None = None, tls=None, ca_path: str | None = None):
        self.password = password or "pw-" + secrets.token_hex(8)
        self.tls, self.ca_path = tls, ca_path
        self.port = free_port()
        self.dist_port = free_port()
        self.epmd_port = free_port()
        self.tls_port = free_port() if tls is not None else None
        self.directory = tempfile.mkdtemp(prefix="esmtpfa-rabbitmq-")
        self.home = os.path.join(self.directory, "home")
        self.pid_file = os.path.join(self.directory, "rabbitmq.pid")
        self.node = f"esmtpfa-test-{self.port}@localhost"
        self._output_path = os.path.join(self.directory, "output.log")
        self._server: subprocess.Popen | None = None
        self._epmd: subprocess.Popen | None = None
        self.vm_pid: int | None = None
        self._write_files()

    # -- files ----------------------------------------------------------------------------

    def _write_files(self) -> None:
        os.makedirs(self.home, mode=0o700)
        for name in ("mnesia", "log"):
            os.makedirs(os.path.join(self.directory, name))
        cookie = os.path.join(self.home, ".erlang.cookie")
        with open(cookie, "w") as f:
            f.write(secrets.token_hex(16).upper())
        os.chmod(cookie, 0o400)
        config = CONFIG.format(port=self.port, user=USER, password=self.password)
        if self.tls is not None:
            config += TLS_CONFIG.format(tls_port=self.tls_port, ca=self.ca_path,
                                        cert=self.tls.cert_path, key=self.tls.key_path)
        with open(os.path.join(self.directory, "rabbitmq.conf"), "w") as f:
            f.write(config)
        with open(os.path.join(self.directory, "enabled_plugins"), "w") as f:
            f.write("[].\n")
        open(os.path.join(self.directory, "rabbitmq-env.conf"), "w").close()

    def _environment(self) -> dict[str, str]:
        d = self.directory
        return {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "HOME": self.home,
            "LANG": "C.UTF-8",
            "ERL_EPMD_PORT": str(self.epmd_port),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": os.path.join(d, "mnesia"),
            "RABBITMQ_LOG_BASE": os.path.join(d, "log"),
            "RABBITMQ_CONFIG_FILE": os.path.join(d, "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": os.path.join(d, "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": os.path.join(d, "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": os.path.join(d, "enabled_plugins"),
            "RABBITMQ_PLUGINS_EXPAND_DIR": os.path.join(d, "plugins-expand"),
            "RABBITMQ_PID_FILE": self.pid_file,
            "RABBITMQ_SERVER_START_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    # -- URLs -----------------------------------------------------------------------------

    def url_with(self, password: str, tls: bool = False, host: str = "127.0.0.1") -> str:
        if tls:
            return f"amqps://{USER}:{password}@{host}:{self.tls_port}/%2F"
        return f"amqp://{USER}:{password}@{host}:{self.port}/%2F"

    @property
    def url(self) -> str:
        return self.url_with(self.password)

    @property
    def tls_url(self) -> str:
        return self.url_with(self.password, tls=True)

    @property
    def running(self) -> bool:
        return self._server is not None and self._server.poll() is None

    @property
    def output(self) -> str:
        try:
            with open(self._output_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    # -- processes ------------------------------------------------------------------------
    # subprocess, not reactor.spawnProcess: the broker outlives the test that started it
    # (the class shares it), and trial fails a test that leaves reactor selectables.

    @defer.inlineCallbacks
    def start(self, timeout: float = 60.0):
        epmd = require_server()
        if self._epmd is None or self._epmd.poll() is not None:
            self._epmd = subprocess.Popen(
                [epmd, "-address", "127.0.0.1", "-port", str(self.epmd_port)],
                cwd=self.directory, env={"PATH": os.environ.get("PATH", "")},
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL)
            _running[id(self)] = self
            yield self._until(lambda: _accepts(self.epmd_port), "epmd", self._epmd, 10)
        with open(self._output_path, "ab") as output:
            self._server = subprocess.Popen(
                [SERVER], cwd=self.directory, env=self._environment(),
                stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT)
        _running[id(self)] = self
        yield self._until(lambda: _answers_amqp(self.port), "rabbitmq-server",
                          self._server, timeout)
        self.vm_pid = _read_pid(self.pid_file)
        return self

    @defer.inlineCallbacks
    def _until(self, ready, name: str, process: subprocess.Popen, timeout: float):
        """Poll ``ready()`` (bounded); fails loudly, with the output, if the process
        ends first or ``timeout`` passes."""
        deadline = reactor.seconds() + timeout
        while not ready():
            if process.poll() is not None:
                raise AssertionError(f"{name} exited early ({process.returncode}):\n"
                                     f"{self.output}")
            if reactor.seconds() > deadline:
                raise AssertionError(f"{name} did not answer within {timeout:g} s:\n"
                                     f"{self.output}")
            yield task.deferLater(reactor, 0.1, lambda: None)

    @defer.inlineCallbacks
    def stop(self, grace: float = 30.0):
        """A clean shutdown (SIGTERM to the script, which stops the VM and waits for
        it); SIGKILL to both after ``grace``."""
        if not self.running:
            return
        vm = self.vm_pid or _read_pid(self.pid_file)
        self._server.send_signal(signal.SIGTERM)
        ended = yield _exited(self._server, grace)
        if not ended:
            _kill(vm)
            _kill(self._server.pid)
            yield _exited(self._server, 10)
        yield _gone(vm)

    @defer.inlineCallbacks
    def kill(self):
        """SIGKILL the Erlang VM: a broker crash.  Fires once it is gone."""
        if not self.running:
            return
        vm = self.vm_pid or _read_pid(self.pid_file)
        _kill(vm)
        yield _gone(vm)
        yield _exited(self._server, 10)

    def ctl(self, *args: str) -> defer.Deferred:
        """``rabbitmqctl ARGS`` against this node; fires with (output, exit code)."""
        from twisted.internet import utils
        ctl = os.path.join(os.path.dirname(SERVER), "rabbitmqctl")
        d = utils.getProcessOutputAndValue(ctl, ["-n", self.node, *args],
                                           env=self._environment(), path=self.directory)
        return d.addCallback(lambda r: ((r[0] + r[1]).decode("utf-8", "replace"), r[2]))

    @defer.inlineCallbacks
    def restart(self):
        yield self.stop()
        yield self.start()

    @defer.inlineCallbacks
    def close(self):
        """Stop the broker and epmd, and remove the directory."""
        try:
            yield self.stop()
        finally:
            if self._epmd is not None and self._epmd.poll() is None:
                self._epmd.terminate()
                if not (yield _exited(self._epmd, 5)):
                    self._epmd.kill()
                    yield _exited(self._epmd, 5)
            _running.pop(id(self), None)
            shutil.rmtree(self.directory, ignore_errors=True)

    def _abandon(self) -> None:
        """At interpreter exit: whatever still runs is killed by its PID."""
        for pid in (self.vm_pid, getattr(self._server, "pid", None),
                    getattr(self._epmd, "pid", None)):
            _kill(pid)
        for process in (self._server, self._epmd):
            if process is not None:
                try:
                    process.wait(5)
                except subprocess.TimeoutExpired:
                    pass
        shutil.rmtree(self.directory, ignore_errors=True)


@defer.inlineCallbacks
def _exited(process: subprocess.Popen, seconds: float):
    """Whether ``process`` ended (and was reaped) within ``seconds``."""
    deadline = reactor.seconds() + seconds
    while process.poll() is None:
        if reactor.seconds() > deadline:
            return False
        yield task.deferLater(reactor, 0.05, lambda: None)
    return True


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _answers_amqp(port: int) -> bool:
    """The broker answers the AMQP 0-9-1 protocol header with ``connection.start``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
            sock.settimeout(2.0)
            sock.sendall(_PROTOCOL_HEADER)
            return sock.recv(7)[:3] == b"\x01\x00\x00"
    except OSError:
        return False


def _read_pid(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _kill(pid: int | None) -> None:
    if pid:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


@defer.inlineCallbacks
def _gone(pid: int | None, seconds: float = 10.0):
    """The VM is the script's child, not ours: polled until it is gone (bounded)."""
    deadline = reactor.seconds() + seconds
    while pid and reactor.seconds() < deadline:
        try:
            os.kill(pid, 0)
        except OSError:
            return
        yield task.deferLater(reactor, 0.05, lambda: None)


@atexit.register
def _abandon_all() -> None:
    for server in list(_running.values()):
        server._abandon()


class SharedRabbitMQ:
    """Mixin: one broker for the whole class, started by the first test's ``setUp``,
    closed after the last test (the broker takes seconds to boot)."""

    rabbitmq_options: dict = {}
    rabbitmq: RabbitMQServer | None = None
    _tests_left = 0
    _boot_failure = None  # why the class's broker did not start: every test fails with it

    def setUp(self):
        cls = type(self)
        started = defer.succeed(None)
        if cls.rabbitmq is None:
            cls._boot_failure = None
            cls._tests_left = len([n for n in dir(cls) if n.startswith("test")])
            cls.rabbitmq = RabbitMQServer(**cls.make_rabbitmq_options())
            started = cls.rabbitmq.start()

            def failed(failure):
                cls._boot_failure = failure
                return failure
            started.addErrback(failed)
        elif cls._boot_failure is not None:
            started = defer.fail(cls._boot_failure)
        self.addCleanup(self._release_rabbitmq)
        return started.addCallback(lambda _: super(SharedRabbitMQ, self).setUp())

    @classmethod
    def make_rabbitmq_options(cls) -> dict:
        return dict(cls.rabbitmq_options)

    @classmethod
    def _release_rabbitmq(cls):
        cls._tests_left -= 1
        if cls._tests_left <= 0 and cls.rabbitmq is not None:
            server, cls.rabbitmq = cls.rabbitmq, None
            return server.close()
        return None


# -- a consumer to kill -------------------------------------------------------------------

def _consumer_main(mode: str, prefix: str) -> None:  # pragma: no cover - a child process
    from esmtpfa.spool.amqp import AMQPSpool
    from tests.support.resources import test_threads

    spool = AMQPSpool(os.environ["SPOOL_TEST_URL"], reactor, prefix=prefix, prefetch=1,
                      retry_delays=(1, 2), threads=test_threads())

    async def run() -> None:
        await spool.start()
        while True:
            messages = await spool.claim(1)
            if messages:
                break
            await task.deferLater(reactor, 0.05, lambda: None)
        message = messages[0]
        if mode == "start":
            await spool.started(message, message.pending)
        sys.stdout.write(f"CLAIMED {message.entry.id}\n")
        sys.stdout.flush()

    def failed(failure) -> None:
        sys.stdout.write(f"FAILED {failure.getErrorMessage()}\n")
        sys.stdout.flush()
        reactor.stop()
    defer.ensureDeferred(run()).addErrback(failed)
    reactor.run()


if __name__ == "__main__":  # pragma: no cover
    _consumer_main(sys.argv[1], sys.argv[2])


__all__ = ["RabbitMQServer", "SharedRabbitMQ", "USER"]
