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

YAML or JSON; strings may use ``${VAR}`` (``$${`` for a literal ``${``), like the provider
file.  The file is read once, at startup: upstream connections are pooled and their
breakers hold state, so a change takes a restart (the provider file, not this one, is
what reloads).  Errors name the file, the entry and the key, never a value: ``pass`` is
a secret.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import os
from typing import Any, Callable, Mapping

from esmtpfa.config import expand_env, unknown_keys
from esmtpfa.documents import load_document, read_document
from esmtpfa.providers.base import ConfigError
from esmtpfa.relay.sasl import MECHANISMS
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
ENTRY_KEYS = ("addr", "port", *KEYS)


def _entry(item: Any, index: int, source: str, env: Mapping[str, str],
           default_port: int) -> UpstreamEntry:
    where = f"{source}: relays[{index}]"
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: must be a mapping with at least 'addr'")
    unknown = unknown_keys(item, ENTRY_KEYS, "relay")
    if unknown:
        raise ConfigError(f"{where}: {unknown}")

    def value(key: str) -> Any:
        raw = item[key]
        try:
            return expand_env(raw, env) if isinstance(raw, str) else raw
        except ConfigError as error:
            raise ConfigError(f"{where}: {key}: {error}") from None

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
    if ("username" in overrides) != ("password" in overrides):
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
