"""``--log-format json``: one JSON object per line, for log shippers (docs/logging.md).

Twisted's own ``jsonFileLogObserver`` writes RFC 7464 JSON text sequences (a record
separator before each object) with every key of the event, private ones included; log
collectors expect plain newline-delimited objects with a fixed core.  This observer
writes ``time`` (ISO 8601, UTC), ``level``, ``namespace`` and ``event`` (the rendered
line), then the event's own fields (``connection_id``, ``message_id``, ``identity``,
``sender``, ``count``, ``size``, ``upstream``, ``upstream_reply``, ``duration``, ...).

Never a secret: log calls do not pass credentials (esmtpfa.common.logs), and as a second line
of defence any field whose name looks like a credential is left out here.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import IO, Any, Mapping

from twisted.logger import ILogObserver, formatEvent
from zope.interface import implementer

#: Field names never written, whatever a caller passed (substring match, lower case).
SECRET_NAMES = ("pass", "secret", "token", "credential", "authorization", "cookie",
                "private_key")

#: What an event from ``twisted.python.log`` carries besides its text.
_LEGACY_KEYS = frozenset({"message", "isError", "format", "why", "failure", "time"})

#: Longest string value written; a field is for grepping, not for payloads.
MAX_VALUE = 2000


def _is_secret(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in SECRET_NAMES)


def _identity(value: Any) -> Any:
    """``provider/user`` (or an ``Identity``) as ``{"provider", "user"}``; the provider
    name holds no ``/``, the user may."""
    provider = getattr(value, "provider", None)
    username = getattr(value, "username", None)
    if isinstance(provider, str) and isinstance(username, str):
        return {"provider": provider, "user": username}
    if hasattr(value, "provider") and hasattr(value, "username"):  # a failed login's
        return {"provider": _plain(provider), "user": _plain(username)}  # None: unknown
    if isinstance(value, str) and "/" in value:
        provider, _, username = value.partition("/")
        return {"provider": provider, "user": username}
    return _plain(value)


def _plain(value: Any, depth: int = 0) -> Any:
    """A JSON-safe copy: scalars as they are, short sequences and mappings of them, any
    other object as its ``str()`` (bounded)."""
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else str(value)
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, (list, tuple, set, frozenset)) and depth < 3:
        return [_plain(item, depth + 1) for item in list(value)[:100]]
    if isinstance(value, Mapping) and depth < 3:
        return {str(k): _plain(v, depth + 1) for k, v in list(value.items())[:100]
                if not _is_secret(str(k))}
    try:
        text = value if isinstance(value, str) else str(value)
    except Exception:
        text = f"<unprintable {type(value).__name__}>"
    return text if len(text) <= MAX_VALUE else text[:MAX_VALUE] + "…"


def record(event: Mapping[str, Any]) -> dict[str, Any]:
    """The object written for ``event``."""
    level = event.get("log_level")
    out: dict[str, Any] = {
        "time": datetime.fromtimestamp(event.get("log_time", 0), UTC)
        .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "level": getattr(level, "name", "info"),
        "namespace": event.get("log_namespace", ""),
        # Twisted annotates a dict; formatEvent only reads the event.
        "event": formatEvent(event) if "log_format" in event else "",  # type: ignore[arg-type]
    }
    failure = event.get("log_failure")
    if failure is not None:
        out["error"] = _plain(failure.getErrorMessage())
        out["traceback"] = _plain(failure.getTraceback())
    # twisted.python.log's own keys (its namespace is "log_legacy") repeat the above.
    legacy = event.get("log_namespace") == "log_legacy" or "log_legacy" in event
    for key, value in event.items():
        if key.startswith("log_") or key in out or _is_secret(key):
            continue
        if legacy and key in _LEGACY_KEYS:
            continue
        out[key] = _identity(value) if key == "identity" else _plain(value)
    if "log_system" in event and "system" not in out:
        out["system"] = _plain(event["log_system"])
    return out


@implementer(ILogObserver)
class JSONLinesObserver:
    """Writes each event as one line of JSON to ``out`` (a text file)."""

    def __init__(self, out: IO[str]):
        self._out = out

    def __call__(self, event: Mapping[str, Any]) -> None:
        try:
            line = json.dumps(record(event), ensure_ascii=False, separators=(",", ":"))
        except Exception as error:  # never lose the line entirely
            line = json.dumps({"level": "error", "event": "unloggable event",
                               "error": type(error).__name__})
        self._out.write(line + "\n")
        self._out.flush()


def logs_to_standard_output(server_options: Mapping[str, Any] | None) -> bool:
    """Whether the server writes its log to standard output: twistd with ``-n`` and no
    ``--logfile``, or ``--logfile -`` (or no server options at all); twist with its
    ``--log-file`` on standard output, its default.  With ``--workers`` the workers
    write theirs there too (esmtpfa.runtime.tap)."""
    if not server_options:
        return True
    if "fileLogObserverFactory" in server_options:  # twist: its log goes to "logFile"
        return server_options.get("logFile") in (sys.stdout, sys.stderr)
    name = server_options.get("logfile")
    return name == "-" or (not name and bool(server_options.get("nodaemon")))


def twistd_log_file(server_options: Mapping[str, Any] | None, reactor: Any) -> IO[str]:
    """Where twistd would write its text log: stdout with ``-n`` and no ``--logfile`` or
    with ``--logfile -``, else the log file (``twistd.log`` by default), rotating like
    twistd's own (SIGUSR1 rotates it, on ``reactor``'s thread)."""
    from twisted.python.logfile import LogFile
    given = server_options or {}
    name = given.get("logfile")
    if name == "-" and server_options and not given.get("nodaemon"):
        raise SystemExit("Daemons cannot log to stdout, exiting!")  # as twistd says
    if logs_to_standard_output(server_options):
        return sys.stdout
    log_file = LogFile.fromFullPath(name or "twistd.log")
    try:
        import signal
    except ImportError:  # pragma: no cover - not on our platforms
        return log_file
    if not signal.getsignal(signal.SIGUSR1):
        def rotate(signum: int, frame: Any) -> None:
            reactor.callFromThread(log_file.rotate)
        signal.signal(signal.SIGUSR1, rotate)
    return log_file
