"""UUID-URN identifiers for servers, connections and messages (Wildboar convention).

Every object a log line talks about carries one of these, so that one grep follows a
connection or a message across the SMTP server, the providers and the upstream client.
"""

import uuid


def new_id() -> str:
    """A fresh version-4 UUID in URN form, e.g. ``urn:uuid:10ba038e-…``."""
    return uuid.uuid4().urn
