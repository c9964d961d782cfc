"""The bounce (esmtpfa.spool.dsn): RFC 3464 structure as a mail client reads it.

Every bounce is parsed back with the ``email`` package, as a client or a bounce
processor would, and one is read by a real mail client (s-nail).  Most of what a bounce
carries comes from peers (addresses, the upstream's reply, the original header
section), so the hostile cases check that none of it can add a header field or a part.
"""

from __future__ import annotations

import email
import email.policy
import functools
import os
import re
import subprocess
from email.utils import parsedate_to_datetime

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from esmtpfa.common.message import Envelope
from esmtpfa.spool import dsn
from esmtpfa.spool.dsn import build_bounce, original_headers
from esmtpfa.spool.interfaces import Ending, Recipient, RecipientState, SpoolEntry
from tests.support.processes import require

RECEIVED = 1700000000.0  # Tue, 14 Nov 2023 22:13:20 +0000
NOW = RECEIVED + 3600
HEADERS = (b"Received: from client by relay.example.com; id urn:uuid:1\r\n"
           b"From: Alice <alice@example.com>\r\n"
           b"To: bob@example.net, carol@example.org\r\n"
           b"Subject: quarterly figures\r\n"
           b"Message-ID: <abc@example.com>\r\n"
           b"\r\n")

ROOT_FIELDS = {"From", "To", "Subject", "Date", "Message-ID", "Auto-Submitted",
               "MIME-Version", "Content-Type"}
PART_FIELDS = {"Content-Type", "Content-Transfer-Encoding", "Content-Description"}
MESSAGE_FIELDS = {"Reporting-MTA", "Arrival-Date", "X-Esmtpfa-Queue-ID"}
RECIPIENT_REQUIRED = {"Final-Recipient", "Action", "Status", "Last-Attempt-Date"}
RECIPIENT_FIELDS = RECIPIENT_REQUIRED | {"Remote-MTA", "Diagnostic-Code"}


def spool_entry(sender: str = "alice@example.com",
                recipients: tuple[str, ...] = ("bob@example.net", "carol@example.org"),
                ) -> SpoolEntry:
    return SpoolEntry(id="urn:uuid:0b6f1f8e-2d0c-4a5e-9f3a-000000000001",
                      envelope=Envelope(sender, recipients), identity="local/alice",
                      ending=Ending.BOUNCE, received=RECEIVED, size=1234)


def failed(address: str, reply: str = "") -> Recipient:
    return Recipient(address, RecipientState.FAILED, reply)


def bounce(entry: SpoolEntry | None = None, recipients=None, headers: bytes = HEADERS,
           **kwargs) -> bytes:
    entry = entry or spool_entry()
    if recipients is None:
        recipients = [failed("bob@example.net", "550 5.1.1 <bob@example.net>: User unknown")]
    kwargs.setdefault("reporting_mta", "relay.example.com")
    kwargs.setdefault("now", NOW)
    return build_bounce(entry, recipients, headers, **kwargs)


def parse(raw: bytes):
    return email.message_from_bytes(raw, policy=email.policy.default)


def raw_fields(block) -> dict[str, str]:
    """A header block's fields as written (not RFC 2047-decoded), unfolded; a field
    given twice fails the test."""
    fields: dict[str, str] = {}
    for name, value in block.raw_items():
        if name in fields:
            raise AssertionError(f"{name} appears twice")
        fields[name] = re.sub(r"\r?\n", "", value)
    return fields


def unescape(value: str) -> str:
    """A header value as the parser hands over UTF-8 (surrogate escapes) as text."""
    return value.encode("ascii", "surrogateescape").decode("utf-8")


def xtext_decode(value: str) -> str:
    """RFC 6533 §3 utf-8-addr-xtext back to the address (independent of the module)."""
    return re.sub(r"\\x\{([0-9A-F]{2,6})\}", lambda m: chr(int(m.group(1), 16)), value)


def final_recipient(value: str) -> str:
    kind, _, address = value.partition("; ")
    if kind == "rfc822":
        return address
    if kind == "utf-8":
        return xtext_decode(address)
    raise AssertionError(f"unexpected address type in {value!r}")


