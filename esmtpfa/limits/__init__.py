"""The relay's limits and where they keep their counts (docs/shared-state.md).

The login throttle (``throttle``), the sending rates (``rates``) and the connection caps
(counted for ``esmtpfa.smtp.factory`` and the HTTP API) are promises about the relay as a
whole: N worker processes, or N replicas behind a load balancer, must not give a client N
budgets.  What they count is kept by a ledger (``interfaces``): in this process
(``ledgers``, one module for the three kinds, with the rules that Redis runs again in
Lua), in the workers' supervisor, or in Redis (``redis``, over ``resp``).  When a
shared ledger cannot answer, ``guard`` decides what happens, and ``breaker`` decides
when to stop asking it and when to ask again.
"""
