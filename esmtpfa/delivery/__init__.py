"""One accepted message's way from the SMTP transaction to the relay or the spool.

``transaction`` is the avatar's transaction: sender rules, rates, the Received header
(``received``) and the hand-over to the relay or the spool (docs/design.md).
"""
