"""The ldap provider against a real OpenLDAP slapd (``tests.support.slapd``).

No mock server: every login goes through ldap3 to slapd over TCP (plain, StartTLS, LDAPS,
client certificates).  slapd's ``stats`` log is the witness for what went over the wire:
``ACCEPT`` lines count TCP connections, ``BIND dn=…`` lines show who was bound as, and
``SRCH`` lines which connection searched.

Classes that share one slapd use ``tests.support.slapd.SharedSlapd``.  Outage tests get a slapd of
their own per test, since they stop and pause it.
"""

from __future__ import annotations

import re
import time

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred, gatherResults
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import formatEvent
from twisted.trial import unittest

from esmtpfa.auth.credentials import UserPassword
from esmtpfa.auth.errors import BAD_PASSWORD, POLICY, LoginRefused, ProviderUnavailable
from esmtpfa.auth.provider import ProviderMeta
from esmtpfa.common.context import ConnectionContext
from esmtpfa.common.errors import ConfigError
from esmtpfa.providers.ldap import LDAPProvider
from tests.support.certs import CertificateAuthority
from tests.support.logcapture import observe_logs
from tests.support.ports import free_port
from tests.support.resources import resources
from tests.support.slapd import (
    MAIL_GROUP,
    PEOPLE,
    POSIX_GROUP,
    SERVICE_DN,
    SERVICE_PW,
    SHARED_MAIL,
    SHARED_PASSWORD,
    SharedSlapd,
    SlapdServer,
    ldap_provider,
    open_servers,
)

CTX = ConnectionContext(connection_id="urn:uuid:00000000-0000-0000-0000-000000000000",
                        protocol="smtp", peer_host="127.0.0.1")
META = ProviderMeta(name="corp-ldap", type="ldap")
ALICE_DN = f"uid=alice,{PEOPLE}"

class ProviderHelpers:
    slapd: SlapdServer

    def provider(self, **overrides) -> LDAPProvider:
        params = {
            "server": "127.0.0.1",
            "port": overrides.pop("port") if "port" in overrides else str(self.slapd.port),
            "bind_user": SERVICE_DN,
            "bind_pass": SERVICE_PW,
            "base_dn": PEOPLE,
            "filter_string": "(&(objectClass=inetOrgPerson)(uid=%s))",
            "timeout": "2",
        }
        params.update(overrides)
        params = {k: v for k, v in params.items() if v is not None}
        provider = LDAPProvider.from_params(META, params, resources=resources())
        self.addCleanup(provider.stopProvider)
        return provider

    def login(self, provider, username, password):
        """Fires with the user of the ``Principal`` the provider vouched for."""
        return provider.requestAvatarId(UserPassword(username, password, CTX)).addCallback(
            lambda principal: principal.user)

    async def assertAccepted(self, provider, username, password):
        self.assertEqual(await self.login(provider, username, password), username)

    async def assertRejected(self, provider, username, password):
        try:
            result = await self.login(provider, username, password)
        except UnauthorizedLogin:
            return
        self.fail(f"{username!r} was accepted as {result!r}")

    async def assertUnavailable(self, provider, username, password):
        try:
            result = await self.login(provider, username, password)
        except ProviderUnavailable:
            return
        self.fail(f"{username!r}: expected ProviderUnavailable, got {result!r}")


def connections_that(text: str) -> dict[str, set[str]]:
    """conn number → what happened on it: 'search', or 'bind:<dn>'."""
    seen: dict[str, set[str]] = {}
    for conn, op in re.findall(r"\bconn=(\d+) op=\d+ (SRCH|BIND dn=\"[^\"]*\") ", text):
        seen.setdefault(conn, set()).add("search" if op == "SRCH" else
                                         "bind:" + op[len('BIND dn="'):-1].lower())
    return seen


# -- plain LDAP: the login flow and the attacks -------------------------------------------

