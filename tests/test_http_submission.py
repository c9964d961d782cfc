"""The HTTP submission API (docs/design.md, "The HTTP submission API") over loopback, against a real
recording upstream.

Each test starts the whole ``RelayService`` with ``--http`` and talks to it with treq
(or a raw socket where the test is about bytes on the wire, or curl as a user would);
what the upstream received is the proof of what was relayed.
"""

from __future__ import annotations

import base64
import glob
import json
import os
import socket

from twisted.internet import defer, threads
from twisted.trial import unittest

from esmtpfa.runtime.service import DEMO_PASSWORD, DEMO_USER
from esmtpfa.smtp.settings import ServerSettings
from esmtpfa.web.login import host_name
from esmtpfa.web.submission import body_limit
from tests.support.logcapture import capture_logs
from tests.support.ports import free_port
from tests.support.processes import Twistd, run_tool
from tests.support.relayfixture import PASSWORD, USER, RelayFixture
from tests.support.upstream import DEFAULT_EXTENSIONS, RecordingUpstream
from tests.support.webclient import metrics, post_json, request

CONTENT = b"From: Alice <alice@example.com>\nSubject: over HTTP\n\nHello\n.\nBye\n"
CONTENT_CRLF = CONTENT.replace(b"\n", b"\r\n")


def document(content: bytes = CONTENT, sender: str = "alice@example.com",
             to: tuple[str, ...] = ("bob@example.net",)) -> dict:
    return {"from": sender, "to": list(to), "data": base64.b64encode(content).decode()}


class HTTPFixtureMixin:
    timeout = 30
    fixture_args: tuple = ()
    fixture_kwargs: dict = {}
    scheme = "http"
    host = "127.0.0.1"

    @defer.inlineCallbacks
    def setUp(self):
        self.fixture = RelayFixture(self.mktemp(), "--http", *self.fixture_args,
                                    **self.fixture_kwargs)
        self.addCleanup(self.fixture.stop)
        yield self.fixture.start()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.fixture.http_port}/"

    @property
    def upstream(self) -> RecordingUpstream:
        return self.fixture.upstream

    def post(self, body=None, auth=(USER, PASSWORD), **kwargs):
        return post_json(self.url, document() if body is None else body, auth=auth, **kwargs)

    def assertNothingRelayed(self):
        self.assertEqual(self.upstream.messages, [])


