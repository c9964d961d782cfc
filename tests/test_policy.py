"""An identity for every session, and sender authorization from
each provider's ``policy`` block (``docs/policy.md``).

The rules are unit-tested on ``esmtpfa.auth.policy`` (pure); everything else runs the whole
relay (``RelayFixture``) in front of a recording upstream, with the real servers each
provider talks to: slapd (users with several ``mail`` values and with none), a JWKS
endpoint (tokens with ``email`` as a string, a list, and none), twisted.web auth
endpoints.  Clients are raw sockets (replies asserted byte for byte) and curl.  Every
refusal is checked to have left the upstream without the message, every acceptance to
have delivered it.
"""

from __future__ import annotations

import hashlib
import json

from twisted.internet import defer, threads
from twisted.trial import unittest

from esmtpfa.auth.policy import HeaderFromScanner, from_addresses, parse_policy
from esmtpfa.auth.selection import Identity
from esmtpfa.common.errors import ConfigError
from esmtpfa.config.providers import build_providers, parse_provider_document
from tests.support.builders import b64, submission
from tests.support.httpservers import AuthEndpoint, LoopbackHTTPServer, until
from tests.support.logcapture import capture_logs, log_text
from tests.support.policyfixture import NS, JWTFixture, SessionMixin, transaction
from tests.support.processes import run_tool
from tests.support.resources import resources
from tests.support.slapd import SharedSlapd, add_people, ldap_providers


def rules(block: dict, type_: str = "userpass"):
    return parse_policy(block, type_).senders


# -- the rules, pure ---------------------------------------------------------------------

class SenderRulesTests(unittest.TestCase):
    block = {"allowed_senders": ["{user}@example.com", "@billing.example.com",
                                 "noreply@example.com"]}

    def test_the_lists_add_up(self):
        r = rules(self.block)
        self.assertTrue(r.allows("ann@example.com", "ann"))
        self.assertTrue(r.allows("anyone@billing.example.com", "ann"))
        self.assertTrue(r.allows("noreply@example.com", "ann"))
        self.assertFalse(r.allows("ceo@example.com", "ann"))
        self.assertFalse(r.allows("ann@sub.billing.example.com", "ann"))  # exact domain
        self.assertTrue(r.allows("ceo@example.com", "ann", own=("ceo@example.com",)))

    def test_domains_and_local_parts_compare_without_case(self):
        r = rules(self.block)
        self.assertTrue(r.allows("Ann@EXAMPLE.com", "ann"))
        self.assertTrue(r.allows("ann@example.com.", "ANN"))
        self.assertTrue(r.allows("NoReply@Example.COM", "x"))
        self.assertFalse(r.allows("ann+tag@example.com", "ann"))  # no sub-address folding

    def test_user_expands_only_to_a_valid_local_part(self):
        r = rules({"allowed_senders": ["{user}@example.com"]})
        for user in ("ceo@example.com", "a b", '"ceo"', "", "x" * 65, "sha256:0123abcd"):
            self.assertFalse(r.allows(f"{user}@example.com", user), user)
        self.assertFalse(r.allows("ceo@example.com", "ceo@example.com"))
        self.assertTrue(r.allows("first.last@example.com", "first.last"))

    def test_null_sender_only_when_listed(self):
        self.assertFalse(rules({"allowed_senders": ["*"]}).allows("", "ann"))
        self.assertTrue(rules({"allowed_senders": ["*"]}).allows("x@y.example", "ann"))
        self.assertTrue(rules({"allowed_senders": ["<>"]}).allows("", "ann"))
        self.assertFalse(rules({"allowed_senders": ["<>"]}).allows("x@y.example", "ann"))

    def test_no_sender_keys_means_any_sender(self):
        self.assertIsNone(parse_policy({}, "userpass").senders)
        self.assertIsNone(parse_policy(None, "userpass").senders)

    def test_mistakes_are_refused(self):
        cases = [
            ({"alowed_senders": ["a@b.example"]}, "unknown policy key"),
            ({"rate": {"messages": "100 an hour"}}, "not a rate like 100/1h"),
            ({"allowed_senders": "a@b.example"}, "must be a list"),
            ({"allowed_senders": []}, "allows no sender"),
            ({"allowed_senders": ["nobody"]}, "is not '*'"),
            ({"allowed_senders": ["{user}.x@example.com"]}, "whole local part"),
            ({"allowed_senders": ["a b@example.com"]}, "local part is not valid"),
            ({"allowed_senders": ["*"], "check_header_from": "yes"}, "true or false"),
            ({"check_header_from": True}, "needs sender rules"),
            ({"sender_attribute": "mail"}, "for ldap providers"),
            ({"sender_claim": "email"}, "for jwt providers"),
        ]
        for block, expected in cases:
            with self.assertRaises(ConfigError, msg=block) as caught:
                parse_policy(block, "userpass")
            self.assertIn(expected, str(caught.exception))
        with self.assertRaises(ConfigError):
            parse_policy({"sender_attribute": "mail)(x"}, "ldap")


