"""The test suite's port choice: what keeps "stop, then start on the same port" reliable.

CI once failed because slapd, restarted on its old port, found the port held by an
outgoing connection the kernel had given that port as its local end (see
tests/support/ports.py). These tests pin the property that rules this out.
"""

import socket

from twisted.trial import unittest

from tests.support.ports import ephemeral_range, free_port


class FreePortTests(unittest.TestCase):

    def test_never_a_port_the_kernel_gives_outgoing_connections(self):
        low, high = ephemeral_range()
        ports = [free_port() for _ in range(300)]
        self.assertEqual([p for p in ports if low <= p <= high], [])
        # ...and the kernel really chooses inside that range, so the rule means something.
        with socket.create_server(("127.0.0.1", 0)) as server:
            with socket.create_connection(server.getsockname(), timeout=5) as client:
                local = client.getsockname()[1]
        self.assertTrue(low <= local <= high, (local, low, high))

    def test_never_the_same_port_twice_and_each_one_bindable(self):
        ports = [free_port() for _ in range(300)]
        self.assertEqual(len(set(ports)), len(ports))
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", ports[-1]))
