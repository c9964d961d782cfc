"""Server limits and switches, with the defaults a production relay starts from."""

from __future__ import annotations

import socket
from dataclasses import dataclass

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
    #: Seconds a TLS handshake may take (implicit TLS, and after STARTTLS).
    tls_handshake_timeout: float = 30.0
    #: Seconds a polite close (421, then FIN) may take before the socket is aborted.
    close_grace: float = 5.0
    #: Seconds from the first byte of a command line to its end, whatever the client
    #: does in between; also the allowance message data starts with (docs/smtp-limits.md).
    command_timeout: float = 60.0
    #: Octets per second message data must average beyond ``command_timeout``
    #: (Postfix's smtpd_min_data_rate has the same default).
    min_data_rate: int = 500
    #: Seconds replies may wait, unread, in a full send buffer before the connection is
    #: aborted (0: never); a client that reads never meets it (docs/smtp-limits.md).
    write_stall_timeout: float = 30.0
    #: SO_SNDBUF of client sockets, in octets (0: the kernel's own sizing): several
    #: times the largest burst of replies one pipelined command group gets.
    send_buffer: int = 16 * 1024
    allow_insecure_auth: bool = False
    allow_anonymous: bool = False
    smtputf8: bool = False
    binarymime: bool = False
    requiretls: bool = False
    bare_line_ends: str = NORMALIZE
    max_connections: int = 1000
    max_connections_per_ip: int = 50
    hide_client_in_received: bool = False