class HeaderFromScannerTests(unittest.TestCase):
    def scan(self, content: bytes, chunk: int | None = None) -> HeaderFromScanner:
        scanner = HeaderFromScanner()
        step = chunk or len(content) or 1
        for start in range(0, len(content), step):
            scanner.feed(content[start:start + step])
        scanner.finish()
        return scanner

    def test_every_chunking_gives_the_same_addresses(self):
        content = (b"Subject: x\r\nFROM : Ann <ann@example.com>,\r\n\tbob@example.com\r\n"
                   b"X-Other: y\r\n\r\nFrom: ceo@example.com\r\n")
        for chunk in (1, 2, 3, 7, None):
            scanner = self.scan(content, chunk)
            self.assertEqual(from_addresses(scanner.values()),
                             ("ann@example.com", "bob@example.com"), chunk)

    def test_a_from_line_in_the_body_is_not_the_header(self):
        self.assertIsNone(from_addresses(self.scan(submission(None) + b"From: a@b.example\r\n")
                                         .values()))
        # a line that is not a field ends the header block, as MTAs read it
        scanner = self.scan(b"Subject: x\r\nnot a field\r\nFrom: ceo@example.com\r\n\r\n")
        self.assertEqual(scanner.values(), ())

    def test_every_from_field_counts(self):
        scanner = self.scan(b"From: ann@example.com\r\nFrom: ceo@example.com\r\n\r\n")
        self.assertEqual(from_addresses(scanner.values()),
                         ("ann@example.com", "ceo@example.com"))

    def test_memory_is_bounded(self):
        scanner = HeaderFromScanner(limit=64)
        for _ in range(100):
            scanner.feed(b"a" * 1000 if _ else b"From: ")
        scanner.feed(b"\r\n")
        self.assertTrue(scanner.overflow)  # refused unchecked, having kept only 64 octets
        big = HeaderFromScanner(limit=64)
        big.feed(b"X-Big: " + b"b" * 10000 + b"\r\nFrom: ann@example.com\r\n\r\n")
        self.assertFalse(big.overflow)
        self.assertEqual(big.values(), (" ann@example.com",))

    def test_hostile_from_is_unparseable_not_a_crash(self):
        # getaddresses recurses on nested groups: RecursionError must mean "refuse"
        self.assertIsNone(from_addresses(["a:" * 4000]))
        self.assertIsNone(from_addresses(["(" * 4000]))


class IdentityTests(unittest.TestCase):
    def test_identity_is_hashable_and_names_no_secret(self):
        identity = Identity("corp", "alice", dn="uid=alice,ou=people",
                            attributes=(("mail", ("a@example.com", "b@example.com")),),
                            policy=parse_policy({"allowed_senders": ["*"]}, "ldap"))
        self.assertEqual(str(identity), "corp/alice")
        self.assertEqual(hash(identity), hash(Identity(
            "corp", "alice", dn="uid=alice,ou=people",
            attributes=(("mail", ("a@example.com", "b@example.com")),))))
        self.assertEqual(identity.values("mail"), ("a@example.com", "b@example.com"))
        self.assertEqual(identity.values("email"), ())


