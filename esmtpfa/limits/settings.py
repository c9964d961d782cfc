"""The limits' own settings: the login throttle's numbers and where counts are shared.

``esmtpfa.runtime.options`` builds them once from the flags and the environment; the
ledgers (in-process, a worker's supervisor, Redis) take them as they are.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ThrottleSettings:
    """Failed logins counted per address and per identity (docs/login-throttle.md)."""

    per_address: int = 30       # --max-auth-failures-per-ip
    per_identity: int = 10      # --max-auth-failures-per-user
    window: float = 600.0       # --auth-failure-window, seconds
    max_delay: float = 8.0      # --auth-failure-max-delay, seconds


@dataclass(frozen=True)
class StateSettings:
    """The shared state (docs/shared-state.md, "When Redis is slow or down").

    ``url`` is a ``redis://`` or ``rediss://`` URL, or None when each relay counts
    alone; ``failure`` is ``open`` or ``closed``: what a decision does when the store
    (Redis, or the supervisor of ``--workers``) cannot answer within ``timeout``.
    """

    url: str | None = None
    timeout: float = 0.5
    failure: str = "open"

    def __repr__(self) -> str:
        # The URL may carry a password: a repr never shows it.
        shown = "None" if not self.url else "'(set)'"
        return f"StateSettings(url={shown}, timeout={self.timeout!r}, failure={self.failure!r})"
