#!/usr/bin/env python3
"""Benchmark of the token and HTTP providers: logins per second through
``requestAvatarId``, with ``--concurrency`` logins in flight.

* jwt: RS256, ES256 and EdDSA separately, JWKS cached (one fetch from an in-process
  twisted.web JWKS endpoint, then pure verification).  Target: ≥ 2,000 logins/s.
* http_basic / http_header: against the scripted auth endpoint running in a *separate
  process* (``python3 -m tests.support.httpservers``) so the server does not share
  this process's CPU thread.  Target: ≥ 1,000 logins/s.

Run from the repository root::

    python3 bench/auth_tokens.py [--logins 5000] [--concurrency 50] [--only jwt|http]

Not a unit test: it prints numbers; it fails only when a login is refused.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, task  # noqa: E402

from esmtpfa.auth.credentials import BearerToken, UserPassword  # noqa: E402
from esmtpfa.auth.provider import ProviderMeta  # noqa: E402
from esmtpfa.common.context import ConnectionContext  # noqa: E402
from esmtpfa.common.resources import Resources  # noqa: E402
from esmtpfa.providers.http_basic import HTTPBasicProvider  # noqa: E402
from esmtpfa.providers.http_header import HTTPHeaderProvider  # noqa: E402
from esmtpfa.providers.jwt import JWTProvider  # noqa: E402
from tests.support.httpservers import (  # noqa: E402
    JWKSEndpoint,
    LoopbackHTTPServer,
    make_key,
    mint,
    standard_claims,
)

CONTEXT = ConnectionContext("urn:uuid:00000000-0000-0000-0000-00000000bench", "smtp")
DISTINCT_TOKENS = 200  # signing is slow (RSA); the provider caches no verdicts anyway


async def measure(reactor, login, total: int, concurrency: int) -> dict[str, float]:
    """Run ``total`` logins, ``concurrency`` at a time; rate and latency percentiles."""
    latencies: list[float] = []
    remaining = iter(range(total))

    async def worker():
        for i in remaining:
            started = time.perf_counter()
            await login(i)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await defer.gatherResults([defer.ensureDeferred(worker()) for _ in range(concurrency)],
                              consumeErrors=True)
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "rate": total / elapsed,
        "p50": statistics.median(latencies) * 1000,
        "p99": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
        "elapsed": elapsed,
    }


def report(name: str, result: dict[str, float], target: float) -> None:
    verdict = "ok" if result["rate"] >= target else f"BELOW TARGET {target:,.0f}/s"
    print(f"{name:<16} {result['rate']:>9,.0f} logins/s   p50 {result['p50']:7.2f} ms   "
          f"p99 {result['p99']:7.2f} ms   ({result['elapsed']:.2f} s)   {verdict}",
          flush=True)


async def bench_jwt(reactor, total: int, concurrency: int) -> None:
    now = time.time()
    for alg in ("RS256", "ES256", "EdDSA"):
        signing = make_key(alg, f"{alg.lower()}-bench")
        jwks = JWKSEndpoint([signing, make_key("ES256", "other")])
        server = LoopbackHTTPServer({"jwks": jwks}, reactor).start()
        provider = JWTProvider.from_params(
            ProviderMeta(name=f"bench-{alg}", type="jwt"),
            {"jwks_url": server.url("/jwks"), "iss": "https://idp.bench", "aud": "esmtpfa",
             "claims": {"groups": ["mail"]}},
            resources=Resources.build(reactor))
        tokens = [mint(signing, standard_claims(now, lifetime=3600, iss="https://idp.bench",
                                                aud="esmtpfa", sub=f"user{i}",
                                                groups=["mail"]))
                  for i in range(DISTINCT_TOKENS)]

        async def login(i, provider=provider, tokens=tokens):
            user = await provider.requestAvatarId(
                BearerToken(tokens[i % len(tokens)], CONTEXT, ""))
            assert user == f"user{i % len(tokens)}", user

        await measure(reactor, login, min(500, total), concurrency)  # warm up, load JWKS
        result = await measure(reactor, login, total, concurrency)
        assert jwks.fetches == 1, jwks.fetches
        report(f"jwt {alg}", result, 2000)
        await provider.stopProvider()
        await server.stop()


def start_endpoint_process() -> tuple[subprocess.Popen, int]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.support.httpservers",
         "--basic", "alice:s3cret", "--header", "X-Token=t0k3n"],
        cwd=root, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    if not line.startswith("PORT "):
        process.kill()
        raise SystemExit(f"auth endpoint process did not start: {line!r}")
    return process, int(line.split()[1])


def server_stats(process: subprocess.Popen) -> tuple[int, int]:
    """(TCP connections accepted, requests served) so far by the endpoint process."""
    process.stdin.write("stats\n")
    process.stdin.flush()
    _, connections, _, requests = process.stdout.readline().split()
    return int(connections), int(requests)


async def bench_http(reactor, total: int, concurrency: int) -> None:
    process, port = start_endpoint_process()
    try:
        base = f"http://127.0.0.1:{port}"
        basic = HTTPBasicProvider.from_params(
            ProviderMeta(name="bench-basic", type="http_basic"),
            {"url": f"{base}/basic"}, resources=Resources.build(reactor))
        header = HTTPHeaderProvider.from_params(
            ProviderMeta(name="bench-header", type="http_header"),
            {"url": f"{base}/header", "header": "X-Token"},
            resources=Resources.build(reactor))

        async def basic_login(_):
            assert await basic.requestAvatarId(
                UserPassword("alice", "s3cret", CONTEXT)) == "alice"

        async def header_login(_):
            await header.requestAvatarId(BearerToken("t0k3n", CONTEXT, "alice"))

        for name, login in (("http_basic", basic_login), ("http_header", header_login)):
            await measure(reactor, login, min(500, total), concurrency)  # warm the pool
            before = server_stats(process)
            result = await measure(reactor, login, total, concurrency)
            after = server_stats(process)
            report(name, result, 1000)
            print(f"{'':<16} {after[1] - before[1]} requests over "
                  f"{after[0] - before[0]} new TCP connections", flush=True)
        await basic.stopProvider()
        await header.stopProvider()
    finally:
        process.stdin.close()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logins", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--only", choices=("jwt", "http"))
    args = parser.parse_args()
    print("$ " + " ".join([os.path.basename(sys.executable)] + sys.argv), flush=True)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
          f"{args.logins} logins per case, {args.concurrency} concurrent", flush=True)

    async def run(reactor):
        if args.only in (None, "jwt"):
            await bench_jwt(reactor, args.logins, args.concurrency)
        if args.only in (None, "http"):
            await bench_http(reactor, args.logins, args.concurrency)

    task.react(lambda reactor: defer.ensureDeferred(run(reactor)))


if __name__ == "__main__":
    main()
