"""The documentation stands on its own.

Design decisions and Twisted pitfalls are cited from ``docs/design.md`` and
``docs/twisted-defects.md``, never from documents that are not in the repository; every
``docs/`` file a file names, and every relative Markdown link, exists (anchors too); the
original's settings are all implemented and explained in ``docs/compatibility.md``; and
every refusal the relay can send is in the operator guide's troubleshooting tables.
Every source file and module a text names exists, so a module moved to another layer
leaves no stale path behind.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from twisted.trial import unittest

from esmtpfa.runtime.options import SETTINGS

ROOT = Path(__file__).resolve().parent.parent

#: Written in two parts so this file does not trip its own check.
FORBIDDEN = ("SPEC" + " §", "TWISTED" + "-NOTES", "shared/" + "spec")

#: The original esmtpfa's flags and their environment variables (its README's lists).
ORIGINAL_SETTINGS = {
    "addr": "SMTP_ADDR",
    "allow-anonymous-auth": "SMTP_ALLOW_ANONYMOUS_AUTH",
    "allow-insecure-auth": "SMTP_ALLOW_INSECURE_AUTH",
    "config": "PROVIDER_CONFIG",
    "config-svc": "PROVIDER_CONFIG_SERVICE",
    "enable-binary-mime": "SMTP_ENABLE_BINARY_MIME",
    "enable-require-tls": "SMTP_ENABLE_REQUIRE_TLS",
    "enable-smtp-utf8": "SMTP_ENABLE_SMTP_UTF8",
    "http": "HTTP_ENABLE",
    "http-allow-anonymous": "HTTP_ALLOW_ANONYMOUS",
    "http-port": "HTTP_PORT",
    "http-tls-cert": "HTTP_TLS_CERT",
    "http-tls-key": "HTTP_TLS_KEY",
    "log-level": "LOG_LEVEL",
    "metrics-namespace": "METRICS_NAMESPACE",
    "metrics-port": "METRICS_PORT",
    "plain": "SMTP_PLAIN_ENABLE",
    "port": "SMTP_PORT",
    "relay-addr": "RELAY_ADDR",
    "relay-from": "RELAY_FROM",
    "relay-pass": "RELAY_PASS",
    "relay-port": "RELAY_PORT",
    "relay-tls": "RELAY_TLS_ENABLE",
    "relay-tls-ca-cert": "RELAY_TLS_CA_CERT",
    "relay-tls-cert": "RELAY_TLS_CERT",
    "relay-tls-key": "RELAY_TLS_KEY",
    "relay-tls-skip-verify": "RELAY_TLS_SKIP_VERIFY",
    "relay-user": "RELAY_USER",
    "tls": "SMTP_TLS_ENABLE",
    "tls-ca-cert": "SMTP_TLS_CA_CERT",
    "tls-cert": "SMTP_TLS_CERT",
    "tls-key": "SMTP_TLS_KEY",
    "tls-port": "SMTP_TLS_PORT",
}

#: A path under docs/ named in any text (not preceded by a path character).
DOCS_PATH = re.compile(r"(?<![\w/.-])docs/[\w./-]*\w")
#: A Markdown inline link target: ](target) or ](target "title").
MD_LINK = re.compile(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
#: A source file of the package named in any text (``../esmtpfa/…`` from docs/ too).
SOURCE_PATH = re.compile(r"(?<![\w/.-])(?:\.\./)?(esmtpfa/[\w/]+\.(?:py|yaml))")
#: A dotted name under esmtpfa in the guides; not a log namespace (``[esmtpfa.smtp#info]``,
#: ``"namespace":"esmtpfa.delivery"``) nor a file name (``systemd/esmtpfa.service``).
MODULE_NAME = re.compile(r"(?<![\w.\[\"/-])esmtpfa(?:\.\w+)+")
#: Dotted names in the guides that are not Python: what else they name.
NOT_MODULES = {"esmtpfa.queue": "the file spool's RabbitMQ counterpart, a queue (docs/spool.md)"}
#: A page cited by section number (a section sign and a digit after ``.md``), where the
#: tree cites by heading.
NUMBERED_CITATION = re.compile(r"\.md §\d")
NUMBERED_CITATION_SCOPE = {"esmtpfa", "tests", "bench", "docs", "README.md"}
#: A tracker's number where the subject belongs: an issue or a finding, numbered
#: (``issue`` or ``findings``, a space or a hyphen, an optional ``#``, a digit).
TRACKER_NUMBER = re.compile(r"\b(?:issue|finding)s?[\s-]+#?\d", re.IGNORECASE)
#: ``docs/design.md, "Provider selection"`` or ``design.md, "Metrics" and "The SMTP session"``
#: (a Markdown link's text too); group 1 holds the quoted names.
DESIGN_CITATION = re.compile(r'design\.md,\s+((?:"[^"\n]+"(?:,\s*|\s+and\s+)?)+)')
#: Fenced code blocks, whose contents are not Markdown.
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)

#: How the relay words its refusals in the code: ``Reply(451, "4.3.0"``, a
#: ``permanent(550, "5.7.30"`` and ``unavailable("4.4.1"`` (always a 451).
REPLY = re.compile(r"(?:Reply|permanent)\(\s*([45]\d\d),\s*\"([45]\.\d+\.\d+)\"")
UNAVAILABLE = re.compile(r"unavailable\(\s*\"(4\.\d+\.\d+)\"")


def repository_files() -> list[Path]:
    """Tracked files and new files that are not ignored, as they are on disk."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, check=True, capture_output=True).stdout.decode("utf-8").split("\0")
    return [ROOT / name for name in sorted(set(listed))
            if name and (ROOT / name).is_file()]