class LoginTests(SharedSlapd, ProviderHelpers, unittest.TestCase):
    slapd_options = {"users": 110}

    async def test_correct_password(self):
        await self.assertAccepted(self.provider(), "alice", "alice-pw")

    async def test_fires_with_the_username(self):
        p = self.provider()
        self.assertEqual(await self.login(p, "bob", "bob-pw"), "bob")
        self.assertEqual(await self.login(p, "user042", "pw-user042"), "user042")

    async def test_wrong_password(self):
        await self.assertRejected(self.provider(), "alice", "bob-pw")

    async def test_unknown_user(self):
        await self.assertRejected(self.provider(), "mallory", "alice-pw")

    async def test_non_ascii_password_is_sent_as_is(self):
        p = self.provider()
        await self.assertAccepted(p, "frank", "pässwörd-\ufb01")
        await self.assertRejected(p, "frank", "pässwörd-fi")  # no NFKC folding

    async def test_username_case_follows_the_directory(self):
        # uid matching is case-insensitive in LDAP; the name given is what is vouched for.
        self.assertEqual(await self.login(self.provider(), "ALICE", "alice-pw"), "ALICE")

    async def test_anonymous_search_without_bind_user(self):
        p = self.provider(bind_user=None, bind_pass=None)
        await self.assertAccepted(p, "carol", "carol-pw")
        await self.assertRejected(p, "carol", "alice-pw")

    async def test_attributes_param(self):
        p = self.provider(attributes=["mail", "cn"])
        await self.assertAccepted(p, "alice", "alice-pw")

    async def test_star_is_a_literal_asterisk(self):
        p = self.provider()
        # "*" is escaped to \2a: it finds only the entry whose uid *is* "*" ...
        await self.assertAccepted(p, "*", "star-pw")
        # ... and never matches other users.
        await self.assertRejected(p, "*", "alice-pw")
        await self.assertRejected(p, "al*", "alice-pw")
        await self.assertRejected(p, "*ice", "alice-pw")

    async def test_filter_injection(self):
        p = self.provider()
        offset = self.slapd.log_size()
        # Unescaped, each of these would build a filter that matches alice (and only her,
        # so her password would log the attacker in under a forged name).
        for username in ["*)(uid=*", "admin)(|(uid=*", "alice)(|(uid=*",
                         "alice)(objectClass=*", "alice))(|(uid=x", "alice\x00",
                         "alice\\", "al\\2a", "al\\5c2a", "\\61lice"]:
            await self.assertRejected(p, username, "alice-pw")
        log = self.slapd.log_since(offset)
        self.assertEqual(self.slapd.binds_in(log, ALICE_DN), [])
        # The server received equality filters on the literal strings (slapd logs the
        # escapes in upper case); no substring or extra filter component was injected.
        self.assertIn(r'filter="(&(objectClass=inetOrgPerson)(uid=\2A\29\28uid=\2A))"', log)
        self.assertIn(r'(uid=admin\29\28|\28uid=\2A))"', log)
        self.assertIn(r'(uid=alice\00))"', log)
        self.assertNotRegex(log, r"uid=[^)]*\*")

    async def test_dn_as_username(self):
        p = self.provider()
        offset = self.slapd.log_size()
        await self.assertRejected(p, ALICE_DN, "alice-pw")
        await self.assertRejected(p, "cn=admin,dc=example,dc=com", "rootsecret")
        await self.assertRejected(p, SERVICE_DN, SERVICE_PW)
        log = self.slapd.log_since(offset)
        self.assertEqual(self.slapd.binds_in(log, ALICE_DN), [])
        self.assertEqual(self.slapd.binds_in(log, "cn=admin,dc=example,dc=com"), [])

    async def test_empty_password_never_reaches_the_server(self):
        p = self.provider()
        offset = self.slapd.log_size()
        # Refused synchronously: nothing was handed to the thread pool at all.
        self.failureResultOf(self.login(p, "alice", ""), UnauthorizedLogin)
        self.failureResultOf(self.login(p, "", "alice-pw"), UnauthorizedLogin)
        self.assertIsNone(p._pool)
        # A marker login afterwards: its BIND is in the log, alice's never is.
        await self.assertAccepted(p, "bob", "bob-pw")
        log = self.slapd.log_since(offset)
        self.assertEqual(self.slapd.binds_in(log, f"uid=bob,{PEOPLE}"), [f"uid=bob,{PEOPLE}"])
        self.assertEqual(self.slapd.binds_in(log, ALICE_DN), [])
        self.assertEqual(self.slapd.binds_in(log, ""), [])  # no anonymous bind either

    async def test_more_than_one_entry_is_rejected(self):
        # dave and erin share a mail address *and* a password: first-match would accept.
        p = self.provider(filter_string="(mail=%s)")
        offset = self.slapd.log_size()
        await self.assertRejected(p, SHARED_MAIL, SHARED_PASSWORD)
        log = self.slapd.log_since(offset)
        self.assertEqual(self.slapd.binds_in(log, f"uid=dave,{PEOPLE}"), [])
        self.assertEqual(self.slapd.binds_in(log, f"uid=erin,{PEOPLE}"), [])
        # The same filter works for a unique address.
        await self.assertAccepted(p, "alice@example.com", "alice-pw")

    async def test_zero_entries_under_missing_base(self):
        p = self.provider(base_dn="ou=nowhere,dc=example,dc=com")
        await self.assertRejected(p, "alice", "alice-pw")

    async def test_wrong_bind_pass_is_unavailable_not_wrong_password(self):
        p = self.provider(bind_pass="not-the-service-password")
        await self.assertUnavailable(p, "alice", "alice-pw")

    async def test_user_connections_never_search(self):
        """No search ever runs on a connection bound as a user."""
        p = self.provider(pool_size="2")
        offset = self.slapd.log_size()
        results = await gatherResults([
            self.login(p, f"user{i:03d}", f"pw-user{i:03d}") for i in range(30)])
        self.assertEqual(results, [f"user{i:03d}" for i in range(30)])
        await self.assertRejected(p, "alice", "wrong")
        for conn, things in connections_that(self.slapd.log_since(offset)).items():
            user_binds = {t for t in things if t.startswith("bind:") and PEOPLE in t}
            if user_binds:
                self.assertNotIn("search", things, f"conn={conn} searched after {user_binds}")
            if "search" in things:
                self.assertEqual(things - {"search"}, {"bind:" + SERVICE_DN.lower()})

    async def test_connection_reuse(self):
        p = self.provider(pool_size="2")
        offset = self.slapd.log_size()
        for i in range(20):
            await self.assertAccepted(p, f"user{i:03d}", f"pw-user{i:03d}")
        first = self.slapd.connections_in(self.slapd.log_since(offset))
        offset = self.slapd.log_size()
        for i in range(20, 40):
            await self.assertAccepted(p, f"user{i:03d}", f"pw-user{i:03d}")
        await self.assertRejected(p, "alice", "wrong")
        await self.assertAccepted(p, "alice", "alice-pw")
        second = self.slapd.connections_in(self.slapd.log_since(offset))
        # 42 logins, at most a service and a user connection per worker thread (2 threads;
        # the second thread may only start in the second batch), not one per login.
        self.assertGreaterEqual(first, 2)
        self.assertLessEqual(first + second, 4)

    async def test_100_concurrent_logins(self):
        p = self.provider()
        offset = self.slapd.log_size()
        users = [f"user{i:03d}" for i in range(100)]
        started = time.monotonic()
        results = await gatherResults([self.login(p, u, f"pw-{u}") for u in users])
        elapsed = time.monotonic() - started
        self.assertEqual(results, users)
        self.assertLessEqual(self.slapd.connections_in(self.slapd.log_since(offset)),
                             2 * p.pool_size)
        self.assertLess(elapsed, 5.0)  # generous here; bench/auth_ldap.py measures

    async def test_concurrent_mix_of_right_and_wrong(self):
        p = self.provider()
        ds = []
        for i in range(40):
            u = f"user{i:03d}"
            ds.append(self.login(p, u, f"pw-{u}" if i % 2 == 0 else "wrong"))
        outcomes = await DeferredList(ds, consumeErrors=True)
        for i, (ok, value) in enumerate(outcomes):
            if i % 2 == 0:
                self.assertEqual((ok, value), (True, f"user{i:03d}"))
            else:
                self.assertFalse(ok)
                self.assertIsInstance(value.value, UnauthorizedLogin)

    async def test_no_secret_in_logs(self):
        events = observe_logs(self)
        p = self.provider(pool_size="1")
        await self.assertRejected(p, "alice", "SECRET-attempt-1")
        await self.assertAccepted(p, "bob", "bob-pw")
        bad = self.provider(bind_pass="SECRET-bind-pass")
        await self.assertUnavailable(bad, "alice", "SECRET-attempt-2")
        gone = self.provider(port=str(free_port()), bind_pass="SECRET-bind-pass")
        await self.assertUnavailable(gone, "alice", "SECRET-attempt-3")
        text = "\n".join(formatEvent(e) + repr(e) for e in events)
        self.assertNotIn("SECRET", text)
        self.assertNotIn("bob-pw", text)
        self.assertNotIn(SERVICE_PW, repr(p))

    async def test_stopped_provider(self):
        p = self.provider()
        await self.assertAccepted(p, "alice", "alice-pw")
        await p.stopProvider()
        await p.stopProvider()  # idempotent
        self.assertTrue(p._pool is None)
        await self.assertUnavailable(p, "alice", "alice-pw")