class ConfigTests(unittest.TestCase):
    def test_identity_header_must_be_a_field_name(self):
        doc = ('[{"meta": {"name": "h", "type": "http_header"}, "params": {"url": '
               '"http://127.0.0.1:1/", "header": "X-Key", "identity_header": "X User"}}]')
        with self.assertRaises(ConfigError) as caught:
            build_providers(parse_provider_document(doc, "f", env={}),
                            resources=resources())
        self.assertIn("'identity_header' must be an HTTP field name", str(caught.exception))

    def doc(self, policy: str) -> str:
        return ("providers:\n- meta: {name: p1, type: userpass}\n"
                "  params: {username: ann, password: pw}\n" + policy)

    def test_a_typo_names_file_entry_and_key(self):
        with self.assertRaises(ConfigError) as caught:
            parse_provider_document(self.doc("  policy: {alowed_senders: ['*']}\n"),
                                    "/etc/esmtpfa/providers.yaml", env={})
        text = str(caught.exception)
        for part in ("/etc/esmtpfa/providers.yaml", "'p1'", "providers[0]",
                     "'alowed_senders'", "did you mean 'allowed_senders'"):
            self.assertIn(part, text)

    def test_a_changed_policy_makes_a_new_instance_an_unchanged_one_keeps_it(self):
        first = build_providers(parse_provider_document(
            self.doc("  policy: {allowed_senders: ['{user}@example.com']}\n"), "f", env={}),
            resources=resources())
        self.addCleanup(lambda: first.providers.by_name["p1"].stopProvider())
        same = build_providers(parse_provider_document(
            self.doc("  policy: {allowed_senders: ['{user}@example.com']}\n"), "f", env={}),
            previous=first.providers, resources=resources())
        self.assertIs(same.providers.by_name["p1"], first.providers.by_name["p1"])
        changed = build_providers(parse_provider_document(
            self.doc("  policy: {allowed_senders: ['@example.com']}\n"), "f", env={}),
            previous=first.providers, resources=resources())
        provider = changed.providers.by_name["p1"]
        self.assertIsNot(provider, first.providers.by_name["p1"])
        self.assertEqual(provider.policy.senders.domains, frozenset({"example.com"}))

    def test_a_provider_without_rules_is_announced(self):
        events = capture_logs(self)
        build_providers(parse_provider_document(self.doc(""), "f", env={}),
                        resources=resources())
        self.assertIn("provider p1: no sender rules", log_text(events))


# -- whole sessions ----------------------------------------------------------------------

OK_MAIL = b"250 2.1.0 Sender OK"


def refused_mail(address: str) -> bytes:
    return (f"553 5.7.1 Sender address <{address}> is not allowed for this login"
            .encode())


def refused_header(address: str) -> bytes:
    return (f"550 5.7.1 From: header address <{address}> is not allowed for this login"
            .encode())


USERPASS = """\
providers:
- meta: {name: office, type: userpass, fallback: true}
  params: {username: ann, password: ann-pw}
  policy:
    allowed_senders: ["{user}@example.com", "@billing.example.com", "noreply@example.com"]
    check_header_from: true
- meta: {name: open, type: userpass}
  params: {username: bob, password: bob-pw}
"""


