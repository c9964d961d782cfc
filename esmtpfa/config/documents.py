"""Config documents (the provider file, the relay file, the config service's answers):
read and parsed within bounds of size, values, depth and time (docs/config-loading.md).

A document costs at most ``DocumentLimits`` to parse, whatever its shape: the byte cap
comes first; then the YAML composer counts values (each alias as a copy of what it
names), depth and time *while* it reads, so a refusal comes as soon as a bound is
passed, not after the damage.  Parsing is pure and thread-safe: the reloader runs it off
the reactor thread (``esmtpfa.config.reload``); at startup it runs before the reactor does.

A refusal is a ``DocumentRefused`` (a ``ConfigError``) whose kind names the bound and
whose message names the file, the entry and key the parser had reached, and the line;
never a value, which may be a secret.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.parser import Parser
from yaml.reader import Reader
from yaml.resolver import Resolver
from yaml.scanner import Scanner

from esmtpfa.common.errors import ConfigError

MAX_NODES = 100_000  # YAML aliases can make a tiny file expand exponentially


@dataclass(frozen=True)
class DocumentLimits:
    """How much a config document may cost to parse.

    ``max_bytes`` bounds memory before parsing starts; ``max_values`` bounds the parsed
    tree *counting every YAML alias as a copy* (what any later walk over the tree pays);
    ``max_depth`` keeps every recursive walk far from Python's recursion limit;
    ``max_seconds`` bounds the YAML composer, whose cost per byte depends on the shape
    of the document, so no size cap alone bounds its time.  ``clock`` is a parameter so
    tests drive the deadline without waiting.
    """

    max_bytes: int = 4 * 1024 * 1024
    max_values: int = MAX_NODES
    max_depth: int = 64
    max_seconds: float = 5.0
    clock: Callable[[], float] = field(default=time.monotonic, compare=False, repr=False)


#: The limits used at startup, on reload and for the config service alike.
DEFAULT_LIMITS = DocumentLimits()

#: The kinds of ``DocumentRefused``: which bound the document passed.
BYTES, VALUES, DEPTH, TIME = "bytes", "values", "depth", "time"


class DocumentRefused(ConfigError):
    """A document refused by a ``DocumentLimits`` bound; a ``ConfigError`` like any other.

    ``limit`` is the kind (``BYTES``, ``VALUES``, ``DEPTH`` or ``TIME``), so logs and
    tests tell a slow document from a deep or an expanding one.  ``where`` is how far the
    parser had got: the entry and key (``providers[3].params.groups``) and the line, so
    the operator knows what to look at without the message quoting any value.
    """

    def __init__(self, source: str, reason: str, limit: str, where: str = ""):
        at = f" {where}:" if where else ""
        super().__init__(f"{source}:{at} document refused: {reason}")
        self.source, self.reason, self.limit, self.where = source, reason, limit, where


#: Steps of a path shown in a refusal; deeper ones are elided.
_SHOWN_STEPS = 6
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]{1,40}\Z")


def _step(parent: Any, index: Any) -> str:
    """One step of a path: ``[3]`` in a list, ``.key`` in a mapping, '' for the root."""
    if isinstance(index, int):
        return f"[{index}]"
    if isinstance(index, (str, yaml.ScalarNode)):
        key = index if isinstance(index, str) else index.value
        return f".{key}" if _PLAIN_KEY.match(key) else f"[{key[:40]!r}]"
    if isinstance(parent, yaml.MappingNode):
        return ".<key>"  # the key itself is what is being read
    return ""  # the root


def _location(steps: Sequence[str], line: int | None = None) -> str:
    """``providers[3].params.groups (line 12)``; '' when there is nothing to say."""
    steps = [step for step in steps if step]  # the root has no name of its own
    path = "".join(steps[:_SHOWN_STEPS]).lstrip(".")
    if len(steps) > _SHOWN_STEPS:
        path += "..."
    if line is None:
        return path
    return f"{path} (line {line})" if path else f"line {line}"


class _StrictConstructor(SafeConstructor):
    """``safe_load``'s constructor, refusing duplicate keys: a second ``password:`` is a
    mistake, not an override."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # unhashable key: let SafeConstructor report it
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


