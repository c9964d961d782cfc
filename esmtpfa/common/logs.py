"""esmtpfa's loggers, filtered by ``--log-level`` before they reach twistd's log.

Every module takes its ``Logger`` from ``logger(namespace)``: events below the level the
service sets at startup are dropped before an event is even built (the relay logs a
debug line per command on its hot path), the rest go to the global publisher (twistd's
text log, or one JSON object per line with ``--log-format json``: esmtpfa.common.jsonlog).
Pass what a line is about as named fields (``connection_id``, ``message_id``,
``identity``, ...): the JSON log carries them as keys.  Credentials are never passed to
a logger: log statements name users, providers and ids, never secrets.
"""

from __future__ import annotations

from dataclasses import dataclass
from time import time
from typing import Any

from twisted.logger import Logger, LogLevel, globalLogPublisher

_ORDER = {level: i for i, level in enumerate(LogLevel.iterconstants())}
_threshold = _ORDER[LogLevel.info]


class _LevelLogger(Logger):
    """A ``Logger`` that compares the level first (a filtered event costs one lookup) and
    renders the text once with ``str.format``.

    Twisted's observers would render ``log_format`` with their pure-Python formatter, a
    third of the relay's logging cost per message; the event keeps every field and the
    template (``log_template``), only ``log_format`` becomes the rendered ``log_text``.
    """

    def emit(self, level: LogLevel, format: str | None = None, **kwargs: Any) -> None:
        order = _ORDER.get(level)
        if order is None:  # not a level: Twisted's own emit reports it
            super().emit(level, format, **kwargs)
            return
        if order < _threshold:
            return
        if format is not None:
            try:
                text = format.format(**kwargs)
            except Exception:  # e.g. Twisted's "{call()}" syntax: let Twisted render it
                pass
            else:
                kwargs["log_text"] = text
                kwargs["log_template"] = format
                format = "{log_text}"
        # What ``Logger.emit`` does once the level is known to be valid (its check walks
        # every level): the event is the keyword arguments plus the log_* keys.
        kwargs.update(log_logger=self, log_level=level, log_namespace=self.namespace,
                      log_source=self.source, log_format=format, log_time=time())
        if "log_trace" in kwargs:
            kwargs["log_trace"].append((self, self.observer))
        self.observer(kwargs)


def logger(namespace: str) -> Logger:
    return _LevelLogger(namespace=namespace, observer=globalLogPublisher)


def set_level(name: str) -> None:
    global _threshold
    _threshold = _ORDER[LogLevel.levelWithName(name)]



@dataclass(frozen=True)
class TLSSession:
    """What a session's TLS handshake agreed, as OpenSSL names it (``TLSv1.3``,
    ``TLS_AES_256_GCM_SHA384``); ``none`` for a cleartext session.  Logged on the
    session's last line, so an operator can tell who still needs an old protocol."""

    version: str
    cipher: str


NO_TLS = TLSSession("none", "none")


def tls_session(transport: Any) -> TLSSession:
    """The protocol and cipher of ``transport``'s TLS connection (pyOpenSSL, read once
    the handshake completed); ``unknown`` where a transport cannot say."""
    try:
        connection = transport.getHandle()
        return TLSSession(connection.get_protocol_version_name() or "unknown",
                          connection.get_cipher_name() or "unknown")
    except Exception:  # not a TLS transport after all, or a wrapper without a handle
        return TLSSession("unknown", "unknown")


#: ``--log-recipients``: how the message line shows its recipients (docs/logging.md,
#: "Recipients: a privacy choice").
RECIPIENT_STYLES = ("plain", "hash", "omit")

#: Hex digits of a recipient's hash: 64 bits, so two addresses of one log never share
#: one in practice, yet short enough for a line with a hundred recipients.
HASH_DIGITS = 16


class ShownRecipients(tuple):
    """Recipient addresses as the message line shows them: ``<a@b>,<c@d>`` in the text
    log (as ``str.format`` renders it), a list of addresses in the JSON log
    (esmtpfa.common.jsonlog writes tuples as lists)."""

    def __format__(self, spec: str) -> str:
        return ",".join(f"<{address}>" for address in self)


class HashedRecipients(tuple):
    """Recipients' hashes: ``hmac:…,hmac:…`` in the text log, a list in the JSON log."""

    def __format__(self, spec: str) -> str:
        return ",".join(self)


@dataclass(frozen=True, repr=False)
class RecipientLog:
    """``--log-recipients``: ``plain`` (Postfix's ``to=<…>``), ``hash`` (a keyed hash
    of each address, so the log names no one yet an operator who knows an address can
    find its messages), or ``omit`` (only the number).

    The hash is HMAC-SHA-256 keyed with ``--log-recipients-key`` over the address with
    its ASCII letters in lower case, the first ``HASH_DIGITS`` hex digits, prefixed
    ``hmac:``: what ``openssl dgst -sha256 -hmac KEY`` computes, so finding an address
    needs no esmtpfa tool.  A key, because an unkeyed hash of an address is undone by
    hashing a list of guesses.
    """

    style: str = "plain"
    key: bytes = b""

    def __post_init__(self) -> None:
        if self.style not in RECIPIENT_STYLES:
            raise ValueError(f"log recipients: expected one of {RECIPIENT_STYLES}")
        if self.style == "hash" and not self.key:
            raise ValueError("log recipients: hash needs a key")

    def hashed(self, address: str) -> str:
        import hashlib
        import hmac
        folded = address.translate(_ASCII_LOWER).encode("utf-8", "surrogateescape")
        digest = hmac.new(self.key, folded, hashlib.sha256).hexdigest()
        return "hmac:" + digest[:HASH_DIGITS]

    def fields(self, addresses: Any) -> tuple[str, dict[str, Any]]:
        """The message line's ``to`` part (a template) and its fields."""
        if self.style == "omit":
            return "to {count} recipient(s)", {}
        shown: tuple[str, ...]
        if self.style == "hash":
            shown = HashedRecipients(self.hashed(a) for a in addresses)
        else:
            shown = ShownRecipients(addresses)
        return "to {recipients}", {"recipients": shown}

    def states(self, states: dict[str, Any]) -> dict[str, Any]:
        """A queued message's recipients and their states, as the spool's attempt line
        shows them: by address, by hash, or (``omit``) only how many are in each."""
        if self.style == "omit":
            counts: dict[str, int] = {}
            for state in states.values():
                counts[str(state)] = counts.get(str(state), 0) + 1
            return counts
        if self.style == "hash":
            return {self.hashed(address): state for address, state in states.items()}
        return states

    def __repr__(self) -> str:  # the key is a secret
        return f"RecipientLog({self.style!r})"


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")

PLAIN_RECIPIENTS = RecipientLog()
