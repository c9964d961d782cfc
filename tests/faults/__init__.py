"""The bounded fault suite (``docs/fault-suite.md``).

Each module runs a real ``twistd esmtpfa`` (``harness.RunningRelay``) against real peers
on loopback and checks the relay's promise from outside: every message a client was told
``250`` reached the upstream exactly once, no message reached it twice because of the
relay, and misbehaving peers or hostile clients neither stall the upstream pool nor
starve the well-behaved clients nor grow the process without bound.
"""
