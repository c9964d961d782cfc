"""Upstreams from a file (``--relay-config``): each smarthost with its own address, TLS
policy and credentials.

Failover between two providers (SendGrid first, Amazon SES when it is down) needs two
sets of credentials, which ``--relay-addr a,b`` with one ``--relay-user`` cannot give.
The file lists the upstreams in order of preference; whatever an entry leaves out comes
from the ``--relay-*`` flags, so shared settings are written once::

    relays:
    - addr: smtp.sendgrid.net:587
      user: apikey
      pass: ${SENDGRID_API_KEY}
      starttls: required
    - addr: email-smtp.eu-west-1.amazonaws.com:465
      tls: true
      user: ${SES_USER}
      pass: ${SES_PASSWORD}

An entry may log in with an OAuth2 token instead of a password (docs/oauth2.md)::

    - addr: smtp.office365.com:587
      starttls: required
      user: printer@contoso.example
      oauth2:
        token_url: https://login.microsoftonline.com/<tenant>/oauth2/v2.0/token
        client_id: ${M365_CLIENT_ID}
        client_secret: ${M365_CLIENT_SECRET}
        scope: https://outlook.office365.com/.default

YAML or JSON; strings may use ``${VAR}`` (``$${`` for a literal ``${``), like the provider
file.  The file is read once, at startup: upstream connections are pooled and their
breakers hold state, so a change takes a restart (the provider file, not this one, is
what reloads).  Errors name the file, the entry and the key, never a value: ``pass``,
``client_secret`` and ``refresh_token`` are secrets.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from esmtpfa.common.errors import ConfigError
from esmtpfa.config.documents import load_document, read_document
from esmtpfa.config.providers import expand_env, unknown_keys
from esmtpfa.relay.client_sasl import MECHANISMS, TOKEN_MECHANISMS
from esmtpfa.relay.settings import STARTTLS_MODES, parse_upstream_addresses, redacted


@dataclass(frozen=True)
class UpstreamEntry:
    """One upstream: where it is, and the ``UpstreamSettings`` fields it sets itself."""

    host: str
    port: int
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return (f"UpstreamEntry(host={self.host!r}, port={self.port!r}, "
                f"overrides={{{redacted(self.overrides)}}})")


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("must be a non-empty string")
    return value


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _port(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise ValueError("must be a port number (1-65535)")
    return value


def _one_of(allowed: tuple[str, ...]) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if not isinstance(value, str) or value.strip().lower() not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return value.strip().lower()
    return parse


def _existing_file(value: Any) -> str:
    path = _text(value)
    if not os.path.isfile(path):
        raise ValueError(f"no such file: {path}")  # a path is not a secret
    return path


#: Entry key → (UpstreamSettings field, parser).  The names follow the flags (``user``
#: for ``--relay-user``, ``tls_ca_cert`` for ``--relay-tls-ca-cert``).
KEYS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "user": ("username", _text),
    "pass": ("password", _text),
    "tls": ("implicit_tls", _flag),
    "starttls": ("starttls", _one_of(STARTTLS_MODES)),
    "tls_server_name": ("server_name", _text),
    "tls_ca_cert": ("ca_cert", _existing_file),
    "tls_cert": ("client_cert", _existing_file),
    "tls_key": ("client_key", _existing_file),
    "tls_skip_verify": ("skip_verify", _flag),
    "auth_mech": ("auth_mechanism", _one_of(tuple(m.lower() for m in sorted(MECHANISMS)))),
    "allow_insecure_auth": ("allow_insecure_auth", _flag),
}
ENTRY_KEYS = ("addr", "port", *KEYS, "oauth2")

#: ``oauth2`` block key → parser; the keys are ``relay.oauth2.OAuth2Settings`` fields.
OAUTH2_KEYS: dict[str, Callable[[Any], Any]] = {
    "token_url": _text,
    "client_id": _text,
    "client_secret": _text,
    "private_key": _existing_file,
    "certificate": _existing_file,
    "auth_method": _one_of(("client_secret_basic", "client_secret_post", "private_key_jwt")),
    "scope": _text,
    "refresh_token": _text,
    "audience": _text,
}


def _oauth2(block: Any, where: str, value: Callable[[Any, str], Any]):
    """The ``oauth2`` block → ``OAuth2Settings``, or ``ConfigError`` naming the key."""
    from esmtpfa.relay.oauth2 import OAuth2Settings
    if not isinstance(block, dict):
        raise ConfigError(f"{where}: oauth2: must be a mapping (token_url, client_id, ...)")
    unknown = unknown_keys(block, tuple(OAUTH2_KEYS), "oauth2")
    if unknown:
        raise ConfigError(f"{where}: oauth2: {unknown}")
    fields: dict[str, Any] = {}
    for key, parse in OAUTH2_KEYS.items():
        if key in block:
            try:
                fields[key] = parse(value(block[key], f"oauth2.{key}"))
            except ValueError as error:
                raise ConfigError(f"{where}: oauth2.{key}: {error}") from None
    for key in ("token_url", "client_id"):
        if key not in fields:
            raise ConfigError(f"{where}: oauth2.{key} is required")
    try:
        return OAuth2Settings(**fields)
    except ValueError as error:  # its messages name fields, never values
        raise ConfigError(f"{where}: oauth2: {error}") from None


def _entry(item: Any, index: int, source: str, env: Mapping[str, str],
           default_port: int) -> UpstreamEntry:
    where = f"{source}: relays[{index}]"
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: must be a mapping with at least 'addr'")
    unknown = unknown_keys(item, ENTRY_KEYS, "relay")
    if unknown:
        raise ConfigError(f"{where}: {unknown}")

    def expanded(raw: Any, key: str) -> Any:
        try:
            return expand_env(raw, env) if isinstance(raw, str) else raw
        except ConfigError as error:
            raise ConfigError(f"{where}: {key}: {error}") from None

    def value(key: str) -> Any:
        return expanded(item[key], key)

    if "addr" not in item:
        raise ConfigError(f"{where}: 'addr' is required (host, host:port or [v6]:port)")
    try:
        port = _port(value("port")) if "port" in item else default_port
        addresses = parse_upstream_addresses(_text(value("addr")), port)
    except ValueError as error:
        raise ConfigError(f"{where}: addr: {error}") from None
    if len(addresses) != 1:
        raise ConfigError(f"{where}: addr: one address per entry (list the others as "
                          "entries of their own)")
    overrides: dict[str, Any] = {}
    for key, (name, parse) in KEYS.items():
        if key in item:
            try:
                overrides[name] = parse(value(key))
            except ValueError as error:
                raise ConfigError(f"{where}: {key}: {error}") from None
    if "oauth2" in item:
        if "password" in overrides:
            raise ConfigError(f"{where}: 'oauth2' replaces 'pass': give one or the other")
        mechanism = overrides.get("auth_mechanism", "").upper()
        if mechanism and mechanism not in TOKEN_MECHANISMS:
            raise ConfigError(f"{where}: auth_mech: an oauth2 entry logs in with "
                              "oauthbearer or xoauth2")
        overrides["oauth2"] = _oauth2(item["oauth2"], where, expanded)
        overrides["password"] = None  # not the --relay-pass default either
    elif ("username" in overrides) != ("password" in overrides):
        raise ConfigError(f"{where}: 'user' and 'pass' go together")
    if ("client_cert" in overrides) != ("client_key" in overrides):
        raise ConfigError(f"{where}: 'tls_cert' and 'tls_key' go together")
    if overrides.get("implicit_tls") and overrides.get("starttls", "none") != "none":
        raise ConfigError(f"{where}: 'tls: true' is implicit TLS; 'starttls' does not apply")
    host, port = addresses[0]
    return UpstreamEntry(host, port, overrides)


def parse_relay_document(text: str | bytes, source: str, env: Mapping[str, str] | None = None,
                         default_port: int = 25) -> list[UpstreamEntry]:
    """``{relays: [...]}`` → the upstreams in order of preference, or ``ConfigError``."""
    env = os.environ if env is None else env
    document = load_document(text, source)
    if not isinstance(document, dict) or not isinstance(document.get("relays"), list):
        raise ConfigError(f"{source}: expected a mapping with a 'relays' list")
    unknown = unknown_keys(document, ("relays",), "top-level")
    if unknown:
        raise ConfigError(f"{source}: {unknown}")
    if not document["relays"]:
        raise ConfigError(f"{source}: 'relays' is empty (leave --relay-config unset to "
                          "deliver to the local Maildir)")
    entries = [_entry(item, index, source, env, default_port)
               for index, item in enumerate(document["relays"])]
    seen: set[tuple[str, int]] = set()
    for index, entry in enumerate(entries):
        key = (entry.host.lower(), entry.port)
        if key in seen:
            raise ConfigError(f"{source}: relays[{index}]: {entry.host}:{entry.port} is "
                              "listed twice")
        seen.add(key)
    return entries


def load_relay_file(path: str, env: Mapping[str, str] | None = None,
                    default_port: int = 25) -> list[UpstreamEntry]:
    """Read once at startup, before the reactor runs: synchronous, but within the same
    ``documents.DocumentLimits`` as the provider file (docs/config-loading.md)."""
    return parse_relay_document(read_document(path), path, env, default_port)
