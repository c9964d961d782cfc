"""Helpers every provider type shares: a refusal logged once, the session id for log
lines, a required string param.

What a provider *is* (``Provider``, ``ProviderMeta``, ``Principal``, ``IProvider``) is
``esmtpfa.auth.provider``: provider selection stands on that contract, and the provider
types here implement it.
"""

from __future__ import annotations

from typing import Any, Mapping

from twisted.logger import Logger

from esmtpfa.auth.errors import LoginRefused
from esmtpfa.auth.provider import ProviderMeta
from esmtpfa.common.errors import ConfigError


def session_of(credentials: Any) -> str:
    """The session id of the login ``credentials`` belong to (their connection context,
    passed in with them through twisted.cred), for a provider's log lines: an operator
    follows one session from its connect line through the provider to its verdict."""
    context = getattr(credentials, "context", None)
    return getattr(context, "connection_id", None) or "-"


def refused(log: Logger, label: str, credentials: Any, kind: str,
            detail: str) -> LoginRefused:
    """A refusal of ``kind`` (esmtpfa.auth.errors), logged at debug with the session id
    and the provider's ``detail`` (never a secret); the error to fail the login with."""
    log.debug("{connection_id} {label}: login refused ({reason}): {detail}",
              connection_id=session_of(credentials), label=label, reason=kind,
              detail=detail)
    return LoginRefused(kind, detail)


def require_string(meta: ProviderMeta, params: Mapping[str, Any], key: str) -> str:
    """A required, non-empty string param; the error names provider and param."""
    value = params.get(key)
    if value is None:
        raise ConfigError(f"provider {meta.name!r} ({meta.type}): missing required param {key!r}")
    if not isinstance(value, str):
        raise ConfigError(
            f"provider {meta.name!r} ({meta.type}): param {key!r} must be a string")
    if value == "":
        raise ConfigError(f"provider {meta.name!r} ({meta.type}): param {key!r} is empty")
    return value
