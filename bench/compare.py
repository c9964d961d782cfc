#!/usr/bin/env python3
"""esmtpfa against Postfix and against the ceiling: one command, one run.

Run on demand from the repository root (not a test; needs root for the private Postfix,
and the Debian packages postfix, sasl2-bin and libsasl2-modules)::

    python3 bench/compare.py [--connections 20] [--per-connection 250] [--size 2048]
                             [--rounds 5] [--workers N] [--modes sequential,pipelined]
                             [--burst 500,1000] [--burst-messages 10] [--generators 2]
                             [--targets smtp-sink,postfix,esmtpfa-1,esmtpfa-N] [--json F]

The same load generator (``bench/loadgen.py``) drives every target, in these modes:

* ``sequential``: one command at a time, each reply awaited (as smtplib sends);
* ``pipelined``: MAIL, RCPT and DATA in one write (RFC 2920).

AUTH PLAIN once per connection; by default 20 connections x 250 messages of 2 KB.
Three more workloads, named in ``--modes``, are what many clients really send:

* ``per-message``: a new TCP connection for every message: banner, EHLO, AUTH PLAIN,
  MAIL, RCPT, DATA, QUIT, one command at a time (an application that opens an smtplib
  session per mail); ``--connections`` such clients at once, each sending
  ``--per-connection`` messages, each over its own connection.  The latency is the
  whole session up to the 250 after the content (QUIT not included);
* ``per-message-starttls``: the same with STARTTLS (RFC 3207) and a second EHLO before
  AUTH.  Postfix and esmtpfa then offer STARTTLS with one RSA-2048 certificate, made
  for the run; the client completes a full handshake on every connection (TLS 1.2 or
  later, no resumption, the certificate not verified), and the version and cipher
  negotiated are printed once per target.  smtp-sink offers no STARTTLS: it is not a
  target of this mode, and the generator's own CPU share (``loadgen_busy_pct``) is
  the evidence that the generator was not the limit;
* ``burst``: for each size of ``--burst`` (e.g. ``500,1000``), that many clients
  connect at once (released together from every generator process), each sending
  ``--burst-messages`` messages (default 10) on its one connection, commands one at a
  time.  A client that sees no 220 within ``--banner-timeout`` (30 s) gives up.
  Reported besides the rate: connections that failed, by kind (banner timeout, a
  refusal, a reset), the p50/p99 time to banner, and the handshakes the kernel dropped
  meanwhile because an accept queue was full (``TcpExt ListenOverflows``, counted for
  the whole machine: a client so dropped waits a second or more for a retransmission,
  which shows as a banner time near 1, 3 or 7 s).  A failed connection does not void
  the run (it is what is measured); a message acknowledged and then lost does.

The connection-heavy workloads (``per-message*`` and ``burst``) are driven by
``--generators`` processes (default 2), so that Python's CPU per connection is not the
ceiling; the reused-connection modes by one, as before.  Compare the ``smtp-sink``
rate of a workload with the relays': it must be well above theirs.

For every workload esmtpfa runs with ``--max-connections`` and
``--max-connections-per-ip`` raised above the largest number of clients at once (every
client comes from 127.0.0.1), printed at the start with the relay's upstream pool
settings (``--relay-pool-size``, ``--relay-pool-client-share``) and listen backlog,
which are left at their defaults.  Postfix runs at its defaults too (at most 100
``smtpd`` processes, ``default_process_limit``: a larger burst waits for one).
Targets, all started once at the beginning of the run and then measured in turns, all
forwarding to the same Postfix ``smtp-sink``:

* ``smtp-sink``: the generator straight to the sink, the ceiling of this machine;
* ``postfix``: a private, queueing Postfix (master, smtpd with Cyrus SASL against a
  sasldb, cleanup, qmgr, smtp to the sink through ``relayhost``), its own config and
  queue directories in /tmp, nothing of the system's Postfix used but the binaries
  (if it cannot be started, e.g. not as root, it is reported as not available);
* ``esmtpfa-1``: ``twistd -n esmtpfa`` with the default single worker, logging at
  ``info`` to its standard output, sent to a file (Postfix logs to a file too);
* ``esmtpfa-N``: the same with ``--workers N`` (default: the number of CPUs).  If the
  esmtpfa being measured does not know ``--workers`` (it exits at once), the target is
  reported as not available; the rest of the run goes on;
* ``esmtpfa-spool``, ``esmtpfa-fallback`` (asked for with ``--targets``): the delivery
  modes with the file spool in the run's directory (docs/spool.md); ``esmtpfa-amqp``:
  spool mode on the RabbitMQ of ``--amqp-url`` (``bench/rabbitmq_broker.py`` starts a
  private one).  Their CPU is counted until the sink has every message and the spool is
  settled again (the file spool's index empty; then, for every spooling target, the
  relay's CPU quiet), so a spooling relay's background delivery is in its figure, as
  Postfix's queue manager is in Postfix's.  The broker's own CPU is not in the relay's
  cgroup: with ``--amqp-broker-pid`` (the PID of ``bench/rabbitmq_broker.py``, or of
  any process whose tree holds the broker) it is counted from /proc over the same
  intervals and reported beside it (``broker_cpu_us_per_msg``), idle spinning of the
  Erlang schedulers included.

The targets take turns: each connection's messages are sent in ``--rounds`` slices
(default 5 x 50), every round runs every target once, and each round starts with another
target, so a burst of outside load on this shared machine falls on all targets alike.
The figures merge the rounds (rate over the summed load time; the per-round rates are
printed too, as a measure of the noise).  A short warm-up per target comes first.

Reported for each target and mode: messages per second, p50 and p99 of the time from
MAIL to the 250 after the content (from the connect, for ``per-message*``), and the
relay's CPU per delivered message.

CPU is counted over every process of a relay, including processes that started and
exited during the measurement (Postfix's smtpd, cleanup and smtp come and go; esmtpfa's
workers may be restarted): each relay is started inside its own cgroup (``cpuacct``),
and its usage is read before the load and after the last message arrived at the sink
(for Postfix, whose 250 means "queued", after its queue is empty again).  Where no
cgroup can be made, the tree under the relay's first process is summed from /proc,
live processes plus the children they have waited for (``loadgen.tree_cpu_seconds``);
the script says which method it used, and prints the /proc count next to the cgroup's
(``proc_tree_cpu_s``) as a cross-check.  ``cpu_by_role_s`` splits esmtpfa's CPU
between its main process (the supervisor, with workers) and its workers, and
``machine_pct`` gives the whole machine's busy, idle and steal shares (/proc/stat) while
each target's load ran: a run with no idle CPU left is bound by the machine, not by
the relay alone.

Every message carries a unique ``X-Bench-Id`` header; the sink appends every message it
accepts to one dump file (``smtp-sink -D``), and the script checks that each id
acknowledged with 250 is there.  If any is missing (after a bounded wait), or a target
failed during its load, it prints what is missing and exits with status 2 *without*
printing the figures.

The machine has two cores, shared by the generator, the sink, the relay and whatever
else runs there: read the ratios measured within the run, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from loadgen import (  # noqa: E402
    CLK_TCK,
    PASSWORD,
    PROJECT,
    USER,
    CpuMeter,
    SinkDump,
    child_environment,
    esmtpfa_arguments,
    free_port,
    greeting,
    insecure_tls_client,
    listen_overflows,
    load_in_processes,
    machine_share,
    machine_ticks,
    percentile,
    raise_nofile,
    start_sink,
    stop,
    tree_cpu_seconds,
    twistd_command,
    wait_for_spool,
)

sys.path.insert(0, PROJECT)
from tests.support.postfix import main_cf, settle, write_cyrus_sasl  # noqa: E402

POSTFIX_HOSTNAME = "postfix.test"
REUSED = ("sequential", "pipelined")
# What esmtpfa's --print-config says of the limits a connection-heavy load meets.
LIMITS = ("max-connections", "max-connections-per-ip", "listen-backlog", "relay-pool-size",
          "relay-pool-client-share", "rate-messages", "workers")


class Workload:
    """One mode of ``--modes``: how the generator's clients talk to every target.

    ``clients`` connect at once and each sends ``per_client`` messages per round, over
    one connection or (``reconnect``) a new connection for each; ``smtp`` is the
    command style of loadgen's ``Client`` (``sequential`` or ``pipelined``)."""

    def __init__(self, name: str, smtp: str, clients: int, per_client: int,
                 generators: int = 1, reconnect: bool = False, starttls: bool = False,
                 burst: bool = False, banner_timeout: float | None = None):
        self.name = name
        self.smtp = smtp
        self.clients = clients
        self.per_client = per_client
        self.generators = generators
        self.reconnect = reconnect
        self.starttls = starttls
        self.burst = burst
        self.banner_timeout = banner_timeout

    def messages(self) -> int:
        return self.clients * self.per_client

    def refuses(self, target: Target) -> str | None:
        """Why ``target`` cannot run this workload, or None."""
        if self.starttls and isinstance(target, Ceiling):
            return "smtp-sink offers no STARTTLS"
        return None

    def warm_up(self, connections: int, per_client: int) -> Workload:
        """A short load of the same kind, not a burst: the relay's pools and code
        paths warmed before the first measured round."""
        return Workload(f"warm.{self.name}", self.smtp, connections, per_client,
                        self.generators, self.reconnect, self.starttls)


