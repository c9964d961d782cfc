"""The ``ldap`` provider: search the user with a service account, then bind as them (docs/design.md,
"Provider types").

Flow of one login (all of it in a worker thread of the provider's own thread pool,
because ldap3 is blocking):

1. the worker's *service* connection, bound once as ``bind_user`` (anonymous when none is
   configured), searches ``base_dn`` (subtree) with ``filter_string`` where every ``%s``
   is the username **escaped per RFC 4515** (``escape_filter_chars``: ``* ( ) \\ NUL``),
   asking for at most two entries;
2. anything but exactly one entry is a rejection (unknown user, or ambiguous);
3. the worker's *user* connection binds as that entry's DN with the password.  That
   connection is used for nothing but user binds, so it may stay bound as the last user:
   no search ever runs with a user's rights, and the next Bind resets its identity anyway.
   This costs one round trip per login (measured in ``bench/auth_ldap.py``); rebinding it
   to anonymous afterwards would add a second one for no gain in safety.
4. with ``group_dn``, the service connection then asks whether the entry is in that
   group (``_check_group``: ``member``/``uniqueMember`` hold the DN, a posixGroup's
   ``memberUid`` the entry's ``uid``); a user who is not is refused (kind ``policy``).

Refused before any network call: an empty password (an empty simple bind is an
*anonymous* bind, RFC 4513 §5.1.2, which servers report as success) and an empty username.

Connections are per worker thread and persistent (connection setup, and TLS, dominate the
cost).  When a reused connection fails (the server restarted, closed an idle connection)
the login is retried once on fresh connections; a failure on a fresh connection, a
timeout, or a TLS failure is ``ProviderUnavailable`` (SMTP 454), as is a failing service
bind (a configuration problem is not the user's wrong password).  Timeouts: ``timeout``
bounds connect, TLS handshake and every response.

TLS: ``ldaps`` (implicit, the default on port 636) or ``enable_tls`` (StartTLS, required:
a failure is ``ProviderUnavailable``, never a fallback to cleartext).  The certificate is
verified against ``tls_ca`` (system CAs when unset) with ``server`` as the expected name,
by OpenSSL itself (``check_hostname``), TLS ≥ 1.2; ``tls_cert``/``tls_key`` is the client
certificate.  ``tls_insecure_skip_verify`` turns verification off (warned at load).

Who logged in (docs/policy.md): the login name as it reached the provider, the entry's DN, and
the values of the attributes the provider's policy needs (``sender_attribute``), asked
for in the same search, so the policy costs no extra round trip.  Values that are not
UTF-8 text are dropped; at most ``policy.MAX_VALUES`` per attribute are kept.

Never logged: passwords, ``bind_pass``.  DNs only at debug level.
"""

from __future__ import annotations

import math
import socket
import ssl
import threading
from typing import Any, Mapping, overload

import ldap3
from ldap3.core.exceptions import LDAPException, LDAPResponseTimeoutError, LDAPStartTLSError
from ldap3.utils.conv import escape_filter_chars
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from esmtpfa.auth.credentials import IUserPasswordCredentials
from esmtpfa.auth.errors import (
    BAD_PASSWORD,
    MALFORMED,
    POLICY,
    REJECTED,
    UNKNOWN_USER,
    LoginRefused,
    ProviderUnavailable,
)
from esmtpfa.auth.policy import string_values
from esmtpfa.auth.provider import IProvider, Principal, Provider, ProviderMeta
from esmtpfa.common.errors import ConfigError
from esmtpfa.common.logs import logger
from esmtpfa.common.probe import IProbe, ProbeResult
from esmtpfa.common.resources import Resources
from esmtpfa.providers.base import refused, require_string, session_of

log = logger("esmtpfa.providers.ldap")

PARAMS = frozenset({
    "server", "port", "enable_tls", "ldaps", "tls_ca", "tls_cert", "tls_key",
    "tls_insecure_skip_verify", "bind_user", "bind_pass", "base_dn", "filter_string",
    "attributes", "timeout", "pool_size", "group_dn", "group_member_attribute",
})

