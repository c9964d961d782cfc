"""The channel between the supervisor and one worker: calls and notices as JSON frames.

One UNIX socket pair per worker, made by the supervisor before the worker starts; each
side speaks ``ControlChannel`` over its end.  A frame is a 4-octet length and a JSON
object:

* ``{"id": 7, "call": "rate.take", "args": {...}}`` asks; the other side answers
  ``{"id": 7, "result": ...}`` or ``{"id": 7, "error": "..."}``;
* ``{"notice": "conn.release", "args": {...}}`` tells, and expects no answer.

Why not AMP: a value in an AMP box is at most 65,535 octets, and a worker's metrics, or
a status listing, can be larger.  What AMP would have given besides (correlation, errors,
a bounded frame) is the few lines below.

Every frame has a bound (``MAX_FRAME``): a worker is trusted code, but a bug must not
make either side buffer without end.  Frames up to ``INLINE_FRAME`` octets are decoded
at once; larger ones (a metrics snapshot) in a thread, so the reactor never parses a big
document; a frame decoded in a thread may be handled after smaller frames that followed
it, which no exchange here depends on (each call is answered on its own).  Every call has a deadline: an answer that does not come fails the call with
``ControlTimeout`` and the late answer, if any, is dropped.  When the channel closes,
every call still waiting fails with ``ControlLost``.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Mapping

from twisted.internet import defer, threads
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure

from esmtpfa.common.logs import logger
from esmtpfa.limits.interfaces import StateUnavailable

log = logger("esmtpfa.workers")

#: The largest frame either side accepts (a worker's metrics snapshot is the largest).
MAX_FRAME = 32 * 1024 * 1024
#: Frames up to this size are decoded on the reactor thread; larger ones in a thread.
INLINE_FRAME = 64 * 1024
#: Seconds a call waits for its answer by default.
CALL_TIMEOUT = 5.0

Handler = Callable[..., Any]


class ControlLost(StateUnavailable):
    """The other side went away before it answered."""


class ControlTimeout(StateUnavailable):
    """The other side did not answer in time."""


class RemoteError(Exception):
    """The other side's handler failed; its message says how."""


