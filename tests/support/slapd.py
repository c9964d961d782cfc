"""A real OpenLDAP ``slapd`` for the ldap provider's tests and benchmark.

``SlapdServer`` builds a throwaway directory server in a temporary directory:

* ``slapd.conf`` (read with ``-f``; Debian's slapd 2.5 still accepts it and it needs no
  ``slapadd -n0`` step), schemas from ``/etc/ldap/schema``, ``back_mdb`` loaded from
  ``/usr/lib/ldap``, suffix ``dc=example,dc=com`` with a rootdn;
* entries loaded with ``slapadd`` before the first start: ``cn=service`` (the service
  account the provider binds as), ``ou=people`` with alice, bob, carol, a user ``star``
  whose uid is literally ``*``, two users (dave, erin) sharing the same ``mail`` *and* the
  same password (so "take the first of several entries" would be caught), frank with a
  non-ASCII password (sent as raw UTF-8, not SASLprep-rewritten), plus any number
  of generated users ``user000``…;
* TLS with a server certificate from ``tests.support.certs.CertificateAuthority`` issued for
  ``127.0.0.1`` only (so connecting as ``localhost`` is a name mismatch), TLS ≥ 1.2;
* listeners ``ldap://127.0.0.1:<port>/`` and ``ldaps://127.0.0.1:<port>/`` on ports from
  ``free_port()`` (new ports and another try if slapd loses a bind race);
* slapd runs in the foreground (``-d``) as a child process; as root it drops to the
  ``openldap`` user (``-u``/``-g``) and the directory is chowned to it.  Its stderr (the
  ``stats`` log by default) goes to ``slapd.log`` in the directory: tests count
  ``ACCEPT`` and ``BIND`` lines in it.

``stop()`` / ``start()`` again reuse the same ports and data ("the server goes away and
comes back"); ``pause()`` / ``resume()`` SIGSTOP/SIGCONT it (a hung server: TCP connects
still succeed, nothing answers).  ``close()`` stops it and removes the directory.

If slapd is missing the fixture fails loudly: the tests need a real server, they are
never skipped.  AppArmor: Ubuntu's slapd package confines ``/usr/sbin/slapd`` to
``/etc/ldap``, ``/var/lib/ldap`` and ``/run/slapd``; there a temporary directory would be
denied.  ``apparmor_note()`` reports whether a slapd profile is enforced; Debian's package
(this machine) ships no profile and AppArmor is not active here.
"""

from __future__ import annotations

import atexit
import base64
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass

from tests.support.certs import CertificateAuthority
from tests.support.ports import free_port

SLAPD = "/usr/sbin/slapd"
SLAPADD = "/usr/sbin/slapadd"
MODULE_PATH = "/usr/lib/ldap"
SCHEMA_DIR = "/etc/ldap/schema"
INSTALL_HINT = ("slapd is not installed: the ldap provider tests need a real OpenLDAP server; "
                "run `apt-get install -y slapd ldap-utils`")

SUFFIX = "dc=example,dc=com"
ROOT_DN = "cn=admin,dc=example,dc=com"
ROOT_PW = "rootsecret"
SERVICE_DN = "cn=service,dc=example,dc=com"
SERVICE_PW = "servicesecret"
PEOPLE = "ou=people,dc=example,dc=com"
SHARED_MAIL = "shared@example.com"
GROUPS = "ou=groups,dc=example,dc=com"
#: groupOfNames (``member``: DNs) and posixGroup (``memberUid``: uids) of alice and bob;
#: carol is in neither.
MAIL_GROUP = f"cn=mailusers,{GROUPS}"
POSIX_GROUP = f"cn=mailposix,{GROUPS}"
GROUP_MEMBERS = ("alice", "bob")
SHARED_PASSWORD = "shared-pw"


@dataclass(frozen=True)
class User:
    uid: str
    password: str
    dn: str
    mail: str


