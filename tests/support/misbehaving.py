"""A small SMTP upstream on loopback that misbehaves on demand and counts what it got.

The fault suite (``tests/faults``, ``docs/fault-suite.md``) puts it behind a running
``twistd esmtpfa`` to prove the relay's promise from the outside: a client hears ``250``
only when this server accepted the message, and no message reaches this server twice
because of the relay.  It is written on a plain ``Protocol`` so that every reply is
exactly the bytes a test asked for, broken ones included.

The misbehaviour is chosen per transaction by the local part of the envelope sender, so
one server can break a message and accept the next one on the same connection.  A test
sends ``MAIL FROM:<garbage-eom@faults.test>`` to get binary garbage in reply to its final
dot, and ``MAIL FROM:<anyone@example.com>`` for an ordinary message (``default``).

What it records (``transactions``): every MAIL, whether DATA was asked for, the content's
``Message-ID`` and what was answered to the final dot.  ``copies(message_id)`` is how many
times the whole content of a message arrived (final dot included), ``accepted(...)`` how
many of those it answered with ``250``: the numbers "exactly once" and "at most once" are
about.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure

# -- the misbehaviours (sender local parts) ------------------------------------------------

ACCEPT = "accept"
#: Answers MAIL, never answers RCPT (nor anything after it on that connection).
STALL_RCPT = "stall-rcpt"
#: Accepts the recipients, never answers DATA.
STALL_DATA = "stall-data"
#: Takes the whole message, never answers the final dot.
STALL_EOM = "stall-eom"
#: Takes the whole message, then closes the connection without a reply.
CLOSE_EOM = "close-eom"
#: Answers the final dot with binary garbage (no reply code, NUL and 8-bit bytes).
GARBAGE_EOM = "garbage-eom"
#: Answers the final dot with one 2 MiB line that carries no reply code.
LONG_LINE_EOM = "long-line-eom"
#: Answers the final dot with a multi-line reply whose lines disagree (``250-`` then
#: ``550``): RFC 5321 §4.2.1 requires one code on every line of a reply.
MIXED_EOM = "mixed-eom"
#: Answers MAIL with ``421`` and closes (a server shutting down before any content).
REPLY_421_MAIL = "421-mail"
#: Answers the final dot with ``421`` and closes: an explicit refusal of the content.
REPLY_421_EOM = "421-eom"

BEHAVIOURS = (ACCEPT, STALL_RCPT, STALL_DATA, STALL_EOM, CLOSE_EOM, GARBAGE_EOM,
              LONG_LINE_EOM, MIXED_EOM, REPLY_421_MAIL, REPLY_421_EOM)
#: Behaviours that break a transaction after the client's final dot was received.
AFTER_THE_DOT = (STALL_EOM, CLOSE_EOM, GARBAGE_EOM, LONG_LINE_EOM, MIXED_EOM, REPLY_421_EOM)

GARBAGE = b"\x00\x9c\xff\x1b[2J\xfe\xfd\x80\x81 not a reply \x07\x00\r\n"
LONG_LINE = b"x" * (2 * 1024 * 1024) + b"\r\n"
MIXED = b"250-2.0.0 Ok, queued\r\n550 5.7.1 Rejected after all\r\n"
LONGEST_COMMAND = 4096  # RFC 5321 §4.5.3.1.4 allows 512; more is a broken client

_MAIL = re.compile(rb"^MAIL FROM:<([^>]*)>", re.IGNORECASE)
_RCPT = re.compile(rb"^RCPT TO:<([^>]*)>", re.IGNORECASE)
_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*(<[^>\r\n]*>)", re.IGNORECASE | re.MULTILINE)
_END = b"\r\n.\r\n"


def behaviour_of(sender: str, default: str = ACCEPT) -> str:
    """The misbehaviour a sender address asks for (its local part), else ``default``."""
    local = sender.rsplit("@", 1)[0].lower()
    return local if local in BEHAVIOURS else default


def message_id_of(content: bytes) -> str | None:
    """The ``Message-ID`` of a message's header section (unstuffed or not: the same)."""
    head = content.split(b"\r\n\r\n", 1)[0]
    found = _MESSAGE_ID.search(head)
    return found.group(1).decode("ascii", "replace") if found else None


