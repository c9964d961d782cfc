#!/usr/bin/env python3
"""Scale figures of esmtpfa: one subcommand, one figure.

Run on demand from the repository root (not a test)::

    python3 bench/scale.py [--workers N] [--json FILE] idle [--connections 2000]
    python3 bench/scale.py [--workers N] [--json FILE] tls [--seconds 10] [--concurrency 8]
    python3 bench/scale.py [--workers N] [--json FILE] coldstart [--repeat 5]
    python3 bench/scale.py [--workers N] [--json FILE] bigmessage [--mib 50]
    python3 bench/scale.py [--workers N] [--json FILE] providers [--messages 1000]
                                                                 [--connections 8]

Every figure comes from a real ``twistd -n esmtpfa`` process relaying to Postfix's
``smtp-sink``, driven from this process over loopback (the load generator of
``bench/loadgen.py``), on a machine whose two cores it shares with the generator:

* ``idle``: RSS of esmtpfa before and after ``--connections`` clients connect, read the
  greeting, say EHLO and then stay silent; RSS per connection and per worker.  The
  limits that would refuse them (``--max-connections``, ``--max-connections-per-ip``) are
  raised, and so is RLIMIT_NOFILE (here, inherited by esmtpfa).  At the end every
  connection must still answer NOOP, so none was dropped.
* ``tls``: TLS handshakes per second on the implicit-TLS (465-style) listener, per
  worker (the rate divided by the worker processes): each client thread connects, handshakes, reads
  the 220 greeting, says QUIT and
  closes, in a loop, for ``--seconds``; ``full`` without a session, ``resumed`` offering
  the session of the previous connection (the figure says how many were really resumed).
  Certificates are generated (``tests/support/certs.py``, ECDSA P-256).
* ``coldstart``: time from starting ``twistd`` to the SMTP port answering 220.
* ``bigmessage``: RSS growth of esmtpfa while one message of ``--mib`` MiB is relayed
  to the sink (sampled every 10 ms, per process, peak minus before); the message must
  arrive at the sink.
* ``providers``: esmtpfa's CPU per message with a new connection and a new AUTH PLAIN
  for every message, for each provider type against a real back end: ``userpass`` (in
  the configuration), ``http_basic`` (the scripted twisted.web endpoint of
  ``tests/support/httpservers.py`` in its own process), ``jwt`` (RS256 tokens signed here,
  the JWKS served by ``python3 -m http.server`` in its own process), ``ldap`` (a real
  slapd from ``tests/support/slapd.py``, StartTLS, service-account search then user bind).
  ``reference`` is the same load with one login per connection.  Each acknowledged message
  is checked at the sink.

CPU of esmtpfa is counted over all its processes (a cgroup, see ``loadgen.CpuMeter``);
``--workers N`` passes the flag to esmtpfa (a release without it refuses to start).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)

from loadgen import (  # noqa: E402
    PASSWORD,
    PROJECT,
    USER,
    CpuMeter,
    SinkDump,
    child_environment,
    cpu_seconds,
    esmtpfa_arguments,
    free_port,
    greeting,
    load,
    percentile,
    raise_nofile,
    rss_kib,
    start_sink,
    stop,
    tree_cpu_seconds,
    twistd_command,
)

sys.path.insert(0, PROJECT)


class Relay:
    """``twistd -n esmtpfa`` (plus ``extra`` arguments) in its own cgroup, relaying to
    a sink that dumps what it accepts."""

    def __init__(self, workdir: str, extra: list[str] = (), workers: int | None = None,
                 log_level: str = "info"):
        self.workdir = workdir
        self.extra = list(extra)
        if workers is not None:
            self.extra += ["--workers", str(workers)]
        self.log_level = log_level
        self.sink_port = free_port()
        self.port = free_port()
        self.dump = SinkDump(os.path.join(workdir, "sink.dump"))
        self.sink: subprocess.Popen | None = None
        self.process: subprocess.Popen | None = None
        self.meter: CpuMeter | None = None
        self.output = None

    def command(self) -> list[str]:
        arguments = esmtpfa_arguments(self.port, self.sink_port, self.workdir, self.log_level)
        return twistd_command(arguments + self.extra)

    def start_sink(self) -> None:
        if self.sink is None:
            os.chmod(self.workdir, 0o777)  # the sink runs as nobody
            self.sink = start_sink(self.sink_port, dump=self.dump.path)

    def spawn(self) -> subprocess.Popen:
        """Start twistd (the sink first); does not wait."""
        self.start_sink()
        self.meter = CpuMeter(f"scale-{os.getpid()}-{time.monotonic_ns()}")
        self.output = open(os.path.join(self.workdir, "esmtpfa.out"), "wb")
        self.process = subprocess.Popen(self.command(), env=child_environment(),
                                        cwd=self.workdir, stdout=self.output,
                                        stderr=subprocess.STDOUT,
                                        preexec_fn=self.meter.preexec)
        self.meter.adopt(self.process.pid)
        return self.process

    def wait_ready(self, port: int | None = None, timeout: float = 60.0) -> None:
        port = port or self.port
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                with open(os.path.join(self.workdir, "esmtpfa.out"), "rb") as f:
                    said = f.read().decode("utf-8", "replace")
                raise SystemExit(f"esmtpfa exited at start:\n{said[-2000:]}")
            try:
                if greeting(port, timeout=1.0).startswith(b"220"):
                    return
            except OSError:
                time.sleep(0.05)
        raise SystemExit(f"esmtpfa did not answer 220 on {port} within {timeout} s")

    def start(self, port: int | None = None) -> "Relay":
        self.spawn()
        self.wait_ready(port)
        return self

    def pids(self) -> list[int]:
        return self.meter.pids()

    def rss(self) -> dict[int, int]:
        """KiB of RSS per esmtpfa process."""
        return {pid: rss_kib(pid) for pid in self.pids()}

    def cpu_by_role(self) -> dict[str, float]:
        """CPU seconds so far of the live processes: the first one ("main", the
        supervisor when there are workers) and the others ("workers")."""
        roles: dict[str, float] = {}
        for pid in self.pids():
            role = "main" if pid == self.process.pid else "workers"
            try:
                roles[role] = roles.get(role, 0.0) + cpu_seconds(pid)
            except OSError:
                pass
        return roles

    def stop(self) -> None:
        stop(self.process, grace=30)
        self.process = None
        if self.output is not None:
            self.output.close()
        if self.meter is not None:
            self.meter.close()
        stop(self.sink)
        self.sink = None


def temporary() -> str:
    return tempfile.mkdtemp(prefix="esmtpfa-scale-")


def mib(kib: float) -> str:
    return f"{kib / 1024:.1f} MiB"


# --- idle ------------------------------------------------------------------------------

async def hold_idle(port: int, count: int, measure) -> dict:
    """Open ``count`` connections (greeting + EHLO), call ``measure()`` while they sit
    idle, then check each still answers NOOP."""
    gate = asyncio.Semaphore(100)
    connections: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def reply(reader) -> int:
        while True:
            line = await asyncio.wait_for(reader.readline(), 60)
            if not line:
                raise ConnectionError("closed by esmtpfa")
            if line[3:4] != b"-":
                return int(line[:3])

    async def open_one() -> None:
        async with gate:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port), 60)
            assert await reply(reader) == 220
            writer.write(b"EHLO idle.example\r\n")
            assert await reply(reader) == 250
            connections.append((reader, writer))

    started = time.perf_counter()
    outcomes = await asyncio.gather(*(open_one() for _ in range(count)),
                                    return_exceptions=True)
    opened = time.perf_counter() - started
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    await asyncio.sleep(2)  # let the relay settle (timers, buffers)
    figures = measure()

    async def noop(reader, writer) -> int:
        async with gate:
            writer.write(b"NOOP\r\n")
            return await reply(reader)

    answers = await asyncio.gather(*(noop(r, w) for r, w in connections),
                                   return_exceptions=True)
    alive = sum(1 for a in answers if a == 250)
    for _, writer in connections:
        writer.close()
    figures.update(opened=len(connections), open_s=round(opened, 2), alive_after=alive,
                   errors=sorted({f"{type(e).__name__}: {e}" for e in errors})[:3])
    return figures


def cmd_idle(args) -> dict:
    limit = raise_nofile(args.connections * 2 + 1024)
    workdir = temporary()
    many = str(args.connections + 100)
    relay = Relay(workdir, ["--max-connections", many, "--max-connections-per-ip", many,
                            "--idle-timeout", "3600"], args.workers)
    try:
        relay.start()
        asyncio.run(load(relay.port, 4, 40, 2048))  # warm: pools, code paths
        time.sleep(1)
        before = relay.rss()

        def measure() -> dict:
            after = relay.rss()
            return {"rss_before_kib": before, "rss_after_kib": after}

        figures = asyncio.run(hold_idle(relay.port, args.connections, measure))
    finally:
        relay.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    before, after = figures["rss_before_kib"], figures["rss_after_kib"]
    growth = sum(after.values()) - sum(before.get(p, 0) for p in after)
    figures.update(connections=args.connections, nofile=limit, processes=len(after),
                   rss_growth_kib=growth,
                   kib_per_connection=round(growth / max(1, figures["opened"]), 1),
                   largest_process_kib=max(after.values()))
    print(f"{figures['opened']} idle connections ({figures['alive_after']} still answering "
          f"NOOP after the measurement), {len(after)} esmtpfa process(es): RSS "
          f"{mib(sum(before.values()))} -> {mib(sum(after.values()))}, "
          f"{figures['kib_per_connection']} KiB per connection; largest process "
          f"{mib(figures['largest_process_kib'])} (target: < 150 MB per worker)")
    if figures["errors"]:
        print(f"connection errors: {figures['errors']}")
    return figures


# --- tls -------------------------------------------------------------------------------

def handshake_loop(port: int, context: ssl.SSLContext, resume: bool, until: float,
                   counts: dict, lock: threading.Lock) -> None:
    """Connect, handshake, read the greeting, QUIT, close; again until ``until``."""
    session = None
    done = reused = failed = 0
    latencies = []
    while time.monotonic() < until:
        started = time.perf_counter()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                with context.wrap_socket(raw, server_hostname="127.0.0.1",
                                         session=session if resume else None) as tls:
                    line = tls.recv(512)
                    if not line.startswith(b"220"):
                        raise ConnectionError(line)
                    tls.sendall(b"QUIT\r\n")
                    tls.recv(512)
                    reused += tls.session_reused
                    if resume:
                        session = tls.session  # TLS 1.3: the ticket came with the data
        except (OSError, ssl.SSLError, ConnectionError):
            failed += 1
            continue
        latencies.append(time.perf_counter() - started)
        done += 1
    with lock:
        counts["done"] += done
        counts["reused"] += reused
        counts["failed"] += failed
        counts["latencies"] += latencies


def cmd_tls(args) -> dict:
    from tests.support.certs import CertificateAuthority

    workdir = temporary()
    ca = CertificateAuthority(os.path.join(workdir, "ca"))
    leaf = ca.issue("127.0.0.1", "localhost", filename="server")
    tls_port = free_port()
    relay = Relay(workdir, ["--tls", "--tls-port", str(tls_port), "--tls-cert",
                            leaf.cert_path, "--tls-key", leaf.key_path], args.workers)
    results = {}
    try:
        relay.start()
        deadline = time.monotonic() + 30  # the TLS listener (its greeting needs TLS)
        while True:
            try:
                socket.create_connection(("127.0.0.1", tls_port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit(f"nothing listens on the TLS port {tls_port}") from None
                time.sleep(0.05)
        workers = max(1, len(relay.pids()) - (1 if args.workers and args.workers > 1 else 0))
        for kind in ("full", "resumed"):
            context = ssl.create_default_context(cafile=ca.cert_path)
            counts = {"done": 0, "reused": 0, "failed": 0, "latencies": []}
            lock = threading.Lock()
            cpu_before, roles_before = relay.meter.seconds(), relay.cpu_by_role()
            until = time.monotonic() + args.seconds
            started = time.perf_counter()
            threads = [threading.Thread(target=handshake_loop, args=(
                tls_port, context, kind == "resumed", until, counts, lock))
                for _ in range(args.concurrency)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(args.seconds + 60)
            elapsed = time.perf_counter() - started
            cpu = relay.meter.seconds() - cpu_before
            roles = {role: round(value - roles_before.get(role, 0.0), 2)
                     for role, value in relay.cpu_by_role().items()}
            latencies = sorted(counts["latencies"])
            rate = counts["done"] / elapsed
            results[kind] = {
                "handshakes": counts["done"], "failed": counts["failed"],
                "resumed": counts["reused"], "per_s": round(rate, 1),
                "per_s_per_worker": round(rate / workers, 1),
                "p50_ms": round(statistics.median(latencies) * 1000, 2) if latencies else None,
                "p99_ms": round(percentile(latencies, 0.99) * 1000, 2) if latencies else None,
                "esmtpfa_cpu_us_per_handshake": round(cpu / max(1, counts["done"]) * 1e6),
                "esmtpfa_cpu_s_by_role": roles,
            }
            r = results[kind]
            print(f"tls {kind:8}: {r['per_s']:,.0f} handshakes/s with {workers} worker(s) "
                  f"= {r['per_s_per_worker']:,.0f}/s per worker; {r['resumed']} of "
                  f"{r['handshakes']} resumed, {r['failed']} failed; p50 {r['p50_ms']} ms, "
                  f"p99 {r['p99_ms']} ms; esmtpfa CPU {r['esmtpfa_cpu_us_per_handshake']} µs "
                  f"per handshake (connection + greeting + QUIT included); CPU s by "
                  f"process: {roles}", flush=True)
    finally:
        relay.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return results


# --- coldstart -------------------------------------------------------------------------

def cmd_coldstart(args) -> dict:
    times = []
    for _ in range(args.repeat):
        workdir = temporary()
        relay = Relay(workdir, [], args.workers)
        try:
            relay.start_sink()  # the sink is not part of the start
            started = time.perf_counter()
            relay.spawn()
            deadline = time.monotonic() + 60
            while True:
                if relay.process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("esmtpfa did not start")
                try:
                    if greeting(relay.port, timeout=2.0).startswith(b"220"):
                        break
                except OSError:
                    time.sleep(0.005)
            times.append(time.perf_counter() - started)
        finally:
            relay.stop()
            shutil.rmtree(workdir, ignore_errors=True)
    result = {"seconds": [round(t, 3) for t in times],
              "median_s": round(statistics.median(times), 3)}
    print(f"cold start (exec of twistd to 220 on the SMTP port), {args.repeat} starts: "
          f"median {result['median_s']} s, min {min(times):.3f} s, max {max(times):.3f} s")
    return result


# --- bigmessage ------------------------------------------------------------------------

def cmd_bigmessage(args) -> dict:
    workdir = temporary()
    size = args.mib * 1024 * 1024
    relay = Relay(workdir, [], args.workers)
    try:
        relay.start()
        asyncio.run(load(relay.port, 4, 40, 2048))  # warm: pools, code paths
        time.sleep(1)
        before = relay.rss()
        peaks = dict(before)

        async def send() -> dict:
            task = asyncio.ensure_future(load(relay.port, 1, 1, size, tag="big"))
            while not task.done():
                for pid, kib in relay.rss().items():
                    peaks[pid] = max(peaks.get(pid, 0), kib)
                await asyncio.sleep(0.01)
            return await task

        result = asyncio.run(send())
        missing = relay.dump.wait_for(result["acknowledged"], timeout=60)
        if missing:
            raise SystemExit("REFUSED: the message acknowledged with 250 is not at the sink")
        after = relay.rss()
    finally:
        relay.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    growth = {pid: peaks[pid] - before.get(pid, 0) for pid in peaks}
    worst = max(growth.values())
    figures = {"message_bytes": size, "seconds": result["seconds"],
               "rss_before_kib": before, "rss_peak_kib": peaks, "rss_after_kib": after,
               "largest_growth_kib": worst}
    print(f"{args.mib} MiB message relayed in {result['seconds']} s and found at the sink; "
          f"esmtpfa RSS before {mib(sum(before.values()))}, peak growth of the most grown "
          f"process {mib(worst)} (target: <= 16 MB)")
    return figures


# --- providers -------------------------------------------------------------------------

class Backend:
    """A process a provider talks to; its CPU is reported next to esmtpfa's."""

    def __init__(self):
        self.process: subprocess.Popen | None = None
        self.pid: int | None = None

    def cpu(self) -> float:
        return tree_cpu_seconds(self.pid) if self.pid else 0.0

    def close(self) -> None:
        stop(self.process)


