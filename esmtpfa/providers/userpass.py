"""userpass: one static user and password from the config (docs/design.md, "Provider types").

The comparison is constant-time in what it reveals: both fields are always compared, and
what is compared are SHA-256 digests, so neither an early exit nor a length difference
tells an attacker which field was wrong or how long the secret is.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any, Mapping

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from esmtpfa.auth.credentials import IUserPasswordCredentials
from esmtpfa.auth.errors import BAD_PASSWORD, UNKNOWN_USER
from esmtpfa.auth.provider import IProvider, Principal, Provider, ProviderMeta
from esmtpfa.common.errors import ConfigError
from esmtpfa.common.logs import logger
from esmtpfa.providers.base import refused, require_string

log = logger("esmtpfa.providers.userpass")

PARAMS = frozenset({"username", "password"})


def _digest(value: str) -> bytes:
    # surrogatepass: a lone surrogate from a client must not raise before the compare
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()


@implementer(IProvider)
class UserPassProvider(Provider):
    credentialInterfaces = (IUserPasswordCredentials,)

    def __init__(self, meta: ProviderMeta, username: str, password: str):
        super().__init__(meta)
        if not username or not password:
            raise ConfigError(f"provider {meta.name!r} (userpass): "
                              "username and password must be non-empty")
        self.username = username
        self._username_digest = _digest(username)
        self._password_digest = _digest(password)

    @classmethod
    def from_params(cls, meta: ProviderMeta, params: Mapping[str, Any], *,
                    resources: Any = None) -> "UserPassProvider":
        unknown = sorted(set(params) - PARAMS)
        if unknown:  # a typo must not pass silently
            raise ConfigError(f"provider {meta.name!r} (userpass): unknown param(s) "
                              f"{', '.join(map(repr, unknown))} (expected username, password)")
        return cls(meta, require_string(meta, params, "username"),
                   require_string(meta, params, "password"))

    def requestAvatarId(self, credentials: IUserPasswordCredentials) -> Deferred:
        # Both compares run unconditionally; `&` (not `and`) keeps it that way.
        user_ok = hmac.compare_digest(_digest(credentials.username), self._username_digest)
        pass_ok = hmac.compare_digest(_digest(credentials.password), self._password_digest)
        if user_ok & pass_ok:
            return succeed(Principal(self.username))  # the login name, as it reached us
        # Which field was wrong goes to the log only (after both compares ran): the
        # client hears the same refusal either way.
        kind, detail = ((BAD_PASSWORD, "wrong password") if user_ok
                        else (UNKNOWN_USER, "no such user"))
        return fail(refused(log, f"userpass provider {self.meta.name!r}", credentials,
                            kind, detail))

    def __repr__(self) -> str:
        return (f"<UserPassProvider {self.meta.name!r} "
                f"username={self.username!r} password=<redacted>>")
