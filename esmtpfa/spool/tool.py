"""``esmtpfa-queue``: the queue tool, as Postfix has ``postqueue`` and ``postsuper``.

It opens the spool that ``SPOOL_URL`` (or ``--spool-url``) names, exactly as the relay
does, and works while the relay runs: the file spool's state is an SQLite database that
every process opens, and a message being delivered is left alone (its owner settles it).
A relay picks up what the tool changed at its next look at the queue (within a second).

    esmtpfa-queue list                 every message: id, state, size, arrival, sender,
                                       recipients and their states (--json for scripts)
    esmtpfa-queue show ID              one message, with its header section
    esmtpfa-queue flush                every queued message is due now (postqueue -f)
    esmtpfa-queue hold ID              keep a message from delivery (postsuper -h)
    esmtpfa-queue release ID           a held message is queued again (postsuper -H)
    esmtpfa-queue delete ID            forget a message (postsuper -d)
    esmtpfa-queue requeue [ID]         queue again from scratch: one, or all (postsuper -r)

Exit status: 0 done, 1 the spool refused (no such message, wrong state), 2 bad usage or
the spool cannot be opened.  Errors are one line on standard error, never a traceback,
and never the URL's credentials.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Sequence

from twisted.internet import defer, task
from twisted.python import usage
from twisted.python.threadpool import ThreadPool

from esmtpfa.spool.backends import SPOOL_THREADS, SpoolSettings, open_spool, parse_spool_url
from esmtpfa.spool.interfaces import QueueSummary, SpoolError, SpoolErrorKind

DEFAULT_URL = "file:///var/lib/esmtpfa/spool"


@dataclass(frozen=True)
class QueueRequest:
    """What the operator asked for, as ``ToolOptions`` parsed it: the commands read
    these fields, never the options by name."""

    command: str
    arguments: tuple[str, ...] = ()
    json: bool = False


class ToolOptions(usage.Options):
    synopsis = "[--spool-url URL] [--json] list|show ID|flush|hold ID|release ID|" \
               "delete ID|requeue [ID]"
    optParameters = [["spool-url", None, None,
                      "The spool (default: $SPOOL_URL, else " + DEFAULT_URL + ")"]]
    optFlags = [["json", None, "list and show as JSON"]]

    COMMANDS = {"list": 0, "show": 1, "flush": 0, "hold": 1, "release": 1, "delete": 1,
                "requeue": (0, 1)}

    def parseArgs(self, command: str = "", *arguments: str) -> None:
        wanted = self.COMMANDS.get(command)
        if wanted is None:
            raise usage.UsageError(f"unknown command {command!r}; expected one of "
                                   f"{', '.join(self.COMMANDS)}")
        counts = wanted if isinstance(wanted, tuple) else (wanted,)
        if len(arguments) not in counts:
            raise usage.UsageError(f"{command} takes "
                                   f"{' or '.join(map(str, counts))} argument(s)")
        self["command"], self["arguments"] = command, arguments

    def postOptions(self) -> None:
        self.request = QueueRequest(self["command"], tuple(self["arguments"]),
                                    bool(self["json"]))

    def url(self, environ: Any) -> str:
        return environ.get("SPOOL_URL") or self["spool-url"] or DEFAULT_URL


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return _second(int(timestamp))


@functools.lru_cache(maxsize=4096)
def _second(second: int) -> str:
    """One formatting per second shown: a backlog's messages share their seconds."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))


def _as_dict(summary: QueueSummary) -> dict[str, Any]:
    return {"id": summary.id, "state": summary.state, "sender": summary.sender,
            "identity": summary.identity, "size": summary.size,
            "received": summary.received, "attempts": summary.attempts,
            "next_attempt": summary.next_attempt, "hold_reason": summary.hold_reason,
            "last_reply": summary.last_reply,
            "recipients": [{"address": r.address, "state": r.state, "reply": r.reply}
                           for r in summary.recipients]}


