"""docs/design.md, "Provider selection", provider selection, end to end through
``ProviderSelector``.

Real ``userpass`` providers plus two in-test types: a token provider (bearer credentials,
whole secret) and providers that cannot answer.  Every provider records its calls, so the
tests can say not only who accepted but who was (not) asked.
"""

from __future__ import annotations

from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.trial import unittest

from esmtpfa.auth.credentials import (
    IBearerTokenCredentials,
    IUserPasswordCredentials,
    SubmissionCredentials,
)
from esmtpfa.auth.errors import ProviderUnavailable
from esmtpfa.auth.provider import Provider, ProviderMeta
from esmtpfa.auth.selection import (
    VIA_FALLBACK,
    VIA_UNIQUE_DOMAIN,
    VIA_USERNAME,
    Claim,
    Identity,
    ProviderDirectory,
    ProviderSelector,
    ProviderSet,
)
from esmtpfa.common.context import ConnectionContext, normalize_domain
from esmtpfa.common.errors import ConfigError
from esmtpfa.providers.userpass import UserPassProvider


def meta(name: str, type: str = "userpass", domain: str | None = None,
         fallback: bool = False, unique: bool = False) -> ProviderMeta:
    return ProviderMeta(name=name, type=type, domain=normalize_domain(domain),
                        fallback=fallback, unique_domain_auth=unique)


