"""The benchmarks' shared SMTP load generator, smtp-sink and process accounting.

Not run on its own: ``relay_throughput.py``, ``twisted_floor.py``, ``compare.py`` and
``scale.py`` import it, so every target of a comparison is driven by the same client code.

The generator is plain asyncio (it shares the machine's two cores with the relay under
test, so it must stay cheap) and speaks two ways:

* ``pipelined``: MAIL, RCPT and DATA in one write (RFC 2920), then the content;
  what a bulk sender does;
* ``sequential``: one command at a time, each reply awaited before the next command,
  as ``smtplib`` and most application clients send.

Either way AUTH PLAIN is done once per connection, unless ``login_per_message`` asks for
a new connection and a new login for every message (the cost of a login).  With
``starttls`` the client upgrades each connection (RFC 3207) before AUTH: a full TLS
handshake per connection, no session resumption, the certificate not verified (the
benchmark runs on loopback against its own certificate).

Each client measures its time to banner (from the start of the TCP connect to the 220)
and gives up after ``banner_timeout``; ``load_in_processes`` spreads the clients of one
load over several generator processes, so that Python's cost per connection does not
become the ceiling of a connection-heavy workload.

Messages can carry a unique ``X-Bench-Id`` header (``tag``): each message acknowledged
with 250 is remembered by id, and ``SinkDump`` finds the ids in smtp-sink's dump file,
so a benchmark can prove that everything acknowledged arrived.

CPU of a relay is counted over its whole process tree by ``CpuMeter``: a cgroup
(``cpuacct`` v1, or v2's ``cpu.stat``) when this process may create one, which counts
every process ever started inside it, exited ones included; otherwise ``/proc`` (see
``tree_cpu_seconds`` for how exited children are counted there).
"""

from __future__ import annotations

import asyncio
import base64
import multiprocessing
import os
import re
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import time
from typing import Callable

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER, PASSWORD = "bench", "bench-password"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- ports and processes ---------------------------------------------------------------

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


def greeting(port: int, timeout: float = 1.0) -> bytes:
    """The first line a server sends on 127.0.0.1:port (raises OSError if none)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        return sock.recv(512)


def stop(process: subprocess.Popen | None, grace: float = 15.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; never raises."""
    if process is None or process.poll() is not None:
        return
    try:
        process.terminate()
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
    except OSError:
        pass


