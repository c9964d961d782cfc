"""Postfix's ``smtp-sink`` (Debian ``postfix``, used as a plain binary) as a real upstream.

Each accepted message is dumped to its own file (``-d``), so a test can check that every
message the relay acknowledged is there, exactly once; a transaction the sink did not
accept leaves no file.  Faults come from smtp-sink's own options: ``-p`` (no PIPELINING),
``-r``/``-f`` (4xx/5xx to commands), ``-q`` (disconnect without reply after a command, e.g.
``.``), ``-Q`` (421 and disconnect, e.g. ``CONNECT``), ``-w`` (delay before answering
DATA), ``-n``/``-M`` (exit after N sessions/messages).
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass

from twisted.internet import defer, reactor

from tests.support.ports import free_port
from tests.support.processes import Collector, require, terminate, until_serving


@dataclass
class SinkMessage:
    mail_args: str
    rcpts: list[str]
    content: bytes  # as smtp-sink stores it: unstuffed, LF line ends

    def contains(self, text: bytes) -> bool:
        return text in self.content


class SmtpSink:
    """``smtp-sink [flags] -d DIR/%M. 127.0.0.1:PORT``; ``start()``/``stop()`` bound every wait."""

    def __init__(self, directory: str | None = None, *flags: str, port: int | None = None,
                 hostname: str = "sink.test"):
        # smtp-sink drops to "nobody" when started as root: its dump directory must be
        # reachable for it (trial's temporary directories are private to the test's user).
        self._own_directory = directory is None
        self.directory = os.path.abspath(directory or tempfile.mkdtemp(prefix="esmtpfa-sink-"))
        os.makedirs(self.directory, exist_ok=True)
        os.chmod(self.directory, 0o777)
        self.flags = list(flags)
        self.port = port or free_port()
        self.hostname = hostname
        self._process = None
        self._protocol: Collector | None = None

    @property
    def running(self) -> bool:
        return self._protocol is not None and not self._protocol.ended.called

    @defer.inlineCallbacks
    def start(self):
        binary = require("smtp-sink")
        args = [binary, "-h", self.hostname, "-d", os.path.join(self.directory, "%M."),
                *self.flags]
        if os.geteuid() == 0:
            args[1:1] = ["-u", "nobody"]
        args += [f"127.0.0.1:{self.port}", "64"]
        self._protocol = Collector()
        self._process = reactor.spawnProcess(self._protocol, binary, args, env=os.environ)

        def greets(sock: socket.socket) -> bool:
            sock.recv(100)  # the greeting: it is really serving
            return True
        yield until_serving("smtp-sink", self.port, self._protocol, probe=greets)
        return self

    @defer.inlineCallbacks
    def stop(self):
        if not self.running:
            return
        yield terminate(self._process, self._protocol.ended, grace=10)

    @defer.inlineCallbacks
    def close(self):
        """Stop, and remove the dump directory when the sink made it."""
        yield self.stop()
        if self._own_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def exited(self) -> defer.Deferred:
        return self._protocol.ended

    def messages(self) -> list[SinkMessage]:
        """Every message the sink accepted so far (one dump file each)."""
        result = []
        for path in sorted(glob.glob(os.path.join(self.directory, "*"))):
            with open(path, "rb") as f:
                dump = f.read()
            if dump:  # smtp-sink leaves an empty file for a transaction it did not accept
                result.append(parse_dump(dump))
        return result


def parse_dump(dump: bytes) -> SinkMessage:
    lines = dump.split(b"\n")
    mail_args, rcpts = "", []
    index = 0
    while index < len(lines) and not lines[index].startswith(b"Received: from "):
        name, _, value = lines[index].partition(b": ")
        if name == b"X-Mail-Args":
            mail_args = value.decode("utf-8", "replace")
        elif name == b"X-Rcpt-Args":
            rcpts.append(value.decode("utf-8", "replace").strip("<>").split(">")[0])
        index += 1
    index += 3  # smtp-sink's own three-line Received header
    content = b"\n".join(lines[index:])
    if content.endswith(b"\n\n"):
        content = content[:-1]  # the empty line smtp-sink appends
    return SinkMessage(mail_args, rcpts, content)
