"""A real SMTP server on loopback that records exactly the bytes it received.

Used as the upstream smarthost in the relay tests and as the far end of the SMTP server's
end-to-end tests.  It is written on a plain ``Protocol`` (not ``twisted.mail.smtp``) so
that what it records is what was on the wire, and so that it can misbehave on purpose.

Typical use in a trial test::

    upstream = RecordingUpstream(extensions=["PIPELINING", "SIZE 1000000"]).start()
    self.addCleanup(upstream.stop)
    ...  # point a client at 127.0.0.1:upstream.port
    [msg] = upstream.messages
    self.assertEqual(msg.data, content)

What it records:

* ``raw``: every byte received, all connections in order (after TLS decryption);
  ``cleartext``: only the bytes that arrived before TLS was active.
* ``messages``: one ``Received`` per completed DATA (envelope, wire bytes, unstuffed data).
* ``sessions``: one ``SessionRecord`` per TCP connection: its own transcript, the command
  lines with the number of replies the server had sent when each line's packet arrived
  (``Command.replies_before``: equal values mean the client pipelined them), TLS state,
  client certificate, AUTH mechanism and user, transactions (more than one = reused).

What it can be told to do: advertise any EHLO keywords; STARTTLS or implicit TLS with a
test certificate; require a client certificate signed by a CA; require AUTH credentials;
answer any command, any recipient or the end of data with a scripted reply (``"CLOSE"``
drops the connection instead of answering); drop the connection after N octets of DATA;
stall (never answer) at a given point; treat a bare-LF dot line as the end of data, like a
server vulnerable to SMTP smuggling, to prove the client never produces one.  Faults can be
limited to the first N sessions (``fault_sessions``: "the first connection breaks, the next
one works"), and ``script(session_index, verb, line)`` can answer any command of any session
(``"CLOSE"`` drops, ``"STALL"`` never answers, ``"RAW:…"`` writes those octets as they are).  AUTH
PLAIN, LOGIN and CRAM-MD5 (RFC 2195)
are checked against ``credentials``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.internet import ssl
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from tests.support.ports import free_port

#: What a modern smarthost advertises (besides STARTTLS and AUTH, which follow the config).
DEFAULT_EXTENSIONS = ("PIPELINING", "SIZE 52428800", "8BITMIME", "SMTPUTF8",
                      "ENHANCEDSTATUSCODES")

#: Stall points besides command verbs.
GREETING = "GREETING"
END_OF_DATA = "EOM"
CLOSE = "CLOSE"
STALL = "STALL"
#: A scripted reply starting with this is written as it is: no CRLF added, no checks.
RAW = "RAW:"

_MAIL = re.compile(rb"^MAIL FROM:<(.*?)>(.*)$", re.IGNORECASE)
_RCPT = re.compile(rb"^RCPT TO:<(.*?)>(.*)$", re.IGNORECASE)
_STRICT_END = re.compile(rb"(\r\n)\.\r\n")
_LAX_END = re.compile(rb"(\r\n|\n)\.\r?\n")  # what a smuggling-vulnerable server accepts


@dataclass
class Command:
    line: bytes
    replies_before: int  # replies sent when the packet holding this line arrived
    packet: int          # index of that packet in the session
    tls: bool


@dataclass
class Received:
    mail_from: str
    rcpts: list[str]
    data_raw: bytes   # as on the wire after the 354: dot-stuffed, including the final ".\r\n"
    data: bytes       # the content: unstuffed, without the final dot line
    mail_params: list[str]
    tls: bool
    session: "SessionRecord" = field(repr=False)
    reply: str = ""   # what the upstream answered to the final dot

    @property
    def accepted(self) -> bool:
        return self.reply.startswith("2")


@dataclass
class SessionRecord:
    raw: bytearray = field(default_factory=bytearray)
    cleartext: bytearray = field(default_factory=bytearray)
    commands: list[Command] = field(default_factory=list)
    tls: bool = False
    client_certificate: str | None = None  # subject CN of the client's certificate
    auth_mechanism: str | None = None
    auth_user: str | None = None
    auth_tls: bool | None = None
    transactions: int = 0
    plaintext_after_starttls: bytes = b""
    data_bytes: int = 0
    closed: bool = False
    index: int = 0  # position among the upstream's sessions

    def lines(self) -> list[bytes]:
        return [c.line for c in self.commands]

    def verbs(self) -> list[str]:
        return [c.line.split(b" ", 1)[0].split(b":", 1)[0].decode("ascii", "replace").upper()
                for c in self.commands]


class RecordingUpstream:
    """The server and its recordings.  ``start()`` listens on 127.0.0.1, port 0."""

    def __init__(self, *, hostname: str = "upstream.test",
                 extensions: tuple[str, ...] | list[str] = DEFAULT_EXTENSIONS,
                 tls: Any = None, implicit_tls: bool = False, starttls: bool = True,
                 client_ca: str | None = None,
                 auth: tuple[str, ...] = (), credentials: tuple[str, str] | None = None,
                 auth_requires_tls: bool = False,
                 greeting: str | None = None,
                 replies: dict[str, str] | None = None,
                 rcpt_replies: dict[str, str] | None = None,
                 eom_reply: str = "250 2.0.0 Ok: queued",
                 close_after_data_bytes: int | None = None,
                 stall_at: str | None = None,
                 lax_end_of_data: bool = False,
                 on_data: Callable[["UpstreamProtocol"], None] | None = None,
                 fault_sessions: int | None = None,
                 script: Callable[[int, str, bytes], str | None] | None = None,
                 reactor: Any = None):
        """
        ``tls`` is a ``tests.support.certs.Leaf`` (cert and key); with it STARTTLS is offered
        (unless ``starttls=False``) or, with ``implicit_tls``, TLS starts at once.
        ``client_ca`` (a CA PEM path) makes a verified client certificate mandatory.
        ``replies`` maps a verb (``EHLO``, ``HELO``, ``MAIL``, ``RCPT``, ``DATA``, ``QUIT``,
        ``RSET``, ``STARTTLS``, ``AUTH``) to a reply line such as ``"451 4.3.0 Later"``;
        ``rcpt_replies`` maps a recipient address to its reply; ``eom_reply`` answers the
        end of data.  ``stall_at`` is a verb, ``GREETING`` or ``EOM``.
        ``fault_sessions`` limits ``greeting``, ``replies``, ``rcpt_replies``, a non-2xx
        ``eom_reply``, ``close_after_data_bytes`` and ``stall_at`` to the first N sessions.
        ``script(session_index, verb, line)`` is asked first for every command (verb
        ``EOM`` for the end of data): a reply line, ``"CLOSE"``, ``"STALL"``, or None.
        """
        if reactor is None:
            from twisted.internet import reactor as default_reactor
            reactor = default_reactor
        self.reactor = reactor
        self.hostname = hostname
        self.extensions = list(extensions)
        self.tls = tls
        self.implicit_tls = implicit_tls
        self.offer_starttls = bool(tls) and starttls and not implicit_tls
        self.client_ca = client_ca
        self.auth = tuple(m.upper() for m in auth)
        self.credentials = credentials
        self.auth_requires_tls = auth_requires_tls
        self.greeting = greeting or f"220 {hostname} ESMTP recording upstream"
        self.replies = dict(replies or {})
        self.rcpt_replies = dict(rcpt_replies or {})
        self.eom_reply = eom_reply
        self.close_after_data_bytes = close_after_data_bytes
        self.stall_at = stall_at.upper() if stall_at else None
        self.lax_end_of_data = lax_end_of_data
        self.on_data = on_data
        self.fault_sessions = fault_sessions
        self.script = script
        self.sessions: list[SessionRecord] = []
        self.messages: list[Received] = []
        self._protocols: set[UpstreamProtocol] = set()
        self._port: Any = None
        self.host = "127.0.0.1"
        self.port = 0  # set by start()

    # -- lifecycle ----------------------------------------------------------------------

    def start(self, port: int = 0) -> "RecordingUpstream":
        """Listen on ``port`` (0: a free one outside the ephemeral range, so that a restart
        on it cannot find it taken, tests/support/ports.py; a given port: e.g. a restarted
        upstream)."""
        port = port or free_port(self.host)
        factory = Factory.forProtocol(lambda: UpstreamProtocol(self))
        factory.noisy = False
        if self.implicit_tls:
            self._port = self.reactor.listenSSL(port, factory, self.server_tls_options(),
                                                interface=self.host)
        else:
            self._port = self.reactor.listenTCP(port, factory, interface=self.host)
        self.port = self._port.getHost().port
        return self

    def stop(self) -> Deferred[Any]:
        """Stop listening and drop every open connection; fires when all are gone."""
        waits = [succeed(None) if self._port is None else
                 Deferred.fromCoroutine(_maybe(self._port.stopListening()))]
        self._port = None
        for protocol in list(self._protocols):
            waits.append(protocol.disconnected)
            protocol.transport.abortConnection()
        return DeferredList(waits)

    def server_tls_options(self) -> ssl.CertificateOptions:
        if self.tls is None:
            raise ValueError("no certificate configured for the upstream")
        private = ssl.PrivateCertificate.loadPEM(self.tls.cert_pem + b"\n" + self.tls.key_pem)
        kwargs: dict[str, Any] = dict(privateKey=private.privateKey.original,
                                      certificate=private.original)
        if self.client_ca:
            with open(self.client_ca, "rb") as f:
                ca = ssl.Certificate.loadPEM(f.read())
            kwargs.update(verify=True, caCerts=[ca.original], requireCertificate=True)
        return ssl.CertificateOptions(**kwargs)

    # -- recordings ---------------------------------------------------------------------

    @property
    def raw(self) -> bytes:
        return b"".join(bytes(s.raw) for s in self.sessions)

    @property
    def cleartext(self) -> bytes:
        return b"".join(bytes(s.cleartext) for s in self.sessions)

    @property
    def connection_count(self) -> int:
        return len(self.sessions)

    @property
    def reused(self) -> bool:
        return any(s.transactions > 1 for s in self.sessions)

    def whenIdle(self) -> Deferred[Any]:
        """Fires once every connection accepted so far has closed."""
        return DeferredList([p.disconnected for p in list(self._protocols)])

    @property
    def accepted(self) -> list[Received]:
        """The messages this upstream acknowledged with a 2xx to the final dot."""
        return [m for m in self.messages if m.accepted]

    def faulty(self, record: SessionRecord) -> bool:
        return self.fault_sessions is None or record.index < self.fault_sessions

    def ehlo_lines(self, tls: bool) -> list[str]:
        lines = list(self.extensions)
        if self.offer_starttls and not tls:
            lines.append("STARTTLS")
        if self.auth and (tls or not self.auth_requires_tls):
            lines.append("AUTH " + " ".join(self.auth))
        return lines


async def _maybe(result: Any) -> Any:
    if isinstance(result, Deferred):
        return await result
    return result


@implementer(IHandshakeListener)
class UpstreamProtocol(Protocol):
    """One SMTP server session of the recording upstream."""

    def __init__(self, upstream: RecordingUpstream):
        self.upstream = upstream
        self.record = SessionRecord()
        self.disconnected: Deferred[None] = Deferred()
        self.replies_sent = 0
        self._buffer = b""
        self._mode = "command"  # command | data | auth-plain | auth-login-user | auth-login-pass
        self._data = bytearray()
        self._scan = 0
        self._stalled = False
        self._login_user = ""
        self._challenge = b""
        self._hooked: str | None = None
        self._packet = 0
        self._reset()

    def _reset(self) -> None:
        self._mail_from: str | None = None
        self._mail_params: list[str] = []
        self._rcpts: list[str] = []

    # -- connection -----------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.record.index = len(self.upstream.sessions)
        self.upstream.sessions.append(self.record)
        self.upstream._protocols.add(self)
        if self.upstream.implicit_tls:
            self.record.tls = False  # becomes True at handshakeCompleted
        faulty = self.upstream.faulty(self.record)
        scripted = self._script(GREETING, b"")
        if scripted == STALL or (scripted is None and faulty
                                 and self.upstream.stall_at == GREETING):
            self._stalled = True
            return
        if scripted is None and not faulty:
            scripted = f"220 {self.upstream.hostname} ESMTP recording upstream"
        self._send(scripted or self.upstream.greeting)

    def _script(self, verb: str, line: bytes) -> str | None:
        if self.upstream.script is None:
            return None
        return self.upstream.script(self.record.index, verb, line)

    def handshakeCompleted(self) -> None:
        self.record.tls = True
        certificate = self.transport.getPeerCertificate()
        if certificate is not None:
            self.record.client_certificate = certificate.get_subject().CN

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.record.closed = True
        self.upstream._protocols.discard(self)
        self.disconnected.callback(None)

    # -- input ----------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        self.record.raw += data
        if not self.record.tls:
            self.record.cleartext += data
        self._packet += 1
        self._replies_at_packet = self.replies_sent
        self._buffer += data
        self._process()

    def _process(self) -> None:
        while self._buffer and self.transport is not None and not self.record.closed:
            if self._mode == "data":
                self._dataReceived()
                if self._mode == "data":
                    return
                continue
            end = self._buffer.find(b"\n")
            if end < 0:
                return
            line, self._buffer = self._buffer[:end], self._buffer[end + 1:]
            line = line[:-1] if line.endswith(b"\r") else line
            self.record.commands.append(
                Command(line, self._replies_at_packet, self._packet, self.record.tls))
            if self._stalled:
                continue
            if self._mode.startswith("auth"):
                self._authResponse(line)
            else:
                self._command(line)

    def _command(self, line: bytes) -> None:
        verb = line.split(b" ", 1)[0].split(b":", 1)[0].decode("ascii", "replace").upper()
        hooked = self._script(verb, line)
        faulty = self.upstream.faulty(self.record)
        if hooked == STALL or (hooked is None and faulty and verb == self.upstream.stall_at):
            self._stalled = True
            return
        self._hooked = hooked
        scripted = hooked or (self.upstream.replies.get(verb) if faulty else None)
        handler = getattr(self, f"smtp_{verb}", None)
        if handler is None:
            self._send(scripted or "502 5.5.1 Command not implemented")
            return
        handler(line, scripted)

    # -- commands ---------------------------------------------------------------------------

    def smtp_EHLO(self, line: bytes, scripted: str | None) -> None:
        if scripted:
            self._send(scripted)
            return
        self._reset()
        lines = [f"{self.upstream.hostname} greets you"] + self.upstream.ehlo_lines(
            self.record.tls)
        self._send("\n".join(f"250{'-' if i < len(lines) - 1 else ' '}{text}"
                             for i, text in enumerate(lines)), raw=True)

    def smtp_HELO(self, line: bytes, scripted: str | None) -> None:
        self._reset()
        self._send(scripted or f"250 {self.upstream.hostname}")

    def smtp_NOOP(self, line: bytes, scripted: str | None) -> None:
        self._send(scripted or "250 2.0.0 Ok")

    def smtp_RSET(self, line: bytes, scripted: str | None) -> None:
        self._reset()
        self._send(scripted or "250 2.0.0 Ok")

    def smtp_QUIT(self, line: bytes, scripted: str | None) -> None:
        self._send(scripted or "221 2.0.0 Bye")
        self.transport.loseConnection()

    def smtp_STARTTLS(self, line: bytes, scripted: str | None) -> None:
        if scripted or not self.upstream.offer_starttls or self.record.tls:
            self._send(scripted or "454 4.7.0 TLS not available")
            return
        self._send("220 2.0.0 Ready to start TLS")
        # RFC 3207 §4.2: anything pipelined after STARTTLS is discarded, never executed.
        self.record.plaintext_after_starttls += self._buffer
        self._buffer = b""
        self._reset()
        self.transport.startTLS(self.upstream.server_tls_options())

    def smtp_AUTH(self, line: bytes, scripted: str | None) -> None:
        parts = line.split(b" ")
        mechanism = parts[1].decode("ascii", "replace").upper() if len(parts) > 1 else ""
        if not self.record.tls and self.upstream.auth_requires_tls:
            self._send("538 5.7.11 Encryption required for requested authentication mechanism")
            return
        if mechanism not in self.upstream.auth:
            self._send("504 5.5.4 Unrecognized authentication type")
            return
        self.record.auth_mechanism = mechanism
        self.record.auth_tls = self.record.tls
        initial = parts[2] if len(parts) > 2 else None
        if mechanism == "CRAM-MD5":
            # RFC 2195: a unique challenge; the answer is "user hex(HMAC-MD5(pass, it))".
            self._challenge = f"<{os.urandom(8).hex()}@{self.upstream.hostname}>".encode()
            self._mode = "auth-cram"
            self._send("334 " + base64.b64encode(self._challenge).decode("ascii"))
        elif mechanism == "PLAIN":
            if initial is None:
                self._mode = "auth-plain"
                self._send("334 ")
            else:
                self._checkPlain(initial)
        else:
            if initial is None:
                self._mode = "auth-login-user"
                self._send("334 VXNlcm5hbWU6")
            else:
                self._authResponse(initial, mode="auth-login-user")

    def _authResponse(self, line: bytes, mode: str | None = None) -> None:
        mode = mode or self._mode
        self._mode = "command"
        if line == b"*":
            self._send("501 5.7.0 Authentication cancelled")
            return
        if mode == "auth-plain":
            self._checkPlain(line)
        elif mode == "auth-cram":
            user, _, digest = _b64(line).decode("utf-8", "replace").rpartition(" ")
            secret = (self.upstream.credentials or ("", ""))[1].encode("utf-8")
            expected = hmac.new(secret, self._challenge, hashlib.md5).hexdigest()
            if hmac.compare_digest(digest, expected):
                self._checkCredentials(user, self.upstream.credentials[1])
            else:
                self._checkCredentials(user, None)
        elif mode == "auth-login-user":
            self._login_user = _b64(line).decode("utf-8", "replace")
            self._mode = "auth-login-pass"
            self._send("334 UGFzc3dvcmQ6")
        else:
            self._checkCredentials(self._login_user, _b64(line).decode("utf-8", "replace"))

    def _checkPlain(self, response: bytes) -> None:
        parts = _b64(response).split(b"\0")
        if len(parts) != 3:
            self._send("501 5.5.2 Malformed PLAIN response")
            return
        self._checkCredentials(parts[1].decode("utf-8", "replace"),
                               parts[2].decode("utf-8", "replace"))

    def _checkCredentials(self, user: str, password: str | None) -> None:
        scripted = self.upstream.replies.get("AUTH")
        if scripted:
            self._send(scripted)
        elif self.upstream.credentials == (user, password):
            self.record.auth_user = user
            self._send("235 2.7.0 Authentication successful")
        else:
            self._send("535 5.7.8 Authentication credentials invalid")

    def smtp_MAIL(self, line: bytes, scripted: str | None) -> None:
        match = _MAIL.match(line)
        if match is None:
            self._send("501 5.5.4 Syntax: MAIL FROM:<address>")
            return
        if self._mail_from is not None:
            self._send("503 5.5.1 Nested MAIL command")
            return
        params = match.group(2).decode("utf-8", "surrogateescape").split()
        limit = self._sizeLimit()
        for param in params:
            if param.upper().startswith("SIZE=") and limit and int(param[5:]) > limit:
                self._send("552 5.3.4 Message size exceeds fixed limit")
                return
        if scripted:
            self._send(scripted)
            return
        self._mail_from = match.group(1).decode("utf-8", "surrogateescape")
        self._mail_params = params
        self._send("250 2.1.0 Ok")

    def smtp_RCPT(self, line: bytes, scripted: str | None) -> None:
        match = _RCPT.match(line)
        if match is None:
            self._send("501 5.5.4 Syntax: RCPT TO:<address>")
            return
        if self._mail_from is None:
            self._send("503 5.5.1 Need MAIL first")
            return
        rcpt = match.group(1).decode("utf-8", "surrogateescape")
        by_address = (self.upstream.rcpt_replies.get(rcpt)
                      if self.upstream.faulty(self.record) else None)
        reply = self._hooked or by_address or scripted or "250 2.1.5 Ok"
        if reply.startswith("2"):
            self._rcpts.append(rcpt)
        self._send(reply)

    def smtp_DATA(self, line: bytes, scripted: str | None) -> None:
        if scripted and not scripted.startswith("354"):
            self._send(scripted)
            return
        if not scripted and (self._mail_from is None or not self._rcpts):
            # A scripted 354 is said even then: a broken server, on purpose.
            self._send("554 5.5.1 No valid recipients")
            return
        self._send(scripted or "354 End data with <CR><LF>.<CR><LF>")
        self._mode = "data"
        self._data = bytearray(b"\r\n")  # the data starts at the start of a line
        self._scan = 0
        if self.upstream.on_data is not None:
            self.upstream.on_data(self)

    # -- message data -------------------------------------------------------------------------

    def _dataReceived(self) -> None:
        chunk, self._buffer = self._buffer, b""
        self._data += chunk
        self.record.data_bytes += len(chunk)
        limit = self.upstream.close_after_data_bytes
        if limit is not None and self.record.data_bytes >= limit \
                and self.upstream.faulty(self.record):
            self.transport.abortConnection()
            self.record.closed = True
            return
        pattern = _LAX_END if self.upstream.lax_end_of_data else _STRICT_END
        match = pattern.search(self._data, max(self._scan - 4, 0))
        if match is None:
            self._scan = len(self._data)
            return
        stuffed = bytes(self._data[2:match.start() + len(match.group(1))])
        self._buffer = bytes(self._data[match.end():])
        data_raw = bytes(self._data[2:match.end()])
        self._data = bytearray()
        self._mode = "command"
        # RFC 5321 §4.5.2: remove the first "." of every line that starts with one.
        data = (b"\r\n" + stuffed).replace(b"\r\n.", b"\r\n")[2:]
        self.record.transactions += 1
        faulty = self.upstream.faulty(self.record)
        hooked = self._script(END_OF_DATA, b"")
        reply = hooked or (self.upstream.eom_reply if faulty else "250 2.0.0 Ok: queued")
        stall = hooked == STALL or (hooked is None and faulty
                                    and self.upstream.stall_at == END_OF_DATA)
        self.upstream.messages.append(Received(
            self._mail_from or "", list(self._rcpts), data_raw, data, self._mail_params,
            self.record.tls, self.record, "" if stall or reply == CLOSE else reply))
        self._reset()
        if stall:
            self._stalled = True
            return
        self._send(reply)

    # -- output ---------------------------------------------------------------------------------

    def _send(self, reply: str, raw: bool = False) -> None:
        if reply == CLOSE:
            self.transport.abortConnection()
            self.record.closed = True
            return
        if reply.startswith(RAW):  # exactly these octets (latin-1), garbage included
            self.replies_sent += 1
            self.transport.write(reply[len(RAW):].encode("latin-1"))
            return
        if not raw and "\n" in reply:  # "250 a\n250 b" style scripted multi-line replies
            lines = reply.split("\n")
            code = lines[0][:3]
            reply = "\n".join(f"{code}{'-' if i < len(lines) - 1 else ' '}{line[4:]}"
                              for i, line in enumerate(lines))
        self.replies_sent += 1
        self.transport.write(reply.replace("\n", "\r\n").encode("utf-8") + b"\r\n")

    def _sizeLimit(self) -> int:
        for keyword in self.upstream.extensions:
            name, _, value = keyword.partition(" ")
            if name.upper() == "SIZE" and value.isdigit():
                return int(value)
        return 0


def _b64(data: bytes) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except ValueError:
        return b""