@dataclass
class Transaction:
    """One MAIL transaction as this server saw it."""

    session: int                   # index of the connection among this server's
    sender: str
    behaviour: str
    rcpts: list[str] = field(default_factory=list)
    data_asked: bool = False       # the relay sent DATA
    complete: bool = False         # the final dot arrived: a whole copy of the content
    message_id: str | None = None
    size: int = 0                  # octets of content, dot-stuffed as on the wire
    answer: bytes | None = None    # what was written in reply to the final dot

    @property
    def accepted(self) -> bool:
        return self.complete and self.answer is not None and self.answer.startswith(b"250 ")


class MisbehavingUpstream:
    """The server and its records; ``start()`` listens on 127.0.0.1 (any free port)."""

    def __init__(self, *, default: str = ACCEPT, hostname: str = "faulty.test",
                 extensions: tuple[str, ...] = ("PIPELINING", "8BITMIME", "SIZE 52428800",
                                                "ENHANCEDSTATUSCODES"),
                 reactor: Any = None):
        if default not in BEHAVIOURS:
            raise ValueError(f"unknown behaviour {default!r}")
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.default = default
        self.hostname = hostname
        self.extensions = extensions
        self.transactions: list[Transaction] = []
        self.connections = 0
        self.port = 0
        self._listening: Any = None
        self._open: set[MisbehavingProtocol] = set()

    def start(self) -> "MisbehavingUpstream":
        factory = Factory.forProtocol(lambda: MisbehavingProtocol(self))
        factory.noisy = False
        self._listening = self.reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.port = self._listening.getHost().port
        return self

    def stop(self) -> Deferred:
        """Stop listening and abort every open connection; fires when all are gone."""
        waits = [succeed(None) if self._listening is None
                 else maybeDeferred(self._listening.stopListening)]
        self._listening = None
        for protocol in list(self._open):
            waits.append(protocol.gone)
            protocol.transport.abortConnection()
        return DeferredList(waits)

    # -- what the tests ask -------------------------------------------------------------

    def copies(self, message_id: str) -> int:
        """Whole copies of the message received (each ended by its final dot)."""
        return sum(1 for t in self.transactions if t.complete and t.message_id == message_id)

    def accepted(self, message_id: str) -> int:
        """Copies this server answered with ``250``: the ones it would deliver."""
        return sum(1 for t in self.transactions if t.accepted and t.message_id == message_id)

    def data_commands(self, sender: str) -> int:
        """How many times the relay asked to send content for this envelope sender."""
        return sum(1 for t in self.transactions if t.sender == sender and t.data_asked)

    def of_sender(self, sender: str) -> list[Transaction]:
        return [t for t in self.transactions if t.sender == sender]

    @property
    def open_connections(self) -> int:
        return len(self._open)


