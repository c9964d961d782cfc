"""Per-provider policy: which sender addresses an identity may use (``docs/policy.md``).

A provider entry may carry a ``policy`` block beside ``meta`` and ``params``.  This module
parses it (``parse_policy``, pure: the config loader calls it, in the reload thread too)
and decides, also purely, whether an identity may use an address:

* as its envelope sender (``MAIL FROM``, the HTTP ``from``);
* in the ``From:`` header of its message, when ``check_header_from`` is set
  (``HeaderFromScanner`` collects those addresses while the content streams in, with
  bounded memory).

``envelope_sender`` (``EnvelopeSender``) sets the envelope sender from the identity, for
devices that cannot send as themselves; the rules above then judge the sender it set.

Without a policy block, or with one that sets none of the sender keys, a provider's
users may send as anyone: that was the only behaviour before, and it stays the default.

How addresses compare (a choice, explained in ``docs/policy.md``): domains without regard
to case (RFC 5321 §2.4) and without a trailing dot; local parts without regard to case
too, although RFC 5321 §2.4 lets a receiving host treat them as case-sensitive, because
the mailbox stores behind a submission relay do not, and a refusal of ``Alice@`` for
``alice@`` helps nobody.  Nothing else is normalized: no sub-address (``+tag``) is
stripped, a quoted local part is compared as written, IDNA forms are not converted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from email.utils import getaddresses
from typing import Any, Callable, Iterable, Mapping, Sequence

from esmtpfa.auth.sendingrates import Rates, RateSyntaxError
from esmtpfa.common.errors import ConfigError

#: The keys of a policy block: sender authorization, then sending rates.
POLICY_KEYS = ("allowed_senders", "sender_attribute", "sender_claim", "check_header_from",
               "rate", "rate_attribute", "rate_claim", "delivery", "delivery_attribute",
               "delivery_claim", "undeliverable", "envelope_sender")
#: The keys of ``envelope_sender`` (the sender set from the identity, for devices), and
#: when it applies: every message, only a null sender, only a sender the rules refuse.
ENVELOPE_SENDER_KEYS = ("when", "address", "map", "attribute", "claim", "header")
SENDER_WHEN = ("always", "empty", "not_allowed")
#: Where an identity's own sender may come from, and the provider types that have it: an
#: LDAP attribute, a JWT claim, a header of the HTTP endpoint's answer.
SOURCE_TYPES = {"attribute": ("ldap",), "claim": ("jwt",),
                "header": ("http_basic", "http_header")}
#: The delivery modes and the endings of an undeliverable message (docs/spool.md).
DELIVERY_MODES = ("passthrough", "fallback", "spool")
ENDINGS = ("bounce", "hold")
#: The keys that turn sender authorization on.
SENDER_KEYS = ("allowed_senders", "sender_attribute", "sender_claim")

ANY = "*"
NULL_SENDER = "<>"
USER = "{user}"

#: A provider's identity carries at most this many values of its sender attribute/claim,
#: each at most ``MAX_ADDRESS`` characters (RFC 5321 §4.5.3.1.3: a path is 256 octets).
MAX_VALUES = 256
MAX_ADDRESS = 320
#: What the ``From:`` fields of one message may hold before it is refused unchecked:
#: far more than any real From (one or a few mailboxes), little enough to parse at once.
MAX_FROM_BYTES = 16 * 1024

# RFC 5322 §3.2.3 atext, with RFC 6531's UTF-8 (any non-ASCII character).
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010FFFF]"
_DOT_ATOM = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*\Z")
_ATTRIBUTE = re.compile(r"(?:[A-Za-z][A-Za-z0-9-]*|[0-9]+(?:\.[0-9]+)+)\Z")  # RFC 4512 §2.5
_FIELD_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")  # RFC 9110 §5.1 token
_DOMAIN_CHARS = re.compile(r"[^\s@<>()\[\],;:\"\\]+\Z")
# A host name's labels (RFC 5321 §4.1.2 Domain), U-labels too (RFC 6531): what a sender
# that goes into MAIL FROM may have after its "@", nothing that could end the command.
_HOST = re.compile(r"[A-Za-z0-9\u0080-\U0010FFFF](?:[A-Za-z0-9\u0080-\U0010FFFF-]*"
                   r"[A-Za-z0-9\u0080-\U0010FFFF])?(?:\.[A-Za-z0-9\u0080-\U0010FFFF]"
                   r"(?:[A-Za-z0-9\u0080-\U0010FFFF-]*[A-Za-z0-9\u0080-\U0010FFFF])?)*\Z")


def is_local_part(text: str) -> bool:
    """A dot-atom local part (RFC 5322 §3.4.1, RFC 5321 §4.5.3.1.1: at most 64 octets):
    the only form ``{user}`` expands to, so a user name can never smuggle an ``@``, a
    quote or a space into an address."""
    return bool(_DOT_ATOM.match(text)) and len(text.encode("utf-8", "replace")) <= 64


def is_plain_address(text: str) -> bool:
    """``local@domain`` with a dot-atom local part and a host name (RFC 5321 §4.1.2),
    at most 254 octets (RFC 5321 §4.5.3.1.3: 256 with the brackets), printable: the
    only form a sender taken from a directory, a token or the configuration may have,
    so a value can never carry a space, a bracket or a line end into the upstream's MAIL
    command, nor a control character into a log line."""
    local, at, domain = text.rpartition("@")
    return (bool(at) and text.isprintable() and is_local_part(local)
            and bool(_HOST.match(domain)) and len(text.encode("utf-8", "replace")) <= 254)


def _domain(text: str) -> str:
    return text.rstrip(".").lower()


def split_address(address: str) -> tuple[str, str] | None:
    """``(local, domain)`` compared as this module compares them, or None for a string
    that is no ``local@domain``."""
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        return None
    return local.lower(), _domain(domain)


# -- the rules -------------------------------------------------------------------------

@dataclass(frozen=True)
class SenderRules:
    """The sender keys of one policy block, parsed.

    ``addresses`` are exact ``(local, domain)`` pairs, ``domains`` allow any local part,
    ``user_domains`` allow the identity's user as local part; ``sender_attribute`` and
    ``sender_claim`` name where the identity's own addresses come from.
    """

    any_address: bool = False
    null_sender: bool = False
    addresses: frozenset[tuple[str, str]] = frozenset()
    domains: frozenset[str] = frozenset()
    user_domains: frozenset[str] = frozenset()
    sender_attribute: str | None = None
    sender_claim: str | None = None
    check_header_from: bool = False

    @property
    def source(self) -> str | None:
        """The attribute (ldap) or claim (jwt) whose values are the identity's addresses."""
        return self.sender_attribute or self.sender_claim

    def allows(self, address: str, user: str, own: Iterable[str] = ()) -> bool:
        """Whether an identity whose user is ``user`` and whose attribute/claim values are
        ``own`` may use ``address`` (``""`` is the null sender).  The lists add up."""
        if address == "":
            return self.null_sender
        if self.any_address:
            return True
        parts = split_address(address)
        if parts is None:
            return False
        local, domain = parts
        if domain in self.domains or parts in self.addresses:
            return True
        if domain in self.user_domains and is_local_part(user) and user.lower() == local:
            return True
        return any(split_address(value) == parts for value in own)


