"""Free loopback ports for processes the tests start (slapd, smtp-sink, twistd).

A port is chosen *outside* the kernel's ephemeral range. A port handed to another process
is free only until that process binds it, and some tests stop a server and start it
again on the same port. Inside the ephemeral range, any outgoing connection made in
between (the relay reconnecting to the stopped server, a self-connect included) may be
given that very port as its local end, and the restart then fails with EADDRINUSE for as
long as that connection lives. Ports the kernel never hands out by itself cannot be
taken that way. A port is also never handed out twice in one test run, so a process a
test leaves behind cannot answer for the next test's server.
"""

import functools
import random
import socket

_EPHEMERAL_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"
_LOWEST = 10000  # below this live the well-known services a machine may run
_handed_out: set[int] = set()


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for automatically chosen local ports (inclusive)."""
    try:
        with open(_EPHEMERAL_RANGE_FILE) as f:
            low, high = (int(field) for field in f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


@functools.lru_cache(maxsize=1)
def _candidates() -> tuple[int, ...]:
    low, high = ephemeral_range()
    return tuple(port for port in range(_LOWEST, 65536) if not low <= port <= high)


def _bindable(host: str, port: int) -> bool:
    # Without SO_REUSEADDR, so a port still in TIME_WAIT counts as taken.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port on ``host`` that is free now, outside the ephemeral range, not handed out yet."""
    candidates = _candidates()
    if not candidates:
        raise OSError(f"the ephemeral range {ephemeral_range()} leaves no port to choose")
    if len(_handed_out) > len(candidates) - 1000:  # a very long run: start over
        _handed_out.clear()
    tries = 0
    while tries < 200:
        port = random.choice(candidates)
        if port in _handed_out:
            continue
        tries += 1
        if _bindable(host, port):
            _handed_out.add(port)
            return port
    raise OSError(f"no free port on {host} outside the ephemeral range "
                  f"{ephemeral_range()} after 200 tries")