class HttpBasicBackend(Backend):
    """The scripted twisted.web endpoint of the tests, in its own process."""

    def __init__(self):
        super().__init__()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.support.httpservers", "--basic", "alice:s3cret"],
            cwd=PROJECT, env=child_environment(), stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True)
        self.pid = self.process.pid
        line = self.process.stdout.readline()
        if not line.startswith("PORT "):
            self.close()
            raise SystemExit(f"the HTTP auth endpoint did not start: {line!r}")
        self.url = f"http://127.0.0.1:{int(line.split()[1])}/basic"

    def close(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.stdin.close()  # end of input stops it
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                pass
        super().close()


class JwksBackend(Backend):
    """A JWKS document served by ``python3 -m http.server`` in its own process, and
    tokens signed here with the matching RS256 key."""

    ISS, AUD = "https://idp.bench", "esmtpfa"

    def __init__(self, workdir: str, tokens: int):
        super().__init__()
        from tests.support.httpservers import make_key, mint, standard_claims
        key = make_key("RS256", "bench-k1")
        directory = os.path.join(workdir, "jwks")
        os.makedirs(directory)
        with open(os.path.join(directory, "jwks.json"), "w") as f:
            json.dump({"keys": [key.jwk]}, f)
        port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory",
             directory, str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.pid = self.process.pid
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.close()
                    raise SystemExit("the JWKS server did not start") from None
                time.sleep(0.05)
        self.url = f"http://127.0.0.1:{port}/jwks.json"
        now = time.time()
        self.tokens = [mint(key, standard_claims(now, lifetime=3600, iss=self.ISS,
                                                 aud=self.AUD, sub=f"user{i}"))
                       for i in range(tokens)]


def provider_cases(workdir: str, stack: list) -> dict:
    """Provider file entry and credentials per case; back ends started on the way."""
    from tests.support.slapd import SlapdServer, generated_user, ldap_provider

    cases = {}
    cases["userpass"] = (
        {"meta": {"name": "bench-users", "type": "userpass"},
         "params": {"username": USER, "password": PASSWORD}},
        lambda i: ("bench-users", f"{USER}:{PASSWORD}"), None)
    http = HttpBasicBackend()
    stack.append(http)
    cases["http_basic"] = (
        {"meta": {"name": "bench-http", "type": "http_basic"}, "params": {"url": http.url}},
        lambda i: ("bench-http", "alice:s3cret"), http)
    jwks = JwksBackend(workdir, tokens=50)
    stack.append(jwks)
    cases["jwt"] = (
        {"meta": {"name": "bench-jwt", "type": "jwt"},
         "params": {"jwks_url": jwks.url, "iss": jwks.ISS, "aud": jwks.AUD}},
        lambda i: ("bench-jwt", jwks.tokens[i % len(jwks.tokens)]), jwks)
    slapd = SlapdServer(users=50, loglevel="none")
    slapd_backend = Backend()
    slapd_backend.close = slapd.close
    stack.append(slapd_backend)
    slapd.start()
    slapd_backend.pid = slapd.process.pid
    users = [generated_user(i) for i in range(50)]
    cases["ldap"] = (
        ldap_provider(slapd, "bench-ldap", tls=True),
        lambda i: ("bench-ldap", f"{users[i % 50].uid}:{users[i % 50].password}"),
        slapd_backend)
    return cases


def cmd_providers(args) -> dict:
    workdir = temporary()
    stack: list[Backend] = []
    relay = None
    results = {}
    try:
        cases = provider_cases(workdir, stack)
        providers = [entry for entry, _, _ in cases.values()]
        path = os.path.join(workdir, "providers.json")
        with open(path, "w") as f:
            json.dump({"providers": providers}, f)
        # esmtpfa_arguments names its own provider file; this one comes later and wins.
        relay = Relay(workdir, ["--config", path, "--max-connections-per-ip", "1000",
                                "--max-connections", "1000"], args.workers)
        relay.start()
        order = ["reference", *[c for c in cases if c in args.only.split(",")]]
        for name in order:
            per_message = name != "reference"
            entry, credentials, backend = cases.get(name, cases["userpass"])
            counter = iter(range(1 << 30))

            def numbered(_, credentials=credentials, counter=counter):
                return credentials(next(counter))

            # Warm: pools, caches (JWKS), code paths; checked at the sink like the rest.
            warm = asyncio.run(load(relay.port, args.connections, args.connections * 5,
                                    args.size, "sequential", tag=f"warm.{name}",
                                    login_per_message=per_message, credentials=numbered))
            cpu_before, backend_before = relay.meter.seconds(), (
                backend.cpu() if backend else 0.0)
            result = asyncio.run(load(relay.port, args.connections, args.messages, args.size,
                                      "sequential", tag=name, login_per_message=per_message,
                                      credentials=numbered))
            acknowledged = warm["acknowledged"] + result.pop("acknowledged")
            missing = relay.dump.wait_for(acknowledged, timeout=60)
            if missing:
                raise SystemExit(f"REFUSED: {len(missing)} acknowledged messages of the "
                                 f"{name} case are missing at the sink")
            cpu = relay.meter.seconds() - cpu_before
            result["esmtpfa_cpu_us_per_msg"] = round(cpu / result["messages"] * 1e6)
            if backend is not None:
                result["backend_cpu_us_per_msg"] = round(
                    (backend.cpu() - backend_before) / result["messages"] * 1e6)
            results[name] = result
            label = "reference (one login per connection)" if name == "reference" else \
                f"{name} (new connection + AUTH per message)"
            backend_text = (f", back end {result['backend_cpu_us_per_msg']} µs/msg"
                            if "backend_cpu_us_per_msg" in result else "")
            print(f"{label:45} {result['msg_per_s']:>7,.0f} msg/s  p50 {result['p50_ms']:6} ms"
                  f"  p99 {result['p99_ms']:6} ms  esmtpfa {result['esmtpfa_cpu_us_per_msg']:>5}"
                  f" µs/msg{backend_text}", flush=True)
    finally:
        if relay is not None:
            relay.stop()
        for backend in reversed(stack):
            try:
                backend.close()
            except Exception as e:  # keep closing the others
                print(f"closing a back end: {e}", file=sys.stderr)
        shutil.rmtree(workdir, ignore_errors=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=None,
                        help="pass --workers N to esmtpfa (default: not passed, 1 worker)")
    parser.add_argument("--json", help="also write the figures to this file")
    sub = parser.add_subparsers(dest="figure", required=True)
    idle = sub.add_parser("idle", help="RSS per idle connection")
    idle.add_argument("--connections", type=int, default=2000)
    tls = sub.add_parser("tls", help="TLS handshakes per second per worker")
    tls.add_argument("--seconds", type=float, default=10.0)
    tls.add_argument("--concurrency", type=int, default=8)
    cold = sub.add_parser("coldstart", help="exec of twistd to 220")
    cold.add_argument("--repeat", type=int, default=5)
    big = sub.add_parser("bigmessage", help="RSS growth while relaying a big message")
    big.add_argument("--mib", type=int, default=50)
    prov = sub.add_parser("providers", help="CPU per message with a login per message")
    prov.add_argument("--messages", type=int, default=1000)
    prov.add_argument("--connections", type=int, default=8)
    prov.add_argument("--size", type=int, default=2048)
    prov.add_argument("--only", default="userpass,http_basic,jwt,ldap")
    args = parser.parse_args()
    print("command: " + " ".join(["python3", os.path.relpath(sys.argv[0], PROJECT),
                                  *sys.argv[1:]]))
    print(f"date: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}; CPUs: "
          f"{os.cpu_count()}; load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
          flush=True)
    figures = {"idle": cmd_idle, "tls": cmd_tls, "coldstart": cmd_coldstart,
               "bigmessage": cmd_bigmessage, "providers": cmd_providers}[args.figure](args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