@dataclass(frozen=True)
class ChosenSender:
    """What ``EnvelopeSender.choose`` found: the address (None: none usable), and where
    it came from or why there is none, in words for the log (never a value)."""

    address: str | None
    origin: str


@dataclass(frozen=True)
class EnvelopeSender:
    """``envelope_sender``: the envelope sender set from the identity, for devices such
    as printers that log in with a name that is no address and send ``<>`` or a fixed
    made-up sender (``docs/policy.md``, "Devices: the sender from the identity").

    The address is looked up in order: ``by_user`` (the ``map``, keyed by the login name
    without regard to case), the first value of ``source`` (an LDAP attribute, a JWT
    claim, a header of an HTTP provider's answer), then ``address`` (which may be
    ``{user}@domain``).  Only the envelope changes; the ``From:`` header is the client's
    (``--relay-from`` rewrites that).
    """

    when: str = "always"
    #: Addresses stay out of reprs, as in logs.
    address: str | None = dataclass_field(default=None, repr=False)
    by_user: tuple[tuple[str, str], ...] = dataclass_field(default=(), repr=False)
    source: str | None = None
    source_kind: str = ""  # "attribute", "claim" or "header", for the log

    def applies(self, mail_from: str, allowed: Callable[[str], bool]) -> bool:
        """Whether a transaction whose client sent ``mail_from`` gets the set sender."""
        if self.when == "empty":
            return mail_from == ""
        if self.when == "not_allowed":
            return not allowed(mail_from)
        return True

    def choose(self, user: str, values: tuple[str, ...]) -> ChosenSender:
        """The sender for the identity whose user is ``user`` and whose ``source`` has
        ``values``.  A value that is not a plain address is no sender (it is never
        passed on to the upstream), and neither is ``{user}`` for a user that is no
        valid local part."""
        folded = user.lower()
        for name, address in self.by_user:
            if name == folded:
                return ChosenSender(address, "map")
        if self.source is not None:
            where = f"{self.source_kind} {self.source}"
            if values:
                if is_plain_address(values[0].strip()):
                    return ChosenSender(values[0].strip(), where)
                return ChosenSender(None, f"{where} is not a plain address")
            if self.address is None:
                return ChosenSender(None, f"{where} is missing")
        if self.address is not None:
            if not self.address.startswith(USER + "@"):
                return ChosenSender(self.address, "address")
            if is_local_part(user):
                expanded = user + self.address[len(USER):]
                if is_plain_address(expanded):
                    return ChosenSender(expanded, "address")
            return ChosenSender(None, "the login name is no valid local part for "
                                      f"{USER}")
        return ChosenSender(None, "no map entry for the login name")