def ssha(password: str) -> str:
    """``{SSHA}`` userPassword value, as slappasswd would make it."""
    salt = os.urandom(8)
    digest = hashlib.sha1(password.encode("utf-8") + salt).digest()
    return "{SSHA}" + base64.b64encode(digest + salt).decode("ascii")


def _fixed_users() -> list[User]:
    return [
        User("alice", "alice-pw", f"uid=alice,{PEOPLE}", "alice@example.com"),
        User("bob", "bob-pw", f"uid=bob,{PEOPLE}", "bob@example.com"),
        User("carol", "carol-pw", f"uid=carol,{PEOPLE}", "carol@example.com"),
        # uid is a literal asterisk: an escaped search must find exactly this entry.
        User("*", "star-pw", f"cn=star,{PEOPLE}", "star@example.com"),
        # Same mail, same password: an ambiguous match must be rejected, not "first wins".
        User("dave", SHARED_PASSWORD, f"uid=dave,{PEOPLE}", SHARED_MAIL),
        User("erin", SHARED_PASSWORD, f"uid=erin,{PEOPLE}", SHARED_MAIL),
        # Non-ASCII password with a ligature that SASLprep (NFKC) would rewrite to "fi".
        User("frank", "pässwörd-\ufb01", f"uid=frank,{PEOPLE}", "frank@example.com"),
    ]


def generated_user(i: int) -> User:
    uid = f"user{i:03d}"
    return User(uid, f"pw-{uid}", f"uid={uid},{PEOPLE}", f"{uid}@example.com")


def apparmor_note() -> str:
    """Whether AppArmor could get in the way of slapd using a temporary directory."""
    enabled = "/sys/module/apparmor/parameters/enabled"
    try:
        with open(enabled) as f:
            active = f.read().strip() == "Y"
    except OSError:
        active = False
    if not active:
        return "AppArmor is not active on this machine"
    try:
        with open("/sys/kernel/security/apparmor/profiles") as f:
            profiles = f.read()
    except OSError:
        profiles = ""
    for line in profiles.splitlines():
        if "slapd" in line and "enforce" in line:
            return (f"AppArmor enforces a slapd profile ({line.strip()}): slapd may be denied "
                    f"access to {tempfile.gettempdir()}; add it to "
                    "/etc/apparmor.d/local/usr.sbin.slapd or set the profile to complain mode")
    return "AppArmor is active but no slapd profile is enforced"


class SlapdError(RuntimeError):
    pass


