#!/usr/bin/env python3
"""The drain of a file-spool backlog alone, for trees and settings measured in turns.

Run on demand from the repository root (Debian's postfix package for ``smtp-sink``;
``twistd`` and ``esmtpfa-queue`` on PATH, e.g. the venv's ``bin`` first)::

    python3 bench/spool_drain.py [--messages 20000] [--rounds 3] [--fsync-delay MS]
                                 [--variant NAME:TREE[:ARGUMENTS]]...

``bench/spool_backlog.py`` measures the target (the drain against the live rate, in
one run); this script answers a narrower question fast: does a change make the drain
faster?  The machine's speed moves by ±10% from one minute to the next, so the variants
take turns, round after round, and the medians are compared.

1. **Fill.** One spool is filled once, as ``spool_backlog.py`` fills it (every message
   due now, one identity, 2 KB), and copied afresh for every run.
2. **Drain.** Each variant in turn: ``twistd -n esmtpfa --delivery-mode spool`` on the
   copy, relaying to one smtp-sink, until the index is empty (polled read-only every
   0.2 s).  The rate counts from the relay's start.  Every message must be at the sink
   exactly once, else the script stops without figures.
3. **Report.** Per run: msg/s, the relay's CPU per message, and how it divides between
   the reactor's thread and the others (the spool's pool), from ``/proc``.  Then the
   median of each variant.

``--fsync-delay MS`` runs each relay under ``strace`` (Debian's package), which makes
every ``fsync`` and ``fdatasync`` of the relay return MS milliseconds late
(``--seccomp-bpf``: no other system call stops), as on a network disk (a cloud volume,
Ceph, NFS) where a commit's flush takes milliseconds, not the local disk's fraction of
one.

A variant is ``NAME:TREE[:ARGUMENTS]``: ``TREE`` is a directory holding an ``esmtpfa``
package (e.g. ``git archive HEAD esmtpfa | tar -x -C /tmp/head``), put first on the
relay's PYTHONPATH, or ``.`` for this repository; ``ARGUMENTS`` are more esmtpfa
arguments, e.g. ``--spool-concurrency 20``.  Without ``--variant`` the repository alone
is measured.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from loadgen import (  # noqa: E402
    PROJECT,
    CpuMeter,
    SinkDump,
    child_environment,
    esmtpfa_arguments,
    free_port,
    slow_fsync,
    start_sink,
    stop,
    stop_relay,
    traced_child,
    twistd_command,
)
from spool_backlog import fill, queue_tool, queued  # noqa: E402

#: The longest a drain may take before the script gives up (seconds).
DRAIN_TIMEOUT = 600.0


def variant(text: str) -> tuple[str, str, list[str]]:
    name, _, rest = text.partition(":")
    tree, _, arguments = rest.partition(":")
    if not name or not tree:
        raise argparse.ArgumentTypeError(f"not NAME:TREE[:ARGUMENTS]: {text!r}")
    tree = PROJECT if tree == "." else os.path.abspath(tree)
    if not os.path.isdir(os.path.join(tree, "esmtpfa")):
        raise argparse.ArgumentTypeError(f"{tree} holds no esmtpfa package")
    return name, tree, arguments.split()


def thread_cpu(pid: int) -> tuple[float, float]:
    """CPU seconds of the process's main thread, and of all its other threads."""
    ticks = os.sysconf("SC_CLK_TCK")
    main = others = 0.0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        seconds = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
        if int(tid) == pid:
            main += seconds
        else:
            others += seconds
    return main, others


