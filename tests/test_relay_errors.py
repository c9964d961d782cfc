"""The relay's one error type and the transaction's states.

A ``RelayError`` is stated once, where the failure is seen, with the kind the ``Kind``
docstrings give it (docs/delivery-guarantee.md, "Failures are values: kind and phase");
the upstream transaction moves between explicit states along one table.  The protocol's
own errors (phase at the source) are tested in ``test_relay_protocol``.
"""

from __future__ import annotations

from twisted.trial import unittest

from esmtpfa.common.message import Envelope
from esmtpfa.common.replies import Reply
from esmtpfa.relay.errors import permanent, policy, unavailable
from esmtpfa.relay.interfaces import REJECTED, UNAVAILABLE, Kind, Phase, RelayError
from esmtpfa.relay.settings import PoolSettings
from esmtpfa.relay.upstream import (
    _MOVES,
    IllegalMove,
    SMTPRelay,
    State,
    UpstreamSettings,
    UpstreamTransaction,
)
from tests.support.builders import outbound
from tests.support.resources import resources
from tests.support.upstream import RecordingUpstream

KINDS = (Kind.REJECTED, Kind.POLICY, Kind.UNAVAILABLE, Kind.PROTOCOL, Kind.BUSY,
         Kind.CLOSING, Kind.EXPIRED, Kind.CREDENTIALS)
CONTENT = b"From: alice@example.com\r\nSubject: states\r\n\r\nHello.\r\n"


class KindTests(unittest.TestCase):
    """The coarse-reason constructor path knows every kind."""

    def test_credentials_given_as_the_reason_is_a_credentials_failure(self):
        # Regression: ``_KINDS`` lacked CREDENTIALS, so this became UNAVAILABLE, and the
        # breaker learnt of an upstream failure from a token endpoint's outage.
        error = RelayError(Reply(451, "4.7.0", "Upstream credentials unavailable"),
                           Kind.CREDENTIALS, "AUTH")
        self.assertEqual(error.kind, Kind.CREDENTIALS)
        self.assertIn(error.kind, Kind.NEUTRAL)
        self.assertEqual(error.reason, UNAVAILABLE)

    def test_every_kind_given_as_the_reason_is_kept(self):
        for kind in KINDS:
            self.assertEqual(RelayError(Reply(451, "4.0.0", "x"), kind).kind, kind)

    def test_coarse_reasons(self):
        reply = Reply(550, "5.1.1", "no")
        self.assertEqual(RelayError(reply, REJECTED).kind, Kind.REJECTED)
        self.assertEqual(RelayError(reply, UNAVAILABLE).kind, Kind.UNAVAILABLE)
        self.assertEqual(RelayError(reply, "something else").kind, Kind.UNAVAILABLE)

    def test_constructors(self):
        refusal = policy(Reply(452, "4.5.3", "later"), "RCPT", "u:25", "LIMITS RCPTMAX=2")
        self.assertEqual((refusal.kind, refusal.reason, refusal.detail, refusal.upstream),
                         (Kind.POLICY, REJECTED, "LIMITS RCPTMAX=2", "u:25"))
        self.assertEqual(permanent(554, "5.6.3", "no", "DATA").kind, Kind.POLICY)
        late = unavailable("4.4.2", "x", "y", "end of data", phase=Phase.OUTCOME_UNKNOWN)
        self.assertTrue(late.outcome_unknown)
        self.assertEqual(late.reply.code, 451)


class RcptmaxTests(unittest.TestCase):
    """Regression: the LIMITS RCPTMAX refusal (``_next_rcpt``) was built as the
    upstream's verdict (``Kind.REJECTED``).  The upstream was never asked: it is our
    refusal before sending, ``Kind.POLICY``, with no upstream reply."""

    timeout = 30

    async def test_recipient_over_rcptmax_is_our_policy(self):
        upstream = RecordingUpstream(extensions=("PIPELINING", "LIMITS RCPTMAX=2")).start()
        self.addCleanup(upstream.stop)
        relay = SMTPRelay(UpstreamSettings("127.0.0.1", upstream.port, starttls="none",
                                           helo_name="relay.test", connect_timeout=5.0,
                                           command_timeout=2.0), resources=resources())
        self.addCleanup(relay.close)
        reported: list[RelayError] = []
        relay.observers.append(reported.append)
        transaction = await relay.begin(Envelope("alice@example.com", ()), "m", "c")
        await transaction.addRecipient("a@x.example")
        await transaction.addRecipient("b@x.example")
        with self.assertRaises(RelayError) as caught:
            await transaction.addRecipient("c@x.example")
        error = caught.exception
        self.assertEqual((error.reply.code, error.reply.enhanced), (452, "4.5.3"))
        self.assertEqual(error.kind, Kind.POLICY)
        self.assertIsNone(error.upstream_reply)
        self.assertFalse(error.upstream_verdict)
        self.assertEqual(error.reason, REJECTED)  # the metric label is unchanged
        self.assertEqual(reported, [error])
        self.assertEqual(upstream.sessions[0].verbs().count("RCPT"), 2)  # never asked
        transaction.abort()


