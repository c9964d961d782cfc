"""A small Redis client on a Twisted protocol: RESP2, pipelined, every request bounded.

Why not ``txredisapi`` (docs/shared-state.md): it works on this Twisted, but its reply
timeouts use the global reactor (no ``Clock`` in tests), ``ssl=True`` gives a context that
verifies nothing, a bulk reply may grow without bound, and the relay needs four commands
of its three thousand lines.  What the relay needs is here:

* one connection, made on demand and remade after a failure with a growing pause
  (``backoff``); while paused, requests fail at once instead of queueing;
* the connection is ready only after ``AUTH`` and ``SELECT`` from the URL have been
  answered, all within ``connect_timeout`` (TCP, TLS and both commands);
* requests are written as they come and answered in order (RESP is pipelined by nature);
* every request has a deadline (``timeout``, waiting for the connection included) and
  fails with ``StateUnavailable`` when it passes.  The connection it was sent on is then
  dropped: a late reply would otherwise be taken for the next request's;
* a reply is bounded (``max_reply`` octets, nesting depth): anything bigger is a
  protocol error and drops the connection;
* ``rediss://`` verifies the server's certificate against the system's trust roots (or
  the ``ca`` file named in the URL) and its host name, always.

The URL's password never leaves this module: ``RedisURL`` has no field or repr that
shows it, and log lines use ``RedisURL.redacted``.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Sequence, cast
from urllib.parse import unquote

from twisted.internet import defer, endpoints, protocol
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.python.failure import Failure

from esmtpfa.common.logs import logger
from esmtpfa.common.transport import IStreamTransport
from esmtpfa.common.urls import query_parameters, split_secret_url
from esmtpfa.limits.interfaces import StateUnavailable

log = logger("esmtpfa.state")

DEFAULT_PORT = 6379
#: The largest reply the relay's scripts can give is a few dozen numbers.
MAX_REPLY = 1 << 20
MAX_DEPTH = 4


class RedisError(StateUnavailable):
    """Redis answered with an error (``-ERR``, ``-NOSCRIPT``, ``-READONLY``, …).  To the
    relay that is the state being unavailable too; ``code`` is the first word."""

    def __init__(self, message: str):
        super().__init__(message)
        self.code = message.split(" ", 1)[0]


class ProtocolError(Exception):
    """The server sent something that is not a RESP2 reply we accept."""


class Incomplete(Exception):
    """More octets are needed for the reply."""


@dataclass(frozen=True)
class RedisURL:
    """``redis://[[user]:password@]host[:port][/db][?prefix=NAME]``, or ``rediss://`` for
    TLS (``?ca=/path/ca.pem`` adds a trust root).  The password is kept out of ``repr``."""

    tls: bool
    host: str
    port: int
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    prefix: str = ""
    ca: str | None = None

    @classmethod
    def parse(cls, text: str) -> "RedisURL":
        """Raises ``ValueError`` with a message that never quotes the URL (it may hold a
        password)."""
        parts, scheme, host, port = split_secret_url(text, ("redis", "rediss"))
        path = parts.path.strip("/")
        if path and not path.isdigit():
            raise ValueError("the path must be a database number, like /0")
        query = query_parameters(parts, ("prefix", "ca", "db"))
        db = path or (query.get("db") or ["0"])[-1]
        if not db.isdigit():
            raise ValueError("db must be a number")
        prefix = (query.get("prefix") or [""])[-1]
        if len(prefix) > 64 or any(not c.isprintable() or c.isspace() for c in prefix):
            raise ValueError("prefix must be up to 64 printable characters without spaces")
        cas = query.get("ca")
        ca = cas[-1] if cas else None
        if ca and scheme != "rediss":
            raise ValueError("ca= needs a rediss:// URL")
        username = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password is not None else None
        if password is None and username is not None:
            # redis://secret@host: the one word is the password (as redis-cli reads it).
            username, password = None, username
        return cls(tls=scheme == "rediss", host=host, port=port or DEFAULT_PORT,
                   db=int(db), username=username or None, password=password or None,
                   prefix=prefix, ca=ca)

    @property
    def redacted(self) -> str:
        """Where, for a log line: scheme, host, port and db; never the credentials."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'rediss' if self.tls else 'redis'}://{host}:{self.port}/{self.db}"

    def __str__(self) -> str:
        return self.redacted


# -- RESP2 ------------------------------------------------------------------------------

