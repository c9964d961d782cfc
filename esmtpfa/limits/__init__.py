"""The relay's limits and where they keep their counts (docs/shared-state.md).

The login throttle (``throttle``), the sending rates (``rates``) and the connection caps
(``esmtpfa.smtp.factory``) are promises about the relay as a whole: N worker processes,
or N replicas behind a load balancer, must not give a client N budgets.  What they count
is kept by a ledger (``interfaces``): in this process (``ledgers``), in the workers'
supervisor, or in Redis (``redis``, over ``resp``).  When a shared ledger cannot answer,
``guard`` decides what happens, and ``breaker`` decides when to stop asking it and when
to ask again.
"""
