"""A real HAProxy (Debian ``haproxy``) in TCP mode in front of esmtpfa, for PROXY tests.

Each route is one frontend on a free loopback port and one backend that forwards to a
relay port with ``send-proxy`` (v1) or ``send-proxy-v2``: a load balancer as operators
put one in front of esmtpfa.  The configuration is private to the test (its directory),
HAProxy runs in the foreground as the test's child, and ``stop`` ends it by its PID.
"""

from __future__ import annotations

import os

from twisted.internet import defer, reactor

from tests.support.ports import free_port
from tests.support.processes import Collector, require, terminate, until_serving

#: Where the readiness probe connects from.
PROBE_SOURCE = "127.0.0.200"

CONFIG = """\
global
    maxconn 200

defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
"""

ROUTE = """
frontend {name}
    bind 127.0.0.1:{port}
    default_backend {name}_relay

backend {name}_relay
    server relay 127.0.0.1:{target} {send}
"""


class HAProxy:
    """``routes``: name → (esmtpfa port, ``"send-proxy"`` or ``"send-proxy-v2"``);
    ``ports[name]`` is where clients connect."""

    def __init__(self, directory: str, routes: dict[str, tuple[int, str]]):
        os.makedirs(directory, exist_ok=True)
        self.config_path = os.path.join(directory, "haproxy.cfg")
        self.ports = {name: free_port() for name in routes}
        text = CONFIG + "".join(
            ROUTE.format(name=name, port=self.ports[name], target=target, send=send)
            for name, (target, send) in routes.items())
        with open(self.config_path, "w") as f:
            f.write(text)
        self._collector = Collector()
        self._process = None

    @property
    def output(self) -> str:
        return self._collector.text

    @defer.inlineCallbacks
    def start(self, timeout: float = 15.0):
        """Start it (``-db``: in the foreground) and wait until every frontend accepts."""
        binary = require("haproxy")
        self._process = reactor.spawnProcess(
            self._collector, binary, [binary, "-db", "-f", self.config_path],
            env={"PATH": os.environ.get("PATH", "")})
        deadline = reactor.seconds() + timeout
        for port in self.ports.values():
            # from an address of its own, which no test's limit counts
            yield until_serving("haproxy", port, self._collector, interval=0.1,
                                timeout=max(deadline - reactor.seconds(), 0.0),
                                source=PROBE_SOURCE)

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    @defer.inlineCallbacks
    def stop(self):
        if self._process is None or self._collector.ended.called:
            return
        yield terminate(self._process, self._collector.ended, grace=10)
