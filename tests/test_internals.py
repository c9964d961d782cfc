"""``esmtpfa.common.internals``: the one module that touches Twisted's private names.

``check()`` must pass on the Twisted installed (the suite runs against what setup.cfg
pins), and must fail loudly, naming the internal, when an upgrade changes one.  The
changes are simulated by patching Twisted the way an upgrade would change it.
"""

from __future__ import annotations

import ast
import configparser
import os
import re
from pathlib import Path

from twisted.application.internet import StreamServerEndpointService
from twisted.internet import base, tcp
from twisted.internet.abstract import FileDescriptor
from twisted.trial import unittest
from twisted.web.http import HTTPChannel, Request

import twisted
from esmtpfa.common import internals

PROJECT = Path(__file__).resolve().parent.parent


class CheckTests(unittest.TestCase):

    def test_the_installed_twisted_passes(self):
        """Fails loudly, listing every difference, after an upgrade that changes one."""
        internals.check()

    def assert_names(self, *fragments: str) -> None:
        error = self.assertRaises(internals.TwistedChanged, internals.check)
        message = str(error)
        self.assertIn(f"Twisted {twisted.__version__} differs from what "
                      "esmtpfa/common/internals.py relies on", message)
        for fragment in fragments:
            self.assertIn(fragment, message)

    def test_a_version_outside_the_tested_range(self):
        self.patch(twisted, "__version__", "27.1.0")
        self.assert_names("version: Twisted 27.1.0 is outside the tested range "
                          "26.10 to below 27.0")

    def test_a_send_queue_kept_elsewhere(self):
        def write(self, data):  # an upgrade that renamed the private queue
            self._queued = [*getattr(self, "_queued", []), data]
            self.startWriting()
        self.patch(FileDescriptor, "write", write)
        self.assert_names("write-through: FileDescriptor.write no longer queues in "
                          "_tempDataBuffer")

    def test_a_changed_transport_constructor(self):
        def init(self, host, port, bindAddress, connector, reactor=None, *, timeout=None):
            raise AssertionError("not called by check()")
        self.patch(tcp.Client, "__init__", init)
        self.assert_names("signatures: tcp.Client.__init__(self, host, port, bindAddress, "
                          "connector, reactor, timeout) is no longer tcp.Client.__init__(self, "
                          "host, port, bindAddress, connector, reactor)")

    def test_starttls_moved(self):
        self.patch(internals, "_start_tls", None)
        self.assert_names("signatures: twisted.internet._newtls.startTLS is gone")

    def test_connector_no_longer_uses_make_transport(self):
        def connect(self):
            self.state = "connecting"
            self.transport = tcp.Client(self.host, self.port, self.bindAddress, self,
                                        self.reactor)
        self.patch(base.BaseConnector, "connect", connect)
        self.assert_names("write-through: tcp.Connector.connect no longer builds its "
                          "transport by _makeTransport")

    def test_version_kept_elsewhere_by_the_http_channel(self):
        original = HTTPChannel.lineReceived

        def line_received(self, line):  # an upgrade that renamed the private attribute
            original(self, line)
            if self.__dict__.get("_version"):
                self._http_version, self._version = self._version, b""
        self.patch(HTTPChannel, "lineReceived", line_received)
        self.assert_names("twisted.web: HTTPChannel._version no longer holds the request's "
                          "version")

    def test_disconnection_flag_renamed(self):
        def connection_lost(self, reason):
            self._gone = True
        self.patch(Request, "connectionLost", connection_lost)
        self.assert_names("twisted.web: Request._disconnected is not set when the "
                          "connection is lost")

    def test_listen_errors_no_longer_raised(self):
        def start(self):
            self._waitingForPort = self.endpoint.listen(self.factory)
            self._waitingForPort.addErrback(lambda failure: None)
        self.patch(StreamServerEndpointService, "privilegedStartService", start)
        self.assert_names("listening service: StreamServerEndpointService."
                          "_raiseSynchronously no longer makes a failure to listen raise")

    def test_every_problem_is_listed(self):
        self.patch(twisted, "__version__", "27.1.0")
        self.patch(internals, "_start_tls", None)
        self.assert_names("version:", "signatures:")