class Recording:
    """Mixin: remember every credentials object a provider was asked to check."""

    def __init__(self, *args, journal: list | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list = []
        self.journal = journal if journal is not None else []

    def requestAvatarId(self, credentials):
        self.calls.append(credentials)
        self.journal.append(self.meta.name)
        return super().requestAvatarId(credentials)


class UserPass(Recording, UserPassProvider):
    pass


class _Token(Provider):
    """A bearer-token provider: accepts exactly one token."""

    credentialInterfaces = (IBearerTokenCredentials,)

    def __init__(self, meta: ProviderMeta, token: str):
        super().__init__(meta)
        self.token = token

    def requestAvatarId(self, credentials):
        if credentials.token == self.token:
            return succeed("token-subject")
        return fail(UnauthorizedLogin())


class Token(Recording, _Token):
    pass


class _Down(Provider):
    """A user+password provider whose backend is unreachable."""

    def requestAvatarId(self, credentials):
        return fail(ProviderUnavailable("backend down"))


class Down(Recording, _Down):
    pass


class _Broken(Provider):
    """A provider with a bug: raises synchronously or fails with an odd exception."""

    def __init__(self, meta: ProviderMeta, synchronous: bool):
        super().__init__(meta)
        self.synchronous = synchronous

    def requestAvatarId(self, credentials):
        if self.synchronous:
            raise RuntimeError("provider bug")
        return fail(KeyError("provider bug"))


class Broken(Recording, _Broken):
    pass


class _Manual(Provider):
    """A provider whose answer the test gives later (to reload in the middle of a login)."""

    def requestAvatarId(self, credentials):
        self.pending = Deferred()
        return self.pending


class Manual(Recording, _Manual):
    pass


def credentials(username: str, secret: str, sni: str | None = None, helo: str | None = None,
                bearer: bool = False) -> SubmissionCredentials:
    context = ConnectionContext("urn:uuid:00000000-0000-0000-0000-000000000001", "smtp",
                                peer_host="192.0.2.1", tls=True, sni=sni, helo=helo)
    return SubmissionCredentials(username, secret, context, bearer=bearer,
                                 mechanism="XOAUTH2" if bearer else "PLAIN")


class SelectionMixin:
    def select(self, providers, creds):
        selector = ProviderSelector(ProviderDirectory(ProviderSet(providers)))
        return selector.requestAvatarId(creds)

    def accepted(self, providers, creds) -> Identity:
        return self.successResultOf(self.select(providers, creds))

    def rejected(self, providers, creds) -> None:
        self.failureResultOf(self.select(providers, creds), UnauthorizedLogin)

    def unavailable(self, providers, creds) -> None:
        self.failureResultOf(self.select(providers, creds), ProviderUnavailable)


class UniqueDomainTests(SelectionMixin, unittest.TestCase):
    """Step 1: the connected domain picks a unique_domain_auth provider; no splitting."""

    def setUp(self):
        self.a = UserPass(meta("a", domain="a.example", unique=True), "alice", "pa:ss")
        self.b = UserPass(meta("b", domain="b.example", unique=True), "bob", "secret")
        self.fallback = UserPass(meta("fb", fallback=True), "alice", "pa:ss")
        self.providers = [self.a, self.b, self.fallback]

    def test_by_sni(self):
        identity = self.accepted(self.providers, credentials("alice", "pa:ss", sni="a.example"))
        self.assertEqual(identity, Identity("a", "alice", VIA_UNIQUE_DOMAIN))
        self.assertEqual(self.b.calls, [])

    def test_by_ehlo(self):
        identity = self.accepted(self.providers, credentials("bob", "secret", helo="b.example"))
        self.assertEqual(identity, Identity("b", "bob", VIA_UNIQUE_DOMAIN))

    def test_sni_wins_over_ehlo(self):
        self.rejected(self.providers, credentials("bob", "secret", sni="a.example",
                                                  helo="b.example"))
        self.assertEqual(len(self.a.calls), 1)
        self.assertEqual(self.b.calls, [])

    def test_domain_case_and_trailing_dot_ignored(self):
        for name in ("A.EXAMPLE", "a.example.", "A.Example."):
            identity = self.accepted(self.providers, credentials("alice", "pa:ss", sni=name))
            self.assertEqual(identity.provider, "a")
        identity = self.accepted(self.providers, credentials("bob", "secret", helo="B.Example."))
        self.assertEqual(identity.provider, "b")

    def test_credentials_go_as_is(self):
        # "alice" / "pa:ss" is not split although the password holds a colon
        self.accepted(self.providers, credentials("alice", "pa:ss", sni="a.example"))
        [creds] = self.a.calls
        self.assertTrue(IUserPasswordCredentials.providedBy(creds))
        self.assertEqual((creds.username, creds.password), ("alice", "pa:ss"))

    def test_wins_over_a_provider_named_by_the_username(self):
        named = UserPass(meta("b2"), "x", "y")
        self.rejected(self.providers + [named], credentials("b2", "x:y", sni="a.example"))
        self.assertEqual(named.calls, [])
        self.assertEqual(len(self.a.calls), 1)

    def test_rejection_is_final(self):
        self.rejected(self.providers, credentials("alice", "wrong", sni="a.example"))
        self.assertEqual(self.fallback.calls, [])

    def test_other_domain_does_not_select_it(self):
        identity = self.accepted(self.providers,
                                 credentials("alice", "pa:ss", sni="c.example"))
        self.assertEqual(identity, Identity("fb", "alice", VIA_FALLBACK))
        self.assertEqual(self.a.calls, [])

    def test_token_provider_gets_whole_secret(self):
        token = Token(meta("t", type="jwt", domain="t.example", unique=True), "tok:en")
        identity = self.accepted([token], credentials("someone", "tok:en", sni="t.example",
                                                      bearer=True))
        self.assertEqual(identity, Identity("t", "token-subject", VIA_UNIQUE_DOMAIN))
        [creds] = token.calls
        self.assertEqual((creds.token, creds.username), ("tok:en", "someone"))


class ByUsernameTests(SelectionMixin, unittest.TestCase):
    """Step 2: the username names a provider; split on the first colon; no fallback."""

    def setUp(self):
        self.journal: list[str] = []
        self.corp = UserPass(meta("corp"), "u", "p:q", journal=self.journal)
        self.fallback = UserPass(meta("fb", fallback=True), "corp", "u:p:q",
                                 journal=self.journal)
        self.providers = [self.corp, self.fallback]

    def test_first_colon_split(self):
        identity = self.accepted(self.providers, credentials("corp", "u:p:q"))
        self.assertEqual(identity, Identity("corp", "u", VIA_USERNAME))
        self.assertEqual(str(identity), "corp/u")
        [creds] = self.corp.calls
        self.assertEqual((creds.username, creds.password), ("u", "p:q"))

    def test_no_colon_rejected_without_asking(self):
        self.rejected(self.providers, credentials("corp", "upq"))
        self.assertEqual(self.journal, [])

    def test_empty_user_part_is_passed_and_rejected(self):
        self.rejected(self.providers, credentials("corp", ":p:q"))
        self.assertEqual([(c.username, c.password) for c in self.corp.calls], [("", "p:q")])

    def test_rejection_does_not_try_fallbacks(self):
        # the fallback would accept corp / u:p:q as-is, but must never be asked
        self.rejected(self.providers, credentials("corp", "u:wrong"))
        self.assertEqual(self.journal, ["corp"])

    def test_unavailable_does_not_try_fallbacks(self):
        down = Down(meta("down"), journal=self.journal)
        self.unavailable([down, self.fallback], credentials("down", "u:p"))
        self.assertEqual(self.journal, ["down"])

    def test_token_provider_gets_whole_secret(self):
        token = Token(meta("tok", type="http_header"), "Bearer a:b:c")
        identity = self.accepted([token], credentials("tok", "Bearer a:b:c"))
        self.assertEqual(identity, Identity("tok", "token-subject", VIA_USERNAME))
        [creds] = token.calls
        self.assertTrue(IBearerTokenCredentials.providedBy(creds))
        self.assertEqual(creds.token, "Bearer a:b:c")

    def test_token_provider_with_bearer_mechanism(self):
        token = Token(meta("tok", type="jwt"), "eyJ.x.y")
        identity = self.accepted([token], credentials("tok", "eyJ.x.y", bearer=True))
        self.assertEqual(identity.provider, "tok")

    def test_bearer_never_offered_to_password_provider(self):
        self.rejected(self.providers, credentials("corp", "u:p:q", bearer=True))
        self.assertEqual(self.journal, [])

    def test_username_match_is_exact(self):
        # "CORP" names no provider: it goes to the fallbacks as-is
        self.rejected(self.providers, credentials("CORP", "u:p:q"))
        self.assertEqual(self.journal, ["fb"])


class FallbackTests(SelectionMixin, unittest.TestCase):
    """Step 3: fallbacks in config order, each once, as-is; step 4: reject."""

    def setUp(self):
        self.journal: list[str] = []

    def userpass(self, name, user="alice", password="secret", **kw):
        return UserPass(meta(name, fallback=True, **kw), user, password, journal=self.journal)

    def test_config_order_each_once(self):
        providers = [self.userpass("f1", password="one"), self.userpass("f2", password="two"),
                     UserPass(meta("not-fallback"), "alice", "three", journal=self.journal),
                     self.userpass("f3", password="three"), self.userpass("f4", password="three")]
        identity = self.accepted(providers, credentials("alice", "three"))
        self.assertEqual(identity, Identity("f3", "alice", VIA_FALLBACK))
        self.assertEqual(self.journal, ["f1", "f2", "f3"])

    def test_all_reject(self):
        providers = [self.userpass("f1"), self.userpass("f2"), self.userpass("f3")]
        self.rejected(providers, credentials("alice", "wrong"))
        self.assertEqual(self.journal, ["f1", "f2", "f3"])

    def test_credentials_as_is(self):
        providers = [self.userpass("f1", user="alice", password="a:b")]
        self.accepted(providers, credentials("alice", "a:b"))
        [creds] = providers[0].calls
        self.assertEqual((creds.username, creds.password), ("alice", "a:b"))

    def test_no_providers_rejects(self):
        self.rejected([], credentials("alice", "secret"))

    def test_no_fallbacks_rejects(self):
        plain = UserPass(meta("plain"), "alice", "secret", journal=self.journal)
        self.rejected([plain], credentials("alice", "secret"))
        self.assertEqual(self.journal, [])

    def test_first_unavailable_second_accepts(self):
        providers = [Down(meta("down", fallback=True), journal=self.journal),
                     self.userpass("f2")]
        identity = self.accepted(providers, credentials("alice", "secret"))
        self.assertEqual(identity, Identity("f2", "alice", VIA_FALLBACK))
        self.assertEqual(self.journal, ["down", "f2"])

    def test_rejections_with_one_unavailable_is_unavailable(self):
        # the user's password might be right on the provider that is down: 454, not 535
        providers = [self.userpass("f1"), Down(meta("down", fallback=True), journal=self.journal),
                     self.userpass("f3")]
        self.unavailable(providers, credentials("alice", "wrong"))
        self.assertEqual(self.journal, ["f1", "down", "f3"])

    def test_token_fallback_gets_whole_secret_and_username(self):
        token = Token(meta("tok", type="jwt", fallback=True), "a:b", journal=self.journal)
        identity = self.accepted([token], credentials("alice", "a:b"))
        self.assertEqual(identity, Identity("tok", "token-subject", VIA_FALLBACK))
        [creds] = token.calls
        self.assertEqual((creds.token, creds.username), ("a:b", "alice"))

    def test_bearer_skips_password_fallbacks(self):
        password = self.userpass("pw", user="alice", password="eyJ.x.y")
        token = Token(meta("tok", type="jwt", fallback=True), "eyJ.x.y", journal=self.journal)
        identity = self.accepted([password, token],
                                 credentials("alice", "eyJ.x.y", bearer=True))
        self.assertEqual(identity.provider, "tok")
        self.assertEqual(self.journal, ["tok"])

    def test_bearer_only_password_fallbacks_rejects(self):
        password = self.userpass("pw", user="alice", password="eyJ.x.y")
        self.rejected([password], credentials("alice", "eyJ.x.y", bearer=True))
        self.assertEqual(self.journal, [])


class DomainRestrictionTests(SelectionMixin, unittest.TestCase):
    """A ``domain`` without unique_domain_auth limits a provider to that connected domain."""

    def setUp(self):
        self.journal: list[str] = []
        self.named = UserPass(meta("corp", domain="corp.example"), "u", "p",
                              journal=self.journal)
        self.fallback = UserPass(meta("fb", domain="corp.example", fallback=True),
                                 "alice", "secret", journal=self.journal)
        self.providers = [self.named, self.fallback]

    def test_named_on_its_domain(self):
        identity = self.accepted(self.providers, credentials("corp", "u:p", sni="Corp.Example."))
        self.assertEqual(identity, Identity("corp", "u", VIA_USERNAME))

    def test_named_on_another_domain(self):
        self.rejected(self.providers, credentials("corp", "u:p", sni="other.example"))
        self.assertEqual(self.journal, [])

    def test_named_without_connected_domain(self):
        self.rejected(self.providers, credentials("corp", "u:p"))
        self.assertEqual(self.journal, [])

    def test_fallback_on_its_domain(self):
        identity = self.accepted(self.providers,
                                 credentials("alice", "secret", helo="corp.example"))
        self.assertEqual(identity, Identity("fb", "alice", VIA_FALLBACK))

    def test_fallback_on_another_domain_is_skipped(self):
        anywhere = UserPass(meta("any", fallback=True), "alice", "secret",
                            journal=self.journal)
        identity = self.accepted(self.providers + [anywhere],
                                 credentials("alice", "secret", helo="other.example"))
        self.assertEqual(identity.provider, "any")
        self.assertEqual(self.journal, ["any"])

    def test_domain_sni_wins_over_ehlo(self):
        self.rejected(self.providers, credentials("corp", "u:p", sni="other.example",
                                                  helo="corp.example"))
        self.assertEqual(self.journal, [])


class UnexpectedErrorTests(SelectionMixin, unittest.TestCase):
    """A provider bug is "cannot tell" (454), never "wrong password" (535)."""

    def test_synchronous_exception_by_name(self):
        self.unavailable([Broken(meta("bug"), synchronous=True)], credentials("bug", "u:p"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_failed_deferred_by_name(self):
        self.unavailable([Broken(meta("bug"), synchronous=False)], credentials("bug", "u:p"))
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)

    def test_unique_domain(self):
        broken = Broken(meta("bug", domain="d.example", unique=True), synchronous=True)
        self.unavailable([broken], credentials("alice", "secret", sni="d.example"))
        self.flushLoggedErrors(RuntimeError)

    def test_broken_fallback_then_accepting_fallback(self):
        providers = [Broken(meta("bug", fallback=True), synchronous=True),
                     UserPass(meta("fb", fallback=True), "alice", "secret")]
        identity = self.accepted(providers, credentials("alice", "secret"))
        self.assertEqual(identity.provider, "fb")
        self.flushLoggedErrors(RuntimeError)

    def test_broken_fallback_and_rejections(self):
        providers = [Broken(meta("bug", fallback=True), synchronous=False),
                     UserPass(meta("fb", fallback=True), "alice", "secret")]
        self.unavailable(providers, credentials("alice", "wrong"))
        self.flushLoggedErrors(KeyError)


class SnapshotTests(SelectionMixin, unittest.TestCase):
    """A reload during a login does not change the providers that login sees."""

    def test_login_keeps_its_snapshot(self):
        first = Manual(meta("first", fallback=True))
        second = UserPass(meta("second", fallback=True), "alice", "secret")
        directory = ProviderDirectory(ProviderSet([first, second]))
        login = ProviderSelector(directory).requestAvatarId(credentials("alice", "secret"))
        self.assertNoResult(login)
        directory.replace(ProviderSet([UserPass(meta("new", fallback=True), "x", "y")]))
        first.pending.errback(UnauthorizedLogin())
        self.assertEqual(self.successResultOf(login).provider, "second")


class CancellationTests(SelectionMixin, unittest.TestCase):
    """An abandoned login (client gone, session timeout) stops where it is."""

    def test_cancel_stops_the_login(self):
        first = Manual(meta("first", fallback=True))
        second = UserPass(meta("second", fallback=True), "alice", "secret")
        login = self.select([first, second], credentials("alice", "secret"))
        login.cancel()
        logged = self.flushLoggedErrors()
        self.failureResultOf(login, CancelledError)
        self.assertEqual(second.calls, [])
        self.assertEqual(logged, [])


class ProviderSetTests(unittest.TestCase):
    """The cross-provider rules of docs/design.md, "Provider selection", enforced on the instances
    too."""

    def test_duplicate_name(self):
        error = self.assertRaises(ConfigError, ProviderSet, [
            UserPass(meta("p"), "a", "b"), UserPass(meta("p"), "c", "d")])
        self.assertIn("'p'", str(error))
        self.assertIn("duplicate", str(error))

    def test_unique_without_domain(self):
        error = self.assertRaises(ConfigError, ProviderSet, [
            UserPass(meta("p", unique=True), "a", "b")])
        self.assertIn("needs a domain", str(error))

    def test_two_unique_on_one_domain(self):
        error = self.assertRaises(ConfigError, ProviderSet, [
            UserPass(meta("p", domain="Example.com", unique=True), "a", "b"),
            UserPass(meta("q", domain="example.com.", unique=True), "c", "d")])
        self.assertIn("'p'", str(error))
        self.assertIn("'q'", str(error))

    def test_fallbacks_in_config_order(self):
        providers = [UserPass(meta(name, fallback=name != "x"), "a", "b")
                     for name in ("c", "x", "a", "b")]
        self.assertEqual([p.meta.name for p in ProviderSet(providers).fallbacks],
                         ["c", "a", "b"])


class ObserverTests(unittest.TestCase):
    """Metrics see exactly one verdict per login, including 'nobody could answer'."""

    class Events:
        def __init__(self):
            self.events = []

        def checked(self, provider, via, outcome, seconds):
            self.events.append(("checked", provider, via, outcome))

        def unmatched(self, outcome="rejected"):
            self.events.append(("unmatched", outcome))

    def run_selection(self, providers, creds):
        observer = self.Events()
        selector = ProviderSelector(ProviderDirectory(ProviderSet(providers)), observer)
        result = selector.requestAvatarId(creds)
        result.addErrback(lambda _: None)
        return observer.events

    def test_every_fallback_refused(self):
        events = self.run_selection(
            [UserPass(meta("a", fallback=True), "x", "y")], credentials("alice", "pw"))
        self.assertEqual(events, [("checked", "a", "fallback", "rejected"),
                                  ("unmatched", "rejected")])

    def test_a_fallback_could_not_answer(self):
        events = self.run_selection(
            [Down(meta("down", fallback=True)), UserPass(meta("b", fallback=True), "x", "y")],
            credentials("alice", "pw"))
        self.assertEqual(events, [("checked", "down", "fallback", "unavailable"),
                                  ("checked", "b", "fallback", "rejected"),
                                  ("unmatched", "unavailable")])


    def test_an_observer_bug_changes_no_login(self):
        """The metrics listen; they never decide: an observer that raises leaves the
        login's verdict as it was, and its failure is logged."""
        class Broken:
            def checked(self, *args):
                raise RuntimeError("observer bug")

            def unmatched(self, *args):
                raise RuntimeError("observer bug")
        provider = UserPass(meta("a", fallback=True), "alice", "pw")
        selector = ProviderSelector(ProviderDirectory(ProviderSet([provider])), Broken())
        accepted = self.successResultOf(selector.requestAvatarId(credentials("alice", "pw")))
        self.assertTrue(accepted)
        refused = self.failureResultOf(selector.requestAvatarId(credentials("alice", "no")))
        self.assertFalse(refused.check(RuntimeError))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 3)  # one per verdict told


class PlanTests(unittest.TestCase):
    """``plan`` says, before anyone is asked, which providers a login goes to and the user
    each is asked about: the identities the login throttle counts (docs/design.md,
    "Configuration, reload and limits")."""

    def setUp(self):
        self.corp = UserPass(meta("corp"), "alice", "pw")
        self.jwt = Token(meta("sso", type="jwt"), "tok")
        self.unique = UserPass(meta("u", domain="u.example", unique=True), "alice", "pw")
        self.fb1 = UserPass(meta("fb1", fallback=True), "alice", "pw")
        self.fb2 = Token(meta("fb2", type="jwt", fallback=True), "tok")
        self.selector = ProviderSelector(ProviderDirectory(ProviderSet(
            [self.corp, self.jwt, self.unique, self.fb1, self.fb2])))

    def claims(self, *args, **kwargs) -> list[Claim]:
        return list(self.selector.plan(credentials(*args, **kwargs)).claims)

    def test_by_name_the_user_after_the_first_colon_split(self):
        self.assertEqual(self.claims("corp", "Alice:p:w"),
                         [Claim("corp", "Alice", user_in_secret=True)])

    def test_by_name_without_a_colon_claims_nobody(self):
        self.assertEqual(self.claims("corp", "no-colon"), [])

    def test_unique_domain_the_user_as_sent(self):
        self.assertEqual(self.claims("alice", "p:w", sni="u.example"), [Claim("u", "alice")])

    def test_fallback_one_claim_per_provider_tokens_name_nobody(self):
        self.assertEqual(self.claims("alice", "pw"),
                         [Claim("fb1", "alice"), Claim("fb2", None)])
        self.assertEqual(self.claims("", "tok", bearer=True), [Claim("fb2", None)])

    def test_token_provider_by_name_names_nobody(self):
        self.assertEqual(self.claims("sso", "tok"), [Claim("sso", None)])

    def test_the_accepting_providers_claim(self):
        plan = self.selector.plan(credentials("alice", "pw"))
        identity = self.successResultOf(self.selector.check(plan))
        self.assertEqual(plan.claim_of(identity), Claim("fb1", "alice"))

    def test_no_secret_in_reprs(self):
        plan = self.selector.plan(credentials("corp", "hunter2:secret-pw"))
        for text in (repr(plan), repr(plan.claims), plan.claims[0].label):
            self.assertNotIn("hunter2", text)
            self.assertNotIn("secret-pw", text)
        self.assertEqual(plan.claims[0].label, "corp/<user from the password field>")