#: How a group names its members (``group_member_attribute``): by the member's DN
#: (groupOfNames, groupOfUniqueNames) or by its ``uid`` (posixGroup, RFC 2307).
GROUP_MEMBER_ATTRIBUTES = {"member": "member", "uniquemember": "uniqueMember",
                           "memberuid": "memberUid"}
DEFAULT_GROUP_MEMBER_ATTRIBUTE = "member"
#: At most this many of an entry's ``uid`` values are looked for in a posixGroup.
MAX_UIDS = 8

DEFAULT_TIMEOUT = 5.0
DEFAULT_POOL_SIZE = 4
MAX_POOL_SIZE = 64

# LDAP result codes (RFC 4511 appendix A) that mean "the server cannot answer now",
# as opposed to "no" (invalidCredentials and friends).
_RESULT_SUCCESS = 0
_TEMPORARY_RESULTS = frozenset({
    1,   # operationsError
    2,   # protocolError
    3,   # timeLimitExceeded
    11,  # adminLimitExceeded
    51,  # busy
    52,  # unavailable
    80,  # other
})
_SIZE_LIMIT_EXCEEDED = 4
_NO_SUCH_OBJECT = 32
_INVALID_CREDENTIALS = 49  # the bind's "wrong password" (RFC 4511 appendix A)

def _is_timeout(error: BaseException) -> bool:
    return isinstance(error, (TimeoutError, socket.timeout, LDAPResponseTimeoutError))


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


class _VerifiedTls(ldap3.Tls):
    """ldap3 ``Tls`` that wraps with one prebuilt ``SSLContext``.

    ldap3's own wrapping turns OpenSSL's hostname check off and afterwards calls the
    deprecated ``ssl.match_hostname``; here OpenSSL verifies chain *and* name during the
    handshake (``server_hostname``; IP addresses are matched against IP SANs), the
    minimum version is TLS 1.2, and the context (CA file, client certificate) is loaded
    once at config load, so a bad file is a ``ConfigError`` and not a 454 per login.
    """

    def __init__(self, context: ssl.SSLContext, hostname: str, **kwargs: Any):
        super().__init__(**kwargs)
        self._context = context
        self._hostname = hostname

    def wrap_socket(self, connection, do_handshake=False):
        connection.socket = self._context.wrap_socket(
            connection.socket, server_side=False, do_handshake_on_connect=do_handshake,
            server_hostname=self._hostname)


def _describe(error: BaseException) -> str:
    """``Class: message`` without the nested tuple reprs ldap3's exception factories add."""
    text = str(error)
    while len(text) > 4 and text[:2] in ("('", '("') and text[-3:] in ("',)", '",)'):
        text = text[2:-3].replace("\\'", "'")
    return f"{type(error).__name__}: {text}"


class _ConnectionFailed(Exception):
    """The connection is unusable: a socket or TLS error, a timeout, or bytes that are not
    LDAP (ldap3 then raises anything, e.g. ``KeyError`` from its BER decoder: seen when a
    client socket connected to itself on a port nobody listened on).  ``reused`` says
    whether the connection had worked before."""

    def __init__(self, error: BaseException, reused: bool):
        described = _describe(error)
        if not isinstance(error, (LDAPException, OSError)):
            described = f"the server's answer is not LDAP ({described})"
        super().__init__(described)
        self.error = error
        self.reused = reused
        self.timed_out = _is_timeout(error)


class _Rejected(Exception):
    """The credentials are wrong (→ LoginRefused of ``kind``); the text is for the log."""

    def __init__(self, detail: str, kind: str = UNKNOWN_USER):
        super().__init__(detail)
        self.kind = kind


class _NotInGroup(_Rejected):
    """The password is right, but the user is not in ``group_dn``: refused like any
    refusal (the client hears the same 535), told apart in the log by its kind
    (``policy``: the configuration's rule said no) and its text."""

    def __init__(self, detail: str):
        super().__init__(detail, POLICY)


class _Unavailable(Exception):
    """The server answered but cannot decide (→ ProviderUnavailable); no retry."""


