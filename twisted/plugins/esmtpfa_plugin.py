"""Makes ``twistd esmtpfa`` (and ``twist esmtpfa``) available."""

from twisted.application.service import ServiceMaker

esmtpfa = ServiceMaker(
    "esmtpfa",
    "esmtpfa.runtime.tap",
    "Authenticating SMTP submission relay with federated identity providers",
    "esmtpfa",
)