class SubmissionTests(HTTPFixtureMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def test_post_is_relayed_and_answered_202_with_the_message_id(self):
        response = yield self.post()
        self.assertEqual(response.code, 202, response.body)
        self.assertEqual(response.header("content-type"), "application/json")
        message_id = response.json()["id"]
        self.assertRegex(message_id, r"^urn:uuid:[0-9a-f-]{36}$")
        [message] = self.upstream.messages
        self.assertEqual((message.mail_from, message.rcpts),
                         ("alice@example.com", ["bob@example.net"]))
        # our Received header (with the id, "with HTTP"), then the content in CRLF form,
        # the lone dot line intact (the upstream client stuffs it, the upstream unstuffs)
        received, _, rest = message.data.partition(b"\r\nFrom: ")
        self.assertIn(f"with HTTP id {message_id};".encode(), received)
        self.assertIn(b"[127.0.0.1]", received)
        self.assertEqual(b"From: " + rest, CONTENT_CRLF)

    @defer.inlineCallbacks
    def test_named_provider_gets_the_password_split_on_the_first_colon(self):
        response = yield self.post(auth=("printers", "printer1:p:with:colons"))
        self.assertEqual(response.code, 202, response.body)
        self.assertEqual(len(self.upstream.messages), 1)

    @defer.inlineCallbacks
    def test_several_recipients_and_content_without_final_newline(self):
        body = document(b"Subject: x\r\n\r\nno newline at the end",
                        to=("a@example.net", "b@example.org"))
        response = yield self.post(body)
        self.assertEqual(response.code, 202, response.body)
        [message] = self.upstream.messages
        self.assertEqual(message.rcpts, ["a@example.net", "b@example.org"])
        self.assertTrue(message.data.endswith(b"no newline at the end\r\n"))

    @defer.inlineCallbacks
    def test_wrapped_base64_is_accepted(self):
        data = base64.encodebytes(CONTENT * 20).decode()  # lines of 76 characters
        self.assertIn("\n", data)
        response = yield self.post({**document(), "data": data})
        self.assertEqual(response.code, 202, response.body)
        self.assertTrue(self.upstream.messages[0].data.endswith(CONTENT_CRLF * 20))

    @defer.inlineCallbacks
    def test_wrong_password_is_401_with_a_challenge(self):
        response = yield self.post(auth=(USER, "wrong"))
        self.assertEqual(response.code, 401)
        self.assertEqual(response.header("www-authenticate"),
                         'Basic realm="esmtpfa", charset="UTF-8"')
        self.assertEqual(response.json(), {"error": "authentication failed"})
        self.assertNothingRelayed()

    @defer.inlineCallbacks
    def test_missing_or_malformed_credentials_are_401(self):
        for headers in ({}, {"Authorization": "Basic !!!notbase64"},
                        {"Authorization": "Basic " + base64.b64encode(b"nocolon").decode()},
                        {"Authorization": "Bearer some.jwt.token"}):
            response = yield self.post(auth=None, headers=headers)
            self.assertEqual(response.code, 401, headers)
            self.assertIn("Basic", response.header("www-authenticate"))
            self.assertIn("error", response.json())
        self.assertNothingRelayed()

    @defer.inlineCallbacks
    def test_other_methods_are_405_and_other_paths_404(self):
        for method in ("GET", "PUT", "DELETE", "HEAD"):
            response = yield request(method, self.url, auth=(USER, PASSWORD))
            self.assertEqual(response.code, 405, method)
            self.assertEqual(response.header("allow"), "POST")
        response = yield post_json(self.url + "send", document(), auth=(USER, PASSWORD))
        self.assertEqual(response.code, 404)
        self.assertNothingRelayed()

    @defer.inlineCallbacks
    def test_no_credential_reaches_the_log(self):
        events = capture_logs(self)
        secret = "Zebra-Unicorn-42"
        yield self.post(auth=(USER, secret))
        yield self.post(auth=("printers", f"printer1:{secret}"))
        yield self.post()
        from twisted.logger import formatEvent
        text = "\n".join(formatEvent(event) + repr(event) for event in events)
        self.assertIn("HTTP submission", text)
        for forbidden in (secret, PASSWORD, base64.b64encode(f"{USER}:{secret}".encode())
                          .decode()):
            self.assertNotIn(forbidden, text)


class NulTests(HTTPFixtureMixin, unittest.TestCase):
    """NUL in ``data`` as SMTP DATA treats it: removed (``normalize``, the default),
    never passed on, so ``CRLF NUL . CRLF`` cannot end the message at an upstream that
    drops NULs."""

    @defer.inlineCallbacks
    def test_nul_is_removed(self):
        smuggling = b"Subject: x\r\n\r\nhello\r\n\0.\r\nMAIL FROM:<evil@example.com>\r\n"
        response = yield self.post(document(smuggling))
        self.assertEqual(response.code, 202, response.body)
        received = self.upstream.messages[0]
        self.assertNotIn(b"\0", received.data_raw)
        self.assertIn(b"hello\r\n..\r\nMAIL FROM:", received.data_raw)


class RejectNulTests(HTTPFixtureMixin, unittest.TestCase):
    fixture_args = ("--bare-line-ends", "reject")

    @defer.inlineCallbacks
    def test_nul_is_a_400(self):
        response = yield self.post(document(b"Subject: x\r\n\r\nhello\0\r\n"))
        self.assertEqual(response.code, 400, response.body)
        self.assertIn("NUL", response.json()["error"])
        self.assertNothingRelayed()


class BadRequestTests(HTTPFixtureMixin, unittest.TestCase):
    """Every malformed body is a 400 with a JSON error, and nothing is relayed."""

    fixture_args = ("--max-recipients", "3")

    @defer.inlineCallbacks
    def expect_400(self, raw: bytes, fragment: str):
        response = yield request("POST", self.url, body=raw, auth=(USER, PASSWORD))
        self.assertEqual(response.code, 400, (raw[:80], response.body))
        self.assertEqual(response.header("content-type"), "application/json")
        self.assertIn(fragment, response.json()["error"])

    def expect_document_400(self, changes: dict, fragment: str, drop: str | None = None):
        body = {**document(), **changes}
        if drop:
            del body[drop]
        return self.expect_400(json.dumps(body).encode(), fragment)

    @defer.inlineCallbacks
    def test_bad_json(self):
        yield self.expect_400(b'{"from": "a@b.c", ', "not valid JSON")
        yield self.expect_400(b"\xff\xfe{}", "not valid JSON")
        yield self.expect_400(b'["a@b.c"]', "JSON object")
        yield self.expect_document_400({}, "missing field(s) 'data'", drop="data")
        yield self.expect_document_400({"subject": "hi"}, "unknown field(s) 'subject'")
        self.assertNothingRelayed()

    @defer.inlineCallbacks
    def test_bad_base64(self):
        yield self.expect_document_400({"data": "not base64!"}, "not valid base64")
        yield self.expect_document_400({"data": "QUJ"}, "not valid base64")  # padding
        yield self.expect_document_400({"data": 42}, "base64 string")
        self.assertNothingRelayed()

    @defer.inlineCallbacks
    def test_bad_addresses(self):
        for changes, fragment in [
            ({"from": "alice@example.com\r\nRCPT TO:<evil@example.org>"}, "CR, LF or NUL"),
            ({"from": "alice@example.com\n"}, "CR, LF or NUL"),
            ({"to": ["bob@example.net\r\nDATA"]}, "CR, LF or NUL"),
            ({"to": ["bob@example.net", "x\0@example.net"]}, "to[1] contains CR, LF or NUL"),
            ({"from": "not an address"}, "not a valid address"),
            ({"from": ""}, "non-empty string"),
            ({"to": ["<bob@example.net>"]}, "not a valid address"),
            ({"to": ["bøb@example.net"]}, "not ASCII"),
            ({"to": []}, "non-empty list"),
            ({"to": "bob@example.net"}, "non-empty list"),
            ({"to": [f"r{i}@example.net" for i in range(4)]}, "too many recipients"),
        ]:
            yield self.expect_document_400(changes, fragment)
        self.assertNothingRelayed()

    @defer.inlineCallbacks
    def test_overlong_line(self):
        yield self.expect_document_400(
            {"data": base64.b64encode(b"Subject: x\r\n\r\n" + b"a" * 999 + b"\r\n").decode()},
            "longer than 998")
        self.assertNothingRelayed()


class ThrottleTests(HTTPFixtureMixin, unittest.TestCase):
    """The throttle sits in front of the providers for HTTP too (docs/design.md,
    "Configuration, reload and limits")."""

    fixture_args = ("--max-auth-failures-per-ip", "2")

    @defer.inlineCallbacks
    def test_address_over_the_limit_gets_429_even_with_good_credentials(self):
        codes = []
        for auth in ((USER, "wrong"), ("nobody", "wrong"), (USER, PASSWORD)):
            response = yield self.post(auth=auth)
            codes.append(response.code)
        self.assertEqual(codes, [401, 401, 429])
        self.assertEqual(response.header("retry-after"), "60")
        self.assertEqual(response.json()["error"],
                         "too many failed authentications, try again later")
        self.assertNothingRelayed()


class SMTPUTF8Tests(HTTPFixtureMixin, unittest.TestCase):
    fixture_args = ("--enable-smtp-utf8",)

    @defer.inlineCallbacks
    def test_non_ascii_addresses_go_with_smtputf8(self):
        response = yield self.post(document(to=("bøb@exämple.net",)))
        self.assertEqual(response.code, 202, response.body)
        [message] = self.upstream.messages
        self.assertEqual(message.rcpts, ["bøb@exämple.net"])
        self.assertIn("SMTPUTF8", " ".join(message.mail_params))


class EightBitTests(HTTPFixtureMixin, unittest.TestCase):
    """Undeclared 8-bit content goes the same way over HTTP as over SMTP: to an
    upstream without 8BITMIME, as it came and without ``BODY=``.
    The API has no way to declare a body type, so it declares nothing, like an SMTP
    client that sends no ``BODY=`` parameter."""

    CONTENT = ("From: Zoë <alice@example.com>\r\nSubject: café\r\n\r\n"
               "Crème brûlée, naïve façade\r\n").encode("utf-8")

    @defer.inlineCallbacks
    def setUp(self):
        extensions = [e for e in DEFAULT_EXTENSIONS if e != "8BITMIME"]
        self.fixture_kwargs = {"upstream": RecordingUpstream(extensions=extensions)}
        yield super().setUp()

    @defer.inlineCallbacks
    def test_8bit_content_is_relayed_over_http_exactly_as_over_smtp(self):
        response = yield self.post(document(self.CONTENT))
        self.assertEqual(response.code, 202, response.body)

        def smtp(fixture):
            client = fixture.secure_session()
            assert client.auth_plain(USER, PASSWORD)[0] == 235
            return client.send_message(self.CONTENT, "alice@example.com",
                                       ["bob@example.net"])

        reply = yield self.fixture.run(smtp, self.fixture)
        self.assertEqual(reply[0], 250, reply)
        over_http, over_smtp = self.upstream.messages
        for message in (over_http, over_smtp):
            self.assertNotIn("BODY=8BITMIME", " ".join(message.mail_params).upper())
            self.assertTrue(message.data.endswith(self.CONTENT), message.data[-200:])


class SizeLimitTests(HTTPFixtureMixin, unittest.TestCase):
    """413 past the limit, decided before the body is read whole."""

    fixture_args = ("--max-message-size", "2000", "--max-recipients", "2")

    @property
    def limit(self) -> int:
        return body_limit(ServerSettings(max_message_size=2000, max_recipients=2))

    def raw_exchange(self, head: bytes, body: bytes = b"", wait: float = 5.0) -> bytes:
        """Send ``head`` (and ``body``), then read whatever comes back (blocking)."""
        with socket.create_connection(("127.0.0.1", self.fixture.http_port), timeout=wait) as s:
            s.sendall(head + body)
            received = b""
            while b"\r\n\r\n" not in received or not received.rstrip().endswith(b"}"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                received += chunk
            return received

    def head(self, extra: str) -> bytes:
        auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        return (f"POST / HTTP/1.1\r\nHost: relay.test\r\nAuthorization: Basic {auth}\r\n"
                f"Content-Type: application/json\r\n{extra}\r\n").encode()

    @defer.inlineCallbacks
    def test_declared_length_over_the_limit_is_refused_before_the_body(self):
        # The body never comes: the answer cannot have waited for it.
        head = self.head(f"Content-Length: {50 * 1024 * 1024}\r\nExpect: 100-continue\r\n")
        answer = yield threads.deferToThread(self.raw_exchange, head)
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer[:200])
        self.assertNotIn(b"100 Continue", answer)
        self.assertIn(b'"error": "message larger than 2000 octets"', answer)
        self.assertNothingRelayed()

    @defer.inlineCallbacks
    def test_chunked_body_over_the_limit_is_refused_while_it_arrives(self):
        chunk = b"x" * 4096
        body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk)
                        for _ in range(self.limit // len(chunk) + 2))
        answer = yield threads.deferToThread(
            self.raw_exchange, self.head("Transfer-Encoding: chunked\r\n"), body)
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer[:200])
        self.assertNothingRelayed()

    @defer.inlineCallbacks
    def test_treq_client_sees_the_413_for_an_oversized_body(self):
        response = yield request("POST", self.url, body=b"{" + b" " * (self.limit + 10) + b"}",
                                 auth=(USER, PASSWORD))
        self.assertEqual(response.code, 413)
        self.assertEqual(response.json(), {"error": "message larger than 2000 octets"})

    @defer.inlineCallbacks
    def test_decoded_message_over_the_limit_is_413(self):
        big = b"Subject: big\r\n\r\n" + b"0123456789\r\n" * 200  # 2416 octets, body < limit
        response = yield self.post(document(big))
        self.assertEqual(response.code, 413)
        self.assertNothingRelayed()

    @defer.inlineCallbacks
    def test_message_at_the_limit_is_relayed(self):
        content = (b"Subject: fits\r\n\r\n" + b"x" * 98 + b"\r\n" + b"y" * 881 + b"\r\n"
                   + b"z" * 998 + b"\r\n")
        self.assertEqual(len(content), 2000)
        response = yield self.post(document(content))
        self.assertEqual(response.code, 202, response.body)


