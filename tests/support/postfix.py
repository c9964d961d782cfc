"""A private Postfix ``smtpd`` with Cyrus SASL (sasldb) on a loopback port: a real server
that offers SCRAM-SHA-256, SCRAM-SHA-1, CRAM-MD5, PLAIN and LOGIN and checks them.

No Postfix daemon and no system configuration is involved: a private config directory
(``main.cf``, ``sasl/smtpd.conf``, a ``sasldb2`` made with ``saslpasswd2``) and the binaries
of Debian's ``postfix`` package, started per connection by ``postfix_inetd.py`` (see
there).  After AUTH, ``smtpd_proxy_filter`` passes MAIL/RCPT/DATA to an ``smtp-sink``
(``sink``), so accepted messages land in its dump directory.  ``log()`` returns what
Postfix logged (records sent to ``public/postlog``).

Needs the packages ``postfix``, ``sasl2-bin`` (saslpasswd2) and ``libsasl2-modules``
(the SCRAM, CRAM-MD5, PLAIN and LOGIN plugins); a missing one fails the test.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from twisted.internet import defer, protocol, reactor, task

from tests.support.ports import free_port
from tests.support.processes import require, terminate
from tests.support.sink import SmtpSink

DAEMONS = "/usr/lib/postfix/sbin"
INETD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "postfix_inetd.py")
ALL_MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-1", "CRAM-MD5", "PLAIN", "LOGIN")
SASL_PLUGINS = "/usr/lib/x86_64-linux-gnu/sasl2"


def main_cf(directory: str, *, user: str, group: str, hostname: str, size_limit: int,
            more: str = "") -> str:
    """A private ``main.cf``: queue, data and log under ``directory``, loopback only, no
    local delivery, relaying for SASL-authenticated clients only (Cyrus, see
    ``write_cyrus_sasl``); ``more`` is appended (what the caller's Postfix does with the
    mail, TLS)."""
    return f"""\
