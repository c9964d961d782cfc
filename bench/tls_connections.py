"""The relay's CPU per STARTTLS connection, variants measured in alternation.

    python bench/tls_connections.py [--connections 1000] [--rounds 5]
        [--variant NAME:KEY=VALUE,...]... [--profile DIR] [--hold SECONDS] [--json FILE]

Each variant is one ``twistd -n esmtpfa`` relaying to ``smtp-sink``, started with the
options ``bench/compare.py`` gives its esmtpfa target, and kept running; the rounds then
take the variants in turn (A B C A B C ...), so that a slow moment of the shared machine
falls on all of them alike.  A round opens ``--connections`` connections one after the
other, each: greeting, EHLO, STARTTLS (RFC 3207), the handshake, EHLO, AUTH PLAIN, one
message, QUIT.  What is counted is the relay's CPU time over the round, from
``/proc/PID/task/*/schedstat`` (nanoseconds on a CPU, every thread of the relay's
process tree): not wall time, which a noisy neighbour changes.

Variant keys (default first):

* ``cert=rsa|ecdsa|both``: the relay's certificate (RSA-2048, ECDSA P-256, or both at
  once, chosen by the client's signature algorithms);
* ``curve=``: the client's key exchange group (``X25519``, ``prime256v1``);
* ``tls=1.3|1.2``: the version the client asks for;
* ``resume=no|yes``: offer the previous connection's session (TLS 1.3 ticket);
* ``starttls=yes|no``: ``no`` measures the same session without TLS;
* ``workers=N``: ``--workers N`` (the CPU of the supervisor and its workers is counted;
  with ``resume=yes`` the count of resumed sessions shows the one-in-N of
  docs/workers.md);
* ``tree=DIR``: a directory put first on the relay's ``PYTHONPATH`` (a copy of an
  older ``esmtpfa`` package, to compare code before and after a change).

With ``--profile DIR`` ``py-spy record`` watches each relay once it listens (collapsed
stacks, ``DIR/NAME.txt``, written when the relay stops; with ``workers=N`` every process
of the relay, each stack under its process; the CPU figures then include
py-spy's interruptions, so compare them only with each other).  ``--hold`` prints the
relays' pids and waits before the rounds, for ``strace -c -p`` or ``perf record -p``:
py-spy samples time spent in a system call as busy, ``perf`` counts CPU.
"""

from __future__ import annotations

import argparse
import base64
import glob
import json
import os
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from loadgen import (  # noqa: E402  (the bench directory is not a package)
    PASSWORD,
    USER,
    child_environment,
    esmtpfa_arguments,
    free_port,
    message_of,
    start_sink,
    stop,
    tree_pids,
    twistd_command,
)

DEFAULTS = {"cert": "rsa", "curve": "", "tls": "1.3", "resume": "no",
            "starttls": "yes", "workers": "", "tree": ""}
MESSAGE = message_of(1024) + b".\r\n"


