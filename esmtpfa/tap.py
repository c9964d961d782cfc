"""twistd plugin entry points: ``Options`` and ``makeService`` (twisted.application).

Everything that can be wrong with the configuration (flags, environment, provider file,
certificates) is checked while parsing options, so twistd prints one clear line and
exits instead of a traceback from ``makeService``.
"""

from esmtpfa import options as _options
from esmtpfa.service import RelayService, load_providers, load_tls_options


class Options(_options.Options):
    def postOptions(self) -> None:
        super().postOptions()
        from twisted.internet import reactor
        self["provider-set"] = load_providers(self, reactor)
        self["tls-options"] = load_tls_options(self)
        self["http-tls-options"] = load_tls_options(self, "http-tls", "HTTP TLS")


def makeService(options) -> RelayService:
    return RelayService(options)


__all__ = ["Options", "makeService"]