def workloads(args) -> list[Workload]:
    """The ``--modes`` asked for, in order; ``burst`` once per ``--burst`` size."""
    per_round = args.per_connection // args.rounds
    found: list[Workload] = []
    for mode in args.modes.split(","):
        if mode in REUSED:
            found.append(Workload(mode, mode, args.connections, per_round))
        elif mode in ("per-message", "per-message-starttls"):
            found.append(Workload(mode, "sequential", args.connections, per_round,
                                  args.generators, reconnect=True,
                                  starttls=mode.endswith("starttls")))
        elif mode == "burst":
            for size in args.burst:
                found.append(Workload(f"burst-{size}", "sequential", size,
                                      args.burst_messages, args.generators, burst=True,
                                      banner_timeout=args.banner_timeout))
        else:
            raise SystemExit(f"--modes: unknown mode {mode!r} (sequential, pipelined, "
                             f"per-message, per-message-starttls, burst)")
    return found


def make_certificate(directory: str) -> tuple[str, str]:
    """One self-signed RSA-2048 certificate and key for every STARTTLS target."""
    cert, key = os.path.join(directory, "bench.crt"), os.path.join(directory, "bench.key")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256",
                    "-days", "2", "-subj", "/CN=bench.test", "-keyout", key, "-out", cert],
                   check=True, capture_output=True, timeout=60)
    os.chmod(key, 0o600)  # read by esmtpfa and by Postfix's smtpd, both root at start
    return cert, key


