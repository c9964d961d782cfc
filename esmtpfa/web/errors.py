"""HTTP errors as values, and the one JSON shape every HTTP answer of esmtpfa's has.

An error is an ``HTTPError`` (status, message for the client, headers): the resources
raise or answer it with ``send_json``, and the channel writes it as raw bytes with
``raw_response`` when it refuses a request before any resource runs (401 before the
body, 408, 413, 431; ``docs/http-limits.md``).  Both give ``{"error": message}`` with
``Content-Type: application/json``, so a client sees one format whoever answered.
"""

from __future__ import annotations

import json
from typing import Any

from esmtpfa.common import internals
from esmtpfa.common.replies import Reply

REASONS = {400: b"Bad Request", 401: b"Unauthorized", 404: b"Not Found",
           405: b"Method Not Allowed", 408: b"Request Timeout", 413: b"Content Too Large",
           429: b"Too Many Requests", 431: b"Request Header Fields Too Large",
           500: b"Internal Server Error", 503: b"Service Unavailable"}


class HTTPError(Exception):
    """Answer with ``status`` and a JSON body ``{"error": message, ...}``."""

    def __init__(self, status: int, message: str, *, headers: dict[bytes, bytes] | None = None,
                 reply: Reply | None = None, message_id: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}
        self.reply = reply
        self.message_id = message_id

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.message}
        if self.message_id is not None:
            body["id"] = self.message_id
        if self.reply is not None:
            body["reply"] = {"code": self.reply.code, "enhanced": self.reply.enhanced,
                             "text": self.reply.text}
        return body


def encode(document: Any) -> bytes:
    return json.dumps(document).encode("utf-8") + b"\n"


def send_json(request: Any, status: int, document: Any,
              headers: dict[bytes, bytes] | None = None) -> None:
    """Answer ``request`` with ``document`` and finish it, unless it is already finished
    or its connection is gone (an answer computed after the client left is dropped)."""
    if request.finished or internals.request_gone(request):
        return
    data = encode(document)
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"content-length", b"%d" % len(data))
    request.setHeader(b"cache-control", b"no-store")
    for name, value in (headers or {}).items():
        request.setHeader(name, value)
    request.write(data)
    request.finish()


def send_error(request: Any, error: HTTPError) -> None:
    send_json(request, error.status, error.body(), error.headers)


def raw_response(error: HTTPError) -> bytes:
    """A complete ``HTTP/1.1`` answer that ends the connection (``Connection: close``)."""
    body = encode(error.body())
    head = [b"HTTP/1.1 %d %s" % (error.status, REASONS.get(error.status, b"Error")),
            b"Content-Type: application/json", b"Cache-Control: no-store",
            b"Connection: close", b"Content-Length: %d" % len(body)]
    head += [name + b": " + value for name, value in error.headers.items()]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


__all__ = ["HTTPError", "raw_response", "send_error", "send_json"]
