"""Authentication outcomes beyond twisted.cred's ``UnauthorizedLogin``."""

from twisted.cred.error import UnauthorizedLogin


class ProviderUnavailable(Exception):
    """The provider could not give an answer (down, timed out, 5xx).

    Temporary by definition: the user's password is not wrong because the IdP is down,
    so the SMTP server answers ``454 4.7.0`` and the client retries (docs/design.md §2).
    """


__all__ = ["ProviderUnavailable", "UnauthorizedLogin"]