class Target:
    """A relay (or the sink itself) the generator is pointed at."""

    def __init__(self, name: str):
        self.name = name
        self.port = 0
        self.meter: CpuMeter | None = None
        self.unavailable: str | None = None
        self.broker = False  # the --amqp-broker-pid's CPU is reported beside its own

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def settle(self, timeout: float) -> None:
        """Wait until the relay has nothing left to do for what it acknowledged."""


class Ceiling(Target):
    """The sink itself: no relay, no relay CPU."""

    def __init__(self, sink_port: int):
        super().__init__("smtp-sink")
        self.port = sink_port

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


def wait_for_greeting(port: int, process: subprocess.Popen, timeout: float) -> bytes | None:
    """The 220 greeting of 127.0.0.1:port, polled; None if ``process`` exited first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return None
        try:
            line = greeting(port, timeout=1.0)
            if line.startswith(b"220"):
                return line
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"nothing answered 220 on port {port} within {timeout} s")


class Esmtpfa(Target):
    """``twistd -n esmtpfa`` relaying to the sink, with ``--workers`` when ``workers``."""

    def __init__(self, name: str, sink_port: int, workdir: str, workers: int | None,
                 log_level: str, extra: list[str] | None = None,
                 spool_directory: str | None = None, spooling: bool = False,
                 max_connections: int = 1000):
        super().__init__(name)
        self.max_connections = max_connections
        self.sink_port = sink_port
        self.workdir = workdir
        self.workers = workers
        self.log_level = log_level
        self.extra = list(extra or [])
        self.spool_directory = spool_directory  # a file spool's, to see it empty
        self.spooling = spooling or spool_directory is not None
        self.process: subprocess.Popen | None = None

    def queued(self) -> int:
        """Messages in the file spool's index (0 when there is none yet)."""
        path = os.path.join(self.spool_directory, "queue.sqlite")
        if not os.path.exists(path):
            return 0
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            return connection.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
        except sqlite3.Error:
            return -1  # busy or being created: look again
        finally:
            connection.close()

    def settle(self, timeout: float) -> None:
        """A spooling relay has more to do once the sink has the message: record the
        delivery (a commit) and remove the file.  Wait for the file spool's index to be
        empty, then (any spool) for the relay's CPU to go quiet: under 2 ms in 0.25 s."""
        if not self.spooling or self.meter is None:
            return
        deadline = time.monotonic() + timeout
        if self.spool_directory is not None:
            while self.queued() != 0 and time.monotonic() < deadline:
                time.sleep(0.05)
        last = self.meter.seconds()
        while time.monotonic() < deadline:
            time.sleep(0.25)
            now = self.meter.seconds()
            if now - last < 0.002:
                return
            last = now

    def start(self) -> None:
        self.port = free_port()
        self.meter = CpuMeter(self.name)
        arguments = esmtpfa_arguments(self.port, self.sink_port, self.workdir, self.log_level)
        # Every client comes from 127.0.0.1: the per-address limit as high as the total.
        limit = str(self.max_connections)
        arguments += ["--max-connections", limit, "--max-connections-per-ip", limit]
        if self.workers is not None:
            arguments += ["--workers", str(self.workers)]
        arguments += self.extra
        self.print_limits(arguments)
        output = os.path.join(self.workdir, f"{self.name}.out")
        with open(output, "wb") as out:
            self.process = subprocess.Popen(
                twistd_command(arguments), env=child_environment(),
                cwd=self.workdir, stdout=out, stderr=subprocess.STDOUT,
                preexec_fn=self.meter.preexec)
        self.meter.adopt(self.process.pid)
        if wait_for_greeting(self.port, self.process, timeout=60) is None:
            with open(output, "rb") as f:
                said = f.read().decode("utf-8", "replace").strip()
            if self.workers is not None and "workers" in said:
                self.unavailable = ("esmtpfa refused --workers: "
                                    + said.splitlines()[-1][:160])
                return
            raise RuntimeError(f"{self.name} exited at start:\n{said[-2000:]}")
        if self.spooling:
            wait_for_spool(output, self.process)

    def print_limits(self, arguments: list[str]) -> None:
        """The limits in effect, as the relay itself reports them (``--print-config``):
        nothing raised without being said."""
        shown = subprocess.run(twistd_command(arguments + ["--print-config"]),
                               env=child_environment(), cwd=self.workdir,
                               capture_output=True, timeout=60, check=False)
        found = {}
        for line in shown.stdout.decode("utf-8", "replace").splitlines():
            key, _, rest = line.partition(" = ")
            if key.strip() in LIMITS:  # "1000  # --max-connections": value, where from
                value, _, source = rest.partition("#")
                found[key.strip()] = f"{value.strip() or '(none)'} ({source.strip()})"
        print(f"{self.name} limits: " + "; ".join(f"{k} = {found.get(k, '?')}"
                                                   for k in LIMITS), flush=True)

    def stop(self) -> None:
        stop(self.process, grace=30)
        if self.meter is not None:
            self.meter.close()


