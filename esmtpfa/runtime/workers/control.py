"""The channel between the supervisor and one worker: calls and notices as JSON frames.

One UNIX socket pair per worker, made by the supervisor before the worker starts; each
side speaks ``ControlChannel`` over its end.  A frame is a 4-octet length and a JSON
object:

* ``{"id": 7, "call": "rate.take", "args": {...}}`` asks; the other side answers
  ``{"id": 7, "result": ...}`` or ``{"id": 7, "error": "..."}`` (with ``"bad": true``
  when the call itself was not one the table declares);
* ``{"notice": "conn.release", "args": {...}}`` tells, and expects no answer.

Every call and notice is declared once, in ``CALLS`` below: its name, its arguments'
names and types, and its answer's type.  Both ends import the same ``Call`` objects, so
a name is never spelled twice; the sender checks the arguments before a frame leaves,
the receiver checks them again before a handler runs, and the caller checks the answer.
What the table does not declare (an unknown name, a missing, unexpected or mistyped
argument) fails with ``BadCall``, whose message names the call and the argument.

Why not AMP: a value in an AMP box is at most 65,535 octets, and a worker's metrics, or
a status listing, can be larger.  What AMP would have given besides (correlation, errors,
a bounded frame) is the few lines below.

Every frame has a bound (``MAX_FRAME``): a worker is trusted code, but a bug must not
make either side buffer without end.  Frames up to ``INLINE_FRAME`` octets are decoded
at once; larger ones (a metrics snapshot) in a thread, so the reactor never parses a big
document; a frame decoded in a thread may be handled after smaller frames that followed
it, which no exchange here depends on (each call is answered on its own).  Every call has a
deadline: an answer that does not come fails the call with
``ControlTimeout`` and the late answer, if any, is dropped.  When the channel closes,
every call still waiting fails with ``ControlLost``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from twisted.internet import defer, threads
from twisted.internet.protocol import connectionDone
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure

from esmtpfa.common.logs import logger
from esmtpfa.common.transport import IStreamTransport
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


class BadCall(Exception):
    """A call or notice that ``CALLS`` does not declare, or its arguments or answer are
    not the ones declared (a bug on one side: the message names the call and why)."""


# -- the calls, declared once for both ends -----------------------------------------------

NONE: tuple[type, ...] = (type(None),)
STR: tuple[type, ...] = (str,)
INT: tuple[type, ...] = (int,)
NUMBER: tuple[type, ...] = (int, float)
BOOL: tuple[type, ...] = (bool,)
LIST: tuple[type, ...] = (list,)
DICT: tuple[type, ...] = (dict,)

Arguments = tuple[tuple[str, tuple[type, ...]], ...]


def _type_names(types: tuple[type, ...]) -> str:
    return " or ".join("None" if kind is type(None) else kind.__name__ for kind in types)


def _is(value: Any, types: tuple[type, ...]) -> bool:
    # JSON has no int apart from bool in Python: True is an int, but not an argument's.
    if isinstance(value, bool) and bool not in types:
        return False
    return isinstance(value, types)


@dataclass(frozen=True, eq=False)
class Call:
    """One call (answered) or notice (not answered) of the channel.

    ``args`` are the arguments every frame carries, ``optional`` those it may leave out
    (the handler has a default); each with the JSON types it may have.  ``answer`` is
    what a call's answer may be.  A ``Call`` is itself the key: two declarations of one
    name are two different calls, and ``table`` refuses them."""

    name: str
    args: Arguments = ()
    optional: Arguments = ()
    answer: tuple[type, ...] = NONE
    notice: bool = False
    #: name → types, made once: the arguments are checked on every frame, twice.
    _types: Mapping[str, tuple[type, ...]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_types", dict(self.args + self.optional))

    def problem(self, args: Mapping[str, Any]) -> str | None:
        """What is wrong with these arguments, or None."""
        for name, value in args.items():
            types = self._types.get(name)
            if types is None:
                return f"{self.name}: unexpected argument {name!r}"
            if not _is(value, types):
                return (f"{self.name}: argument {name!r} must be {_type_names(types)}, "
                        f"not {type(value).__name__}")
        for name, _ in self.args:
            if name not in args:
                return f"{self.name}: missing argument {name!r}"
        return None

    def answer_problem(self, result: Any) -> str | None:
        if _is(result, self.answer):
            return None
        return (f"{self.name}: the answer must be {_type_names(self.answer)}, "
                f"not {type(result).__name__}")


# Asked by a worker, answered by the supervisor (``esmtpfa.runtime.workers.counts``,
# ``esmtpfa.runtime.workers.supervisor``).
CONN_TAKE = Call("conn.take", (("kind", STR), ("ip", STR)), optional=(("want", INT),),
                 answer=INT + STR)
CONN_RELEASE = Call("conn.release", (("kind", STR), ("ip", STR)), optional=(("n", INT),),
                    notice=True)
LOGIN_REFUSAL = Call("login.refusal", (("address", STR), ("identities", LIST)),
                     answer=STR + NONE)
LOGIN_FAILED = Call("login.failed", (("address", STR), ("identities", LIST)), answer=LIST)
LOGIN_SUCCEEDED = Call("login.succeeded", (("address", STR), ("identity", STR)),
                       notice=True)
RATE_TAKE = Call("rate.take", (("key", STR), ("kind", STR), ("count", INT),
                               ("window", NUMBER), ("n", INT)), answer=DICT + NONE)
RATE_GIVE = Call("rate.give", (("key", STR), ("kind", STR), ("count", INT),
                               ("window", NUMBER), ("n", INT), ("counted", BOOL)),
                 notice=True)
STARTED = Call("started", (("pid", INT),), notice=True)

# Asked by the supervisor, answered by a worker (``esmtpfa.runtime.workers.agent``).
CONN_RECALL = Call("conn.recall", (("kind", STR), ("ip", STR)), answer=INT)
PING = Call("ping", answer=BOOL)
RELOAD = Call("reload", (("path", STR), ("source", STR), ("kind", STR)),
              optional=(("force", BOOL),), answer=STR)
RELOAD_FAILED = Call("reload.failed", (("kind", STR), ("source", STR), ("reason", STR)))
CERTIFICATES_RELOAD = Call("certificates.reload")
METRICS = Call("metrics", answer=LIST)
READINESS = Call("readiness", answer=DICT)
STATUS = Call("status", answer=DICT)


def table(calls: Iterable[Call]) -> dict[str, Call]:
    """A table by name; a name declared twice is a bug."""
    by_name: dict[str, Call] = {}
    for call in calls:
        if call.name in by_name:
            raise ValueError(f"control call {call.name!r} declared twice")
        by_name[call.name] = call
    return by_name


#: Every call and notice of the supervisor–worker channel.
CALLS: Mapping[str, Call] = table([
    CONN_TAKE, CONN_RELEASE, CONN_RECALL, LOGIN_REFUSAL, LOGIN_FAILED, LOGIN_SUCCEEDED,
    RATE_TAKE, RATE_GIVE, STARTED, PING, RELOAD, RELOAD_FAILED, CERTIFICATES_RELOAD, METRICS,
    READINESS, STATUS])


class ControlChannel(Int32StringReceiver):
    """Either end of a supervisor–worker channel.

    ``handlers`` maps the calls and notices this side answers (``Call`` objects of
    ``calls``, the table both sides share: ``CALLS`` unless given) to functions of their
    arguments; a call's handler may return a value or a Deferred.  ``reactor`` times the
    calls' deadlines and runs the thread that decodes big frames.
    """

    transport: IStreamTransport

    MAX_LENGTH = MAX_FRAME

    def __init__(self, handlers: Mapping[Call, Handler], reactor: Any, *,
                 timeout: float = CALL_TIMEOUT, name: str = "control",
                 calls: Mapping[str, Call] = CALLS):
        for call in handlers:
            if not isinstance(call, Call) or calls.get(call.name) is not call:
                raise ValueError(f"{name}: a handler for {call!r}, which the table does "
                                 "not declare")
        self.calls = calls
        self.handlers = dict(handlers)
        self.reactor = reactor
        self.timeout = timeout
        self.name = name
        self._next = 0
        #: ident → (waiter, deadline, call): the calls waiting for an answer.
        self._pending: dict[int, tuple[defer.Deferred, float, Call]] = {}
        self._timer = None  # one timer, for the earliest deadline of all pending calls
        self.lost: defer.Deferred = defer.Deferred()  # fires when the channel closes
        self.connected = False

    # -- asking -------------------------------------------------------------------------

    def call(self, call: Call, timeout: float | None = None, **args: Any) -> defer.Deferred:
        """Ask the other side; fires with its answer, or fails (``BadCall``,
        ``ControlLost``, ``ControlTimeout``, ``RemoteError``)."""
        problem = self._outgoing(call, args, notice=False)
        if problem is not None:
            return defer.fail(BadCall(f"{self.name}: {problem}"))
        if not self.connected:
            return defer.fail(ControlLost(f"{self.name}: the channel is closed"))
        self._next += 1
        ident = self._next
        def cancelled(_: defer.Deferred) -> None:
            self._pending.pop(ident, None)
        waiter: defer.Deferred = defer.Deferred(cancelled)
        deadline = self.reactor.seconds() + (self.timeout if timeout is None else timeout)
        self._pending[ident] = (waiter, deadline, call)
        self._send({"id": ident, "call": call.name, "args": args})
        if self._timer is None or not self._timer.active():
            self._timer = self.reactor.callLater(deadline - self.reactor.seconds(),
                                                 self._expire)
        elif deadline < self._timer.getTime():
            self._timer.reset(deadline - self.reactor.seconds())
        return waiter

    def notify(self, call: Call, **args: Any) -> None:
        """Tell the other side; nothing comes back (a closed channel drops it).  Raises
        ``BadCall`` for a notice or arguments the table does not declare."""
        problem = self._outgoing(call, args, notice=True)
        if problem is not None:
            raise BadCall(f"{self.name}: {problem}")
        if self.connected:
            self._send({"notice": call.name, "args": args})

    def _outgoing(self, call: Call, args: Mapping[str, Any], notice: bool) -> str | None:
        if self.calls.get(call.name) is not call:
            return f"no such call: {call.name!r}"
        if call.notice != notice:
            return _wrong_kind(call)
        return call.problem(args)

    def _expire(self) -> None:
        """Fail the calls whose deadline passed; wait again for the next deadline.  One
        timer for all calls: a call costs no timer of its own (they are frequent, and
        almost all are answered within a millisecond)."""
        self._timer = None
        now = self.reactor.seconds()
        due = [ident for ident, (_, deadline, _) in self._pending.items() if deadline <= now]
        for ident in due:
            waiter, _, call = self._pending.pop(ident)
            waiter.errback(ControlTimeout(f"{self.name}: no answer to {call.name} in time"))
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
            waiter, _, call = pending
            if "error" in message:
                error = BadCall if message.get("bad") else RemoteError
                waiter.errback(error(str(message["error"])))
                return
            result = message.get("result")
            problem = call.answer_problem(result)
            if problem is None:
                waiter.callback(result)
            else:
                waiter.errback(BadCall(f"{self.name}: {problem}"))

    def _run(self, method: Any, args: Any, notice: bool) -> Any:
        """The handler's result (a value or a Deferred); raises what it raises, and
        ``BadCall`` for what the table does not declare or this side does not answer."""
        call = self.calls.get(method) if isinstance(method, str) else None
        if call is None:
            raise BadCall(f"{self.name}: no such call: {method!r}")
        if call.notice != notice:
            raise BadCall(f"{self.name}: {_wrong_kind(call)}")
        if not isinstance(args, dict):
            raise BadCall(f"{self.name}: {call.name}: the arguments are not an object")
        problem = call.problem(args)
        if problem is not None:
            raise BadCall(f"{self.name}: {problem}")
        handler = self.handlers.get(call)
        if handler is None:
            raise BadCall(f"{self.name}: {call.name} is not answered on this side")
        return handler(**args)

    def _notice(self, method: Any, args: Any) -> None:
        def failed(failure: Failure) -> None:
            if failure.check(BadCall):
                log.error("{name}: dropping a notice: {why}", name=self.name,
                          why=failure.getErrorMessage())
                return
            log.failure("{name}: notice {notice} failed", failure, name=self.name,
                        notice=method)
        try:
            result = self._run(method, args, notice=True)
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
            bad = failure.check(BadCall) is not None
            if bad:
                log.error("{name}: refusing a call: {why}", name=self.name,
                          why=failure.getErrorMessage())
            elif not failure.check(RemoteError):
                log.failure("{name}: call {call} failed", failure, name=self.name,
                            call=message["call"])
            if self.connected:
                answer = {"id": ident, "error": failure.getErrorMessage()}
                if bad:
                    answer["bad"] = True
                self._send(answer)
        try:
            result = self._run(message["call"], message.get("args") or {}, notice=False)
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

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.connected = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        pending, self._pending = self._pending, {}
        for waiter, _, _ in pending.values():
            waiter.errback(ControlLost(f"{self.name}: the channel closed"))
        if not self.lost.called:
            self.lost.callback(None)


def _wrong_kind(call: Call) -> str:
    if call.notice:
        return f"{call.name} is a notice, not a call"
    return f"{call.name} is a call, not a notice"


#: Made once: ``json.dumps`` with any option builds a new encoder at every call.
_encode = json.JSONEncoder(separators=(",", ":")).encode
_decoder = json.JSONDecoder()


def _decode(frame: bytes) -> Any:
    try:
        return _decoder.decode(frame.decode("utf-8"))
    except ValueError:  # UnicodeDecodeError and JSONDecodeError alike
        return None


__all__ = ["BadCall", "CALLS", "CALL_TIMEOUT", "CERTIFICATES_RELOAD", "CONN_RECALL",
           "CONN_RELEASE",
           "CONN_TAKE", "Call", "ControlChannel", "ControlLost", "ControlTimeout",
           "LOGIN_FAILED", "LOGIN_REFUSAL", "LOGIN_SUCCEEDED", "MAX_FRAME", "METRICS", "PING",
           "RATE_GIVE", "RATE_TAKE", "READINESS", "RELOAD", "RELOAD_FAILED", "RemoteError",
           "STARTED", "STATUS", "table"]