def drain(workdir: str, template: str, ids: list[str], tree: str,
          arguments: list[str], fsync_delay_ms: float = 0.0) -> dict:
    spool = os.path.join(workdir, "spool")
    shutil.rmtree(spool, ignore_errors=True)
    shutil.copytree(template, spool)
    dump = SinkDump(os.path.join(workdir, f"sink-{time.monotonic_ns()}.dump"))
    sink_port = free_port()
    sink = start_sink(sink_port, dump=dump.path)
    relay = None
    try:
        environment = child_environment()
        if tree != PROJECT:
            environment["PYTHONPATH"] = tree + os.pathsep + environment["PYTHONPATH"]
        meter = CpuMeter("drain")
        command = twistd_command(
            esmtpfa_arguments(free_port(), sink_port, workdir, "info")
            + ["--delivery-mode", "spool", "--spool-url", f"file://{spool}", *arguments])
        if fsync_delay_ms:
            command = slow_fsync(command, fsync_delay_ms)
        started = time.monotonic()
        with open(os.path.join(workdir, "drain.out"), "wb") as out:
            relay = subprocess.Popen(command, env=environment, cwd=workdir, stdout=out,
                                     stderr=subprocess.STDOUT, preexec_fn=meter.preexec)
        meter.adopt(relay.pid)
        relay_pid = traced_child(relay.pid) if fsync_delay_ms else relay.pid
        while queued(spool) != 0:
            if relay.poll() is not None:
                raise SystemExit("the draining relay exited; see drain.out")
            if time.monotonic() - started > DRAIN_TIMEOUT:
                raise SystemExit(f"not drained in {DRAIN_TIMEOUT:.0f} s")
            time.sleep(0.2)
        seconds = time.monotonic() - started
        cpu = meter.seconds()
        main, others = thread_cpu(relay_pid)
        missing = dump.wait_for(ids, 60)
        twice = sum(1 for i in ids if dump.counts.get(i, 0) > 1)
        if missing or twice:
            raise SystemExit(f"{len(missing)} messages missing at the sink, {twice} "
                             f"delivered more than once")
        count = len(ids)
        return {"msg_per_s": count / seconds, "cpu_us": cpu / count * 1e6,
                "main_us": main / count * 1e6, "others_us": others / count * 1e6}
    finally:
        stop_relay(relay, grace=30)
        stop(sink)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fsync-delay", type=float, default=0.0, metavar="MS",
                        help="every fsync of the relay MS milliseconds late (strace)")
    parser.add_argument("--variant", type=variant, action="append", dest="variants")
    args = parser.parse_args()
    variants = args.variants or [("tree", PROJECT, [])]
    print(f"command: python3 {os.path.relpath(sys.argv[0], PROJECT)} "
          f"{' '.join(sys.argv[1:])}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}; load average "
          f"before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    workdir = tempfile.mkdtemp(prefix="esmtpfa-drain-")
    os.chmod(workdir, 0o777)  # smtp-sink (nobody) appends its dump here
    results: dict[str, list[dict]] = {name: [] for name, _, _ in variants}
    try:
        template = os.path.join(workdir, "template")
        queue_tool(template, ["list"], os.path.join(workdir, "empty.txt"))  # creates it
        ids = fill(template, args.messages, 2048, 1)
        for round_ in range(1, args.rounds + 1):
            for name, tree, arguments in variants:
                r = drain(workdir, template, ids, tree, arguments, args.fsync_delay)
                results[name].append(r)
                print(f"round {round_} {name}: {r['msg_per_s']:,.0f} msg/s, "
                      f"{r['cpu_us']:.0f} µs CPU/msg (reactor's thread "
                      f"{r['main_us']:.0f}, other threads {r['others_us']:.0f})",
                      flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print("\n| variant | drain msg/s, median (runs) | relay CPU µs/msg, median | "
          "reactor's thread / other threads, µs/msg |\n|---|---|---|---|")
    for name, runs in results.items():
        rates = ", ".join(f"{r['msg_per_s']:,.0f}" for r in runs)
        print(f"| {name} | {statistics.median(r['msg_per_s'] for r in runs):,.0f} "
              f"({rates}) | {statistics.median(r['cpu_us'] for r in runs):.0f} | "
              f"{statistics.median(r['main_us'] for r in runs):.0f} / "
              f"{statistics.median(r['others_us'] for r in runs):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
