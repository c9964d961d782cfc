"""The package's top level is its layers (docs/architecture.md, "Layers").

``lint-imports`` (``tox -e lint``) checks the imports against the contracts in
``setup.cfg``; these tests check that the contracts and the package list cover the tree,
so a package added or moved cannot fall outside both.
"""

from __future__ import annotations

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