class Postfix(Target):
    """A private queueing Postfix with Cyrus SASL, relaying everything to the sink.

    Configured with ``tests/support/postfix.py``'s pieces (the same ``main.cf`` core and
    SASL setup: ``saslpasswd2`` into a private sasldb, auxprop) but run as a whole Postfix:
    ``postfix -c DIR start-fg``
    keeps ``master`` in the foreground, and master starts smtpd, cleanup, qmgr, smtp
    and the rest as it needs them.  No service is chrooted (so the SASL plugins and
    /etc/hosts are reachable).  Everything else is Postfix's defaults, in_flow_delay
    and connection caching toward the sink included."""

    SERVICES = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""
    QUEUES = ("incoming", "active", "deferred", "hold", "maildrop")

    def __init__(self, sink_port: int, certificate: tuple[str, str] | None = None):
        super().__init__("postfix")
        self.sink_port = sink_port
        self.certificate = certificate
        self.directory = ""
        self.process: subprocess.Popen | None = None

    def _configure(self) -> None:
        for tool in ("postfix", "saslpasswd2"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"{tool} is missing: apt-get install postfix sasl2-bin")
        if os.geteuid() != 0:
            raise RuntimeError("a private Postfix master must be started as root")
        d = self.directory = tempfile.mkdtemp(prefix="esmtpfa-compare-postfix-")
        os.chmod(d, 0o755)
        for sub in ("queue", "data", "sasl"):
            os.makedirs(os.path.join(d, sub))
        if self.certificate is None:
            tls = "smtpd_tls_security_level = none\n"
        else:  # STARTTLS offered, as esmtpfa offers it: the same certificate
            tls = (f"smtpd_tls_security_level = may\n"
                   f"smtpd_tls_cert_file = {self.certificate[0]}\n"
                   f"smtpd_tls_key_file = {self.certificate[1]}\n")
        with open(os.path.join(d, "main.cf"), "w") as f:
            f.write(main_cf(d, user="postfix", group="postdrop", hostname=POSTFIX_HOSTNAME,
                            size_limit=209715200, more=f"""\
relayhost = [127.0.0.1]:{self.sink_port}
{tls}smtp_tls_security_level = none
"""))
        with open(os.path.join(d, "master.cf"), "w") as f:
            f.write(f"127.0.0.1:{self.port} inet n - n - - smtpd\n{self.SERVICES}")
        write_cyrus_sasl(d, POSTFIX_HOSTNAME, {USER: PASSWORD}, ("PLAIN", "LOGIN"))
        account = pwd.getpwnam("postfix")
        for name in ("sasldb2", "data"):
            os.chown(os.path.join(d, name), account.pw_uid, account.pw_gid)
        settle(d, ("main.cf", "master.cf", "sasl/smtpd.conf", "sasldb2"))
        # "check" creates the queue directories with the owners and modes Postfix wants.
        checked = subprocess.run(["postfix", "-c", d, "check"], capture_output=True,
                                 timeout=60)
        if checked.returncode != 0:
            raise RuntimeError(f"postfix check failed: {self.log()[-2000:]}")

    def start(self) -> None:
        self.port = free_port()
        self._configure()
        self.meter = CpuMeter(self.name)
        with open(os.path.join(self.directory, "start-fg.out"), "wb") as out:
            self.process = subprocess.Popen(
                ["postfix", "-c", self.directory, "start-fg"], stdout=out,
                stderr=subprocess.STDOUT, preexec_fn=self.meter.preexec,
                env={"PATH": "/usr/sbin:/usr/bin:/bin"})
        self.meter.adopt(self.process.pid)
        if wait_for_greeting(self.port, self.process, timeout=60) is None:
            raise RuntimeError(f"postfix exited at start: {self.log()[-2000:]}")

    def queued(self) -> int:
        count = 0
        for queue in self.QUEUES:
            for _, _, files in os.walk(os.path.join(self.directory, "queue", queue)):
                count += len(files)
        return count

    def settle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.queued() and time.monotonic() < deadline:
            time.sleep(0.1)

    def log(self) -> str:
        try:
            with open(os.path.join(self.directory, "maillog"), "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            subprocess.run(["postfix", "-c", self.directory, "stop"], capture_output=True,
                           timeout=60)
            stop(self.process, grace=20)
        if self.meter is not None:
            # Daemons that outlived master (they exit on their own soon after).
            for pid in self.meter.pids():
                try:
                    os.kill(pid, 15)
                except OSError:
                    pass
            self.meter.close()
        shutil.rmtree(self.directory, ignore_errors=True)


def cpu_by_role(target: Target) -> dict[str, float]:
    """CPU seconds of esmtpfa's live processes by role: its first process ("main",
    the supervisor when there are workers) and the others ("workers").  A diagnosis
    only: the total (``cpu_s``) is what counts.  Not done for Postfix, where exited
    children move into their parent's cutime and the split would mislead."""
    if not isinstance(target, Esmtpfa) or target.meter is None:
        return {}
    roles: dict[str, float] = {}
    for pid in target.meter.pids():
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # it just exited
        role = "main" if pid == target.meter.root else "workers"
        ticks = sum(int(fields[i]) for i in (11, 12, 13, 14))  # own + waited-for children
        roles[role] = roles.get(role, 0.0) + ticks / CLK_TCK
    return roles


