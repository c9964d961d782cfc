"""``probe()``: is this component's back end there, and answering as configured?

``--check-connect`` (``esmtpfa.runtime.checkconfig``) asks every component that has a
back end (each provider, each upstream, the shared state, the spool) the same
question and prints one line per answer.  Each component knows how to reach its own
back end the way real traffic does, so the check needs to know nothing of their
types, private attributes or connection code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface


@dataclass(frozen=True)
class ProbeResult:
    """One answer: ``ok``, and ``detail``, one line without a secret (no credential,
    no password in a URL): what was reached, or what failed."""

    ok: bool
    detail: str

    @classmethod
    def passed(cls, detail: str) -> "ProbeResult":
        return cls(True, detail)

    @classmethod
    def failed(cls, detail: str) -> "ProbeResult":
        return cls(False, detail)

    @classmethod
    def from_failure(cls, failure: Failure) -> "ProbeResult | Failure":
        """A failed result from an error whose text is written to hold no secret (the
        components' own errors are); its type's name when it has no text."""
        if failure.check(CancelledError):
            return failure  # the caller's deadline cancelled it: the caller says so
        error = failure.value
        return cls(False, str(error) or type(error).__name__)


class IProbe(Interface):
    """A component with a back end it can be asked to reach."""

    probe_subject = Attribute(
        "What is probed, in a few words and without a secret: "
        "\"upstream mx.example:25\", \"provider 'corp' (ldap)\"")

    def probe() -> Deferred:
        """Reach the back end once, as a real request would; fires with a
        ``ProbeResult`` (never fails: a failure is a result with ``ok`` false)."""


class IProbeGroup(Interface):
    """A component whose back ends are several (a relay with failover upstreams)."""

    def probes() -> list:
        """The ``IProbe`` providers of its parts, in the order they are tried."""


def probes_of(component: Any) -> list:
    """The probes ``component`` offers: itself, its parts, or none."""
    if IProbeGroup.providedBy(component):
        return list(component.probes())
    if IProbe.providedBy(component):
        return [component]
    return []


__all__ = ["IProbe", "IProbeGroup", "ProbeResult", "probes_of"]
