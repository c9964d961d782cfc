"""The unit the relay moves: an envelope plus a spooled, already-normalized message.

Content is spooled (memory up to a threshold, then an anonymous temporary file) so the
memory a message costs is bounded whatever its size (docs/design.md §5).  Everything written here has
CRLF line endings, no bare CR or LF and no dot-stuffing: the SMTP server removed the
transparency dots, the upstream client adds them again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import tempfile
from typing import Iterator

from esmtpfa.ids import new_id

#: Messages up to this size never touch the disk.
SPOOL_MEMORY_LIMIT = 1024 * 1024
READ_CHUNK = 64 * 1024


@dataclass(frozen=True)
class Envelope:
    """RFC 5321 envelope.  ``mail_from`` is ``""`` for the null reverse-path."""

    mail_from: str
    recipients: tuple[str, ...]
    body: str | None = None  # "7BIT", "8BITMIME" or "BINARYMIME" as the client declared
    smtputf8: bool = False
    requiretls: bool = False
    declared_size: int | None = None


class MessageSpool:
    """Write-once, read-many storage for message content."""

    def __init__(self, memory_limit: int = SPOOL_MEMORY_LIMIT):
        self._file = tempfile.SpooledTemporaryFile(max_size=memory_limit, mode="w+b")
        self.size = 0

    def write(self, data: bytes) -> None:
        self._file.write(data)
        self.size += len(data)

    @property
    def on_disk(self) -> bool:
        return bool(getattr(self._file, "_rolled", False))

    def read_from(self, offset: int = 0, chunk_size: int = READ_CHUNK) -> Iterator[bytes]:
        """Read the content from ``offset``; each iterator keeps its own position."""
        position = offset
        while position < self.size:
            self._file.seek(position)
            chunk = self._file.read(min(chunk_size, self.size - position))
            if not chunk:
                break
            position += len(chunk)
            yield chunk

    def close(self) -> None:
        self._file.close()


@dataclass
class OutboundMessage:
    """What the server hands the relay: ids, envelope, our trace header and the content."""

    envelope: Envelope
    spool: MessageSpool
    prefix: bytes = b""  # header lines esmtpfa adds (Received:), already CRLF-terminated
    content_offset: int = 0  # where in the spool the content starts (after a header rewrite)
    id: str = field(default_factory=new_id)
    connection_id: str = ""
    identity: str = ""  # "<provider>/<user>" or "anonymous", for logs only

    @property
    def size(self) -> int:
        return len(self.prefix) + self.spool.size - self.content_offset

    def chunks(self, chunk_size: int = READ_CHUNK) -> Iterator[bytes]:
        if self.prefix:
            yield self.prefix
        yield from self.spool.read_from(self.content_offset, chunk_size)

    def close(self) -> None:
        self.spool.close()
