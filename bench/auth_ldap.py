#!/usr/bin/env python3
"""Benchmark: concurrent logins through ``LDAPProvider.requestAvatarId`` against real slapd.

    python3 bench/auth_ldap.py [--concurrency 100] [--pool-size 4] [--rounds 5]

Starts the ``tests.support.slapd`` fixture (120 users by default, slapd logging off),
then for each transport (plain LDAP, StartTLS, LDAPS):

* **cold**: a brand-new provider gets N concurrent logins of distinct users (threads and
  connections are created during the round);
* **warm**: after that warm-up round, ``--rounds`` more rounds of N concurrent logins;
* **naive**: the reference the provider replaces, the same N logins where every login
  opens a fresh ldap3 connection (service bind, search, user bind, unbind) in a thread
  pool of the same size.

Each row gives the wall time of the round, logins/s, and the p50/p99 of the per-login
latency (from the moment all N were issued to each one's answer).  Then a pool-size
sweep (warm rounds) shows why the default is what it is.  Target on the 2-core machine:
100 concurrent logins in ≤ 0.5 s.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ldap3  # noqa: E402
from twisted.internet import defer, task  # noqa: E402
from twisted.internet.threads import deferToThreadPool  # noqa: E402
from twisted.python.threadpool import ThreadPool  # noqa: E402

from esmtpfa.auth.credentials import UserPassword  # noqa: E402
from esmtpfa.auth.provider import ProviderMeta  # noqa: E402
from esmtpfa.common.context import ConnectionContext  # noqa: E402
from esmtpfa.common.resources import Resources  # noqa: E402
from esmtpfa.providers.ldap import LDAPProvider  # noqa: E402
from tests.support.slapd import PEOPLE, SERVICE_DN, SERVICE_PW, SlapdServer, generated_user  # noqa: E402

CTX = ConnectionContext(connection_id="urn:uuid:00000000-0000-0000-0000-000000000001",
                        protocol="smtp")
FILTER = "(&(objectClass=inetOrgPerson)(uid=%s))"
TARGET_SECONDS = 0.5


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


class Round:
    def __init__(self, wall: float, latencies: list[float]):
        self.wall = wall
        self.latencies = latencies

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.wall

    def cells(self) -> str:
        return (f"{self.wall:8.3f} {self.rate:9.0f} {percentile(self.latencies, 50) * 1000:8.1f} "
                f"{percentile(self.latencies, 99) * 1000:8.1f}")


async def one_round(check, users) -> Round:
    """All logins issued at once; every one must succeed with its own username."""
    latencies: list[float] = []
    started = time.perf_counter()

    def done(result, expected):
        latencies.append(time.perf_counter() - started)
        if result != expected:
            raise AssertionError(f"{expected!r} came back as {result!r}")
        return result

    ds = [check(u.uid, u.password).addCallback(done, u.uid) for u in users]
    await defer.gatherResults(ds, consumeErrors=True)
    return Round(time.perf_counter() - started, latencies)


def provider_params(slapd: SlapdServer, mode: str, pool_size: int) -> dict:
    params = {"server": "127.0.0.1", "port": slapd.port, "bind_user": SERVICE_DN,
              "bind_pass": SERVICE_PW, "base_dn": PEOPLE, "filter_string": FILTER,
              "pool_size": pool_size, "timeout": 5}
    if mode == "starttls":
        params.update(enable_tls=True, tls_ca=slapd.ca_path)
    elif mode == "ldaps":
        params.update(ldaps=True, port=slapd.ldaps_port, tls_ca=slapd.ca_path)
    return params


def make_provider(reactor, slapd, mode, pool_size, cls=LDAPProvider) -> LDAPProvider:
    return cls.from_params(ProviderMeta("bench", "ldap"),
                           provider_params(slapd, mode, pool_size),
                           resources=Resources.build(reactor))


def provider_check(provider: LDAPProvider):
    return lambda user, password: provider.requestAvatarId(UserPassword(user, password, CTX))


class RebindAnonymousProvider(LDAPProvider):
    """Variant for comparison: rebinds the user connection to anonymous after each login."""

    def _attempt(self, worker, username, password):
        super()._attempt(worker, username, password)
        conn = worker.user
        conn.authentication, conn.user = ldap3.ANONYMOUS, None
        conn.bind(read_server_info=False)


class FreshUserConnectionProvider(LDAPProvider):
    """Variant for comparison: persistent service connection, new connection per user bind."""

    def _attempt(self, worker, username, password):
        try:
            super()._attempt(worker, username, password)
        finally:
            if worker.user is not None:
                worker.user.unbind()
                worker.user = None


VARIANTS = {
    "keep user conn bound": LDAPProvider,
    "rebind anonymous after": RebindAnonymousProvider,
    "fresh user conn per bind": FreshUserConnectionProvider,
}


def naive_login(template: LDAPProvider, username: str, password: str) -> str:
    """One fresh connection per login, as a straightforward implementation would do it:
    open (+StartTLS), bind as the service, search, bind as the user, unbind."""
    server = ldap3.Server(template.server, port=template.port, use_ssl=template.ldaps,
                          tls=template._tls, get_info=ldap3.NONE, connect_timeout=5)
    conn = ldap3.Connection(server, user=SERVICE_DN, password=SERVICE_PW,
                            receive_timeout=5, raise_exceptions=True)
    try:
        conn.open(read_server_info=False)
        if template.starttls:
            conn.start_tls(read_server_info=False)
        conn.bind(read_server_info=False)
        conn.search(PEOPLE, FILTER.replace("%s", ldap3.utils.conv.escape_filter_chars(username)),
                    attributes=[ldap3.NO_ATTRIBUTES], size_limit=2)
        entries = [r for r in conn.response if r["type"] == "searchResEntry"]
        if len(entries) != 1:
            raise AssertionError(f"{username}: {len(entries)} entries")
        conn.user, conn.password = entries[0]["dn"], password
        if not conn.bind(read_server_info=False):
            raise AssertionError(f"{username}: bind failed")
        return username
    finally:
        conn.unbind()


def median(rounds: list[Round]) -> Round:
    return sorted(rounds, key=lambda r: r.wall)[len(rounds) // 2]


async def cold_and_warm(provider: LDAPProvider, users, rounds: int
                        ) -> tuple[Round, list[Round]]:
    """The first (cold, warm-up) round and ``rounds`` warm ones; stops the provider."""
    try:
        cold = await one_round(provider_check(provider), users)
        warm = [await one_round(provider_check(provider), users) for _ in range(rounds)]
    finally:
        await provider.stopProvider()
    return cold, warm


async def bench_mode(reactor, slapd, mode, users, pool_size, rounds, out) -> dict:
    results = {}
    cold, warm = await cold_and_warm(
        make_provider(reactor, slapd, mode, pool_size), users, rounds)
    warm_median = median(warm)
    out(f"{mode:9} {'provider, cold':26} {pool_size:4} {cold.cells()}")
    out(f"{mode:9} {f'provider, warm (median/{rounds})':26} {pool_size:4} {warm_median.cells()}"
        f"   walls {min(r.wall for r in warm):.3f}..{max(r.wall for r in warm):.3f}")
    results["cold"], results["warm"] = cold, warm_median

    template = make_provider(reactor, slapd, mode, pool_size)  # only for its TLS settings
    pool = ThreadPool(minthreads=0, maxthreads=pool_size, name="naive")
    pool.start()
    try:
        def check(user, password):
            return deferToThreadPool(reactor, pool, naive_login, template, user, password)
        naive_rounds = [await one_round(check, users) for _ in range(max(1, rounds // 2))]
    finally:
        pool.stop()
        await template.stopProvider()
    naive = median(naive_rounds)
    out(f"{mode:9} {'naive, conn per login':26} {pool_size:4} {naive.cells()}"
        f"   = {naive.wall / warm_median.wall:.1f}x the warm provider")
    results["naive"] = naive
    return results


async def main(reactor, args) -> None:
    out = print
    out("$ " + shlex.join(getattr(sys, "orig_argv", [sys.executable] + sys.argv)))
    slapd_version = subprocess.run(["/usr/sbin/slapd", "-VV"], capture_output=True,
                                   text=True).stderr.splitlines()[0].split("$")[1].strip()
    out(f"# {platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"ldap3 {ldap3.__version__}, {slapd_version}")
    slapd = SlapdServer(users=max(args.users, args.concurrency), loglevel="none")
    started = time.perf_counter()
    slapd.start()
    out(f"# slapd with {len(slapd.users)} users started in "
        f"{time.perf_counter() - started:.2f} s ({slapd.ldap_url} {slapd.ldaps_url}); "
        f"{args.concurrency} concurrent logins of distinct users per round")
    users = [generated_user(i) for i in range(args.concurrency)]
    try:
        out("")
        out(f"{'transport':9} {'variant':26} {'pool':>4} {'wall_s':>8} {'logins/s':>9} "
            f"{'p50_ms':>8} {'p99_ms':>8}")
        summary = {}
        for mode in args.modes.split(","):
            summary[mode] = await bench_mode(reactor, slapd, mode, users, args.pool_size,
                                             args.rounds, out)
        if args.sweep:
            out("")
            out(f"# pool_size sweep (warm rounds, median of {args.rounds})")
            out(f"{'transport':9} {'variant':26} {'pool':>4} {'wall_s':>8} {'logins/s':>9} "
                f"{'p50_ms':>8} {'p99_ms':>8}")
            for mode in ("plain", "starttls"):
                for size in (int(s) for s in args.sweep.split(",")):
                    provider = make_provider(reactor, slapd, mode, size)
                    _, warm = await cold_and_warm(provider, users, args.rounds)
                    out(f"{mode:9} {'provider, warm':26} {size:4} {median(warm).cells()}")
        if args.variants:
            out("")
            out("# what to do with the user-bind connection after a login "
                f"(warm rounds, median of {args.rounds})")
            out(f"{'transport':9} {'variant':26} {'pool':>4} {'wall_s':>8} {'logins/s':>9} "
                f"{'p50_ms':>8} {'p99_ms':>8}")
            for mode in ("plain", "starttls"):
                for name, cls in VARIANTS.items():
                    provider = make_provider(reactor, slapd, mode, args.pool_size, cls)
                    _, warm = await cold_and_warm(provider, users, args.rounds)
                    out(f"{mode:9} {name:26} {args.pool_size:4} {median(warm).cells()}")
        out("")
        verdicts = []
        for mode, r in summary.items():
            for kind in ("cold", "warm"):
                ok = r[kind].wall <= TARGET_SECONDS
                verdicts.append(ok)
                out(f"target {args.concurrency} concurrent <= {TARGET_SECONDS} s, {mode} {kind}: "
                    f"{r[kind].wall:.3f} s {'OK' if ok else 'MISSED'}")
        if not all(verdicts):
            raise SystemExit(1)
    finally:
        slapd.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--users", type=int, default=120)
    parser.add_argument("--pool-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--modes", default="plain,starttls,ldaps")
    parser.add_argument("--sweep", default="1,2,4,8,16",
                        help="pool sizes to compare (empty: skip)")
    parser.add_argument("--no-variants", dest="variants", action="store_false",
                        help="skip the user-bind connection strategy comparison")
    arguments = parser.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, arguments)))
