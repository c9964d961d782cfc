"""UUID-URN identifiers for servers, connections and messages (Wildboar convention).

Every object a log line talks about carries one of these, so that one grep follows a
connection or a message across the SMTP server, the providers and the upstream client.
"""

import os


def new_id() -> str:
    """A fresh version-4 UUID in URN form, e.g. ``urn:uuid:10ba038e-…``.

    The same string as ``uuid.uuid4().urn`` (RFC 9562 §5.4: 122 random bits, version 4,
    variant 10), written directly: every connection and every message takes one, and
    the ``UUID`` object in between cost more than the random bytes."""
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40
    raw[8] = (raw[8] & 0x3F) | 0x80
    h = raw.hex()
    return f"urn:uuid:{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
