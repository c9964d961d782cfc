"""One worker of a supervised relay: ``python -m esmtpfa.runtime.worker`` (docs/workers.md).

The supervisor starts it with the operator's own esmtpfa arguments, so a worker parses
exactly what a single process would; the first arguments, before ``--``, say which slot
it fills, which inherited descriptor is its control channel and which are the listening
sockets to adopt.  The worker then runs the same ``RelayService`` as a single process,
with three differences: it adopts its listeners instead of binding them, its limits ask
the supervisor (or Redis) for their counts, and it has no metrics listener and no reload
sources (the supervisor serves and watches those for all workers, and calls ``reload``).

It logs to the standard output it inherited from the supervisor, in the same format,
each line marked with its slot.  It ignores SIGINT and SIGHUP (a terminal's signals go to
the whole process group; the supervisor decides) and drains on SIGTERM like a single
process, then exits 0.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any, Mapping, Sequence

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)
from zope.interface import implementer

from esmtpfa.common.logs import logger

log = logger("esmtpfa.workers")


def parse_arguments(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m esmtpfa.runtime.worker")
    parser.add_argument("--slot", type=int, required=True)
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--listener", action="append", default=[],
                        help="name=fd of a listening socket to adopt")
    parser.add_argument("arguments", nargs=argparse.REMAINDER,
                        help="-- then the esmtpfa arguments")
    namespace = parser.parse_args(argv)
    if namespace.arguments[:1] == ["--"]:
        namespace.arguments = namespace.arguments[1:]
    namespace.listeners = dict(_pair(item) for item in namespace.listener)
    return namespace


def _pair(item: str) -> tuple[str, int]:
    name, _, fd = item.partition("=")
    return name, int(fd)


@implementer(ILogObserver)
class SlotMarker:
    """Marks every event with the worker's slot before the real observer sees it."""

    def __init__(self, slot: int, observer: ILogObserver, json: bool):
        self.slot, self.observer, self.json = slot, observer, json

    def __call__(self, event: Mapping[str, Any]) -> None:
        event = dict(event)
        if self.json:
            event["worker"] = self.slot
        else:
            namespace = event.get("log_namespace", "-")
            level = getattr(event.get("log_level"), "name", "-")
            event["log_system"] = f"worker {self.slot} {namespace}#{level}"
        self.observer(event)


def start_logging(slot: int, log_format: str) -> None:
    if log_format == "json":
        from esmtpfa.common.jsonlog import JSONLinesObserver
        observer: ILogObserver = JSONLinesObserver(sys.stdout)
    else:
        observer = textFileLogObserver(sys.stdout)
    marked = SlotMarker(slot, observer, log_format == "json")
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(marked, [LogLevelFilterPredicate()])],
        redirectStandardIO=False)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parse_arguments(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

    from twisted.internet import reactor
    from twisted.python import usage

    from esmtpfa.runtime.settings import settings_of
    from esmtpfa.runtime.tap import Options
    from esmtpfa.runtime.workers.agent import WorkerAgent

    options = Options()
    try:
        options.parseOptions(arguments.arguments)
    except usage.UsageError as error:
        print(f"esmtpfa worker {arguments.slot}: {error}", file=sys.stderr)
        return 2
    start_logging(arguments.slot, settings_of(options).logging.format)
    agent = WorkerAgent(reactor, options, slot=arguments.slot,
                        control_fd=arguments.control_fd, listeners=arguments.listeners)
    agent.start()
    reactor.run()
    return agent.exit_code


if __name__ == "__main__":
    sys.exit(main())
