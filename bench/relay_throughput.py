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
import base64
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER, PASSWORD = "bench", "bench-password"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"process exited early: {process.args}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def message_of(size: int) -> bytes:
    head = b"From: bench@example.com\r\nTo: sink@example.net\r\nSubject: bench\r\n\r\n"
    line = b"x" * 76 + b"\r\n"
    body = line * max(1, (size - len(head)) // len(line))
    return head + body


class Client:
    """One SMTP connection sending messages back to back."""

    def __init__(self, port: int, message: bytes):
        self.port = port
        self.message = message + b".\r\n"
        self.latencies: list[float] = []

    async def reply(self) -> int:
        while True:
            line = await self.reader.readline()
            if not line:
                raise ConnectionError("closed")
            if line[3:4] != b"-":
                return int(line[:3])

    async def run(self, count: int) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assert await self.reply() == 220
        self.writer.write(b"EHLO bench.example\r\n")
        assert await self.reply() == 250
        token = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode())
        self.writer.write(b"AUTH PLAIN " + token + b"\r\n")
        code = await self.reply()
        assert code in (235, 250), code  # smtp-sink answers AUTH with a plain 250
        for _ in range(count):
            started = time.perf_counter()
            self.writer.write(b"MAIL FROM:<bench@example.com>\r\n"
                              b"RCPT TO:<sink@example.net>\r\nDATA\r\n")
            codes = [await self.reply() for _ in range(3)]
            assert codes == [250, 250, 354], codes
            self.writer.write(self.message)
            code = await self.reply()
            assert code == 250, code
            self.latencies.append(time.perf_counter() - started)
        self.writer.write(b"QUIT\r\n")
        await self.reply()
        self.writer.close()


async def load(ports: int | list[int], connections: int, messages: int, size: int) -> dict:
    message = message_of(size)
    ports = [ports] if isinstance(ports, int) else ports
    clients = [Client(ports[i % len(ports)], message) for i in range(connections)]
    per_client = messages // connections
    started = time.perf_counter()
    await asyncio.gather(*(c.run(per_client) for c in clients))
    elapsed = time.perf_counter() - started
    latencies = sorted(l for c in clients for l in c.latencies)
    return {
        "messages": len(latencies), "seconds": round(elapsed, 3),
        "msg_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(statistics.median(latencies) * 1000, 2),
        "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 2),
    }


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


def start_sink(port: int, pipelining: bool = True) -> subprocess.Popen:
    sink = shutil.which("smtp-sink")
    if sink is None:
        raise SystemExit("smtp-sink is missing: apt-get install postfix")
    args = [sink, "-c"] + ([] if pipelining else ["-p"]) + [f"127.0.0.1:{port}", "1024"]
    if os.geteuid() == 0:
        args[1:1] = ["-u", "nobody"]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port, process)
    return process


def write_providers(workdir: str) -> str:
    """The benchmark's provider file: one userpass account, tried as a fallback."""
    config = os.path.join(workdir, "providers.yaml")
    with open(config, "w") as f:
        f.write(f"providers:\n- meta: {{name: bench-users, type: userpass, fallback: true}}\n"
                f"  params: {{username: {USER}, password: {PASSWORD}}}\n")
    return config


def esmtpfa_arguments(port: int, sink_port: int, workdir: str, log_level: str) -> list[str]:
    """The relay under test: plain listener, the bench account, smtp-sink as upstream."""
    return ["--plain", "--addr", "127.0.0.1", "--port", str(port), "--allow-insecure-auth",
            "--config", write_providers(workdir), "--relay-addr", "127.0.0.1",
            "--relay-port", str(sink_port), "--relay-starttls", "none",
            "--log-level", log_level, "--max-message-size", str(200 * 1024 * 1024),
            "--hostname", "bench.test", "--metrics-port", "0"]


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
