"""Generated input for SMTP AUTH: the server's SASL decoding (``esmtpfa.smtp.server_sasl``).

Three properties.  What our own relay client sends for any username and secret (the
mechanisms of ``esmtpfa.relay.client_sasl``, which speak to real servers) is decoded by our
server into exactly that username and secret: the two sides agree on the RFC 4616,
RFC 7628 and XOAUTH2 encodings, escapes included.  Any other bytes either decode or are
refused with ``SMTPReplyError`` carrying a 5xx reply with its enhanced code, never
another exception.  And over a whole session, any exchange ends in well-formed replies.
"""

from __future__ import annotations

import base64

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial import unittest

from esmtpfa.common.replies import AUTH_CANCELLED, AUTH_MALFORMED, SMTPReplyError
from esmtpfa.relay import client_sasl as client
from esmtpfa.smtp import server_sasl as sasl
from tests.test_properties_smtp import (
    ENHANCED,
    HOSTILE_BYTES,
    PASSWORD,
    PROPERTY,
    USER,
    Session,
    assert_enhanced,
    in_pieces,
)

#: What a person may type as a user name or a password: any text without NUL (the
#: PLAIN separator, RFC 4616 §2) and the rest of C0, which no mechanism carries.
NAME_CHARS = st.characters(blacklist_categories=("Cs",), min_codepoint=0x20)
NAMES = st.text(NAME_CHARS, min_size=1, max_size=24)
SECRETS = st.text(NAME_CHARS, max_size=24)
#: RFC 6750 §2.1 b64token, what a bearer token is.
TOKENS = st.from_regex(r"\A[A-Za-z0-9\-._~+/]{1,40}=*\Z")
HOSTS = st.from_regex(r"\A[a-z0-9]{1,10}(\.[a-z0-9]{1,10}){0,3}\Z")

MECHANISMS = st.sampled_from(sorted(sasl.MECHANISMS))


def run(mechanism: sasl.Mechanism, responses: list[bytes]) -> sasl.Step:
    """The server side of one exchange: the first response is the initial one."""
    step = mechanism.start(responses[0] if responses else None)
    for response in responses[1:]:
        if not isinstance(step, sasl.Challenge):
            break
        step = mechanism.respond(response)
    return step


class RoundTrips(unittest.TestCase):
    """The relay's client mechanisms and the server's decode each other exactly."""

    def offer(self, name: str, mechanism: client.Mechanism) -> sasl.Offer:
        server = sasl.mechanism_for(name)
        initial = mechanism.initial()
        step = server.start(initial)
        challenges = 0
        while isinstance(step, sasl.Challenge):
            challenges += 1
            self.assertLess(challenges, 3)
            step = server.respond(mechanism.respond(step.data))
        return step

    @PROPERTY
    @given(NAMES, SECRETS)
    def test_plain(self, username, password):
        offer = self.offer("PLAIN", client.Plain(username, password))
        self.assertEqual((offer.username, offer.secret, offer.bearer),
                         (username, password, False))

    @PROPERTY
    @given(NAMES, SECRETS)
    def test_login(self, username, password):
        offer = self.offer("LOGIN", client.Login(username, password))
        self.assertEqual((offer.username, offer.secret, offer.bearer),
                         (username, password, False))

    @PROPERTY
    @given(NAMES.filter(lambda name: "\x01" not in name), TOKENS)
    def test_xoauth2(self, username, token):
        offer = self.offer("XOAUTH2", client.XOAuth2(username, token))
        self.assertEqual((offer.username, offer.secret, offer.bearer),
                         (username, token, True))

    @PROPERTY
    @given(NAMES, TOKENS, HOSTS, st.integers(1, 65535))
    def test_oauthbearer_with_escaped_authzid(self, username, token, host, port):
        """RFC 5801 saslname: ``,`` and ``=`` in the authzid are escaped by the client
        and unescaped by the server, in the one order that is exact."""
        offer = self.offer("OAUTHBEARER", client.OAuthBearer(token, host, port, username))
        self.assertEqual((offer.username, offer.secret, offer.bearer, offer.oauth_host),
                         (username, token, True, host))

    @PROPERTY
    @given(st.binary(max_size=200))
    def test_base64_responses_decode_to_what_was_encoded(self, raw):
        self.assertEqual(sasl.decode_response(base64.b64encode(raw) or b"="), raw)


