"""Where the relay's limits keep their counts (docs/shared-state.md).

The login throttle, the sending rates and the connection caps are promises about the
relay as a whole: N worker processes, or N replicas behind a load balancer, must not
give a client N budgets.  Their *rules* stay where they are (``esmtpfa.auth.throttle``,
``esmtpfa.ratelimit``, ``esmtpfa.smtp.factory``); what they count is kept by a ledger
(``interfaces``): in this process, in the workers' supervisor, or in Redis.  When a
shared ledger cannot answer, ``guard`` decides what happens, and ``breaker`` decides
when to stop asking it and when to ask again.
"""