def measure(target: Target, sink: SinkDump, args, workload: Workload, tag: str) -> dict:
    """One load against one target; CPU from before the load until the sink has every
    acknowledged message and the relay is idle again."""
    cpu_before = target.meter.seconds() if target.meter else 0.0
    # The /proc count as well, as a cross-check of the cgroup's (see loadgen.CpuMeter).
    tree_before = tree_cpu_seconds(target.meter.root) if target.meter else 0.0
    split_before = cpu_by_role(target)
    broker = args.broker_pid if target.broker else None
    broker_before = tree_cpu_seconds(broker) if broker else 0.0
    machine_before = machine_ticks()
    overflows_before = listen_overflows()
    result = load_in_processes(
        workload.generators, target.port, workload.clients, workload.messages(),
        args.size, tag=tag, mode=workload.smtp, login_per_message=workload.reconnect,
        starttls=insecure_tls_client() if workload.starttls else None,
        banner_timeout=workload.banner_timeout)
    loaded = time.monotonic()
    result["listen_overflows"] = listen_overflows() - overflows_before
    result["machine_pct"] = machine_share(machine_before, machine_ticks())
    if target.meter is not None:
        result["processes"] = len(target.meter.pids())  # at the end of the load
    generator_cpu = result.pop("generator_cpu_s")
    # The generator's processes' CPU over the load's time: near 100 % it is the limit.
    result["loadgen_busy_pct"] = round(
        100 * generator_cpu / max(1e-9, result["seconds"] * workload.generators), 1)
    acknowledged = result.pop("acknowledged")
    missing = sink.wait_for(acknowledged, timeout=args.drain_timeout)
    result["drain_s"] = round(time.monotonic() - loaded, 2)
    target.settle(timeout=args.drain_timeout)
    result["acknowledged"] = len(acknowledged)
    result["delivered"] = len(acknowledged) - len(missing)
    result["missing"] = missing
    result["duplicates"] = sum(1 for i in acknowledged if sink.counts.get(i, 0) > 1)
    result["loadgen_cpu_us_per_msg"] = round(generator_cpu / max(1, len(acknowledged)) * 1e6)
    if target.meter is not None:
        relay_cpu = target.meter.seconds() - cpu_before
        result["cpu_s"] = round(relay_cpu, 3)
        result["cpu_us_per_msg"] = round(relay_cpu / max(1, result["delivered"]) * 1e6)
        split_after = cpu_by_role(target)
        result["cpu_by_role_s"] = {
            role: round(split_after[role] - split_before.get(role, 0.0), 3)
            for role in sorted(split_after)}
        if target.meter.kind != "proc":
            result["proc_tree_cpu_s"] = round(
                tree_cpu_seconds(target.meter.root) - tree_before, 3)
    if broker:
        result["broker_cpu_s"] = round(tree_cpu_seconds(broker) - broker_before, 3)
    return result


def check(result: dict, target: Target, when: str, failures: list[str],
          burst: bool = False) -> None:
    """Note what makes the run unreportable: an acknowledged message missing at the
    sink, or a client that failed (except in a burst, where failed connections are
    what is measured: they are counted and printed instead)."""
    if result["missing"]:
        failures.append(f"{target.name} ({when}): {len(result['missing'])} of "
                        f"{result['acknowledged']} acknowledged messages are missing at "
                        f"the sink, e.g. {result['missing'][:3]}")
    if result.get("errors") and burst:
        print(f"  {target.name} ({when}): {sum(result['failed'].values())} of "
              f"{result['clients']} connections failed: {result['failed']}; "
              f"e.g. {result['errors'][:3]}", flush=True)
    elif result.get("errors"):
        failures.append(f"{target.name} ({when}): the load failed: {result['errors']}")


def merge(parts: list[dict]) -> dict:
    """The rounds of one target as one result: rate over the summed load time,
    percentiles over all latencies, CPU over all delivered messages."""
    latencies = sorted(x for p in parts for x in p.get("latencies", []))
    seconds = sum(p["seconds"] for p in parts)
    merged: dict = {
        "messages": len(latencies), "seconds": round(seconds, 3),
        "msg_per_s": round(len(latencies) / seconds, 1) if seconds else 0.0,
        "rounds_msg_per_s": [round(p.get("msg_per_s", 0)) for p in parts],
        "p50_ms": round(statistics.median(latencies) * 1000, 2) if latencies else None,
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 2) if latencies else None,
        "acknowledged": sum(p["acknowledged"] for p in parts),
        "delivered": sum(p["delivered"] for p in parts),
        "duplicates": sum(p["duplicates"] for p in parts),
        "drain_s": max(p["drain_s"] for p in parts),
        "loadgen_cpu_us_per_msg": round(statistics.median(
            p["loadgen_cpu_us_per_msg"] for p in parts)),
        "loadgen_busy_pct": max(p["loadgen_busy_pct"] for p in parts),
        "clients": sum(p["clients"] for p in parts),
        "listen_overflows": sum(p["listen_overflows"] for p in parts),
    }
    banners = sorted(x for p in parts for x in p.get("banners", []))
    if banners:
        merged["banner_p50_ms"] = round(statistics.median(banners) * 1000, 2)
        merged["banner_p99_ms"] = round(percentile(banners, 0.99) * 1000, 2)
        merged["banner_max_ms"] = round(banners[-1] * 1000, 2)
    failed: dict[str, int] = {}
    for p in parts:
        for kind, count in p.get("failed", {}).items():
            failed[kind] = failed.get(kind, 0) + count
    merged["failed"] = failed
    merged["tls"] = next((p["tls"] for p in parts if "tls" in p), None)
    weights = [p["seconds"] for p in parts]
    merged["machine_pct"] = {  # while the load ran, weighted by the rounds' durations
        key: round(sum(p["machine_pct"][key] * w for p, w in zip(parts, weights, strict=True))
                   / (sum(weights) or 1), 1) for key in parts[0]["machine_pct"]}
    if "cpu_s" in parts[0]:
        cpu = sum(p["cpu_s"] for p in parts)
        merged["cpu_s"] = round(cpu, 3)
        merged["cpu_us_per_msg"] = round(cpu / max(1, merged["delivered"]) * 1e6)
        merged["processes"] = max(p["processes"] for p in parts)
        if "proc_tree_cpu_s" in parts[0]:
            merged["proc_tree_cpu_s"] = round(sum(p["proc_tree_cpu_s"] for p in parts), 3)
        if "broker_cpu_s" in parts[0]:
            broker = sum(p["broker_cpu_s"] for p in parts)
            merged["broker_cpu_s"] = round(broker, 3)
            merged["broker_cpu_us_per_msg"] = round(
                broker / max(1, merged["delivered"]) * 1e6)
        roles: dict[str, float] = {}
        for p in parts:
            for role, value in p.get("cpu_by_role_s", {}).items():
                roles[role] = round(roles.get(role, 0.0) + value, 3)
        if roles:
            merged["cpu_by_role_s"] = roles
    return merged


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "n/a"