class _WorkerConnections:
    """The persistent connections of one worker thread."""

    __slots__ = ("service", "service_uses", "user", "user_uses")

    def __init__(self) -> None:
        self.service: ldap3.Connection | None = None
        self.service_uses = 0
        self.user: ldap3.Connection | None = None
        self.user_uses = 0

    def close(self) -> None:
        for conn in (self.service, self.user):
            if conn is not None:
                try:
                    conn.unbind()
                except Exception:  # already broken: nothing to tell the server
                    pass
        self.service = self.user = None
        self.service_uses = self.user_uses = 0


@implementer(IProvider, IProbe)
class LDAPProvider(Provider):
    """Search-then-bind LDAP authentication on pooled, persistent ldap3 connections."""

    credentialInterfaces = (IUserPasswordCredentials,)

    def __init__(self, meta: ProviderMeta, *, server: str, base_dn: str, filter_string: str,
                 port: int | None = None, ldaps: bool | None = None,
                 enable_tls: bool = False, tls_ca: str | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None,
                 tls_insecure_skip_verify: bool = False, bind_user: str | None = None,
                 bind_pass: str | None = None, attributes: list[str] | None = None,
                 timeout: float = DEFAULT_TIMEOUT, pool_size: int = DEFAULT_POOL_SIZE,
                 group_dn: str | None = None, group_member_attribute: str | None = None,
                 resources: Resources):
        super().__init__(meta)
        where = f"provider {meta.name!r} (ldap)"
        # Only the reactor: the binds run in this provider's own pool of ``pool_size``
        # threads, each holding its connections (thread-local), not in a shared pool.
        self._reactor = resources.reactor

        if "://" in server:
            raise ConfigError(f"{where}: param 'server' must be a host name or address, "
                              "not a URL (use 'port' and 'ldaps')")
        if "%s" not in filter_string:
            raise ConfigError(f"{where}: param 'filter_string' must contain %s "
                              "(where the escaped username goes)")
        _check_filter(where, filter_string)
        _check_dn(where, "base_dn", base_dn)
        if bool(bind_user) != bool(bind_pass):
            raise ConfigError(f"{where}: 'bind_user' and 'bind_pass' go together "
                              "(neither means an anonymous search)")
        if bind_user:
            _check_dn(where, "bind_user", bind_user)
        if tls_key and not tls_cert:
            raise ConfigError(f"{where}: 'tls_key' given without 'tls_cert'")
        self.group_dn, self.group_member_attribute = _group_settings(
            where, group_dn, group_member_attribute)
        if isinstance(timeout, bool) or not (
                isinstance(timeout, (int, float)) and 0 < timeout <= 600):
            raise ConfigError(f"{where}: param 'timeout' must be a number of seconds in (0, 600]")
        if isinstance(pool_size, bool) or not (
                isinstance(pool_size, int) and 1 <= pool_size <= MAX_POOL_SIZE):
            raise ConfigError(f"{where}: param 'pool_size' must be an integer "
                              f"from 1 to {MAX_POOL_SIZE}")

        if ldaps is None:
            ldaps = port == 636
        if port is None:
            port = 636 if ldaps else 389
        if isinstance(port, bool) or not (isinstance(port, int) and 1 <= port <= 65535):
            raise ConfigError(f"{where}: param 'port' must be an integer from 1 to 65535")
        starttls = bool(enable_tls) and not ldaps  # StartTLS inside LDAPS is meaningless
        uses_tls = ldaps or starttls

        self.server = server
        self.port = port
        self.ldaps = bool(ldaps)
        self.starttls = starttls
        self.base_dn = base_dn
        self.filter_string = filter_string
        self.attributes = list(attributes) if attributes is not None else ["dn"]
        # "dn" is not an attribute (the DN comes with every entry): ask for none ("1.1").
        wanted = [a for a in self.attributes if a.lower() != "dn"]
        self._search_attributes = wanted or [ldap3.NO_ATTRIBUTES]
        self.bind_user = bind_user or None
        self._bind_pass = bind_pass or None
        self.timeout = float(timeout)
        self._receive_timeout = max(1, math.ceil(self.timeout))  # ldap3 needs whole seconds
        self.pool_size = pool_size
        self.insecure = bool(tls_insecure_skip_verify)

        self._tls = None
        if uses_tls:
            context = _ssl_context(where, tls_ca, tls_cert, tls_key, self.insecure)
            self._tls = _VerifiedTls(
                context, server,
                validate=ssl.CERT_NONE if self.insecure else ssl.CERT_REQUIRED,
                ca_certs_file=tls_ca, local_certificate_file=tls_cert,
                local_private_key_file=tls_key)
            if self.insecure:
                log.warn("{where}: tls_insecure_skip_verify is set: the LDAP server's "
                         "certificate is NOT verified; anyone on the path can read the "
                         "passwords", where=where)
        else:
            if tls_ca or tls_cert or tls_key or tls_insecure_skip_verify:
                log.warn("{where}: TLS params are set but neither 'ldaps' nor 'enable_tls' "
                         "is: the connection is NOT encrypted", where=where)
            if not _is_loopback(server):
                log.warn("{where}: plain LDAP to {server}: passwords cross the network in "
                         "cleartext (set 'enable_tls' or 'ldaps')", where=where, server=server)

        self._where = where
        self._local = threading.local()
        self._workers: list[_WorkerConnections] = []
        self._workers_lock = threading.Lock()
        self._pool: ThreadPool | None = None
        self._shutdown_trigger = None
        self._stopping: Deferred | None = None
        self._stopped = False

    # -- configuration ---------------------------------------------------------------

    @classmethod
    def from_params(cls, meta: ProviderMeta, params: Mapping[str, Any], *,
                    resources: Resources) -> "LDAPProvider":
        where = f"provider {meta.name!r} (ldap)"
        unknown = sorted(set(params) - PARAMS)
        if unknown:
            raise ConfigError(f"{where}: unknown param(s) {', '.join(map(repr, unknown))} "
                              f"(expected {', '.join(sorted(PARAMS))})")
        return cls(
            meta,
            server=require_string(meta, params, "server"),
            base_dn=require_string(meta, params, "base_dn"),
            filter_string=require_string(meta, params, "filter_string"),
            port=_optional_int(where, params, "port"),
            ldaps=_optional_bool(where, params, "ldaps"),
            enable_tls=bool(_optional_bool(where, params, "enable_tls")),
            tls_ca=_optional_string(where, params, "tls_ca"),
            tls_cert=_optional_string(where, params, "tls_cert"),
            tls_key=_optional_string(where, params, "tls_key"),
            tls_insecure_skip_verify=bool(
                _optional_bool(where, params, "tls_insecure_skip_verify")),
            bind_user=_optional_string(where, params, "bind_user"),
            bind_pass=_optional_string(where, params, "bind_pass"),
            attributes=_optional_attributes(where, params),
            timeout=_optional_number(where, params, "timeout", DEFAULT_TIMEOUT),
            pool_size=_optional_int(where, params, "pool_size", DEFAULT_POOL_SIZE),
            group_dn=_optional_string(where, params, "group_dn"),
            group_member_attribute=_optional_string(where, params, "group_member_attribute"),
            resources=resources,
        )

    # -- twisted.cred ----------------------------------------------------------------

    def requestAvatarId(self, credentials: IUserPasswordCredentials) -> Deferred:
        username, password = credentials.username, credentials.password
        if isinstance(password, bytes):
            password = password.decode("utf-8", "surrogateescape")
        if not username or not isinstance(username, str):
            return fail(refused(log, self._where, credentials, MALFORMED, "empty username"))
        if not password:
            # An empty simple bind is an anonymous bind: never send it.
            return fail(refused(log, self._where, credentials, MALFORMED, "empty password"))
        if self._stopped:
            return fail(ProviderUnavailable(f"{self._where}: stopped"))
        pool = self._threadpool()
        return deferToThreadPool(self._reactor, pool, self._login, username, password,
                                 self.identity_attributes, session_of(credentials))

    def probe(self) -> Deferred[ProbeResult]:
        """The service connection a login's search uses: connect, TLS, bind as
        ``bind_user`` (or none, for an anonymous search), in this provider's pool."""
        if self._stopped:
            return succeed(ProbeResult.failed(f"{self._where}: stopped"))
        d = deferToThreadPool(self._reactor, self._threadpool(), self._probe_bind)
        return d.addCallbacks(ProbeResult.passed, ProbeResult.from_failure)

    def _probe_bind(self) -> str:
        _discard(self._open(service=True))
        how = "bound as bind_user" if self.bind_user else "connected (anonymous search)"
        scheme = "LDAPS" if self.ldaps else "StartTLS" if self.starttls else "plain LDAP"
        return f"{self.server}:{self.port} ({scheme}) {how}"

    def _threadpool(self) -> ThreadPool:
        if self._pool is None:
            self._pool = ThreadPool(minthreads=0, maxthreads=self.pool_size,
                                    name=f"ldap-{self.meta.name}")
            self._pool.start()
            self._shutdown_trigger = self._reactor.addSystemEventTrigger(
                "before", "shutdown", self.stopProvider)
        return self._pool

    def stopProvider(self) -> Deferred:
        """Stop the thread pool (waiting for logins in progress) and close connections.

        The pool is joined in a helper thread, so the reactor is not blocked while a
        worker finishes a request (bounded by ``timeout``).
        """
        if self._stopping is not None:
            d: Deferred[None] = Deferred()

            def stopped(result: Any) -> Any:
                d.callback(None)
                return result
            self._stopping.addBoth(stopped)
            return d
        self._stopped = True
        if self._shutdown_trigger is not None:
            try:
                self._reactor.removeSystemEventTrigger(self._shutdown_trigger)
            except (ValueError, KeyError):
                pass  # we are that trigger, already running
            self._shutdown_trigger = None
        pool, self._pool = self._pool, None
        if pool is None:
            self._close_all()
            self._stopping = succeed(None)
            return succeed(None)
        self._stopping = d = Deferred()

        def stop_pool() -> None:
            try:
                pool.stop()
                self._close_all()
            finally:
                self._reactor.callFromThread(d.callback, None)

        threading.Thread(target=stop_pool, name=f"ldap-{self.meta.name}-stop",
                         daemon=True).start()
        return d

    def _close_all(self) -> None:
        with self._workers_lock:
            workers, self._workers = self._workers, []
        for worker in workers:
            worker.close()

    # -- worker thread ---------------------------------------------------------------

    def _worker(self) -> _WorkerConnections:
        worker = getattr(self._local, "connections", None)
        if worker is None:
            worker = self._local.connections = _WorkerConnections()
            with self._workers_lock:
                self._workers.append(worker)
        return worker

    def _login(self, username: str, password: str,
               wanted: tuple[str, ...] = (), connection_id: str = "-") -> Principal:
        """Runs in a pool thread: who logged in (with the ``wanted`` attributes), or
        raises.  ``connection_id`` is the session's, for every line logged here."""
        worker = self._worker()
        for attempt in (1, 2):
            try:
                dn, attributes = self._attempt(worker, username, password, wanted,
                                               connection_id=connection_id)
            except _ConnectionFailed as failure:
                worker.close()
                if attempt == 1 and failure.reused and not failure.timed_out:
                    log.debug("{connection_id} {where}: connection lost ({why}); retrying "
                              "on a fresh one", connection_id=connection_id,
                              where=self._where, why=str(failure))
                    continue
                log.warn("{connection_id} {where}: LDAP server {server}:{port} "
                         "unavailable: {why}", connection_id=connection_id,
                         where=self._where, server=self.server, port=self.port,
                         why=str(failure))
                raise ProviderUnavailable(
                    f"{self._where}: LDAP server unavailable ({failure})") from None
            except _Unavailable as problem:
                log.warn("{connection_id} {where}: {why}", connection_id=connection_id,
                         where=self._where, why=str(problem))
                raise ProviderUnavailable(f"{self._where}: {problem}") from None
            except _Rejected as reason:
                log.debug("{connection_id} {where}: login refused ({reason}): {detail}",
                          connection_id=connection_id, where=self._where,
                          reason=reason.kind, detail=str(reason))
                raise LoginRefused(reason.kind, str(reason)) from None
            except Exception as error:  # not transport, not an answer: a bug or a surprise
                worker.close()
                log.failure("{connection_id} {where}: unexpected ldap3 error",
                            connection_id=connection_id, where=self._where)
                raise ProviderUnavailable(
                    f"{self._where}: {type(error).__name__}") from None
            return Principal.of(username, dn, attributes)
        raise AssertionError("unreachable")

    def _attempt(self, worker: _WorkerConnections, username: str, password: str,
                 wanted: tuple[str, ...] = (), *, connection_id: str = "-"
                 ) -> tuple[str, dict[str, tuple[str, ...]]]:
        """One search and bind: the entry's DN and the ``wanted`` attribute values."""
        # 1. search with the service connection
        if worker.service is None:
            worker.service = self._open(service=True)
            worker.service_uses = 0
        conn, reused = worker.service, worker.service_uses > 0
        search_filter = self.filter_string.replace("%s", escape_filter_chars(username))
        asked = self._search_attributes
        by_uid = self.group_dn is not None and self.group_member_attribute == "memberUid"
        if wanted or by_uid:
            asked = [a for a in asked if a != ldap3.NO_ATTRIBUTES] + list(wanted)
            asked += ["uid"] if by_uid else []
        try:
            conn.search(self.base_dn, search_filter, search_scope=ldap3.SUBTREE,
                        dereference_aliases=ldap3.DEREF_NEVER,
                        attributes=asked, size_limit=2,
                        time_limit=self._receive_timeout)
        except Exception as error:  # transport failure, or garbage from the peer
            raise _ConnectionFailed(error, reused) from error
        worker.service_uses += 1
        result = conn.result or {}
        code = result.get("result")
        entries = [r for r in (conn.response or ()) if r.get("type") == "searchResEntry"]
        conn.response = None
        if code in _TEMPORARY_RESULTS:
            raise _Unavailable(f"search failed: {result.get('description')} ({code})")
        if code == _NO_SUCH_OBJECT:
            log.warn("{connection_id} {where}: base_dn does not exist on the server",
                     connection_id=connection_id, where=self._where)
            raise _Rejected("no such user")
        if code not in (_RESULT_SUCCESS, _SIZE_LIMIT_EXCEEDED):
            raise _Unavailable(f"search failed: {result.get('description')} ({code})")
        if code == _SIZE_LIMIT_EXCEEDED or len(entries) > 1:
            raise _Rejected("the username matches more than one entry")
        if not entries:
            raise _Rejected("no such user")
        dn = entries[0].get("dn")
        if not dn:
            raise _Rejected("entry without a DN")
        attributes = _wanted_values(entries[0], wanted)
        uids = _wanted_values(entries[0], ("uid",))["uid"] if by_uid else ()
        log.debug("{connection_id} {where}: user found as {dn}",
                  connection_id=connection_id, where=self._where, dn=dn)

        # 2. bind as that DN on the user connection
        if worker.user is None:
            worker.user = self._open(service=False)
            worker.user_uses = 0
        conn, reused = worker.user, worker.user_uses > 0
        conn.authentication = ldap3.SIMPLE
        conn.user = dn
        # Raw UTF-8: what the directory stored (no SASLprep rewrite of the password).
        conn.password = password.encode("utf-8", "surrogateescape")
        try:
            bound = conn.bind(read_server_info=False)
        except Exception as error:  # transport failure, or garbage from the peer
            raise _ConnectionFailed(error, reused) from error
        finally:
            conn.password = None  # do not keep the user's password around
        worker.user_uses += 1
        if bound:
            if self.group_dn is not None:
                self._check_group(worker, self.group_dn, dn, uids, connection_id)
            return dn, attributes
        result = conn.result or {}
        code = result.get("result")
        if code in _TEMPORARY_RESULTS:
            raise _Unavailable(f"user bind failed: {result.get('description')} ({code})")
        raise _Rejected(f"bind refused: {result.get('description')} ({code})",
                        BAD_PASSWORD if code == _INVALID_CREDENTIALS else REJECTED)

    def _check_group(self, worker: _WorkerConnections, group_dn: str, dn: str,
                     uids: tuple[str, ...], connection_id: str) -> None:
        """After the bind: is the user in ``group_dn``?  Raises ``_NotInGroup`` if not.

        Asked on the service connection, like the search: a user's own rights often do
        not reach the groups, and no search ever runs with them (see the module's
        docstring).  Only after a successful bind, so that a wrong password costs no
        extra round trip and says nothing about groups.  One base-scope search of the
        group with the member in the filter: the server compares with the attribute's
        own matching rule (DN normalisation for ``member``/``uniqueMember``), and the
        answer is one entry or none, whatever the size of the group.
        """
        attribute = self.group_member_attribute
        if attribute == "memberUid":
            values = uids[:MAX_UIDS]
            if not values:
                raise _NotInGroup("not a member of group_dn (the entry has no uid)")
        else:
            values = (dn,)
        terms = "".join(f"({attribute}={escape_filter_chars(v)})" for v in values)
        group_filter = terms if len(values) == 1 else f"(|{terms})"
        conn = worker.service
        assert conn is not None  # the search before the bind opened it, in this thread
        try:
            conn.search(group_dn, group_filter, search_scope=ldap3.BASE,
                        dereference_aliases=ldap3.DEREF_NEVER,
                        attributes=[ldap3.NO_ATTRIBUTES], size_limit=1,
                        time_limit=self._receive_timeout)
        except Exception as error:  # transport failure, or garbage from the peer
            raise _ConnectionFailed(error, reused=True) from error
        worker.service_uses += 1
        result = conn.result or {}
        code = result.get("result")
        found = any(r.get("type") == "searchResEntry" for r in (conn.response or ()))
        conn.response = None
        if code == _NO_SUCH_OBJECT:
            log.warn("{connection_id} {where}: group_dn does not exist on the server: "
                     "nobody can log in", connection_id=connection_id, where=self._where)
            raise _NotInGroup("not a member of group_dn (the group does not exist)")
        if code not in (_RESULT_SUCCESS, _SIZE_LIMIT_EXCEEDED):
            raise _Unavailable(f"group search failed: {result.get('description')} ({code})")
        if not found:
            raise _NotInGroup(f"not a member of group_dn ({attribute})")

    def _open(self, *, service: bool) -> ldap3.Connection:
        """A new connected (and TLS-protected) connection; service ones are bound."""
        server = ldap3.Server(self.server, port=self.port, use_ssl=self.ldaps, tls=self._tls,
                              get_info=ldap3.NONE, connect_timeout=self.timeout,
                              mode=ldap3.IP_SYSTEM_DEFAULT, allowed_referral_hosts=[])
        bind = bool(service and self.bind_user)  # else an anonymous connection
        conn = ldap3.Connection(server, user=self.bind_user if bind else None,
                                password=self._bind_pass if bind else None,
                                authentication=ldap3.SIMPLE if bind else ldap3.ANONYMOUS,
                                client_strategy=ldap3.SYNC,
                                auto_bind=ldap3.AUTO_BIND_NONE, read_only=True,
                                receive_timeout=self._receive_timeout,
                                raise_exceptions=False, auto_referrals=False,
                                check_names=False)
        try:
            conn.open(read_server_info=False)
            if self.starttls and not conn.start_tls(read_server_info=False):
                raise LDAPStartTLSError(f"StartTLS refused: {conn.last_error}")
            if service:
                bound = conn.bind(read_server_info=False)
            else:
                bound = True
        except Exception as error:  # transport failure, or garbage from the peer
            _discard(conn)
            raise _ConnectionFailed(error, reused=False) from error
        if not bound:
            result = conn.result or {}
            _discard(conn)
            raise _Unavailable(
                f"service bind as bind_user failed: {result.get('description')} "
                f"({result.get('result')}); check bind_user/bind_pass")
        return conn

    def __repr__(self) -> str:
        scheme = "ldaps" if self.ldaps else "ldap+starttls" if self.starttls else "ldap"
        return (f"<LDAPProvider {self.meta.name!r} {scheme}://{self.server}:{self.port} "
                f"base_dn={self.base_dn!r} bind_user={self.bind_user!r} "
                f"bind_pass={'<redacted>' if self._bind_pass else None}>")


