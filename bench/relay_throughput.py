#!/usr/bin/env python3
"""Relay throughput and memory: client → esmtpfa → smtp-sink vs client → smtp-sink.

Run on demand (not a test):  python3 bench/relay_throughput.py [--messages N] [--connections C]

Both targets are driven in the same run by the same load generator (asyncio, AUTH PLAIN,
PIPELINING of MAIL/RCPT/DATA), so the ratio esmtpfa/direct is meaningful on a shared,
noisy machine even when the absolute numbers are not.  Postfix's ``smtp-sink`` (Debian
``postfix``, used as a plain binary) is the upstream and the ceiling.

Also measures the RSS growth of the esmtpfa process while it relays one large message
(default 50 MB): the message is spooled to disk, never held whole in memory.

Each round also reports the CPU seconds spent by esmtpfa, smtp-sink and the load generator
(from /proc and getrusage), so a result can be read as "CPU-bound or not" on the shared
2-core machine.  ``--processes N`` runs N independent esmtpfa processes and spreads the
client connections over them (what N processes behind one SO_REUSEPORT port would do):
an experiment for deciding about multi-process, not a supported deployment.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# The load generator, the sink and the account are shared with the other benchmarks
# (bench/loadgen.py); the names stay importable from here for hot_path and twisted_floor.
from loadgen import (  # noqa: E402,F401
    PASSWORD,
    PROJECT,
    USER,
    Client,
    esmtpfa_arguments,
    free_port,
    load,
    message_of,
    start_sink,
    wait_for_port,
    write_providers,
)

__all__ = ["PASSWORD", "USER", "esmtpfa_arguments", "message_of", "write_providers"]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measured(ports: list[int], pids: list[int], sink_pid: int, args) -> dict:
    """One load run, with the CPU each party spent on it."""
    before = ([cpu_seconds(p) for p in pids], cpu_seconds(sink_pid), own_cpu())
    result = asyncio.run(load(ports, args.connections, args.messages, args.size))
    relay_cpu = sum(cpu_seconds(p) for p in pids) - sum(before[0])
    result["cpu_s"] = {"esmtpfa": round(relay_cpu, 2),
                       "sink": round(cpu_seconds(sink_pid) - before[1], 2),
                       "loadgen": round(own_cpu() - before[2], 2)}
    if relay_cpu:
        result["esmtpfa_cpu_us_per_msg"] = round(relay_cpu / result["messages"] * 1e6)
    return result


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def large_message_rss(port: int, pid: int, size: int) -> dict:
    client = Client(port, message_of(size))
    before = rss_kib(pid)
    peak = before
    task = asyncio.ensure_future(client.run(1))
    while not task.done():
        peak = max(peak, rss_kib(pid))
        await asyncio.sleep(0.02)
    await task
    return {"message_bytes": size, "rss_before_kib": before, "rss_peak_kib": peak,
            "rss_growth_mib": round((peak - before) / 1024, 1),
            "seconds": round(client.latencies[0], 2)}


def start_esmtpfa(port: int, sink_port: int, workdir: str, log_level: str,
                  name: str = "esmtpfa") -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.environ.get("EXTRA_PATH", "") + PROJECT)
    args = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
            "--pidfile=", "--logfile", os.path.join(workdir, f"{name}.log"), "esmtpfa",
            *esmtpfa_arguments(port, sink_port, workdir, log_level)]
    process = subprocess.Popen(args, env=env, cwd=workdir)
    wait_for_port(port, process)
    return process


def load_arguments(description: str) -> argparse.ArgumentParser:
    """The load's options, shared by the benchmarks that use this load generator."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--messages", type=int, default=4000)
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=3)
    return parser


def main() -> None:
    parser = load_arguments(__doc__.split("\n")[0])
    parser.add_argument("--large", type=int, default=50 * 1024 * 1024)
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--processes", type=int, default=1,
                        help="independent esmtpfa processes sharing the load (experiment)")
    args = parser.parse_args()
    print("command:", " ".join([os.path.relpath(sys.argv[0], PROJECT)] + sys.argv[1:])
          or sys.argv[0])
    workdir = tempfile.mkdtemp(prefix="esmtpfa-bench-")
    sink_port = free_port()
    relay_ports = [free_port() for _ in range(args.processes)]
    results: dict = {"config": vars(args), "rounds": []}
    relays: list[subprocess.Popen] = []
    sink = start_sink(sink_port)
    try:
        for i, port in enumerate(relay_ports):
            relays.append(start_esmtpfa(port, sink_port, workdir, args.log_level,
                                        f"esmtpfa{i}"))
        pids = [r.pid for r in relays]
        asyncio.run(load(relay_ports, args.connections, 200 * args.processes, args.size))
        for round_ in range(args.rounds):
            direct = measured([sink_port], [], sink.pid, args)
            relayed = measured(relay_ports, pids, sink.pid, args)
            ratio = round(relayed["msg_per_s"] / direct["msg_per_s"], 3)
            results["rounds"].append({"direct": direct, "esmtpfa": relayed, "ratio": ratio})
            print(f"round {round_ + 1}: direct {direct}\n         esmtpfa {relayed}\n"
                  f"         ratio esmtpfa/direct = {ratio}")
        if args.large:
            large = asyncio.run(large_message_rss(relay_ports[0], pids[0], args.large))
            results["large_message"] = large
            print(f"large message: {large}")
    finally:
        for process in (*relays, sink):
            process.send_signal(signal.SIGTERM)
        for process in (*relays, sink):
            process.wait(timeout=30)
        shutil.rmtree(workdir, ignore_errors=True)
    ratios = [r["ratio"] for r in results["rounds"]]
    print(f"median ratio over {len(ratios)} rounds: {statistics.median(ratios)}")
    os.makedirs(os.path.join(PROJECT, "bench", "results"), exist_ok=True)
    name = "relay_throughput.json" if args.processes == 1 else \
        f"relay_throughput_{args.processes}proc.json"
    with open(os.path.join(PROJECT, "bench", "results", name), "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
