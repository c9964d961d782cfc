#!/usr/bin/env python3
"""How long a new client waits on a stopped worker (docs/workers.md, "Listening sockets").

Run on demand from the repository root (not a test)::

    python3 bench/stopped_worker.py [--workers 2] [--connections 10] [--rounds 3]

Starts ``twistd -n esmtpfa --workers N`` on loopback (a maildir relay: nothing is sent
anywhere).  First, how the workers share new connections while all run: ``--connections``
opened one after another, then as many at once, counted per worker from the log.  Then
it stops worker 2 with SIGSTOP as a stuck reactor would be, then in each round
opens ``--connections`` new connections at once and times each one's greeting (up to
60 s).  Prints every wait, how many took longer than a second, and the time until the
supervisor logged that it killed the stopped worker (which bounds the wait of the
clients that worker had accepted before it stopped).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)
sys.path.insert(0, os.path.dirname(BENCH))

from loadgen import (  # noqa: E402
    child_environment,
    free_port,
    stop,
    twistd_command,
    wait_for_port,
    write_providers,
)

from tests.support.rawsmtp import greeting_times  # noqa: E402

#: The longest a greeting is waited for.
PATIENCE = 60.0


def waits(port: int, count: int) -> list[float]:
    """Seconds each of ``count`` simultaneous new connections waited for its greeting
    (``PATIENCE`` when none came)."""
    return [PATIENCE if wait is None else wait
            for wait in greeting_times(port, count, PATIENCE)]


def served(log_path: str) -> dict[str, int]:
    """Connections each worker has taken so far, from its log lines."""
    with open(log_path) as f:
        slots = re.findall(r"\[worker (\d+) esmtpfa\.smtp#info\] \S+ connect from", f.read())
    return {slot: slots.count(slot) for slot in sorted(set(slots))}


def difference(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {slot: count - before.get(slot, 0) for slot, count in after.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--connections", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="esmtpfa-stopped-")
    port, metrics = free_port(), free_port()
    log_path = os.path.join(workdir, "relay.log")
    arguments = ["--plain", "--addr", "127.0.0.1", "--port", str(port),
                 "--allow-insecure-auth", "--config", write_providers(workdir),
                 "--maildir", os.path.join(workdir, "maildir"), "--hostname", "bench.test",
                 "--metrics-addr", "127.0.0.1", "--metrics-port", str(metrics),
                 "--workers", str(options.workers)]
    with open(log_path, "wb") as log:
        relay = subprocess.Popen(twistd_command(arguments), stdout=log,
                                 stderr=subprocess.STDOUT, env=child_environment())
    stopped = None
    try:
        wait_for_port(port, relay)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with open(log_path) as f:
                pids = dict(re.findall(r"worker (\d+) serving \(pid (\d+)\)", f.read()))
            if len(pids) == options.workers:
                break
            time.sleep(0.1)
        else:
            raise SystemExit("the workers did not start")
        before = served(log_path)
        for _ in range(options.connections):
            waits(port, 1)
        time.sleep(0.5)  # the log lines of the last ones
        middle = served(log_path)
        waits(port, options.connections)
        time.sleep(0.5)
        print(f"one after another, by worker: {difference(middle, before)}; "
              f"at once: {difference(served(log_path), middle)}")
        stopped = int(pids["2"])
        os.kill(stopped, signal.SIGSTOP)
        started = time.monotonic()
        print(f"worker 2 (pid {stopped}) stopped")
        for number in range(1, options.rounds + 1):
            found = waits(port, options.connections)
            slow = sum(1 for wait in found if wait > 1.0)
            print(f"round {number}: {slow} of {len(found)} waited over 1 s; waits: "
                  + " ".join(f"{wait:.2f}" for wait in sorted(found)))
        killed = None
        while killed is None and time.monotonic() - started < PATIENCE:
            with open(log_path) as f:
                killed = re.search(rf"pid {stopped}\) has not answered for [\d.]+ s",
                                   f.read())
            time.sleep(0.05)
        print(f"supervisor: {killed.group(0) if killed else 'did not kill it'}, "
              f"{time.monotonic() - started:.1f} s after the stop")
    finally:
        if stopped is not None:
            try:
                os.kill(stopped, signal.SIGKILL)
            except ProcessLookupError:
                pass
        stop(relay)


if __name__ == "__main__":
    main()