class UserPassSessionTests(SessionMixin, unittest.TestCase):
    fixture_args = ("--http",)

    def providers(self):
        return USERPASS

    def setUp(self):
        return self.start_relay()

    @defer.inlineCallbacks
    def test_mail_from_outside_the_policy_is_refused_and_never_relayed(self):
        [ceo, null, own] = yield self.session(
            "ann", "ann-pw", ("ceo@example.com", submission("ann@example.com")),
            ("", submission("ann@example.com")),
            ("Ann@Example.COM", submission("Ann <ann@example.com>")))
        self.assertEqual(ceo, [refused_mail("ceo@example.com")])
        self.assertEqual(null, [refused_mail("")])  # <> only when listed
        self.assertEqual(own[0], OK_MAIL)
        self.assertTrue(own[-1].startswith(b"250 2.0.0 Message accepted as urn:uuid:"), own)
        self.assertEqual([sender for sender, _ in self.delivered()], ["Ann@Example.COM"])
        # no MAIL for the refused senders ever reached the upstream
        lines = b"\n".join(line for s in self.fixture.upstream.sessions for line in s.lines())
        self.assertNotIn(b"ceo@example.com", lines)
        self.assertEqual(self.rejections("office", "mail_from"), 2)
        text = log_text(self.events)
        self.assertIn("relayed for office/ann", text)
        self.assertNotIn("ann-pw", text)

    @defer.inlineCallbacks
    def test_header_from_outside_the_policy_is_refused_after_data(self):
        [spoof, folded, good] = yield self.session(
            "ann", "ann-pw", ("ann@example.com", submission("The CEO <ceo@example.com>")),
            ("ann@example.com", submission("ann@example.com,\r\n ceo@example.com")),
            ("ann@example.com", submission("Billing <invoices@billing.example.com>")))
        self.assertEqual(spoof[-1], refused_header("ceo@example.com"))
        self.assertEqual(folded[-1], refused_header("ceo@example.com"))
        self.assertTrue(good[-1].startswith(b"250 "), good)
        [(sender, data)] = self.delivered()  # only the allowed one reached the upstream
        self.assertIn(b"From: Billing <invoices@billing.example.com>", data)
        self.assertEqual(self.rejections("office", "header_from"), 2)

    @defer.inlineCallbacks
    def test_pipelined_data_then_a_refused_from_sends_no_content(self):
        """With DATA pipelined the upstream has said 354 before the From: is known: the
        relay must drop that connection rather than finish (or start) the content."""
        def script():
            client = self.fixture.secure_session()
            try:
                assert client.auth_plain("ann", "ann-pw")[0] == 235
                client.send(b"MAIL FROM:<ann@example.com>\r\n"
                            b"RCPT TO:<friend@example.net>\r\nDATA\r\n")
                replies = [client._line() for _ in range(3)]
                client.send(submission("ceo@example.com") + b".\r\n")
                replies.append(client._line())
                replies += transaction(client, "ann@example.com", submission("ann@example.com"))
                return replies
            finally:
                client.close()
        replies = yield threads.deferToThread(script)
        self.assertEqual(replies[3], refused_header("ceo@example.com"))
        self.assertTrue(replies[-1].startswith(b"250 "), replies)
        [(sender, data)] = self.delivered()
        self.assertIn(b"From: ann@example.com", data)
        self.assertNotIn(b"ceo@example.com", self.fixture.upstream.cleartext)
        # the refused message's DATA did reach the upstream early; its content did not
        verbs = [verb for s in self.fixture.upstream.sessions for verb in s.verbs()]
        self.assertEqual(verbs.count("DATA"), 2, verbs)

    @defer.inlineCallbacks
    def test_a_provider_without_policy_keeps_any_sender(self):
        [spoof] = yield self.session(
            "open", "bob:bob-pw", ("ceo@example.com", submission("ceo@example.com")))
        self.assertTrue(spoof[-1].startswith(b"250 "), spoof)
        self.assertEqual([s for s, _ in self.delivered()], ["ceo@example.com"])
        self.assertIn("provider open: no sender rules", log_text(self.events))

    def curl(self, sender: str, from_header: str, user="ann", password="ann-pw"):
        data = b64(submission(from_header))
        body = json.dumps({"from": sender, "to": ["friend@example.net"], "data": data})
        d = run_tool("curl", "--silent", "--show-error", "--max-time", "15",
                     "--write-out", "\n%{http_code}", "-H", "Content-Type: application/json",
                     "-u", f"{user}:{password}", "-d", body,
                     f"http://127.0.0.1:{self.fixture.http_port}/")

        def split(result):
            output, code = result
            self.assertEqual(code, 0, output)
            text, status = output.rsplit("\n", 1)
            return int(status), json.loads(text)
        return d.addCallback(split)

    @defer.inlineCallbacks
    def test_http_refusals_are_403_with_a_json_error(self):
        status, body = yield self.curl("ceo@example.com", "ann@example.com")
        self.assertEqual(status, 403)
        self.assertEqual(body["error"],
                         "Sender address <ceo@example.com> is not allowed for this login")
        self.assertEqual((body["reply"]["code"], body["reply"]["enhanced"]), (553, "5.7.1"))
        status, body = yield self.curl("ann@example.com", "CEO <ceo@example.com>")
        self.assertEqual(status, 403)
        self.assertEqual((body["reply"]["code"], body["reply"]["enhanced"]), (550, "5.7.1"))
        self.assertEqual(self.delivered(), [])
        status, body = yield self.curl("ann@example.com", "Ann <ann@example.com>")
        self.assertEqual(status, 202, body)
        self.assertEqual([s for s, _ in self.delivered()], ["ann@example.com"])
        self.assertIn("as office/ann", log_text(self.events))