class BounceTestMixin:
    def assertReport(self, raw: bytes, recipients: int):
        """The structure RFC 6522 §3 and RFC 3464 §2 give a bounce; returns the parsed
        message, its three parts and the header blocks of the second."""
        message = parse(raw)
        self.assertEqual(message.defects, [])
        self.assertEqual(message.get_content_type(), "multipart/report")
        self.assertEqual(message.get_param("report-type"), "delivery-status")
        parts = message.get_payload()
        self.assertEqual([part.get_content_type() for part in parts],
                         ["text/plain", "message/delivery-status", "text/rfc822-headers"])
        for part in parts:
            self.assertEqual(part.defects, [])
            self.assertLessEqual(set(part.keys()), PART_FIELDS)
        blocks = parts[1].get_payload()
        self.assertEqual(len(blocks), 1 + recipients)
        self.assertEqual(set(raw_fields(blocks[0])), MESSAGE_FIELDS)
        for block in blocks[1:]:
            names = set(raw_fields(block))
            self.assertLessEqual(RECIPIENT_REQUIRED, names)
            self.assertLessEqual(names, RECIPIENT_FIELDS)
        self.assertEqual(message.epilogue or "", "")
        # The delimiter occurs where the three parts start and the report ends, and
        # nowhere else: no part's text contains it (RFC 2046 §5.1.1).
        self.assertEqual(raw.count(b"--" + message.get_boundary().encode()), 4)
        return message, parts, blocks

    def assertWireSafe(self, raw: bytes, ascii_only: bool = True):
        """CRLF line ends only (the bounce is SMTP content, RFC 5321 §2.3.8), no line
        past RFC 5322 §2.1.1's 998 octets, and 7-bit when nothing asks for more."""
        self.assertNotIn(b"\x00", raw)
        self.assertEqual(raw.count(b"\n"), raw.count(b"\r\n"))
        self.assertEqual(raw.count(b"\r"), raw.count(b"\r\n"))
        self.assertTrue(raw.endswith(b"\r\n"))
        for line in raw.split(b"\r\n"):
            self.assertLessEqual(len(line), 998)
        if ascii_only:
            self.assertTrue(raw.isascii())


