"""esmtpfa's loggers, filtered by ``--log-level`` before they reach twistd's log.

Every module takes its ``Logger`` from ``logger(namespace)``: events pass a level filter
that the service sets at startup, then go to the global publisher (twistd's text log,
or JSON with ``twist --log-format json``).  Credentials are never passed to a logger:
log statements name users, providers and ids, never secrets.
"""

from twisted.logger import (
    FilteringLogObserver, LogLevel, LogLevelFilterPredicate, LogPublisher, Logger,
    globalLogPublisher)

_levels = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
_publisher = LogPublisher(FilteringLogObserver(globalLogPublisher, [_levels]))


def logger(namespace: str) -> Logger:
    return Logger(namespace=namespace, observer=_publisher)


def set_level(name: str) -> None:
    _levels.setLogLevelForNamespace("", LogLevel.levelWithName(name))
