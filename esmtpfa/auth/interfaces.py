"""The seam between the SMTP protocol and whatever accepts mail (twisted.cred avatars).

Shaped like ``twisted.mail.smtp.IMessageDelivery`` but per transaction and chunk-based:
the protocol opens a transaction at MAIL, offers each RCPT, streams content, and waits
for the final verdict, so a delivery can decide per recipient and answer DATA only when
the upstream has spoken (docs/design.md, "The relay and the delivery guarantee").  Any method may
return a Deferred; the protocol waits
for it before reading the next pipelined command (RFC 2920 keeps replies in order).
Raise or fail with ``SMTPReplyError`` to refuse with a specific reply.
"""

from zope.interface import Attribute, Interface


class IMessageDelivery(Interface):
    """The avatar an authenticated (or anonymous) SMTP session submits through."""

    identity = Attribute("auth.selection.Identity: who logged in, through which provider")

    def startTransaction(context, mail_from, params):
        """MAIL FROM was accepted syntactically: open a transaction.

        ``context`` is the ``ConnectionContext``, ``mail_from`` the reverse-path (``""`` for
        the null path), ``params`` the MAIL parameters (upper-case keys).  Returns an
        ``ITransaction`` or a Deferred firing with one.
        """


class ITransaction(Interface):
    id = Attribute("str: the message id (urn:uuid:…), used in replies and logs")

    def addRecipient(recipient, params, data_follows=False):
        """Accept (return None / a Deferred firing None) or refuse one RCPT.

        ``data_follows`` is a hint: the client pipelined a DATA the protocol will accept
        right behind this RCPT (RFC 2920 §3.1), so a relay may open its own data phase in
        the same round trip.  Implementations are free to ignore it.
        """

    def write(data):
        """A chunk of content: CRLF lines, transparency dots already removed."""

    def finish():
        """End of data: a Deferred firing with the positive ``Reply`` for the client."""

    def abort():
        """RSET, a refused message or a lost connection: drop everything."""