@dataclass(frozen=True)
class Policy:
    """One provider's ``policy`` block.  ``senders`` is None when the block sets no sender
    key: then any sender is allowed, as without a block.  ``rate`` is the provider's own
    sending rates (None: the relay's defaults), ``rate_source`` the LDAP attribute or JWT
    claim that may set an identity's own (``docs/policy.md``)."""

    senders: SenderRules | None = None
    rate: Rates | None = None
    rate_source: str | None = None
    #: The provider's delivery mode (None: the relay's ``--delivery-mode``), the
    #: attribute or claim that may set an identity's own, and the provider's ending for
    #: undeliverable messages (None: ``--spool-undeliverable``).
    delivery: str | None = None
    delivery_source: str | None = None
    undeliverable: str | None = None
    #: The envelope sender set from the identity (None: the client's stays).
    envelope_sender: EnvelopeSender | None = None

    @property
    def identity_attributes(self) -> tuple[str, ...]:
        """What the provider must deliver with the identity (LDAP attribute, JWT claim)."""
        source = self.senders.source if self.senders is not None else None
        sets = self.envelope_sender.source if self.envelope_sender is not None else None
        names = (source, self.rate_source, self.delivery_source, sets)
        return tuple(dict.fromkeys(name for name in names if name))

    def delivery_for(self, values: tuple[str, ...], default: str) -> str:
        """The delivery mode of an identity whose ``delivery_source`` has ``values``: its
        own when it names a mode, else the provider's, else ``default``.  An unknown
        value is ignored, as a rate typo is: an IdP typo must not stop mail."""
        if values and values[0].strip().lower() in DELIVERY_MODES:
            return values[0].strip().lower()
        return self.delivery or default

    def rates_for(self, values: tuple[str, ...], default: Rates) -> Rates:
        """The rates of an identity whose ``rate_source`` has ``values``: its own where it
        sets one, else the provider's, else ``default``.  A value that does not parse is
        ignored (the identity gets the provider's rates): an IdP typo must not stop mail
        nor lift a limit."""
        rates = self.rate.or_else(default) if self.rate is not None else default
        if values:
            try:
                return Rates.parse(values[0]).or_else(rates)
            except RateSyntaxError:
                pass
        return rates