class AnyBytes(unittest.TestCase):
    @PROPERTY
    @given(st.one_of(HOSTILE_BYTES, st.binary(max_size=60),
                     st.binary(max_size=60).map(base64.b64encode)))
    def test_a_response_line_decodes_or_is_refused_with_501(self, line):
        try:
            sasl.decode_response(line)
        except SMTPReplyError as error:
            self.assertIn(error.reply, (AUTH_CANCELLED, AUTH_MALFORMED))

    @PROPERTY
    @given(MECHANISMS, st.lists(st.one_of(
        HOSTILE_BYTES, st.binary(max_size=40),
        st.lists(st.sampled_from([b"\0", b"\x01", b"user=", b"auth=", b"Bearer ",
                                  b"bearer t", b"n,a=", b"y,,", b"=2C", b"=3D", b",",
                                  b"host=", b"\xff", b"x"]), max_size=10).map(b"".join)),
        max_size=4))
    def test_any_exchange_is_an_offer_a_challenge_or_a_5xx(self, name, responses):
        """Every mechanism, any decoded responses: a challenge, an offer whose fields
        carry no NUL, or a refusal with a 5xx and an enhanced code of its class."""
        try:
            step = run(sasl.mechanism_for(name), responses)
        except SMTPReplyError as error:
            reply = error.reply
            self.assertEqual(reply.code // 100, 5)
            self.assertRegex(reply.enhanced, r"\A5\.\d{1,3}\.\d{1,3}\Z")
            return
        if isinstance(step, sasl.Offer):
            self.assertNotIn("\0", step.username + step.secret)
            if step.bearer:
                self.assertTrue(step.secret and step.secret == step.secret.strip())
        else:
            self.assertIsInstance(step, sasl.Challenge)


class ThroughTheServer(unittest.TestCase):
    @PROPERTY
    @given(st.sampled_from(["PLAIN", "LOGIN", "XOAUTH2", "OAUTHBEARER", "plain", "CRAM-MD5"]),
           st.one_of(st.none(), st.just("="), st.binary(max_size=40).map(
               lambda raw: base64.b64encode(raw).decode())),
           st.lists(st.one_of(st.binary(max_size=40).map(base64.b64encode), HOSTILE_BYTES,
                              st.sampled_from([b"*", b"=", b""])), max_size=5),
           st.data())
    def test_any_exchange_gets_well_formed_replies(self, name, initial, lines, data):
        session = Session()
        self.addCleanup(session.close)
        command = f"AUTH {name}" + ("" if initial is None else f" {initial}")
        stream = (b"EHLO c\r\n" + command.encode() + b"\r\n"
                  + b"".join(line.replace(b"\n", b"") + b"\r\n" for line in lines))
        for piece in data.draw(in_pieces(stream)):
            session.send(piece)
        replies = session.replies()
        assert_enhanced(self, replies)
        for code, text in replies[2:]:
            self.assertIn(code, (334, 235, 421, 454, 500, 501, 502, 503, 504, 535, 538))
            if code == 235:  # only the one account the checker knows
                self.assertTrue(ENHANCED.match(text[0]))

    def test_the_one_account_logs_in_with_each_password_mechanism(self):
        for name, mechanism in (("PLAIN", client.Plain(USER, PASSWORD)),
                                ("LOGIN", client.Login(USER, PASSWORD))):
            session = Session()
            self.addCleanup(session.close)
            initial = mechanism.initial()
            command = f"AUTH {name}" + (
                f" {base64.b64encode(initial).decode()}" if initial else "")
            session.send(b"EHLO c\r\n" + command.encode() + b"\r\n")
            while session.replies()[-1][0] == 334:
                challenge = base64.b64decode(session.replies()[-1][1][0])
                session.send(base64.b64encode(mechanism.respond(challenge)) + b"\r\n")
            self.assertEqual(session.replies()[-1][0], 235, name)
