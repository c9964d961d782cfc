#!/usr/bin/env python3
"""A private RabbitMQ on loopback for the benchmarks, until killed.

Run from the repository root (needs Debian's ``rabbitmq-server``)::

    python3 bench/rabbitmq_broker.py [--url-file F]

Starts one broker node with ``tests/support/rabbitmq.py``'s ``RabbitMQServer`` (its own
node name, data directory, Erlang cookie and epmd, listening on 127.0.0.1 only), prints
``URL amqp://...`` on standard output (and writes it to ``--url-file``), and keeps it
running until SIGTERM or SIGINT, then stops it cleanly and removes its directory.
Typical use, for ``bench/compare.py --targets ...,esmtpfa-amqp``::

    python3 bench/rabbitmq_broker.py --url-file /tmp/amqp.url & BROKER=$!
    python3 bench/compare.py --targets ... --amqp-url "$(cat /tmp/amqp.url)"
    kill $BROKER
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, PROJECT)

from twisted.internet import defer, reactor  # noqa: E402

from tests.support.rabbitmq import RabbitMQServer  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url-file", help="also write the URL to this file")
    args = parser.parse_args()
    server = RabbitMQServer()
    outcome = {"status": 0}

    @defer.inlineCallbacks
    def start():
        try:
            yield server.start(timeout=120)
        except BaseException as e:  # noqa: BLE001 - report and leave
            print(f"the broker did not start: {e}", file=sys.stderr, flush=True)
            outcome["status"] = 1
            yield server.close()
            reactor.stop()
            return
        if args.url_file:
            with open(args.url_file + ".tmp", "w") as f:
                f.write(server.url + "\n")
            os.replace(args.url_file + ".tmp", args.url_file)
        print(f"URL {server.url}", flush=True)

    stopping = []

    def shutdown(*_):
        if stopping:
            return
        stopping.append(True)

        def stopped(_):
            if args.url_file:
                try:
                    os.unlink(args.url_file)
                except OSError:
                    pass
            reactor.stop()
        reactor.callFromThread(lambda: server.close().addBoth(stopped))

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    reactor.callWhenRunning(start)
    reactor.run(installSignalHandlers=False)
    return outcome["status"]


if __name__ == "__main__":
    sys.exit(main())