def _patterns(value: Any) -> dict[str, Any]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ConfigError("'allowed_senders' must be a list of strings")
    found: dict[str, Any] = {"any_address": False, "null_sender": False, "addresses": set(),
                             "domains": set(), "user_domains": set()}
    for index, item in enumerate(value):
        entry = item.strip()
        where = f"'allowed_senders'[{index}] {item!r}"
        if entry == ANY:
            found["any_address"] = True
            continue
        if entry == NULL_SENDER:
            found["null_sender"] = True
            continue
        local, at, domain = entry.rpartition("@")
        if not at or not domain or not _DOMAIN_CHARS.match(domain):
            raise ConfigError(f"{where} is not '*', '<>', '@domain', '{USER}@domain' or "
                              "an address")
        if local == "":
            found["domains"].add(_domain(domain))
        elif local == USER:
            found["user_domains"].add(_domain(domain))
        elif USER in local or "{" in local or "}" in local:
            raise ConfigError(f"{where}: '{USER}' must be the whole local part")
        elif not is_local_part(local) and not (local.startswith('"') and local.endswith('"')
                                               and len(local) > 1):
            raise ConfigError(f"{where}: the local part is not valid (RFC 5322 §3.4.1)")
        else:
            found["addresses"].add((local.lower(), _domain(domain)))
    return found


def _name(value: Any, key: str, pattern: re.Pattern | None = None) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key!r} must be a non-empty string")
    if pattern is not None and not pattern.match(value):
        raise ConfigError(f"{key!r} {value!r} is not an attribute name (RFC 4512 §2.5)")
    return value.strip()


def parse_policy(block: Any, provider_type: str) -> Policy:
    """The ``policy`` block of a provider of ``provider_type``.

    ``ConfigError`` names the key and the problem (the caller adds file and entry); an
    unknown key is an error like any typo, as is a key the provider type cannot serve.
    """
    if block is None:
        return Policy()
    if not isinstance(block, Mapping):
        raise ConfigError(f"'policy' must be a mapping, got {type(block).__name__}")
    unknown = [key for key in block if key not in POLICY_KEYS]
    if unknown:
        raise ConfigError(f"unknown policy key(s) {', '.join(map(repr, unknown))}; "
                          f"expected {', '.join(map(repr, POLICY_KEYS))}")
    rate, rate_source = _rates(block, provider_type)
    delivery = _delivery(block, provider_type)
    check = block.get("check_header_from", False)
    if not isinstance(check, bool):
        raise ConfigError("'check_header_from' must be true or false")
    if not any(key in block for key in SENDER_KEYS):
        if check:
            raise ConfigError("'check_header_from' needs sender rules ('allowed_senders', "
                              "'sender_attribute' or 'sender_claim')")
        return Policy(rate=rate, rate_source=rate_source,
                      envelope_sender=_envelope_sender(block, provider_type, None),
                      **delivery)
    found = _patterns(block["allowed_senders"]) if "allowed_senders" in block else {}
    attribute = _source(block, "sender_attribute", provider_type)
    claim = _source(block, "sender_claim", provider_type)
    rules = SenderRules(
        any_address=found.get("any_address", False),
        null_sender=found.get("null_sender", False),
        addresses=frozenset(found.get("addresses", ())),
        domains=frozenset(found.get("domains", ())),
        user_domains=frozenset(found.get("user_domains", ())),
        sender_attribute=attribute, sender_claim=claim, check_header_from=check)
    if not (rules.any_address or rules.null_sender or rules.addresses or rules.domains
            or rules.user_domains or rules.source):
        raise ConfigError("the policy allows no sender at all ('allowed_senders' is empty); "
                          "remove the sender keys to allow any sender")
    return Policy(rules, rate=rate, rate_source=rate_source,
                  envelope_sender=_envelope_sender(block, provider_type, rules), **delivery)


