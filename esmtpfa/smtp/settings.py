"""Server limits and switches, with the defaults a production relay starts from."""

from __future__ import annotations

from dataclasses import dataclass
import socket

from esmtpfa.smtp.data import NORMALIZE

MiB = 1024 * 1024


@dataclass(frozen=True)
class ServerSettings:
    hostname: str = socket.getfqdn()
    max_message_size: int = 25 * MiB
    max_recipients: int = 100
    max_line_length: int = 998  # RFC 5322 §2.1.1, octets without CRLF
    max_auth_failures: int = 3
    idle_timeout: float = 300.0
    allow_insecure_auth: bool = False
    allow_anonymous: bool = False
    smtputf8: bool = False
    binarymime: bool = False
    requiretls: bool = False
    bare_line_ends: str = NORMALIZE
    max_connections: int = 1000
    max_connections_per_ip: int = 50
    hide_client_in_received: bool = False