compatibility_level = 3.6
queue_directory = {directory}/queue
data_directory = {directory}/data
mail_owner = {user}
setgid_group = {group}
myhostname = {hostname}
mydomain = test
mydestination =
inet_interfaces = loopback-only
inet_protocols = ipv4
maillog_file_prefixes = {directory}
maillog_file = {directory}/maillog
message_size_limit = {size_limit}
smtpd_sasl_auth_enable = yes
smtpd_sasl_type = cyrus
cyrus_sasl_config_path = {directory}/sasl
smtpd_sasl_path = smtpd
smtpd_sasl_security_options = noanonymous
smtpd_relay_restrictions = permit_sasl_authenticated, reject
smtpd_recipient_restrictions = permit_sasl_authenticated, reject
local_recipient_maps =
alias_maps =
alias_database =
{more}"""


def write_cyrus_sasl(directory: str, hostname: str, users: dict[str, str],
                     mechanisms: tuple[str, ...]) -> None:
    """``sasl/smtpd.conf`` (auxprop over a private sasldb) and the ``sasldb2`` with
    ``users``, made by ``saslpasswd2`` in the realm ``hostname``."""
    os.makedirs(os.path.join(directory, "sasl"), exist_ok=True)
    with open(os.path.join(directory, "sasl", "smtpd.conf"), "w") as f:
        f.write(f"pwcheck_method: auxprop\nauxprop_plugin: sasldb\n"
                f"mech_list: {' '.join(mechanisms)}\n"
                f"sasldb_path: {directory}/sasldb2\n")
    for name, password in users.items():
        subprocess.run(["saslpasswd2", "-p", "-c", "-f", os.path.join(directory, "sasldb2"),
                        "-u", hostname, name], input=password.encode(), check=True,
                       timeout=20)


def settle(directory: str, names: tuple[str, ...]) -> None:
    """Postfix re-reads a configuration file modified within the last second or two
    ("let it cool down", 300 ms at a time): make ours look settled."""
    past = time.time() - 60
    for name in names:
        os.utime(os.path.join(directory, name), (past, past))


def _gid(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


class _Process(protocol.ProcessProtocol):
    def __init__(self):
        self.output = bytearray()
        self.ready = defer.Deferred()
        self.ended = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data
        if b"ready" in self.output and not self.ready.called:
            self.ready.callback(None)

    errReceived = outReceived

    def processEnded(self, reason) -> None:
        if not self.ready.called:
            self.ready.errback(AssertionError(
                f"postfix_inetd exited: {self.output.decode('utf-8', 'replace')}"))
        self.ended.callback(None)


class PostfixSubmission:
    def __init__(self, directory: str | None = None, users: dict[str, str] | None = None,
                 mechanisms: tuple[str, ...] = ALL_MECHANISMS, tls=None,
                 tls_auth_only: bool = False, size_limit: int = 10_240_000,
                 hostname: str = "postfix.test"):
        # Its own directory under /tmp: the daemons run as mail_owner and must be able to
        # reach it (trial's temporary directories are private to the test's user).
        self.directory = tempfile.mkdtemp(prefix="esmtpfa-postfix-")
        os.chmod(self.directory, 0o755)
        self.users = users or {"relayuser": "s3cret pencil"}
        self.mechanisms = mechanisms
        self.tls = tls
        self.tls_auth_only = tls_auth_only
        self.size_limit = size_limit
        self.hostname = hostname
        self.port = free_port()
        self.sink = SmtpSink(os.path.join(self.directory, "sink"))
        self._process = None
        self._protocol: _Process | None = None

    def _owner(self) -> tuple[str, str]:
        """``mail_owner`` (the daemons must run as it, see postfix_inetd) and a
        ``setgid_group``, which Postfix wants to differ from mail_owner's group."""
        if os.geteuid() == 0:
            account = pwd.getpwnam("postfix")  # created by Debian's postfix package
        else:
            account = pwd.getpwuid(os.geteuid())
        groups = [g for g in ("postdrop", "nogroup") if _gid(g) not in (None, account.pw_gid)]
        if not groups:
            groups = [g.gr_name for g in grp.getgrall() if g.gr_gid != account.pw_gid][:1]
        return account.pw_name, groups[0]

    def _configure(self) -> None:
        for tool in ("saslpasswd2", "smtp-sink"):
            require(tool)
        if not os.path.exists(os.path.join(DAEMONS, "smtpd")):
            raise AssertionError("Postfix's smtpd is missing: apt-get install postfix")
        d = self.directory
        for sub in ("queue/private", "queue/public", "data", "sasl"):
            os.makedirs(os.path.join(d, sub), exist_ok=True)
        user, group = self._owner()
        tls = ""
        if self.tls is not None:
            if os.geteuid() != 0:
                raise AssertionError("Postfix's tlsmgr (TLS for the private smtpd) must be "
                                     "started as root: run this test as root")
            # Copies the daemons (running as mail_owner) can read.
            for name, pem in (("cert.pem", self.tls.cert_pem), ("key.pem", self.tls.key_pem)):
                with open(os.path.join(d, name), "wb") as f:
                    f.write(pem)
            tls = (f"smtpd_tls_cert_file = {d}/cert.pem\n"
                   f"smtpd_tls_key_file = {d}/key.pem\n"
                   "smtpd_tls_security_level = may\n"
                   "smtpd_tls_session_cache_database =\n")
        with open(os.path.join(d, "main.cf"), "w") as f:
            f.write(main_cf(d, user=user, group=group, hostname=self.hostname,
                            size_limit=self.size_limit, more=f"""\
smtpd_tls_auth_only = {"yes" if self.tls_auth_only else "no"}
smtpd_reject_unlisted_recipient = no
smtpd_reject_unlisted_sender = no
smtpd_proxy_filter = 127.0.0.1:{self.sink.port}
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
smtpd_client_message_rate_limit = 0
smtpd_client_recipient_rate_limit = 0
smtpd_client_new_tls_session_rate_limit = 0
smtpd_client_auth_rate_limit = 0
{tls}"""))
        write_cyrus_sasl(d, self.hostname, self.users, self.mechanisms)
        settle(d, ("main.cf", "sasl/smtpd.conf", "sasldb2"))
        if os.geteuid() == 0:
            account = pwd.getpwnam(user)
            for root, dirs, files in os.walk(d):
                for name in [*dirs, *files]:
                    os.chown(os.path.join(root, name), account.pw_uid, account.pw_gid)
            os.chown(d, account.pw_uid, account.pw_gid)
            os.chmod(self.sink.directory, 0o777)

    @defer.inlineCallbacks
    def start(self):
        self._configure()
        yield self.sink.start()
        user, _ = self._owner()
        self._protocol = _Process()
        args = [sys.executable, INETD, self.directory, str(self.port), DAEMONS, user]
        self._process = reactor.spawnProcess(self._protocol, sys.executable, args,
                                             env={"PATH": os.environ.get("PATH", "")})
        timeout = reactor.callLater(20, lambda: self._protocol.ready.called or
                                    self._protocol.ready.errback(
                                        AssertionError("postfix_inetd did not start")))
        try:
            yield self._protocol.ready
        finally:
            if timeout.active():
                timeout.cancel()
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            sock.settimeout(10)
            greeting = sock.recv(200)
        if not greeting.startswith(b"220 "):
            raise AssertionError(f"unexpected Postfix greeting {greeting!r}:\n{self.log()}")
        return self

    @defer.inlineCallbacks
    def stop(self):
        if self._protocol is not None and not self._protocol.ended.called:
            yield terminate(self._process, self._protocol.ended, grace=15)
        yield self.sink.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def log(self) -> str:
        try:
            with open(os.path.join(self.directory, "postfix.log"), "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    @defer.inlineCallbacks
    def wait_for_log(self, text: str, timeout: float = 10.0):
        """Postfix logs asynchronously (datagrams): wait until ``text`` shows up."""
        deadline = reactor.seconds() + timeout
        while text not in self.log():
            if reactor.seconds() > deadline:
                raise AssertionError(f"{text!r} not in the Postfix log:\n{self.log()}")
            yield task.deferLater(reactor, 0.05, lambda: None)