# -- TLS -------------------------------------------------------------------------------------

class TLSTests(SharedSlapd, ProviderHelpers, unittest.TestCase):

    def other_ca(self) -> str:
        return CertificateAuthority(self.mktemp(), name="someone else's CA").cert_path

    async def test_starttls(self):
        p = self.provider(enable_tls="true", tls_ca=self.slapd.ca_path)
        offset = self.slapd.log_size()
        await self.assertAccepted(p, "alice", "alice-pw")
        await self.assertRejected(p, "alice", "wrong")
        log = self.slapd.log_since(offset)
        self.assertIn("EXT oid=1.3.6.1.4.1.1466.20037", log)  # StartTLS
        self.assertRegex(log, r"BIND dn=\"uid=alice,ou=people,dc=example,dc=com\" "
                              r"mech=SIMPLE bind_ssf=0 ssf=(128|256)")

    async def test_ldaps(self):
        p = self.provider(port=self.slapd.ldaps_port, ldaps=True, tls_ca=self.slapd.ca_path)
        self.assertTrue(p.ldaps)
        offset = self.slapd.log_size()
        await self.assertAccepted(p, "alice", "alice-pw")
        await self.assertRejected(p, "alice", "wrong")
        log = self.slapd.log_since(offset)
        self.assertIn(f"(IP=127.0.0.1:{self.slapd.ldaps_port})", log)
        self.assertNotIn("EXT oid=1.3.6.1.4.1.1466.20037", log)

    async def test_ldaps_concurrent(self):
        p = self.provider(port=self.slapd.ldaps_port, ldaps="yes", tls_ca=self.slapd.ca_path)
        users = ["alice", "bob", "carol"] * 10
        results = await gatherResults([self.login(p, u, f"{u}-pw") for u in users])
        self.assertEqual(results, users)

    async def test_starttls_wrong_ca(self):
        p = self.provider(enable_tls=True, tls_ca=self.other_ca())
        offset = self.slapd.log_size()
        await self.assertUnavailable(p, "alice", "alice-pw")
        # No fallback to cleartext: nothing was bound after the failed StartTLS.
        log = self.slapd.log_since(offset)
        self.assertIn("EXT oid=1.3.6.1.4.1.1466.20037", log)
        self.assertEqual(self.slapd.binds_in(log), [])

    async def test_ldaps_wrong_ca(self):
        p = self.provider(port=self.slapd.ldaps_port, ldaps=True, tls_ca=self.other_ca())
        await self.assertUnavailable(p, "alice", "alice-pw")

    async def test_system_cas_do_not_trust_a_private_ca(self):
        p = self.provider(port=self.slapd.ldaps_port, ldaps=True)  # no tls_ca
        await self.assertUnavailable(p, "alice", "alice-pw")

    async def test_wrong_server_name(self):
        # The certificate names 127.0.0.1 only; "localhost" reaches the same server.
        for extra in ({"enable_tls": True},
                      {"ldaps": True, "port": self.slapd.ldaps_port}):
            p = self.provider(server="localhost", tls_ca=self.slapd.ca_path, **extra)
            offset = self.slapd.log_size()
            await self.assertUnavailable(p, "alice", "alice-pw")
            self.assertEqual(self.slapd.binds_in(self.slapd.log_since(offset)), [])

    async def test_insecure_skip_verify(self):
        for extra in ({"enable_tls": True},
                      {"ldaps": True, "port": self.slapd.ldaps_port}):
            p = self.provider(server="localhost", tls_ca=self.other_ca(),
                              tls_insecure_skip_verify="true", **extra)
            await self.assertAccepted(p, "alice", "alice-pw")

    async def test_starttls_against_the_ldaps_port(self):
        p = self.provider(port=self.slapd.ldaps_port, ldaps=False, enable_tls=True,
                          tls_ca=self.slapd.ca_path, timeout="1")
        await self.assertUnavailable(p, "alice", "alice-pw")

    def test_insecure_skip_verify_warns_at_load(self):
        events = observe_logs(self)
        self.provider(enable_tls=True, tls_insecure_skip_verify=True)
        warnings = [formatEvent(e) for e in events if "insecure" in formatEvent(e)]
        self.assertEqual(len(warnings), 1)


