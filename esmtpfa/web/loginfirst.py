"""The submission listener logs a client in from its request head, before the body.

twisted.web reads a whole body before any resource runs, and spools one over 100 KB to
a temporary file: an unauthenticated client could make the relay read and store tens
of megabytes per connection before hearing 401.
``SubmissionChannel`` instead, as soon as the head of a request with a body is in:

1. pauses reading; what already arrived with the head is held (at most ``HOLD_LIMIT``);
2. logs in with ``HeaderLogin`` (``web/login.py``): the same Portal, throttle and
   provider selection as SMTP AUTH;
3. refused: answers the JSON error (401, 429, 503) and ends the connection without
   reading the body (``GuardedChannel.refuse``); nothing of it was stored;
4. logged in: a declared length over the limit gets 413; otherwise the body is admitted
   (``100 Continue`` if asked for), counted against the limit as it arrives, kept in
   memory up to ``SPOOL_IN_MEMORY`` and past that in an anonymous temporary file.

The login then belongs to the request: the resource takes it over (``take_login``), or
the request logs it out when it ends without reaching the resource (413, timeout, lost
connection).  A request without a body has nothing to protect: the resource logs it in.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure

from esmtpfa.common.logs import logger
from esmtpfa.web.channel import DRAIN_REFUSED, BoundedRequest, GuardedChannel, Phase
from esmtpfa.web.errors import HTTPError
from esmtpfa.web.login import Login, request_context

log = logger("esmtpfa.web")

#: While the login is pending, reading is paused; what arrived before the pause took
#: effect is held, and a client that gets more than this past the pause is cut off.
HOLD_LIMIT = 1024 * 1024
#: After a 413 to a logged-in client, this much of its body is dropped before the
#: abort, so that an ordinary client sees the answer rather than a reset.
DRAIN_AUTHENTICATED = 4 * 1024 * 1024
#: A logged-in client's body is kept in memory up to this size, then spooled to an
#: anonymous temporary file (bounded by the site's body limit).
SPOOL_IN_MEMORY = 1024 * 1024


class SubmissionRequest(BoundedRequest):
    """A request that carries the login done before its body."""

    spool_past = SPOOL_IN_MEMORY
    identity: str | None = None  # once logged in, for log lines
    _login: Login | None = None

    def __init__(self, channel: Any, *args: Any, **kwargs: Any):
        super().__init__(channel, *args, **kwargs)
        self.connection_id: str = channel.connection_id

    def logged_in(self, login: Login) -> None:
        self._login = login
        self.identity = login.identity
        self.notifyFinish().addBoth(lambda _: self._log_out())

    def take_login(self) -> Login | None:
        """The login done before the body; the caller now owns it (and logs it out)."""
        login, self._login = self._login, None
        return login

    def _log_out(self) -> None:
        login = self.take_login()
        if login is not None:
            login.logout()


class SubmissionChannel(GuardedChannel):
    """Logs the client in from the request head before reading the body."""

    over_limit_drain = DRAIN_AUTHENTICATED
    _held_size = 0
    _login_in_flight: defer.Deferred | None = None

    def connectionMade(self) -> None:
        self._held: list[bytes] = []
        super().connectionMade()

    @property
    def identity(self) -> str | None:
        return self.requests[-1].identity if self.requests else None

    def head_complete(self) -> None:
        if self.length == 0:  # no body to protect: the resource logs the client in
            self.admit_body()
            return
        request = self.requests[-1]
        self._enter(Phase.LOGIN)
        self._held, self._held_size = [], 0
        self.transport.pauseProducing()
        context = request_context(request, self.connection_id)
        d = self._login_in_flight = defer.ensureDeferred(self.site.header_login.login(
            request.getHeader(b"authorization"), context))
        d.addBoth(self._settled)
        d.addCallbacks(self._logged_in, self._login_refused,
                       callbackArgs=(request,), errbackArgs=(request,))
        d.addErrback(self._failed)

    def _settled(self, result: Any) -> Any:
        self._login_in_flight = None
        return result

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        in_flight = self._login_in_flight
        super().connectionLost(reason)
        if in_flight is not None:
            # Nobody is left to answer: stop asking the provider, and stop any delay
            # the login throttle holds for this attempt (docs/login-throttle.md).
            in_flight.cancel()

    def rawDataReceived(self, data: bytes) -> None:
        if self._phase is Phase.LOGIN:
            self._held.append(data)
            self._held_size += len(data)
            self.transport.pauseProducing()  # the transport may have been resumed
            if self._held_size > HOLD_LIMIT:
                self.abort("sent too much while its login was pending")
            return
        super().rawDataReceived(data)

    def _logged_in(self, login: Login, request: SubmissionRequest) -> None:
        if self._phase is not Phase.LOGIN:  # the connection ended meanwhile
            login.logout()
            return
        request.logged_in(login)
        self.logged_in = True
        if self.length is not None and self.length > self.site.max_body:
            self.refuse(self.site.too_large(), drain=DRAIN_AUTHENTICATED)
            return
        held = self._release()
        self.admit_body()
        self.transport.resumeProducing()
        if held:
            self.rawDataReceived(held)

    def _login_refused(self, failure: Failure, request: SubmissionRequest) -> None:
        if failure.check(defer.CancelledError) and self._phase is Phase.CLOSED:
            return  # the client went away while it was being logged in
        error = failure.value
        if not isinstance(error, HTTPError):
            log.failure("{connection_id} HTTP login failed", failure,
                        connection_id=self.connection_id)
            error = HTTPError(500, "internal error")
        if self._phase is Phase.LOGIN:
            self.refuse(error, drain=DRAIN_REFUSED)

    def _failed(self, failure: Failure) -> None:
        log.failure("{connection_id} HTTP request failed after its login", failure,
                    connection_id=self.connection_id)
        self.abort("internal error")

    def _release(self) -> bytes:
        held = b"".join(self._held)
        self._held, self._held_size = [], 0
        return held

    def _discard_unprocessed(self) -> int:
        return len(self._release()) + super()._discard_unprocessed()


__all__ = ["HOLD_LIMIT", "SPOOL_IN_MEMORY", "SubmissionChannel", "SubmissionRequest"]
