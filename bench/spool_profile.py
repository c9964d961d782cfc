#!/usr/bin/env python3
"""Where a spooling relay's CPU goes: one esmtpfa under load, profiled with py-spy.

Run on demand from the repository root (py-spy installed: ``pip install py-spy``)::

    python3 bench/spool_profile.py [--delivery-mode spool] [--spool-url URL]
                                   [--connections 20] [--messages 4000]
                                   [--mode sequential] [--out DIR]

Starts smtp-sink and ``twistd -n esmtpfa`` (``bench/loadgen.py``'s helpers, the same
arguments as ``bench/compare.py``'s targets; the file spool in a fresh directory unless
``--spool-url``), warms it up, then records it with ``py-spy record`` (all threads, raw
collapsed stacks, idle excluded) while the generator sends ``--messages`` and until the
sink has them all.  Prints the relay's CPU per message (its process, /proc) and the
top own-time functions and top inclusive frames from the samples; writes the collapsed
stacks to ``DIR/profile.txt``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from loadgen import (  # noqa: E402
    CLK_TCK,
    SinkDump,
    child_environment,
    esmtpfa_arguments,
    free_port,
    load,
    start_sink,
    stop,
    tree_cpu_seconds,
    twistd_command,
    wait_for_port,
    wait_for_spool,
)


def attach(pid: int, py_spy: str, profile: str, out: str, args
           ) -> tuple[subprocess.Popen, subprocess.Popen | None]:
    """py-spy recording ``pid`` into ``profile`` (all threads, raw stacks), and with
    ``--strace`` strace counting its system calls into ``out/strace.txt``."""
    spy = subprocess.Popen([py_spy, "record", "-p", str(pid), "--threads", "--nonblocking",
                            "-r", str(args.rate), "-f", "raw", "-o", profile],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tracer = None
    if args.strace:
        tracer = subprocess.Popen(["strace", "-c", "-f", "-p", str(pid),
                                   "-o", os.path.join(out, "strace.txt")],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return spy, tracer


def thread_times(pid: int) -> dict[str, tuple[float, float]]:
    """(user, system) CPU seconds of each live thread of ``pid``, by thread name."""
    times: dict[str, tuple[float, float]] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = f.read().strip()
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user, system = int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK
        key = name if name not in times else f"{name}/{tid}"
        times[key] = (user, system)
    return times


def summarize(path: str, top: int) -> None:
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            n = int(count)
            total += n
            frames = stack.split(";")
            threads[frames[0]] += n
            own[frames[-1]] += n
            for frame in set(frames[1:]):
                inclusive[frame] += n
    print(f"samples: {total}")
    print("by thread:")
    for name, n in threads.most_common(8):
        print(f"  {100 * n / total:5.1f}%  {name}")
    print("own time:")
    for name, n in own.most_common(top):
        print(f"  {100 * n / total:5.1f}%  {name}")
    print("inclusive:")
    for name, n in inclusive.most_common(top * 2):
        print(f"  {100 * n / total:5.1f}%  {name}")


def drain(args, workdir, out, relay, port, sink_port, dump, py_spy) -> int:
    """The backlog variant: stop the relay started for the load, fill its spool, start
    it again on the full spool and profile it until the spool is empty."""
    from spool_backlog import fill, queued
    wait_for_port(port, relay, timeout=60)  # the spool is created
    stop(relay, grace=20)
    spool = os.path.join(workdir, "spool")
    ids = fill(spool, args.backlog, args.size, args.identities)
    arguments = esmtpfa_arguments(port, sink_port, workdir, "info")
    arguments += ["--delivery-mode", "spool", "--spool-url", f"file://{spool}",
                  *args.relay_args.split()]
    with open(os.path.join(workdir, "relay.out"), "ab") as output:
        relay = subprocess.Popen(twistd_command(arguments), env=child_environment(),
                                 cwd=workdir, stdout=output, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, relay, timeout=60)
        time.sleep(2.0)
        profile = os.path.join(out, "profile.txt")
        spy, tracer = attach(relay.pid, py_spy, profile, out, args)
        time.sleep(1.0)
        left, before = queued(spool), tree_cpu_seconds(relay.pid)
        threads_before, started = thread_times(relay.pid), time.monotonic()
        while True:
            now = queued(spool)
            if now == 0 or time.monotonic() - started > 20:
                break
            time.sleep(0.5)
        seconds = time.monotonic() - started
        cpu = tree_cpu_seconds(relay.pid) - before
        threads_after = thread_times(relay.pid)
        n = max(1, left - now)
        spy.send_signal(2)
        spy.wait(timeout=60)
        if tracer is not None:
            tracer.send_signal(2)
            tracer.wait(timeout=60)
        print(f"drain: {n} messages in {seconds:.1f} s = {n / seconds:.0f} msg/s; relay "
              f"CPU {cpu / n * 1e6:.0f} µs/msg (py-spy{' and strace' if tracer else ''} "
              f"overhead included)")
        print("CPU by thread, µs per message (user + system):")
        for name, (user, system) in sorted(threads_after.items()):
            u0, s0 = threads_before.get(name, (0.0, 0.0))
            print(f"  {name:32} {(user - u0) / n * 1e6:7.0f} + {(system - s0) / n * 1e6:7.0f}")
        summarize(profile, args.top)
        if tracer is not None:
            print(f"system calls during those {n} messages: {out}/strace.txt")
    finally:
        stop(relay, grace=20)
    del ids
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--delivery-mode", default="spool")
    parser.add_argument("--spool-url")
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--messages", type=int, default=4000)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--mode", default="sequential")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out")
    parser.add_argument("--backlog", type=int, default=0,
                        help="instead of the load: fill the file spool with this many "
                             "messages (bench/spool_backlog.py's fill) and profile the "
                             "drain")
    parser.add_argument("--identities", type=int, default=1, help="of the backlog")
    parser.add_argument("--relay-args", default="",
                        help="more esmtpfa arguments, e.g. '--spool-concurrency 20'")
    parser.add_argument("--strace", action="store_true",
                        help="also count the relay's system calls (strace -c -f) for "
                             "the measured part (slows it down; counts only)")
    args = parser.parse_args()
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        raise SystemExit("py-spy is missing: pip install py-spy")
    workdir = tempfile.mkdtemp(prefix="esmtpfa-spool-profile-")
    os.chmod(workdir, 0o777)
    out = args.out or workdir
    sink_port, port = free_port(), free_port()
    dump = SinkDump(os.path.join(workdir, "sink.dump"))
    sink = relay = None
    try:
        sink = start_sink(sink_port, dump=dump.path)
        arguments = esmtpfa_arguments(port, sink_port, workdir, "info")
        arguments += ["--max-connections", "1000", "--max-connections-per-ip", "1000",
                      "--delivery-mode", args.delivery_mode, *args.relay_args.split()]
        if args.delivery_mode != "passthrough":
            arguments += ["--spool-url", args.spool_url or f"file://{workdir}/spool"]
        with open(os.path.join(workdir, "relay.out"), "wb") as output:
            relay = subprocess.Popen(twistd_command(arguments), env=child_environment(),
                                     cwd=workdir, stdout=output, stderr=subprocess.STDOUT)
        if args.backlog:
            return drain(args, workdir, out, relay, port, sink_port, dump, py_spy)
        wait_for_port(port, relay, timeout=60)
        if args.delivery_mode != "passthrough":
            wait_for_spool(os.path.join(workdir, "relay.out"), relay)
        warm = asyncio.run(load(port, args.connections, args.connections * 10, args.size,
                                args.mode, tag="warm"))
        dump.wait_for(warm["acknowledged"], 60)
        profile = os.path.join(out, "profile.txt")
        spy, tracer = attach(relay.pid, py_spy, profile, out, args)
        time.sleep(1.0)
        before = tree_cpu_seconds(relay.pid)
        threads_before = thread_times(relay.pid)
        result = asyncio.run(load(port, args.connections, args.messages, args.size,
                                  args.mode, tag="prof"))
        loaded = time.monotonic()
        missing = dump.wait_for(result["acknowledged"], 120)
        drained = time.monotonic() - loaded
        cpu = tree_cpu_seconds(relay.pid) - before
        threads_after = thread_times(relay.pid)
        time.sleep(0.5)
        spy.send_signal(2)
        spy.wait(timeout=60)
        if tracer is not None:
            tracer.send_signal(2)
            tracer.wait(timeout=60)
            print(f"system calls during the load: {out}/strace.txt")
        n = len(result["acknowledged"])
        print(f"{args.delivery_mode}: {result['msg_per_s']} msg/s, p50 {result['p50_ms']} "
              f"ms, p99 {result['p99_ms']} ms, sink drained {drained:.2f} s after the "
              f"load, missing {len(missing)}; relay CPU {cpu:.2f} s = "
              f"{cpu / max(1, n) * 1e6:.0f} µs/msg (py-spy's own overhead included)")
        n = max(1, n)
        print("CPU by thread, µs per message (user + system):")
        for name, (user, system) in sorted(threads_after.items()):
            u0, s0 = threads_before.get(name, (0.0, 0.0))
            print(f"  {name:32} {(user - u0) / n * 1e6:7.0f} + {(system - s0) / n * 1e6:7.0f}")
        summarize(profile, args.top)
    finally:
        stop(relay, grace=20)
        stop(sink)
        if args.out is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
