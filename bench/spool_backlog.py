#!/usr/bin/env python3
"""A backlog of 100,000 messages in the file spool: listed, then drained, against the
live relay rate measured in the same run.

Run on demand from the repository root (Debian's postfix package for ``smtp-sink``;
``twistd`` and ``esmtpfa-queue`` on PATH, e.g. the venv's ``bin`` first)::

    python3 bench/spool_backlog.py [--messages 100000] [--size 2048] [--identities 1]
                                   [--connections 20] [--live-messages 10000]
                                   [--spool-concurrency N] [--relay-pool-size N]
                                   [--relay-pool-client-share F]
                                   [--workers N] [--fsync-delay MS] [--profile F]
                                   [--json F]

1. **Fill.** A fresh file spool is created by the queue tool itself (``esmtpfa-queue
   list`` on an empty directory creates the database and directories as a relay would),
   then filled in bulk: one SQLite transaction with ``esmtpfa.spool.files``'
   ``message_row``/``recipient_rows``/``INSERT_MESSAGE``/``INSERT_RECIPIENT`` (as
   ``tests/test_spool_files.py`` does), with each message's content where the relay
   keeps it (the index up to 64 KiB, else a file under ``msg/xx/``): a ``Received:``
   line, a unique ``X-Bench-Id`` header and the same body as ``bench/loadgen.py``'s
   messages of ``--size`` octets.  Every message is due now, one recipient, spread
   round-robin over ``--identities`` identities (the runner gives one identity at most
   half of ``--spool-concurrency``).
2. **List.** ``esmtpfa-queue list`` and ``esmtpfa-queue --json list``, each run twice,
   output to a file: wall time and the tool's CPU (its ``rusage``).
3. **Live rate.** ``twistd -n esmtpfa`` in ``passthrough`` mode relaying to smtp-sink,
   driven by the load generator (``--connections`` clients, ``--live-messages`` in
   all), in both of its modes (sequential, pipelined); measured before and after the
   drain, and averaged.
4. **Drain.** ``twistd -n esmtpfa --delivery-mode spool --spool-url file://...`` on
   the filled spool, relaying to the same smtp-sink, no client load: the drain time is
   from the relay's start to the spool's index being empty (polled read-only every
   0.5 s); the rate is messages / that time (also given from the first message at the
   sink, which leaves out the relay's start).  Then every backlog id must be in the
   sink's dump exactly once, else the script prints what is wrong and exits with
   status 2 without figures.  The relay's CPU is counted over its cgroup (or /proc),
   as ``bench/compare.py`` does.

With ``--fsync-delay MS`` the draining relay runs under ``strace``, every ``fsync`` and
``fdatasync`` MS milliseconds late (``bench/loadgen.py``'s ``slow_fsync``): the drain as
on a network disk, against the same live rate (passthrough writes no spool).

With ``--profile F`` ``py-spy record`` (the venv's, beside this Python) watches the
draining relay, every thread, from its start to the empty index, and writes collapsed
stacks to ``F`` (py-spy's interruptions slow the drain: its rate is then not a result).

With ``--workers N`` both the live relay and the draining one run as N worker processes
(a queue runner in each, on the one file spool), so the drain is compared with the live
rate of the same process count.

The esmtpfa processes run with ``bench/loadgen.py``'s arguments (those of
``compare.py``'s targets) and log at ``info`` to a file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from loadgen import (  # noqa: E402
    PROJECT,
    CpuMeter,
    Messages,
    SinkDump,
    child_environment,
    esmtpfa_arguments,
    free_port,
    load,
    machine_share,
    machine_ticks,
    slow_fsync,
    start_sink,
    stop,
    stop_relay,
    traced_child,
    twistd_command,
    wait_for_port,
)

sys.path.insert(0, PROJECT)
from esmtpfa.common.message import Envelope  # noqa: E402
from esmtpfa.spool import files  # noqa: E402
from esmtpfa.spool.interfaces import SpoolEntry  # noqa: E402


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def queue_tool(spool: str, arguments: list[str], output: str) -> dict:
    """``esmtpfa-queue ARGUMENTS`` on the spool: wall seconds, CPU seconds, exit code."""
    tool = shutil.which("esmtpfa-queue")
    if tool is None:
        raise SystemExit("esmtpfa-queue is not on PATH (put the venv's bin first)")
    env = child_environment()
    env["SPOOL_URL"] = f"file://{spool}"
    cpu = children_cpu()
    started = time.perf_counter()
    with open(output, "wb") as out:
        done = subprocess.run([tool, *arguments], env=env, stdout=out,
                              stderr=subprocess.PIPE, timeout=600)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"esmtpfa-queue {' '.join(arguments)} failed: "
                         f"{done.stderr.decode(errors='replace')}")
    return {"wall_s": round(wall, 3), "cpu_s": round(children_cpu() - cpu, 3),
            "output_bytes": os.path.getsize(output)}


def fill(spool: str, count: int, size: int, identities: int) -> list[str]:
    """``count`` due messages into the (created) spool, as the relay stores them: the
    content in the index (``contents``) up to ``files.INLINE_LIMIT``, else a file under
    ``msg/xx/`` (without an fsync each, then one ``sync``); their bench ids."""
    body = Messages(size, "x").body  # the generator's body, without its own id line
    now = time.time()
    bench_ids, messages, recipients, contents = [], [], [], []
    msg = os.path.join(spool, "msg")
    made: set[str] = set()
    for i in range(count):
        message_id = f"urn:uuid:{uuid.uuid4()}"
        bench_id = f"backlog.{i}"
        content = (f"Received: from bench.example (backlog) by bench.test; id "
                   f"{message_id}\r\nX-Bench-Id: {bench_id}\r\n").encode() + body
        if len(content) <= files.INLINE_LIMIT:
            name = files.INLINE
            contents.append((message_id, content))
        else:
            name = message_id[len("urn:uuid:"):].replace("-", "") + ".bulk"
            directory = os.path.join(msg, name[:2])
            if directory not in made:
                os.makedirs(directory, mode=0o700, exist_ok=True)
                made.add(directory)
            with open(os.path.join(directory, name), "wb") as f:
                f.write(content)
        received = now - count + i  # oldest first, all due now
        entry = SpoolEntry(message_id, Envelope("bench@example.com", ("sink@example.net",)),
                           f"bench-users/bench{i % identities}", "bounce", received,
                           len(content), "urn:uuid:backlog")
        messages.append(files.message_row(entry, name, len(content), received))
        recipients.extend(files.recipient_rows(entry))
        bench_ids.append(bench_id)
    os.sync()
    connection = sqlite3.connect(os.path.join(spool, files.DATABASE), isolation_level=None,
                                 timeout=30)
    try:
        connection.execute("BEGIN IMMEDIATE")
        connection.executemany(files.INSERT_MESSAGE, messages)
        connection.executemany(files.INSERT_RECIPIENT, recipients)
        connection.executemany(files.INSERT_CONTENT, contents)
        connection.execute("COMMIT")
    finally:
        connection.close()
    return bench_ids


def queued(spool: str) -> int:
    connection = sqlite3.connect(f"file:{os.path.join(spool, files.DATABASE)}?mode=ro",
                                 uri=True, timeout=5)
    try:
        return connection.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
    except sqlite3.Error:
        return -1
    finally:
        connection.close()


def start_relay(name: str, workdir: str, sink_port: int, extra: list[str]):
    port = free_port()
    meter = CpuMeter(name)
    arguments = esmtpfa_arguments(port, sink_port, workdir, "info")
    arguments += ["--max-connections", "1000", "--max-connections-per-ip", "1000", *extra]
    with open(os.path.join(workdir, f"{name}.out"), "wb") as out:
        process = subprocess.Popen(twistd_command(arguments), env=child_environment(),
                                   cwd=workdir, stdout=out, stderr=subprocess.STDOUT,
                                   preexec_fn=meter.preexec)
    meter.adopt(process.pid)
    return port, process, meter


def live(port: int, meter: CpuMeter, dump: SinkDump, args, mode: str, tag: str) -> dict:
    cpu = meter.seconds()
    result = asyncio.run(load(port, args.connections, args.live_messages, args.size, mode,
                              tag=tag))
    acknowledged = result.pop("acknowledged")
    missing = dump.wait_for(acknowledged, 120)
    if missing:
        raise SystemExit(f"live {mode}: {len(missing)} acknowledged messages missing at "
                         f"the sink, e.g. {missing[:3]}")
    result["cpu_us_per_msg"] = round((meter.seconds() - cpu) / len(acknowledged) * 1e6)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--identities", type=int, default=1)
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--live-messages", type=int, default=10_000)
    parser.add_argument("--spool-concurrency", type=int,
                        help="the draining relay's --spool-concurrency (default: "
                             "esmtpfa's, 20)")
    parser.add_argument("--relay-pool-size", type=int,
                        help="the draining relay's --relay-pool-size (default: esmtpfa's, "
                             "20: half of it the runner's share, the rest borrowed while "
                             "no live client wants it)")
    parser.add_argument("--relay-pool-client-share", type=float,
                        help="the draining relay's --relay-pool-client-share (default: "
                             "esmtpfa's, 0.5; 1 lets the runner, one client of the pool, "
                             "use all of it)")
    parser.add_argument("--drain-timeout", type=float, default=1800)
    parser.add_argument("--workers", type=int, default=0,
                        help="run both relays with --workers N (default: one process)")
    parser.add_argument("--fsync-delay", type=float, default=0.0, metavar="MS",
                        help="every fsync of the draining relay MS milliseconds late")
    parser.add_argument("--profile", help="collapsed py-spy stacks of the drain, to F")
    parser.add_argument("--json")
    args = parser.parse_args()
    workers = ["--workers", str(args.workers)] if args.workers else []
    print(f"command: python3 {os.path.relpath(sys.argv[0], PROJECT)} "
          f"{' '.join(sys.argv[1:])}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}; CPUs: "
          f"{os.cpu_count()}; load average before: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    workdir = tempfile.mkdtemp(prefix="esmtpfa-backlog-")
    os.chmod(workdir, 0o777)  # smtp-sink (nobody) appends its dump here
    spool = os.path.join(workdir, "spool")
    report: dict = {"messages": args.messages, "size": args.size,
                    "identities": args.identities, "fsync_delay_ms": args.fsync_delay}
    sink = relay = None
    meters: list[CpuMeter] = []
    try:
        # 1. fill
        queue_tool(spool, ["list"], os.path.join(workdir, "empty.txt"))  # creates it
        started = time.perf_counter()
        ids = fill(spool, args.messages, args.size, args.identities)
        report["fill_s"] = round(time.perf_counter() - started, 1)
        print(f"filled: {len(ids)} messages in {report['fill_s']} s "
              f"({queued(spool)} in the index)", flush=True)

        # 2. list
        for arguments, key in ((["list"], "list"), (["--json", "list"], "list_json")):
            runs = [queue_tool(spool, arguments, os.path.join(workdir, f"{key}.txt"))
                    for _ in range(2)]
            report[key] = runs
            print(f"esmtpfa-queue {' '.join(arguments)}: "
                  + ", ".join(f"{r['wall_s']} s wall / {r['cpu_s']} s CPU" for r in runs)
                  + f" ({runs[-1]['output_bytes'] / 1e6:.1f} MB of output)", flush=True)
        with open(os.path.join(workdir, "list.txt"), "rb") as f:
            f.seek(-200, 2)
            print("   last line: " + f.read().decode().strip().splitlines()[-1])

        sink_port = free_port()
        dump = SinkDump(os.path.join(workdir, "sink.dump"))
        sink = start_sink(sink_port, dump=dump.path)

        # 3. live rate, before
        port, relay, meter = start_relay("passthrough", workdir, sink_port, workers)
        meters.append(meter)
        wait_for_port(port, relay, timeout=60)
        asyncio.run(load(port, args.connections, args.connections * 10, args.size,
                         "sequential"))  # warm-up
        report["live"] = {}
        for when in ("before", "after"):
            if when == "after":
                port, relay, meter = start_relay("passthrough-2", workdir, sink_port, workers)
                meters.append(meter)
                wait_for_port(port, relay, timeout=60)
                asyncio.run(load(port, args.connections, args.connections * 10,
                                 args.size, "sequential"))
            for mode in ("sequential", "pipelined"):
                r = live(port, meter, dump, args, mode, f"live.{when}.{mode}")
                report["live"].setdefault(mode, []).append(r)
                print(f"live passthrough ({when} the drain, {mode}): {r['msg_per_s']} "
                      f"msg/s, p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, "
                      f"{r['cpu_us_per_msg']} µs CPU/msg", flush=True)
            stop(relay, grace=30)
            relay = None
            if when == "after":
                break

            # 4. drain
            meter = CpuMeter("drain")
            meters.append(meter)
            machine = machine_ticks()
            started = time.monotonic()
            arguments = esmtpfa_arguments(free_port(), sink_port, workdir, "info") + [
                "--delivery-mode", "spool", "--spool-url", f"file://{spool}"]
            arguments += workers
            if args.spool_concurrency:
                arguments += ["--spool-concurrency", str(args.spool_concurrency)]
            if args.relay_pool_size:
                arguments += ["--relay-pool-size", str(args.relay_pool_size)]
            if args.relay_pool_client_share:
                arguments += ["--relay-pool-client-share", str(args.relay_pool_client_share)]
            command = twistd_command(arguments)
            if args.fsync_delay:
                command = slow_fsync(command, args.fsync_delay)
            with open(os.path.join(workdir, "drain.out"), "wb") as out:
                relay = subprocess.Popen(command,
                                         env=child_environment(), cwd=workdir, stdout=out,
                                         stderr=subprocess.STDOUT, preexec_fn=meter.preexec)
            meter.adopt(relay.pid)
            relay_pid = traced_child(relay.pid) if args.fsync_delay else relay.pid
            profiler = None
            if args.profile:
                profiler = subprocess.Popen(
                    [os.path.join(os.path.dirname(sys.executable), "py-spy"), "record",
                     "--pid", str(relay_pid), "--threads", "--rate", "250",
                     "--format", "raw", "-o", args.profile],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            first_at_sink = None
            progress = time.monotonic()
            while True:
                if relay.poll() is not None:
                    raise SystemExit("the draining relay exited; see drain.out")
                left = queued(spool)
                if first_at_sink is None and os.path.exists(dump.path) and \
                        os.path.getsize(dump.path) > dump.offset:
                    first_at_sink = time.monotonic()
                if left == 0:
                    break
                if time.monotonic() - started > args.drain_timeout:
                    raise SystemExit(f"not drained in {args.drain_timeout} s: {left} left")
                if time.monotonic() - progress > 15:
                    progress = time.monotonic()
                    print(f"   draining: {left} left after "
                          f"{progress - started:.0f} s", flush=True)
                time.sleep(0.5)
            drained = time.monotonic()
            cpu = meter.seconds()
            if profiler is not None:  # py-spy writes its profile on SIGINT
                profiler.send_signal(signal.SIGINT)
                profiler.wait(timeout=60)
            report["drain_machine_pct"] = machine_share(machine, machine_ticks())
            counts_wait = dump.wait_for(ids, 60)  # the last writes of the sink
            duplicates = sum(1 for i in ids if dump.counts.get(i, 0) > 1)
            if counts_wait or duplicates:
                print(f"\nREFUSED: {len(counts_wait)} backlog messages missing at the "
                      f"sink (e.g. {counts_wait[:3]}), {duplicates} delivered more than "
                      f"once", file=sys.stderr)
                return 2
            seconds = drained - started
            report["drain"] = {
                "seconds_from_start": round(seconds, 1),
                "msg_per_s": round(args.messages / seconds, 1),
                "seconds_from_first_at_sink": round(drained - first_at_sink, 1),
                "msg_per_s_from_first_at_sink": round(
                    args.messages / (drained - first_at_sink), 1),
                "start_to_first_at_sink_s": round(first_at_sink - started, 2),
                "cpu_s": round(cpu, 2),
                "cpu_us_per_msg": round(cpu / args.messages * 1e6),
                "delivered_once": args.messages,
            }
            d = report["drain"]
            print(f"drain: {args.messages} messages in {d['seconds_from_start']} s from "
                  f"the relay's start = {d['msg_per_s']} msg/s "
                  f"({d['msg_per_s_from_first_at_sink']} msg/s from the first at the sink,"
                  f" {d['start_to_first_at_sink_s']} s after the start); "
                  f"{d['cpu_us_per_msg']} µs CPU/msg; every message at the sink exactly "
                  f"once; machine {report['drain_machine_pct']}"
                  + (f"; every fsync {args.fsync_delay} ms late" if args.fsync_delay else ""),
                  flush=True)
            stop_relay(relay, grace=30)
            relay = None
    finally:
        stop_relay(relay, grace=30)
        stop(sink)
        for meter in meters:
            meter.close()
        shutil.rmtree(workdir, ignore_errors=True)

    summary = {}
    for mode, runs in report["live"].items():
        rate = sum(r["msg_per_s"] for r in runs) / len(runs)
        summary[mode] = {"live_msg_per_s": round(rate, 1),
                         "drain_over_live": round(report["drain"]["msg_per_s"] / rate, 2)}
    report["summary"] = summary
    print()
    print("| live relay (passthrough) | live msg/s (before, after) | drain msg/s | "
          "drain / live | target |")
    print("|---|---|---|---|---|")
    for mode, s in summary.items():
        rates = ", ".join(f"{r['msg_per_s']:,.0f}" for r in report["live"][mode])
        print(f"| {mode}, {args.connections} connections | {s['live_msg_per_s']:,.0f} "
              f"({rates}) | "
              f"{report['drain']['msg_per_s']:,.0f} | {s['drain_over_live']} | ≥ 0.8 |")
    lists = [r["wall_s"] for r in report["list"]]
    jsons = [r["wall_s"] for r in report["list_json"]]
    print(f"\nesmtpfa-queue list on {args.messages:,} messages: {lists} s; --json list: "
          f"{jsons} s (target < 2 s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
