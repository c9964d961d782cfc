"""userpass (docs/design.md, "Provider types"): static credentials, constant-time compare, refuses
empty config."""

from __future__ import annotations

import hmac

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import UnauthorizedLogin
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from esmtpfa.auth.credentials import IUserPasswordCredentials, UserPassword
from esmtpfa.auth.provider import IProvider, ProviderMeta
from esmtpfa.common.context import ConnectionContext
from esmtpfa.common.errors import ConfigError
from esmtpfa.providers import userpass
from esmtpfa.providers.userpass import UserPassProvider

META = ProviderMeta(name="my-userpass-provider", type="userpass")
CONTEXT = ConnectionContext("urn:uuid:00000000-0000-0000-0000-000000000002", "smtp")
SECRET = "correct horse:battery staple"


def creds(username: str, password: str) -> UserPassword:
    return UserPassword(username, password, CONTEXT)


class CheckTests(unittest.TestCase):
    def setUp(self):
        self.provider = UserPassProvider.from_params(
            META, {"username": "alice", "password": SECRET})

    def test_interfaces(self):
        self.assertTrue(verifyObject(IProvider, self.provider))
        self.assertTrue(ICredentialsChecker.providedBy(self.provider))
        self.assertEqual(self.provider.credentialInterfaces, (IUserPasswordCredentials,))
        self.assertTrue(self.provider.needs_password)

    def test_accepts(self):
        d = self.provider.requestAvatarId(creds("alice", SECRET))
        self.assertEqual(self.successResultOf(d).user, "alice")

    def test_rejects(self):
        cases = [("alice", "wrong"), ("bob", SECRET), ("bob", "wrong"), ("", ""),
                 ("alice", SECRET[:-1]), ("alice", SECRET + "x"), ("Alice", SECRET),
                 ("alice", SECRET.upper()), ("alice ", SECRET), ("alice", "")]
        for username, password in cases:
            d = self.provider.requestAvatarId(creds(username, password))
            self.failureResultOf(d, UnauthorizedLogin)

    def test_non_ascii(self):
        provider = UserPassProvider(META, "jürgen", "pässwörd☃")
        self.successResultOf(provider.requestAvatarId(creds("jürgen", "pässwörd☃")))
        self.failureResultOf(provider.requestAvatarId(creds("jurgen", "pässwörd☃")),
                             UnauthorizedLogin)

    def test_lone_surrogate_is_a_wrong_password_not_a_crash(self):
        d = self.provider.requestAvatarId(creds("alice", "\udcff"))
        self.failureResultOf(d, UnauthorizedLogin)

    def test_both_fields_always_compared_as_digests(self):
        """No early exit and no length leak: two compares of 32-byte digests, every time."""
        compared = []

        def compare_digest(a, b):
            compared.append((len(a), len(b)))
            return real(a, b)

        real = hmac.compare_digest
        self.patch(userpass.hmac, "compare_digest", compare_digest)
        for username, password in [("alice", SECRET), ("x", SECRET), ("alice", "x"),
                                   ("x" * 1000, ""), ("", "y" * 1000)]:
            del compared[:]
            self.provider.requestAvatarId(creds(username, password)).addErrback(
                lambda f: f.trap(UnauthorizedLogin))
            self.assertEqual(compared, [(32, 32), (32, 32)])

    def test_password_not_kept_in_clear(self):
        self.assertNotIn(SECRET, repr(vars(self.provider)))

    def test_repr_hides_password(self):
        text = repr(self.provider)
        self.assertIn("my-userpass-provider", text)
        self.assertNotIn(SECRET, text)
        self.assertNotIn("battery", text)

    def test_stop(self):
        self.assertIsNone(self.successResultOf(self.provider.stopProvider()))


class ConfigTests(unittest.TestCase):
    def assertRefused(self, params: dict, *fragments: str) -> str:
        error = self.assertRaises(ConfigError, UserPassProvider.from_params, META, params)
        message = str(error)
        self.assertIn("my-userpass-provider", message)
        for fragment in fragments:
            self.assertIn(fragment, message)
        return message

    def test_missing_username(self):
        self.assertRefused({"password": "p"}, "'username'", "missing")

    def test_missing_password(self):
        message = self.assertRefused({"username": "u"}, "'password'", "missing")
        self.assertNotIn("'u'", message)

    def test_empty_username(self):
        self.assertRefused({"username": "", "password": "p"}, "'username'", "empty")

    def test_empty_password(self):
        self.assertRefused({"username": "u", "password": ""}, "'password'", "empty")

    def test_not_a_string(self):
        self.assertRefused({"username": "u", "password": 1234}, "'password'", "string")
        self.assertRefused({"username": None, "password": "p"}, "'username'")

    def test_unknown_param(self):
        message = self.assertRefused(
            {"username": "u", "password": "hunter2", "pasword": "hunter2"}, "'pasword'")
        self.assertNotIn("hunter2", message)

    def test_constructor_refuses_empty(self):
        self.assertRaises(ConfigError, UserPassProvider, META, "u", "")
        self.assertRaises(ConfigError, UserPassProvider, META, "", "p")

    def test_resources_are_ignored(self):
        provider = UserPassProvider.from_params(
            META, {"username": "u", "password": "p"}, resources=object())
        self.assertEqual(provider.meta, META)
