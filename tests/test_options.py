"""The typed settings (``esmtpfa.runtime.settings``): built once when the options are
parsed, frozen, each value with its source, and the only way the relay reads a setting
(docs/config-loading.md, "The settings object")."""

from __future__ import annotations

import dataclasses
import os
import re

from twisted.trial import unittest

import esmtpfa
from esmtpfa.runtime.options import SETTINGS, Options, OptionsProblems
from esmtpfa.runtime.settings import Settings, Source
from tests.support.options import parse_options

PACKAGE = os.path.dirname(os.path.abspath(esmtpfa.__file__))
OPTIONS_MODULE = os.path.join(PACKAGE, "runtime", "options.py")

#: ``options["port"]``, ``options.get("port")``, ``self.options["port"]``: a setting
#: looked up by its flag's name.  ``server_options`` (twistd's own) does not match.
LOOKUP = re.compile(r"(?<![A-Za-z0-9_])options\s*(?:\[|\.get\()")


def string_lookups(sources: dict[str, str]) -> list[str]:
    """``path:line: text`` for every lookup of the parsed options by name in
    ``sources`` (path → source text)."""
    found = []
    for path, text in sorted(sources.items()):
        for number, line in enumerate(text.splitlines(), 1):
            if LOOKUP.search(line.split("#", 1)[0]):
                found.append(f"{os.path.relpath(path, PACKAGE)}:{number}: {line.strip()}")
    return found


def package_sources() -> dict[str, str]:
    """Every module of esmtpfa but the options module itself."""
    sources = {}
    for directory, _, names in os.walk(PACKAGE):
        for name in names:
            path = os.path.join(directory, name)
            if name.endswith(".py") and path != OPTIONS_MODULE:
                with open(path, encoding="utf-8") as file:
                    sources[path] = file.read()
    return sources


class NoLookupByNameTests(unittest.TestCase):
    def test_nothing_outside_the_options_module_reads_options_by_name(self):
        self.assertEqual(string_lookups(package_sources()), [])

    def test_the_scan_finds_what_it_looks_for(self):
        found = string_lookups({
            "a.py": 'port = options["port"]\n',
            "b.py": 'if self.options.get("tls"):\n',
            "c.py": 'name = server_options.get("logfile")\n',  # twistd's, not ours
            "d.py": 'x = 1  # options["port"] in a comment\n'})
        self.assertEqual([os.path.basename(line.split(":")[0]) for line in found],
                         ["a.py", "b.py"])


class SettingsTests(unittest.TestCase):
    def test_built_when_parsed(self):
        options = parse_options("--plain", "--port", "2525", "--http-max-connections", "7",
                                STATE_URL="redis://127.0.0.1:6379/0", SPOOL_RETRY_MIN="2m")
        settings = options.settings
        self.assertIsInstance(settings, Settings)
        self.assertEqual((settings.smtp.plain, settings.smtp.port), (True, 2525))
        self.assertEqual(settings.http.limits.max_connections, 7)
        self.assertEqual(settings.state.url, "redis://127.0.0.1:6379/0")
        self.assertEqual(settings.delivery.retry.minimum, 120.0)

    def test_frozen_all_the_way_down(self):
        settings = parse_options("--plain").settings
        with self.assertRaises(dataclasses.FrozenInstanceError):
            settings.smtp = None  # type: ignore[misc]
        with self.assertRaises(dataclasses.FrozenInstanceError):
            settings.smtp.server.max_recipients = 1  # type: ignore[misc]
        with self.assertRaises(TypeError):
            settings.table["port"] = None  # type: ignore[index]
        with self.assertRaises(TypeError):
            settings.relay.defaults["password"] = "x"  # type: ignore[index]
        seen = [settings]
        while seen:
            value = seen.pop()
            self.assertTrue(value.__dataclass_params__.frozen, type(value).__name__)
            seen.extend(getattr(value, f.name) for f in dataclasses.fields(value)
                        if dataclasses.is_dataclass(getattr(value, f.name)))

    def test_each_value_keeps_its_source(self):
        settings = parse_options("--port", "2525", "--tls-port", "4650", "--http",
                                 SMTP_TLS_PORT="4651", HTTP_PORT="8081").settings
        self.assertEqual(settings.source("port"), Source("flag", "--port"))
        self.assertEqual(settings.source("tls-port"),
                         Source("environment", "SMTP_TLS_PORT", "--tls-port"))
        self.assertEqual(settings.source("http-port"), Source("environment", "HTTP_PORT"))
        self.assertEqual(settings.source("max-recipients"), Source("default"))
        self.assertEqual(settings.smtp.tls_port, 4651)
        demo = parse_options("--demo").settings
        self.assertEqual(demo.source("plain"), Source("demo", "--demo"))

    def test_effective_is_print_config(self):
        settings = parse_options("--port", "2525", RELAY_PASS="s3cret", RELAY_USER="u",
                                 RELAY_ADDR="smtp.example").settings
        lines = settings.effective(non_default=True)
        self.assertEqual(lines, ["port = 2525  # --port",
                                 "relay-addr = smtp.example  # env RELAY_ADDR",
                                 "relay-pass = (redacted)  # env RELAY_PASS",
                                 "relay-user = u  # env RELAY_USER"])
        self.assertEqual(len(settings.effective()), len(settings.table))
        self.assertNotIn("s3cret", repr(settings) + repr(settings.relay))

    def test_built_even_when_a_value_is_refused(self):
        """--check-config checks the rest with typed values: the refused one at its
        default, shown as invalid."""
        options = Options(environ={"SMTP_PORT": "25x"})
        with self.assertRaises(OptionsProblems):
            options.parseOptions(["--plain"])
        settings = options.settings
        self.assertEqual((settings.smtp.plain, settings.smtp.port), (True, 25))
        self.assertIn("port = (invalid)  # env SMTP_PORT", settings.effective())
        self.assertIsNone(settings.relay.upstreams)  # never resolved that far
        self.assertEqual(len(options.problems), 1)

    def test_every_row_of_the_table_is_read_into_the_settings(self):
        """A row added to ``SETTINGS`` must reach a typed field, or nothing uses it."""
        read: set[str] = set()

        class Recording(Options):
            def __getitem__(self, key):
                read.add(key)
                return super().__getitem__(key)

        Recording(environ={}).parseOptions(["--relay-addr", "smtp.example"])
        self.assertEqual(sorted({s.flag for s in SETTINGS} - read), [])