class SlapdServer:
    """A slapd child process with its own config, data and certificates."""

    def __init__(self, users: int = 0, verify_client: str = "never",
                 loglevel: str = "stats", directory: str | None = None,
                 start_timeout: float = 10.0):
        if not (os.path.exists(SLAPD) and os.path.exists(SLAPADD)):
            raise SlapdError(INSTALL_HINT)
        if not os.path.exists(os.path.join(MODULE_PATH, "back_mdb.la")) and not os.path.exists(
                os.path.join(MODULE_PATH, "back_mdb.so")):
            raise SlapdError(f"{MODULE_PATH}/back_mdb is missing; {INSTALL_HINT}")
        self.verify_client = verify_client
        self.loglevel = loglevel
        self.start_timeout = start_timeout
        self.host = "127.0.0.1"
        self.directory = directory or tempfile.mkdtemp(prefix="esmtpfa-slapd-")
        self.users = _fixed_users() + [generated_user(i) for i in range(users)]
        self.by_uid = {u.uid: u for u in self.users}
        self.port: int | None = None
        self.ldaps_port: int | None = None
        self.process: subprocess.Popen | None = None
        self._log_file = None
        self._prepared = False
        self._drop_privileges = os.geteuid() == 0

        self.ca = CertificateAuthority(os.path.join(self.directory, "ca"))
        self.server_cert = self.ca.issue(self.host, filename="server")
        # A client certificate for TLSVerifyClient demand/allow.
        self.client_cert = self.ca.issue("esmtpfa-client", client=True, filename="client")

    # -- paths -----------------------------------------------------------------------

    @property
    def conf_path(self) -> str:
        return os.path.join(self.directory, "slapd.conf")

    @property
    def data_dir(self) -> str:
        return os.path.join(self.directory, "data")

    @property
    def log_path(self) -> str:
        return os.path.join(self.directory, "slapd.log")

    @property
    def ca_path(self) -> str:
        return self.ca.cert_path

    @property
    def ldap_url(self) -> str:
        return f"ldap://{self.host}:{self.port}/"

    @property
    def ldaps_url(self) -> str:
        return f"ldaps://{self.host}:{self.ldaps_port}/"

    # -- setup -----------------------------------------------------------------------

    def _config(self) -> str:
        s = SCHEMA_DIR
        return f"""\
include {s}/core.schema
include {s}/cosine.schema
include {s}/nis.schema
include {s}/inetorgperson.schema

modulepath {MODULE_PATH}
moduleload back_mdb

pidfile {self.directory}/slapd.pid
argsfile {self.directory}/slapd.args
loglevel {self.loglevel}

TLSCACertificateFile {self.ca.cert_path}
TLSCertificateFile {self.server_cert.cert_path}
TLSCertificateKeyFile {self.server_cert.key_path}
TLSVerifyClient {self.verify_client}
TLSProtocolMin 3.3

database mdb
maxsize 33554432
suffix "{SUFFIX}"
rootdn "{ROOT_DN}"
rootpw {ROOT_PW}
directory {self.data_dir}
dbnosync
index objectClass eq
index uid eq
index mail eq

access to attrs=userPassword
    by anonymous auth
    by * none
access to *
    by * read
"""

    def _ldif(self) -> str:
        out = [f"""\
dn: {SUFFIX}
objectClass: top
objectClass: dcObject
objectClass: organization
o: Example
dc: example

dn: {SERVICE_DN}
objectClass: organizationalRole
objectClass: simpleSecurityObject
cn: service
userPassword: {ssha(SERVICE_PW)}

dn: {PEOPLE}
objectClass: organizationalUnit
ou: people

dn: {GROUPS}
objectClass: organizationalUnit
ou: groups

dn: {MAIL_GROUP}
objectClass: groupOfNames
cn: mailusers
""" + "".join(f"member: uid={uid},{PEOPLE}\n" for uid in GROUP_MEMBERS) + f"""
dn: {POSIX_GROUP}
objectClass: posixGroup
cn: mailposix
gidNumber: 5000
""" + "".join(f"memberUid: {uid}\n" for uid in GROUP_MEMBERS)]
        for u in self.users:
            rdn_value = u.dn.split(",", 1)[0].split("=", 1)[1]
            cn = rdn_value if u.dn.startswith("cn=") else u.uid
            out.append(f"""\
dn: {u.dn}
objectClass: inetOrgPerson
uid: {u.uid}
cn: {cn}
sn: {cn}
mail: {u.mail}
userPassword: {ssha(u.password)}
""")
        return "\n".join(out)

    def _chown(self) -> None:
        if not self._drop_privileges:
            return
        import grp
        import pwd
        try:
            uid = pwd.getpwnam("openldap").pw_uid
            gid = grp.getgrnam("openldap").gr_gid
        except KeyError:
            raise SlapdError("running as root but there is no openldap user/group "
                             "(created by the slapd package); " + INSTALL_HINT) from None
        for root, _dirs, files in os.walk(self.directory):
            os.chown(root, uid, gid)
            for name in files:
                os.chown(os.path.join(root, name), uid, gid)

    def _prepare(self) -> None:
        os.makedirs(self.data_dir, exist_ok=True)
        with open(self.conf_path, "w") as f:
            f.write(self._config())
        ldif_path = os.path.join(self.directory, "data.ldif")
        with open(ldif_path, "w") as f:
            f.write(self._ldif())
        result = subprocess.run([SLAPADD, "-q", "-f", self.conf_path, "-l", ldif_path],
                                capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise SlapdError(f"slapadd failed ({result.returncode}): {result.stderr.strip()}\n"
                             + apparmor_note())
        self._chown()
        self._prepared = True

    # -- process ---------------------------------------------------------------------

    def start(self) -> "SlapdServer":
        """Start slapd (first time: build everything and choose ports)."""
        if self.process is not None and self.process.poll() is None:
            return self
        if not self._prepared:
            self._prepare()
        keep_ports = self.port is not None  # a restart: same ports, same data
        attempts = 0
        while True:
            if not keep_ports:
                self.port = free_port(self.host)
                self.ldaps_port = free_port(self.host)
                if self.port == self.ldaps_port:
                    continue
            error = self._launch()
            if error is None:
                return self
            attempts += 1
            # Lost a bind race (new ports), or the old sockets are not released yet (restart).
            if "Address already in use" not in error or attempts >= (30 if keep_ports else 5):
                raise SlapdError(error)
            if keep_ports:
                time.sleep(0.1)

    def _launch(self) -> str | None:
        """Start the process and wait for both listeners; the error text, or None."""
        log_offset = os.path.getsize(self.log_path) if os.path.exists(self.log_path) else 0
        self._log_file = open(self.log_path, "ab")
        argv = [SLAPD, "-d", self.loglevel if self.loglevel != "none" else "0",
                "-f", self.conf_path,
                "-h", f"{self.ldap_url} {self.ldaps_url}"]
        if self._drop_privileges:
            argv += ["-u", "openldap", "-g", "openldap"]
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                        stdout=self._log_file, stderr=self._log_file)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._close_log()
                return (f"slapd exited with status {self.process.returncode} during startup "
                        f"({' '.join(argv)}):\n{self._log_since(log_offset)}\n{apparmor_note()}")
            if self._accepts(self.port) and self._accepts(self.ldaps_port):
                if self.process.poll() is None:
                    return None
                continue  # exited meanwhile: reported above on the next pass
            time.sleep(0.02)
        self._kill()
        return (f"slapd did not accept connections on {self.ldap_url} and {self.ldaps_url} "
                f"within {self.start_timeout:.0f} s:\n{self._log_since(log_offset)}\n"
                f"{apparmor_note()}")

    def _accepts(self, port: int) -> bool:
        try:
            with socket.create_connection((self.host, port), timeout=0.5) as sock:
                # While nothing listens on an ephemeral-range port, a connect can pick that
                # very port as its source and connect to itself: that is not slapd.
                return sock.getsockname() != sock.getpeername()
        except OSError:
            return False

    def _log_since(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read()[-4000:].decode("utf-8", "replace")
        except OSError:
            return "(no log)"

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def _kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)
        self._close_log()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, wait (SIGKILL after ``timeout``); the ports and data are kept."""
        proc = self.process
        if proc is None:
            return
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGCONT)  # in case it was paused
                proc.terminate()
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self._close_log()
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def pause(self, timeout: float = 5.0) -> None:
        """SIGSTOP: connections are still accepted by the kernel, nothing answers.

        Returns once every slapd thread is stopped (signal delivery is asynchronous).
        """
        self.process.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + timeout
        while not self._all_threads_stopped():
            if time.monotonic() > deadline:
                raise SlapdError(f"slapd (pid {self.process.pid}) did not stop on SIGSTOP")
            time.sleep(0.005)

    def _all_threads_stopped(self) -> bool:
        task_dir = f"/proc/{self.process.pid}/task"
        try:
            states = []
            for tid in os.listdir(task_dir):
                with open(f"{task_dir}/{tid}/stat") as f:
                    states.append(f.read().rsplit(")", 1)[1].split()[0])
        except OSError:
            return False
        return bool(states) and all(state in ("T", "t") for state in states)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> "SlapdServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- log inspection (loglevel stats) ---------------------------------------------

    def log_text(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def log_size(self) -> int:
        return os.path.getsize(self.log_path)

    def log_since(self, offset: int) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", "replace")

    @staticmethod
    def accepts_in(text: str) -> int:
        """Number of TCP connections slapd accepted in this log excerpt."""
        return len(re.findall(r"\bconn=\d+ fd=\d+ ACCEPT from", text))

    @staticmethod
    def connections_in(text: str) -> int:
        """Connections opened in this log excerpt that carried at least one LDAP operation.

        Unlike ``accepts_in`` this leaves out the fixture's own readiness probes (TCP
        connect, close) and TLS handshakes that failed before any operation.
        """
        accepted = set(re.findall(r"\bconn=(\d+) fd=\d+ ACCEPT from", text))
        used = set(re.findall(r"\bconn=(\d+) op=\d+ ", text))
        return len(accepted & used)

    @staticmethod
    def binds_in(text: str, dn: str | None = None) -> list[str]:
        """The DNs of the BIND requests in this log excerpt (``""`` = anonymous)."""
        dns = re.findall(r'\bBIND dn="([^"]*)" method=', text)
        if dn is not None:
            dns = [d for d in dns if d.lower() == dn.lower()]
        return dns


# -- one slapd per test class -------------------------------------------------------
# trial has no ``setUpClass``: a class that shares one slapd starts it in its first
# ``setUp`` and closes it after its last test (and at exit, if only some tests ran).

open_servers: set[SlapdServer] = set()


@atexit.register
def close_leftovers() -> None:
    for server in list(open_servers):
        server.close()


class SharedSlapd:
    """Mixin: one slapd for the whole class, started lazily, closed after the last test."""

    slapd_options: dict = {}
    slapd: SlapdServer | None = None
    _tests_left = 0

    def setUp(self):
        cls = type(self)
        if cls.slapd is None:
            cls.slapd = SlapdServer(**cls.slapd_options).start()
            open_servers.add(cls.slapd)
            cls._tests_left = len([n for n in dir(cls) if n.startswith("test")])
        self.addCleanup(self._release_slapd)
        return super().setUp()

    @classmethod
    def _release_slapd(cls):
        cls._tests_left -= 1
        if cls._tests_left <= 0 and cls.slapd is not None:
            open_servers.discard(cls.slapd)
            cls.slapd.close()
            cls.slapd = None


def add_people(slapd: "SlapdServer", entries) -> None:
    """Add ``(uid, mail addresses)`` people to ``slapd`` as the admin, each with the
    password ``<uid>-pw`` and a ``mail`` attribute only when addresses are given (blocking:
    run it in a thread)."""
    import ldap3
    server = ldap3.Server("127.0.0.1", port=slapd.port)
    with ldap3.Connection(server, ROOT_DN, ROOT_PW, auto_bind=True) as conn:
        for uid, mail in entries:
            attributes = {"uid": uid, "cn": uid, "sn": uid, "userPassword": f"{uid}-pw"}
            if mail:
                attributes["mail"] = mail
            assert conn.add(f"uid={uid},{PEOPLE}", ["inetOrgPerson"], attributes), \
                conn.result


def ldap_provider(slapd: "SlapdServer", name: str, *, tls: bool = False,
                  policy: dict | None = None) -> dict:
    """A provider entry for ``slapd``'s people, found by ``uid`` through the service
    account (over StartTLS with the test CA when ``tls``)."""
    params = {"server": "127.0.0.1", "port": slapd.port, "bind_user": SERVICE_DN,
              "bind_pass": SERVICE_PW, "base_dn": PEOPLE,
              "filter_string": "(&(objectClass=inetOrgPerson)(uid=%s))"}
    if tls:
        params.update(enable_tls=True, tls_ca=slapd.ca_path)
    entry = {"meta": {"name": name, "type": "ldap"}, "params": params}
    if policy is not None:
        entry["policy"] = policy
    return entry


def ldap_providers(slapd: "SlapdServer", name: str = "corp-ldap", *, tls: bool = False,
                   policy: dict | None = None) -> str:
    """A provider document with ``ldap_provider`` as its only entry, for a relay
    fixture's ``providers`` (JSON is YAML: the document goes to the file as built)."""
    return json.dumps({"providers": [ldap_provider(slapd, name, tls=tls, policy=policy)]})
