#!/usr/bin/env python3
"""Measurement: idle connections that fill the HTTPS API's cap, and a real client.

    python3 bench/http_squatters.py [--tree DIR] [--seconds 20] [--connections 200]

Starts ``twistd -n esmtpfa --http`` over HTTPS from the source tree ``--tree`` (default:
this one; point it at a copy of an older tree to compare) with the default caps (200
connections, 20 per address) and deadlines.  An attacker thread keeps ``--connections``
silent TCP connections open from 13 loopback addresses (127.0.0.2 to .14), reopening
each one the relay closes at once; a real client posts one message over TLS from
127.0.0.1 every half second.  It prints how many of the client's requests were served
and how fast, and how many connections per second the attacker had to open to keep the
cap full: its cost (docs/http-limits.md, "Near the cap").
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import resource
import selectors
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.support.certs import CertificateAuthority  # noqa: E402
from tests.support.ports import free_port  # noqa: E402

PROVIDERS = """\
providers:
- meta: {name: office, type: userpass, fallback: true}
  params: {username: alice, password: "correct horse"}
"""
AUTH = "Basic " + base64.b64encode(b"alice:correct horse").decode()


def start_relay(tree: str, directory: str, port: int) -> tuple[subprocess.Popen, str]:
    ca = CertificateAuthority(os.path.join(directory, "ca"))
    leaf = ca.issue("relay.test", "localhost", "127.0.0.1")
    config = os.path.join(directory, "providers.yaml")
    with open(config, "w") as f:
        f.write(PROVIDERS)
    argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
            "--pidfile=", "esmtpfa", "--http", "--http-addr", "127.0.0.1",
            "--http-port", str(port), "--http-tls-cert", leaf.cert_path,
            "--http-tls-key", leaf.key_path, "--config", config,
            "--maildir", os.path.join(directory, "maildir"), "--metrics-addr", "127.0.0.1",
            "--metrics-port", str(free_port()), "--log-level", "warn"]
    env = dict(os.environ, PYTHONPATH=tree)
    with open(os.path.join(directory, "relay.log"), "wb") as log:
        relay = subprocess.Popen(argv, cwd=tree, env=env, stdout=log,
                                 stderr=subprocess.STDOUT)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return relay, ca.cert_path
        except OSError:
            time.sleep(0.1)
    relay.kill()
    raise SystemExit("the relay did not start listening within 20 s")


class Attacker(threading.Thread):
    """Holds ``count`` silent connections, reopening each one the relay closes."""

    def __init__(self, port: int, count: int, addresses: int = 13):
        super().__init__(daemon=True)
        self.port, self.count, self.addresses = port, count, addresses
        self.opened = 0
        self.stop = threading.Event()

    def open(self, selector: selectors.BaseSelector, index: int) -> None:
        sock = socket.socket()
        sock.bind((f"127.0.0.{2 + index % self.addresses}", 0))
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", self.port))
        selector.register(sock, selectors.EVENT_READ, index)
        self.opened += 1

    def run(self) -> None:
        selector = selectors.DefaultSelector()
        for index in range(self.count):
            self.open(selector, index)
            time.sleep(0.005)  # paced: a burst overflows the listen backlog (50)
        while not self.stop.is_set():
            for key, _ in selector.select(0.1):
                try:
                    data = key.fileobj.recv(4096)
                except OSError:
                    data = b""
                if not data:  # closed by the relay: open another at once
                    selector.unregister(key.fileobj)
                    key.fileobj.close()
                    self.open(selector, key.data)
        for key in list(selector.get_map().values()):
            key.fileobj.close()


def post(port: int, context: ssl.SSLContext) -> float | None:
    """Seconds one message took to be answered 202, or None if it was not."""
    body = json.dumps({"from": "alice@example.com", "to": ["bob@example.net"],
                       "data": base64.b64encode(b"Subject: x\r\n\r\nhi\r\n").decode()})
    request = (f"POST / HTTP/1.1\r\nHost: relay.test\r\nAuthorization: {AUTH}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
               f"Connection: close\r\n\r\n{body}").encode()
    started = time.monotonic()
    try:
        raw = socket.create_connection(("127.0.0.1", port), timeout=5,
                                       source_address=("127.0.0.1", 0))
        with context.wrap_socket(raw, server_hostname="relay.test") as sock:
            sock.sendall(request)
            answer = sock.recv(200)
    except OSError:
        return None
    return time.monotonic() - started if answer.startswith(b"HTTP/1.1 202") else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tree", default=ROOT)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--connections", type=int, default=200)
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the relay inherits it
    port = free_port()
    with tempfile.TemporaryDirectory() as directory:
        relay, ca = start_relay(os.path.abspath(args.tree), directory, port)
        try:
            attacker = Attacker(port, args.connections)
            attacker.start()
            time.sleep(2)  # the cap fills
            opened_before, started = attacker.opened, time.monotonic()
            context = ssl.create_default_context(cafile=ca)
            results = []
            while time.monotonic() - started < args.seconds:
                results.append(post(port, context))
                time.sleep(0.5)
            elapsed = time.monotonic() - started
            reopened = attacker.opened - opened_before
            attacker.stop.set()
            attacker.join(5)
        finally:
            relay.terminate()
            relay.wait(20)
            if os.environ.get("SHOW_LOG"):
                with open(os.path.join(directory, "relay.log")) as f:
                    print(f.read()[-3000:])
    served = sorted(r for r in results if r is not None)
    print(f"tree: {args.tree}")
    print(f"real client: {len(served)}/{len(results)} requests answered 202"
          + (f", median {served[len(served) // 2] * 1000:.0f} ms, slowest "
             f"{served[-1] * 1000:.0f} ms" if served else ""))
    print(f"attacker: {reopened} reconnections in {elapsed:.1f} s "
          f"({reopened / elapsed:.1f}/s) to keep {args.connections} connections open")


if __name__ == "__main__":
    main()