def _wanted_values(entry: Mapping[str, Any], wanted: tuple[str, ...]
                   ) -> dict[str, tuple[str, ...]]:
    """The values of each ``wanted`` attribute of a search result entry, under the name
    the policy uses (attribute names compare without regard to case, RFC 4512 §2.5)."""
    if not wanted:
        return {}
    found: dict[str, Any] = {}
    for source in (entry.get("attributes") or {}, entry.get("raw_attributes") or {}):
        for key, value in source.items():
            found.setdefault(str(key).lower(), value)
    return {name: string_values(found.get(name.lower())) for name in wanted}


def _discard(conn) -> None:
    try:
        conn.unbind()
    except Exception:
        pass


# -- param helpers ---------------------------------------------------------------------

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0", ""}


def _optional_bool(where: str, params: Mapping[str, Any], key: str) -> bool | None:
    value = params.get(key)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ConfigError(f"{where}: param {key!r} must be true or false, not {value!r}")


@overload
def _optional_int(where: str, params: Mapping[str, Any], key: str, default: int) -> int: ...
@overload
def _optional_int(where: str, params: Mapping[str, Any], key: str,
                  default: None = None) -> int | None: ...
def _optional_int(where: str, params: Mapping[str, Any], key: str,
                  default: int | None = None) -> int | None:
    value = params.get(key)
    if value is None:
        return default
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    raise ConfigError(f"{where}: param {key!r} must be an integer, not {value!r}")


