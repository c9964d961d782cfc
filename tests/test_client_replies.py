"""Whose words the client hears (docs/delivery-guarantee.md, "Configuring the upstreams").

The upstream's code always; the upstream's text where it explains a refusal (after
``upstream:``, or ``upstream rejected <address>:`` for a recipient); and for an
acceptance esmtpfa's own ``Message accepted as urn:uuid:…``, never the upstream's line,
which carries its queue id and often its internal host names.  The whole relay runs
in-process (``RelayFixture``) in front of a recording SMTP upstream.
"""

from __future__ import annotations

from twisted.trial import unittest

from tests.support.relayfixture import PASSWORD, USER, RelayFixture
from tests.support.upstream import RecordingUpstream

INTERNAL = "mbx-07.internal.corp.example"


class ClientRepliesTests(unittest.TestCase):
    timeout = 30

    async def transaction(self, upstream: RecordingUpstream, *recipients: str
                          ) -> list[tuple[int, str]]:
        fixture = RelayFixture(self.mktemp(), upstream=upstream)
        self.addCleanup(fixture.stop)
        await fixture.start()

        def script() -> list[tuple[int, str]]:
            client = fixture.secure_session()
            try:
                assert client.auth_plain(USER, PASSWORD)[0] == 235
                replies = [client.command("MAIL FROM:<alice@example.com>")]
                replies += [client.command(f"RCPT TO:<{r}>") for r in recipients]
                replies.append(client.command("DATA"))
                client.send(b"Subject: replies\r\n\r\nhello\r\n.\r\n")
                replies.append(client.reply())
                return replies
            finally:
                client.close()
        return await fixture.run(script)

    async def test_an_acceptance_is_told_in_our_words(self):
        upstream = RecordingUpstream(
            eom_reply=f"250 2.0.0 Ok: queued as 4QX1 on {INTERNAL}")
        *_, (code, text) = await self.transaction(upstream, "dave@example.net")
        self.assertEqual(code, 250)
        self.assertRegex(text, r"^2\.0\.0 Message accepted as urn:uuid:[0-9a-f-]+$")
        self.assertNotIn(INTERNAL, text)

    async def test_a_refusal_is_told_in_the_upstreams_words(self):
        upstream = RecordingUpstream(
            rcpt_replies={"nobody@example.net": "550 5.1.1 mailbox unknown"},
            eom_reply="554 5.7.1 spam score too high")
        replies = await self.transaction(upstream, "nobody@example.net", "dave@example.net")
        refused = "5.1.1 upstream rejected <nobody@example.net>: mailbox unknown"
        self.assertEqual(replies[1], (550, refused))
        self.assertEqual(replies[-1], (554, "5.7.1 upstream: spam score too high"))
