"""The log events a test emits, for assertions about what reaches (and never reaches) the
log: one observer on Twisted's global publisher, removed when the test ends."""

from __future__ import annotations

from twisted.logger import formatEvent, globalLogPublisher


def observe_logs(case) -> list[dict]:
    """Every log event emitted until the end of the test ``case``, at the level in force."""
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    case.addCleanup(globalLogPublisher.removeObserver, events.append)
    return events


def capture_logs(case) -> list[dict]:
    """Every log event emitted until the end of the test ``case``, debug ones included
    (the level is lowered for the test), to prove that no credential reaches a log line."""
    from esmtpfa.common import logs
    case.addCleanup(setattr, logs, "_threshold", logs._threshold)
    logs.set_level("debug")
    return observe_logs(case)


def log_text(events: list[dict]) -> str:
    """The captured ``events`` as the log file would show them, one line each: what an
    operator reads, and what a test searches for a message (or for a secret)."""
    return "\n".join(formatEvent(event) for event in events)


__all__ = ["capture_logs", "log_text", "observe_logs"]