class ReloadTests(SessionMixin, unittest.TestCase):
    fixture_args = ("--config-poll-interval", "0.05")

    def providers(self):
        return USERPASS

    def setUp(self):
        return self.start_relay()

    @defer.inlineCallbacks
    def test_a_changed_policy_applies_to_new_sessions_without_restart(self):
        [before] = yield self.session(
            "ann", "ann-pw", ("ann@partner.example", submission("ann@partner.example")))
        self.assertEqual(before, [refused_mail("ann@partner.example")])
        self.fixture.write_providers(USERPASS.replace(
            '"noreply@example.com"]', '"noreply@example.com", "@partner.example"]'))
        registry = self.fixture.service.metrics.registry
        yield until(lambda: registry.get_sample_value(
            f"{NS}_config_reloads_total", {"source": "file", "result": "success"}),
            timeout=10)
        [after] = yield self.session(
            "ann", "ann-pw", ("ann@partner.example", submission("ann@partner.example")))
        self.assertTrue(after[-1].startswith(b"250 "), after)
        self.assertEqual([s for s, _ in self.delivered()], ["ann@partner.example"])

    @defer.inlineCallbacks
    def test_a_typo_in_a_policy_is_refused_and_the_old_policy_stays(self):
        self.fixture.write_providers(USERPASS.replace("allowed_senders:", "allowed_sender:"))
        registry = self.fixture.service.metrics.registry
        yield until(lambda: registry.get_sample_value(
            f"{NS}_config_reloads_total", {"source": "file", "result": "failure"}),
            timeout=10)
        self.assertIn("'allowed_sender' (did you mean 'allowed_senders'?)",
                      log_text(self.events))
        [still] = yield self.session(
            "ann", "ann-pw", ("ceo@example.com", submission("ceo@example.com")))
        self.assertEqual(still, [refused_mail("ceo@example.com")])
        self.assertEqual(self.delivered(), [])