class UpstreamVerdictTests(HTTPFixtureMixin, unittest.TestCase):
    """202 only after the upstream accepted; its refusals become 502 or 503."""

    @defer.inlineCallbacks
    def test_permanent_rejection_is_502_with_the_upstream_reply(self):
        self.upstream.eom_reply = "554 5.7.1 Message refused by policy"
        response = yield self.post()
        self.assertEqual(response.code, 502, response.body)
        body = response.json()
        self.assertEqual((body["reply"]["code"], body["reply"]["enhanced"]), (554, "5.7.1"))
        self.assertIn("Message refused by policy", body["reply"]["text"])
        self.assertRegex(body["id"], r"^urn:uuid:")

    @defer.inlineCallbacks
    def test_rejected_recipient_is_502(self):
        self.upstream.rcpt_replies["bob@example.net"] = "550 5.1.1 No such user here"
        response = yield self.post()
        self.assertEqual(response.code, 502, response.body)
        self.assertEqual(response.json()["reply"]["enhanced"], "5.1.1")

    @defer.inlineCallbacks
    def test_temporary_rejection_is_503_with_retry_after(self):
        self.upstream.replies["MAIL"] = "451 4.3.0 Try again later"
        response = yield self.post()
        self.assertEqual(response.code, 503, response.body)
        self.assertEqual(response.header("retry-after"), "60")
        self.assertEqual(response.json()["reply"]["code"], 451)

    @defer.inlineCallbacks
    def test_unreachable_upstream_is_503(self):
        yield self.upstream.stop()
        response = yield self.post()
        self.assertEqual(response.code, 503, response.body)
        self.assertEqual(response.json()["reply"]["code"], 451)
        self.assertEqual(response.header("retry-after"), "60")


