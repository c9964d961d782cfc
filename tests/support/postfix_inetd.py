"""A minimal "master" for a private Postfix smtpd: run as a child process by the tests.

Debian's Postfix daemons can run without the Postfix master in their stand-alone mode
(``-S``: the client is on stdin/stdout).  This acceptor listens on a loopback port and
starts one ``smtpd -S`` per connection with the socket as its stdin and stdout, like
inetd; it serves ``private/rewrite`` (the address rewriting smtpd asks for at MAIL and
RCPT) and ``private/tlsmgr`` (entropy for TLS) with ``trivial-rewrite -S`` and
``tlsmgr -S``, one process per request; and it collects the log records Postfix
sends to ``public/postlog`` into ``postfix.log``.  The daemons run as ``mail_owner`` (a
process whose uid differs from it would be taken for "sendmail -bs" and do no SASL).

Usage: python3 postfix_inetd.py CONFIG_DIR PORT DAEMON_DIR [USER]
It prints "ready" once everything listens and stops on SIGTERM.
"""

from __future__ import annotations

import os
import pwd
import selectors
import signal
import socket
import subprocess
import sys
import threading


def read_record(sock: socket.socket, buffer: bytes) -> tuple[bytes | None, bytes]:
    """One Postfix attr_print0 record: ``name NUL value NUL`` pairs, then a lone NUL."""
    position = 0
    while True:
        while buffer.find(b"\0", position) < 0:
            data = sock.recv(65536)
            if not data:
                return None, b""
            buffer += data
        end = buffer.find(b"\0", position)
        if end == position:  # an empty name: the end of the record
            return buffer[:end + 1], buffer[end + 1:]
        while buffer.find(b"\0", end + 1) < 0:  # the value
            data = sock.recv(65536)
            if not data:
                return None, b""
            buffer += data
        position = buffer.find(b"\0", end + 1) + 1


#: Internal services smtpd asks: the program and the protocol it announces on accept.
SERVICES = {"rewrite": ("trivial-rewrite", b"trivial_rewrite_protocol"),
            "tlsmgr": ("tlsmgr", b"tlsmgr_protocol")}


def serve_per_request(conn: socket.socket, spawn, program: str, protocol: bytes) -> None:
    """An internal service for one smtpd (address rewriting, TLS entropy): the daemon in
    stand-alone mode answers a single request and exits, while smtpd keeps its connection
    for many, so each request gets its own daemon.  The master's servers announce their
    protocol on accept; that is done here too."""
    try:
        conn.sendall(b"protocol\0" + protocol + b"\0\0")
        buffer = b""
        while True:
            request, buffer = read_record(conn, buffer)
            if request is None:
                return
            ours, theirs = socket.socketpair()
            child = spawn(program, theirs)
            with ours:
                ours.sendall(request)
                reply, _ = read_record(ours, b"")
            child.wait(timeout=10)
            if reply is None:
                return
            conn.sendall(reply)
    except (OSError, subprocess.TimeoutExpired):
        pass
    finally:
        conn.close()


def main() -> None:
    config, port, daemons = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    user = sys.argv[4] if len(sys.argv) > 4 else None
    queue = os.path.join(config, "queue")
    env = {"MAIL_CONFIG": config, "PATH": "/usr/sbin:/usr/bin:/bin"}
    account = pwd.getpwnam(user) if user else None

    def spawn(program: str, conn: socket.socket) -> subprocess.Popen:
        kwargs = {}
        # tlsmgr starts as root (it opens its files, then drops to mail_owner itself).
        if account is not None and os.geteuid() == 0 and program != "tlsmgr":
            kwargs = dict(user=account.pw_uid, group=account.pw_gid, extra_groups=[])
        try:
            return subprocess.Popen([os.path.join(daemons, program), "-S"], stdin=conn,
                                    stdout=conn, stderr=log_file, env=env, cwd=queue,
                                    close_fds=True, **kwargs)
        finally:
            conn.close()

    log_file = open(os.path.join(config, "postfix.log"), "ab", buffering=0)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(64)
    service_paths = {name: os.path.join(queue, "private", name) for name in SERVICES}
    postlog_path = os.path.join(queue, "public", "postlog")
    paths = [*service_paths.values(), postlog_path]
    for path in paths:
        if os.path.exists(path):
            os.unlink(path)
    services = {}
    for name, path in service_paths.items():
        services[name] = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        services[name].bind(path)
        services[name].listen(64)
    postlog = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    postlog.bind(postlog_path)
    for path in paths:
        os.chmod(path, 0o666)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, "smtpd")
    for name, service in services.items():
        selector.register(service, selectors.EVENT_READ, name)
    selector.register(postlog, selectors.EVENT_READ, None)
    children: list[subprocess.Popen] = []
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    print("ready", flush=True)
    while not stopping:
        for key, _ in selector.select(timeout=0.5):
            if key.data is None:
                record = postlog.recv(65536)
                log_file.write(record.rstrip(b"\0") + b"\n")
                continue
            conn, _ = key.fileobj.accept()
            if key.data in SERVICES:
                threading.Thread(target=serve_per_request, daemon=True,
                                 args=(conn, spawn, *SERVICES[key.data])).start()
            else:
                children.append(spawn(key.data, conn))
        children = [c for c in children if c.poll() is None]
    for child in children:
        child.terminate()
    for child in children:
        try:
            child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            child.kill()
    for path in paths:
        if os.path.exists(path):
            os.unlink(path)


if __name__ == "__main__":
    main()
