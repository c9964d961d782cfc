"""``POST /``: the HTTP submission API (docs/design.md, "The HTTP submission API"),
``docs/openapi.yaml``.

A request is an SMTP transaction in another syntax, so it goes the same way: HTTP Basic
credentials become ``SubmissionCredentials`` for the same Portal (provider selection with
the ``Host`` header as the connected domain), and the message goes through the same
``IMessageDelivery`` avatar, so a ``202`` means what SMTP's final ``250`` means: the
upstream accepted the message.  Content is treated as an SMTP client's that declared
nothing: no ``BODY=`` parameter is added on the client's behalf, so 8-bit content goes
to the upstream exactly as the same message over SMTP without ``BODY=8BITMIME`` does.

A body must say it is JSON (``Content-Type: application/json``, ``415`` otherwise):
with Basic credentials a browser remembers, that is what keeps another site's page from
submitting through its visitors (a cross-site request may carry ``text/plain`` without
asking first; ``web/jsonbody.py``, ``media_type_problem``).  The API describes itself
at ``GET /openapi.yaml`` and ``GET /openapi.json`` (``web/openapi.py``), without a login.

What the API adds over SMTP is only syntax checking: the JSON shape, base64, addresses
(no CR/LF/NUL can reach an SMTP command line) and line endings (bare CR/LF become CRLF;
JSON content cannot smuggle SMTP commands, so there is nothing to refuse).  Upstream
verdicts map to statuses: a permanent rejection (5xx) is ``502``, anything temporary
(4xx, unreachable) is ``503`` with ``Retry-After``, so clients know whether to retry.
A sender the login's policy does not allow (the envelope ``from``, or with
``check_header_from`` the message's From: header; ``docs/policy.md``) is ``403``: the
request will never succeed as it is, and the upstream was not asked.

The document is parsed with bounded work (``web/jsonbody.py``); a body over
``JSONLimits.inline_bytes`` is read from its spool and parsed in a worker thread, at
most ``PARSE_CONCURRENCY`` at a time, so that big bodies neither stall the reactor nor
take the shared thread pool (and its memory) from everything else.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any, Callable

from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from esmtpfa.common.context import ConnectionContext
from esmtpfa.common.logs import logger
from esmtpfa.common.replies import SMTPReplyError
from esmtpfa.delivery.transaction import PolicyRefusal, RateLimited
from esmtpfa.smtp.address import valid_mailbox
from esmtpfa.smtp.data import REJECT, normalize_line_ends
from esmtpfa.smtp.settings import ServerSettings
from esmtpfa.spool.interfaces import QueuedReply
from esmtpfa.web.errors import HTTPError, send_error, send_json
from esmtpfa.web.jsonbody import JSONLimits, JSONRefused, media_type_problem, parse_json
from esmtpfa.web.login import RETRY_AFTER, HeaderLogin, Login, request_context
from esmtpfa.web.openapi import OpenAPIDocument, Representation
from esmtpfa.web.requestlog import RequestLog

log = logger("esmtpfa.web")

FIELDS = ("from", "to", "data")
WRITE_CHUNK = 64 * 1024
_FORBIDDEN_IN_ADDRESS = ("\r", "\n", "\0")
_BASE64_SPACE = b" \t\r\n\f\v"
#: The document is an object of three fields, one a list: deeper nesting is refused.
MAX_JSON_DEPTH = 4
#: Big bodies parsed at once (each may briefly need a few times its size in memory).
PARSE_CONCURRENCY = 2


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
        """MAIL parameters the avatar would have got from an SMTP client that declared
        nothing about its content (HTTP and SMTP treat 8-bit alike)."""
        params: dict[str, str | None] = {"SIZE": str(len(self.content))}
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
    try:
        # RFC 2045 base64 may be wrapped; one C-level pass drops the line breaks.
        compact = data.encode("ascii").translate(None, _BASE64_SPACE)
        raw = base64.b64decode(compact, validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise HTTPError(400, "data is not valid base64") from None
    del compact
    content = normalize_line_ends(raw)
    if b"\0" in content:  # as SMTP DATA treats it (esmtpfa.smtp.data, NUL_CHARACTER)
        if settings.bare_line_ends == REJECT:
            raise HTTPError(400, "data contains NUL characters, which text messages may "
                                 "not carry (RFC 5322 §3.5)")
        content = content.replace(b"\0", b"")
    if content and not content.endswith(b"\r\n"):
        content += b"\r\n"
    if len(content) > settings.max_message_size:
        raise too_large(settings)
    limit = settings.max_line_length
    if content and max(map(len, content.split(b"\r\n"))) > limit:
        raise HTTPError(400, f"data has a line longer than {limit} octets (RFC 5322 §2.1.1)")
    return content


def json_limits(settings: ServerSettings) -> JSONLimits:
    """The document's bounds: the body limit, its shape's depth, and as many values as
    the fields and the largest recipient list need (with room to spare)."""
    return JSONLimits(max_bytes=body_limit(settings), max_depth=MAX_JSON_DEPTH,
                      max_values=settings.max_recipients + 64)


def parse_submission(body: bytes, settings: ServerSettings) -> Submission:
    """The request body as a ``Submission``; ``HTTPError`` 400/413 saying what is wrong.

    Bounded work whatever the body (``web.jsonbody``); no reactor state, so callers may
    run it in a thread."""
    try:
        document = parse_json(body, json_limits(settings))
    except JSONRefused as refusal:
        raise HTTPError(400, str(refusal)) from None
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
    content = _content(document.pop("data"), settings)
    smtputf8 = not all(address.isascii() for address in (sender, *recipients))
    return Submission(sender, recipients, content, smtputf8)


def read_and_parse(content: Any, settings: ServerSettings) -> Submission:
    """Read the spooled body (file I/O) and parse it: meant for a worker thread, which
    owns ``content`` and closes it."""
    try:
        content.seek(0)
        body = content.read()
    finally:
        content.close()
    return parse_submission(body, settings)


# -- the resource ------------------------------------------------------------------------

class SubmissionResource(Resource):
    """The whole tree of the submission listener: ``POST /``, the API's description, and
    JSON errors elsewhere.

    The client is usually logged in already (``web/loginfirst.py`` does it before the
    body); a request without a body is logged in here, the same way.
    """

    isLeaf = True

    def __init__(self, settings: ServerSettings, *, header_login: HeaderLogin,
                 request_log: RequestLog, defer_to_thread: Callable[..., defer.Deferred],
                 description: OpenAPIDocument | None = None):
        super().__init__()
        self._settings = settings
        self._description = description or OpenAPIDocument.load()
        self._header_login = header_login
        self._log = request_log
        self._defer_to_thread = defer_to_thread
        self._parsers = defer.DeferredSemaphore(PARSE_CONCURRENCY)
        self._inline_bytes = json_limits(settings).inline_bytes

    def render(self, request):
        path = request.postpath
        described = self._description.get(path[0]) if len(path) == 1 else None
        if described is not None:
            self._describe(request, described)
        elif path not in ([], [b""]):
            self._refused(request, HTTPError(
                404, "not found; submit with POST /, described at GET /openapi.yaml"))
        elif request.method != b"POST":
            self._refused(request, HTTPError(405, "method not allowed; use POST",
                                             headers={b"allow": b"POST"}))
        else:
            d = defer.ensureDeferred(self._submit(request))
            d.addErrback(self._unexpected, request)
        return NOT_DONE_YET

    def _describe(self, request, described: Representation) -> None:
        """The API's description: public, like any API's documentation."""
        if request.method not in (b"GET", b"HEAD"):
            self._refused(request, HTTPError(405, "method not allowed; use GET",
                                             headers={b"allow": b"GET, HEAD"}))
            return
        request.setHeader(b"content-type", described.content_type)
        request.setHeader(b"content-length", b"%d" % len(described.body))
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.write(described.body)  # twisted.web drops the body of a HEAD
        request.finish()

    async def _submit(self, request) -> None:
        context = request_context(request, request.connection_id)
        login: Login | None = request.take_login()
        if login is None:  # a request without a body
            try:
                login = await self._header_login.login(
                    request.getHeader(b"authorization"), context)
            except HTTPError as error:
                self._refused(request, error)
                return
        try:
            problem = media_type_problem(
                request.requestHeaders.getRawHeaders(b"content-type"))
            if problem is not None:  # RFC 9110 §15.5.16
                raise HTTPError(415, problem, headers={b"accept-post": b"application/json"})
            submission = await self._parse(request)
            message_id, queued = await self._deliver(login.avatar, context, submission)
        except HTTPError as error:
            self._refused(request, error, login.identity)
            return
        finally:
            login.logout()
        self._log.accepted(request.connection_id, context.peer_host, login.identity,
                           message_id, len(submission.recipients))
        # "queued": the spool holds it (docs/spool.md); without it, the upstream has it.
        send_json(request, 202, {"id": message_id, "queued": True} if queued
                  else {"id": message_id})

    def _parse(self, request) -> defer.Deferred:
        """Parse inline when small; otherwise read and parse in a thread, which takes
        the spooled body over (closing it there: the request no longer owns it)."""
        content = request.content
        size = content.seek(0, 2)
        if size <= self._inline_bytes:
            content.seek(0)
            return defer.maybeDeferred(parse_submission, content.read(), self._settings)
        request.content = None
        return self._parsers.run(self._defer_to_thread, read_and_parse, content,
                                 self._settings)

    async def _deliver(self, avatar, context: ConnectionContext,
                       submission: Submission) -> tuple[str, bool]:
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
            reply = await defer.maybeDeferred(transaction.finish)
        except PolicyRefusal as refusal:
            raise HTTPError(403, refusal.reply.text, reply=refusal.reply) from None
        except RateLimited as limited:
            raise HTTPError(429, limited.reply.text, reply=limited.reply, headers={
                b"retry-after": str(int(limited.retry_after)).encode()}) from None
        except SMTPReplyError as error:
            reply = error.reply
            message_id = getattr(transaction, "id", None)
            if reply.is_permanent:
                raise HTTPError(502, "the upstream rejected the message", reply=reply,
                                message_id=message_id) from None
            raise HTTPError(503, "the upstream is unavailable, try again later", reply=reply,
                            headers={b"retry-after": RETRY_AFTER},
                            message_id=message_id) from None
        return transaction.id, isinstance(reply, QueuedReply)

    def _refused(self, request, error: HTTPError, identity: str | None = None) -> None:
        """Log the refusal (once, with the identity when the client logged in) and
        answer it."""
        if identity is None:
            identity = getattr(request, "identity", None)
        peer = getattr(request.getClientAddress(), "host", "")
        self._log.refused(request.connection_id, peer, error.status, error.message,
                          identity)
        send_error(request, error)

    def _unexpected(self, failure: Failure, request) -> None:
        log.failure("{connection_id} HTTP submission failed", failure,
                    connection_id=request.connection_id)
        send_error(request, HTTPError(500, "internal error"))


__all__ = ["HTTPError", "Submission", "SubmissionResource", "body_limit", "json_limits",
           "parse_submission", "read_and_parse", "too_large"]