class _BoundedComposer(Composer):
    """PyYAML's composer (events → node graph), refusing a document as soon as it passes
    its limits, before any Python object is built from it:

    * every node gets a weight, the number of values it stands for once aliases are
      expanded (an alias weighs what its anchor weighs), and the document's expanded
      size is kept as a running total: a "billion laughs" is refused after a few dozen
      nodes, any document as soon as it passes ``max_values``;
    * an alias to a node still being composed (a recursive structure) is refused: no
      walk over it would end;
    * depth is counted on the way down, and the deadline checked at every node.
    """

    if TYPE_CHECKING:  # from the event source it is mixed with: Parser or CParser
        def peek_event(self) -> Any: ...
        def check_event(self, *choices: Any) -> bool: ...
        def dispose(self) -> None: ...

    _WEIGHT = "_esmtpfa_weight"

    def __init__(self, source: str, limits: DocumentLimits, root: str):
        Composer.__init__(self)
        self._source = source
        self._limits = limits
        self._root = root
        self._deadline = limits.clock() + limits.max_seconds
        self._path: list[str] = []  # the steps to the node being composed
        self._total = 0  # values so far, each alias counted as a copy of its anchor

    def _refused(self, reason: str, limit: str, line: int | None) -> DocumentRefused:
        return DocumentRefused(self._source, reason, limit, _location(self._path, line))

    def _check_clock(self, line: int | None) -> None:
        if self._limits.clock() > self._deadline:
            raise self._refused(
                f"parsing took longer than {self._limits.max_seconds:g} s", TIME, line)

    def compose_node(self, parent, index):
        event = self.peek_event()
        line = event.start_mark.line + 1
        self._path.append(self._root if parent is None and isinstance(
            event, yaml.SequenceStartEvent) else _step(parent, index))
        try:
            self._check_clock(line)
            if self.check_event(yaml.AliasEvent):
                node = super().compose_node(parent, index)
                weight = self._weight_of(node, line)
            else:
                if len(self._path) > self._limits.max_depth:
                    raise self._refused(
                        f"nested deeper than {self._limits.max_depth} levels", DEPTH, line)
                node = super().compose_node(parent, index)
                setattr(node, self._WEIGHT, 1 + sum(
                    self._weight_of(child, line) for child in self._children(node)))
                weight = 1  # its children were counted as they were composed
            self._total += weight
            if self._total > self._limits.max_values:
                raise self._refused(f"more than {self._limits.max_values} values "
                                    "(counting each YAML alias as a copy)", VALUES, line)
            return node
        finally:
            self._path.pop()

    @staticmethod
    def _children(node) -> list:
        if isinstance(node, yaml.SequenceNode):
            return node.value
        if isinstance(node, yaml.MappingNode):
            return [child for pair in node.value for child in pair]
        return []

    def _weight_of(self, node, line: int) -> int:
        weight = getattr(node, self._WEIGHT, None)
        if weight is None:  # an alias to a node whose composition has not finished
            raise self._refused("recursive YAML alias", VALUES, line)
        return weight


class _BoundedLoader(_BoundedComposer, _StrictConstructor, Resolver):
    """Events → bounded composer → strict safe constructor.  The events come from the
    subclass's ``EVENTS`` (libyaml's parser or PyYAML's own); the composer and the
    constructor are PyYAML's Python code either way, so the limits hold alike."""

    EVENTS: Any  # the event source's class, run on the same instance

    def __init__(self, text: str, source: str, limits: DocumentLimits, root: str):
        self.EVENTS.__init__(self, text)
        _BoundedComposer.__init__(self, source, limits, root)
        _StrictConstructor.__init__(self)
        Resolver.__init__(self)

    def construct_object(self, node, deep=False):
        # Building is bounded by the composed values; the deadline still holds.
        self._check_clock(node.start_mark.line + 1)
        return super().construct_object(node, deep=deep)


class _PythonEvents(Reader, Scanner, Parser):
    """PyYAML's own scanner and parser (pure Python)."""

    def __init__(self, stream: str):
        Reader.__init__(self, stream)
        Scanner.__init__(self)
        Parser.__init__(self)


class _PythonLoader(_BoundedLoader, _PythonEvents):
    EVENTS = _PythonEvents


try:
    from yaml._yaml import CParser  # where yaml.cyaml gets it
except ImportError:  # pragma: no cover  (PyYAML built without libyaml)
    _LOADER: type[_BoundedLoader] = _PythonLoader
else:
    class _LibyamlLoader(_BoundedLoader, CParser):
        """Events from libyaml (the PyPI wheels have it): about four times faster than
        PyYAML's scanner, which matters for a document near ``max_bytes``."""

        EVENTS = CParser

    _LOADER = _LibyamlLoader


def _yaml_error(error: yaml.YAMLError) -> str:
    # Never str(error): a MarkedYAMLError quotes the source line, which may be a secret.
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or type(error).__name__
    context = getattr(error, "context", None)
    if context:
        problem = f"{context}: {problem}"
    if mark is None:
        return f"malformed YAML: {problem}"
    return f"malformed YAML at line {mark.line + 1}, column {mark.column + 1}: {problem}"