class PinTests(unittest.TestCase):
    def test_setup_cfg_pins_the_tested_range(self):
        parser = configparser.ConfigParser()
        parser.read(PROJECT / "setup.cfg")
        [pin] = [line for line in parser["options"]["install_requires"].splitlines()
                 if line.strip().startswith("twisted")]
        (low, high) = internals.TESTED_TWISTED
        self.assertEqual(pin.strip(), f"twisted[tls] >= {low[0]}.{low[1]}, < {high[0]}")
        self.assertEqual(high[1], 0)  # the pin's upper bound is a major version

    def test_the_installed_twisted_is_in_the_pinned_range(self):
        low, high = internals.TESTED_TWISTED
        self.assertTrue(low <= internals.twisted_version() < high, twisted.__version__)


# -- nothing else touches Twisted's private names ------------------------------------

#: esmtpfa's own private attributes that other esmtpfa modules read, and whose names a
#: Twisted class also uses (so the scan cannot tell them apart by name).
OWN_SHARED = {"_context"}

#: Uses still outside esmtpfa/common/internals.py, in files owned by other work in progress,
#: with the accessor that replaces each.  Remove an entry once its call is switched; a
#: use not listed here fails the test.
PENDING: dict[tuple[str, str], str] = {}
#: Uses whose name Twisted happens to define too, but that are another library's.
OTHER_LIBRARIES: dict[tuple[str, str], str] = {
    ("esmtpfa/spool/amqp.py", "self._impl"):
        "pika's TwistedProtocolConnection keeps its Connection as _impl "
        "(esmtpfa/spool/amqp.py, _BrokerProtocol, says why)",
}


def twisted_private_names() -> set[str]:
    """Every underscore name Twisted defines: attributes it sets, functions, classes."""
    names = set()
    for path in Path(twisted.__file__).parent.rglob("*.py"):
        if "test" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
    return {name for name in names if re.match(r"_[A-Za-z]", name)}


def private_uses(path: Path, twisted_names: set[str]) -> set[str]:
    """``receiver._name`` expressions in ``path`` that reach a Twisted private name the
    module does not define itself, and imports of Twisted's private modules."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    own = set(OWN_SHARED)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
                and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
            own.add(node.attr)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            own.add(node.name)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in twisted_names - own:
            found.add(ast.unparse(node))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("twisted"):
            if any(part.startswith("_") for part in node.module.split(".")) or any(
                    alias.name.startswith("_") for alias in node.names):
                found.add(f"from {node.module} import ...")
        elif isinstance(node, ast.Import):
            found.update(f"import {alias.name}" for alias in node.names
                         if alias.name.startswith("twisted") and "._" in alias.name)
    return found


class OneModuleTests(unittest.TestCase):
    def test_no_other_module_touches_twisted_private_names(self):
        names = twisted_private_names()
        self.assertIn("_tempDataBuffer", names)  # the scan sees what internals.py uses
        self.assertTrue(private_uses(PROJECT / "esmtpfa" / "common" / "internals.py", names))
        new = []
        for path in sorted((PROJECT / "esmtpfa").rglob("*.py")):
            relative = path.relative_to(PROJECT).as_posix()
            if relative != "esmtpfa/common/internals.py":
                new += [f"{relative}: {use}" for use in sorted(private_uses(path, names))
                        if (relative, use) not in PENDING
                        and (relative, use) not in OTHER_LIBRARIES]
        self.assertEqual(new, [], "move these into esmtpfa/common/internals.py")

    def test_the_old_modules_are_gone(self):
        """One module, in the layer every other stands on (docs/architecture.md, "Layers"),
        with no copy left where it used to be."""
        for old in (("web", "internals.py"), ("internals.py",)):
            self.assertFalse(os.path.exists(PROJECT.joinpath("esmtpfa", *old)), old)
