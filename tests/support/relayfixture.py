"""esmtpfa's whole ``RelayService`` in-process on loopback, in front of a real upstream.

Built from the same ``tap.Options`` a ``twistd esmtpfa`` command line goes through, with
generated certificates and a recording SMTP upstream, so tests exercise the wiring
users run, not a hand-assembled subset.

Every listener is on loopback with a free port: SMTP (``plain_port``, ``tls_port``),
metrics and health (``metrics_port``) and, when the extra arguments include ``--http``,
the submission API (``http_port``).  ``config_path`` is the provider file the relay
watches; ``write_providers`` replaces it.
"""

from __future__ import annotations

import os
import ssl

from twisted.internet import defer, threads

from esmtpfa.runtime.service import RelayService
from esmtpfa.runtime.tap import Options, makeService
from tests.support.builders import (
    OFFICE,
    OFFICE_PASSWORD,
    OFFICE_USER,
    providers_document,
    userpass_provider,
)
from tests.support.certs import CertificateAuthority
from tests.support.rawsmtp import RawSMTP
from tests.support.upstream import RecordingUpstream

USER, PASSWORD = OFFICE_USER, OFFICE_PASSWORD
#: A device whose password has colons: the PLAIN and Basic parsers must not split on them.
PRINTERS = userpass_provider("printers", "printer1", "p:with:colons")
PROVIDERS = providers_document(OFFICE, PRINTERS)


class RelayFixture:
    def __init__(self, directory: str, *extra_args: str, env: dict | None = None,
                 providers: str = PROVIDERS, upstream: RecordingUpstream | None = None,
                 relay: bool = True):
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        self.extra_args = list(extra_args)
        self.env = env or {}
        self.providers = providers
        self.ca = CertificateAuthority(os.path.join(directory, "ca"))
        self.leaf = self.ca.issue("relay.test", "localhost", "127.0.0.1")
        self.upstream = upstream if upstream is not None else (
            RecordingUpstream() if relay else None)
        self.service: RelayService | None = None

    @defer.inlineCallbacks
    def start(self, *, while_starting=None):
        """Start the relay.  With ``while_starting``, as twistd does: the service from
        ``makeService``, its listeners bound (``privilegedStartService``), then
        ``while_starting()``, then ``startService``."""
        if self.upstream is not None and not self.upstream.port:
            yield defer.maybeDeferred(self.upstream.start)
        config = self.config_path
        self.write_providers(self.providers)
        args = ["--plain", "--tls", "--addr", "127.0.0.1", "--port", "0", "--tls-port", "0",
                "--tls-cert", self.leaf.cert_path, "--tls-key", self.leaf.key_path,
                "--config", config, "--hostname", "relay.test",
                "--maildir", os.path.join(self.directory, "maildir"),
                "--metrics-addr", "127.0.0.1", "--metrics-port", "0",
                "--http-addr", "127.0.0.1", "--http-port", "0"]
        if self.upstream is not None:
            args += ["--relay-addr", "127.0.0.1", "--relay-port", str(self.upstream.port)]
        options = Options(environ=self.env)
        options.parseOptions(args + self.extra_args)
        self.options = options
        if while_starting is None:
            self.service = RelayService(options)
        else:
            self.service = makeService(options)
            self.service.privilegedStartService()
            while_starting()
        self.service.startService()
        ports = yield self.service.listening_ports()
        self.plain_port = ports["plain"].getHost().port
        self.tls_port = ports["tls"].getHost().port
        self.metrics_port = ports["metrics"].getHost().port
        self.http_port = ports["http"].getHost().port if "http" in ports else None

    @property
    def config_path(self) -> str:
        return os.path.join(self.directory, "providers.yaml")

    def write_providers(self, text: str) -> None:
        """Replace the provider file atomically, as a careful operator (or editor) does."""
        temporary = self.config_path + ".new"
        with open(temporary, "w") as f:
            f.write(text)
        os.replace(temporary, self.config_path)

    @defer.inlineCallbacks
    def stop(self):
        if self.service is not None and self.service.running:
            yield self.service.stopService()
        if self.upstream is not None:
            yield defer.maybeDeferred(self.upstream.stop)

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca.cert_path)

    def connect(self, implicit_tls: bool = False, server_hostname: str = "relay.test",
                **kwargs) -> RawSMTP:
        if implicit_tls:
            return RawSMTP("127.0.0.1", self.tls_port, tls=self.client_context(),
                           server_hostname=server_hostname, **kwargs)
        return RawSMTP("127.0.0.1", self.plain_port, **kwargs)

    def secure_session(self, helo: str = "client.example",
                       server_hostname: str = "relay.test") -> RawSMTP:
        """Connected, STARTTLS done, EHLO sent: ready for AUTH."""
        client = self.connect()
        client.command(f"EHLO {helo}")
        code, _ = client.starttls(self.client_context(), server_hostname=server_hostname)
        assert code == 220, code
        client.command(f"EHLO {helo}")
        return client

    def run(self, script, *args):
        """Run a blocking client script in a thread; its exceptions fail the test."""
        return threads.deferToThread(script, *args)