class MisbehavingProtocol(Protocol):
    """One connection: SMTP commands in order, one line at a time, until told to break."""

    def __init__(self, server: MisbehavingUpstream):
        self.server = server
        self.index = server.connections
        server.connections += 1
        self.gone: Deferred = Deferred()
        self._buffer = bytearray()
        self._data: bytearray | None = None  # content of the current DATA, after the 354
        self._transaction: Transaction | None = None
        self._stalled = False

    def connectionMade(self) -> None:
        self.server._open.add(self)
        self.transport.write(f"220 {self.server.hostname} ESMTP misbehaving on demand\r\n"
                             .encode())

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.server._open.discard(self)
        self.gone.callback(None)

    def dataReceived(self, data: bytes) -> None:
        if self._stalled:
            return  # swallow everything: a stalled server reads but never answers
        self._buffer += data
        while self._buffer and not self._stalled and self.transport.connected:
            if self._data is not None:
                if not self._content():
                    return
                continue
            end = self._buffer.find(b"\r\n")
            if end < 0:
                if len(self._buffer) > LONGEST_COMMAND:
                    self._close(b"500 5.5.2 Line too long\r\n")
                return
            line = bytes(self._buffer[:end])
            del self._buffer[:end + 2]
            self._command(line)

    # -- commands -------------------------------------------------------------------------

    def _command(self, line: bytes) -> None:
        verb = line.split(b" ", 1)[0].split(b":", 1)[0].upper()
        if verb in (b"EHLO", b"HELO"):
            lines = [self.server.hostname, *self.server.extensions] if verb == b"EHLO" else [
                self.server.hostname]
            self._reply_lines(250, lines)
        elif verb == b"MAIL":
            self._mail(line)
        elif verb == b"RCPT":
            self._rcpt(line)
        elif verb == b"DATA":
            self._data_command()
        elif verb in (b"RSET", b"NOOP"):
            if verb == b"RSET":
                self._transaction = None
            self._write(b"250 2.0.0 Ok\r\n")
        elif verb == b"QUIT":
            self._close(b"221 2.0.0 Bye\r\n")
        else:
            self._write(b"502 5.5.1 Not implemented here\r\n")

    def _mail(self, line: bytes) -> None:
        found = _MAIL.match(line)
        if found is None:
            self._write(b"501 5.5.4 Syntax: MAIL FROM:<address>\r\n")
            return
        sender = found.group(1).decode("utf-8", "replace")
        behaviour = behaviour_of(sender, self.server.default)
        self._transaction = Transaction(self.index, sender, behaviour)
        self.server.transactions.append(self._transaction)
        if behaviour == REPLY_421_MAIL:
            self._close(b"421 4.3.2 Shutting down, try again later\r\n")
        else:
            self._write(b"250 2.1.0 Ok\r\n")

    def _rcpt(self, line: bytes) -> None:
        found = _RCPT.match(line)
        if self._transaction is None or found is None:
            self._write(b"503 5.5.1 MAIL first\r\n")
            return
        if self._transaction.behaviour == STALL_RCPT:
            self._stall()
            return
        self._transaction.rcpts.append(found.group(1).decode("utf-8", "replace"))
        self._write(b"250 2.1.5 Ok\r\n")

    def _data_command(self) -> None:
        transaction = self._transaction
        if transaction is None or not transaction.rcpts:
            self._write(b"503 5.5.1 RCPT first\r\n")
            return
        transaction.data_asked = True
        if transaction.behaviour == STALL_DATA:
            self._stall()
            return
        self._data = bytearray(b"\r\n")  # so that an empty message's ".\r\n" also ends it
        self._write(b"354 End data with <CR><LF>.<CR><LF>\r\n")

    # -- content --------------------------------------------------------------------------

    def _content(self) -> bool:
        """Move buffered bytes into the content; True when the final dot was found."""
        assert self._data is not None
        searched_from = max(0, len(self._data) - len(_END) + 1)
        self._data += self._buffer
        self._buffer.clear()
        end = self._data.find(_END, searched_from)
        if end < 0:
            return False
        self._buffer += self._data[end + len(_END):]
        content = bytes(self._data[2:end + 2])
        self._data = None
        self._end_of_data(content)
        return True

    def _end_of_data(self, content: bytes) -> None:
        transaction = self._transaction
        assert transaction is not None
        self._transaction = None
        transaction.complete = True
        transaction.size = len(content)
        transaction.message_id = message_id_of(content)
        behaviour = transaction.behaviour
        if behaviour == STALL_EOM:
            self._stall()
        elif behaviour == CLOSE_EOM:
            transaction.answer = b""
            self.transport.loseConnection()
        elif behaviour == REPLY_421_EOM:
            transaction.answer = b"421 4.3.0 Closing, message not accepted\r\n"
            self._close(transaction.answer)
        else:
            transaction.answer = {GARBAGE_EOM: GARBAGE, LONG_LINE_EOM: LONG_LINE,
                                  MIXED_EOM: MIXED}.get(
                behaviour, b"250 2.0.0 Ok: queued as %d\r\n" % len(self.server.transactions))
            self._write(transaction.answer)

    # -- output ---------------------------------------------------------------------------

    def _reply_lines(self, code: int, lines: list[str]) -> None:
        out = [f"{code}-{text}" for text in lines[:-1]] + [f"{code} {lines[-1]}"]
        self._write("".join(line + "\r\n" for line in out).encode())

    def _write(self, data: bytes) -> None:
        self.transport.write(data)

    def _stall(self) -> None:
        self._stalled = True
        self._buffer.clear()

    def _close(self, reply: bytes) -> None:
        self.transport.write(reply)
        self.transport.loseConnection()
        self._stalled = True  # nothing more is read on a closing connection


__all__ = ["ACCEPT", "AFTER_THE_DOT", "BEHAVIOURS", "CLOSE_EOM", "GARBAGE_EOM",
           "LONG_LINE_EOM", "MIXED_EOM", "MisbehavingUpstream", "REPLY_421_EOM",
           "REPLY_421_MAIL", "STALL_DATA", "STALL_EOM", "STALL_RCPT", "Transaction",
           "behaviour_of", "message_id_of"]
