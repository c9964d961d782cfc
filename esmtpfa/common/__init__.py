"""What every layer stands on and which stands on nothing else of esmtpfa.

SMTP replies, ids, logging (and its JSON form), deadlines, the message and envelope every
layer passes around, the outbound HTTP client, server TLS and its certificate files,
the circuit breaker, durable file writes, secret-bearing URLs, the configuration error,
and ``internals``: the one module that may touch Twisted's private APIs.
"""
