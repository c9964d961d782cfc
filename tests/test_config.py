"""Provider configuration (docs/design.md, "Provider selection", "Provider types" and
"Configuration, reload and limits"): shapes, ${VAR}, load errors, rebuilds."""

from __future__ import annotations

import json
import os
import textwrap

from twisted.internet import defer
from twisted.internet.defer import succeed
from twisted.trial import unittest

from esmtpfa import providers
from esmtpfa.auth.provider import ProviderMeta
from esmtpfa.auth.selection import ProviderSet
from esmtpfa.common.errors import ConfigError
from esmtpfa.config import documents
from esmtpfa.config import providers as config
from esmtpfa.config.providers import (
    BuildResult,
    ConfiguredProviderSet,
    ProviderConfig,
    build_providers,
    expand_env,
    load_provider_file,
    parse_provider_document,
)
from esmtpfa.providers import PROVIDER_TYPES, provider_class
from esmtpfa.providers.userpass import UserPassProvider
from tests.support.ports import free_port
from tests.support.processes import Twistd
from tests.support.resources import resources

ENV = {"MY_USERNAME": "alice", "MY_PASSWORD": "s3cr3t-Pa55"}

# The README's "Provider Configuration" examples, verbatim.
README_YAML = """\
providers:
- meta:
    name: my-jwt-provider
    type: jwt
    domain: "" # optional
    unique_domain_auth: false # optional
    fallback: false # optional
  params:
    jwks_url: "https://www.googleapis.com/oauth2/v3/certs"
    iss: "https://accounts.google.com"
    sub: "110169484474386276334"
    aud: "my-project-id"
    claims:
      foo: ["bar"]
      another: claim-value
- meta:
    name: my-userpass-provider
    type: userpass
    domain: "example.com" # optional
    unique_domain_auth: true # optional
    fallback: false # optional
  params:
    username: "${MY_USERNAME}"
    password: "${MY_PASSWORD}"
"""

README_JSON = """\
{
    "providers": [
        {
            "meta": {
                "name": "my-jwt-provider",
                "type": "jwt",
                "domain": "",
                "unique_domain_auth": false,
                "fallback": false
            },
            "params": {
                "jwks_url": "https://www.googleapis.com/oauth2/v3/certs",
                "iss": "https://accounts.google.com",
                "sub": "110169484474",
                "aud": "my-project-id",
                "claims": {
                    "foo": ["bar"],
                    "another": "claim-value"
                }
            }
        },
        {
            "meta": {
                "name": "my-userpass-provider",
                "type": "userpass",
                "domain": "example.com",
                "unique_domain_auth": true,
                "fallback": false
            },
            "params": {
                "username": "${MY_USERNAME}",
                "password": "${MY_PASSWORD}"
            }
        }
    ]
}
"""

# The README's userpass provider alone: every type that surely exists here.
README_USERPASS = "- meta:" + README_YAML.split("- meta:")[2]


def doc(text: str) -> str:
    return textwrap.dedent(text)


def userpass_yaml(name: str = "up", username: str = "u", password: str = "p",
                  extra_meta: str = "") -> str:
    return (f"- meta: {{name: {name}, type: userpass{extra_meta}}}\n"
            f"  params: {{username: {username}, password: {password}}}\n")


def parse(text, source="providers.yaml", env=ENV):
    return parse_provider_document(text, source, env=env)


