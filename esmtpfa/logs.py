"""esmtpfa's loggers, filtered by ``--log-level`` before they reach twistd's log.

Every module takes its ``Logger`` from ``logger(namespace)``: events below the level the
service sets at startup are dropped before an event is even built (the relay logs a
debug line per command on its hot path), the rest go to the global publisher (twistd's
text log, or one JSON object per line with ``--log-format json``: esmtpfa.jsonlog).
Pass what a line is about as named fields (``connection_id``, ``message_id``,
``identity``, ...): the JSON log carries them as keys.  Credentials are never passed to
a logger: log statements name users, providers and ids, never secrets.
"""

from __future__ import annotations

from time import time
from typing import Any

from twisted.logger import LogLevel, Logger, globalLogPublisher

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

