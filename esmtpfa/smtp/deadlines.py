"""How long an SMTP client may take, whatever it does with its bytes (docs/smtp-limits.md).

A timer that every received byte pushes back never fires for a client that sends one
byte every few seconds: it holds its connection slot, and in DATA an upstream session,
for ever.  So the bytes a client sends never restart its clock.  What restarts it is
*progress in the protocol*, and each stage has its own allowance:

``handshake``
    A TLS handshake (implicit TLS, or after ``STARTTLS``) must finish within
    ``tls_handshake_timeout``.
``idle``
    Between commands the client may think for ``idle_timeout`` (RFC 5321 §4.5.3.2.7
    asks a server to wait 5 minutes for the next command).
``command``
    Once the first byte of a command line has arrived, the whole line must arrive within
    ``command_timeout``: a client that has started a command has nothing left to think
    about.
``data``
    Message content (``DATA``, or one ``BDAT`` chunk) must keep an average rate: it may
    take ``command_timeout`` plus one second per ``min_data_rate`` octets received, and no
    read may be further than ``idle_timeout`` from the previous one.  This is Postfix's
    ``smtpd_min_data_rate`` idea, kept as an average so that a pause in a fast transfer
    does not cut it.  An upstream session held open for a trickling client is also bounded
    by the relay's own per-message deadlines (``docs/delivery-guarantee.md``).

While the client waits for *our* answer (a login being checked, a recipient judged by
the upstream) nothing runs: that time is ours, and the relay bounds it separately.

Beside the stage runs one more deadline, about the other direction: ``WriteStall``.  A
client that sends commands and never reads their replies fills the kernel's send buffer
of its socket and then our transport's queue; it is aborted when that output has not
moved for ``write_stall_timeout``, whatever its stage (``docs/smtp-limits.md``, "Clients
that do not read").  A client that reads keeps its output moving and never meets it.

Every session of a listener keeps its due time in the listener's ``timeouts.Sweeper``:
a stage moves the deadline back and forth at every command, and in a reactor's timer
heap each move *sooner* would be a linear search.  In the sweeper it is a dict update,
and a deadline fires at most ``RESOLUTION`` late.
"""

from __future__ import annotations

import enum
from typing import Callable

from twisted.internet.interfaces import IReactorTime

from esmtpfa.common.timeouts import Sweeper

#: Seconds a client deadline may fire late: one sweep of all a listener's sessions.
RESOLUTION = 0.5


class Stage(enum.Enum):
    HANDSHAKE = "TLS handshake"
    IDLE = "idle"
    COMMAND = "command line"
    DATA = "message data"


def _fire(owner: ClientDeadline | WriteStall) -> None:
    owner.fire()


def client_sweeper(clock: IReactorTime) -> Sweeper:
    """The sweeper one listener's ``ClientDeadline``s and ``WriteStall``s share."""
    return Sweeper(clock, _fire, RESOLUTION)


class ClientDeadline:
    """The one deadline of an SMTP session, following its stage.

    ``expired(stage)`` is called once when the stage's allowance runs out.
    """

    __slots__ = ("_clock", "_sweeper", "_stage", "_armed", "_settings", "_started",
                 "_received", "_expired")

    def __init__(self, sweeper: Sweeper, clock: IReactorTime, settings,
                 expired: Callable[[Stage], None]):
        self._clock = clock
        self._sweeper = sweeper
        self._settings = settings
        self._expired = expired
        self._stage: Stage | None = None
        self._armed = False  # whether the sweeper holds our due time
        self._started = 0.0
        self._received = 0

    @property
    def stage(self) -> Stage | None:
        """The running stage; None while the client waits for us, or after ``stop``."""
        return self._stage if self._armed else None

    def handshake(self) -> None:
        self._enter(Stage.HANDSHAKE, self._settings.tls_handshake_timeout)

    def idle(self) -> None:
        self._enter(Stage.IDLE, self._settings.idle_timeout)

    def command(self) -> None:
        """A command line has begun (its first byte arrived, or it was pipelined)."""
        self._enter(Stage.COMMAND, self._settings.command_timeout)

    def data(self) -> None:
        """Message content begins: ``DATA`` was accepted, or a ``BDAT`` chunk announced."""
        self._started = self._clock.seconds()
        self._received = 0
        self._enter(Stage.DATA, self._settings.command_timeout)

    def received(self, octets: int) -> None:
        """Bytes arrived.  Only in the data stage do they earn time, at the minimum rate;
        a partial command line or handshake earns nothing."""
        if self._stage is Stage.DATA and self._armed:
            self._received += octets
            now = self._clock.seconds()
            earned = (self._started + self._settings.command_timeout
                      + self._received / self._settings.min_data_rate)
            self._sweeper.set(self, max(0.0, min(earned - now, self._settings.idle_timeout)))

    def waiting(self) -> None:
        """The client waits for our answer: its clock stops until a stage is entered."""
        self._armed = False
        self._sweeper.clear(self)

    stop = waiting  # the connection is gone

    def _enter(self, stage: Stage, seconds: float) -> None:
        self._stage = stage
        self._armed = True
        self._sweeper.set(self, seconds)

    def fire(self) -> None:
        """Called by the sweeper, once, when the stage's allowance has run out."""
        self._armed = False
        if self._stage is not None:  # armed only by ``_enter``, which sets a stage
            self._expired(self._stage)


class WriteStall:
    """Ends a connection whose queued output has not moved for ``seconds``.

    ``waiting_since()`` says when the output waiting for the client last moved (or began
    to wait), or None when nothing waits (``esmtpfa.common.transport.output_waiting_since``).
    ``check()`` is called after each write; it arms the deadline when output waits.
    When the deadline comes, output that moved meanwhile earns another ``seconds`` from
    its last move, output that drained disarms it, and output that has not moved calls
    ``stalled()``, once.  Nothing runs per byte: a write that leaves at once (the usual
    case) costs one call to ``waiting_since``.
    """

    __slots__ = ("_clock", "_seconds", "_stalled", "_sweeper", "_waiting_since")

    def __init__(self, sweeper: Sweeper, clock: IReactorTime, seconds: float,
                 waiting_since: Callable[[], float | None], stalled: Callable[[], None]):
        self._clock = clock
        self._sweeper = sweeper
        self._seconds = seconds
        self._waiting_since = waiting_since
        self._stalled = stalled

    def check(self) -> None:
        """Output was written: arm the deadline if some of it waits."""
        if self._seconds <= 0 or self._sweeper.armed(self):
            return
        since = self._waiting_since()
        if since is not None:
            self._sweeper.set(self, max(0.0, since + self._seconds - self._clock.seconds()))

    def stop(self) -> None:
        self._sweeper.clear(self)

    def fire(self) -> None:
        """Called by the sweeper when the allowance since the last check ran out."""
        since = self._waiting_since()
        if since is None:
            return  # the client read everything: disarmed until output waits again
        left = since + self._seconds - self._clock.seconds()
        if left > 0:  # it moved meanwhile: its allowance counts from the last move
            self._sweeper.set(self, left)
            return
        self._stalled()


__all__ = ["RESOLUTION", "ClientDeadline", "Stage", "WriteStall", "client_sweeper"]
