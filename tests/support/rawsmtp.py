"""A byte-level SMTP client on a blocking socket, for regression tests at the wire.

Tests run it in a thread (``deferToThread``) while the reactor serves esmtpfa, so what
goes over the socket is exactly what the test wrote: no client library tidies it up.
"""

from __future__ import annotations

import base64
import socket
import ssl
import threading
import time


class Closed(Exception):
    pass


class RawSMTP:
    def __init__(self, host: str, port: int, *, timeout: float = 10.0,
                 tls: ssl.SSLContext | None = None, server_hostname: str | None = None,
                 source: str | None = None):
        """``source``: the local address to connect from (e.g. 127.0.0.2: another client)."""
        self.sock = socket.create_connection(
            (host, port), timeout=timeout, source_address=(source, 0) if source else None)
        if tls is not None:
            self.sock = tls.wrap_socket(self.sock, server_hostname=server_hostname)
        self._buffer = b""
        self.greeting = self.reply()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _line(self) -> bytes:
        while b"\r\n" not in self._buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise Closed(self._buffer)
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\r\n", 1)
        return line

    def reply(self) -> tuple[int, str]:
        """One whole (possibly multi-line) reply: code and the text lines joined by \\n."""
        lines = []
        while True:
            line = self._line()
            lines.append(line[4:].decode())
            if line[3:4] != b"-":
                return int(line[:3]), "\n".join(lines)

    def command(self, line: str | bytes) -> tuple[int, str]:
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.reply()

    def pending(self) -> bytes:
        """Bytes already received but not yet read as a reply."""
        return self._buffer

    def starttls(self, context: ssl.SSLContext, server_hostname: str | None = None):
        reply = self.command("STARTTLS")
        if reply[0] == 220:
            self.sock = context.wrap_socket(self.sock, server_hostname=server_hostname)
        return reply

    def auth_plain(self, user: str, password: str) -> tuple[int, str]:
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        return self.command(f"AUTH PLAIN {token}")

    def send_message(self, content: bytes, sender: str, recipients) -> tuple[int, str]:
        """One whole transaction (MAIL, RCPTs, DATA, content, final dot): the final reply.

        ``content`` is sent as given, so the caller dot-stuffs it."""
        assert self.command(f"MAIL FROM:<{sender}>")[0] == 250
        for rcpt in recipients:
            assert self.command(f"RCPT TO:<{rcpt}>")[0] == 250
        assert self.command("DATA")[0] == 354
        self.send(content + b".\r\n")
        return self.reply()

    def is_closed(self, wait: float = 5.0) -> bool:
        """True when the server closed the connection (EOF) within ``wait`` seconds."""
        self.sock.settimeout(wait)
        try:
            data = self.sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError):
            return True
        except TimeoutError:
            return False
        if data:
            self._buffer += data
            return self.is_closed(wait)
        return True

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def greeting_times(port: int, count: int, patience: float,
                   source: str | None = None) -> list[float | None]:
    """Seconds each of ``count`` new connections, opened at once (from ``source``, a
    loopback address, when given), waited for its 220 (None: no greeting within
    ``patience`` seconds)."""
    results: list[float | None] = [None] * count

    def one(index: int) -> None:
        started = time.monotonic()
        try:
            with socket.create_connection(
                    ("127.0.0.1", port), timeout=patience,
                    source_address=None if source is None else (source, 0)) as sock:
                if sock.recv(200).startswith(b"220"):
                    results[index] = time.monotonic() - started
        except OSError:
            pass
    threads = [threading.Thread(target=one, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(patience + 5)
    return results
