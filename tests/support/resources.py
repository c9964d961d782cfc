"""The ``Resources`` bundle for tests (esmtpfa.common.resources): the trial reactor for
the network, a ``Clock`` (or the reactor) for time, and one small thread pool shared by
the whole run, started now and stopped when the reactor stops."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.python.threadpool import ThreadPool

from esmtpfa.common.resources import Resources

_threads: ThreadPool | None = None


def test_threads() -> ThreadPool:
    global _threads
    if _threads is None:
        _threads = ThreadPool(minthreads=0, maxthreads=4, name="esmtpfa-test-blocking")
        _threads.start()
        reactor.addSystemEventTrigger("during", "shutdown", _threads.stop)
    return _threads


def resources(clock: Any = None, **changes: Any) -> Resources:
    """A fresh bundle (its own JWKS cache) over the trial reactor; ``clock`` for time."""
    threads = changes.pop("threads", None) or test_threads()
    return Resources.build(reactor, clock=clock, threads=threads, **changes)