def child_environment() -> dict[str, str]:
    """This environment without esmtpfa's own variables: they override flags."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("SMTP_", "RELAY_", "HTTP_", "PROVIDER_", "METRICS_",
                                  "AUTH_", "RATE_", "STATE_", "LOG_"))}
    env["PYTHONPATH"] = os.environ.get("EXTRA_PATH", "") + PROJECT
    return env


def raise_nofile(wanted: int) -> int:
    """Raise this process's RLIMIT_NOFILE (children inherit it); the new soft limit.
    As root the hard limit is raised too; otherwise the soft limit stops at it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        try:
            raised = hard if hard == resource.RLIM_INFINITY or hard >= wanted else wanted
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, raised))
        except (ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# --- messages --------------------------------------------------------------------------

HEAD = b"From: bench@example.com\r\nTo: sink@example.net\r\nSubject: bench\r\n\r\n"
LINE = b"x" * 76 + b"\r\n"


def message_of(size: int) -> bytes:
    body = LINE * max(1, (size - len(HEAD)) // len(LINE))
    return HEAD + body


class Messages:
    """Messages of about ``size`` octets, each with its own ``X-Bench-Id`` when ``tag``
    is set (the body is built once; only the header line differs)."""

    def __init__(self, size: int, tag: str | None = None):
        self.fixed = message_of(size) + b".\r\n"
        self.tag = tag
        if tag is not None:
            self.body = message_of(size - 40)

    def next(self, key: str) -> tuple[str | None, bytes]:
        if self.tag is None:
            return None, self.fixed
        bench_id = f"{self.tag}.{key}"
        return bench_id, b"X-Bench-Id: " + bench_id.encode() + b"\r\n" + self.body + b".\r\n"


# --- the client ------------------------------------------------------------------------

Credentials = Callable[[int], "tuple[str, str]"]


def plain(user: str = USER, password: str = PASSWORD) -> Credentials:
    return lambda _: (user, password)


#: The default credentials: one user for every message.
PLAIN = plain()


class BannerTimeout(TimeoutError):
    """No 220 greeting within the client's ``banner_timeout`` (connect included)."""


def insecure_tls_client() -> ssl.SSLContext:
    """TLS 1.2 or later, any certificate: a loopback benchmark against its own
    self-signed certificate.  The handshake is real (key exchange, the server's
    signature); only the chain is not checked."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class Client:
    """One SMTP client sending messages back to back.

    ``message``: fixed bytes (the old interface) or a ``Messages``.
    ``credentials(i)``: the user and password for the i-th login.
    ``starttls``: upgrade every connection with STARTTLS before AUTH.
    ``banner_timeout``: longest wait for the 220, connect included (a burst's measure).
    """

    def __init__(self, port: int, message: bytes | Messages, mode: str = "pipelined",
                 credentials: Credentials = PLAIN, login_per_message: bool = False,
                 name: str = "c", tls: ssl.SSLContext | None = None, timeout: float = 120.0,
                 starttls: ssl.SSLContext | None = None,
                 banner_timeout: float | None = None):
        if isinstance(message, bytes):
            fixed = message + b".\r\n"
            message = Messages(0)
            message.fixed = fixed
        if mode not in ("pipelined", "sequential"):
            raise ValueError(mode)
        self.port = port
        self.messages = message
        self.mode = mode
        self.credentials = credentials
        self.login_per_message = login_per_message
        self.name = name
        self.tls = tls
        self.timeout = timeout
        self.starttls = starttls
        self.banner_timeout = banner_timeout
        self.latencies: list[float] = []
        self.banners: list[float] = []  # seconds from connect() to the 220, each
        self.negotiated: tuple[str, str] | None = None  # (TLS version, cipher)
        self.acknowledged: list[str] = []
        self.logins = 0

    def bounded(self):
        """A deadline for one exchange (the login, a message, QUIT): one timer each, not
        one per reply, so the bound costs the shared CPU next to nothing."""
        return asyncio.timeout(self.timeout)

    async def reply(self) -> int:
        while True:
            line = await self.reader.readline()
            if not line:
                raise ConnectionError("closed")
            if line[3:4] != b"-":
                return int(line[:3])

    async def command(self, line: bytes) -> int:
        self.writer.write(line)
        return await self.reply()

    async def banner(self) -> None:
        """TCP connect (and implicit TLS, with ``tls``) up to the 220 greeting."""
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.banner_timeout):
                self.reader, self.writer = await asyncio.open_connection(
                    "127.0.0.1", self.port, ssl=self.tls, limit=1 << 20)
                sock = self.writer.get_extra_info("socket")
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                code = await self.reply()
        except TimeoutError:
            if self.banner_timeout is None:
                raise
            raise BannerTimeout(f"no banner within {self.banner_timeout:g} s") from None
        assert code == 220, code
        self.banners.append(time.perf_counter() - started)

    async def connect(self) -> None:
        await self.banner()
        code = await self.command(b"EHLO bench.example\r\n")
        assert code == 250, code
        if self.starttls is not None:
            # RFC 3207: 220, the handshake, then the session starts over with EHLO.
            code = await self.command(b"STARTTLS\r\n")
            assert code == 220, code
            await self.writer.start_tls(self.starttls, server_hostname="bench.test")
            if self.negotiated is None:
                tls = self.writer.get_extra_info("ssl_object")
                self.negotiated = (tls.version(), tls.cipher()[0])
            code = await self.command(b"EHLO bench.example\r\n")
            assert code == 250, code
        user, password = self.credentials(self.logins)
        self.logins += 1
        token = base64.b64encode(f"\0{user}\0{password}".encode())
        code = await self.command(b"AUTH PLAIN " + token + b"\r\n")
        assert code in (235, 250), code  # smtp-sink answers AUTH with a plain 250

    async def close(self) -> None:
        try:
            async with self.bounded():
                self.writer.write(b"QUIT\r\n")
                await self.reply()
        except (ConnectionError, TimeoutError):
            pass
        self.writer.close()

    async def send(self, key: str) -> None:
        bench_id, content = self.messages.next(key)
        started = time.perf_counter()
        if self.mode == "pipelined":
            self.writer.write(b"MAIL FROM:<bench@example.com>\r\n"
                              b"RCPT TO:<sink@example.net>\r\nDATA\r\n")
            codes = [await self.reply() for _ in range(3)]
        else:
            codes = [await self.command(b"MAIL FROM:<bench@example.com>\r\n"),
                     await self.command(b"RCPT TO:<sink@example.net>\r\n"),
                     await self.command(b"DATA\r\n")]
        assert codes == [250, 250, 354], codes
        self.writer.write(content)
        code = await self.reply()
        assert code == 250, code
        self.latencies.append(time.perf_counter() - started)
        if bench_id is not None:
            self.acknowledged.append(bench_id)

    async def run(self, count: int) -> None:
        if self.login_per_message:
            for i in range(count):
                started = time.perf_counter()
                async with self.bounded():
                    await self.connect()
                    await self.send(f"{self.name}.{i}")
                # The latency of a message with its login: connect, EHLO, AUTH and send.
                self.latencies[-1] = time.perf_counter() - started
                await self.close()
            return
        async with self.bounded():
            await self.connect()
        for i in range(count):
            async with self.bounded():
                await self.send(f"{self.name}.{i}")
        await self.close()


def percentile(sorted_values: list[float], fraction: float) -> float:
    return sorted_values[max(0, min(len(sorted_values) - 1,
                                    int(len(sorted_values) * fraction + 0.5) - 1))]


def error_kind(error: BaseException) -> str:
    """A client's failure in a few words, to count alike failures together."""
    if isinstance(error, BannerTimeout):
        return "banner timeout"
    if isinstance(error, AssertionError):
        return f"unexpected reply {error}"
    return type(error).__name__


async def load(ports: int | list[int], connections: int, messages: int, size: int,
               mode: str = "pipelined", tag: str | None = None,
               login_per_message: bool = False, credentials: Credentials = PLAIN,
               tls: ssl.SSLContext | None = None, collect_errors: bool = False,
               raw: bool = False, starttls: ssl.SSLContext | None = None,
               banner_timeout: float | None = None) -> dict:
    """``messages`` spread over ``connections`` concurrent clients (round-robin over
    ``ports``); rate and latency percentiles, and the acknowledged ids when ``tag``.

    A client that fails (an unexpected reply, a closed connection, a timeout) raises,
    unless ``collect_errors``: then the result lists the errors under ``errors``, counts
    the failed clients by kind under ``failed`` and still carries every id acknowledged
    before them, so they can be checked too.  ``raw`` adds every latency and every time
    to banner (seconds, sorted), for a caller that merges loads.  ``started`` and
    ``ended`` (``time.monotonic``, which every process of the machine shares) let loads
    run side by side in several processes be merged into one rate."""
    factory = Messages(size, tag)
    ports = [ports] if isinstance(ports, int) else ports
    clients = [Client(ports[i % len(ports)], factory, mode, credentials, login_per_message,
                      name=str(i), tls=tls, starttls=starttls,
                      banner_timeout=banner_timeout) for i in range(connections)]
    per_client = messages // connections
    started_at = time.monotonic()
    started = time.perf_counter()
    outcomes = await asyncio.gather(*(c.run(per_client) for c in clients),
                                    return_exceptions=True)
    elapsed = time.perf_counter() - started
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    if errors and not collect_errors:
        raise errors[0]
    latencies = sorted(latency for c in clients for latency in c.latencies)
    result: dict = {"messages": len(latencies), "seconds": round(elapsed, 3),
                    "started": started_at, "ended": started_at + elapsed,
                    "clients": connections}
    negotiated = next((c.negotiated for c in clients if c.negotiated), None)
    if negotiated:
        result["tls"] = list(negotiated)
    if latencies:
        result.update({
            "msg_per_s": round(len(latencies) / elapsed, 1),
            "p50_ms": round(statistics.median(latencies) * 1000, 2),
            "p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
        })
    if tag is not None:
        result["acknowledged"] = [i for c in clients for i in c.acknowledged]
    if raw:
        result["latencies"] = latencies
        result["banners"] = sorted(b for c in clients for b in c.banners)
    if errors:
        result["errors"] = sorted({f"{type(e).__name__}: {e}" for e in errors})
        failed: dict[str, int] = {}
        for error in errors:
            failed[error_kind(error)] = failed.get(error_kind(error), 0) + 1
        result["failed"] = failed
    return result


def _load_child(pipe, arguments: dict, start_at: float) -> None:
    """One generator process: its share of the load, and its own CPU, sent back.
    It starts at ``start_at`` (``time.monotonic``), with its siblings: a burst comes
    from all of them at once, not from one after the other as they were forked."""
    before = own_cpu()
    time.sleep(max(0.0, start_at - time.monotonic()))
    try:
        result = asyncio.run(load(**arguments))
        result["generator_cpu_s"] = own_cpu() - before
        pipe.send(result)
    except Exception as error:  # noqa: BLE001 - the parent reports any failure
        pipe.send({"crashed": f"{type(error).__name__}: {error}"})
    finally:
        pipe.close()


def load_in_processes(processes: int, port: int, connections: int, messages: int,
                      size: int, tag: str | None = None, **options) -> dict:
    """``load`` with its clients spread over ``processes`` forked generator processes
    started together, merged as one load: the rate over the time from the first start
    to the last end, percentiles over every latency.  The processes' own CPU is summed
    under ``generator_cpu_s``.  Each process tags its messages with its own suffix, so
    the ids stay unique.  One process: run here, no fork.

    Why processes: a connection costs Python's asyncio tens of microseconds of CPU
    (connect, the protocol objects, a TLS handshake's client half), and with a new
    connection per message one process can run out of CPU before smtp-sink does."""
    options = {**options, "raw": True, "collect_errors": True}
    if processes <= 1:
        before = own_cpu()
        result = asyncio.run(load(port, connections, messages, size, tag=tag, **options))
        result["generator_cpu_s"] = own_cpu() - before
        return result
    processes = min(processes, connections)
    per_client = messages // connections
    context = multiprocessing.get_context("fork")
    start_at = time.monotonic() + 0.1 + 0.02 * processes  # after the last fork
    children = []
    for k in range(processes):
        share = connections // processes + (1 if k < connections % processes else 0)
        receive, send = context.Pipe(duplex=False)
        arguments = dict(options, ports=port, connections=share,
                         messages=share * per_client, size=size,
                         tag=None if tag is None else f"{tag}.g{k}")
        child = context.Process(target=_load_child, args=(send, arguments, start_at),
                                daemon=True)
        child.start()
        send.close()
        children.append((child, receive))
    parts = []
    for child, receive in children:
        try:
            parts.append(receive.recv())
        except EOFError:
            parts.append({"crashed": f"generator process {child.pid} exited "
                                     f"({child.exitcode})"})
        child.join(timeout=30)
    crashed = [p["crashed"] for p in parts if "crashed" in p]
    if crashed:
        raise RuntimeError(f"a generator process failed: {crashed[0]}")
    return merge_loads(parts)


def merge_loads(parts: list[dict]) -> dict:
    """Loads that ran side by side as one: see ``load_in_processes``."""
    latencies = sorted(x for p in parts for x in p["latencies"])
    started = min(p["started"] for p in parts)
    ended = max(p["ended"] for p in parts)
    elapsed = ended - started
    result: dict = {"messages": len(latencies), "seconds": round(elapsed, 3),
                    "started": started, "ended": ended,
                    "clients": sum(p["clients"] for p in parts),
                    "generator_cpu_s": sum(p["generator_cpu_s"] for p in parts),
                    "generators": len(parts),
                    "latencies": latencies,
                    "banners": sorted(x for p in parts for x in p["banners"])}
    if latencies:
        result.update({
            "msg_per_s": round(len(latencies) / elapsed, 1),
            "p50_ms": round(statistics.median(latencies) * 1000, 2),
            "p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
        })
    if any("acknowledged" in p for p in parts):
        result["acknowledged"] = [i for p in parts for i in p.get("acknowledged", [])]
    negotiated = next((p["tls"] for p in parts if "tls" in p), None)
    if negotiated:
        result["tls"] = negotiated
    errors = sorted({e for p in parts for e in p.get("errors", [])})
    if errors:
        result["errors"] = errors
        failed: dict[str, int] = {}
        for p in parts:
            for kind, count in p.get("failed", {}).items():
                failed[kind] = failed.get(kind, 0) + count
        result["failed"] = failed
    return result


# --- smtp-sink -------------------------------------------------------------------------

def start_sink(port: int, pipelining: bool = True, dump: str | None = None,
               env: dict | None = None, preexec_fn=None) -> subprocess.Popen:
    """Postfix's ``smtp-sink`` on 127.0.0.1:port; with ``dump``, every accepted message
    is appended to that file (``-D``), which ``SinkDump`` reads."""
    sink = shutil.which("smtp-sink")
    if sink is None:
        raise SystemExit("smtp-sink is missing: apt-get install postfix")
    args = [sink, "-c"] + ([] if pipelining else ["-p"])
    if dump is not None:
        args += ["-D", dump]
    args += [f"127.0.0.1:{port}", "1024"]
    if os.geteuid() == 0:
        args[1:1] = ["-u", "nobody"]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               preexec_fn=preexec_fn)
    wait_for_port(port, process)
    return process


class SinkDump:
    """The ``X-Bench-Id`` of every message in smtp-sink's ``-D`` dump file, counted.

    smtp-sink appends each accepted transaction (its envelope, a Received header and the
    content as received) when the transaction ends; a transaction it did not accept is
    not written.  The file is read incrementally."""

    PATTERN = re.compile(rb"^X-Bench-Id: (\S+)$", re.M)

    def __init__(self, path: str):
        self.path = path
        self.offset = 0
        self.pending = b""
        self.counts: dict[str, int] = {}

    def refresh(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        self.offset += len(data)
        data = self.pending + data
        cut = data.rfind(b"\n") + 1
        self.pending = data[cut:]
        for match in self.PATTERN.finditer(data, 0, cut):
            key = match.group(1).decode()
            self.counts[key] = self.counts.get(key, 0) + 1

    def missing(self, ids: list[str]) -> list[str]:
        self.refresh()
        return [i for i in ids if i not in self.counts]

    def wait_for(self, ids: list[str], timeout: float) -> list[str]:
        """Poll until every id is in the dump or ``timeout`` passes; the missing ids."""
        deadline = time.monotonic() + timeout
        missing = self.missing(ids)
        while missing and time.monotonic() < deadline:
            time.sleep(0.1)
            self.refresh()
            missing = [i for i in missing if i not in self.counts]
        return missing


# --- CPU and memory of a process tree --------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def tree_pids(root: int) -> list[int]:
    """``root`` and its live descendants (by parent pid, from /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields is not None:
                parents.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(parents.get(pid, ()))
    return found


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds of a process tree from /proc, exited children included.

    For each live process: its own user+system time, plus ``cutime``+``cstime``, the
    times of its children that exited *and were waited for* (which include their own
    waited-for children).  A Postfix master and an esmtpfa supervisor wait for their
    children, so the tree's total only grows; the difference of two totals is the CPU
    spent in between, by processes that lived throughout, started, or exited.  Not
    counted: a child that exited without being waited for yet (a zombie still shows its
    own times, so it is counted while it is a zombie), and a process that left the tree
    by being re-parented (a daemon that double-forks)."""
    total = 0
    for pid in tree_pids(root):
        fields = _stat(pid)
        if fields is not None:
            total += sum(int(fields[i]) for i in (11, 12, 13, 14))
    return total / CLK_TCK


def machine_ticks() -> dict[str, int]:
    """The machine's CPU time so far (all CPUs, clock ticks) from /proc/stat: busy,
    idle (with iowait) and steal (taken by the hypervisor for other guests)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (values + [0] * 8)[:8]
    return {"busy": user + nice + system + irq + softirq, "idle": idle + iowait,
            "steal": steal}


def listen_overflows() -> int:
    """Handshakes the kernel dropped because a listening socket's accept queue was full
    (``TcpExt: ListenOverflows`` of /proc/net/netstat; this network namespace, every
    listener in it).  Such a client waits for a retransmission, one second or more,
    before it can see a banner: what a burst beyond a listen backlog costs."""
    try:
        with open("/proc/net/netstat") as f:
            rows = [line.split() for line in f if line.startswith("TcpExt:")]
    except OSError:
        return 0
    if len(rows) < 2 or "ListenOverflows" not in rows[0]:
        return 0
    return int(rows[1][rows[0].index("ListenOverflows")])


def machine_share(before: dict[str, int], after: dict[str, int]) -> dict[str, float]:
    """Per cent of the machine's CPU time between two ``machine_ticks``."""
    delta = {key: after[key] - before[key] for key in before}
    total = sum(delta.values()) or 1
    return {key: round(100 * value / total, 1) for key, value in delta.items()}


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class CpuMeter:
    """The CPU time of everything started inside it: a cgroup if one can be made.

    Use ``preexec`` as a child's ``preexec_fn``: the child joins the cgroup before it
    execs, and all its descendants inherit it, so the cgroup's usage counts the whole
    tree including processes that started and exited during the measurement (Postfix's
    smtp, cleanup and smtpd come and go).  Without a writable cgroup hierarchy,
    ``tree_cpu_seconds`` of ``root`` (set by the caller) is used instead."""

    V1 = "/sys/fs/cgroup/cpuacct"
    V2 = ("/sys/fs/cgroup/unified", "/sys/fs/cgroup")  # hybrid layout, then pure v2

    def __init__(self, name: str):
        self.root: int | None = None
        self.path: str | None = None
        self.kind = "proc"
        candidates = [(self.V1, "cgroup-v1")] + [(base, "cgroup-v2") for base in self.V2]
        for base, kind in candidates:
            if kind == "cgroup-v2" and not os.path.exists(
                    os.path.join(base, "cgroup.controllers")):
                continue
            if kind == "cgroup-v1" and not os.path.exists(os.path.join(base, "cpuacct.usage")):
                continue
            path = os.path.join(base, f"esmtpfa-bench-{os.getpid()}-{name}")
            try:
                os.mkdir(path)
            except OSError:
                continue
            self.path, self.kind = path, kind
            break

    def preexec(self) -> None:
        """Join the cgroup (in the child, before exec); ``adopt`` checks it worked."""
        if self.path is not None:
            try:
                with open(os.path.join(self.path, "cgroup.procs"), "w") as f:
                    f.write(str(os.getpid()))
            except OSError:
                pass

    def adopt(self, pid: int) -> None:
        """``pid`` is the first process of the tree measured; if it did not make it into
        the cgroup (not allowed to move there), count from /proc instead."""
        self.root = pid
        if self.path is not None and pid not in self.pids():
            self.close()
            self.path, self.kind = None, "proc"

    def seconds(self) -> float:
        if self.kind == "cgroup-v1":
            with open(os.path.join(self.path, "cpuacct.usage")) as f:
                return int(f.read()) / 1e9
        if self.kind == "cgroup-v2":
            with open(os.path.join(self.path, "cpu.stat")) as f:
                for line in f:
                    if line.startswith("usage_usec"):
                        return int(line.split()[1]) / 1e6
        if self.root is None:
            raise RuntimeError("CpuMeter without a cgroup needs a root pid")
        return tree_cpu_seconds(self.root)

    def pids(self) -> list[int]:
        if self.path is not None:
            with open(os.path.join(self.path, "cgroup.procs")) as f:
                return [int(line) for line in f if line.strip()]
        return tree_pids(self.root) if self.root else []

    def close(self) -> None:
        """Remove the cgroup (once its processes are gone; bounded)."""
        if self.path is None:
            return
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                os.rmdir(self.path)
                return
            except OSError:
                time.sleep(0.1)
        print(f"note: could not remove {self.path}", file=sys.stderr)


# --- esmtpfa ---------------------------------------------------------------------------

def write_providers(workdir: str) -> str:
    """The benchmark's provider file: one userpass account, tried as a fallback."""
    config = os.path.join(workdir, "providers.yaml")
    with open(config, "w") as f:
        f.write(f"providers:\n- meta: {{name: bench-users, type: userpass, fallback: true}}\n"
                f"  params: {{username: {USER}, password: {PASSWORD}}}\n")
    return config


_SPOOL_OPEN = re.compile(rb"\[esmtpfa\.spool#info\] spool .+ open\r?$", re.MULTILINE)


def wait_for_spool(log_path: str, process: subprocess.Popen, timeout: float = 60.0) -> None:
    """Until the relay's log says its spool is open (a broker's connection can take a
    moment after the port listens, and until then MAIL hears 451)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the relay exited ({process.returncode})")
        with open(log_path, "rb") as f:
            if _SPOOL_OPEN.search(f.read()):
                return
        time.sleep(0.1)
    raise RuntimeError(f"the relay's spool did not open within {timeout:g} s")


def esmtpfa_arguments(port: int, sink_port: int, workdir: str, log_level: str) -> list[str]:
    """The relay under test: plain listener, the bench account, smtp-sink as upstream."""
    return ["--plain", "--addr", "127.0.0.1", "--port", str(port), "--allow-insecure-auth",
            "--config", write_providers(workdir), "--relay-addr", "127.0.0.1",
            "--relay-port", str(sink_port), "--relay-starttls", "none",
            "--log-level", log_level, "--max-message-size", str(200 * 1024 * 1024),
            "--hostname", "bench.test", "--metrics-port", "0"]


def slow_fsync(command: list[str], delay_ms: float) -> list[str]:
    """``command`` under strace, every fsync and fdatasync ``delay_ms`` late: a disk
    whose flush takes milliseconds (a network volume), on a machine whose disk does
    not (``--seccomp-bpf``: no other system call stops)."""
    if shutil.which("strace") is None:
        raise SystemExit("--fsync-delay needs strace (apt-get install strace)")
    return ["strace", "-f", "--seccomp-bpf", "-o", "/dev/null",
            "-e", "trace=fsync,fdatasync",
            "-e", f"inject=fsync,fdatasync:delay_exit={round(delay_ms * 1000)}", *command]


def traced_child(pid: int, timeout: float = 10.0) -> int:
    """The process strace (``pid``) started: the relay (strace first forks
    short-lived copies of itself, to probe what the kernel supports)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = f.read().split()
        for child in children:
            try:
                with open(f"/proc/{child}/cmdline", "rb") as f:
                    command = f.read()
            except OSError:
                continue
            if b"twistd" in command and not command.startswith(b"strace"):
                return int(child)
        time.sleep(0.05)
    raise SystemExit("strace started no relay")


def stop_relay(process: subprocess.Popen | None, grace: float = 15.0) -> None:
    """``stop`` for a relay that may run under ``slow_fsync``: the relay itself first,
    since strace, stopped, would leave it running."""
    if process is not None and process.poll() is None and process.args[0] == "strace":
        try:
            os.kill(traced_child(process.pid, 1.0), signal.SIGTERM)
        except (OSError, SystemExit):
            pass
    stop(process, grace)


def twistd_command(arguments: list[str]) -> list[str]:
    """``twistd -n esmtpfa ARGUMENTS`` with this interpreter, logging to standard output
    (the caller sends it to a file): with ``--workers`` esmtpfa requires that, and the
    single-process relay is run the same way so both write their logs alike."""
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
            "--pidfile=", "esmtpfa", *arguments]