def _load_json(text: str, source: str, limits: DocumentLimits, root: str) -> Any:
    """JSON, parsed in C (alias-free, so bounded by the byte cap), then checked against
    the values and depth limits; ``json.JSONDecodeError`` when it is not JSON."""
    def no_duplicates(pairs):
        result = dict(pairs)
        if len(result) != len(pairs):
            seen = set()
            for key, _ in pairs:
                if key in seen:
                    raise ConfigError(f"{source}: malformed JSON: duplicate key {key!r}")
                seen.add(key)
        return result

    try:
        document = json.loads(text, object_pairs_hook=no_duplicates)
    except RecursionError:  # far deeper than max_depth: no position to give
        raise DocumentRefused(
            source, f"nested deeper than {limits.max_depth} levels", DEPTH) from None
    _check_tree(document, source, limits, root)
    return document


def _check_tree(document: Any, source: str, limits: DocumentLimits, root: str) -> None:
    """Count the values and depth of a parsed JSON tree, naming where a limit was hit.
    A mapping's key counts as a value, as the YAML loader counts it: the same document
    meets the same limit in either syntax."""
    values = 0
    stack: list[tuple[Any, tuple[str, ...], int]] = [
        (document, (root if isinstance(document, list) else "",), 1)]
    while stack:
        node, path, count = stack.pop()
        values += count
        if values > limits.max_values:
            raise DocumentRefused(source, f"more than {limits.max_values} values", VALUES,
                                  _location(path))
        if len(path) > limits.max_depth:
            raise DocumentRefused(source, f"nested deeper than {limits.max_depth} levels",
                                  DEPTH, _location(path))
        if isinstance(node, dict):  # reversed: popped, and so counted, in document order
            stack.extend((child, (*path, _step(None, key)), 2)  # the key, the value
                         for key, child in reversed(node.items()))
        elif isinstance(node, list):
            stack.extend((node[index], (*path, f"[{index}]"), 1)
                         for index in range(len(node) - 1, -1, -1))


def _load_yaml(text: str, source: str, limits: DocumentLimits, root: str) -> Any:
    loader = _LOADER(text, source, limits, root)
    try:
        return loader.get_single_data()
    except RecursionError:  # cannot happen below max_depth; never a traceback anyway
        raise DocumentRefused(
            source, f"nested deeper than {limits.max_depth} levels", DEPTH) from None
    finally:
        loader.dispose()


def load_document(text: str | bytes, source: str,
                  limits: DocumentLimits = DEFAULT_LIMITS, root: str = "") -> Any:
    """A config document (UTF-8, BOM allowed; JSON or YAML), parsed within ``limits``.

    JSON when it parses as JSON, else YAML; the parser's position in a syntax error.
    ``root`` names a document that is a bare list in a refusal's path (``providers``
    for ``providers[3].params``, as if it had been written under that key).
    """
    if len(text) > limits.max_bytes:
        raise DocumentRefused(source, f"larger than {limits.max_bytes} bytes", BYTES)
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8-sig")
        except UnicodeDecodeError as error:
            raise ConfigError(f"{source}: not UTF-8 text (byte {error.start})") from None
    text = text.removeprefix("\ufeff")
    try:
        return _load_json(text, source, limits, root)
    except json.JSONDecodeError as error:
        json_error = error
    try:
        return _load_yaml(text, source, limits, root)
    except yaml.YAMLError as error:
        if text.lstrip().startswith(("{", "[")):  # meant as JSON: its error is the useful one
            raise ConfigError(
                f"{source}: malformed JSON at line {json_error.lineno}, "
                f"column {json_error.colno}: {json_error.msg}") from None
        raise ConfigError(f"{source}: {_yaml_error(error)}") from None


def read_document(path: str | os.PathLike, limits: DocumentLimits = DEFAULT_LIMITS) -> bytes:
    """Up to ``limits.max_bytes + 1`` bytes of a config file: one byte past the cap is
    enough for ``load_document`` to refuse it, and for the reloader to recognise it by
    its digest, without reading the rest.  Blocking file I/O: once the reactor runs,
    call it off the reactor thread."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as file:
            return file.read(limits.max_bytes + 1)
    except OSError as error:
        raise ConfigError(f"{source}: cannot read: {error.strerror or error}") from None


__all__ = ["BYTES", "DEFAULT_LIMITS", "DEPTH", "DocumentLimits", "DocumentRefused", "TIME",
           "VALUES", "load_document", "read_document"]
