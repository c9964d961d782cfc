"""esmtpfa: an authenticating SMTP submission relay with federated identity providers."""

__version__ = "0.1.0"