def table(results: dict, targets: list[Target], modes: list[str], workers: int) -> str:
    lines = ["| mode | target | msg/s | p50 ms | p99 ms | relay CPU µs/msg | delivered "
             "| relay processes |", "|---|---|---|---|---|---|---|---|"]
    for mode in modes:
        for target in targets:
            reason = target.unavailable or results[mode].get(target.name, {}).get(
                "unavailable")
            if reason:
                lines.append(f"| {mode} | {target.name} | not available | | | | "
                             f"{reason} | |")
                continue
            r = results[mode][target.name]
            cpu = r.get("cpu_us_per_msg", "–")
            if "broker_cpu_us_per_msg" in r:
                cpu = f"{cpu} (+ broker {r['broker_cpu_us_per_msg']})"
            lines.append(f"| {mode} | {target.name} | {r['msg_per_s']:,.0f} | {r['p50_ms']} "
                         f"| {r['p99_ms']} | {cpu} | {r['delivered']}/{r['acknowledged']} "
                         f"| {r.get('processes', '–')} |")
    lines += ["", "| mode | ratio | measured | target |", "|---|---|---|---|"]
    n = f"esmtpfa-{workers}"
    for mode in modes:
        first = len(lines)
        row = {name: r for name, r in results[mode].items() if "unavailable" not in r}
        e1, pf, sink, en = (row.get("esmtpfa-1"), row.get("postfix"), row.get("smtp-sink"),
                            row.get(n))
        spool, fallback, amqp = (row.get("esmtpfa-spool"), row.get("esmtpfa-fallback"),
                                 row.get("esmtpfa-amqp"))

        def get(r, key):
            return r.get(key) if r else None

        def with_broker(r):
            if not r or "cpu_us_per_msg" not in r:
                return None
            return r["cpu_us_per_msg"] + r.get("broker_cpu_us_per_msg", 0)
        spooling = []
        if spool is not None:
            spooling += [
                f"| {mode} | esmtpfa-spool / postfix, msg/s | "
                f"{ratio(get(spool, 'msg_per_s'), get(pf, 'msg_per_s'))} | ≥ 1.5 |",
                f"| {mode} | esmtpfa-spool / postfix, CPU per message | "
                f"{ratio(get(spool, 'cpu_us_per_msg'), get(pf, 'cpu_us_per_msg'))} | ≤ 0.5 |",
                f"| {mode} | esmtpfa-spool / esmtpfa-1, CPU per message | "
                f"{ratio(get(spool, 'cpu_us_per_msg'), get(e1, 'cpu_us_per_msg'))} | |",
                f"| {mode} | esmtpfa-spool / smtp-sink (ceiling), msg/s | "
                f"{ratio(get(spool, 'msg_per_s'), get(sink, 'msg_per_s'))} | |",
            ]
        if fallback is not None:
            spooling += [
                f"| {mode} | esmtpfa-fallback / esmtpfa-1, CPU per message | "
                f"{ratio(get(fallback, 'cpu_us_per_msg'), get(e1, 'cpu_us_per_msg'))} "
                f"| ≤ 1.05 |",
                f"| {mode} | esmtpfa-fallback / esmtpfa-1, msg/s | "
                f"{ratio(get(fallback, 'msg_per_s'), get(e1, 'msg_per_s'))} | |",
            ]
        if amqp is not None:
            spooling += [
                f"| {mode} | esmtpfa-amqp / postfix, msg/s | "
                f"{ratio(get(amqp, 'msg_per_s'), get(pf, 'msg_per_s'))} | (reported) |",
                f"| {mode} | esmtpfa-amqp / postfix, CPU per message (relay) | "
                f"{ratio(get(amqp, 'cpu_us_per_msg'), get(pf, 'cpu_us_per_msg'))} "
                f"| (reported) |",
            ]
            if "broker_cpu_us_per_msg" in amqp:
                spooling.append(
                    f"| {mode} | esmtpfa-amqp / postfix, CPU per message (relay + broker) "
                    f"| {ratio(with_broker(amqp), get(pf, 'cpu_us_per_msg'))} "
                    f"| (reported) |")
        lines += [
            f"| {mode} | esmtpfa-1 / postfix, msg/s | "
            f"{ratio(get(e1, 'msg_per_s'), get(pf, 'msg_per_s'))} | ≥ 2.0 |",
            f"| {mode} | esmtpfa-1 / postfix, p99 | "
            f"{ratio(get(e1, 'p99_ms'), get(pf, 'p99_ms'))} | ≤ 0.5 |",
            f"| {mode} | esmtpfa-1 / postfix, CPU per message | "
            f"{ratio(get(e1, 'cpu_us_per_msg'), get(pf, 'cpu_us_per_msg'))} | ≤ 0.25 |",
            f"| {mode} | esmtpfa-1 / smtp-sink (ceiling), msg/s | "
            f"{ratio(get(e1, 'msg_per_s'), get(sink, 'msg_per_s'))} | |",
            f"| {mode} | postfix / smtp-sink (ceiling), msg/s | "
            f"{ratio(get(pf, 'msg_per_s'), get(sink, 'msg_per_s'))} | |",
        ]
        if en is not None:
            lines += [
                f"| {mode} | {n} / esmtpfa-1, msg/s | "
                f"{ratio(get(en, 'msg_per_s'), get(e1, 'msg_per_s'))} | ≥ 1.3 (2 workers) |",
                f"| {mode} | {n} / esmtpfa-1, CPU per message | "
                f"{ratio(get(en, 'cpu_us_per_msg'), get(e1, 'cpu_us_per_msg'))} | ≤ 1.10 |",
                f"| {mode} | {n} / postfix, msg/s | "
                f"{ratio(get(en, 'msg_per_s'), get(pf, 'msg_per_s'))} | |",
            ]
        lines += spooling
        if mode not in REUSED:  # the targets were set for the reused-connection modes
            lines[first:] = [line.rsplit("|", 2)[0] + "| |" for line in lines[first:]]
    bursts = [m for m in modes if m.startswith("burst-")]
    if bursts:
        lines += ["", ("| burst | target | msg/s | connections failed (of) | by kind "
                       "| banner p50 ms | banner p99 ms | banner max ms "
                       "| handshakes dropped (listen queue full) |"),
                  "|---|---|---|---|---|---|---|---|---|"]
        for mode in bursts:
            for target in targets:
                r = results[mode].get(target.name)
                if target.unavailable or not r or "unavailable" in r:
                    continue
                failed = r["failed"]
                lines.append(
                    f"| {mode} | {target.name} | {r['msg_per_s']:,.0f} "
                    f"| {sum(failed.values())} ({r['clients']}) "
                    f"| {', '.join(f'{k}: {v}' for k, v in failed.items()) or '–'} "
                    f"| {r.get('banner_p50_ms')} | {r.get('banner_p99_ms')} "
                    f"| {r.get('banner_max_ms')} | {r['listen_overflows']} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--per-connection", type=int, default=250)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2,
                        help="workers of the esmtpfa-N target (default: CPUs)")
    parser.add_argument("--modes", default="sequential,pipelined",
                        help="comma-separated: sequential, pipelined (reused connections), "
                             "per-message, per-message-starttls (a connection per "
                             "message), burst (one per --burst size)")
    parser.add_argument("--burst", default="500,1000",
                        type=lambda v: [int(x) for x in v.split(",")],
                        help="clients connecting at once in the burst mode, "
                             "comma-separated sizes (default 500,1000)")
    parser.add_argument("--burst-messages", type=int, default=10,
                        help="messages each burst client sends on its connection")
    parser.add_argument("--banner-timeout", type=float, default=30.0,
                        help="a burst client gives up without a 220 by then (seconds)")
    parser.add_argument("--generators", type=int, default=2,
                        help="generator processes for the per-message and burst modes "
                             "(default 2; the reused-connection modes use one)")
    parser.add_argument("--targets", default="smtp-sink,postfix,esmtpfa-1,esmtpfa-N",
                        help="also: esmtpfa-spool and esmtpfa-fallback (the delivery modes "
                             "with the file spool, docs/spool.md), esmtpfa-amqp (spool mode "
                             "on --amqp-url)")
    parser.add_argument("--amqp-url", help="the RabbitMQ of the esmtpfa-amqp target")
    parser.add_argument("--amqp-broker-pid", dest="broker_pid", type=int,
                        help="a process whose tree holds that broker (e.g. the PID of "
                             "bench/rabbitmq_broker.py): its CPU is reported beside the "
                             "esmtpfa-amqp target's")
    parser.add_argument("--rounds", type=int, default=5,
                        help="the messages of each connection are sent in this many "
                             "slices, the targets taking turns (default 5; a remainder "
                             "of --per-connection / --rounds is not sent)")
    parser.add_argument("--warmup", type=int, default=10,
                        help="messages per connection sent (and checked) before measuring")
    parser.add_argument("--drain-timeout", type=float, default=120.0,
                        help="longest wait for acknowledged messages to reach the sink")
    parser.add_argument("--log-level", default="info", help="esmtpfa's --log-level")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    plan = workloads(args)
    modes = [w.name for w in plan]
    most = max(w.clients for w in plan)
    # Headroom over the largest number of clients at once (a closing connection of the
    # previous load may still count), never below the 1000 measured until now.
    max_connections = max(1000, 2 * most)
    raise_nofile(4 * max_connections + 1024)  # the generator's sockets, and the relays'
    wanted = args.targets.split(",")
    shown = [a.replace(args.amqp_url, "amqp://USER:PASSWORD@…") if args.amqp_url else a
             for a in sys.argv[1:]]  # no broker credentials in the output
    command = " ".join(["python3", os.path.relpath(sys.argv[0], PROJECT), *shown])
    print(f"command: {command}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}; "
          f"CPUs: {os.cpu_count()}; load average before: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)

    workdir = tempfile.mkdtemp(prefix="esmtpfa-compare-")
    os.chmod(workdir, 0o777)  # smtp-sink runs as nobody and appends to its dump here
    sink_port = free_port()
    dump = SinkDump(os.path.join(workdir, "sink.dump"))
    certificate = make_certificate(workdir) if any(w.starttls for w in plan) else None
    tls_arguments = ["--tls-cert", certificate[0], "--tls-key", certificate[1]] \
        if certificate else []
    sink_meter = CpuMeter("sink")
    sink_process = None
    candidates = [Ceiling(sink_port), Postfix(sink_port, certificate),
                  Esmtpfa("esmtpfa-1", sink_port, workdir, None, args.log_level,
                          tls_arguments, max_connections=max_connections),
                  Esmtpfa(f"esmtpfa-{args.workers}", sink_port, workdir, args.workers,
                          args.log_level, tls_arguments, max_connections=max_connections),
                  Esmtpfa("esmtpfa-spool", sink_port, workdir, None, args.log_level, [
                      "--delivery-mode", "spool",
                      "--spool-url", f"file://{workdir}/spool-spool", *tls_arguments],
                      spool_directory=f"{workdir}/spool-spool",
                      max_connections=max_connections),
                  Esmtpfa("esmtpfa-fallback", sink_port, workdir, None, args.log_level, [
                      "--delivery-mode", "fallback",
                      "--spool-url", f"file://{workdir}/spool-fallback", *tls_arguments],
                      spool_directory=f"{workdir}/spool-fallback",
                      max_connections=max_connections)]
    if args.amqp_url:
        amqp = Esmtpfa("esmtpfa-amqp", sink_port, workdir, None, args.log_level,
                       ["--delivery-mode", "spool", "--spool-url", args.amqp_url,
                        *tls_arguments], spooling=True, max_connections=max_connections)
        amqp.broker = True
        candidates.append(amqp)
    aliases = {"esmtpfa-N": f"esmtpfa-{args.workers}"}
    targets = [t for t in candidates if t.name in {aliases.get(w, w) for w in wanted}]
    results: dict = {mode: {} for mode in modes}
    failures: list[str] = []
    try:
        sink_process = start_sink(sink_port, dump=dump.path, preexec_fn=sink_meter.preexec)
        sink_meter.adopt(sink_process.pid)
        for target in targets:
            try:
                target.start()
            except RuntimeError as error:
                if not isinstance(target, Postfix):
                    raise  # without esmtpfa there is nothing to compare
                target.unavailable = str(error).splitlines()[0][:160]
            state = f"not available ({target.unavailable})" if target.unavailable else \
                f"port {target.port}"
            print(f"started {target.name}: {state}", flush=True)
        method = next((t.meter.kind for t in targets if t.meter), "none")
        print(f"relay CPU counted with: {method}", flush=True)
        for workload in plan:
            mode = workload.name
            running = []
            for target in targets:
                if target.unavailable:
                    continue
                reason = workload.refuses(target)
                if reason:
                    results[mode][target.name] = {"unavailable": reason}
                else:
                    running.append(target)
            for target in running:
                if args.warmup:
                    warm = measure(target, dump, args,
                                   workload.warm_up(args.connections, args.warmup),
                                   f"warm.{mode}.{target.name}")
                    check(warm, target, f"{mode}, warm-up", failures)
            slices: dict[str, list[dict]] = {t.name: [] for t in running}
            for round_ in range(args.rounds):
                # Interleaved, and each round starts with another target: a burst of
                # load from outside this benchmark falls on all of them alike.
                shift = round_ % len(running)
                for target in running[shift:] + running[:shift]:
                    part = measure(target, dump, args, workload,
                                   f"{mode}.{target.name}.r{round_}")
                    check(part, target, f"{mode}, round {round_ + 1}", failures,
                          burst=workload.burst)
                    slices[target.name].append(part)
            for target in running:
                result = merge(slices[target.name])
                results[mode][target.name] = result
                tls = f"; TLS {' '.join(result['tls'])}" if result["tls"] else ""
                print(f"measured {target.name} ({mode}): {result['acknowledged']} "
                      f"acknowledged, {result['delivered']} found at the sink; msg/s per "
                      f"round {result['rounds_msg_per_s']}; generator busy "
                      f"{result['loadgen_busy_pct']} % x {workload.generators}{tls}",
                      flush=True)
    finally:
        for target in reversed(targets):
            try:
                target.stop()
            except Exception as e:  # keep stopping the others
                print(f"stopping {target.name}: {e}", file=sys.stderr)
        stop(sink_process)
        sink_meter.close()
        shutil.rmtree(workdir, ignore_errors=True)

    if failures:
        print("\nREFUSED: no figures are reported, because:", file=sys.stderr)
        for failure in failures:
            print(f"  {failure}", file=sys.stderr)
        return 2
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print()
    print(table(results, targets, modes, args.workers))
    print()
    for target in targets:
        if isinstance(target, Esmtpfa) and target.workers and target.workers > 1 and any(
                results[m].get(target.name, {}).get("processes") == 1 for m in modes):
            print(f"note: {target.name} accepted --workers {target.workers} but ran as one "
                  f"process: its figures are those of a single process")
    for mode in modes:
        for name, r in results[mode].items():
            extra = {k: r[k] for k in ("rounds_msg_per_s", "machine_pct", "seconds",
                                       "drain_s",
                                       "duplicates", "cpu_s", "broker_cpu_s",
                                       "proc_tree_cpu_s", "cpu_by_role_s",
                                       "loadgen_cpu_us_per_msg", "loadgen_busy_pct", "tls",
                                       "listen_overflows", "unavailable") if r.get(k)}
            print(f"{mode:10} {name:12} {extra}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": command, "results": results,
                       "unavailable": {t.name: t.unavailable for t in targets
                                       if t.unavailable}}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
