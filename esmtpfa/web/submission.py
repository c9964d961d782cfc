"""``POST /``: the HTTP submission API (SPEC §6), ``docs/openapi.yaml``.

A request is an SMTP transaction in another syntax, so it goes the same way: HTTP Basic
credentials become ``SubmissionCredentials`` for the same Portal (provider selection with
the ``Host`` header as the connected domain), and the message goes through the same
``IMessageDelivery`` avatar, so a ``202`` means what SMTP's final ``250`` means: the
upstream accepted the message.

What the API adds over SMTP is only syntax checking: the JSON shape, base64, addresses
(no CR/LF/NUL can reach an SMTP command line) and line endings (bare CR/LF become CRLF;
JSON content cannot smuggle SMTP commands, so there is nothing to refuse).  Upstream
verdicts map to statuses: a permanent rejection (5xx) is ``502``, anything temporary
(4xx, unreachable) is ``503`` with ``Retry-After``, so clients know whether to retry.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
import json
from typing import Any

from twisted.cred.credentials import Anonymous
from twisted.cred.error import LoginFailed, UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from esmtpfa.auth.credentials import SubmissionCredentials
from esmtpfa.auth.errors import ProviderUnavailable
from esmtpfa.auth.throttle import LoginThrottled
from esmtpfa.context import ConnectionContext
from esmtpfa.ids import new_id
from esmtpfa.logs import logger
from esmtpfa.replies import Reply, SMTPReplyError
from esmtpfa.smtp.address import valid_mailbox
from esmtpfa.smtp.data import normalize_line_ends
from esmtpfa.smtp.interfaces import IMessageDelivery
from esmtpfa.smtp.settings import ServerSettings

log = logger("esmtpfa.web")

FIELDS = ("from", "to", "data")
CHALLENGE = b'Basic realm="esmtpfa", charset="UTF-8"'
RETRY_AFTER = b"60"
WRITE_CHUNK = 64 * 1024
_FORBIDDEN_IN_ADDRESS = ("\r", "\n", "\0")


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


def body_limit(settings: ServerSettings) -> int:
    """Largest request body read: base64 of the largest message (×4/3) with room for
    JSON escapes and line breaks (×3/2 in all), plus the addresses."""
    return settings.max_message_size * 3 // 2 + 64 * 1024 + settings.max_recipients * 1024


def too_large(settings: ServerSettings) -> HTTPError:
    return HTTPError(413, f"message larger than {settings.max_message_size} octets")


# -- the request body --------------------------------------------------------------------

@dataclass(frozen=True)
class Submission:
    mail_from: str
    recipients: tuple[str, ...]
    content: bytes  # CRLF lines, ending with CRLF, not dot-stuffed
    smtputf8: bool

    @property
    def params(self) -> dict[str, str | None]:
        """MAIL parameters the avatar would have got from an SMTP client."""
        params: dict[str, str | None] = {"SIZE": str(len(self.content))}
        if not self.content.isascii():
            params["BODY"] = "8BITMIME"
        if self.smtputf8:
            params["SMTPUTF8"] = None
        return params


def _address(value: Any, what: str, settings: ServerSettings) -> str:
    if not isinstance(value, str) or not value:
        raise HTTPError(400, f"{what} must be a non-empty string")
    if any(char in value for char in _FORBIDDEN_IN_ADDRESS):
        raise HTTPError(400, f"{what} contains CR, LF or NUL")
    if not valid_mailbox(value):
        raise HTTPError(400, f"{what} is not a valid address (local@domain)")
    if not value.isascii() and not settings.smtputf8:
        raise HTTPError(400, f"{what} is not ASCII (the relay has SMTPUTF8 disabled)")
    return value


def _content(data: Any, settings: ServerSettings) -> bytes:
    if not isinstance(data, str):
        raise HTTPError(400, "data must be a base64 string")
    compact = "".join(data.split())  # RFC 2045 base64 may be wrapped
    try:
        raw = base64.b64decode(compact.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise HTTPError(400, "data is not valid base64") from None
    content = normalize_line_ends(raw)
    if content and not content.endswith(b"\r\n"):
        content += b"\r\n"
    if len(content) > settings.max_message_size:
        raise too_large(settings)
    limit = settings.max_line_length
    if content and max(map(len, content.split(b"\r\n"))) > limit:
        raise HTTPError(400, f"data has a line longer than {limit} octets (RFC 5322 §2.1.1)")
    return content


def parse_submission(body: bytes, settings: ServerSettings) -> Submission:
    """The request body as a ``Submission``; ``HTTPError`` 400/413 saying what is wrong."""
    try:
        document = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise HTTPError(400, "body is not valid JSON") from None
    if not isinstance(document, dict):
        raise HTTPError(400, 'body must be a JSON object {"from", "to", "data"}')
    unknown = sorted(set(document) - set(FIELDS))
    if unknown:
        raise HTTPError(400, f"unknown field(s) {', '.join(map(repr, unknown))}; "
                             f"expected {', '.join(map(repr, FIELDS))}")
    missing = [name for name in FIELDS if name not in document]
    if missing:
        raise HTTPError(400, f"missing field(s) {', '.join(map(repr, missing))}")
    sender = _address(document["from"], "from", settings)
    to = document["to"]
    if not isinstance(to, list) or not to:
        raise HTTPError(400, "to must be a non-empty list of addresses")
    if len(to) > settings.max_recipients:
        raise HTTPError(400, f"too many recipients (at most {settings.max_recipients})")
    recipients = tuple(_address(rcpt, f"to[{i}]", settings) for i, rcpt in enumerate(to))
    content = _content(document["data"], settings)
    smtputf8 = not all(address.isascii() for address in (sender, *recipients))
    return Submission(sender, recipients, content, smtputf8)


# -- the request headers -----------------------------------------------------------------

def basic_credentials(header: bytes) -> tuple[str, str]:
    """``Authorization: Basic`` → (user, password), split on the first colon (RFC 7617)."""
    scheme, _, encoded = header.strip().partition(b" ")
    if scheme.lower() != b"basic":
        raise HTTPError(401, "only Basic authentication is supported",
                        headers={b"www-authenticate": CHALLENGE})
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise HTTPError(401, "malformed Basic credentials",
                        headers={b"www-authenticate": CHALLENGE}) from None
    user, colon, password = decoded.partition(":")
    if not colon:
        raise HTTPError(401, "malformed Basic credentials",
                        headers={b"www-authenticate": CHALLENGE})
    return user, password


def host_name(header: bytes | None) -> str | None:
    """The ``Host`` header without port: ``[::1]:8080`` → ``::1``, ``a.b:80`` → ``a.b``."""
    if not header:
        return None
    host = header.decode("latin-1").strip()
    if host.startswith("["):
        return host[1:].partition("]")[0] or None
    return host.rpartition(":")[0] if host.count(":") == 1 else host or None


def request_context(request, connection_id: str) -> ConnectionContext:
    peer, local = request.getClientAddress(), request.getHost()
    return ConnectionContext(
        connection_id=connection_id, protocol="http",
        peer_host=getattr(peer, "host", ""), peer_port=getattr(peer, "port", 0),
        local_host=getattr(local, "host", ""), local_port=getattr(local, "port", 0),
        tls=request.isSecure(), http_host=host_name(request.getHeader(b"host")))


# -- the resource ------------------------------------------------------------------------

def respond(request, status: int, body: dict[str, Any],
            headers: dict[bytes, bytes] | None = None) -> None:
    if request._disconnected or request.finished:
        return
    data = json.dumps(body).encode("utf-8") + b"\n"
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"content-length", str(len(data)).encode())
    request.setHeader(b"cache-control", b"no-store")
    for name, value in (headers or {}).items():
        request.setHeader(name, value)
    request.write(data)
    request.finish()


class SubmissionResource(Resource):
    """The whole tree of the submission listener: ``POST /`` and JSON errors elsewhere."""

    isLeaf = True

    def __init__(self, portal: Portal, settings: ServerSettings, *,
                 allow_anonymous: bool = False):
        super().__init__()
        self._portal = portal
        self._settings = settings
        self._allow_anonymous = allow_anonymous

    def render(self, request):
        if request.postpath not in ([], [b""]):
            respond(request, 404, {"error": "not found; submit with POST /"})
            return NOT_DONE_YET
        if request.method != b"POST":
            respond(request, 405, {"error": "method not allowed; use POST"},
                    {b"allow": b"POST"})
            return NOT_DONE_YET
        request_id = new_id()
        d = defer.ensureDeferred(self._submit(request, request_id))
        d.addErrback(self._unexpected, request, request_id)
        return NOT_DONE_YET

    async def _submit(self, request, request_id: str) -> None:
        context = request_context(request, request_id)
        try:
            identity, avatar, logout = await self._login(request, context)
        except HTTPError as error:
            self._refused(request, request_id, context, error)
            return
        try:
            submission = parse_submission(request.content.read(), self._settings)
            message_id = await self._deliver(avatar, context, submission)
        except HTTPError as error:
            self._refused(request, request_id, context, error, identity)
            return
        finally:
            logout()
        log.info("{connection_id} HTTP submission from [{peer}] as {identity}: message "
                 "{message_id} to {count} recipient(s) accepted", connection_id=request_id,
                 peer=context.peer_host, identity=identity, message_id=message_id,
                 count=len(submission.recipients))
        respond(request, 202, {"id": message_id})

    async def _login(self, request, context: ConnectionContext):
        header = request.getHeader(b"authorization")
        if header is None:
            if not self._allow_anonymous:
                raise HTTPError(401, "authentication required",
                                headers={b"www-authenticate": CHALLENGE})
            credentials: Any = Anonymous()
        else:
            user, password = basic_credentials(header)
            credentials = SubmissionCredentials(user, password, context,
                                                mechanism="HTTP-BASIC")
        try:
            _, avatar, logout = await self._portal.login(credentials, None, IMessageDelivery)
        except (UnauthorizedLogin, LoginFailed):
            raise HTTPError(401, "authentication failed",
                            headers={b"www-authenticate": CHALLENGE}) from None
        except LoginThrottled:
            raise HTTPError(429, "too many failed authentications, try again later",
                            headers={b"retry-after": RETRY_AFTER}) from None
        except ProviderUnavailable:
            raise HTTPError(503, "authentication temporarily unavailable, try again later",
                            headers={b"retry-after": RETRY_AFTER}) from None
        return str(avatar.identity), avatar, logout

    async def _deliver(self, avatar, context: ConnectionContext,
                       submission: Submission) -> str:
        transaction = None
        try:
            transaction = await defer.maybeDeferred(
                avatar.startTransaction, context, submission.mail_from, submission.params)
            try:
                for recipient in submission.recipients:
                    await defer.maybeDeferred(transaction.addRecipient, recipient, {})
                content = submission.content
                for start in range(0, len(content), WRITE_CHUNK):
                    transaction.write(content[start:start + WRITE_CHUNK])
            except BaseException:
                transaction.abort()
                raise
            await defer.maybeDeferred(transaction.finish)
        except SMTPReplyError as error:
            reply = error.reply
            message_id = getattr(transaction, "id", None)
            if reply.is_permanent:
                raise HTTPError(502, "the upstream rejected the message", reply=reply,
                                message_id=message_id) from None
            raise HTTPError(503, "the upstream is unavailable, try again later", reply=reply,
                            headers={b"retry-after": RETRY_AFTER},
                            message_id=message_id) from None
        return transaction.id

    def _refused(self, request, request_id: str, context: ConnectionContext,
                 error: HTTPError, identity: str | None = None) -> None:
        log.info("{connection_id} HTTP submission from [{peer}]{who} refused: {status} "
                 "{reason}", connection_id=request_id, peer=context.peer_host,
                 who=f" as {identity}" if identity else "", status=error.status,
                 reason=error.message)
        respond(request, error.status, error.body(), error.headers)

    def _unexpected(self, failure: Failure, request, request_id: str) -> None:
        log.failure("{connection_id} HTTP submission failed", failure,
                    connection_id=request_id)
        respond(request, 500, {"error": "internal error"})


__all__ = ["HTTPError", "Submission", "SubmissionResource", "basic_credentials",
           "body_limit", "host_name", "parse_submission"]
