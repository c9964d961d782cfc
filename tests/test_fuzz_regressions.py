"""Inputs that coverage-guided fuzzing (bench/fuzz.py) found, each kept as it was found.

docs/fault-suite.md, "Coverage-guided fuzzing": every crash, hang or divergence the
fuzzer reports becomes a test here with its concrete input, so the fix stays fixed
without the fuzzer.
"""

from __future__ import annotations

from twisted.trial import unittest

from esmtpfa.common.replies import Reply, SMTPReplyError
from esmtpfa.smtp.address import parse_path_argument, valid_mailbox

BAD_RECIPIENT = Reply(501, "5.1.3", "Bad recipient address syntax")


class TrailingLineFeedInAnAddress(unittest.TestCase):
    """``target_address``: ``TO:T@c<LF>`` was accepted with the LF in the address.

    The mailbox pattern ended in ``$``, which also matches before a final LF, so
    ``valid_mailbox`` took ``"T@c\\n"`` for a mailbox. The SMTP server splits command
    lines on LF, so no SMTP client could send it, but ``valid_mailbox`` is the rule that
    keeps line breaks out of what we forward upstream, wherever an address comes from."""

    def test_a_mailbox_with_a_final_line_feed_is_not_valid(self):
        self.assertFalse(valid_mailbox("T@c\n"))
        self.assertFalse(valid_mailbox("alice@example.com\n"))
        self.assertTrue(valid_mailbox("T@c"))

    def test_the_found_argument_is_a_syntax_error(self):
        with self.assertRaises(SMTPReplyError) as raised:
            parse_path_argument("TO:T@c\n", "TO", BAD_RECIPIENT)
        self.assertEqual(raised.exception.reply, BAD_RECIPIENT)
