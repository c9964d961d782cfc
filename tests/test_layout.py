"""The package's top level is its layers (docs/architecture.md, "Layers").

``lint-imports`` (``tox -e lint``) checks the imports against the contracts in
``setup.cfg``; these tests check that the contracts and the package list cover the tree,
so a package added or moved cannot fall outside both.
"""

from __future__ import annotations

import ast
import configparser
from pathlib import Path

from twisted.trial import unittest

ROOT = Path(__file__).resolve().parent.parent


def setup_cfg() -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    return parser


def packages_on_disk() -> set[str]:
    return {".".join(path.parent.relative_to(ROOT).parts)
            for path in (ROOT / "esmtpfa").rglob("__init__.py")}


class LayoutTests(unittest.TestCase):

    def test_setup_cfg_installs_every_package(self):
        listed = set(setup_cfg()["options"]["packages"].split())
        self.assertEqual(listed, packages_on_disk() | {"twisted.plugins"})

    def test_every_top_level_package_is_a_layer(self):
        layers = setup_cfg()["importlinter:contract:layers"]["layers"]
        named = {name.strip() for line in layers.split("\n") for name in line.split("|")
                 if name.strip()}
        top = {name for name in packages_on_disk() if name.count(".") == 1}
        self.assertEqual(named, top)

    def test_the_top_level_holds_only_layers(self):
        """No module beside the layers: each belongs to one of them."""
        loose = sorted(path.name for path in (ROOT / "esmtpfa").glob("*.py")
                       if path.name != "__init__.py")
        self.assertEqual(loose, [])

    def test_plain_tox_checks_the_layers(self):
        tox = configparser.ConfigParser()
        tox.read(ROOT / "tox.ini")
        envlist = {name.strip() for name in tox["tox"]["envlist"].split(",")}
        self.assertIn("lint", envlist)
        self.assertIn("lint-imports", tox["testenv:lint"]["commands"])


#: Where the global reactor may be imported: the composition root and the entry points
#: that run a reactor of their own (docs/architecture.md, "Resources").
REACTOR_OWNERS = ("esmtpfa/runtime/", "esmtpfa/spool/tool.py")


def global_resources_used(source: str) -> list[str]:
    """What a module takes from the process instead of being passed it: the global
    reactor, or the global reactor's thread pool (through ``deferToThread``, or asked of
    a reactor with ``getThreadPool``)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module == "twisted.internet":
            found += [f"line {node.lineno}: imports the global reactor"
                      for alias in node.names if alias.name == "reactor"]
        elif isinstance(node, ast.Import):
            found += [f"line {node.lineno}: imports the global reactor"
                      for alias in node.names if alias.name == "twisted.internet.reactor"]
        if isinstance(node, ast.ImportFrom):
            found += [f"line {node.lineno}: imports deferToThread"
                      for alias in node.names if alias.name == "deferToThread"]
        if isinstance(node, ast.Attribute) and node.attr in ("deferToThread",
                                                              "getThreadPool"):
            found.append(f"line {node.lineno}: uses {node.attr}")
    return found


class ResourcesTests(unittest.TestCase):
    """Components are passed their reactor, threads and caches (docs/architecture.md,
    "Resources"); only the composition root reaches for the process's own."""

    def test_no_component_takes_a_global_resource(self):
        offenders = []
        for path in sorted((ROOT / "esmtpfa").rglob("*.py")):
            name = path.relative_to(ROOT).as_posix()
            if name.startswith(REACTOR_OWNERS):
                continue
            offenders += [f"{name} {what}"
                          for what in global_resources_used(path.read_text("utf-8"))]
        self.assertEqual(offenders, [])

    def test_the_scan_sees_each_way_in(self):
        """The scan itself: each way a module used to reach a global is caught."""
        for source in ("from twisted.internet import reactor",
                       "def f():\n    from twisted.internet import reactor as r",
                       "import twisted.internet.reactor",
                       "from twisted.internet.threads import deferToThread",
                       "from twisted.internet import threads\nthreads.deferToThread(f)",
                       "threads = self._reactor.getThreadPool()"):
            self.assertEqual(len(global_resources_used(source)), 1, source)
        self.assertEqual(global_resources_used(
            "from twisted.internet.threads import deferToThreadPool\n"
            "deferToThreadPool(reactor, pool, f)"), [])