class ClientCertificateTests(SharedSlapd, ProviderHelpers, unittest.TestCase):
    slapd_options = {"verify_client": "demand"}

    async def test_ldaps_with_client_certificate(self):
        p = self.provider(port=self.slapd.ldaps_port, ldaps=True, tls_ca=self.slapd.ca_path,
                          tls_cert=self.slapd.client_cert.cert_path,
                          tls_key=self.slapd.client_cert.key_path)
        await self.assertAccepted(p, "alice", "alice-pw")

    async def test_starttls_with_client_certificate(self):
        p = self.provider(enable_tls=True, tls_ca=self.slapd.ca_path,
                          tls_cert=self.slapd.client_cert.cert_path,
                          tls_key=self.slapd.client_cert.key_path)
        await self.assertAccepted(p, "alice", "alice-pw")

    async def test_without_client_certificate(self):
        p = self.provider(port=self.slapd.ldaps_port, ldaps=True, tls_ca=self.slapd.ca_path)
        await self.assertUnavailable(p, "alice", "alice-pw")


# -- the server goes away ----------------------------------------------------------------

class OutageTests(ProviderHelpers, unittest.TestCase):

    def setUp(self):
        self.slapd = SlapdServer(users=20).start()
        open_servers.add(self.slapd)
        self.addCleanup(self._close)

    def _close(self):
        open_servers.discard(self.slapd)
        self.slapd.close()

    async def warm(self, p, n=8):
        users = [f"user{i:03d}" for i in range(n)]
        self.assertEqual(await gatherResults([self.login(p, u, f"pw-{u}") for u in users]),
                         users)

    async def test_stopped_then_restarted(self):
        p = self.provider(timeout="2", pool_size="2")
        await self.warm(p)
        self.slapd.stop()
        started = time.monotonic()
        await self.assertUnavailable(p, "alice", "alice-pw")
        self.assertLess(time.monotonic() - started, 2.0)
        outcomes = await DeferredList([self.login(p, "bob", "bob-pw") for _ in range(6)],
                                      consumeErrors=True)
        for ok, value in outcomes:
            self.assertFalse(ok)
            self.assertIsInstance(value.value, ProviderUnavailable)
        self.slapd.start()  # same ports, same data
        # Every login works again, on the same provider, the first one included.
        await self.warm(p, 10)
        await self.assertRejected(p, "alice", "wrong")

    async def test_restart_between_logins_is_invisible(self):
        p = self.provider(pool_size="2")
        await self.warm(p)
        self.slapd.restart()
        offset = self.slapd.log_size()
        # Every worker's connections are stale: each login retries once on a fresh one.
        await self.warm(p, 10)
        self.assertLessEqual(self.slapd.connections_in(self.slapd.log_since(offset)), 4)

    async def test_never_started(self):
        self.slapd.stop()
        p = self.provider(timeout="1")
        started = time.monotonic()
        await self.assertUnavailable(p, "alice", "alice-pw")
        self.assertLess(time.monotonic() - started, 1.0)

    async def test_hung_server_times_out(self):
        p = self.provider(timeout="1", pool_size="1")
        await self.warm(p, 2)
        self.slapd.pause()
        try:
            started = time.monotonic()
            await self.assertUnavailable(p, "alice", "alice-pw")
            elapsed = time.monotonic() - started
            self.assertGreaterEqual(elapsed, 0.9)
            self.assertLess(elapsed, 2.5)  # one timeout, not one per retry
            started = time.monotonic()
            await self.assertUnavailable(p, "alice", "alice-pw")  # fresh connection: also bounded
            self.assertLess(time.monotonic() - started, 2.5)
        finally:
            self.slapd.resume()
        await self.assertAccepted(p, "alice", "alice-pw")


