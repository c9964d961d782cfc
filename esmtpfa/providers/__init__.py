"""The registry of provider types: type name → class, imported only when used.

Lazy imports keep a config with only ``userpass`` providers from paying for (or failing
on) ldap3, PyJWT or treq, and let ``config`` check type names without importing anything.
"""

from __future__ import annotations

import importlib
from types import MappingProxyType
from typing import Mapping

from esmtpfa.auth.provider import Provider
from esmtpfa.common.errors import ConfigError

PROVIDER_TYPES: Mapping[str, str] = MappingProxyType({
    "http_basic": "esmtpfa.providers.http_basic.HTTPBasicProvider",
    "http_header": "esmtpfa.providers.http_header.HTTPHeaderProvider",
    "jwt": "esmtpfa.providers.jwt.JWTProvider",
    "ldap": "esmtpfa.providers.ldap.LDAPProvider",
    "userpass": "esmtpfa.providers.userpass.UserPassProvider",
})


def known_types() -> str:
    """The type names for error messages, so a typo shows what was meant."""
    return ", ".join(sorted(PROVIDER_TYPES))


def provider_class(type_name: str) -> type[Provider]:
    """The class implementing ``type_name``; ``ConfigError`` for unknown or unloadable types."""
    path = PROVIDER_TYPES.get(type_name) if isinstance(type_name, str) else None
    if path is None:
        raise ConfigError(f"unknown provider type {type_name!r} (known: {known_types()})")
    module_name, _, class_name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise ConfigError(
            f"provider type {type_name!r} could not be loaded ({path}): {error}") from error
    if not (isinstance(cls, type) and issubclass(cls, Provider)):
        raise ConfigError(f"provider type {type_name!r}: {path} is not a Provider class")
    return cls


__all__ = ["PROVIDER_TYPES", "known_types", "provider_class"]
