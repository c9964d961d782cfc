"""SASL toward the upstream: the mechanisms against their RFC test vectors, the AUTH
exchange on the wire (RFC 4954), the choice of mechanism, and CRAM-MD5 against the
recording upstream.  SCRAM against a real server (Postfix + Cyrus SASL) is in
``test_relay_postfix``.
"""

from __future__ import annotations

import base64

from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from esmtpfa.relay.client_sasl import (
    MAX_SCRAM_ITERATIONS,
    MECHANISMS,
    PREFERENCE,
    CramMD5,
    Login,
    OAuthBearer,
    Plain,
    SASLError,
    Scram,
    TokenRefused,
    XOAuth2,
    choose_mechanism,
    choose_token_mechanism,
    client_for,
    saslprep,
    token_client_for,
)
from esmtpfa.relay.interfaces import UNAVAILABLE, Kind, RelayError
from esmtpfa.relay.protocol import SMTPClientProtocol
from esmtpfa.relay.upstream import SMTPRelay, UpstreamSettings
from tests.support.builders import b64, outbound
from tests.support.certs import CertificateAuthority
from tests.support.relaying import send_whole
from tests.support.resources import resources
from tests.support.upstream import RecordingUpstream


class ScramVectorTests(unittest.TestCase):
    """The exchanges printed in RFC 5802 §5 and RFC 7677 §3, byte for byte."""

    def test_scram_sha_1_rfc5802(self):
        scram = Scram("sha1", "user", "pencil", nonce="fyko+d2lbbFgONRv9qkxdawL")
        self.assertEqual(scram.initial(), b"n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL")
        final = scram.respond(b"r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,"
                              b"s=QSXCR+Q6sek8bf92,i=4096")
        self.assertEqual(final, b"c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,"
                                b"p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=")
        self.assertFalse(scram.complete)
        self.assertEqual(scram.respond(b"v=rmF9pqV8S7suAoZWja4dJRkFsKQ="), b"")
        self.assertTrue(scram.complete)

    def test_scram_sha_256_rfc7677(self):
        scram = Scram("sha256", "user", "pencil", nonce="rOprNGfwEbeRWgbNEkqO")
        self.assertEqual(scram.name, "SCRAM-SHA-256")
        self.assertEqual(scram.initial(), b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO")
        final = scram.respond(b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                              b"s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")
        self.assertEqual(final, b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF"
                                b"$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
        scram.respond(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
        self.assertTrue(scram.complete)

    def server_first(self, scram: Scram, extra: bytes = b"", iterations: int = 4096) -> bytes:
        nonce = scram.initial().split(b"r=")[1]
        return (b"r=" + nonce + b"srv,s=" + b64(b"salt", wire=True) + b",i="
                + str(iterations).encode() + extra)

    def test_wrong_server_signature_is_refused(self):
        # A server that does not know the password (a man in the middle) cannot fake "v=".
        scram = Scram("sha256", "user", "pencil")
        scram.respond(self.server_first(scram))
        with self.assertRaises(SASLError):
            scram.respond(b"v=" + b64(b"\0" * 32, wire=True))
        self.assertFalse(scram.complete)

    def test_server_error_attribute(self):
        scram = Scram("sha256", "user", "pencil")
        scram.respond(self.server_first(scram))
        self.assertRaises(SASLError, scram.respond, b"e=invalid-proof")

    def test_nonce_must_extend_ours(self):
        scram = Scram("sha1", "user", "pencil")
        scram.initial()
        self.assertRaises(SASLError, scram.respond, b"r=other,s=c2FsdA==,i=4096")

    def test_mandatory_extension_and_malformed_messages(self):
        for bad in (b"m=ext,", b",garbage"):
            scram = Scram("sha1", "user", "pencil")
            first = self.server_first(scram)
            self.assertRaises(SASLError, scram.respond,
                              bad + first if bad.startswith(b"m") else first + bad)

    def test_iteration_count_is_bounded(self):
        # PBKDF2 runs in the reactor thread: a hostile server must not stall the relay.
        scram = Scram("sha256", "user", "pencil")
        self.assertRaises(SASLError, scram.respond,
                          self.server_first(scram, iterations=MAX_SCRAM_ITERATIONS + 1))
        scram = Scram("sha256", "user", "pencil")
        self.assertRaises(SASLError, scram.respond, self.server_first(scram, iterations=0))

    def test_salted_password_is_cached_per_salt_and_count(self):
        cache: dict = {}
        first = Scram("sha256", "user", "pencil", cache=cache)
        first.respond(self.server_first(first))
        self.assertEqual(len(cache), 1)
        second = Scram("sha256", "user", "pencil", cache=cache)
        second.respond(self.server_first(second))
        self.assertEqual(len(cache), 1)

    def test_username_escaping(self):
        scram = Scram("sha1", "a=b,c", "pencil", nonce="n")
        self.assertEqual(scram.initial(), b"n,,n=a=3Db=2Cc,r=n")


class SASLprepTests(unittest.TestCase):
    """RFC 4013 §3 examples."""

    def test_examples(self):
        self.assertEqual(saslprep("I\u00adX"), "IX")        # soft hyphen mapped to nothing
        self.assertEqual(saslprep("user"), "user")
        self.assertEqual(saslprep("USER"), "USER")          # case preserved
        self.assertEqual(saslprep("\u00aa"), "a")           # NFKC
        self.assertEqual(saslprep("\u2168"), "IX")          # NFKC
        self.assertEqual(saslprep("a\u00a0b"), "a b")       # non-ASCII space → space
        self.assertRaises(ValueError, saslprep, "\u0007")   # prohibited control character
        self.assertRaises(ValueError, saslprep, "\u0627\u0031")  # bidi rule


class SimpleMechanismTests(unittest.TestCase):

    def test_cram_md5_rfc2195(self):
        cram = CramMD5("tim", "tanstaaftanstaaf")
        self.assertIsNone(cram.initial())
        self.assertEqual(cram.respond(b"<1896.697170952@postoffice.reston.mci.net>"),
                         b"tim b913a602c7eda7a495b4e6e7334d3890")
        self.assertTrue(cram.complete)
        self.assertRaises(SASLError, cram.respond, b"again")

    def test_plain_and_login(self):
        plain = Plain("u", "p:q")
        self.assertEqual(plain.initial(), b"\0u\0p:q")
        self.assertEqual(plain.respond(b""), b"\0u\0p:q")  # server ignored the initial one
        self.assertRaises(SASLError, plain.respond, b"")
        login = Login("u", "p")
        self.assertEqual((login.respond(b"Username:"), login.respond(b"Password:")), (b"u", b"p"))
        self.assertTrue(login.complete)
        self.assertRaises(SASLError, login.respond, b"more?")

    def test_choice(self):
        everything = {"LOGIN", "PLAIN", "CRAM-MD5", "SCRAM-SHA-1", "SCRAM-SHA-256"}
        self.assertEqual(choose_mechanism(everything), "SCRAM-SHA-256")
        self.assertEqual(choose_mechanism({"LOGIN", "PLAIN", "SCRAM-SHA-1"}), "SCRAM-SHA-1")
        self.assertEqual(choose_mechanism({"LOGIN", "CRAM-MD5", "PLAIN"}), "CRAM-MD5")
        self.assertEqual(choose_mechanism({"LOGIN", "PLAIN", "GSSAPI"}), "PLAIN")
        self.assertEqual(choose_mechanism({"login"}), "LOGIN")
        self.assertIsNone(choose_mechanism({"GSSAPI", "XOAUTH2"}))
        self.assertEqual(choose_mechanism(everything, forced="plain"), "PLAIN")
        self.assertIsNone(choose_mechanism({"PLAIN"}, forced="SCRAM-SHA-256"))
        self.assertRaises(ValueError, client_for, "GSSAPI", "u", "p")

    def test_settings_validate_the_forced_mechanism(self):
        self.assertEqual(UpstreamSettings("h", auth_mechanism="cram-md5").auth_mechanism,
                         "CRAM-MD5")
        self.assertRaises(ValueError, UpstreamSettings, "h", auth_mechanism="GSSAPI")


class AuthOutcomes:
    """How the protocol states an AUTH that did not succeed: a ``RelayError`` (451)."""

    def failed(self, d) -> RelayError:
        """Either way, the message waits: AUTH failed, 451, try later."""
        error = self.failureResultOf(d, RelayError).value
        self.assertEqual((error.kind, error.command, error.reply.code),
                         (Kind.UNAVAILABLE, "AUTH", 451))
        return error

    def refused(self, d) -> RelayError:
        """The server refused: the only AUTH failure with the upstream's reply."""
        error = self.failed(d)
        self.assertIsNotNone(error.upstream_reply)
        return error

    def cancelled(self, d) -> RelayError:
        """We cancelled: no reply of the upstream's is the verdict."""
        error = self.failed(d)
        self.assertIsNone(error.upstream_reply)
        return error


class ExchangeTests(AuthOutcomes, unittest.TestCase):
    """The RFC 4954 exchange on the wire, against a StringTransport."""

    timeout = 20

    def setUp(self):
        self.protocol = SMTPClientProtocol(Clock(), command_timeout=10, data_timeout=60)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        self.protocol.dataReceived(b"220 ok\r\n")

    def sent(self) -> list[bytes]:
        value = self.transport.value()
        self.transport.clear()
        return value.split(b"\r\n")[:-1]

    def challenged(self, scram: Scram):
        """AUTH begun and the client's first message answered by a server-first message
        that extends its nonce (RFC 5802 §3): the exchange waits for the server's final
        message, or for its verdict."""
        d = self.protocol.authenticate(scram)
        nonce = base64.b64decode(self.sent()[0].split()[-1]).split(b"r=")[1]
        self.protocol.dataReceived(
            b"334 " + b64(b"r=" + nonce + b"x,s=c2FsdA==,i=4096", wire=True) + b"\r\n")
        return d

    def test_scram_exchange(self):
        scram = Scram("sha256", "user", "pencil", nonce="rOprNGfwEbeRWgbNEkqO")
        d = self.protocol.authenticate(scram)
        self.assertEqual(self.sent(), [b"AUTH SCRAM-SHA-256 " + b64(
            b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO", wire=True)])
        self.protocol.dataReceived(b"334 " + b64(
            b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
            b"s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096", wire=True) + b"\r\n")
        [final] = self.sent()
        self.assertTrue(base64.b64decode(final).endswith(
            b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="))
        self.protocol.dataReceived(b"334 " + b64(
            b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=", wire=True) + b"\r\n")
        self.assertEqual(self.sent(), [b""])  # the empty response to the server's final
        self.protocol.dataReceived(b"235 2.7.0 Authentication successful\r\n")
        self.assertEqual(self.successResultOf(d).code, 235)

    def test_forged_server_signature_cancels(self):
        d = self.challenged(Scram("sha256", "user", "pencil"))
        self.sent()
        self.protocol.dataReceived(
            b"334 " + b64(b"v=" + b64(b"forged" * 5, wire=True), wire=True) + b"\r\n")
        self.assertEqual(self.sent(), [b"*"])  # RFC 4954 §4: cancel
        self.protocol.dataReceived(b"501 5.7.0 Authentication cancelled\r\n")
        error = self.cancelled(d)
        self.assertIn("signature", error.detail)

    def test_success_before_the_server_proved_itself_is_not_trusted(self):
        d = self.challenged(Scram("sha1", "user", "pencil"))
        self.protocol.dataReceived(b"235 2.7.0 ok\r\n")  # no "v=": skipped mutual auth
        self.cancelled(d)
        self.assertTrue(self.transport.disconnecting or not self.protocol.usable)

    def test_malformed_challenge_cancels(self):
        d = self.protocol.authenticate(CramMD5("u", "p"))
        self.sent()
        self.protocol.dataReceived(b"334 !!not base64!!\r\n")
        self.assertEqual(self.sent(), [b"*"])
        self.protocol.dataReceived(b"501 5.7.0 cancelled\r\n")
        self.cancelled(d)

    def test_refusal(self):
        d = self.protocol.authenticate(CramMD5("u", "p"))
        self.protocol.dataReceived(b"334 " + b64(b"<1.2@x>", wire=True) + b"\r\n")
        self.protocol.dataReceived(b"535 5.7.8 Authentication credentials invalid\r\n")
        self.assertEqual(self.refused(d).upstream_reply.code, 535)

    def test_empty_initial_response_is_an_equals_sign(self):
        class Empty(Plain):
            def initial(self):
                self.complete = True
                return b""
        d = self.protocol.authenticate(Empty("u", "p"))
        self.assertEqual(self.sent(), [b"AUTH PLAIN ="])
        self.protocol.dataReceived(b"235 2.7.0 ok\r\n")
        self.successResultOf(d)

    def tearDown(self):
        self.protocol.connectionLost(Failure(ConnectionDone()))


class RecordingUpstreamAuthTests(unittest.TestCase):
    """Mechanism choice and login against the recording upstream (CRAM-MD5 checked with
    the password it knows)."""

    timeout = 20

    def setUp(self):
        self.ca = CertificateAuthority(self.mktemp())
        self.leaf = self.ca.issue("upstream.test", filename="upstream")

    def relay(self, mechanisms, password="s3cret:pass", **settings):
        upstream = RecordingUpstream(tls=self.leaf, auth=mechanisms,
                                     credentials=("relayuser", "s3cret:pass")).start()
        self.addCleanup(upstream.stop)
        relay = SMTPRelay(UpstreamSettings(
            "127.0.0.1", upstream.port, server_name="upstream.test", ca_cert=self.ca.cert_path,
            username="relayuser", password=password, helo_name="relay.test",
            command_timeout=5, **settings), resources=resources())
        self.addCleanup(relay.close)
        return upstream, relay

    async def test_cram_md5_preferred_over_plain_and_login(self):
        upstream, relay = self.relay(("LOGIN", "PLAIN", "CRAM-MD5"))
        self.assertEqual((await send_whole(relay, outbound())).code, 250)
        session = upstream.sessions[0]
        self.assertEqual((session.auth_mechanism, session.auth_user), ("CRAM-MD5", "relayuser"))
        self.assertNotIn(b"s3cret", upstream.raw)  # the password never crossed the wire

    async def test_forced_mechanism(self):
        upstream, relay = self.relay(("LOGIN", "PLAIN", "CRAM-MD5"), auth_mechanism="login")
        await send_whole(relay, outbound())
        self.assertEqual(upstream.sessions[0].auth_mechanism, "LOGIN")
        self.assertEqual(upstream.sessions[0].auth_user, "relayuser")

    async def test_forced_mechanism_not_offered(self):
        upstream, relay = self.relay(("PLAIN",), auth_mechanism="CRAM-MD5")
        with self.assertRaises(RelayError) as caught:
            await send_whole(relay, outbound())
        error = caught.exception
        self.assertEqual((error.reply.code, error.reply.enhanced, error.reason),
                         (451, "4.3.0", UNAVAILABLE))
        self.assertIn("CRAM-MD5", error.detail)
        self.assertIn("PLAIN", error.detail)
        self.assertNotIn(b"AUTH", upstream.raw)

    async def test_cram_md5_wrong_password(self):
        upstream, relay = self.relay(("CRAM-MD5",), password="wrong")
        with self.assertRaises(RelayError) as caught:
            await send_whole(relay, outbound())
        self.assertEqual(caught.exception.reply.code, 451)
        self.assertEqual(caught.exception.upstream_reply.code, 535)
        self.assertEqual(upstream.messages, [])


class TokenMechanismTests(unittest.TestCase):
    """XOAUTH2 and OAUTHBEARER (RFC 7628): the initial responses byte for byte, the
    error challenge answered as the RFC (and Google) say, and the refusal recorded."""

    TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"
    ERROR = b'{"status":"invalid_token","scope":"https://mail.google.com/"}'

    def test_xoauth2_initial_response(self):
        mechanism = XOAuth2("printer@contoso.example", self.TOKEN)
        self.assertEqual(mechanism.name, "XOAUTH2")
        self.assertEqual(mechanism.initial(), b"user=printer@contoso.example\x01auth=Bearer "
                         + self.TOKEN.encode() + b"\x01\x01")
        self.assertTrue(mechanism.complete)
        self.assertFalse(mechanism.token_refused)

    def test_oauthbearer_initial_response_rfc7628(self):
        # RFC 7628 §4.1's example shape, with our authzid.
        mechanism = OAuthBearer(self.TOKEN, "server.example.com", 587, "user@example.com")
        self.assertEqual(mechanism.initial(),
                         b"n,a=user@example.com,\x01host=server.example.com\x01port=587"
                         b"\x01auth=Bearer " + self.TOKEN.encode() + b"\x01\x01")
        self.assertTrue(OAuthBearer(self.TOKEN, "h", 25).initial().startswith(b"n,,\x01"))

    def test_oauthbearer_authzid_is_a_saslname(self):
        # RFC 5801 §4: "," and "=" in the authzid are escaped as =2C and =3D.
        mechanism = OAuthBearer(self.TOKEN, "h", 25, "a=b,c@example.com")
        self.assertTrue(mechanism.initial().startswith(b"n,a=a=3Db=2Cc@example.com,\x01"))

    def test_token_client_for(self):
        xoauth2 = token_client_for("xoauth2", "u@example.com", self.TOKEN, "h", 587)
        self.assertIsInstance(xoauth2, XOAuth2)
        bearer = token_client_for("OAUTHBEARER", "u@example.com", self.TOKEN, "h", 587)
        self.assertIn(b"a=u@example.com,", bearer.initial())
        self.assertRaises(ValueError, token_client_for, "PLAIN", "u", self.TOKEN, "h", 25)

    def test_error_challenge_oauthbearer(self):
        mechanism = OAuthBearer(self.TOKEN, "h", 587, "u@example.com")
        mechanism.initial()
        self.assertEqual(mechanism.respond(self.ERROR), b"\x01")  # RFC 7628 §3.2.3
        self.assertTrue(mechanism.token_refused)
        self.assertIsInstance(mechanism.refusal, TokenRefused)
        self.assertEqual(mechanism.refusal.status, "invalid_token")
        self.assertFalse(mechanism.complete)
        self.assertRaises(SASLError, mechanism.respond, self.ERROR)

    def test_error_challenge_xoauth2_google_form(self):
        mechanism = XOAuth2("u@example.com", self.TOKEN)
        mechanism.initial()
        google = b'{"status":"400","schemes":"Bearer","scope":"https://mail.google.com/"}'
        self.assertEqual(mechanism.respond(google), b"")  # Google: an empty response
        self.assertEqual(mechanism.refusal.status, "400")

    def test_unparseable_error_keeps_no_server_text(self):
        for challenge in (b"not json", b'{"status": "x y\\r\\n<script>"}', b"[1]",
                          b'{"status": 401}', b"x" * 5000):
            mechanism = XOAuth2("u", self.TOKEN)
            mechanism.initial()
            mechanism.respond(challenge)
            self.assertTrue(mechanism.token_refused)
            self.assertIn(mechanism.refusal.status, ("unknown", "401"))

    def test_server_that_ignored_the_initial_response(self):
        mechanism = OAuthBearer(self.TOKEN, "h", 25)
        self.assertIn(b"auth=Bearer", mechanism.respond(b""))
        self.assertTrue(mechanism.complete)
        self.assertRaises(SASLError, mechanism.respond, b"")

    def test_no_token_in_repr_or_error(self):
        mechanism = XOAuth2("u", self.TOKEN)
        mechanism.initial()
        mechanism.respond(self.ERROR)
        for text in (repr(mechanism), str(mechanism.refusal), repr(mechanism.refusal)):
            self.assertNotIn(self.TOKEN, text)
            self.assertNotIn("c2ln", text)

    def test_a_token_that_would_forge_fields_is_refused(self):
        for bad in ("s3kr1t\x01auth=Bearer other", "s3kr1t\r\nQUIT", "", "s3kr1tö"):
            with self.assertRaises(ValueError) as caught:
                XOAuth2("u", bad)
            self.assertNotIn("s3kr1t", str(caught.exception))

    def test_choice_for_token_upstreams(self):
        both = {"PLAIN", "LOGIN", "XOAUTH2", "OAUTHBEARER"}
        self.assertEqual(choose_token_mechanism(both), "OAUTHBEARER")
        self.assertEqual(choose_token_mechanism({"plain", "xoauth2"}), "XOAUTH2")
        self.assertIsNone(choose_token_mechanism({"PLAIN", "SCRAM-SHA-256"}))
        self.assertEqual(choose_token_mechanism(both, forced="xoauth2"), "XOAUTH2")
        self.assertIsNone(choose_token_mechanism({"XOAUTH2"}, forced="OAUTHBEARER"))
        self.assertIsNone(choose_token_mechanism(both, forced="PLAIN"))
        # A password upstream never picks a token mechanism on its own.
        self.assertEqual(choose_mechanism(both), "PLAIN")
        self.assertIn("XOAUTH2", MECHANISMS)
        self.assertNotIn("XOAUTH2", PREFERENCE)


class TokenExchangeTests(AuthOutcomes, unittest.TestCase):
    """A refused token on the wire: 334 error challenge, our ``^A``, the server's 535."""

    TOKEN = TokenMechanismTests.TOKEN

    def setUp(self):
        self.protocol = SMTPClientProtocol(Clock(), command_timeout=10, data_timeout=60)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        self.protocol.dataReceived(b"220 ok\r\n")
        self.addCleanup(self.protocol.connectionLost, Failure(ConnectionDone()))

    def sent(self) -> list[bytes]:
        value = self.transport.value()
        self.transport.clear()
        return value.split(b"\r\n")[:-1]

    def test_accepted_token(self):
        mechanism = OAuthBearer(self.TOKEN, "smtp.example", 587, "u@example.com")
        d = self.protocol.authenticate(mechanism)
        [line] = self.sent()
        self.assertTrue(line.startswith(b"AUTH OAUTHBEARER "))
        self.assertIn(b"auth=Bearer " + self.TOKEN.encode(), base64.b64decode(line.split()[2]))
        self.protocol.dataReceived(b"235 2.7.0 Authentication successful\r\n")
        self.assertEqual(self.successResultOf(d).code, 235)
        self.assertFalse(mechanism.token_refused)

    def test_refused_token(self):
        mechanism = OAuthBearer(self.TOKEN, "smtp.example", 587)
        d = self.protocol.authenticate(mechanism)
        self.sent()
        self.protocol.dataReceived(b"334 " + b64(TokenMechanismTests.ERROR, wire=True) + b"\r\n")
        self.assertEqual(self.sent(), [b64(b"\x01", wire=True)])  # "AQ==", not "*"
        self.protocol.dataReceived(b"535 5.7.8 Authentication credentials invalid\r\n")
        self.refused(d)
        self.assertTrue(mechanism.token_refused)

    def test_refused_token_xoauth2(self):
        mechanism = XOAuth2("u@example.com", self.TOKEN)
        d = self.protocol.authenticate(mechanism)
        self.sent()
        self.protocol.dataReceived(b"334 " + b64(TokenMechanismTests.ERROR, wire=True) + b"\r\n")
        self.assertEqual(self.sent(), [b""])
        self.protocol.dataReceived(b"535 5.7.3 Authentication unsuccessful\r\n")
        self.refused(d)
        self.assertEqual(mechanism.refusal.status, "invalid_token")