class AnonymousTests(HTTPFixtureMixin, unittest.TestCase):
    fixture_args = ("--http-allow-anonymous",)

    @defer.inlineCallbacks
    def test_no_credentials_needed_but_wrong_ones_still_refused(self):
        response = yield self.post(auth=None)
        self.assertEqual(response.code, 202, response.body)
        response = yield self.post(auth=(USER, "wrong"))
        self.assertEqual(response.code, 401)
        self.assertEqual(len(self.upstream.messages), 1)
        self.assertIn(b"with HTTP id", self.upstream.messages[0].data)

    def test_smtp_still_requires_auth(self):
        """--http-allow-anonymous opens HTTP only, never SMTP."""
        def script(fixture):
            client = fixture.secure_session()
            return client.command("MAIL FROM:<alice@example.com>")
        d = self.fixture.run(script, self.fixture)
        d.addCallback(lambda reply: self.assertEqual(reply[0], 530))
        return d


UNIQUE_DOMAIN_PROVIDERS = """\
providers:
- meta: {name: office, type: userpass, fallback: true}
  params: {username: alice, password: "correct horse"}
- meta: {name: corp, type: userpass, domain: mail.corp.example, unique_domain_auth: true}
  params: {username: carol, password: "corp pass"}
"""


class HostHeaderTests(HTTPFixtureMixin, unittest.TestCase):
    """The Host header (without port) is the connected domain of docs/design.md,
    "Provider selection"."""

    fixture_kwargs = {"providers": UNIQUE_DOMAIN_PROVIDERS}

    @defer.inlineCallbacks
    def test_host_selects_the_unique_domain_provider(self):
        response = yield self.post(auth=("carol", "corp pass"),
                                   headers={"Host": "MAIL.corp.example.:8080"})
        self.assertEqual(response.code, 202, response.body)
        response = yield self.post(auth=("carol", "corp pass"))  # Host: 127.0.0.1:port
        self.assertEqual(response.code, 401)
        response = yield self.post(headers={"Host": "mail.corp.example"})  # alice: not corp
        self.assertEqual(response.code, 401)

    def test_host_name_parsing(self):
        for header, name in [(b"a.example:8080", "a.example"), (b"a.example", "a.example"),
                             (b"[::1]:8080", "::1"), (b"[2001:db8::1]", "2001:db8::1"),
                             (b"::1", "::1"), (b"", None), (None, None)]:
            self.assertEqual(host_name(header), name, header)