# -- something that is not an LDAP server ---------------------------------------------------

class _Peer(Protocol):
    def connectionMade(self):
        self.factory.peers.append(self)
        self.lost = Deferred()
        if self.factory.banner is not None:
            self.transport.write(self.factory.banner)
            self.transport.loseConnection()

    def dataReceived(self, data):
        if self.factory.echo:
            self.transport.write(data)  # what a TCP socket connected to itself "hears"

    def connectionLost(self, reason):
        self.lost.callback(None)


class NotLDAPTests(ProviderHelpers, unittest.TestCase):
    """Garbage from the peer is ``ProviderUnavailable``, never an unexpected exception."""

    def serve(self, echo=False, banner=None) -> int:
        factory = Factory.forProtocol(_Peer)
        factory.peers, factory.echo, factory.banner = [], echo, banner
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")

        async def close():
            await port.stopListening()
            for peer in factory.peers:
                peer.transport.loseConnection()
                await peer.lost

        self.addCleanup(lambda: ensureDeferred(close()))
        return port.getHost().port

    async def test_echo(self):
        # ldap3 decodes its own BindRequest and raises KeyError((1, 0)).
        p = self.provider(port=self.serve(echo=True), pool_size="1")
        await self.assertUnavailable(p, "alice", "alice-pw")
        await self.assertUnavailable(p, "alice", "alice-pw")

    async def test_http_answer(self):
        p = self.provider(port=self.serve(banner=b"HTTP/1.1 400 Bad Request\r\n"
                                                 b"Content-Length: 0\r\n\r\n"))
        await self.assertUnavailable(p, "alice", "alice-pw")

    async def test_tls_to_a_plain_echo(self):
        p = self.provider(port=self.serve(echo=True), ldaps=True, tls_ca=None, timeout="1")
        await self.assertUnavailable(p, "alice", "alice-pw")