class ShapeTests(unittest.TestCase):
    def test_readme_yaml(self):
        jwt, up = parse(README_YAML)
        self.assertEqual(jwt.meta, ProviderMeta("my-jwt-provider", "jwt", None, False, False))
        self.assertEqual(jwt.params["claims"], {"foo": ["bar"], "another": "claim-value"})
        self.assertEqual(up.meta, ProviderMeta("my-userpass-provider", "userpass",
                                               "example.com", False, True))
        self.assertEqual(up.params, {"username": "alice", "password": "s3cr3t-Pa55"})
        self.assertEqual((jwt.index, up.index), (0, 1))
        self.assertEqual(up.source, "providers.yaml")

    def test_readme_json_equals_yaml(self):
        from_yaml = parse(README_YAML)
        from_json = parse(README_JSON, "providers.json")
        self.assertEqual(from_json[1], from_yaml[1])
        self.assertEqual(from_json[0].meta, from_yaml[0].meta)
        # The README's two examples differ in one value only: the JWT `sub`.
        yaml_params, json_params = from_yaml[0].params, from_json[0].params
        self.assertEqual(yaml_params.pop("sub"), "110169484474386276334")
        self.assertEqual(json_params.pop("sub"), "110169484474")
        self.assertEqual(yaml_params, json_params)

    def test_bare_list(self):
        bare = parse(README_YAML.replace("providers:\n", ""))
        self.assertEqual(bare, parse(README_YAML))
        self.assertEqual(parse(json.dumps(json.loads(README_JSON)["providers"])),
                         parse(README_JSON))

    def test_bytes_and_bom(self):
        self.assertEqual(parse(README_YAML.encode()), parse(README_YAML))
        self.assertEqual(parse(b"\xef\xbb\xbf" + README_JSON.encode()), parse(README_JSON))
        self.assertEqual(parse("\ufeff" + README_YAML), parse(README_YAML))

    def test_empty_list(self):
        self.assertEqual(parse("[]"), [])
        self.assertEqual(parse("providers: []"), [])

    def test_optional_meta_and_params(self):
        [only] = parse("- meta: {name: n, type: userpass}")
        self.assertEqual(only.meta, ProviderMeta("n", "userpass"))
        self.assertEqual(only.params, {})
        [only] = parse("- meta: {name: n, type: userpass, domain: null, fallback: null}\n"
                       "  params: null")
        self.assertEqual(only.meta, ProviderMeta("n", "userpass"))

    def test_domain_normalized(self):
        [only] = parse("- meta: {name: n, type: userpass, domain: Mail.Example.COM.}")
        self.assertEqual(only.meta.domain, "mail.example.com")

    def test_yaml_flow_list_is_not_json(self):
        [only] = parse("[{meta: {name: n, type: userpass}}]")
        self.assertEqual(only.meta.name, "n")

    def test_yaml_anchors(self):
        configs = parse(doc("""\
            - meta: {name: a, type: userpass, fallback: true}
              params: &creds {username: u, password: p}
            - meta: {name: b, type: userpass}
              params: *creds
            """))
        self.assertEqual(configs[0].params, configs[1].params)

    def test_every_known_type_parses(self):
        for type_name in PROVIDER_TYPES:
            [only] = parse(f"- meta: {{name: n, type: {type_name}}}")
            self.assertEqual(only.meta.type, type_name)


class ExpansionTests(unittest.TestCase):
    def expand(self, text, env=ENV):
        return expand_env(text, env)

    def test_whole_and_inside(self):
        self.assertEqual(self.expand("${MY_USERNAME}"), "alice")
        self.assertEqual(self.expand("prefix-${MY_USERNAME}-suffix"), "prefix-alice-suffix")
        self.assertEqual(self.expand("${MY_USERNAME}:${MY_PASSWORD}"), "alice:s3cr3t-Pa55")

    def test_escape(self):
        self.assertEqual(self.expand("$${MY_USERNAME}"), "${MY_USERNAME}")
        self.assertEqual(self.expand("a$${b}c${MY_USERNAME}"), "a${b}calice")
        self.assertEqual(self.expand("$${"), "${")

    def test_other_dollars_untouched(self):
        for text in ("$", "$MY_USERNAME", "a$b", "$$", "cost: 5$", "{x}", "$ {X}"):
            self.assertEqual(self.expand(text), text)

    def test_values_not_expanded_again(self):
        self.assertEqual(self.expand("${A}", {"A": "${B}", "B": "no"}), "${B}")
        self.assertEqual(self.expand("${A}", {"A": "$${"}), "$${")

    def test_empty_value_is_kept_empty(self):
        self.assertEqual(self.expand("x${E}y", {"E": ""}), "xy")

    def test_unset(self):
        error = self.assertRaises(ConfigError, self.expand, "${NOPE}")
        self.assertIn("'NOPE'", str(error))
        self.assertIn("not set", str(error))

    def test_malformed(self):
        for text in ("${", "abc${MY_USERNAME", "${}", "${1X}", "${A-B}", "${A}${"):
            self.assertRaises(ConfigError, self.expand, text)

    def test_nested_params(self):
        [only] = parse(doc("""\
            - meta: {name: n, type: jwt}
              params:
                url: "https://${HOST}/auth?u=${MY_USERNAME}"
                claims:
                  groups: ["${GROUP}", "static", "$${literal}"]
                  deep: {deeper: [{key: "${GROUP}"}]}
                count: 3
                enabled: true
                nothing: null
            """), env={**ENV, "HOST": "idp.example", "GROUP": "mailers"})
        self.assertEqual(only.params, {
            "url": "https://idp.example/auth?u=alice",
            "claims": {"groups": ["mailers", "static", "${literal}"],
                       "deep": {"deeper": [{"key": "mailers"}]}},
            "count": 3, "enabled": True, "nothing": None})

    def test_keys_not_expanded(self):
        [only] = parse("- meta: {name: n, type: jwt}\n  params: {claims: {'${A}': x}}",
                       env={"A": "no"})
        self.assertEqual(only.params, {"claims": {"${A}": "x"}})

    def test_domain_expanded(self):
        [only] = parse("- meta: {name: n, type: userpass, domain: 'mail.${ZONE}'}",
                       env={"ZONE": "Example.ORG"})
        self.assertEqual(only.meta.domain, "mail.example.org")

    def test_default_environment(self):
        self.patch(os, "environ", {"ONLY_IN_OS": "from-os"})
        [only] = parse_provider_document(
            "- meta: {name: n, type: userpass}\n  params: {username: '${ONLY_IN_OS}'}", "f")
        self.assertEqual(only.params["username"], "from-os")


