"""The login throttle's and the sending rates' counts in Redis, shared by replicas
(``--state-url``; docs/shared-state.md).

Each operation is one Lua script: one round trip, atomic in Redis, so two relays never
both pass a check that only one of them should.  The scripts keep exactly the rules of
the in-process ledgers (``LocalLoginLedger``, ``RateLimiter``; each such rule, and the
test that holds both alike, is listed in ``esmtpfa.limits.ledgers``):

* failed logins are Redis lists of timestamps in time order, one per address, identity
  and (identity, address), trimmed to the same depths, expired by the same window;
* a rate is a hash of the two fixed windows (``start``, ``cur``, ``prev``) plus a list of
  reservations, each ``"<time> <n>"``, so a reservation that a dead relay never settled
  is dropped ``RESERVATION_TTL`` seconds after it was made instead of holding budget for
  ever.

Time is the Redis server's (``TIME`` inside the script): replicas whose clocks disagree
still see one timeline, and timestamps in a list stay in order.  Tests may pass a
``clock`` instead, to drive the same scripts with ``Clock``.

Every key expires: failure lists one window after their last failure, rate windows two
windows after their last use, reservations ``RESERVATION_TTL`` after the last one.  The
one exception is the identity digest's key (16 random octets, made by whichever relay
comes first).  Every script carries the key its relay uses and checks it against the
stored one before it counts anything (``_DIGEST_CHECK``): a Redis that lost it (restarted
empty) gets it back from the first relay that asks, and a relay whose key differs from
the stored one is told to fetch it again instead of counting apart.  So the relays of
one Redis always count under one key, whichever of them asks first after a restart
(docs/shared-state.md, "When Redis restarts").
"""

from __future__ import annotations

import math
import os
from typing import Callable, Sequence, cast

from twisted.application.service import Service
from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface import implementer

from esmtpfa.common.logs import logger
from esmtpfa.common.probe import IProbe, ProbeResult
from esmtpfa.limits.guard import FailurePolicy, GuardedLoginLedger, GuardedRateLedger
from esmtpfa.limits.interfaces import Exceeded, ILoginLedger, IRateLedger, StateUnavailable
from esmtpfa.limits.ledgers import IdentityDigest
from esmtpfa.limits.resp import RedisClient, RedisError, RedisURL, Script
from esmtpfa.limits.settings import StateSettings, ThrottleSettings
from esmtpfa.limits.throttle import identity_depth

log = logger("esmtpfa.state")

#: The longest a mail transaction holds a reservation, in seconds.  RFC 5321's client
#: timeouts allow about 10 minutes for DATA and 5 per command; 15 minutes covers a
#: transaction that uses them, and a reservation older than that was left by a relay
#: that died or lost Redis mid-transaction.
RESERVATION_TTL = 900

# -- Lua --------------------------------------------------------------------------------
# Every ledger script starts with _DIGEST_CHECK: KEYS[1] is the digest key's key and
# ARGV[1] the key this relay digests identities with.  It then sees its own keys and
# arguments from 1, as written below: ARGV[1] is the time, "" for the server's TIME
# (production), else seconds as text.

#: The error code of a script whose relay holds another digest key than Redis does.
REKEY = "ESMTPFA-REKEY"

# Missing (Redis restarted empty, or the key was deleted): this relay's key is put back,
# so every relay that survived the restart keeps counting where it did.  Different (a
# relay that never had a key made a new one first): nothing is counted, the relay
# fetches the stored key and asks again.
_DIGEST_CHECK = """
local stored = redis.call('GET', KEYS[1])
if not stored then
  redis.call('SET', KEYS[1], ARGV[1])
elseif stored ~= ARGV[1] then
  return redis.error_reply('""" + REKEY + """ the identity digest key in Redis is another')
end
local KEYS, ARGV = {unpack(KEYS, 2)}, {unpack(ARGV, 2)}
"""

_CLOCK = """
local now, stamp
if ARGV[1] == '' then
  local t = redis.call('TIME')
  stamp = t[1] .. '.' .. string.rep('0', 6 - #t[2]) .. t[2]
else
  stamp = ARGV[1]
end
now = tonumber(stamp)
"""

_RECENT = """
local window = tonumber(ARGV[2])
local cutoff = now - window
-- Failures within the window; older ones (at the head: lists are in time order) go.
local function recent(key)
  while true do
    local head = redis.call('LINDEX', key, 0)
    if not head or tonumber(head) > cutoff then break end
    redis.call('LPOP', key)
  end
  return redis.call('LLEN', key)
end
"""

