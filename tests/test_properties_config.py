"""Generated input for the config documents: the provider file (``esmtpfa.config.providers``), the
relay file (``esmtpfa.relay.config``) and the bounded loader under both
(``esmtpfa.config.documents``).

A document comes from an operator, a config service or a ConfigMap someone else edits,
so: any text either parses or fails with ``ConfigError`` (of which ``DocumentRefused``
is one), the one error type whose message names the file and the key, never another
exception and so never a traceback at startup or reload; a document within the limits
reads back as the value that was written, in JSON and in YAML; and a document past a
limit is refused by that limit's kind.
"""

from __future__ import annotations

import json

import yaml
from hypothesis import given
from hypothesis import strategies as st
from twisted.trial import unittest

from esmtpfa.common.errors import ConfigError
from esmtpfa.config.documents import DEPTH, VALUES, DocumentLimits, DocumentRefused, load_document
from esmtpfa.config.providers import parse_provider_document
from esmtpfa.relay.config import parse_relay_document
from tests.test_properties_smtp import PROPERTY

ENV = {"SECRET": "s3cret", "EMPTY": "", "HOST": "smtp.example.com:587"}

#: Scalars as documents carry them, with the strings the parsers look at more closely
#: (variables, ports, domains, types, modes) among arbitrary ones.
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-2, 70000), st.floats(allow_nan=False),
    st.text(max_size=12),
    st.sampled_from(["${SECRET}", "${NOPE}", "${", "$${x}", "${1x}", "${EMPTY}",
                     "userpass", "ldap", "jwt", "http_basic", "http_header",
                     "example.com", "ex ample.com", "a@b", "smtp.example.com:587", "[::1]:25",
                     "host:99999", "required", "opportunistic", "none", "plain", "xoauth2",
                     "oauthbearer", "client_secret_post", "/nonexistent", "*@example.com",
                     "10/m", "0/s", "x/y", "@example.com", "<>", "any"]))
KEYS = st.one_of(
    st.sampled_from(["providers", "relays", "meta", "params", "policy", "name", "type",
                     "domain", "fallback", "unique_domain_auth", "addr", "port", "user",
                     "pass", "tls", "starttls", "auth_mech", "oauth2", "token_url",
                     "client_id", "client_secret", "allowed_senders", "rate",
                     "check_header_from", "delivery", "sender_attribute", "users",
                     "url", "tls_ca_cert"]),
    st.text(max_size=8))
VALUES_TREE = st.recursive(
    SCALARS,
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(KEYS, children, max_size=5)),
    max_leaves=30)
#: Documents shaped like the real ones, so the examples reach the entries' checks.
PROVIDER_DOCUMENTS = st.one_of(
    VALUES_TREE,
    st.dictionaries(st.just("providers"), st.lists(st.fixed_dictionaries(
        {"meta": st.dictionaries(KEYS, SCALARS, max_size=5)},
        optional={"params": VALUES_TREE, "policy": st.dictionaries(
            st.sampled_from(["allowed_senders", "rate", "check_header_from", "delivery",
                             "sender_attribute", "sender_claim", "rate_attribute",
                             "undeliverable", "x"]), VALUES_TREE, max_size=4)}),
        max_size=3)))
RELAY_DOCUMENTS = st.one_of(
    VALUES_TREE,
    st.fixed_dictionaries({"relays": st.lists(st.dictionaries(KEYS, VALUES_TREE, max_size=6),
                                              max_size=3)}))


def written(document, form: str) -> str:
    if form == "json":
        return json.dumps(document)
    # Escaped non-ASCII: PyYAML's dumper writes a raw NEL (U+0085), which YAML 1.1
    # itself reads as a line break; that is the dumper's asymmetry, not the loader's.
    return yaml.safe_dump(document, allow_unicode=False)


RAW_TEXT = st.one_of(
    st.text(max_size=80),
    st.binary(max_size=80),
    st.lists(st.sampled_from(["providers:", "relays:", "- ", "  ", "meta:", " name: x",
                              "\n", "&a [1]", "*a", "!!python/object:os.system", "{", "[",
                              "}", "]", ":", "'", '"', "\t", "\ufeff", "%YAML 1.2\n",
                              "---\n", "<<: *a", "? ", "!!binary aGk=", "2001-01-01",
                              "type: userpass", "addr: ${HOST}"]),
             max_size=20).map("".join))


def texts(documents) -> st.SearchStrategy:
    """What an operator may hand a parser: ``documents`` written as JSON or YAML, or
    text that is no document at all."""
    return st.one_of(documents.flatmap(
        lambda d: st.sampled_from(["json", "yaml"]).map(lambda form: written(d, form))),
        RAW_TEXT)


class ParseOrConfigError(unittest.TestCase):
    """Nothing but ``ConfigError`` ever leaves a parser."""

    def parses_or_refuses(self, parse, text) -> None:
        try:
            parse(text)
        except ConfigError as error:
            message = str(error)
            self.assertTrue(message.startswith("f.yaml"), message)
            self.assertNotIn("s3cret", message)  # a value from the environment: secret

    @PROPERTY
    @given(texts(PROVIDER_DOCUMENTS))
    def test_provider_documents(self, text):
        self.parses_or_refuses(lambda t: parse_provider_document(t, "f.yaml", ENV), text)

    @PROPERTY
    @given(texts(RELAY_DOCUMENTS))
    def test_relay_documents(self, text):
        self.parses_or_refuses(lambda t: parse_relay_document(t, "f.yaml", ENV), text)


JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.text(max_size=10)),
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.text(max_size=6), children, max_size=4)),
    max_leaves=25)


def size(value) -> tuple[int, int]:
    """(values, depth) of a tree as ``DocumentLimits`` counts them, in either syntax: a
    mapping's keys count as values (the YAML composer builds a node for each, and the
    JSON check counts them alike)."""
    if isinstance(value, dict):
        children = [size(child) for child in value.values()]
        children += [(1, 1)] * len(value)
    elif isinstance(value, list):
        children = [size(child) for child in value]
    else:
        return 1, 1
    return (1 + sum(c[0] for c in children), 1 + max((c[1] for c in children), default=0))


class LoaderProperties(unittest.TestCase):
    @PROPERTY
    @given(JSON_VALUES, st.sampled_from(["json", "yaml"]))
    def test_a_document_reads_back_as_written(self, document, form):
        self.assertEqual(load_document(written(document, form), "f"), document)

    @PROPERTY
    @given(JSON_VALUES, st.sampled_from(["json", "yaml"]), st.integers(1, 30),
           st.integers(1, 6))
    def test_a_document_past_a_limit_is_refused_by_that_limit(self, document, form,
                                                              max_values, max_depth):
        limits = DocumentLimits(max_values=max_values, max_depth=max_depth)
        values, depth = size(document)
        try:
            result = load_document(written(document, form), "f", limits)
        except DocumentRefused as refusal:
            self.assertIn(refusal.limit, {VALUES if values > max_values else None,
                                          DEPTH if depth > max_depth else None})
            return
        self.assertEqual(result, document)
        self.assertLessEqual(values, max_values)
        self.assertLessEqual(depth, max_depth)