def _optional_number(where: str, params: Mapping[str, Any], key: str,
                     default: float) -> float:
    value = params.get(key)
    if value is None:
        return default
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = math.nan
    else:
        number = math.nan
    if not math.isfinite(number) or number <= 0:
        raise ConfigError(f"{where}: param {key!r} must be a positive number of seconds, "
                          f"not {value!r}")
    return number


def _optional_string(where: str, params: Mapping[str, Any], key: str) -> str | None:
    value = params.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{where}: param {key!r} must be a string")
    return value or None


def _optional_attributes(where: str, params: Mapping[str, Any]) -> list[str] | None:
    value = params.get("attributes")
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(
            isinstance(a, str) and a for a in value):
        raise ConfigError(f"{where}: param 'attributes' must be a list of attribute names")
    return list(value)


def _check_filter(where: str, filter_string: str) -> None:
    from ldap3.operation.search import parse_filter
    try:
        parse_filter(filter_string.replace("%s", "x"), None, True, False, None, False)
    except Exception as error:
        raise ConfigError(f"{where}: param 'filter_string' is not a valid LDAP filter "
                          f"({error})") from None


def _group_settings(where: str, group_dn: str | None, attribute: str | None
                    ) -> tuple[str | None, str]:
    """``group_dn`` (a valid DN) and the canonical name of ``group_member_attribute``."""
    if group_dn is None:
        if attribute is not None:
            raise ConfigError(f"{where}: param 'group_member_attribute' needs 'group_dn'")
        return None, DEFAULT_GROUP_MEMBER_ATTRIBUTE
    _check_dn(where, "group_dn", group_dn)
    canonical = GROUP_MEMBER_ATTRIBUTES.get(
        (attribute or DEFAULT_GROUP_MEMBER_ATTRIBUTE).strip().lower())
    if canonical is None:
        raise ConfigError(f"{where}: param 'group_member_attribute' must be one of "
                          f"{', '.join(GROUP_MEMBER_ATTRIBUTES.values())}")
    return group_dn, canonical


def _check_dn(where: str, key: str, dn: str) -> None:
    from ldap3.utils.dn import parse_dn
    try:
        parse_dn(dn)
    except Exception as error:
        raise ConfigError(f"{where}: param {key!r} is not a valid DN ({error})") from None


def _ssl_context(where: str, ca: str | None, cert: str | None, key: str | None,
                 insecure: bool) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if cert:
            context.load_cert_chain(cert, keyfile=key)
    except (OSError, ssl.SSLError, ValueError) as error:
        raise ConfigError(f"{where}: TLS files could not be loaded ({error})") from None
    return context


__all__ = ["LDAPProvider"]