class StateTests(unittest.TestCase):
    """The transaction's states, and the one table of moves."""

    timeout = 30

    def test_every_state_has_its_moves_and_aborted_is_final(self):
        self.assertEqual(set(_MOVES), set(State))
        self.assertEqual(_MOVES[State.ABORTED], frozenset())
        for state in set(State) - {State.ABORTED}:
            self.assertIn(State.ABORTED, _MOVES[state], state)

    def test_an_illegal_move_is_refused_loudly(self):
        relay = SMTPRelay(UpstreamSettings("127.0.0.1", 25, starttls="none"), resources=resources())
        self.addCleanup(relay.close)
        transaction = UpstreamTransaction(relay, Envelope("a@b.example", ()), "m", "c")
        self.assertIs(transaction.state, State.NEW)
        self.assertRaises(IllegalMove, transaction._move, State.SENDING)
        self.assertIs(transaction.state, State.NEW)
        transaction.abort()
        self.assertIs(transaction.state, State.ABORTED)
        self.assertRaises(IllegalMove, transaction._move, State.OPEN)

    def relay_to(self, upstream: RecordingUpstream) -> SMTPRelay:
        relay = SMTPRelay(UpstreamSettings("127.0.0.1", upstream.port, starttls="none",
                                           helo_name="relay.test", connect_timeout=5.0,
                                           command_timeout=2.0),
                          pool=PoolSettings(idle_timeout=5.0), resources=resources())
        self.addCleanup(relay.close)
        return relay

    def upstream(self, **kwargs) -> RecordingUpstream:
        upstream = RecordingUpstream(**kwargs).start()
        self.addCleanup(upstream.stop)
        return upstream

    async def test_a_delivery_goes_new_open_sending_done(self):
        relay = self.relay_to(self.upstream())
        transaction = await relay.begin(Envelope("alice@example.com", ()), "m", "c")
        self.assertIs(transaction.state, State.NEW)
        adding = transaction.addRecipient("bob@example.com")
        self.assertIn(transaction.state, (State.OPENING, State.OPEN))
        await adding
        self.assertIs(transaction.state, State.OPEN)
        message = outbound(CONTENT)
        sending = transaction.send(message)
        self.assertIs(transaction.state, State.SENDING)
        self.assertEqual((await sending).code, 250)
        self.assertIs(transaction.state, State.DONE)
        with self.assertRaises(RuntimeError):
            await transaction.addRecipient("carol@example.com")

    async def test_a_refused_mail_is_a_verdict_for_every_recipient(self):
        relay = self.relay_to(self.upstream(replies={"MAIL": "550 5.7.1 Not you"}))
        transaction = await relay.begin(Envelope("alice@example.com", ()), "m", "c")
        with self.assertRaises(RelayError) as first:
            await transaction.addRecipient("bob@example.com")
        self.assertIs(transaction.state, State.FAILED)
        with self.assertRaises(RelayError) as second:
            await transaction.addRecipient("carol@example.com")
        self.assertIs(second.exception, first.exception)
        transaction.abort()
        self.assertIs(transaction.state, State.ABORTED)

    async def test_a_recipient_we_refuse_opens_nothing(self):
        relay = self.relay_to(self.upstream())
        transaction = await relay.begin(Envelope("alice@example.com", ()), "m", "c")
        with self.assertRaises(RelayError) as caught:
            await transaction.addRecipient("bad<@example.com")
        self.assertEqual(caught.exception.kind, Kind.POLICY)
        self.assertIs(transaction.state, State.NEW)
        await transaction.addRecipient("bob@example.com")
        self.assertIs(transaction.state, State.OPEN)
        transaction.abort()