class BuildBounceTests(BounceTestMixin, unittest.TestCase):

    def test_report_structure(self):
        raw = bounce()
        message, parts, blocks = self.assertReport(raw, recipients=1)
        self.assertWireSafe(raw)
        self.assertEqual(set(message.keys()), ROOT_FIELDS)
        self.assertEqual(message["From"].addresses[0].display_name, "Mail Delivery System")
        self.assertEqual(message["From"].addresses[0].addr_spec,
                         "MAILER-DAEMON@relay.example.com")
        self.assertEqual(message["To"].addresses[0].addr_spec, "alice@example.com")
        self.assertEqual(message["Subject"], "Undelivered Mail Returned to Sender")
        self.assertEqual(message["Auto-Submitted"], "auto-replied")
        self.assertEqual(message["MIME-Version"], "1.0")
        self.assertTrue(message["Message-ID"].endswith("@relay.example.com>"))
        self.assertEqual(parsedate_to_datetime(message["Date"]).timestamp(), NOW)

    def test_per_message_fields(self):
        _, _, blocks = self.assertReport(bounce(), recipients=1)
        fields = raw_fields(blocks[0])
        self.assertEqual(fields["Reporting-MTA"], "dns; relay.example.com")
        self.assertEqual(fields["Arrival-Date"], "Tue, 14 Nov 2023 22:13:20 +0000")
        self.assertEqual(parsedate_to_datetime(fields["Arrival-Date"]).timestamp(), RECEIVED)
        self.assertEqual(fields["X-Esmtpfa-Queue-ID"],
                         "urn:uuid:0b6f1f8e-2d0c-4a5e-9f3a-000000000001")

    def test_per_recipient_fields(self):
        recipients = [failed("bob@example.net", "550 5.1.1 <bob@example.net>: User unknown"),
                      failed("carol@example.org", "554 Transaction failed")]
        _, _, blocks = self.assertReport(
            bounce(recipients=recipients, remote_mta="mx.example.net"), recipients=2)
        bob, carol = (raw_fields(block) for block in blocks[1:])
        self.assertEqual(bob, {
            "Final-Recipient": "rfc822; bob@example.net",
            "Action": "failed",
            "Status": "5.1.1",
            "Remote-MTA": "dns; mx.example.net",
            "Diagnostic-Code": "smtp; 550 5.1.1 <bob@example.net>: User unknown",
            "Last-Attempt-Date": "Tue, 14 Nov 2023 23:13:20 +0000",
        })
        self.assertEqual(carol["Final-Recipient"], "rfc822; carol@example.org")
        self.assertEqual(carol["Status"], "5.0.0")  # no enhanced code: the class alone
        self.assertEqual(carol["Diagnostic-Code"], "smtp; 554 Transaction failed")

    def test_fields_omitted_without_data(self):
        _, _, blocks = self.assertReport(bounce(recipients=[failed("bob@example.net")]), 1)
        fields = raw_fields(blocks[1])
        self.assertEqual(set(fields), RECIPIENT_REQUIRED)
        self.assertEqual(fields["Status"], "5.0.0")

    def test_status_from_reply(self):
        cases = [
            ("550 5.1.1 User unknown", False, "5.1.1"),
            ("550-5.7.1 Relaying denied / second line", False, "5.7.1"),
            ("552 5.3.4 Message too big", True, "5.3.4"),  # refused for good, then expired
            ("451 4.3.0 Try again later", True, "4.4.7"),
            ("451 Try again later", True, "4.4.7"),
            ("", True, "4.4.7"),
            ("550 4.1.1 mismatched class", False, "5.0.0"),
            ("554 10.1.1 not an enhanced code", False, "5.0.0"),
            ("connection refused", False, "5.0.0"),
            ("421 4.4.2 Idle timeout", False, "4.4.2"),
        ]
        for reply, expired, status in cases:
            _, _, blocks = self.assertReport(
                bounce(recipients=[failed("bob@example.net", reply)], expired=expired), 1)
            fields = raw_fields(blocks[1])
            self.assertEqual((reply, fields["Status"]), (reply, status))
            self.assertEqual(fields["Action"], "failed")

    def test_diagnostic_types(self):
        _, parts, blocks = self.assertReport(bounce(recipients=[
            failed("bob@example.net", "550 5.1.1 no such user"),
            failed("carol@example.org", "connection refused by mx.example.org"),
        ]), 2)
        self.assertEqual(raw_fields(blocks[1])["Diagnostic-Code"],
                         "smtp; 550 5.1.1 no such user")
        self.assertEqual(raw_fields(blocks[2])["Diagnostic-Code"],
                         "X-Esmtpfa; connection refused by mx.example.org")
        self.assertIn("Reason: connection refused by mx.example.org",
                      parts[0].get_content())

    def test_expired(self):
        raw = bounce(recipients=[failed("bob@example.net", "451 4.4.1 No answer from host"),
                                 failed("carol@example.org")], expired=True)
        _, parts, blocks = self.assertReport(raw, recipients=2)
        for block in blocks[1:]:
            fields = raw_fields(block)
            self.assertEqual((fields["Action"], fields["Status"]), ("failed", "4.4.7"))
        text = parts[0].get_content()
        self.assertIn("could not be delivered within its lifetime", text)
        self.assertIn("451 4.4.1 No answer from host", text)
        self.assertIn("Delivery time expired", text)

    def test_text_names_recipients_and_replies(self):
        recipients = [failed("bob@example.net", "550 5.1.1 <bob@example.net>: User unknown"),
                      failed("carol@example.org", "552 5.2.2 Mailbox full")]
        _, parts, _ = self.assertReport(bounce(recipients=recipients), 2)
        text = parts[0].get_content()
        self.assertIn("<bob@example.net>", text)
        self.assertIn("550 5.1.1 <bob@example.net>: User unknown", text)
        self.assertIn("<carol@example.org>", text)
        self.assertIn("552 5.2.2 Mailbox full", text)
        self.assertIn("relay.example.com", text)
        self.assertNotIn("<alice@example.com>", text)

    def test_multiline_reply_on_one_line(self):
        reply = "550-5.7.1 Blocked\r\n550 5.7.1 see https://example.net/why"
        _, parts, blocks = self.assertReport(
            bounce(recipients=[failed("bob@example.net", reply)]), 1)
        fields = raw_fields(blocks[1])
        self.assertEqual(fields["Diagnostic-Code"],
                         "smtp; 550-5.7.1 Blocked / 550 5.7.1 see https://example.net/why")
        self.assertEqual(fields["Status"], "5.7.1")

    def test_original_headers_part(self):
        _, parts, _ = self.assertReport(bounce(), 1)
        self.assertEqual(parts[2]["Content-Transfer-Encoding"], "7bit")
        self.assertEqual(parts[2].get_content().replace("\r\n", "\n"),
                         HEADERS.decode().replace("\r\n", "\n").rstrip("\n") + "\n")

    def test_original_headers_truncated_at_a_line(self):
        headers = b"".join(b"X-Filler-%03d: %s\r\n" % (n, b"y" * 40) for n in range(100))
        raw = bounce(headers=headers + b"\r\n", max_headers=1000)
        _, parts, _ = self.assertReport(raw, 1)
        kept = parts[2].get_content().replace("\r\n", "\n")
        self.assertTrue(kept.endswith("y\n"))
        lines = kept.splitlines()
        self.assertEqual(len(lines), 1000 // len(b"X-Filler-000: " + b"y" * 40 + b"\r\n"))
        for line in lines:
            self.assertRegex(line, r"^X-Filler-\d{3}: y{40}$")
        self.assertIn("(shortened)", parts[0].get_content())

    def test_non_ascii_recipient_uses_utf8_type(self):
        raw = bounce(recipients=[failed("jörg@exämple.org", "550 5.1.1 unbekannt")])
        _, parts, blocks = self.assertReport(raw, 1)
        self.assertWireSafe(raw)  # the xtext form keeps the report 7-bit
        value = raw_fields(blocks[1])["Final-Recipient"]
        self.assertEqual(value, r"utf-8; j\x{F6}rg@ex\x{E4}mple.org")
        self.assertEqual(final_recipient(value), "jörg@exämple.org")
        self.assertIn("<jörg@exämple.org>", parts[0].get_content())

    def test_non_ascii_sender(self):
        raw = bounce(spool_entry(sender="jörg@exämple.org"))
        message, _, _ = self.assertReport(raw, 1)
        self.assertWireSafe(raw, ascii_only=False)
        # RFC 6532 §3.2: raw UTF-8, not RFC 2047 (the parser hands it over escaped).
        self.assertIn("To: jörg@exämple.org\r\n".encode(), raw)
        self.assertEqual(unescape(raw_fields(message)["To"]), "jörg@exämple.org")

    def test_null_sender_is_never_bounced(self):
        self.assertRaises(ValueError, bounce, spool_entry(sender=""))

    def test_nothing_to_report(self):
        self.assertRaises(ValueError, bounce, recipients=[])

    def test_reporting_mta_must_be_a_host_name(self):
        for name in ("relay.example.com\r\nX-Injected: 1", "relay example", "", "a;b"):
            self.assertRaises(ValueError, bounce, reporting_mta=name)
        raw = bounce(reporting_mta="relais.bücher.example")
        self.assertIn(b"MAILER-DAEMON@relais.xn--bcher-kva.example", raw)


class HostileInputTests(BounceTestMixin, unittest.TestCase):
    """Peer data that tries to add header fields or parts."""

    def assertNoInjection(self, raw: bytes):
        message, parts, blocks = self.assertReport(raw, recipients=1)
        self.assertLessEqual(set(message.keys()), ROOT_FIELDS)
        self.assertNotIn(b"\r\nX-Injected", raw.split(b"text/rfc822-headers")[0])
        for block in blocks:
            for value in block.values():  # decoded as a reader would: still clean
                self.assertNotRegex(str(value), r"[\r\n\x00]")
        return message, parts, blocks

    def test_line_breaks_in_reply(self):
        reply = "550 5.1.1 no\r\nX-Injected: 1\r\n\r\n--boundary\nX-Injected: 2\x00\x85\u2028"
        raw = bounce(recipients=[failed("bob@example.net", reply)])
        _, parts, blocks = self.assertNoInjection(raw)
        self.assertWireSafe(raw)
        self.assertEqual(raw_fields(blocks[1])["Diagnostic-Code"],
                         "smtp; 550 5.1.1 no / X-Injected: 1 / --boundary / X-Injected: 2?")
        self.assertNotIn("\x00", parts[0].get_content())

    def test_encoded_words_in_reply_and_addresses(self):
        # The email package decodes RFC 2047 words in the values it is given: these
        # would come out as real line breaks if they reached its header parser.
        word = "=?utf-8?q?a=0D=0AX-Injected:_1?="
        raw = bounce(spool_entry(sender=f"{word}@example.com"),
                     recipients=[failed(f"{word}@example.net", f"550 5.1.1 {word}")])
        message, _, blocks = self.assertNoInjection(raw)
        self.assertNotIn("To", message)  # not an address we can show safely
        fields = raw_fields(blocks[1])
        self.assertEqual(final_recipient(fields["Final-Recipient"]), f"{word}@example.net")
        self.assertNotIn("=?", fields["Diagnostic-Code"])

    def test_line_breaks_in_addresses(self):
        address = "bob@example.net\r\nX-Injected: 1"
        raw = bounce(spool_entry(sender="alice@example.com\r\nX-Injected: 2"),
                     recipients=[failed(address, "550 5.1.1 no")])
        message, parts, blocks = self.assertNoInjection(raw)
        self.assertNotIn("To", message)
        value = raw_fields(blocks[1])["Final-Recipient"]
        self.assertTrue(value.startswith("utf-8; "))
        self.assertEqual(final_recipient(value), address)
        self.assertIn("<bob@example.net??X-Injected: 1>", parts[0].get_content())

    def test_headers_with_the_boundary(self):
        # Make the first boundary tried predictable, and put it in the original header
        # section, as a delimiter line, a closing one and one with transport padding.
        for line in (b"--=_aaaa", b"--=_aaaa--", b"--=_aaaa  ", b"\xff--=_aaaa"):
            tokens = iter(["aaaa", "bbbb"])
            self.patch(dsn, "_token", functools.partial(next, tokens))
            headers = b"Subject: x\r\n" + line + b"\r\nX-After: 1\r\n\r\n"
            raw = bounce(headers=headers)
            message, parts, _ = self.assertNoInjection(raw)
            if not line.startswith(b"\xff"):  # quoted-printable: "=FF--=3D_aaaa"
                self.assertEqual(message.get_boundary(), "=_bbbb")
            kept = parts[2].get_content().replace("\r\n", "\n")
            self.assertIn("X-After: 1\n", kept)
            self.assertIn("--=_aaaa", kept)

    def test_reply_with_the_boundary(self):
        tokens = iter(["aaaa", "bbbb"])
        self.patch(dsn, "_token", lambda: next(tokens))
        raw = bounce(recipients=[failed("bob@example.net", "550 x\r\n--=_aaaa--\r\n")])
        message, _, _ = self.assertNoInjection(raw)
        self.assertEqual(message.get_boundary(), "=_bbbb")

    def test_eight_bit_and_control_octets_in_headers(self):
        headers = (b"Subject: caf\xc3\xa9\r\nX-Latin1: caf\xe9\r\nX-Nul: a\x00b\r\n"
                   b"X-Bare-LF: a\nX-Bare-CR: b\rX-Long: " + b"z" * 2000 + b"\r\n\r\n")
        raw = bounce(headers=headers)
        _, parts, _ = self.assertNoInjection(raw)
        self.assertWireSafe(raw)
        self.assertEqual(parts[2]["Content-Transfer-Encoding"], "quoted-printable")
        kept = parts[2].get_content().replace("\r\n", "\n")
        self.assertEqual(kept, "Subject: café\nX-Latin1: caf\ufffd\nX-Nul: a\x00b\n"
                               "X-Bare-LF: a\nX-Bare-CR: b\nX-Long: " + "z" * 2000 + "\n")

    def test_body_in_headers_argument_stays_in_the_part(self):
        headers = (b"Subject: x\r\n\r\nContent-Type: text/html\r\n\r\n<p>hi</p>\r\n"
                   b"\r\n\r\n")
        _, parts, _ = self.assertNoInjection(bounce(headers=headers))
        self.assertIn("<p>hi</p>", parts[2].get_content())


# -- the property --------------------------------------------------------------------

HOSTILE_TEXT = st.sampled_from([
    "\r\n", "\n", "\r", "\x00", "\t", "\x0b", "\x0c", "\x85", "\u2028", "\udcff", "é",
    "\U0001f600",
    "\r\nX-Injected: 1", "\r\n\r\n", "=?utf-8?q?a=0D=0AX-Injected:_1?=", "--=_collide",
    "\r\n--=_collide--\r\n", "@", '"', "\\", "+", "=", " ", "<", ">", ";", ",",
])
HOSTILE_BYTES = st.sampled_from([
    b"\r\n", b"\n", b"\r", b"\x00", b"\xff", b"\xc3\xa9", b"\r\nX-Injected: 1",
    b"\r\n--=_collide\r\n", b"--=_collide--", b"\r\n\r\n", b"=?utf-8?q?=0D=0A?=",
    b"Content-Type: multipart/mixed; boundary=x\r\n", b"\r\n--x\r\n",
])


def peer_text(min_size: int = 0):
    return st.lists(st.one_of(st.text(max_size=12), HOSTILE_TEXT),
                    max_size=8).map("".join).filter(lambda s: len(s) >= min_size)


ADDRESSES = st.one_of(st.emails(), peer_text(min_size=1))
SENDERS = st.one_of(st.emails(), peer_text(min_size=1))
SMTP_REPLY = r"\A[245][0-9]{2}[ -][245]\.[0-9]{1,3}\.[0-9]{1,3} [ -~]{0,40}\Z"
REPLIES = st.one_of(st.just(""), st.from_regex(SMTP_REPLY), peer_text())
HEADER_SECTIONS = st.lists(st.one_of(st.binary(max_size=40), HOSTILE_BYTES),
                           max_size=12).map(b"".join)


class PropertyTests(BounceTestMixin, unittest.TestCase):

    @settings(max_examples=300, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(sender=SENDERS,
           recipients=st.lists(st.tuples(ADDRESSES, REPLIES), min_size=1, max_size=4),
           headers=HEADER_SECTIONS, expired=st.booleans(),
           remote=st.one_of(st.none(), st.just("mx.example.net"), peer_text(min_size=1)))
    def test_no_input_changes_the_structure(self, sender, recipients, headers, expired,
                                            remote):
        # The first boundary tried is one the hostile inputs carry.
        tokens = iter(["collide"] + [f"fresh{n}" for n in range(10)])
        original = dsn._token
        dsn._token = lambda: next(tokens)
        try:
            raw = build_bounce(spool_entry(sender=sender, recipients=()),
                               [failed(address, reply) for address, reply in recipients],
                               headers, reporting_mta="relay.example.com", now=NOW,
                               expired=expired, remote_mta=remote)
        finally:
            dsn._token = original
        self.assertWireSafe(raw, ascii_only=False)
        if sender.isascii():
            self.assertTrue(raw.isascii())
        message, parts, blocks = self.assertReport(raw, recipients=len(recipients))
        self.assertLessEqual(set(message.keys()), ROOT_FIELDS)
        self.assertEqual(set(message.keys()) | {"To"}, ROOT_FIELDS)
        if "To" in message:
            self.assertEqual(unescape(raw_fields(message)["To"]), sender)
        for block, (address, _reply) in zip(blocks[1:], recipients, strict=True):
            fields = raw_fields(block)
            expected = "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in address)
            self.assertEqual(final_recipient(fields["Final-Recipient"]), expected)
            self.assertEqual(fields["Action"], "failed")
            self.assertRegex(fields["Status"], r"^[45]\.[0-9]{1,3}\.[0-9]{1,3}$")
            for value in fields.values():
                self.assertRegex(value, r"^[\x20-\x7e]*$")
                self.assertNotIn("=?", value)
        parts[0].get_content()
        parts[2].get_content()


# -- reading the stored message ------------------------------------------------------


class OriginalHeadersTests(unittest.TestCase):

    def test_whole_section_at_every_split(self):
        content = HEADERS + b"body line 1\r\n\r\nbody line 2\r\n"
        for cut in range(len(content) + 1):
            chunks = [content[:cut], content[cut:]]
            self.assertEqual((cut, original_headers(chunks)), (cut, HEADERS))

    def test_stops_reading_after_the_section(self):
        read = []

        def endless():
            yield HEADERS[:20]
            yield HEADERS[20:] + b"body"
            while True:
                read.append(1)
                yield b"x" * 65536

        chunks = endless()
        self.assertEqual(original_headers(chunks), HEADERS)
        self.assertEqual(read, [])
        self.assertRaises(StopIteration, next, chunks)  # closed: the file is released

    def test_long_section_cut_at_a_line(self):
        def endless():
            while True:
                yield b"X-Filler: " + b"y" * 30 + b"\r\n"  # 42 octets a line

        self.assertEqual(original_headers(endless(), limit=100),
                         2 * (b"X-Filler: " + b"y" * 30 + b"\r\n"))

    def test_section_ending_past_the_limit(self):
        content = b"A: 1\r\nB: 2\r\n\r\nbody\r\n"
        self.assertEqual(original_headers([content], limit=13), b"A: 1\r\nB: 2\r\n")
        self.assertEqual(original_headers([content], limit=14), b"A: 1\r\nB: 2\r\n\r\n")

    def test_one_huge_line(self):
        self.assertEqual(original_headers([b"X: " + b"y" * 100], limit=50), b"")

    def test_message_without_body(self):
        self.assertEqual(original_headers([b"A: 1\r\n", b"B: 2\r\n"]), b"A: 1\r\nB: 2\r\n")

    def test_message_without_header_fields(self):
        self.assertEqual(original_headers([b"\r\nbody\r\n"]), b"\r\n")
        self.assertEqual(original_headers([]), b"")


# -- a real mail client --------------------------------------------------------------


def mbox(raw: bytes) -> bytes:
    """One message as an mbox file: a ``From `` separator line, LF line ends, and body
    lines that start with ``From `` quoted (the mboxrd convention)."""
    text = raw.replace(b"\r\n", b"\n")
    text = re.sub(rb"(?m)^(>*From )", rb">\1", text)
    return b"From MAILER-DAEMON Tue Nov 14 23:13:20 2023\n" + text + b"\n"


class MailClientTests(unittest.TestCase):
    """s-nail (Debian's ``s-nail``) reads the bounce like a person's mail client."""

    timeout = 60

    def read_with_snail(self, raw: bytes) -> str:
        snail = require("s-nail")
        home = self.mktemp()
        os.makedirs(home)
        path = os.path.join(home, "mbox")
        with open(path, "wb") as f:
            f.write(mbox(raw))
        # -# batch mode, -:/ no resource files, -N no header summary, -R read-only;
        # message/delivery-status shown as plain text (s-nail's ?t type marker).
        commands = b"set pipe-message/delivery-status=?t\ntype 1\n"
        env = {"HOME": home, "MAILRC": "/dev/null", "LC_ALL": "C.UTF-8",
               "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        done = subprocess.run([snail, "-#", "-:/", "-N", "-R", "-f", path],
                              input=commands, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, env=env, timeout=30)
        output = done.stdout.decode("utf-8", "replace")
        self.assertEqual(done.returncode, 0, output)
        return output

    def test_snail_reads_the_bounce(self):
        raw = bounce(recipients=[failed("bob@example.net",
                                        "550 5.1.1 <bob@example.net>: User unknown")],
                     remote_mta="mx.example.net")
        output = self.read_with_snail(raw)
        self.assertIn("Subject: Undelivered Mail Returned to Sender", output)
        self.assertIn("From: Mail Delivery System <MAILER-DAEMON@relay.example.com>", output)
        self.assertIn("<bob@example.net>", output)  # the text part
        self.assertIn("The mail server answered: 550 5.1.1", output)
        self.assertIn("Final-Recipient: rfc822; bob@example.net", output)
        self.assertIn("Status: 5.1.1", output)
        self.assertIn("Subject: quarterly figures", output)  # the original headers
        self.assertIn("[-- #1.3 ", output)
        self.assertNotIn("[-- #1.4 ", output)

    def test_snail_reads_a_hostile_bounce(self):
        tokens = iter(["aaaa", "bbbb"])
        self.patch(dsn, "_token", lambda: next(tokens))
        headers = (b"From x\r\nSubject: caf\xc3\xa9\r\n--=_aaaa\r\n"
                   b"Content-Type: text/plain\r\n\r\n")
        raw = bounce(spool_entry(sender="jörg@exämple.org"),
                     recipients=[failed("bob@example.net\r\nX-Injected: 1",
                                        "550 5.1.1 no\r\n--=_aaaa--")],
                     headers=headers, expired=True)
        output = self.read_with_snail(raw)
        self.assertIn("Subject: Undelivered Mail Returned to Sender", output)
        self.assertIn("To: jörg@exämple.org", output)
        self.assertIn(r"Final-Recipient: utf-8; bob@example.net\x{0D}\x{0A}X-Injected:", output)
        self.assertIn("Status: 5.1.1", output)
        self.assertIn("Subject: café", output)
        self.assertNotIn("\nX-Injected", output)
        self.assertIn("[-- #1.3 ", output)
        self.assertNotIn("[-- #1.4 ", output)