class IPv6Tests(HTTPFixtureMixin, unittest.TestCase):
    fixture_args = ("--http-addr", "::1")
    host = "::1"

    @defer.inlineCallbacks
    def test_ipv6_client(self):
        response = yield self.post()
        self.assertEqual(response.code, 202, response.body)
        [message] = self.upstream.messages
        self.assertIn(b"from [IPv6:::1] ([::1])", message.data.split(b"\r\n", 1)[0])

    @defer.inlineCallbacks
    def test_ipv6_client_with_curl(self):
        output, code = yield run_tool(
            "curl", "--silent", "--show-error", "--max-time", "15", "--globoff",
            "--user", f"{USER}:{PASSWORD}", "-H", "Content-Type: application/json",
            "--data-binary", json.dumps(document()), self.url)
        self.assertEqual(code, 0, output)
        self.assertRegex(json.loads(output)["id"], r"^urn:uuid:")
        self.assertEqual(len(self.upstream.messages), 1)


class HTTPSTests(HTTPFixtureMixin, unittest.TestCase):
    scheme = "https"

    @defer.inlineCallbacks
    def setUp(self):
        from tests.support.certs import CertificateAuthority
        directory = self.mktemp()
        self.ca = CertificateAuthority(os.path.join(directory, "http-ca"))
        leaf = self.ca.issue("relay.test", "localhost", "127.0.0.1")
        self.fixture_args = ("--http-tls-cert", leaf.cert_path, "--http-tls-key", leaf.key_path)
        yield super().setUp()

    @defer.inlineCallbacks
    def test_https_submission_with_verified_certificate(self):
        response = yield self.post(ca_pem=self.ca.cert_pem)
        self.assertEqual(response.code, 202, response.body)
        self.assertIn(b"with HTTPS id", self.upstream.messages[0].data)

    @defer.inlineCallbacks
    def test_curl_over_https(self):
        auth = f"{USER}:{PASSWORD}"
        output, code = yield run_tool(
            "curl", "--silent", "--show-error", "--max-time", "15",
            "--cacert", os.path.abspath(self.ca.cert_path), "--user", auth,
            "-H", "Content-Type: application/json",
            "--data-binary", json.dumps(document()), self.url)
        self.assertEqual(code, 0, output)
        self.assertRegex(json.loads(output)["id"], r"^urn:uuid:")
        self.assertEqual(len(self.upstream.messages), 1)