class ControlChannel(Int32StringReceiver):
    """Either end of a supervisor–worker channel.

    ``handlers`` maps a call or notice name to a function of its arguments; a call's
    handler may return a value or a Deferred.  ``reactor`` times the calls' deadlines
    and runs the thread that decodes big frames.
    """

    MAX_LENGTH = MAX_FRAME

    def __init__(self, handlers: Mapping[str, Handler], reactor: Any, *,
                 timeout: float = CALL_TIMEOUT, name: str = "control"):
        self.handlers = dict(handlers)
        self.reactor = reactor
        self.timeout = timeout
        self.name = name
        self._next = 0
        #: ident → (waiter, deadline, method): the calls waiting for an answer.
        self._pending: dict[int, tuple[defer.Deferred, float, str]] = {}
        self._timer = None  # one timer, for the earliest deadline of all pending calls
        self.lost: defer.Deferred = defer.Deferred()  # fires when the channel closes
        self.connected = False

    # -- asking -------------------------------------------------------------------------

    def call(self, method: str, timeout: float | None = None, **args: Any) -> defer.Deferred:
        """Ask the other side; fires with its answer, or fails (``ControlLost``,
        ``ControlTimeout``, ``RemoteError``)."""
        if not self.connected:
            return defer.fail(ControlLost(f"{self.name}: the channel is closed"))
        self._next += 1
        ident = self._next
        waiter: defer.Deferred = defer.Deferred(lambda _: self._pending.pop(ident, None))
        deadline = self.reactor.seconds() + (self.timeout if timeout is None else timeout)
        self._pending[ident] = (waiter, deadline, method)
        self._send({"id": ident, "call": method, "args": args})
        if self._timer is None or not self._timer.active():
            self._timer = self.reactor.callLater(deadline - self.reactor.seconds(),
                                                 self._expire)
        elif deadline < self._timer.getTime():
            self._timer.reset(deadline - self.reactor.seconds())
        return waiter

    def notify(self, method: str, **args: Any) -> None:
        """Tell the other side; nothing comes back (a closed channel drops it)."""
        if self.connected:
            self._send({"notice": method, "args": args})

    def _expire(self) -> None:
        """Fail the calls whose deadline passed; wait again for the next deadline.  One
        timer for all calls: a call costs no timer of its own (they are frequent, and
        almost all are answered within a millisecond)."""
        self._timer = None
        now = self.reactor.seconds()
        due = [ident for ident, (_, deadline, _) in self._pending.items() if deadline <= now]
        for ident in due:
            waiter, _, method = self._pending.pop(ident)
            waiter.errback(ControlTimeout(f"{self.name}: no answer to {method} in time"))
        if self._pending:
            earliest = min(deadline for _, deadline, _ in self._pending.values())
            self._timer = self.reactor.callLater(max(earliest - now, 0.0), self._expire)

    def _send(self, message: dict) -> None:
        self.sendString(_encode(message).encode())

    # -- receiving ------------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.connected = True

    def stringReceived(self, frame: bytes) -> None:
        if len(frame) <= INLINE_FRAME:
            self._dispatch(frame, _decode(frame))
            return
        # A big frame (a metrics snapshot): decoded off the reactor thread.
        threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), _decode, frame
                                  ).addBoth(lambda message: self._dispatch(frame, message))

    def _dispatch(self, frame: bytes, message: Any) -> None:
        if isinstance(message, Failure) or not isinstance(message, dict):
            log.error("{name}: dropping an unreadable frame ({size} octets)",
                      name=self.name, size=len(frame))
            return
        if "call" in message:
            self._answer(message)
        elif "notice" in message:
            self._notice(message["notice"], message.get("args") or {})
        elif "id" in message:
            pending = self._pending.pop(message["id"], None)
            if pending is None:
                return  # answered after its deadline: the caller already heard
            if "error" in message:
                pending[0].errback(RemoteError(str(message["error"])))
            else:
                pending[0].callback(message.get("result"))

    def _run(self, method: str, args: dict) -> Any:
        """The handler's result (a value or a Deferred); raises what it raises."""
        handler = self.handlers.get(method)
        if handler is None:
            raise RemoteError(f"{self.name}: no such call: {method}")
        return handler(**args)

    def _notice(self, method: str, args: dict) -> None:
        def failed(failure: Failure) -> None:
            log.failure("{name}: notice {notice} failed", failure, name=self.name,
                        notice=method)
        try:
            result = self._run(method, args)
        except Exception:
            failed(Failure())
            return
        if isinstance(result, defer.Deferred):
            result.addErrback(failed)

    def _answer(self, message: dict) -> None:
        ident = message.get("id")

        def done(result: Any) -> None:
            if self.connected:
                self._send({"id": ident, "result": result})

        def failed(failure: Failure) -> None:
            if not failure.check(RemoteError):
                log.failure("{name}: call {call} failed", failure, name=self.name,
                            call=message["call"])
            if self.connected:
                self._send({"id": ident, "error": failure.getErrorMessage()})
        try:
            result = self._run(message["call"], message.get("args") or {})
        except Exception:
            failed(Failure())
            return
        if isinstance(result, defer.Deferred):
            result.addCallbacks(done, failed)
        else:  # most handlers answer at once: no Deferred to make
            done(result)

    def lengthLimitExceeded(self, length: int) -> None:
        log.error("{name}: a frame of {length} octets is over the {limit} octet bound; "
                  "closing the channel", name=self.name, length=length, limit=MAX_FRAME)
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = None) -> None:
        self.connected = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        pending, self._pending = self._pending, {}
        for waiter, _, _ in pending.values():
            waiter.errback(ControlLost(f"{self.name}: the channel closed"))
        if not self.lost.called:
            self.lost.callback(None)


#: Made once: ``json.dumps`` with any option builds a new encoder at every call.
_encode = json.JSONEncoder(separators=(",", ":")).encode
_decoder = json.JSONDecoder()


def _decode(frame: bytes) -> Any:
    try:
        return _decoder.decode(frame.decode("utf-8"))
    except ValueError:  # UnicodeDecodeError and JSONDecodeError alike
        return None


__all__ = ["CALL_TIMEOUT", "ControlChannel", "ControlLost", "ControlTimeout", "MAX_FRAME",
           "RemoteError"]
