"""The test suite's child processes: what keeps "the child logged it" checks reliable.

CI once failed because a test read a twistd's output for a line logged at start, right
after the port answered: the child had written the line before it listened, but the
line was still in the pipe, unread by the test's reactor (tests/support/processes.py,
``until_logged``).  This pins the property that rules it out.
"""

import sys
import time

from twisted.internet import defer, reactor
from twisted.trial import unittest

from tests.support.ports import free_port
from tests.support.processes import Collector, terminate, until_logged, until_serving

#: A child that logs a line, then listens, then waits to be stopped.
CHILD = """
import socket, sys, time
print("ready to serve", flush=True)
server = socket.create_server(("127.0.0.1", int(sys.argv[1])))
time.sleep(60)
"""


class LoggedLineTests(unittest.TestCase):

    @defer.inlineCallbacks
    def test_a_line_logged_before_the_port_listened_is_found_once_it_answers(self):
        port = free_port()
        collector = Collector()
        process = reactor.spawnProcess(collector, sys.executable,
                                       [sys.executable, "-c", CHILD, str(port)])
        self.addCleanup(terminate, process, collector.ended, 5)
        # The reactor is busy while the child logs and listens, as on a loaded machine:
        # its pipe is readable and its port accepts by the time the reactor looks again.
        time.sleep(2)
        yield until_serving("child", port, collector, timeout=10)
        lines = yield until_logged("child", collector, r"^ready to serve$")
        self.assertEqual(lines, ["ready to serve"])

    @defer.inlineCallbacks
    def test_a_line_never_logged_fails_in_bounded_time_with_the_output(self):
        collector = Collector()
        process = reactor.spawnProcess(collector, sys.executable,
                                       [sys.executable, "-c", CHILD, str(free_port())])
        self.addCleanup(terminate, process, collector.ended, 5)
        started = reactor.seconds()
        with self.assertRaises(AssertionError) as raised:
            yield until_logged("child", collector, r"never said", timeout=1)
        self.assertLess(reactor.seconds() - started, 5)
        self.assertIn("0 logged", str(raised.exception))