def lines_matching(pattern) -> list[str]:
    """``path:line: text`` for each line of the guides, the README, the package, its
    tests and its benchmarks (``NUMBERED_CITATION_SCOPE``) that ``pattern`` finds."""
    found = []
    for path in repository_files():
        if path.relative_to(ROOT).parts[0] not in NUMBERED_CITATION_SCOPE:
            continue
        text = read_text(path)
        if text is None:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if pattern.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    return found


def read_text(path: Path) -> str | None:
    try:
        return path.read_text("utf-8")
    except (UnicodeDecodeError, OSError):
        return None  # binary


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[`*_]|\[|\]\([^)]*\)", "", heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def heading_names(markdown: str) -> list[str]:
    """Each heading's text without its ``#`` marks or its number (``## 3. Provider
    selection`` is "Provider selection")."""
    text = FENCE.sub("", markdown)
    return [re.sub(r"^(?:\d+|[A-Z])\.\s+", "", line.lstrip("#").strip())
            for line in text.splitlines() if re.match(r"#{1,6} ", line)]


def anchors(markdown: str) -> set[str]:
    text = FENCE.sub("", markdown)
    return {slug(line.lstrip("#")) for line in text.splitlines()
            if re.match(r"#{1,6} ", line)}


class SelfContainedTests(unittest.TestCase):
    """References point inside the repository."""

    def test_no_citation_of_documents_outside_the_repository(self):
        offenders = []
        for path in repository_files():
            text = read_text(path)
            if text is None:
                continue
            for number, line in enumerate(text.splitlines(), 1):
                if any(word in line for word in FORBIDDEN):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
        self.assertEqual(offenders, [], "cite docs/design.md or docs/twisted-defects.md")

    def test_the_copied_readme_is_gone(self):
        self.assertFalse((ROOT / "docs" / "original-readme.md").exists())

    def test_every_named_docs_file_exists(self):
        missing = []
        for path in repository_files():
            text = read_text(path)
            if text is None:
                continue
            for match in DOCS_PATH.finditer(text):
                target = match.group(0).rstrip(".")
                if not (ROOT / target).exists():
                    missing.append(f"{path.relative_to(ROOT)}: {target}")
        self.assertEqual(missing, [])

    def test_every_relative_markdown_link_resolves(self):
        broken = []
        for path in repository_files():
            if path.suffix != ".md":
                continue
            text = FENCE.sub("", path.read_text("utf-8"))
            for match in MD_LINK.finditer(text):
                link = match.group(1)
                if re.match(r"[a-z][a-z0-9+.-]*:", link):
                    continue  # http:, https:, mailto:
                target, _, anchor = link.partition("#")
                file = (path.parent / target).resolve() if target else path
                where = f"{path.relative_to(ROOT)}: {link}"
                if not file.exists():
                    broken.append(f"{where} (no such file)")
                elif anchor and file.suffix == ".md" and anchor not in anchors(
                        file.read_text("utf-8")):
                    broken.append(f"{where} (no such heading)")
        self.assertEqual(broken, [])

    def test_every_named_source_file_exists(self):
        """A module moved to another layer (docs/architecture.md, "Layers") leaves no
        stale path behind in a guide, a docstring, a test or a deployment file."""
        missing = []
        for path in repository_files():
            text = read_text(path)
            if text is None:
                continue
            for match in SOURCE_PATH.finditer(text):
                if not (ROOT / match.group(1)).exists():
                    missing.append(f"{path.relative_to(ROOT)}: {match.group(1)}")
        self.assertEqual(missing, [])

    def test_every_named_module_exists(self):
        """``esmtpfa.runtime.tap``, ``python -m esmtpfa.runtime.worker``,
        ``esmtpfa.limits.throttle.LocalLoginLedger``: each dotted name in the guides is a
        module, or a name in one."""
        import importlib
        missing = []
        for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
            for match in MODULE_NAME.finditer(path.read_text("utf-8")):
                name = match.group(0)
                if name in NOT_MODULES:
                    continue
                parts = name.split(".")
                # The longest importable prefix, then attributes of it.
                for length in range(len(parts), 0, -1):
                    try:
                        found: object = importlib.import_module(".".join(parts[:length]))
                    except ImportError:
                        continue
                    for attribute in parts[length:]:
                        found = getattr(found, attribute, None)
                    break
                if found is None:
                    missing.append(f"{path.relative_to(ROOT)}: {name}")
        self.assertEqual(missing, [])

    def test_no_citation_by_section_number(self):
        """A page is cited by heading name: a number would point at another section as
        soon as one is inserted or moved.  RFC sections (``RFC 5321 §4.5.5``) are fixed
        and stay numbered."""
        self.assertEqual(lines_matching(NUMBERED_CITATION), [],
                         'cite a page as docs/design.md, "Provider selection"')

    def test_no_issue_or_finding_numbers(self):
        """A heading or a sentence says what a change was about, never which ticket it
        came from: the number means nothing to a reader without the tracker.  Dates stay."""
        self.assertEqual(lines_matching(TRACKER_NUMBER), [],
                         "name the subject, not the issue or finding number")

    def test_the_tracker_check_covers_the_docs_and_the_code(self):
        """The two checks above read the guides and the README as well as the package,
        its tests and its benchmarks, and the pattern finds what it is meant to find."""
        self.assertLessEqual({"esmtpfa", "tests", "bench", "docs", "README.md"},
                             NUMBERED_CITATION_SCOPE)
        # Numbers filled in at run time, so this file does not trip its own check.
        for line in ("## Issue {n}: compare", "### 2026-11-23, issue {n}: work",
                     "bounded (findings {n}, 7 and 10)", "the issue-{n} target", "issue #{n}"):
            self.assertTrue(TRACKER_NUMBER.search(line.format(n=13)), line)
        for line in ("the issue the client sees", "ca.issue(\"relay.test\")",
                     "docs/twisted-defects.md, \"Per-line cost\""):
            self.assertFalse(TRACKER_NUMBER.search(line), line)

    def test_the_design_headings_cited_exist(self):
        """Each ``docs/design.md, "Metrics"`` names a heading of that page (its number,
        if it has one, left out)."""
        headings = heading_names((ROOT / "docs" / "design.md").read_text("utf-8"))
        cited, missing = 0, []
        for path in repository_files():
            text = read_text(path)
            if text is None:
                continue
            for match in DESIGN_CITATION.finditer(text):
                for name in re.findall(r'"([^"\n]+)"', match.group(1)):
                    cited += 1
                    if not any(heading.startswith(name) for heading in headings):
                        missing.append(f"{path.relative_to(ROOT)}: {name}")
        self.assertGreater(cited, 50, "the code cites docs/design.md by heading")
        self.assertEqual(missing, [])


class CompatibilityTests(unittest.TestCase):
    """Every original flag and variable is implemented and explained."""

    def test_each_original_setting_keeps_its_flag_and_variable(self):
        implemented = {setting.flag: setting.env for setting in SETTINGS}
        self.assertEqual({flag: implemented.get(flag) for flag in ORIGINAL_SETTINGS},
                         ORIGINAL_SETTINGS)

    def test_each_original_setting_is_explained(self):
        text = (ROOT / "docs" / "compatibility.md").read_text("utf-8")
        absent = [f"-{flag} / {env}" for flag, env in ORIGINAL_SETTINGS.items()
                  if f"`-{flag}`" not in text or f"`{env}`" not in text]
        self.assertEqual(absent, [])


class OperatorGuideTests(unittest.TestCase):
    """docs/operations.md explains every refusal the relay can send."""

    def test_every_refusal_is_in_the_troubleshooting_tables(self):
        sent = set()
        for path in (ROOT / "esmtpfa").rglob("*.py"):
            text = path.read_text("utf-8")
            sent.update(REPLY.findall(text))
            sent.update(("451", enhanced) for enhanced in UNAVAILABLE.findall(text))
        self.assertIn(("535", "5.7.8"), sent)  # the scan finds what the server sends
        guide = (ROOT / "docs" / "operations.md").read_text("utf-8")
        missing = sorted(f"{code} {enhanced}" for code, enhanced in sent
                         if f"`{code} {enhanced}`" not in guide)
        self.assertEqual(missing, [])

    def test_the_readme_links_the_guides(self):
        readme = (ROOT / "README.md").read_text("utf-8")
        for name in ("operations.md", "compatibility.md", "design.md"):
            self.assertIn(f"](docs/{name})", readme)


__all__ = [name for name in dir() if name.endswith("Tests")]