class ReadmeFlowTests(unittest.TestCase):
    """docs/operations.md, "HTTP submission, metrics and reload", as a user runs it: twistd, curl.

    Send with curl, see it counted in /metrics, add a provider to the running relay's
    config file and log in with it, without a restart.
    """

    timeout = 90

    @defer.inlineCallbacks
    def setUp(self):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.maildir = os.path.join(directory, "maildir")
        self.config = os.path.join(directory, "providers.yaml")
        with open(self.config, "w") as f:
            f.write("providers: []\n")  # the guide starts from an empty provider list
        self.smtp_port, self.http_port, self.metrics_port = free_port(), free_port(), free_port()
        self.relay = Twistd(["--demo", "--http", "--port", str(self.smtp_port),
                             "--http-port", str(self.http_port),
                             "--metrics-port", str(self.metrics_port),
                             "--config", self.config, "--maildir", self.maildir,
                             "--config-poll-interval", "0.2"])
        self.relay.start()
        self.addCleanup(self.relay.stop)
        yield self.relay.wait_for_port(self.http_port)
        yield self.relay.wait_for_port(self.metrics_port)

    def curl_send(self, user: str, password: str):
        message = base64.b64encode(b"From: me@example.com\nTo: you@example.net\n"
                                   b"Subject: Hello\n\nHello World!\n").decode()
        payload = json.dumps({"from": "me@example.com", "to": ["you@example.net"],
                              "data": message})
        return run_tool("curl", "--silent", "--show-error", "--max-time", "15",
                        "--write-out", "\n%{http_code}", "-H", "Content-Type: application/json",
                        "-u", f"{user}:{password}", "-d", payload,
                        f"http://127.0.0.1:{self.http_port}/")

    @defer.inlineCallbacks
    def test_send_count_add_provider_send_again(self):
        output, code = yield self.curl_send(DEMO_USER, DEMO_PASSWORD)
        self.assertEqual(code, 0, output)
        body, status = output.rsplit("\n", 1)
        self.assertEqual(status, "202", output + self.relay.output)
        message_id = json.loads(body)["id"]
        [path] = glob.glob(os.path.join(self.maildir, "new", "*"))
        with open(path, "rb") as f:
            self.assertIn(message_id.encode(), f.read())

        output, code = yield run_tool(
            "curl", "--silent", "--max-time", "10", f"http://127.0.0.1:{self.metrics_port}/metrics")
        self.assertEqual(code, 0, output)
        self.assertIn('esmtpfa_messages_sent_total{provider="demo-userpass"} 1.0', output)

        output, _ = yield self.curl_send("scripts", "bot:s3cret")
        self.assertTrue(output.endswith("401"), output)
        with open(self.config, "w") as f:
            f.write("providers:\n- meta: {name: scripts, type: userpass}\n"
                    "  params: {username: bot, password: s3cret}\n")
        scrape = None

        @defer.inlineCallbacks
        def reloaded():
            nonlocal scrape
            scrape = yield metrics(self.metrics_port)
            return scrape.value("esmtpfa_config_reloads_total", source="file",
                                result="success") == 1
        yield poll_until(reloaded, 20)
        output, _ = yield self.curl_send("scripts", "bot:s3cret")
        self.assertTrue(output.endswith("202"), output + self.relay.output)
        self.assertEqual(len(glob.glob(os.path.join(self.maildir, "new", "*"))), 2)
        scrape = yield metrics(self.metrics_port)
        self.assertEqual(scrape.value("esmtpfa_messages_sent_total", provider="scripts"), 1)

    @defer.inlineCallbacks
    def test_sighup_reloads_the_running_relay(self):
        with open(self.config, "w") as f:
            f.write("providers:\n- meta: {name: ops, type: userpass}\n"
                    "  params: {username: op, password: pw}\n")
        self.relay._process.signalProcess("HUP")

        @defer.inlineCallbacks
        def loaded():
            output, _ = yield self.curl_send("ops", "op:pw")
            return output.endswith("202")
        yield poll_until(loaded, 20)
        yield self.relay.wait_for_lines(r"SIGHUP: reloading")


@defer.inlineCallbacks
def poll_until(condition, timeout: float, step: float = 0.2):
    """Call the Deferred-returning ``condition`` until it is true (bounded)."""
    from twisted.internet import reactor, task
    deadline = reactor.seconds() + timeout
    while True:
        if (yield condition()):
            return
        if reactor.seconds() > deadline:
            raise AssertionError("condition not reached in time")
        yield task.deferLater(reactor, step, lambda: None)

