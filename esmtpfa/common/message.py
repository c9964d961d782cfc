"""The unit the relay moves: an envelope plus a spooled, already-normalized message.

Content is spooled (memory up to a threshold, then an anonymous temporary file) so the
memory a message costs is bounded whatever its size (docs/design.md,
"The relay and the delivery guarantee").  Everything written here has
CRLF line endings, no bare CR or LF and no dot-stuffing: the SMTP server removed the
transparency dots, the upstream client adds them again.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from typing import IO, Iterator

from esmtpfa.common.ids import new_id

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
    """Write-once, read-many storage for message content.

    In memory (a list of the chunks written) up to ``memory_limit`` octets, then in an
    anonymous temporary file.  Most messages never reach the limit, and for them a
    ``SpooledTemporaryFile`` (an object, a buffer, a seek and a read per message) was
    work for nothing: the content is handed over as the bytes that were written.
    """

    def __init__(self, memory_limit: int = SPOOL_MEMORY_LIMIT):
        self._limit = memory_limit
        self._chunks: list[bytes] = []
        self._file: IO[bytes] | None = None  # the temporary file, once past the limit
        self._closed = False
        self.size = 0

    def write(self, data: bytes) -> None:
        if self._closed:
            raise ValueError("write to a closed spool")
        self.size += len(data)
        if self._file is not None:
            self._file.seek(0, 2)
            self._file.write(data)
            return
        self._chunks.append(data)
        if self.size > self._limit:
            self._file = tempfile.TemporaryFile(mode="w+b")
            self._file.writelines(self._chunks)
            self._chunks = []

    @property
    def on_disk(self) -> bool:
        return self._file is not None

    def read_from(self, offset: int = 0, chunk_size: int = READ_CHUNK) -> Iterator[bytes]:
        """Read the content from ``offset``; each iterator keeps its own position."""
        if self._closed:
            raise ValueError("read from a closed spool")
        if self._file is None:
            chunks = self._chunks
            if len(chunks) > 1:
                chunks[:] = [b"".join(chunks)]
            data = chunks[0] if chunks else b""
            for position in range(offset, len(data), chunk_size):
                yield data[position:position + chunk_size] \
                    if position or len(data) > chunk_size else data
            return
        position = offset
        while position < self.size:
            self._file.seek(position)
            chunk = self._file.read(min(chunk_size, self.size - position))
            if not chunk:
                break
            position += len(chunk)
            yield chunk

    def close(self) -> None:
        self._closed = True
        self._chunks = []
        if self._file is not None:
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


def has_bare_line_ends(block: bytes) -> bool:
    """Whether ``block`` holds a CR or LF that is not part of a CRLF: RFC 5321 §2.3.8
    allows neither in a message, so the server refuses or repairs them on the way in
    and the relay checks again before an upstream sees the content."""
    crlf = block.count(b"\r\n")
    return block.count(b"\n") != crlf or block.count(b"\r") != crlf