class LoadErrorTests(unittest.TestCase):
    """Each error names the source, the provider and the problem (docs/design.md,
    "Provider selection" and "Configuration, reload and limits")."""

    def refused(self, text, *fragments, source="conf/providers.yaml", env=ENV) -> str:
        error = self.assertRaises(ConfigError, parse_provider_document, text, source, env)
        message = str(error)
        self.assertTrue(message.startswith(source + ": "), message)
        for fragment in fragments:
            self.assertIn(fragment, message)
        return message

    def test_unknown_type(self):
        message = self.refused(userpass_yaml("p1").replace("userpass", "usrpass"),
                               "'p1'", "unknown type 'usrpass'")
        for known in PROVIDER_TYPES:
            self.assertIn(known, message)

    def test_missing_type(self):
        self.refused("- meta: {name: p1}", "'p1'", "meta.type is required")

    def test_unique_without_domain(self):
        self.refused(userpass_yaml("p1", extra_meta=", unique_domain_auth: true"),
                     "'p1'", "unique_domain_auth requires a domain")
        self.refused(userpass_yaml("p1", extra_meta=", unique_domain_auth: true, domain: ''"),
                     "'p1'", "unique_domain_auth requires a domain")

    def test_two_unique_on_one_domain(self):
        self.refused(
            userpass_yaml("p1", extra_meta=", unique_domain_auth: true, domain: Example.com")
            + userpass_yaml("p2", extra_meta=", unique_domain_auth: true, domain: example.com."),
            "'p2'", "'p1'", "'example.com'", "unique domain")

    def test_one_unique_and_one_plain_on_a_domain_is_fine(self):
        parse(userpass_yaml("p1", extra_meta=", unique_domain_auth: true, domain: example.com")
              + userpass_yaml("p2", extra_meta=", domain: example.com"))

    def test_duplicate_names(self):
        self.refused(userpass_yaml("same") + userpass_yaml("other") + userpass_yaml("same"),
                     "'same'", "duplicate name")

    def test_unset_variable(self):
        self.refused(README_YAML, "'my-userpass-provider'", "param 'username'", "'MY_USERNAME'",
                     "not set", env={})

    def test_unset_variable_nested(self):
        self.refused("- meta: {name: j, type: jwt}\n  params: {claims: {g: [x, '${G}']}}",
                     "'j'", "param 'claims.g[1]'", "'G'", "not set")

    def test_unset_variable_in_domain(self):
        self.refused("- meta: {name: n, type: userpass, domain: '${ZONE}'}",
                     "'n'", "meta.domain", "'ZONE'", "not set")

    def test_unterminated_reference(self):
        self.refused("- meta: {name: n, type: userpass}\n  params: {password: 'ab${CD'}",
                     "'n'", "param 'password'", "unterminated")

    def test_malformed_yaml_has_line(self):
        self.refused("- meta: {name: n, type: userpass}\n  params: [unclosed\n",
                     "malformed YAML at line 3")

    def test_malformed_yaml_bad_indent(self):
        message = self.refused("providers:\n- meta:\n    name: a\n   type: userpass\n",
                               "malformed YAML at line 4")
        self.assertIn("column", message)

    def test_malformed_json_has_line(self):
        text = README_JSON.replace('"fallback": false\n            },\n            "params": {\n'
                                   '                "username"',
                                   '"fallback": false\n            }\n            "params": {\n'
                                   '                "username"')
        self.assertNotEqual(text, README_JSON)
        lines = text.splitlines()
        line = lines.index('            "params": {', lines.index('            }')) + 1
        self.refused(text, f"malformed JSON at line {line}, column 13", source="providers.json")

    def test_malformed_errors_do_not_quote_the_source(self):
        message = self.refused("- meta: {name: n, type: userpass}\n"
                               "  params: {password: hunter2 ] }\n", "malformed YAML")
        self.assertNotIn("hunter2", message)
        message = self.refused('[{"meta": {"name": "n", "type": "userpass"}, '
                               '"params": {"password": "hunter2" "x"}}]', "malformed JSON")
        self.assertNotIn("hunter2", message)

    def test_duplicate_keys(self):
        self.refused("- meta: {name: n, type: userpass}\n"
                     "  params:\n    password: a\n    password: b\n",
                     "duplicate key 'password'", "line 4")
        self.refused('[{"meta": {"name": "n", "name": "m", "type": "userpass"}}]',
                     "malformed JSON", "duplicate key 'name'")

    def test_unknown_meta_key(self):
        self.refused(userpass_yaml("p1", extra_meta=", unique_domain: true"),
                     "'p1'", "unknown meta key", "'unique_domain'",
                     "did you mean 'unique_domain_auth'")

    def test_unknown_item_key(self):
        self.refused(userpass_yaml("p1") + "  param: {}\n", "'p1'", "unknown provider key",
                     "'param'")

    def test_unknown_top_level_key(self):
        self.refused("provider: []", "unknown top-level key", "'provider'")
        self.refused("providers: []\nextra: 1", "'extra'")

    def test_wrong_shapes(self):
        self.refused("", "empty document")
        self.refused("# only a comment\n", "empty document")
        self.refused("42", "expected a list of providers")
        self.refused("providers: {meta: {}}", "'providers' must be a list")
        self.refused("- just a string", "providers[0]", "expected a mapping")
        self.refused("- params: {}", "providers[0]", "'meta' is required")
        self.refused("- meta: [name, type]", "providers[0]", "'meta' is required")

    def test_name_errors_name_the_index(self):
        good = userpass_yaml("good")
        self.refused(good + "- meta: {type: userpass}", "providers[1]", "meta.name is required")
        self.refused(good + "- meta: {name: '', type: userpass}", "providers[1]")
        self.refused(good + "- meta: {name: 12, type: userpass}", "providers[1]")
        self.refused(good + "- meta: {name: ' pad ', type: userpass}", "'pad'", "whitespace")

    def test_wrong_meta_types(self):
        self.refused(userpass_yaml("p", extra_meta=", fallback: 'yes'"),
                     "'p'", "meta.fallback must be true or false")
        self.refused(userpass_yaml("p", extra_meta=", unique_domain_auth: 1, domain: d"),
                     "'p'", "meta.unique_domain_auth")
        self.refused(userpass_yaml("p", extra_meta=", domain: [a]"),
                     "'p'", "meta.domain must be a string")
        self.refused(userpass_yaml("p", extra_meta=", type: 3").replace("type: userpass, ", ""),
                     "'p'", "meta.type")

    def test_domain_that_can_never_match(self):
        self.refused(userpass_yaml("p", extra_meta=", domain: 'example.com:587'"),
                     "'p'", "not a host name")
        self.refused(userpass_yaml("p", extra_meta=", domain: 'user@example.com'"),
                     "'p'", "not a host name")

    def test_wrong_params(self):
        self.refused("- meta: {name: p, type: userpass}\n  params: [a, b]",
                     "'p'", "'params' must be a mapping")
        self.refused("- meta: {name: p, type: jwt}\n  params: {claims: {1: x}}",
                     "'p'", "param 'claims'", "key 1")
        self.refused("- meta: {name: p, type: jwt}\n  params: {exp: 2024-01-01}",
                     "'p'", "param 'exp'", "unsupported value type date")
        # YAML 1.1 reads an unquoted `on:` key as true: refused, not silently renamed
        self.refused("- meta: {name: p, type: jwt}\n  params: {on: x}",
                     "'p'", "param names must be strings")

    def test_alias_bomb(self):
        lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
        for i in range(1, 8):
            refs = ", ".join([f"*a{i - 1}"] * 10)
            lines.append(f"a{i}: &a{i} [{refs}]")
        text = "- meta: {name: p, type: jwt}\n  params:\n" + "".join(
            f"    {line}\n" for line in lines)
        self.refused(text, "more than 100000 values")

    def test_not_utf8(self):
        self.refused(b"- meta: {name: \xff, type: userpass}", "not UTF-8")

    def test_messages_never_contain_values(self):
        env = {"MY_USERNAME": "alice", "MY_PASSWORD": "s3cr3t-Pa55"}
        message = self.refused(README_YAML.replace("my-jwt-provider", "my-userpass-provider"),
                               "duplicate name", env=env)
        self.assertNotIn("s3cr3t", message)