def _envelope_sender(block: Mapping[str, Any], provider_type: str,
                     rules: SenderRules | None) -> EnvelopeSender | None:
    """``envelope_sender``: ``when`` (``always``, ``empty``, ``not_allowed``), and where
    the address comes from: ``map`` (login name → address), ``attribute`` (ldap),
    ``claim`` (jwt) or ``header`` (the HTTP providers' answer), ``address`` (fixed, or
    ``{user}@domain``): at least one.  A fixed
    address the sender rules could never allow is a mistake found now, not at the first
    message."""
    if "envelope_sender" not in block:
        return None
    value = block["envelope_sender"]
    if not isinstance(value, Mapping):
        raise ConfigError("'envelope_sender' must be a mapping (when, address, map, "
                          "attribute, claim)")
    unknown = [key for key in value if key not in ENVELOPE_SENDER_KEYS]
    if unknown:
        named = ", ".join(f"'envelope_sender.{key}'" for key in unknown)
        raise ConfigError(f"unknown key(s) {named}; expected "
                          f"{', '.join(ENVELOPE_SENDER_KEYS)}")
    when = value.get("when", "always")
    if not isinstance(when, str) or when.strip().lower().replace("-", "_") not in SENDER_WHEN:
        raise ConfigError(f"'envelope_sender.when' must be one of {', '.join(SENDER_WHEN)}")
    when = when.strip().lower().replace("-", "_")
    if when == "not_allowed" and rules is None:
        raise ConfigError("'envelope_sender.when' not_allowed needs sender rules "
                          "('allowed_senders', 'sender_attribute' or 'sender_claim')")
    found: dict[str, Any] = {"when": when}
    if "address" in value:
        found["address"] = _fixed_sender(value["address"], "envelope_sender.address",
                                         template=True)
    if "map" in value:
        found["by_user"] = _sender_map(value["map"])
    sources = [kind for kind in SOURCE_TYPES if kind in value]
    if len(sources) > 1:
        raise ConfigError("'envelope_sender' takes one of 'attribute', 'claim' and 'header'")
    for kind in sources:
        key, wanted = f"envelope_sender.{kind}", SOURCE_TYPES[kind]
        if provider_type not in wanted:
            raise ConfigError(f"{key!r} is for {' and '.join(wanted)} providers, not "
                              f"{provider_type}")
        name = _name(value[kind], key, _ATTRIBUTE if kind == "attribute" else None)
        if kind == "header" and not _FIELD_NAME.match(name):
            raise ConfigError(f"{key!r} {name!r} is not an HTTP field name (RFC 9110 §5.1)")
        found["source"], found["source_kind"] = name, kind
    sender = EnvelopeSender(**found)
    if sender.address is None and not sender.by_user and sender.source is None:
        raise ConfigError("'envelope_sender' needs 'address', 'map', 'attribute' (ldap), "
                          "'claim' (jwt) or 'header' (http_basic, http_header)")
    if rules is not None and rules.source is None:
        for user, address in sender.by_user:
            if not rules.allows(address, user):
                raise ConfigError(f"'envelope_sender.map' {user!r}: {address!r} is not "
                                  "allowed by the sender rules")
        fixed = sender.address
        if (fixed is not None and not fixed.startswith(USER) and not rules.user_domains
                and not rules.allows(fixed, "")):
            raise ConfigError(f"'envelope_sender.address' {fixed!r} is not allowed by the "
                              "sender rules")
    return sender


def _fixed_sender(value: Any, key: str, template: bool = False) -> str:
    """An address from the configuration, as ``is_plain_address`` wants it (``{user}``
    as the whole local part when ``template``)."""
    if not isinstance(value, str):
        raise ConfigError(f"{key!r} must be an address")
    address = value.strip()
    check = address
    if template and address.startswith(USER + "@"):
        check = "user" + address[len(USER):]
    if not is_plain_address(check):
        raise ConfigError(f"{key!r} {value!r} is not a plain address (local@domain, a "
                          "dot-atom local part; '{user}@domain' for the login name)"
                          if template else
                          f"{key!r} {value!r} is not a plain address (local@domain, a "
                          "dot-atom local part)")
    return address


