"""The SMTP server side: our own ESMTP protocol, SASL mechanisms and DATA reader.

``twisted.mail.smtp`` is the reference design (challengers, a Portal, ``IMessageDelivery``
avatars) but its protocol code has the defects listed in docs/twisted-defects.md, so the wire
handling lives here.
"""
