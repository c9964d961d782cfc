"""How long an SMTP client may take, whatever it does with its bytes (issue 10, finding 3).

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

Every session of a listener keeps its due time in the listener's ``timeouts.Sweeper``:
a stage moves the deadline back and forth at every command, and in a reactor's timer
heap each move *sooner* would be a linear search.  In the sweeper it is a dict update,
and a deadline fires at most ``RESOLUTION`` late.
"""

from __future__ import annotations

import enum
from typing import Callable

from twisted.internet.interfaces import IReactorTime

from esmtpfa.timeouts import Sweeper

#: Seconds a client deadline may fire late: one sweep of all a listener's sessions.
RESOLUTION = 0.5


class Stage(enum.Enum):
    HANDSHAKE = "TLS handshake"
    IDLE = "idle"
    COMMAND = "command line"
    DATA = "message data"


def client_sweeper(clock: IReactorTime) -> Sweeper:
    """The sweeper one listener's ``ClientDeadline``s share."""
    return Sweeper(clock, ClientDeadline.fire, RESOLUTION)


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
        self._expired(self._stage)


__all__ = ["ClientDeadline", "RESOLUTION", "Stage", "client_sweeper"]