def format_summary(summary: QueueSummary) -> str:
    """A ``postqueue -p``-like block: the id line, then one line per recipient."""
    state = summary.state + (f" ({summary.hold_reason})" if summary.hold_reason else "")
    lines = [f"{summary.id}  {summary.size:>9}  {_when(summary.received)}  "
             f"<{summary.sender}>  {state}",
             f"    identity {summary.identity}, {summary.attempts} attempt(s), next "
             f"{_when(summary.next_attempt) if summary.state == 'queued' else '-'}"]
    if summary.last_reply:
        lines.append(f"    last reply: {summary.last_reply}")
    for recipient in summary.recipients:
        reply = f"  ({recipient.reply})" if recipient.reply else ""
        lines.append(f"    {recipient.state:<9} <{recipient.address}>{reply}")
    return "\n".join(lines)


async def run(reactor: Any, options: ToolOptions, url: str, out: Any) -> int:
    threads = ThreadPool(minthreads=0, maxthreads=SPOOL_THREADS, name="esmtpfa-queue")
    threads.start()
    spool = open_spool(SpoolSettings(url, max_bytes=0, min_free_bytes=0, admin=True),
                       reactor, threads)
    try:
        await spool.start()
        return await _command(spool, options.request, out)
    finally:
        try:
            await spool.close()
        finally:
            threads.stop()


async def _command(spool: Any, request: QueueRequest, out: Any) -> int:
    command, arguments = request.command, request.arguments
    if command == "list":
        summaries = await spool.list()
        if request.json:
            out.write(json.dumps([_as_dict(s) for s in summaries], indent=1) + "\n")
        else:
            for summary in summaries:
                out.write(format_summary(summary) + "\n\n")
            total = sum(s.size for s in summaries)
            out.write(f"-- {total // 1024} KiB in {len(summaries)} message(s)\n")
            stats = await spool.stats()
            counted = stats.messages.get("queued", 0) + stats.messages.get("held", 0)
            if counted > len(summaries):  # RabbitMQ: those due now are counted, not listed
                out.write(f"-- and {counted - len(summaries)} more due now or being "
                          f"delivered, which this spool counts but cannot list\n")
        return 0
    if command == "show":
        summary, headers = await spool.show(arguments[0])
        if request.json:
            out.write(json.dumps({**_as_dict(summary), "headers": headers.decode(
                "utf-8", "replace")}, indent=1) + "\n")
        else:
            out.write(format_summary(summary) + "\n\n")
            out.write(headers.decode("utf-8", "replace").replace("\r\n", "\n"))
        return 0
    if command == "flush":
        count = await spool.flush()
        out.write(f"{count} message(s) due now\n")
        return 0
    if command == "requeue":
        count = await spool.requeue(arguments[0] if arguments else None)
        out.write(f"{count} message(s) requeued\n")
        return 0
    action = getattr(spool, command)
    await action(arguments[0])
    out.write(f"{arguments[0]}: {command} done\n")
    return 0


def main(argv: Sequence[str] | None = None, environ: Any = None) -> None:
    environ = os.environ if environ is None else environ
    options = ToolOptions()
    try:
        options.parseOptions(list(sys.argv[1:] if argv is None else argv))
    except usage.UsageError as error:
        sys.stderr.write(f"esmtpfa-queue: {error}\n{options}")
        raise SystemExit(2) from None
    url = options.url(environ)
    try:
        parse_spool_url(url)
    except ValueError as error:
        sys.stderr.write(f"esmtpfa-queue: SPOOL_URL/--spool-url: {error}\n")
        raise SystemExit(2) from None

    async def main_task(reactor: Any) -> None:
        try:
            code = await run(reactor, options, url, sys.stdout)
        except SpoolError as error:
            sys.stderr.write(f"esmtpfa-queue: {error}\n")
            code = 1 if error.kind in (SpoolErrorKind.NOT_FOUND,
                                       SpoolErrorKind.CONFLICT) else 2
        if code:
            raise SystemExit(code)  # react() exits with it

    task.react(lambda reactor: defer.ensureDeferred(main_task(reactor)))


if __name__ == "__main__":  # pragma: no cover
    main()
