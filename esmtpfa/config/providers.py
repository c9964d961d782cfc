"""Provider configuration (docs/design.md, "Provider selection", "Provider types" and
"Configuration, reload and limits"): parse and expand, then build.

Parsing is pure (text + environment → ``ProviderConfig`` values), so a reload is checked
completely before anything is swapped in.  Building reuses every instance whose
``ProviderConfig`` did not change, so JWKS caches and LDAP pools survive reloads, and
reports the instances that were dropped so the caller can stop them.  Reading the
document and parsing its YAML or JSON within bounds is ``esmtpfa.config.documents``' job.

Every error is a ``ConfigError`` naming the source, the provider and the problem, and never
a configured value: params and expanded variables may be secrets.

An entry's optional ``policy`` block (``esmtpfa.auth.policy``, ``docs/policy.md``) is parsed
here with the rest, so a typo in it fails the load or the reload like any other, and it
is part of what makes a provider "changed": a reload that changes a policy makes a new
instance, which the logins after the reload use.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from twisted.internet.defer import Deferred, DeferredList, maybeDeferred

from esmtpfa.auth.credentials import IUserPasswordCredentials
from esmtpfa.auth.policy import POLICY_KEYS, Policy, parse_policy
from esmtpfa.auth.provider import Provider, ProviderMeta
from esmtpfa.auth.selection import ProviderSet
from esmtpfa.common.context import domain_key, normalize_domain
from esmtpfa.common.errors import ConfigError
from esmtpfa.common.logs import logger
from esmtpfa.common.resources import Resources
from esmtpfa.config.documents import DEFAULT_LIMITS, DocumentLimits, load_document, read_document
from esmtpfa.providers import PROVIDER_TYPES, known_types, provider_class

log = logger("esmtpfa.config")

ITEM_KEYS = ("meta", "params", "policy")
META_KEYS = ("name", "type", "domain", "fallback", "unique_domain_auth", "login_domains")

# `$${` is a literal `${`; `${NAME}` a variable; a `${` that is neither is an error.
_REFERENCE = re.compile(r"\$\$\{|\$\{(?P<name>[^{}]*)\}|\$\{")
_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_NOT_IN_DOMAIN = re.compile(r"[\s/:@]")


@dataclass(frozen=True)
class ProviderConfig:
    """One provider as configured, after expansion; equal configs mean "keep the instance".

    ``params_json`` is the canonical JSON of the expanded params: immutable, hashable and
    compared by value.  ``source`` and ``index`` only locate errors: moving a provider in
    the file does not make it a different provider.
    """

    meta: ProviderMeta
    params_json: str = "{}"
    source: str = field(default="<config>", compare=False)
    index: int = field(default=0, compare=False)
    policy: Policy = field(default_factory=Policy)

    @classmethod
    def create(cls, meta: ProviderMeta, params: Mapping[str, Any] | None = None,
               source: str = "<config>", index: int = 0,
               policy: Policy | None = None) -> "ProviderConfig":
        return cls(meta, _canonical(params or {}), source, index,
                   policy if policy is not None else Policy())

    @property
    def params(self) -> dict[str, Any]:
        """A fresh copy, so no provider can alter what the next reload compares against."""
        return json.loads(self.params_json)

    @property
    def where(self) -> str:
        return f"{self.source}: {_who(self.meta.name, self.index)}"

    def __repr__(self) -> str:  # params may hold secrets
        return f"ProviderConfig(meta={self.meta!r}, params=<redacted>, policy={self.policy!r})"


class ConfiguredProviderSet(ProviderSet):
    """A ``ProviderSet`` that remembers the config of each instance, for the next reload."""

    def __init__(self, providers: Iterable[Provider], configs: Iterable[ProviderConfig]):
        super().__init__(providers)
        self.configs: tuple[ProviderConfig, ...] = tuple(configs)
        self.config_by_name: dict[str, ProviderConfig] = {
            config.meta.name: config for config in self.configs}


@dataclass(frozen=True)
class BuildResult:
    """What a (re)load produced: the new set, and the old instances nobody uses any more."""

    providers: ConfiguredProviderSet
    removed: tuple[Provider, ...] = ()
    added: tuple[Provider, ...] = ()

    def stopRemoved(self) -> Deferred:
        """Stop the removed providers; fires when all are done, whatever their outcome."""
        return _stop_all(self.removed)


# -- ${VAR} expansion ------------------------------------------------------------------

def expand_env(text: str, env: Mapping[str, str]) -> str:
    """Replace each ``${NAME}`` by its value; ``$${`` is a literal ``${``.

    An unset variable is an error, never an empty string: an empty credential is how a
    forgotten secret turns into an open relay.  Values are not expanded again.
    """
    def replace(match: re.Match) -> str:
        if match.group(0) == "$${":
            return "${"
        name = match.group("name")
        if name is None:
            raise ConfigError("unterminated '${' (write '$${' for a literal '${')")
        if not _VAR_NAME.match(name):
            raise ConfigError(f"invalid environment variable name {name!r}")
        value = env.get(name)
        if value is None:
            raise ConfigError(f"environment variable {name!r} is not set")
        return value

    return _REFERENCE.sub(replace, text)


def _expand_tree(value: Any, path: str, env: Mapping[str, str]) -> Any:
    """Expand every string in nested lists and maps; refuse what JSON cannot hold."""
    if isinstance(value, str):
        try:
            return expand_env(value, env)
        except ConfigError as error:
            raise ConfigError(f"param {path!r}: {error}") from None
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, list):
        return [_expand_tree(item, f"{path}[{i}]", env) for i, item in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ConfigError(f"param {path!r}: key {key!r} must be a string")
            out[key] = _expand_tree(item, f"{path}.{key}", env)
        return out
    # dates, binary, sets…: YAML types a provider would not expect; quote them.
    raise ConfigError(f"param {path!r}: unsupported value type {type(value).__name__} "
                      "(quote it to make it a string)")


def _canonical(params: Mapping[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


# -- parsing ---------------------------------------------------------------------------

def _items(document: Any, source: str) -> list:
    """The provider list, from ``{"providers": [...]}`` (README) or a bare list."""
    if document is None:
        raise ConfigError(f"{source}: empty document (expected a list of providers)")
    if isinstance(document, dict):
        unknown = sorted(set(document) - {"providers"}, key=str)
        if unknown:
            raise ConfigError(f"{source}: unknown top-level key(s) "
                              f"{_names(unknown)} (expected 'providers')")
        document = document.get("providers")
        if not isinstance(document, list):
            raise ConfigError(f"{source}: 'providers' must be a list")
    if not isinstance(document, list):
        raise ConfigError(f"{source}: expected a list of providers or a 'providers' key, "
                          f"got {type(document).__name__}")
    return document


def _who(name: str | None, index: int) -> str:
    if name:
        return f"provider {name!r} (providers[{index}])"
    return f"provider providers[{index}]"


def _names(keys: Iterable[Any]) -> str:
    return ", ".join(repr(key) for key in keys)


def unknown_keys(found: Iterable[Any], allowed: Sequence[str], what: str) -> str | None:
    unknown = [key for key in found if key not in allowed]
    if not unknown:
        return None
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(str(key), allowed, n=1)
        hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return f"unknown {what} key(s) {', '.join(hints)}; expected {_names(allowed)}"


def _optional_bool(meta: Mapping[str, Any], key: str) -> bool:
    value = meta.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ConfigError(f"meta.{key} must be true or false, got {type(value).__name__}")
    return value


def _domain(meta: Mapping[str, Any], env: Mapping[str, str]) -> str | None:
    value = meta.get("domain")
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"meta.domain must be a string, got {type(value).__name__}")
    try:
        value = expand_env(value, env)
    except ConfigError as error:
        raise ConfigError(f"meta.domain: {error}") from None
    domain = normalize_domain(value)
    if domain is not None and _NOT_IN_DOMAIN.search(domain):
        # a port or an address here would never match a connected domain: say so now
        raise ConfigError(f"meta.domain {value!r} is not a host name")
    return domain


def _login_domains(meta: Mapping[str, Any], env: Mapping[str, str]) -> tuple[str, ...]:
    """``meta.login_domains``: a domain or a list of them, the relay's own names that a
    login name may end in (docs/policy.md, "Login names with the relay's domain")."""
    value = meta.get("login_domains")
    if value is None:
        return ()
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not names or not all(
            isinstance(name, str) for name in names):
        raise ConfigError("meta.login_domains must be a domain or a non-empty list of "
                          "domains")
    keys: list[str] = []
    for name in names:
        try:
            expanded = expand_env(name, env)
        except ConfigError as error:
            raise ConfigError(f"meta.login_domains: {error}") from None
        key = domain_key(expanded)
        if key is None or _NOT_IN_DOMAIN.search(key) or "@" in key:
            raise ConfigError(f"meta.login_domains {name!r} is not a domain name")
        keys.append(key)
    return tuple(dict.fromkeys(keys))


def _parse_item(item: Any, index: int, source: str, env: Mapping[str, str]) -> ProviderConfig:
    def error(problem: str, name: str | None = None) -> ConfigError:
        return ConfigError(f"{source}: {_who(name, index)}: {problem}")

    if not isinstance(item, dict):
        raise error(f"expected a mapping with 'meta' and 'params', got {type(item).__name__}")
    meta = item.get("meta")
    problem = unknown_keys(item, ITEM_KEYS, "provider")
    if problem:
        raise error(problem, meta.get("name") if isinstance(meta, dict) else None)
    if not isinstance(meta, dict):
        raise error("'meta' is required and must be a mapping")
    name = meta.get("name")
    if not isinstance(name, str) or not name.strip():
        raise error("meta.name is required and must be a non-empty string")
    if name != name.strip():
        raise error("meta.name has leading or trailing whitespace", name.strip())
    problem = unknown_keys(meta, META_KEYS, "meta")
    if problem:
        raise error(problem, name)
    type_name = meta.get("type")
    if not isinstance(type_name, str) or not type_name:
        raise error("meta.type is required and must be a string", name)
    if type_name not in PROVIDER_TYPES:
        raise error(f"unknown type {type_name!r} (known: {known_types()})", name)
    try:
        provider_meta = ProviderMeta(
            name=name, type=type_name, domain=_domain(meta, env),
            fallback=_optional_bool(meta, "fallback"),
            unique_domain_auth=_optional_bool(meta, "unique_domain_auth"),
            login_domains=_login_domains(meta, env))
        params = item.get("params")
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise ConfigError(f"'params' must be a mapping, got {type(params).__name__}")
        bad_keys = [key for key in params if not isinstance(key, str)]
        if bad_keys:
            raise ConfigError(f"param names must be strings: {_names(bad_keys)}")
        params = {key: _expand_tree(value, key, env) for key, value in params.items()}
    except ConfigError as problem:
        raise error(str(problem), name) from None
    if provider_meta.unique_domain_auth and not provider_meta.domain:
        raise error("unique_domain_auth requires a domain", name)
    return ProviderConfig.create(provider_meta, params, source, index,
                                 _policy(item.get("policy"), type_name, env, error, name))


def _policy(block: Any, type_name: str, env: Mapping[str, str], error, name: str) -> Policy:
    """The entry's ``policy`` block; an error names file, entry and key (``policy.…``)."""
    if block is None:
        return Policy()
    if isinstance(block, dict):
        problem = unknown_keys(block, POLICY_KEYS, "policy")
        if problem:
            raise error(problem, name)
    try:
        if isinstance(block, dict):
            block = {key: _expand_tree(value, f"policy.{key}", env)
                     for key, value in block.items()}
        return parse_policy(block, type_name)
    except ConfigError as problem:
        raise error(f"policy: {problem}", name) from None


class _MetaOnly(Provider):
    """Stands in for a provider: ``ProviderSet`` needs only ``meta`` to check its rules."""


def _check_cross_rules(configs: Sequence[ProviderConfig], source: str) -> None:
    """Duplicate names and shared unique domains (docs/design.md, "Provider selection"), before
    anything is created.

    The rules are ``ProviderSet``'s own, so they live in one place.
    """
    try:
        ProviderSet(_MetaOnly(config.meta) for config in configs)
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None


def parse_provider_document(text: str | bytes, source: str,
                            env: Mapping[str, str] | None = None,
                            limits: DocumentLimits = DEFAULT_LIMITS) -> list[ProviderConfig]:
    """Parse and check a provider document (YAML or JSON) without creating any provider.

    Pure (no reactor, no provider), so the reloader can run it in a thread.
    """
    env = os.environ if env is None else env
    document = load_document(text, source, limits, root="providers")
    configs = [_parse_item(item, index, source, env)
               for index, item in enumerate(_items(document, source))]
    _check_cross_rules(configs, source)
    return configs


# -- building --------------------------------------------------------------------------

def _stop_all(providers: Iterable[Provider]) -> Deferred:
    def logged(failure, provider):
        log.failure("stopping provider {provider} failed", failure, provider=provider.meta.name)

    stops = [maybeDeferred(provider.stopProvider).addErrback(logged, provider)
             for provider in providers]
    return DeferredList(stops).addCallback(lambda _: None)


def _located(config: ProviderConfig, message: str) -> str:
    if f"provider {config.meta.name!r}" in message:  # base.require_string already names it
        return f"{config.source}: {message}"
    return f"{config.where}: {message}"


def _create(config: ProviderConfig, resources: Resources) -> Provider:
    try:
        cls = provider_class(config.meta.type)
        if config.meta.login_domains and (
                IUserPasswordCredentials not in cls.credentialInterfaces):
            raise ConfigError("meta.login_domains is for providers that check a user "
                              f"and a password, not {config.meta.type}")
        provider = cls.from_params(config.meta, config.params, resources=resources)
        # Before anyone can use the instance: the policy never changes on a live one.
        provider.policy = config.policy
        if config.policy.senders is None:
            log.info("provider {provider}: no sender rules in a policy block: its users "
                     "may send as any address (docs/policy.md)", provider=config.meta.name)
        return provider
    except ConfigError as error:
        raise ConfigError(_located(config, str(error))) from None
    except Exception as error:
        # The text of an arbitrary exception may quote a param value: name the type only.
        raise ConfigError(
            f"{config.where}: could not be created ({type(error).__name__})") from None


def build_providers(configs: Iterable[ProviderConfig],
                    previous: ProviderSet | None = None, *,
                    resources: Resources) -> BuildResult:
    """Instantiate ``configs``, keeping ``previous`` instances whose config is unchanged;
    the new ones take what they use from ``resources`` (docs/architecture.md,
    "Resources").

    On error nothing changes: the instances created so far are stopped and the previous
    set stays as it is, so a failed reload keeps the last good config (docs/design.md,
    "Configuration, reload and limits").
    """
    configs = list(configs)
    old_configs = getattr(previous, "config_by_name", {})
    old_providers = previous.by_name if previous is not None else {}
    providers: list[Provider] = []
    added: list[Provider] = []
    try:
        for config in configs:
            old = old_providers.get(config.meta.name)
            if old is not None and old_configs.get(config.meta.name) == config:
                providers.append(old)
                continue
            provider = _create(config, resources)
            added.append(provider)
            providers.append(provider)
        try:
            provider_set = ConfiguredProviderSet(providers, configs)
        except ConfigError as error:
            source = configs[0].source if configs else "providers"
            raise ConfigError(f"{source}: {error}") from None
    except BaseException:
        _stop_all(added)
        raise
    kept = {id(provider) for provider in providers}
    removed = tuple(p for p in (previous.providers if previous is not None else ())
                    if id(p) not in kept)
    return BuildResult(provider_set, removed, tuple(added))


def load_provider_file(path: str | os.PathLike, env: Mapping[str, str] | None = None,
                       previous: ProviderSet | None = None, *,
                       resources: Resources) -> BuildResult:
    """Read, parse and build a provider file in one step."""
    source = os.fspath(path)
    data = read_document(source)
    return build_providers(parse_provider_document(data, source, env), previous,
                           resources=resources)


__all__ = [
    "BuildResult", "ConfiguredProviderSet", "ProviderConfig", "build_providers",
    "expand_env", "load_provider_file", "parse_provider_document", "unknown_keys",
]