# KEYS: address, then (identity, pair) for each identity.  ARGV: now, window,
# per_address, per_identity.  Returns 0 (asked), 1 (address refused), 2 (identity).
LOGIN_REFUSAL = Script(_DIGEST_CHECK + _CLOCK + _RECENT + """
if recent(KEYS[1]) >= tonumber(ARGV[3]) then return 1 end
local per_identity = tonumber(ARGV[4])
for i = 2, #KEYS, 2 do
  if recent(KEYS[i]) >= per_identity and recent(KEYS[i + 1]) > 0 then return 2 end
end
return 0
""")

# KEYS as LOGIN_REFUSAL.  ARGV: now, window, ttl_ms, depth of address, identity, pair
# lists.  Returns each identity's failures within the window, this one included.
LOGIN_FAILED = Script(_DIGEST_CHECK + _CLOCK + _RECENT + """
local ttl = tonumber(ARGV[3])
local function push(key, depth)
  recent(key)
  redis.call('RPUSH', key, stamp)
  redis.call('LTRIM', key, -depth, -1)
  redis.call('PEXPIRE', key, ttl)
end
push(KEYS[1], tonumber(ARGV[4]))
local counts = {}
for i = 2, #KEYS, 2 do
  push(KEYS[i], tonumber(ARGV[5]))
  push(KEYS[i + 1], tonumber(ARGV[6]))
  counts[#counts + 1] = recent(KEYS[i])
end
return counts
""")

# KEYS: identity, pair.  ARGV: now, window.  The pair's failures are taken back from
# the identity's, each once; the pair is forgotten.
LOGIN_SUCCEEDED = Script(_DIGEST_CHECK + _CLOCK + _RECENT + """
if recent(KEYS[2]) > 0 then
  for _, stamp in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
    redis.call('LREM', KEYS[1], 1, stamp)
  end
  redis.call('DEL', KEYS[2])
end
return 0
""")

_COUNTER = """
local window = tonumber(ARGV[2])
local held_ttl = tonumber(ARGV[5])
local fields = redis.call('HMGET', KEYS[1], 'start', 'cur', 'prev')
local start, cur, prev = tonumber(fields[1]) or now, tonumber(fields[2]) or 0,
  tonumber(fields[3]) or 0
-- ratelimit._Counter.roll
local elapsed = now - start
if elapsed >= window then
  local windows = math.floor(elapsed / window)
  if windows == 1 then prev = cur else prev = 0 end
  cur = 0
  start = start + windows * window
end
local function save()
  redis.call('HSET', KEYS[1], 'start', string.format('%.17g', start),
             'cur', string.format('%.17g', cur), 'prev', string.format('%.17g', prev))
  redis.call('PEXPIRE', KEYS[1], math.ceil(2000 * window))
end
-- Reservations: "<time> <n>" in time order; those older than held_ttl were left by a
-- relay that never settled them.
local function held()
  local total = 0
  while true do
    local head = redis.call('LINDEX', KEYS[2], 0)
    if not head or tonumber(string.match(head, '^(%S+)')) > now - held_ttl then break end
    redis.call('LPOP', KEYS[2])
  end
  for _, entry in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
    total = total + tonumber(string.match(entry, ' (%S+)$'))
  end
  return total
end
"""

# KEYS: counter, reservations.  ARGV: now, window, count, n, reservation ttl.
# Returns {1} (reserved) or {0, retry_after as text}.
RATE_TAKE = Script(_DIGEST_CHECK + _CLOCK + _COUNTER + """
local limit, n = tonumber(ARGV[3]), tonumber(ARGV[4])
local reserved = held()
local estimate = prev * (1.0 - (now - start) / window) + cur + reserved
local answer
if estimate + n > limit then
  -- ratelimit._Counter.retry_after
  local room = limit - cur - reserved - n
  local retry
  if room < 0 or prev == 0 then
    retry = math.max(1.0, start + window - now)
  else
    retry = math.max(1.0, math.ceil(window * (1.0 - room / prev) - (now - start)))
  end
  answer = {0, string.format('%.17g', retry)}
else
  redis.call('RPUSH', KEYS[2], stamp .. ' ' .. ARGV[4])
  redis.call('EXPIRE', KEYS[2], held_ttl)
  answer = {1}
end
save()
return answer
""")

# KEYS: counter, reservations.  ARGV: now, window, n, count (1: they count), ttl.
RATE_GIVE = Script(_DIGEST_CHECK + _CLOCK + _COUNTER + """
local n = tonumber(ARGV[3])
held()
local left = n
while left > 0 do
  local entry = redis.call('RPOP', KEYS[2])
  if not entry then break end
  local at, units = string.match(entry, '^(%S+) (%S+)$')
  units = tonumber(units)
  if units > left then
    redis.call('RPUSH', KEYS[2], at .. ' ' .. string.format('%d', units - left))
    left = 0
  else
    left = left - units
  end
end
if ARGV[4] == '1' then cur = cur + n end
save()
return 0
""")