# -- group membership ----------------------------------------------------------------------

class GroupTests(SharedSlapd, ProviderHelpers, unittest.TestCase):
    """``group_dn``: only the members of a group may log in.  alice and bob are in
    ``cn=mailusers`` (groupOfNames, ``member``) and ``cn=mailposix`` (posixGroup,
    ``memberUid``); carol, with her right password, is in neither."""

    async def assertNotInGroup(self, provider, username, password):
        try:
            result = await self.login(provider, username, password)
        except LoginRefused as refusal:
            self.assertEqual(refusal.kind, POLICY)
            self.assertIn("not a member of group_dn", refusal.detail)
            self.assertNotIn(username, refusal.detail)
            return
        self.fail(f"{username!r} was accepted as {result!r}")

    async def test_group_of_names(self):
        p = self.provider(group_dn=MAIL_GROUP)  # member, the default
        offset = self.slapd.log_size()
        await self.assertAccepted(p, "alice", "alice-pw")
        await self.assertAccepted(p, "bob", "bob-pw")
        await self.assertNotInGroup(p, "carol", "carol-pw")
        # The group was asked on the service connection, never with a user's rights.
        log = self.slapd.log_since(offset)
        searches = re.findall(r'conn=(\d+) op=\d+ SRCH base="cn=mailusers', log)
        self.assertEqual(len(searches), 3)
        seen = connections_that(log)
        for conn in searches:
            self.assertEqual({op for op in seen[conn] if op.startswith("bind:uid=")}, set())

    async def test_a_wrong_password_is_refused_before_any_group_search(self):
        p = self.provider(group_dn=MAIL_GROUP)
        offset = self.slapd.log_size()
        try:
            await self.login(p, "carol", "alice-pw")
        except LoginRefused as refusal:
            self.assertEqual(refusal.kind, BAD_PASSWORD)
        else:
            self.fail("accepted")
        self.assertNotIn('base="cn=mailusers', self.slapd.log_since(offset))

    async def test_posix_group_by_uid(self):
        p = self.provider(group_dn=POSIX_GROUP, group_member_attribute="memberUid")
        await self.assertAccepted(p, "alice", "alice-pw")
        await self.assertAccepted(p, "ALICE", "alice-pw")  # the entry's uid is looked for
        await self.assertNotInGroup(p, "carol", "carol-pw")

    async def test_the_wrong_attribute_for_the_group_lets_nobody_in(self):
        # A posixGroup has no member values: a configuration mistake refuses, never admits.
        p = self.provider(group_dn=POSIX_GROUP, group_member_attribute="member")
        await self.assertNotInGroup(p, "alice", "alice-pw")

    async def test_a_group_that_does_not_exist(self):
        p = self.provider(group_dn="cn=nosuchgroup,ou=groups,dc=example,dc=com")
        events = observe_logs(self)
        await self.assertNotInGroup(p, "alice", "alice-pw")
        self.assertIn("group_dn does not exist", "\n".join(formatEvent(e) for e in events))

    async def test_through_the_relay_a_member_relays_and_carol_gets_535(self):
        import json

        from twisted.internet import threads

        from tests.support.relayfixture import RelayFixture
        entry = ldap_provider(self.slapd, "corp-ldap")
        entry["meta"]["fallback"] = True  # log in as plain "alice"
        entry["params"].update(group_dn=MAIL_GROUP, group_member_attribute="member")
        fixture = RelayFixture(self.mktemp(), providers=json.dumps({"providers": [entry]}))
        self.addCleanup(fixture.stop)
        await fixture.start()

        def login(user: str, password: str) -> tuple[int, int | None]:
            client = fixture.secure_session()
            try:
                code, _ = client.auth_plain(user, password)
                if code != 235:
                    return code, None
                return code, client.send_message(
                    b"Subject: group\r\n\r\nhello\r\n", "alice@example.com",
                    ["dave@example.net"])[0]
            finally:
                client.close()

        self.assertEqual(await threads.deferToThread(login, "alice", "alice-pw"), (235, 250))
        self.assertEqual(await threads.deferToThread(login, "carol", "carol-pw"), (535, None))
        self.assertEqual(len(fixture.upstream.messages), 1)