def _sender_map(value: Any) -> tuple[tuple[str, str], ...]:
    """``map``: login name → address, the names compared without regard to case."""
    if not isinstance(value, Mapping) or not value:
        raise ConfigError("'envelope_sender.map' must be a non-empty mapping of login "
                          "name to address")
    found: dict[str, str] = {}
    for name, address in value.items():
        if not isinstance(name, str) or not name.strip():
            raise ConfigError("'envelope_sender.map': a login name must be a non-empty "
                              "string")
        folded = name.strip().lower()
        if folded in found:
            raise ConfigError(f"'envelope_sender.map' {name!r}: listed twice (login names "
                              "compare without regard to case)")
        found[folded] = _fixed_sender(address, f"envelope_sender.map {name!r}")
    return tuple(found.items())


def _delivery(block: Mapping[str, Any], provider_type: str) -> dict[str, Any]:
    """``delivery`` (a mode), ``delivery_attribute``/``delivery_claim`` (where an
    identity's own mode is) and ``undeliverable`` (``bounce`` or ``hold``)."""
    found: dict[str, Any] = {}
    for key, allowed, field in (("delivery", DELIVERY_MODES, "delivery"),
                                ("undeliverable", ENDINGS, "undeliverable")):
        if key in block:
            value = block[key]
            if not isinstance(value, str) or value.strip().lower() not in allowed:
                raise ConfigError(f"{key!r} must be one of {', '.join(allowed)}")
            found[field] = value.strip().lower()
    source = (_source(block, "delivery_attribute", provider_type)
              or _source(block, "delivery_claim", provider_type))
    if source:
        found["delivery_source"] = source
    return found


def _rates(block: Mapping[str, Any], provider_type: str) -> tuple[Rates | None, str | None]:
    """``rate`` (``{messages: 100/1h, recipients: 1000/1d}``), and the attribute (ldap) or
    claim (jwt) that may give one identity its own rates, in the same syntax."""
    rate = None
    if "rate" in block:
        try:
            rate = Rates.parse(block["rate"])
        except RateSyntaxError as error:
            raise ConfigError(f"'rate': {error}") from None
    source = (_source(block, "rate_attribute", provider_type)
              or _source(block, "rate_claim", provider_type))
    return rate, source


def _source(block: Mapping[str, Any], key: str, provider_type: str) -> str | None:
    """The attribute (``*_attribute``: ldap only, an RFC 4512 name) or claim (``*_claim``:
    jwt only) that ``key`` names, or None when the block does not set it."""
    if key not in block:
        return None
    attribute = key.endswith("_attribute")
    wanted = "ldap" if attribute else "jwt"
    if provider_type != wanted:
        raise ConfigError(f"{key!r} is for {wanted} providers, not {provider_type}")
    return _name(block[key], key, _ATTRIBUTE if attribute else None)


def string_values(value: Any) -> tuple[str, ...]:
    """A claim or attribute as sender addresses: a string, or the strings of a list;
    anything else counts as no address.  Bounded (``MAX_VALUES``, ``MAX_ADDRESS``)."""
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return ()
    if isinstance(value, str):
        return (value,) if 0 < len(value) <= MAX_ADDRESS else ()
    if isinstance(value, (list, tuple)):
        out: list[str] = []
        for item in value[:MAX_VALUES]:
            out.extend(string_values(item) if not isinstance(item, (list, tuple)) else ())
        return tuple(out)
    return ()


# -- the From: header ------------------------------------------------------------------