# KEYS: the digest key's key.  ARGV: a fresh random key, kept only if none is there.
DIGEST_KEY = Script("""
redis.call('SET', KEYS[1], ARGV[1], 'NX')
return redis.call('GET', KEYS[1])
""")


@implementer(IProbe)
class RedisState:
    """What the Redis ledgers of one relay share: the client, the key prefix, the
    identity digest (its key fetched from Redis, cached, and checked by every script),
    the time source."""

    def __init__(self, client: RedisClient, *, prefix: str = "", clock=None):
        self.client = client
        self.prefix = "esmtpfa:" + (prefix + ":" if prefix else "")
        self.digest_key = self.prefix + "digest-key"
        self.clock = clock
        self._digest: IdentityDigest | None = None
        self._waiters: list[defer.Deferred] = []

    def now(self) -> str:
        return "" if self.clock is None else repr(float(self.clock.seconds()))

    @property
    def probe_subject(self) -> str:
        return f"shared state {self.client.url.redacted}"

    def probe(self) -> defer.Deferred:
        """One PING through the ledgers' own client (AUTH, SELECT, TLS as configured)."""
        d = self.client.execute("PING")
        d.addCallback(lambda answer: ProbeResult.passed(
            f"answered {answer.decode() if isinstance(answer, bytes) else answer}"))
        return d.addErrback(ProbeResult.from_failure)

    def run(self, script: Script, keys: Sequence[str | bytes], args: Sequence
            ) -> defer.Deferred:
        return self.client.evalsha(script, keys, args)

    def call(self, script: Script, keys: Callable[[IdentityDigest], Sequence[str]],
             args: Sequence) -> defer.Deferred:
        """Run a ledger script (one that starts with ``_DIGEST_CHECK``) on the keys
        ``keys(digest)`` names.  When Redis holds another digest key than ours, ours is
        dropped, the stored one fetched, and the script run once more with it."""
        def run(digest: IdentityDigest) -> defer.Deferred:
            return self.run(script, [self.digest_key, *keys(digest)],
                            [digest.key.hex(), *args])

        def rekey(failure: Failure, used: IdentityDigest):
            failure.trap(RedisError)
            if cast(RedisError, failure.value).code != REKEY:
                return failure
            if self._digest is used:
                self._digest = None
                log.info("the identity digest key in Redis is not the one this relay "
                         "had (another relay made it after Redis lost it): using the "
                         "stored one")
            return self.digest().addCallback(run)

        def first(digest: IdentityDigest) -> defer.Deferred:
            return run(digest).addErrback(rekey, digest)
        return self.digest().addCallback(first)

    def digest(self) -> defer.Deferred:
        """Fires with the ``IdentityDigest`` whose key every relay on this Redis uses:
        the stored key, or this relay's random one when none is stored (``SET NX``),
        fetched once and cached.  A failed fetch is tried again by the next operation."""
        if self._digest is not None:
            return defer.succeed(self._digest)
        waiter: defer.Deferred = defer.Deferred()
        self._waiters.append(waiter)
        if len(self._waiters) == 1:
            self.run(DIGEST_KEY, [self.digest_key], [os.urandom(16).hex()]
                     ).addCallback(self._fetched).addBoth(self._answer_waiters)
        return waiter

    def _fetched(self, key) -> IdentityDigest:
        if not isinstance(key, bytes) or len(key) != 32:
            raise StateUnavailable("the identity digest key in Redis is malformed")
        try:
            self._digest = IdentityDigest(bytes.fromhex(key.decode("ascii")))
        except ValueError:
            raise StateUnavailable("the identity digest key in Redis is malformed") from None
        return self._digest

    def _answer_waiters(self, result) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)


