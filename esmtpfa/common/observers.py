"""Telling an observer what happened (the metrics, mostly: docs/metrics.md).

An observer listens; it never decides.  What the client is told, whether the spool keeps a
message, when a token is refreshed: none of it may change because a listener has a bug.
Every layer that reports to an observer does it through ``notify``, which calls it and,
should it raise, logs the failure once and goes on.
"""

from __future__ import annotations

from collections.abc import Callable

from esmtpfa.common.logs import logger

log = logger("esmtpfa.observers")


def notify(observer: Callable[..., object], *args: object) -> None:
    """``observer(*args)``; an exception it raises is logged, never passed on.

    ``observer`` is a bound method of an observer object (``metrics.relayed``) or a plain
    callable from a list of them; the log line names it, not its arguments (they may hold
    an identity or an address: docs/logging.md, "No secrets")."""
    try:
        observer(*args)
    except Exception:
        log.failure("observer {observer} failed", observer=_name(observer))


def _name(observer: Callable[..., object]) -> str:
    return getattr(observer, "__qualname__", None) or type(observer).__qualname__


__all__ = ["notify"]