# -- configuration ---------------------------------------------------------------------------

class ConfigTests(unittest.TestCase):
    base = {"server": "ldap.example.com", "base_dn": "ou=people,dc=example,dc=com",
            "filter_string": "(uid=%s)"}

    def load(self, **changes) -> LDAPProvider:
        params = dict(self.base)
        params.update(changes)
        params = {k: v for k, v in params.items() if v is not None}
        provider = LDAPProvider.from_params(META, params, resources=resources())
        self.addCleanup(provider.stopProvider)
        return provider

    def assertConfigError(self, *fragments, **changes):
        with self.assertRaises(ConfigError) as caught:
            self.load(**changes)
        message = str(caught.exception)
        self.assertIn("corp-ldap", message)
        for fragment in fragments:
            self.assertIn(fragment, message)

    def test_defaults(self):
        p = self.load()
        self.assertEqual((p.port, p.ldaps, p.starttls), (389, False, False))
        self.assertEqual(p.attributes, ["dn"])
        self.assertEqual((p.timeout, p.pool_size), (5.0, 4))
        self.assertIsNone(p._pool)  # no thread before the first login

    def test_port_636_means_ldaps(self):
        p = self.load(port="636")
        self.assertEqual((p.port, p.ldaps), (636, True))
        p = self.load(port=636, ldaps="false")
        self.assertFalse(p.ldaps)
        p = self.load(ldaps=True)
        self.assertEqual(p.port, 636)

    def test_readme_example_636_with_enable_tls(self):
        p = self.load(port=636, enable_tls=True)
        self.assertEqual((p.ldaps, p.starttls), (True, False))

    def test_string_values_from_env_expansion(self):
        p = self.load(port="3389", enable_tls="true", timeout="2.5", pool_size="8",
                      tls_insecure_skip_verify="false")
        self.assertEqual((p.port, p.starttls, p.timeout, p.pool_size, p.insecure),
                         (3389, True, 2.5, 8, False))

    def test_missing_required(self):
        for key in ("server", "base_dn", "filter_string"):
            self.assertConfigError(key, **{key: None})
            self.assertConfigError(key, **{key: ""})

    def test_filter_without_placeholder(self):
        self.assertConfigError("%s", filter_string="(uid=alice)")

    def test_invalid_filter(self):
        self.assertConfigError("filter_string", filter_string="uid=%s)(")

    def test_invalid_base_dn(self):
        self.assertConfigError("base_dn", base_dn="people")

    def test_bad_port(self):
        for port in ("abc", "0", 0, 70000, "-1", True, 3.5, "", [389]):
            self.assertConfigError("port", port=port)

    def test_bad_flags(self):
        self.assertConfigError("enable_tls", enable_tls="maybe")
        self.assertConfigError("ldaps", ldaps=2)
        self.assertConfigError("tls_insecure_skip_verify", tls_insecure_skip_verify="sure")

    def test_bad_timeout_and_pool_size(self):
        for timeout in ("0", "-1", "soon", "nan", False):
            self.assertConfigError("timeout", timeout=timeout)
        for size in ("0", 0, "100", "four", 1.5):
            self.assertConfigError("pool_size", pool_size=size)

    def test_bad_attributes(self):
        self.assertConfigError("attributes", attributes="dn")
        self.assertConfigError("attributes", attributes=["dn", 3])

    def test_unknown_param(self):
        self.assertConfigError("filter", filter="(uid=%s)")

    def test_bind_user_and_pass_go_together(self):
        self.assertConfigError("bind_pass", bind_user="cn=service,dc=example,dc=com")
        self.assertConfigError("bind_user", bind_pass="secret")

    def test_server_url(self):
        self.assertConfigError("server", server="ldaps://ldap.example.com")

    def test_tls_files(self):
        self.assertConfigError("TLS files", enable_tls=True, tls_ca="/nonexistent/ca.pem")
        self.assertConfigError("tls_cert", enable_tls=True, tls_key="/nonexistent/key.pem")
        ca = CertificateAuthority(self.mktemp())
        leaf = ca.issue("client", client=True)
        self.assertConfigError("TLS files", enable_tls=True, tls_ca=ca.cert_path,
                               tls_cert=leaf.cert_path, tls_key=ca.cert_path)
        p = self.load(enable_tls=True, tls_ca=ca.cert_path, tls_cert=leaf.cert_path,
                      tls_key=leaf.key_path)
        self.assertTrue(p.starttls)

    def test_group_settings(self):
        p = self.load(group_dn="cn=mail,ou=groups,dc=example,dc=com",
                      group_member_attribute="uniquemember")
        self.assertEqual(p.group_member_attribute, "uniqueMember")
        self.assertEqual(self.load(group_dn="cn=mail,dc=example,dc=com")
                         .group_member_attribute, "member")
        self.assertConfigError("'group_member_attribute' must be one of member, uniqueMember, "
                               "memberUid", group_dn="cn=mail,dc=example,dc=com",
                               group_member_attribute="memberOf")
        self.assertConfigError("'group_member_attribute' needs 'group_dn'",
                               group_member_attribute="member")
        self.assertConfigError("'group_dn' is not a valid DN", group_dn="not a dn")
        self.assertConfigError("'group_dn' must be a string", group_dn=["cn=x"])

    def test_repr_hides_bind_pass(self):
        p = self.load(bind_user="cn=service,dc=example,dc=com", bind_pass="hunter2")
        self.assertNotIn("hunter2", repr(p))
        self.assertIn("cn=service", repr(p))