class LDAPSessionTests(SharedSlapd, SessionMixin, unittest.TestCase):
    """``sender_attribute: mail`` against slapd: every value is an allowed sender."""

    added = False

    def providers(self):
        return ldap_providers(self.slapd, "corp-ldap", policy={"sender_attribute": "mail"})

    @defer.inlineCallbacks
    def setUp(self):
        yield defer.maybeDeferred(super().setUp)
        cls = type(self)
        if not cls.added or cls.added != self.slapd.port:
            yield threads.deferToThread(self.add_users)
            cls.added = self.slapd.port
        yield self.start_relay()

    def add_users(self):
        add_people(self.slapd, (("multi", ["multi@example.com", "Multi.Alias@Example.ORG"]),
                                ("nomail", [])))

    @defer.inlineCallbacks
    def test_every_mail_value_is_allowed_and_nothing_else(self):
        [first, alias, other] = yield self.session(
            "corp-ldap", "multi:multi-pw", ("multi@example.com", submission("multi@example.com")),
            ("multi.alias@example.org", submission("multi.alias@example.org")),
            ("alice@example.com", submission("alice@example.com")))
        self.assertTrue(first[-1].startswith(b"250 "), first)
        self.assertTrue(alias[-1].startswith(b"250 "), alias)
        self.assertEqual(other, [refused_mail("alice@example.com")])
        self.assertEqual([s for s, _ in self.delivered()],
                         ["multi@example.com", "multi.alias@example.org"])
        self.assertIn("relayed for corp-ldap/multi", log_text(self.events))

    @defer.inlineCallbacks
    def test_a_user_without_mail_may_send_as_nobody(self):
        [own] = yield self.session(
            "corp-ldap", "nomail:nomail-pw", ("nomail@example.com", submission(None)))
        self.assertEqual(own, [refused_mail("nomail@example.com")])
        [single] = yield self.session(
            "corp-ldap", "alice:alice-pw", ("alice@example.com", submission(None)))
        self.assertTrue(single[-1].startswith(b"250 "), single)
        self.assertEqual([s for s, _ in self.delivered()], ["alice@example.com"])
        self.assertEqual(self.rejections("corp-ldap", "mail_from"), 1)


class JWTSessionTests(JWTFixture, unittest.TestCase):
    """``sender_claim: email`` with tokens from a real JWKS endpoint."""

    def providers(self):
        return self.jwt_providers({"sender_claim": "email",
                                   "allowed_senders": ["{user}@bots.example.com"],
                                   "check_header_from": True})

    @defer.inlineCallbacks
    def test_email_as_a_string_a_list_and_missing(self):
        [one, not_one] = yield self.session(
            "idp", self.token("svc-a", email="a@example.com"),
            ("a@example.com", submission("a@example.com")),
            ("b@example.com", submission("b@example.com")))
        self.assertTrue(one[-1].startswith(b"250 "), one)
        self.assertEqual(not_one, [refused_mail("b@example.com")])
        [second, header] = yield self.session(
            "idp", self.token("svc-b", email=["x@example.com", "y@example.org"]),
            ("y@example.org", submission("Y <y@example.org>")),
            ("y@example.org", submission("X <x@example.com>, Z <z@example.org>")))
        self.assertTrue(second[-1].startswith(b"250 "), second)
        self.assertEqual(header[-1], refused_header("z@example.org"))
        [none, by_sub] = yield self.session(
            "idp", self.token("svc-c"),
            ("c@example.com", submission("c@example.com")),
            ("svc-c@bots.example.com", submission("svc-c@bots.example.com")))
        self.assertEqual(none, [refused_mail("c@example.com")])
        self.assertTrue(by_sub[-1].startswith(b"250 "), by_sub)
        self.assertEqual([s for s, _ in self.delivered()],
                         ["a@example.com", "y@example.org", "svc-c@bots.example.com"])
        text = log_text(self.events)
        self.assertIn("relayed for idp/svc-a", text)
        self.assertNotIn(self.token("svc-a", email="a@example.com").split(".")[2], text)


class NamingEndpoint(AuthEndpoint):
    """An auth endpoint that names the user of a good token in a response header."""

    def render(self, request):
        if self.is_good(self._peek(request)):
            request.setHeader(b"X-Authenticated-User", b"svc-backup")
        return super().render(request)

    def _peek(self, request):
        from tests.support.httpservers import RecordedRequest
        headers = {n.decode("latin-1").lower(): [v.decode() for v in vs]
                   for n, vs in request.requestHeaders.getAllRawHeaders()}
        return RecordedRequest("GET", "/", headers)