@implementer(ILoginLedger)
class RedisLoginLedger:
    """``LocalLoginLedger``'s counts in Redis; one script call per operation."""

    def __init__(self, state: RedisState, per_address: int, per_identity: int,
                 window: float, *, depth: int | None = None):
        self.state = state
        self.per_address, self.per_identity, self.window = per_address, per_identity, window
        # The same depths as LocalLoginLedger's FailureWindow tables.
        self.address_depth = max(per_address, 1)
        self.identity_depth = max(depth or 0, per_identity + 1, 1)
        self.pair_depth = max(per_identity, 1)
        self.ttl_ms = math.ceil(window * 1000)

    def _keys(self, digest: IdentityDigest, address: str, identities: Sequence[str]
              ) -> list[str]:
        prefix = self.state.prefix + "login:"
        keys = [f"{prefix}addr:{address}"]
        for identity in identities:
            key = digest(identity).hex()
            keys += [f"{prefix}id:{key}", f"{prefix}pair:{key}:{address}"]
        return keys

    def refusal(self, address: str, identities: Sequence[str]) -> defer.Deferred:
        return self.state.call(
            LOGIN_REFUSAL, lambda digest: self._keys(digest, address, identities),
            [self.state.now(), self.window, self.per_address, self.per_identity]
        ).addCallback(_REFUSALS.__getitem__)

    def failed(self, address: str, identities: Sequence[str]) -> defer.Deferred:
        return self.state.call(
            LOGIN_FAILED, lambda digest: self._keys(digest, address, identities),
            [self.state.now(), self.window, self.ttl_ms, self.address_depth,
             self.identity_depth, self.pair_depth]
        ).addCallback(lambda counts: [int(n) for n in counts])

    def succeeded(self, address: str, identity: str) -> defer.Deferred:
        return self.state.call(
            LOGIN_SUCCEEDED, lambda digest: self._keys(digest, address, [identity])[1:],
            [self.state.now(), self.window]).addCallback(lambda _: None)


_REFUSALS = {
    0: None,
    1: "too many failed logins from this address",
    2: "too many failed logins for this identity, and some from this address",
}


@implementer(IRateLedger)
class RedisRateLedger:
    """``RateLimiter``'s counts in Redis, with reservations that expire after
    ``reservation_ttl`` seconds."""

    def __init__(self, state: RedisState, *, reservation_ttl: int = RESERVATION_TTL):
        self.state = state
        self.reservation_ttl = reservation_ttl

    def _keys(self, digest: IdentityDigest, key: str, kind: str) -> list[str]:
        base = f"{self.state.prefix}rate:{kind}:{digest(key).hex()}"
        return [base, base + ":held"]

    def take(self, key: str, kind: str, limit, n: int) -> defer.Deferred:
        def answered(reply):
            if int(reply[0]) == 1:
                return None
            raise Exceeded(kind, limit, float(reply[1]))
        return self.state.call(
            RATE_TAKE, lambda digest: self._keys(digest, key, kind),
            [self.state.now(), float(limit.window), limit.count, int(n),
             self.reservation_ttl]).addCallback(answered)

    def give(self, key: str, kind: str, limit, n: int, count: bool) -> defer.Deferred:
        return self.state.call(
            RATE_GIVE, lambda digest: self._keys(digest, key, kind),
            [self.state.now(), float(limit.window), int(n), 1 if count else 0,
             self.reservation_ttl]).addCallback(lambda _: None)


class _StateService(Service):
    """Closes the Redis connection when the relay stops."""

    def __init__(self, client: RedisClient, policy: FailurePolicy):
        self.client, self.policy = client, policy

    def stopService(self):
        super().stopService()
        self.policy.stop()
        return self.client.close()


def ledgers_from_settings(state: StateSettings, throttle: ThrottleSettings, reactor,
                          observer=None, parent=None):
    """The (login, rate) ledgers ``state.url`` (``--state-url``) asks for, guarded by
    ``state.failure`` (``--state-failure``); (None, None) without a state URL (the relay
    then counts in this process).  With ``parent`` (a MultiService), the connection is
    closed when it stops."""
    if not state.url:
        return None, None
    url = RedisURL.parse(state.url)
    timeout = state.timeout
    client = RedisClient(url, reactor, timeout=timeout)
    shared = RedisState(client, prefix=url.prefix)
    per_identity = throttle.per_identity
    login = RedisLoginLedger(
        shared, per_address=throttle.per_address, per_identity=per_identity,
        window=throttle.window, depth=identity_depth(per_identity, throttle.max_delay))
    rates = RedisRateLedger(shared)
    # One decision waits at most ``timeout`` in all, however many round trips it needs
    # (the digest key's fetch, a script's source after NOSCRIPT): the client bounds each
    # request, the policy the decision.
    policy = FailurePolicy(state.failure, reactor, observer=observer,
                           timeout=timeout, store=f"Redis at {url.redacted}")
    if parent is not None:
        _StateService(client, policy).setServiceParent(parent)
    log.info("login throttle and sending rates shared through Redis at {url} (timeout "
             "{timeout:g} s, failing {policy})", url=url.redacted, timeout=timeout,
             policy=state.failure)
    return (GuardedLoginLedger(login, policy, depth=login.identity_depth),
            GuardedRateLedger(rates, policy))


__all__ = ["LOGIN_FAILED", "LOGIN_REFUSAL", "LOGIN_SUCCEEDED", "RATE_GIVE", "RATE_TAKE",
           "REKEY", "RESERVATION_TTL", "RedisLoginLedger", "RedisRateLedger", "RedisState",
           "ledgers_from_settings"]
