"""The chunked DATA reader against a line-by-line reference, at every split point.

Network reads split a message anywhere: inside CRLF, between the CRLF and the dot of the
terminator, inside a dot-stuffed line.  Whatever the split, the content and the bytes
left over for command mode must be exactly what RFC 5321 §4.5.2 says.
"""

from __future__ import annotations

import random

from twisted.trial import unittest

from esmtpfa.smtp.data import NORMALIZE, REJECT, DataReader


def reference(stream: bytes):
    """Line-at-a-time decoding of a clean CRLF stream: (content, rest) or None."""
    content, position = [], 0
    while True:
        end = stream.find(b"\r\n", position)
        if end < 0:
            return None
        line = stream[position:end]
        position = end + 2
        if line == b".":
            return b"".join(content), stream[position:]
        content.append((line[1:] if line.startswith(b".") else line) + b"\r\n")


def feed_in_pieces(stream: bytes, cuts: list[int], **kwargs):
    sink: list[bytes] = []
    reader = DataReader(sink.append, max_size=10**7, **kwargs)
    previous = 0
    for cut in sorted(cuts) + [len(stream)]:
        rest = reader.feed(stream[previous:cut])
        previous = cut
        if rest is not None:
            return b"".join(sink), rest + stream[cut:], reader.error
    return None


class SplitTests(unittest.TestCase):
    MESSAGE = (b"Subject: dots\r\n\r\n..\r\n...leading\r\n.x\r\nmiddle . dot\r\n\r\n"
               b"..\r\nlast\r\n.\r\nQUIT\r\n")

    def test_every_single_split_point(self):
        expected = reference(self.MESSAGE)
        for cut in range(len(self.MESSAGE) + 1):
            content, rest, error = feed_in_pieces(self.MESSAGE, [cut])
            self.assertEqual((content, rest, error), (*expected, None), f"split at {cut}")

    def test_every_pair_of_split_points(self):
        expected = reference(self.MESSAGE)
        n = len(self.MESSAGE)
        for first in range(n):
            for second in range(first, n):
                content, rest, _ = feed_in_pieces(self.MESSAGE, [first, second])
                self.assertEqual((content, rest), expected)

    def test_random_messages_random_chunks(self):
        rng = random.Random(5321)
        pieces = [b".", b"..", b"a", b"\r\n", b" ", b"x" * 50, b".\r\n"]
        for _ in range(300):
            body = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 60)))
            # a clean CRLF body whose every line is stuffed as a client must
            lines = body.replace(b"\r", b"").replace(b"\n", b"").split(b".\r")
            text = b"\r\n".join(lines)
            stuffed = b"".join(b"." + line + b"\r\n" if line.startswith(b".") else line + b"\r\n"
                               for line in text.split(b"\r\n"))
            stream = stuffed + b".\r\nNOOP\r\n"
            cuts = sorted(rng.sample(range(len(stream) + 1), k=min(5, len(stream))))
            content, rest, error = feed_in_pieces(stream, cuts)
            self.assertEqual((content, rest, error), (*reference(stream), None))

    def test_empty_message(self):
        self.assertEqual(feed_in_pieces(b".\r\nQUIT\r\n", []), (b"", b"QUIT\r\n", None))

    def test_terminator_needs_crlf_before_the_dot(self):
        # A bare LF before ".\r\n" is not the end (Postfix requires the standard form).
        result = feed_in_pieces(b"a\n.\r\nb\r\n.\r\n", [2], bare_line_ends=NORMALIZE)
        self.assertEqual(result, (b"a\r\n\r\nb\r\n", b"", None))
        result = feed_in_pieces(b"a\n.\r\nb\r\n.\r\n", [2], bare_line_ends=REJECT)
        self.assertEqual(result[1:], (b"", result[2]))
        self.assertEqual(result[2].code, 550)


class LimitTests(unittest.TestCase):
    def test_line_limit_and_dot_stuffing_allowance(self):
        ok = b"." + b"x" * 998 + b"\r\n.\r\n"   # 998 octets after unstuffing: allowed
        self.assertIsNone(feed_in_pieces(ok, [])[2])
        too_long = b"x" * 999 + b"\r\n.\r\n"
        self.assertEqual(feed_in_pieces(too_long, [])[2].enhanced, "5.6.0")

    def test_overlong_partial_line_split_across_reads(self):
        stream = b"y" * 5000 + b"\r\nMAIL FROM:<x@y>\r\n.\r\nNOOP\r\n"
        for cut in (10, 1000, 4999, 5000, 5001, 5002):
            content, rest, error = feed_in_pieces(stream, [cut, cut + 1])
            self.assertEqual((rest, error.enhanced), (b"NOOP\r\n", "5.6.0"))

    def test_size_limit(self):
        sink = []
        reader = DataReader(sink.append, max_size=100)
        self.assertEqual(reader.feed(b"a" * 80 + b"\r\n" + b"b" * 80 + b"\r\n.\r\n"), b"")
        self.assertEqual(reader.error.code, 552)