class ProviderConfigTests(unittest.TestCase):
    def test_value_equality_and_hash(self):
        meta = ProviderMeta("n", "userpass")
        a = ProviderConfig.create(meta, {"username": "u", "password": "p"}, "a.yaml", 0)
        b = ProviderConfig.create(meta, {"password": "p", "username": "u"}, "b.yaml", 7)
        self.assertEqual(a, b)
        self.assertEqual(hash(a), hash(b))
        self.assertEqual(len({a, b}), 1)
        self.assertNotEqual(a, ProviderConfig.create(meta, {"username": "u", "password": "q"}))
        self.assertNotEqual(a, ProviderConfig.create(ProviderMeta("n", "userpass", fallback=True),
                                                     {"username": "u", "password": "p"}))

    def test_types_are_distinguished(self):
        meta = ProviderMeta("n", "jwt")
        self.assertNotEqual(ProviderConfig.create(meta, {"x": 1}),
                            ProviderConfig.create(meta, {"x": "1"}))
        self.assertNotEqual(ProviderConfig.create(meta, {"x": 1}),
                            ProviderConfig.create(meta, {"x": True}))

    def test_params_is_a_copy(self):
        jwt, _ = parse(README_YAML)
        jwt.params["claims"]["foo"].append("mutated")
        self.assertEqual(jwt.params["claims"]["foo"], ["bar"])

    def test_frozen(self):
        [only] = parse(userpass_yaml())
        self.assertRaises(AttributeError, setattr, only, "params_json", "{}")

    def test_repr_hides_params(self):
        _, up = parse(README_YAML)
        self.assertNotIn("s3cr3t", repr(up))
        self.assertNotIn("s3cr3t", str(up))
        self.assertIn("my-userpass-provider", repr(up))