def encode(args: Sequence[Any]) -> bytes:
    """A command as an array of bulk strings (the only form Redis requires)."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode("utf-8", "surrogatepass")
        elif isinstance(arg, (int, float)):
            data = repr(arg).encode("ascii")
        else:
            raise TypeError(f"cannot send {type(arg).__name__} to Redis")
        out += [b"$%d\r\n" % len(data), data, b"\r\n"]
    return b"".join(out)


def parse(buffer: bytes | bytearray, start: int = 0, limit: int = MAX_REPLY
          ) -> tuple[Any, int]:
    """One reply from ``buffer[start:]``: (value, where the next starts).  Raises
    ``Incomplete`` when more octets are needed, ``ProtocolError`` when it is not RESP2
    or is over ``limit`` octets in all (or ``MAX_DEPTH`` deep).  An error reply is
    returned as a ``RedisError`` value."""
    value, after = _parse(buffer, start, 0, limit)
    if after - start > limit:
        raise ProtocolError(f"a reply of {after - start} octets")
    return value, after


def _parse(buffer: bytes | bytearray, start: int, depth: int, limit: int
           ) -> tuple[Any, int]:
    end = buffer.find(b"\r\n", start)
    if end < 0:
        raise Incomplete()
    kind, line = buffer[start:start + 1], bytes(buffer[start + 1:end])
    after = end + 2
    if kind == b"+":
        return line.decode("utf-8", "replace"), after
    if kind == b"-":
        return RedisError(line.decode("utf-8", "replace")), after
    if kind == b":":
        return _integer(line), after
    if kind == b"$":
        size = _integer(line)
        if size < 0:
            return None, after
        if size > limit:
            raise ProtocolError(f"bulk reply of {size} octets")
        if len(buffer) < after + size + 2:
            raise Incomplete()
        if buffer[after + size:after + size + 2] != b"\r\n":
            raise ProtocolError("bulk reply not ended by CRLF")
        return bytes(buffer[after:after + size]), after + size + 2
    if kind == b"*":
        count = _integer(line)
        if count < 0:
            return None, after
        if depth >= MAX_DEPTH or count > limit // 4:
            raise ProtocolError("array reply too deep or too long")
        items = []
        for _ in range(count):
            item, after = _parse(buffer, after, depth + 1, limit)
            items.append(item)
        return items, after
    raise ProtocolError(f"unknown reply type {bytes(kind)!r}")


def _integer(line: bytes) -> int:
    try:
        return int(line)
    except ValueError:
        raise ProtocolError("not an integer") from None


class RESPProtocol(protocol.Protocol):
    """One connection: requests written at once, replies matched to them in order."""

    transport: IStreamTransport

    def __init__(self, max_reply: int = MAX_REPLY):
        self.max_reply = max_reply
        self._buffer = bytearray()
        self._waiting: deque[defer.Deferred] = deque()
        self.lost = False
        self.made: defer.Deferred = defer.Deferred()
        self.ended: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.made.callback(self)

    def request(self, *args: Any) -> defer.Deferred:
        if self.lost:
            return defer.fail(StateUnavailable("connection to Redis lost"))
        d: defer.Deferred = defer.Deferred()
        self._waiting.append(d)
        self.transport.write(encode(args))
        return d

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        start = 0
        while start < len(self._buffer):
            try:
                value, start = parse(self._buffer, start, self.max_reply)
            except Incomplete:
                break
            except ProtocolError as error:
                return self._broken(str(error))
            if not self._waiting:
                return self._broken("a reply nobody asked for")
            d = self._waiting.popleft()
            if isinstance(value, RedisError):
                d.errback(value)
            else:
                d.callback(value)
        del self._buffer[:start]
        if len(self._buffer) > self.max_reply:
            self._broken(f"a reply over {self.max_reply} octets")

    def _broken(self, why: str) -> None:
        log.warn("dropping the Redis connection: {why}", why=why)
        self._buffer.clear()
        self.abort()

    def abort(self) -> None:
        """Drop the connection now: no request is sent on it any more (``lost``), and
        those waiting fail when the transport reports the loss."""
        if self.transport is not None and not self.lost:
            self.lost = True
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.lost = True
        waiting, self._waiting = self._waiting, deque()
        for d in waiting:
            d.errback(StateUnavailable(f"connection to Redis lost: {reason.getErrorMessage()}"))
        if not self.made.called:
            self.made.errback(StateUnavailable("connection to Redis lost"))
        self.ended.callback(None)


class _Factory(protocol.Factory):
    noisy = False  # a reconnect is logged once, by the client

    def __init__(self, max_reply: int):
        self.max_reply = max_reply

    def buildProtocol(self, addr) -> RESPProtocol:
        return RESPProtocol(self.max_reply)


class Script:
    """A Lua script known by its SHA1, so a call sends 40 octets, not the source."""

    def __init__(self, source: str):
        self.source = source
        self.sha = hashlib.sha1(source.encode("utf-8")).hexdigest()


class RedisClient:
    """Requests to one Redis server, each failing with ``StateUnavailable`` after at
    most ``timeout`` seconds (waiting for a connection included)."""

    def __init__(self, url: RedisURL, reactor, *, timeout: float = 0.5,
                 connect_timeout: float | None = None, max_reply: int = MAX_REPLY,
                 min_backoff: float = 0.1, max_backoff: float = 5.0, endpoint=None):
        self.url = url
        self.reactor: IReactorTime = reactor
        self.timeout = timeout
        # A connection may need TCP, TLS, AUTH and SELECT: more than one request's time,
        # and requests that wait for it still fail at their own deadline.
        self.connect_timeout = connect_timeout if connect_timeout is not None else max(
            2.0, 4 * timeout)
        self.max_reply = max_reply
        self.min_backoff, self.max_backoff = min_backoff, max_backoff
        self._endpoint = endpoint
        self._protocol: RESPProtocol | None = None
        self._connecting: defer.Deferred | None = None
        self._ready_waiters: list[defer.Deferred] = []
        self._backoff = 0.0
        self._retry_at = 0.0
        self._last_error = ""
        self._closed = False

    def __repr__(self) -> str:
        return f"<RedisClient {self.url.redacted}>"

    # -- requests ---------------------------------------------------------------------

    def execute(self, *args: Any) -> defer.Deferred:
        """Send one command; fires with its reply, or fails with ``StateUnavailable``
        (a ``RedisError`` when Redis refused it)."""
        if self._closed:
            return defer.fail(StateUnavailable("the Redis client is closed"))
        sent: list[RESPProtocol] = []

        def cancel(_: defer.Deferred) -> None:
            if sent:
                sent[0].abort()  # its reply would be taken for the next request's

        result: defer.Deferred = defer.Deferred(cancel)

        def expire() -> None:
            if result.called:
                return
            if sent:
                sent[0].abort()
            result.errback(StateUnavailable(
                f"Redis at {self.url.redacted} did not answer within {self.timeout:g} s"))

        timer = self.reactor.callLater(self.timeout, expire)

        def settle(outcome):
            if timer.active():
                timer.cancel()
            if not result.called:
                if isinstance(outcome, Failure):
                    result.errback(outcome)
                else:
                    result.callback(outcome)

        def ready(connection: RESPProtocol):
            if result.called:
                return None
            sent.append(connection)
            connection.request(*args).addBoth(settle)
            return None

        self._connection().addCallbacks(ready, settle)
        return result

    def evalsha(self, script: Script, keys: Sequence[Any], args: Sequence[Any]
                ) -> defer.Deferred:
        """Run ``script`` by its SHA1; a server that does not know it yet (restarted,
        flushed, failed over: ``NOSCRIPT``) gets the source once with ``EVAL``, which
        also caches it."""
        call = [len(keys), *keys, *args]

        def unknown(failure: Failure):
            failure.trap(RedisError)
            if cast(RedisError, failure.value).code != "NOSCRIPT":
                return failure
            return self.execute("EVAL", script.source, *call)
        return self.execute("EVALSHA", script.sha, *call).addErrback(unknown)

    # -- the connection ---------------------------------------------------------------

    def _connection(self) -> defer.Deferred:
        """Fires with a ready connection (made now if needed), or fails at once while
        the previous failure's pause lasts."""
        if self._protocol is not None and not self._protocol.lost:
            return defer.succeed(self._protocol)
        now = self.reactor.seconds()
        if self._connecting is None and now < self._retry_at:
            return defer.fail(StateUnavailable(
                f"Redis at {self.url.redacted} unavailable ({self._last_error}); next "
                f"attempt in {self._retry_at - now:.1f} s"))
        waiter: defer.Deferred = defer.Deferred()
        self._ready_waiters.append(waiter)
        if self._connecting is None:
            self._connecting = self._connect()
            self._connecting.addBoth(self._connected)
        return waiter

    def _make_endpoint(self):
        if self._endpoint is not None:
            return self._endpoint
        url = self.url
        endpoint: IStreamClientEndpoint
        try:
            # An address needs no resolver (whose thread pool may be slow to start).
            version = ipaddress.ip_address(url.host).version
        except ValueError:
            endpoint = endpoints.HostnameEndpoint(self.reactor, url.host, url.port,
                                                  timeout=self.connect_timeout)
        else:
            tcp = endpoints.TCP6ClientEndpoint if version == 6 else endpoints.TCP4ClientEndpoint
            endpoint = tcp(self.reactor, url.host, url.port, timeout=self.connect_timeout)
        if url.tls:
            from twisted.internet import ssl
            trust = None
            if url.ca:
                with open(url.ca, "rb") as f:
                    trust = ssl.Certificate.loadPEM(f.read())
            options = ssl.optionsForClientTLS(url.host, trustRoot=trust)
            endpoint = endpoints.wrapClientTLS(options, endpoint)
        return endpoint

    def _connect(self) -> defer.Deferred:
        """TCP (TLS), AUTH, SELECT, all within ``connect_timeout``."""
        url = self.url
        state: dict[str, Any] = {}

        def made(connection: RESPProtocol):
            state["connection"] = connection
            # TLS: connectionMade fires when the handshake is done.
            return connection.made

        def handshake(connection: RESPProtocol):
            steps = []
            if url.password is not None:
                auth = ["AUTH", url.username, url.password] if url.username else [
                    "AUTH", url.password]
                steps.append(connection.request(*auth))
            if url.db:
                steps.append(connection.request("SELECT", url.db))
            return defer.gatherResults(steps, consumeErrors=True).addCallback(
                lambda _: connection)

        def unwrap(failure: Failure):
            failure.trap(defer.FirstError)
            return cast(defer.FirstError, failure.value).subFailure

        try:
            endpoint = self._make_endpoint()
        except OSError as error:
            return defer.fail(StateUnavailable(f"cannot read the ca file: {error.strerror}"))
        d = endpoint.connect(_Factory(self.max_reply))
        d.addCallback(made).addCallback(handshake).addErrback(unwrap)

        def failed(failure: Failure):
            connection = state.get("connection")
            if connection is not None:
                connection.abort()  # refused AUTH, SELECT, or too slow: not usable
            if failure.check(defer.TimeoutError, defer.CancelledError):
                raise StateUnavailable(f"no connection within {self.connect_timeout:g} s")
            return failure
        return d.addTimeout(self.connect_timeout, self.reactor).addErrback(failed)

    def _connected(self, outcome) -> None:
        self._connecting = None
        waiters, self._ready_waiters = self._ready_waiters, []
        if isinstance(outcome, Failure):
            self._last_error = _reason(outcome)
            self._backoff = min(self.max_backoff, max(self.min_backoff, self._backoff * 2))
            self._retry_at = self.reactor.seconds() + self._backoff
            log.warn("cannot connect to Redis at {url}: {why}; next attempt in at least "
                     "{pause:.1f} s", url=self.url.redacted, why=self._last_error,
                     pause=self._backoff)
            error = outcome if outcome.check(StateUnavailable) else Failure(
                StateUnavailable(self._last_error))
            for waiter in waiters:
                waiter.errback(error)
            return
        connection: RESPProtocol = outcome
        if self._closed:
            connection.abort()
            for waiter in waiters:
                waiter.errback(StateUnavailable("the Redis client is closed"))
            return
        if self._backoff:
            log.info("connected to Redis at {url} again", url=self.url.redacted)
        self._backoff = 0.0
        self._protocol = connection
        for waiter in waiters:
            waiter.callback(connection)

    def close(self) -> defer.Deferred:
        """Drop the connection (service stop); later requests fail at once."""
        self._closed = True
        connection, self._protocol = self._protocol, None
        if connection is None or connection.lost:
            return defer.succeed(None)
        connection.transport.loseConnection()
        ended = connection.ended
        return ended.addTimeout(self.timeout + 1, self.reactor).addErrback(
            lambda _: connection.abort())


def _reason(failure: Failure) -> str:
    """A short reason, free of credentials (Redis's AUTH errors do not echo them)."""
    value = failure.value
    text = str(value) or type(value).__name__
    return text[:200]


__all__ = ["ProtocolError", "RESPProtocol", "RedisClient", "RedisError", "RedisURL",
           "Script", "encode", "parse"]
