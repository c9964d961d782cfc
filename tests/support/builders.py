"""What tests hand the relay, built in one place: messages, SASL tokens, provider documents.

Each builder here once stood in several test modules, each copy a little different; a
test now says only what is particular to it (a recipient, a prefix, a policy block) and
takes the rest from here, so a change to ``OutboundMessage`` or to the provider document
is made once.
"""

from __future__ import annotations

import base64
import os
from typing import Literal, overload

from esmtpfa.common.message import SPOOL_MEMORY_LIMIT, Envelope, MessageSpool, OutboundMessage

#: A short, well-formed message: a From: header (the rewriter and the policy look at it),
#: a subject and a one-line body.
CONTENT = b"From: alice@example.com\r\nSubject: hello\r\n\r\nHello, Bob.\r\n"

#: The connection id the SMTP server would have given the session (it shows in logs).
CONNECTION_ID = "urn:uuid:test-connection"

#: How much the builder writes to the spool at a time: a large message arrives in
#: pieces, as it does from the SMTP server, and may spill from memory to disk.
_WRITE = 1 << 20


def outbound(content: bytes = CONTENT, mail_from: str = "alice@example.com",
             rcpts: tuple[str, ...] = ("bob@example.com",), *, prefix: bytes = b"",
             offset: int = 0, memory_limit: int = SPOOL_MEMORY_LIMIT,
             connection_id: str = CONNECTION_ID, **envelope) -> OutboundMessage:
    """The message the SMTP server hands the relay for ``content``.

    ``prefix`` stands for the header lines esmtpfa adds (Received:) and ``offset`` for
    where the content starts after a header rewrite; a small ``memory_limit`` puts the
    spool on disk.  Other keywords (``body``, ``smtputf8``, ``declared_size``...) go to
    the ``Envelope``.
    """
    spool = MessageSpool(memory_limit=memory_limit)
    for start in range(0, len(content), _WRITE):
        spool.write(content[start:start + _WRITE])
    return OutboundMessage(Envelope(mail_from, rcpts, **envelope), spool, prefix=prefix,
                           content_offset=offset, connection_id=connection_id)


def submission(from_header: str | None, extra: bytes = b"") -> bytes:
    """A message as a client submits it, with the given From: header (none when None)
    and any ``extra`` header lines: what sender authorization (RFC 5322 §3.6.2) reads."""
    head = f"From: {from_header}\r\n".encode() if from_header is not None else b""
    return (head + b"To: friend@example.net\r\nSubject: policy\r\n" + extra
            + b"\r\nHello\r\n")


@overload
def b64(data: str | bytes, *, wire: Literal[False] = False) -> str: ...
@overload
def b64(data: str | bytes, *, wire: Literal[True]) -> bytes: ...
def b64(data: str | bytes, *, wire: bool = False) -> str | bytes:
    """Base64 (RFC 4648 §4) of ``data`` (text is UTF-8), as SASL (RFC 4954) and the HTTP
    API carry it: text to format into a command or a JSON document, or, with ``wire``,
    the bytes a protocol test puts on or expects from the wire."""
    encoded = base64.b64encode(data.encode() if isinstance(data, str) else data)
    return encoded if wire else encoded.decode()


def userpass_provider(name: str, username: str, password: str, *, fallback: bool = False,
                      policy: str = "") -> str:
    """One ``userpass`` entry of a provider document, in the flow style an operator
    writes; ``policy`` is its ``policy:`` block as YAML text (indented under the entry),
    or nothing."""
    flags = ", fallback: true" if fallback else ""
    return (f"- meta: {{name: {name}, type: userpass{flags}}}\n"
            f"  params: {{username: {username}, password: \"{password}\"}}\n" + policy)


def providers_document(*entries: str) -> str:
    """The provider document made of ``entries`` (docs/operations.md, "Providers: one
    worked example per type")."""
    return "providers:\n" + "".join(entries)


def write_providers(directory: str, document: str) -> str:
    """``document`` written as ``providers.yaml`` in ``directory``, for a ``twistd`` under
    test to load with ``--config``: the path to hand it."""
    path = os.path.join(directory, "providers.yaml")
    with open(path, "w") as f:
        f.write(document)
    return path


#: The office: the fallback provider most tests log in through.
OFFICE_USER, OFFICE_PASSWORD = "alice", "correct horse"
OFFICE = userpass_provider("office", OFFICE_USER, OFFICE_PASSWORD, fallback=True)
#: A named provider beside the office: two identities, as in production, so that a test
#: can tell a user who names a provider from one who falls back.
LAB = userpass_provider("lab", "carol", "lab secret")
OFFICE_AND_LAB = providers_document(OFFICE, LAB)


__all__ = ["CONNECTION_ID", "CONTENT", "LAB", "OFFICE", "OFFICE_AND_LAB", "OFFICE_PASSWORD",
           "OFFICE_USER", "b64", "outbound", "providers_document", "submission",
           "userpass_provider", "write_providers"]