def make_certificates(directory: str) -> dict[str, tuple[str, str]]:
    """Self-signed ``bench.test`` certificates: RSA-2048 and ECDSA P-256."""
    made = {}
    for kind, newkey in (("rsa", ["-newkey", "rsa:2048"]),
                         ("ecdsa", ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"])):
        cert, key = (os.path.join(directory, f"{kind}.crt"),
                     os.path.join(directory, f"{kind}.key"))
        subprocess.run(["openssl", "req", "-x509", *newkey, "-nodes", "-sha256", "-days",
                        "2", "-subj", "/CN=bench.test", "-addext",
                        "subjectAltName=DNS:bench.test", "-keyout", key, "-out", cert],
                       check=True, capture_output=True, timeout=60)
        made[kind] = (cert, key)
    return made


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, spec = text.partition(":")
    settings = dict(DEFAULTS)
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        if key not in DEFAULTS:
            raise SystemExit(f"--variant {text!r}: unknown key {key!r}")
        settings[key] = value
    return name, settings


def task_cpu_ns(root: int) -> int:
    """Nanoseconds on a CPU of every thread of ``root``'s process tree."""
    total = 0
    for pid in tree_pids(root):
        for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
            try:
                with open(path) as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                pass
    return total


class Relay:
    def __init__(self, name: str, settings: dict[str, str], sink_port: int,
                 certificates: dict[str, tuple[str, str]], profile: str | None):
        self.name, self.settings = name, settings
        self.workdir = tempfile.mkdtemp(prefix=f"esmtpfa-tlsbench-{name}-")
        self.port = free_port()
        arguments = esmtpfa_arguments(self.port, sink_port, self.workdir, "warn")
        if settings["starttls"] == "yes":
            kinds = ["rsa", "ecdsa"] if settings["cert"] == "both" else [settings["cert"]]
            cert, key = certificates[kinds[0]]
            arguments += ["--tls-cert", cert, "--tls-key", key]
            if len(kinds) > 1:
                arguments += ["--tls-sni-certs", ":".join(certificates[kinds[1]])]
        if settings["workers"]:
            arguments += ["--workers", settings["workers"]]
        env = child_environment()
        if settings["tree"]:
            env["PYTHONPATH"] = os.pathsep.join(
                filter(None, [settings["tree"], env.get("PYTHONPATH", "")]))
        command = twistd_command(arguments)
        self.log = open(os.path.join(self.workdir, "relay.out"), "wb")
        self.process = subprocess.Popen(command, env=env, cwd=self.workdir,
                                        stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                    if s.recv(100).startswith(b"220"):
                        break
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"relay {name} did not start; see {self.workdir}")
            time.sleep(0.1)
        self.profiler: subprocess.Popen | None = None
        if profile:  # attached once the relay listens: start-up is not profiled
            os.makedirs(profile, exist_ok=True)
            self.profiler = subprocess.Popen(
                [os.path.join(os.path.dirname(sys.executable), "py-spy"), "record",
                 "--pid", str(self.process.pid), "--rate", "1000",
                 *(["--subprocesses"] if self.settings["workers"] else []),
                 "--format", "raw", "-o", os.path.join(profile, f"{name}.txt")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1)
        self.client = self.client_context()
        self.session: ssl.SSLSession | None = None
        self.resumed = 0

    def client_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        version = (ssl.TLSVersion.TLSv1_3 if self.settings["tls"] == "1.3"
                   else ssl.TLSVersion.TLSv1_2)
        context.minimum_version = context.maximum_version = version
        if self.settings["curve"]:
            context.set_ecdh_curve(self.settings["curve"])
        return context

    def measured_pid(self) -> int:
        return self.process.pid

    def one(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as raw:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            stream = raw.makefile("rb")

            def reply(sock_stream) -> int:
                while True:
                    line = sock_stream.readline()
                    if not line:
                        raise ConnectionError("closed")
                    if line[3:4] != b"-":
                        return int(line[:3])

            def command(conn, sock_stream, line: bytes) -> int:
                conn.sendall(line)
                return reply(sock_stream)

            assert reply(stream) == 220
            assert command(raw, stream, b"EHLO bench.example\r\n") == 250
            conn: socket.socket = raw
            if self.settings["starttls"] == "yes":
                assert command(raw, stream, b"STARTTLS\r\n") == 220
                resume = self.session if self.settings["resume"] == "yes" else None
                conn = self.client.wrap_socket(raw, server_hostname="bench.test",
                                               session=resume)
                stream = conn.makefile("rb")
                assert command(conn, stream, b"EHLO bench.example\r\n") == 250
            token = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode())
            assert command(conn, stream, b"AUTH PLAIN " + token + b"\r\n") == 235
            conn.sendall(b"MAIL FROM:<bench@example.com>\r\n"
                         b"RCPT TO:<sink@example.net>\r\nDATA\r\n")
            assert [reply(stream) for _ in range(3)] == [250, 250, 354]
            conn.sendall(MESSAGE)
            code = reply(stream)
            assert code == 250, code
            assert command(conn, stream, b"QUIT\r\n") == 221
            if conn is not raw:
                self.resumed += conn.session_reused
                self.session = conn.session  # TLS 1.3: the ticket came after the handshake
                stream.close()
                conn.close()

    def round(self, connections: int) -> float:
        """Relay CPU microseconds per connection over ``connections`` connections."""
        self.one()  # warm: the first connection of a round is not counted
        before = task_cpu_ns(self.measured_pid())
        for _ in range(connections):
            self.one()
        time.sleep(0.05)  # the last QUIT's close, counted with its connection
        return (task_cpu_ns(self.measured_pid()) - before) / connections / 1000

    def close(self) -> None:
        if self.profiler is not None:  # py-spy writes its profile on SIGINT
            self.profiler.send_signal(signal.SIGINT)
            try:
                self.profiler.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.profiler.kill()
        stop(self.process)
        self.log.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--variant", action="append", default=[],
                        help="NAME:KEY=VALUE,... (repeat; default: one RSA variant)")
    parser.add_argument("--profile", metavar="DIR",
                        help="run each relay under py-spy record, flame graphs to DIR")
    parser.add_argument("--json", help="write the results there too")
    parser.add_argument("--hold", type=float, default=0, metavar="SECONDS",
                        help="print the relays' pids and wait before the rounds (to "
                             "attach strace or perf)")
    args = parser.parse_args()
    variants = [parse_variant(v) for v in args.variant or ["rsa:"]]
    directory = tempfile.mkdtemp(prefix="esmtpfa-tlsbench-")
    sink_port = free_port()
    sink = start_sink(sink_port)
    relays: list[Relay] = []
    results: dict[str, list[float]] = {name: [] for name, _ in variants}
    try:
        certificates = make_certificates(directory)
        relays = [Relay(name, settings, sink_port, certificates, args.profile)
                  for name, settings in variants]
        if args.hold:
            print(" ".join(f"{r.name}={r.process.pid}" for r in relays), flush=True)
            time.sleep(args.hold)
        for number in range(args.rounds):
            for relay in relays:
                results[relay.name].append(round(relay.round(args.connections), 1))
            print(f"round {number + 1}: " + ", ".join(
                f"{name} {values[-1]:.0f} us" for name, values in results.items()),
                flush=True)
    finally:
        for relay in relays:
            relay.close()
        stop(sink)
        shutil.rmtree(directory, ignore_errors=True)
    summary = {}
    for relay in relays:
        values = results[relay.name]
        summary[relay.name] = {
            "settings": relay.settings, "us_per_connection": values,
            "median": round(statistics.median(values), 1),
            "min": min(values), "max": max(values),
            "resumed": relay.resumed}
    reference = results[relays[0].name]
    first = statistics.median(reference)
    print(f"relay CPU per connection, {args.connections} connections x {args.rounds} "
          "rounds, alternated (median [min-max], ratio to the first, and the median of "
          "the differences to the first within each round):")
    for name, row in summary.items():
        # A slow moment of the machine falls on one round of every variant: the
        # differences within a round are steadier than the medians apart.
        row["paired_difference"] = statistics.median(
            mine - theirs for mine, theirs in zip(results[name], reference, strict=True))
        print(f"  {name:24} {row['median']:7.0f} us  [{row['min']:.0f}-{row['max']:.0f}]  "
              f"x{row['median'] / first:.2f}  {row['paired_difference']:+5.0f} us  "
              f"resumed {row['resumed']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
