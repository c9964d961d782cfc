"""SIGTERM as a normal stop, for the services that twistd runs (one process or a
supervisor of workers).

SIGTERM is how every rollout and node drain stops the relay: a normal stop, so after
the drain the process exits 0 (Twisted's own handler would make twistd kill itself with
the signal again).  The handler is installed once the reactor runs, after the
reactor's handlers; the previous one comes back at stop.  (A service started inside a
running reactor, as tests do, is not yet running then: the host's handler stays.)
"""

from __future__ import annotations

import signal
import threading
from typing import Any


class SigtermStop:
    """Mixed into a ``Service`` with ``reactor``: call ``install_sigterm`` from
    ``startService`` and chain ``restore_sigterm`` at the end of ``stopService``.

    ``stopping_already`` says whether a stop is under way (a second SIGTERM changes
    nothing); ``sigterm_received`` logs what the stop will do."""

    _previous_sigterm: Any = None
    #: From the service this is mixed into (``RelayService``, ``Supervisor``).
    reactor: Any
    running: int

    def stopping_already(self) -> bool:
        raise NotImplementedError

    def sigterm_received(self) -> None:
        raise NotImplementedError

    def install_sigterm(self) -> None:
        self.reactor.callWhenRunning(self._install_sigterm)

    def _install_sigterm(self) -> None:
        if self.running and threading.current_thread() is threading.main_thread():
            self._previous_sigterm = signal.signal(signal.SIGTERM, self._sigterm)

    def _sigterm(self, number, frame) -> None:
        if self.stopping_already():
            return  # already on its way out
        self.sigterm_received()
        self.reactor.callFromThread(self.reactor.stop)

    def restore_sigterm(self, result: Any) -> Any:
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None
        return result


__all__ = ["SigtermStop"]