class HeaderFromScanner:
    """Collects the ``From:`` fields of a message's header block as its content streams
    through ``feed`` (CRLF lines, as the SMTP and HTTP front ends write them).

    Memory is bounded whatever the client sends: a line is kept up to ``limit`` octets,
    and the From fields together at most ``limit`` octets; a From field (or a line that
    cannot be told apart from one) past that makes the message ``overflow``, and it is
    refused unchecked.  The header block ends at the first empty line, or at a line that
    is neither a field nor a continuation (RFC 5322 §2.2, §2.2.3; MTAs such as Postfix
    start the body there too), so a ``From:`` line in the body is never taken for the
    header.  Once the header block ended, ``feed`` costs nothing.
    """

    def __init__(self, limit: int = MAX_FROM_BYTES):
        self._limit = limit
        self._partial = bytearray()
        self._truncated = False
        self._cr_pending = False  # the last chunk ended with CR: maybe half a CRLF
        self._in_from = False     # the last field was a From field (for continuations)
        self._fields: list[bytearray] = []
        self._size = 0
        self.done = False
        self.overflow = False

    def feed(self, data: bytes) -> None:
        start = 0
        if self._cr_pending and data:
            self._cr_pending = False
            if data[:1] == b"\n":
                self._end_line()
                start = 1
            else:
                self._keep(b"\r")
        while not self.done and start < len(data):
            end = data.find(b"\r\n", start)
            if end < 0:
                if data.endswith(b"\r"):
                    self._keep(data[start:-1])
                    self._cr_pending = True
                else:
                    self._keep(data[start:])
                return
            self._keep(data[start:end])
            self._end_line()
            start = end + 2

    def finish(self) -> None:
        """The content ended (a last line without CRLF counts as a line)."""
        if not self.done and (self._partial or self._truncated):
            self._end_line()
        self.done = True

    def _keep(self, piece: bytes) -> None:
        room = self._limit - len(self._partial)
        if len(piece) > room:
            self._partial += piece[:max(room, 0)]
            self._truncated = True
        else:
            self._partial += piece

    def _end_line(self) -> None:
        line, truncated = bytes(self._partial), self._truncated
        self._partial, self._truncated = bytearray(), False
        if self.done or self.overflow:
            return
        if line == b"" and not truncated:
            self.done = True  # the empty line: the body follows
            return
        if line[:1] in (b" ", b"\t"):
            if self._in_from:
                self._append(line, truncated)
            return
        name, colon, value = line.partition(b":")
        name = name.strip()
        if not colon or not name or b" " in name or b"\t" in name:
            if truncated:
                self.overflow = True  # cannot tell what this very long line was
            self.done = True  # not a field: the body starts here
            return
        self._in_from = name.lower() == b"from"
        if self._in_from:
            self._fields.append(bytearray())
            self._append(value, truncated)

    def _append(self, text: bytes, truncated: bool) -> None:
        self._size += len(text) + 1
        if truncated or self._size > self._limit:
            self.overflow = True
            self.done = True
            return
        field = self._fields[-1]
        if field:
            field += b" "  # unfolding (RFC 5322 §2.2.3): the line break goes
        field += text

    @property
    def size(self) -> int:
        """Octets of From field text collected (what parsing them costs)."""
        return self._size

    def values(self) -> tuple[str, ...]:
        """The body of every From field, unfolded; UTF-8 decoded (RFC 6532), undecodable
        octets as U+FFFD, which matches no allowed address."""
        return tuple(bytes(field).decode("utf-8", "replace") for field in self._fields)


def from_addresses(values: Sequence[str]) -> tuple[str, ...] | None:
    """The addresses of the From fields ``values`` (RFC 5322 §3.6.2), or None when there
    is none or they cannot be parsed: both are refused, since nothing could be checked.

    ``getaddresses`` recurses on nested comments and groups, so a hostile header raises
    ``RecursionError``; its cost grows with the text (tens of ms for ``MAX_FROM_BYTES``),
    which is why callers parse big ones in a thread.  Entries without an address (a
    group's empty member list) are skipped.
    """
    if not values:
        return None
    try:
        found = tuple(address for _, address in getaddresses(list(values)) if address)
    except (RecursionError, ValueError, IndexError):
        return None
    return found or None


def first_refused(rules: SenderRules, addresses: Sequence[str], user: str,
                  own: Iterable[str] = ()) -> str | None:
    """The first of ``addresses`` the rules do not allow, or None when all are allowed."""
    own = tuple(own)
    for address in addresses:
        if not rules.allows(address, user, own):
            return address
    return None


__all__ = [
    "ANY", "ChosenSender", "ENVELOPE_SENDER_KEYS", "EnvelopeSender", "HeaderFromScanner",
    "MAX_FROM_BYTES", "NULL_SENDER", "POLICY_KEYS", "Policy",
    "SENDER_KEYS", "SENDER_WHEN", "SenderRules", "USER", "first_refused", "from_addresses",
    "is_local_part", "is_plain_address", "parse_policy", "split_address", "string_values",
]