class RegistryTests(unittest.TestCase):
    def test_userpass(self):
        self.assertIs(provider_class("userpass"), UserPassProvider)

    def test_every_registered_type_loads(self):
        for type_name in PROVIDER_TYPES:
            cls = provider_class(type_name)
            self.assertEqual(f"{cls.__module__}.{cls.__qualname__}", PROVIDER_TYPES[type_name])

    def test_unknown(self):
        error = self.assertRaises(ConfigError, provider_class, "kerberos")
        self.assertIn("'kerberos'", str(error))
        for known in PROVIDER_TYPES:
            self.assertIn(known, str(error))

    def test_unloadable(self):
        self.patch(providers, "PROVIDER_TYPES",
                   {"gone": "esmtpfa.providers.does_not_exist.Gone",
                    "odd": "esmtpfa.common.context.ConnectionContext",
                    "typo": "esmtpfa.providers.userpass.UserPasProvider"})
        for name, fragment in [("gone", "could not be loaded"), ("odd", "not a Provider"),
                               ("typo", "could not be loaded")]:
            error = self.assertRaises(ConfigError, provider_class, name)
            self.assertIn(f"'{name}'", str(error))
            self.assertIn(fragment, str(error))


class BuildTests(unittest.TestCase):
    def setUp(self):
        self.stopped: list[str] = []

        def stopProvider(provider):
            self.stopped.append(provider.meta.name)
            return succeed(None)

        self.patch(UserPassProvider, "stopProvider", stopProvider)

    def build(self, text, previous=None, env=ENV, lent=None) -> BuildResult:
        return build_providers(parse(text, env=env), previous,
                               resources=lent if lent is not None else resources())

    def test_builds_instances(self):
        result = self.build(userpass_yaml("a") + userpass_yaml("b", extra_meta=", fallback: true"))
        self.assertIsInstance(result.providers, ProviderSet)
        self.assertEqual([p.meta.name for p in result.providers.providers], ["a", "b"])
        self.assertEqual([p.meta.name for p in result.providers.fallbacks], ["b"])
        self.assertEqual(result.added, result.providers.providers)
        self.assertEqual(result.removed, ())

    def test_unchanged_instances_are_reused(self):
        first = self.build(userpass_yaml("a") + userpass_yaml("b") + userpass_yaml("c"))
        a, b, c = first.providers.providers
        # b changes its password, c disappears, d is new, a moves: only a is kept
        second = self.build(userpass_yaml("b", password="new") + userpass_yaml("d")
                            + userpass_yaml("a"), previous=first.providers)
        b2, d, a2 = second.providers.providers
        self.assertIs(a2, a)
        self.assertIsNot(b2, b)
        self.assertEqual(second.added, (b2, d))
        self.assertEqual(second.removed, (b, c))
        self.assertEqual(self.stopped, [])  # stopping is the caller's decision
        self.successResultOf(second.stopRemoved())
        self.assertEqual(self.stopped, ["b", "c"])

    def test_stop_failure_is_logged_and_the_rest_still_stop(self):
        first = self.build(userpass_yaml("a") + userpass_yaml("b"))
        second = self.build("[]", previous=first.providers)
        stopped = self.stopped

        def stopProvider(provider):
            stopped.append(provider.meta.name)
            if provider.meta.name == "a":
                raise RuntimeError("cannot stop")
            return succeed(None)

        self.patch(UserPassProvider, "stopProvider", stopProvider)
        self.assertIsNone(self.successResultOf(second.stopRemoved()))
        self.assertEqual(stopped, ["a", "b"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_identical_reload_keeps_everything(self):
        text = README_USERPASS + userpass_yaml("fb", extra_meta=", fallback: true")
        first = self.build(text)
        second = self.build(text, previous=first.providers)
        self.assertEqual(second.providers.providers, first.providers.providers)
        self.assertEqual((second.added, second.removed), ((), ()))

    def test_meta_change_is_a_new_instance(self):
        first = self.build(userpass_yaml("a"))
        second = self.build(userpass_yaml("a", extra_meta=", fallback: true"),
                            previous=first.providers)
        self.assertIsNot(second.providers.providers[0], first.providers.providers[0])
        self.assertEqual(second.removed, first.providers.providers)

    def test_rotated_secret_is_a_new_instance(self):
        text = userpass_yaml("a", password="'${MY_PASSWORD}'")
        first = self.build(text)
        same = self.build(text, previous=first.providers)
        self.assertIs(same.providers.providers[0], first.providers.providers[0])
        rotated = self.build(text, previous=same.providers,
                             env={**ENV, "MY_PASSWORD": "rotated"})
        self.assertIsNot(rotated.providers.providers[0], first.providers.providers[0])

    def test_plain_provider_set_as_previous(self):
        old = UserPassProvider(ProviderMeta("a", "userpass"), "u", "p")
        result = self.build(userpass_yaml("a"), previous=ProviderSet([old]))
        self.assertIsNot(result.providers.providers[0], old)
        self.assertEqual(result.removed, (old,))

    def test_configs_are_remembered(self):
        configs = parse(userpass_yaml("a"))
        result = build_providers(configs, resources=resources())
        self.assertIsInstance(result.providers, ConfiguredProviderSet)
        self.assertEqual(result.providers.configs, tuple(configs))
        self.assertEqual(result.providers.config_by_name["a"], configs[0])

    def test_resources_reach_from_params(self):
        seen = []
        original = UserPassProvider.from_params.__func__

        def from_params(cls, meta, params, *, resources):
            seen.append(resources)
            return original(cls, meta, params, resources=resources)

        self.patch(UserPassProvider, "from_params", classmethod(from_params))
        marker = object()
        self.build(userpass_yaml("a"), lent=marker)
        self.assertEqual(seen, [marker])

    def test_missing_required_param(self):
        error = self.assertRaises(ConfigError, self.build,
                                  "- meta: {name: p1, type: userpass}\n  params: {username: u}")
        self.assertIn("providers.yaml: ", str(error))
        self.assertIn("'p1'", str(error))
        self.assertIn("missing required param 'password'", str(error))

    def test_empty_variable_refuses_to_load(self):
        error = self.assertRaises(ConfigError, self.build, README_USERPASS,
                                  env={**ENV, "MY_PASSWORD": ""})
        self.assertIn("'my-userpass-provider'", str(error))
        self.assertIn("'password' is empty", str(error))

    def test_failure_stops_new_instances_and_keeps_previous(self):
        first = self.build(userpass_yaml("a"))
        self.assertRaises(ConfigError, self.build,
                          userpass_yaml("a") + userpass_yaml("b")
                          + "- meta: {name: c, type: userpass}\n", previous=first.providers)
        self.assertEqual(self.stopped, ["b"])  # not "a": it still belongs to the old set

    def test_cross_rules_on_hand_made_configs(self):
        meta = ProviderMeta("dup", "userpass")
        configs = [ProviderConfig.create(meta, {"username": "u", "password": "p"}, "svc", i)
                   for i in range(2)]
        error = self.assertRaises(ConfigError, build_providers, configs,
                                  resources=resources())
        self.assertIn("svc: ", str(error))
        self.assertIn("'dup'", str(error))
        self.assertEqual(self.stopped, ["dup", "dup"])

    def test_unexpected_exception_hides_its_text(self):
        def from_params(cls, meta, params, *, resources):
            raise ValueError(f"bad value {params['password']}")

        self.patch(UserPassProvider, "from_params", classmethod(from_params))
        error = self.assertRaises(ConfigError, self.build, README_USERPASS)
        self.assertIn("'my-userpass-provider'", str(error))
        self.assertIn("ValueError", str(error))
        self.assertNotIn("s3cr3t", str(error))

    def test_unloadable_type(self):
        self.patch(providers, "PROVIDER_TYPES",
                   {**PROVIDER_TYPES, "userpass": "esmtpfa.providers.nowhere.UserPass"})
        error = self.assertRaises(ConfigError, self.build, userpass_yaml("a"))
        self.assertIn("'a'", str(error))
        self.assertIn("could not be loaded", str(error))


class LoadFileTests(unittest.TestCase):
    def test_yaml_file(self):
        path = self.mktemp()
        with open(path, "w") as file:
            file.write(userpass_yaml("a", password="'${MY_PASSWORD}'"))
        result = load_provider_file(path, env=ENV, resources=resources())
        [provider] = result.providers.providers
        self.assertEqual(provider.meta.name, "a")
        again = load_provider_file(path, env=ENV, previous=result.providers,
                                   resources=resources())
        self.assertIs(again.providers.providers[0], provider)

    def test_errors_name_the_path(self):
        path = self.mktemp()
        with open(path, "w") as file:
            file.write(README_JSON)
        error = self.assertRaises(ConfigError, load_provider_file, path, env={},
                                  resources=resources())
        self.assertTrue(str(error).startswith(path + ": "), str(error))
        self.assertIn("'MY_USERNAME'", str(error))

    def test_missing_file(self):
        path = self.mktemp()
        error = self.assertRaises(ConfigError, load_provider_file, path, env=ENV,
                                  resources=resources())
        self.assertIn(path, str(error))
        self.assertIn("cannot read", str(error))


class ModuleTests(unittest.TestCase):
    def test_public_api(self):
        for name in config.__all__:
            self.assertTrue(hasattr(config, name), name)


class StepClock:
    """A clock for ``DocumentLimits`` that advances ``step`` seconds per reading, so the
    parse deadline is tested without waiting; ``readings`` counts the loader's checks."""

    def __init__(self, step: float = 0.0):
        self.now = 0.0
        self.step = step
        self.readings = 0

    def __call__(self) -> float:
        self.readings += 1
        self.now += self.step
        return self.now


def billion_laughs(levels: int = 9) -> str:
    """Nine levels of ten aliases: a few hundred bytes standing for 10**9 values."""
    lines = ["- meta: {name: p, type: userpass}", "  params:",
             "    l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for level in range(1, levels + 1):
        lines.append(f"    l{level}: &l{level} [{', '.join([f'*l{level - 1}'] * 10)}]")
    return "\n".join(lines) + "\n"


class DocumentLimitTests(unittest.TestCase):
    """Bounded size, values, depth and time; the refusal names the
    file, the entry and key the parser had reached, and the bound."""

    SOURCE = "conf/providers.yaml"

    def refused(self, text, limits, where, reason, limit):
        error = self.assertRaises(documents.DocumentRefused, parse_provider_document,
                                  text, self.SOURCE, ENV, limits)
        at = f" {where}:" if where else ""
        self.assertEqual(str(error), f"{self.SOURCE}:{at} document refused: {reason}")
        self.assertEqual(error.limit, limit)
        self.assertIsInstance(error, ConfigError)  # every caller's handling still applies
        return error

    def test_billion_laughs_is_refused_after_a_few_dozen_nodes(self):
        clock = StepClock()
        self.refused(billion_laughs(), documents.DocumentLimits(clock=clock),
                     "providers[0].params.l4[7] (line 7)",
                     "more than 100000 values (counting each YAML alias as a copy)",
                     documents.VALUES)
        # the loader reads its clock once per node: it stopped inside level 4, long before
        # expanding 10**9 values
        self.assertLess(clock.readings, 200)

    def test_recursive_alias_is_refused(self):
        self.refused("- meta: {name: p, type: userpass}\n  params: {loop: &a [*a]}",
                     documents.DocumentLimits(), "providers[0].params.loop[0] (line 2)",
                     "recursive YAML alias", documents.VALUES)

    def test_deadline_is_checked_while_parsing(self):
        items = "".join(f"- meta: {{name: p{n}, type: userpass}}\n" for n in range(200))
        clock = StepClock(step=0.01)
        self.refused(items, documents.DocumentLimits(max_seconds=1.0, clock=clock),
                     "providers[14] (line 15)", "parsing took longer than 1 s", documents.TIME)
        self.assertLess(clock.readings, 110)  # stopped at the deadline, not at the end

    def test_the_same_document_within_its_deadline_loads(self):
        items = "".join(f"- meta: {{name: p{n}, type: userpass}}\n" for n in range(200))
        configs = parse_provider_document(items, self.SOURCE, ENV, documents.DocumentLimits(
            max_seconds=1.0, clock=StepClock(step=0.0)))
        self.assertEqual(len(configs), 200)

    def test_deep_json_is_refused_without_a_traceback(self):
        self.refused("[" * 100_000 + "]" * 100_000, documents.DocumentLimits(), "",
                     "nested deeper than 64 levels", documents.DEPTH)
        self.refused('{"providers": [{"params": ' + '{"a":' * 100 + "1" + "}" * 101 + "]}",
                     documents.DocumentLimits(), "providers[0].params.a.a.a...",
                     "nested deeper than 64 levels", documents.DEPTH)

    def test_deep_yaml_is_refused(self):
        text = "".join("  " * level + f"k{level}:\n" for level in range(100)) + "  " * 100 + "x"
        self.refused(text, documents.DocumentLimits(), "k0.k1.k2.k3.k4.k5... (line 64)",
                     "nested deeper than 64 levels", documents.DEPTH)

    def test_too_many_json_values(self):
        self.refused(json.dumps({"providers": [0] * 100_001}), documents.DocumentLimits(),
                     "providers[99997]", "more than 100000 values", documents.VALUES)

    def test_size_cap_before_any_parsing(self):
        clock = StepClock()
        self.refused("#" * 101, documents.DocumentLimits(max_bytes=100, clock=clock), "",
                     "larger than 100 bytes", documents.BYTES)
        self.assertEqual(clock.readings, 0)

    def test_error_never_quotes_a_value(self):
        text = ("- meta: {name: p, type: userpass}\n  params:\n    password: &pw hunter2-x\n"
                + "".join(f"    k{n}: [*pw, *pw, *pw]\n" for n in range(50)))
        error = self.refused(text, documents.DocumentLimits(max_values=100),
                             "providers[0].params.k18[0] (line 22)",
                             "more than 100 values (counting each YAML alias as a copy)",
                             documents.VALUES)
        self.assertNotIn("hunter2", str(error))

    def test_python_scanner_gives_the_same_answers(self):
        """Without libyaml the events come from PyYAML's own scanner: same limits."""
        self.patch(documents, "_LOADER", documents._PythonLoader)
        self.test_billion_laughs_is_refused_after_a_few_dozen_nodes()
        self.test_deep_yaml_is_refused()
        self.assertEqual(len(parse(README_YAML)), 2)


class BoundedStartupTests(unittest.TestCase):
    """Startup reads (the provider and the relay file) are bounded like reloads, and the
    error names the file, the entry and the key."""

    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w") as file:
            file.write(text)
        return path

    def big_file(self, head: str) -> str:
        return self.write(head + "#" * (documents.DEFAULT_LIMITS.max_bytes + 10))

    def test_oversized_provider_file(self):
        path = self.big_file(userpass_yaml("a"))
        error = self.assertRaises(ConfigError, load_provider_file, path, env=ENV,
                                  resources=resources())
        self.assertEqual(str(error), f"{path}: document refused: larger than 4194304 bytes")

    def test_read_stops_one_byte_past_the_cap(self):
        path = self.big_file("")
        self.assertEqual(len(documents.read_document(path)),
                         documents.DEFAULT_LIMITS.max_bytes + 1)

    def test_oversized_relay_file(self):
        from esmtpfa.relay.config import load_relay_file
        path = self.big_file("relays:\n- addr: smtp.example:587\n")
        error = self.assertRaises(ConfigError, load_relay_file, path, env={})
        self.assertEqual(str(error), f"{path}: document refused: larger than 4194304 bytes")

    def test_alias_bomb_in_the_relay_file(self):
        from esmtpfa.relay.config import load_relay_file
        first = "relays:\n- addr: a.example\n  user: &x0 [a, a, a, a, a, a, a, a, a, a]\n"
        path = self.write(first + "".join(
            f"- addr: a{n}.example\n  user: &x{n} [{', '.join([f'*x{n - 1}'] * 10)}]\n"
            for n in range(1, 9)))
        error = self.assertRaises(ConfigError, load_relay_file, path, env={})
        self.assertEqual(str(error), f"{path}: relays[4].user[7] (line 11): document refused: "
                                     "more than 100000 values (counting each YAML alias "
                                     "as a copy)")

    @defer.inlineCallbacks
    def test_twistd_names_file_entry_and_key(self):
        """``twistd esmtpfa --config`` as an operator runs it, with a document nested too
        deep in one provider's params: refused at once, saying where."""
        deep = "{a: " * 70 + "x" + "}" * 70
        path = os.path.abspath(self.write(
            userpass_yaml("office") + "- meta: {name: ldap1, type: userpass}\n"
            f"  params: {{username: u, password: p, groups: {deep}}}\n"))
        relay = Twistd(["--config", path, "--port", str(free_port())])
        relay.start()
        self.addCleanup(relay.stop)
        self.assertNotEqual((yield relay.exited()), 0)
        self.assertIn(f"provider configuration: {path}: providers[1].params.groups.a.a... "
                      "(line 4): document refused: nested deeper than 64 levels",
                      relay.output)
        self.assertNotIn("Traceback", relay.output)
