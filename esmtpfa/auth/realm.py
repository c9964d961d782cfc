"""The realm: every successful login gets a delivery avatar bound to its identity."""

from __future__ import annotations

from typing import Callable

from twisted.cred.checkers import ANONYMOUS as ANONYMOUS_AVATAR_ID
from twisted.cred.portal import IRealm
from zope.interface import implementer

from esmtpfa.auth.interfaces import IMessageDelivery
from esmtpfa.auth.selection import ANONYMOUS, Identity


@implementer(IRealm)
class SubmissionRealm:
    def __init__(self, make_delivery: Callable[[Identity], IMessageDelivery]):
        self._make_delivery = make_delivery

    def requestAvatar(self, avatarId, mind, *interfaces):
        if IMessageDelivery not in interfaces:
            raise NotImplementedError("esmtpfa only hands out IMessageDelivery avatars")
        identity = ANONYMOUS if avatarId is ANONYMOUS_AVATAR_ID or avatarId == () else avatarId
        return IMessageDelivery, self._make_delivery(identity), lambda: None