class HTTPProviderSessionTests(SessionMixin, unittest.TestCase):
    TOKEN = "api-key-0123456789"

    @defer.inlineCallbacks
    def setUp(self):
        self.server = LoopbackHTTPServer({
            "named": NamingEndpoint(expect_header=("X-Api-Key", self.TOKEN)),
            "anon": AuthEndpoint(expect_header=("X-Api-Key", self.TOKEN)),
            "basic": AuthEndpoint(expect_basic=("printer7", "toner:low"))})
        yield defer.maybeDeferred(self.server.start)
        self.addCleanup(self.server.stop)
        yield self.start_relay()

    def providers(self):
        policy = {"allowed_senders": ["{user}@example.com"]}
        return json.dumps({"providers": [
            {"meta": {"name": "named", "type": "http_header"},
             "params": {"url": self.server.url("/named"), "header": "X-Api-Key",
                        "identity_header": "X-Authenticated-User"}, "policy": policy},
            {"meta": {"name": "anon", "type": "http_header"},
             "params": {"url": self.server.url("/anon"), "header": "X-Api-Key"},
             "policy": policy},
            {"meta": {"name": "printers", "type": "http_basic"},
             "params": {"url": self.server.url("/basic")},
             "policy": {"allowed_senders": ["{user}@print.example.com"]}}]})

    @defer.inlineCallbacks
    def test_http_header_identity_from_the_endpoint_or_a_fingerprint(self):
        [named] = yield self.session(
            "named", self.TOKEN, ("svc-backup@example.com", submission(None)))
        self.assertTrue(named[-1].startswith(b"250 "), named)
        [anon] = yield self.session(
            "anon", self.TOKEN, ("svc-backup@example.com", submission(None)))
        self.assertEqual(anon, [refused_mail("svc-backup@example.com")])
        self.assertEqual([s for s, _ in self.delivered()], ["svc-backup@example.com"])
        fingerprint = "sha256:" + hashlib.sha256(self.TOKEN.encode()).hexdigest()[:12]
        text = log_text(self.events)
        self.assertIn("relayed for named/svc-backup", text)
        self.assertIn(f"refused for anon/{fingerprint}", text)
        self.assertNotIn(self.TOKEN, text)

    @defer.inlineCallbacks
    def test_http_basic_user_expands(self):
        [own, other] = yield self.session(
            "printers", "printer7:toner:low",
            ("printer7@print.example.com", submission(None)),
            ("printer8@print.example.com", submission(None)))
        self.assertTrue(own[-1].startswith(b"250 "), own)
        self.assertEqual(other, [refused_mail("printer8@print.example.com")])
        self.assertNotIn("toner:low", log_text(self.events))


class DeliveryModePolicyTests(unittest.TestCase):
    """``delivery``, ``delivery_attribute``/``delivery_claim`` and ``undeliverable``
    (docs/spool.md, "Modes"): parsed with the rest of the block, a typo is an error."""

    def test_provider_mode_and_ending(self):
        policy = parse_policy({"delivery": "Fallback", "undeliverable": "hold"}, "userpass")
        self.assertEqual((policy.delivery, policy.undeliverable), ("fallback", "hold"))
        self.assertEqual(policy.delivery_for((), "passthrough"), "fallback")
        self.assertEqual(parse_policy({}, "userpass").delivery_for((), "spool"), "spool")

    def test_an_identity_chooses_its_own_and_a_typo_is_ignored(self):
        policy = parse_policy({"delivery": "fallback", "delivery_attribute": "mailMode"},
                              "ldap")
        self.assertIn("mailMode", policy.identity_attributes)
        self.assertEqual(policy.delivery_for(("spool",), "passthrough"), "spool")
        self.assertEqual(policy.delivery_for(("sppol",), "passthrough"), "fallback")
        claim = parse_policy({"delivery_claim": "delivery"}, "jwt")
        self.assertEqual(claim.delivery_for(("passthrough",), "spool"), "passthrough")

    def test_mistakes_name_the_key(self):
        for block, words in (({"delivery": "queue"}, "'delivery' must be one of"),
                             ({"undeliverable": "drop"}, "'undeliverable' must be one of"),
                             ({"delivery_claim": "mode"}, "for jwt providers"),
                             ({"delivery_attribute": "mode"}, "for ldap providers")):
            with self.assertRaises(ConfigError) as raised:
                parse_policy(block, "userpass")
            self.assertIn(words, str(raised.exception))
