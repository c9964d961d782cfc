"""Scenario D: hostile HTTP clients against a running relay while a well-behaved one submits.

The relay runs with the HTTP API and short deadlines given as flags
(``docs/http-limits.md``).  The attackers (``tests.support.hostile``) come from loopback
addresses other than the well-behaved client's 127.0.0.1; the well-behaved client posts
one message after another (``POST /``, JSON, Basic auth as ``lab:carol:…``, the named
provider) from a thread, a new connection each time, as a script would.  What the
tests assert is what users and operators notice:

* the well-behaved client is served: every submission gets ``202`` within ``SERVED``
  seconds and reaches the upstream exactly once;
* a slowloris (a byte of the request head every two seconds, or a body trickled after
  valid credentials) is told ``408`` and closed within its deadline plus the close
  grace and ``GRACE``; connections over the per-address cap are closed at once;
* an unauthenticated upload announced as 30 MB gets ``401`` from its headers alone,
  whether its body comes slowly or never, is never invited to send it
  (``100 Continue``), and the relay holds no temporary file and keeps its memory;
* a JSON body nested 100,000 deep from a logged-in client is a ``400`` with a JSON
  error, never a ``500`` or a traceback, and the relay goes on serving.
"""

from __future__ import annotations

import base64
import http.client
import itertools
import json

from twisted.internet import reactor, task, threads

from tests.faults.harness import (
    ATTACKER,
    CLIENT,
    GOOD_SOURCE,
    Attempt,
    RunningRelay,
    ScenarioCase,
    keep_doing,
    message,
)
from tests.support import hostile
from tests.support.misbehaving import MisbehavingUpstream
from tests.support.webclient import request

HEADER_TIMEOUT = 3.0
BODY_TIMEOUT = 2.0
MIN_BODY_RATE = 1000  # octets per second a body must average after BODY_TIMEOUT
IDLE_TIMEOUT = 2.0
CLOSE_GRACE = 1.0
PER_ADDRESS = 10
RELAY_ARGS = ("--http-header-timeout", str(HEADER_TIMEOUT),
              "--http-body-timeout", str(BODY_TIMEOUT),
              "--http-min-body-rate", str(MIN_BODY_RATE),
              "--http-idle-timeout", str(IDLE_TIMEOUT),
              "--http-close-grace", str(CLOSE_GRACE),
              "--http-max-connections", "200",
              "--http-max-connections-per-ip", str(PER_ADDRESS),
              "--relay-connect-timeout", "5", "--relay-timeout", "5",
              "--relay-data-timeout", "10")
#: What a loaded two-core machine may add to a deadline before a connection is gone.
GRACE = 3.0
#: Longest one well-behaved submission (connect to the 202) may take.
SERVED = 5.0
#: What the unauthenticated uploads announce (under the body limit, so only the
#: missing login can refuse them).
UPLOAD = 30 * 1000 * 1000
#: What an unauthenticated upload sent as fast as it can may get into the relay's
#: direction before the 401 and the abort: socket buffers (an unread loopback socket
#: does not grow its window) plus the relay's small drain allowance, not the body.
TAKEN_UNREAD = 8 * 2 ** 20
DEPTH = 100_000


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def request_head(*, length: int, auth: str | None = None, expect: bool = False) -> bytes:
    """The head of ``POST /`` with a JSON body of ``length`` octets."""
    lines = ["POST / HTTP/1.1", "Host: relay.test", "Content-Type: application/json",
             f"Content-Length: {length}"]
    if auth is not None:
        lines.append(f"Authorization: {auth}")
    if expect:
        lines.append("Expect: 100-continue")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def answer_of(received: bytes) -> tuple[int | None, bool, dict | None]:
    """(final status, whether ``100 Continue`` came first, its JSON body) of a raw
    answer; the status is None when nothing complete came."""
    rest, continued = received, False
    while rest.startswith(b"HTTP/1.1 100 "):
        continued = True
        rest = rest.partition(b"\r\n\r\n")[2]
    head, found, body = rest.partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1]) if found else None
    except (IndexError, ValueError):
        status = None
    if status is None:
        return None, continued, None
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    return status, continued, document


# -- the well-behaved client (blocking: run it with deferToThread) -------------------------

def submit(port: int, message_id: str, timeout: float) -> tuple[int, str]:
    """One ``POST /`` on a new connection: (status, body); 0 when it failed."""
    document = {"from": "carol@example.com", "to": ["dave@example.net"],
                "data": base64.b64encode(message(message_id)).decode()}
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout,
                                            source_address=(GOOD_SOURCE, 0))
    try:
        connection.request("POST", "/", body=json.dumps(document).encode(), headers={
            "Content-Type": "application/json", "Authorization": basic(*CLIENT)})
        response = connection.getresponse()
        return response.status, response.read(4096).decode("utf-8", "replace")
    except (OSError, http.client.HTTPException) as error:
        return 0, f"failed: {error!r}"
    finally:
        connection.close()


def keep_submitting(port: int, label: str, duration: float,
                    interval: float = 0.3) -> list[Attempt]:
    """A well-behaved HTTP client: one submission every ``interval`` seconds."""
    return keep_doing(lambda message_id: submit(port, message_id, SERVED + 5),
                      label, duration, interval)


class HostileHTTPClientTests(ScenarioCase):
    timeout = 60

    async def start(self, *args: str):
        upstream = MisbehavingUpstream()
        return await super().start(upstream, *RELAY_ARGS, *args, http=True), upstream

    def well_behaved(self, relay: RunningRelay, label: str, duration: float):
        return threads.deferToThread(keep_submitting, relay.http_port, label, duration)

    # -- what users notice -----------------------------------------------------------

    def assert_served(self, attempts: list[Attempt], upstream: MisbehavingUpstream):
        """Every submission got 202 within SERVED seconds and reached the upstream
        exactly once."""
        self.assertTrue(attempts, "the well-behaved client sent nothing")
        bad = [(a.code, a.text[:120], round(a.at, 1), round(a.took, 1)) for a in attempts
               if a.code != 202 or a.took > SERVED]
        self.assertEqual(bad, [], f"{len(bad)} of {len(attempts)} well-behaved submissions "
                                  f"not served in time (status, body, at, took)")
        self.assertEqual([upstream.accepted(a.message_id) for a in attempts],
                         [1] * len(attempts))

    def assert_answered(self, crowd: hostile.Crowd, status: int, what: str,
                        within: float) -> None:
        """Every connection of ``crowd`` got ``status`` with a JSON error, within
        ``within`` seconds of connecting, and was never told to go on (100)."""
        connected = crowd.connected()
        self.assertEqual(len(connected), len(crowd.clients), f"{what}: not all connected")
        seen = []
        for client in connected:
            code, continued, document = answer_of(bytes(client.received))
            took = None if client.answered_at is None else round(
                client.answered_at - client.connected_at, 1)
            good = (code == status and not continued and isinstance(document, dict)
                    and isinstance(document.get("error"), str)
                    and took is not None and took <= within)
            if not good:
                seen.append((code, continued, took, bytes(client.received[:80])))
        self.assertEqual(seen, [], f"{len(seen)} of {len(connected)} {what} connections "
                                   f"did not get a JSON {status} within {within:g} s "
                                   f"(status, 100 Continue, after, start)")

    def assert_closed_within(self, crowd: hostile.Crowd, seconds: float, what: str,
                             since_answer: bool = False) -> None:
        connected = crowd.connected()
        self.assertTrue(connected, f"no {what} connection was made")
        slow = []
        for client in connected:
            start = client.answered_at if since_answer and client.answered_at else (
                client.connected_at)
            if client.closed_at is None or client.closed_at - start > seconds:
                slow.append(client)
        self.assertEqual(len(slow), 0, f"{len(slow)} of {len(connected)} {what} "
                                       f"connections were still open {seconds:g} s after "
                                       f"{'their answer' if since_answer else 'connecting'}")

    def assert_no_traceback(self, relay: RunningRelay):
        self.assertNotIn("Traceback", relay.log)

    # -- the scenarios ---------------------------------------------------------------

    async def test_slowloris_is_cut_at_its_deadline(self):
        """20 clients send a byte of the request head every 2 s, 10 more send valid
        credentials and then a byte of body every 2 s, and one address opens 30 silent
        connections over a cap of 10: each byte used to push the deadline back, so a
        slowloris held its connection for ever, and nothing limited how many."""
        relay, upstream = await self.start()
        heads = self.crowd(lambda: hostile.Dribbler(
            reactor, rest=request_head(length=200, auth=basic(*ATTACKER)), interval=2.0))
        bodies = self.crowd(lambda: hostile.Dribbler(
            reactor, opening=request_head(length=1000, auth=basic(*ATTACKER)),
            rest=1000, interval=2.0))
        flood = self.crowd(lambda: hostile.Silent(reactor))
        heads.connect(relay.http_port, 20, hostile.sources(20, first=600))
        bodies.connect(relay.http_port, 10, hostile.sources(10, first=650))
        flood.connect(relay.http_port, 30, "127.0.6.2")
        head_bound = HEADER_TIMEOUT + CLOSE_GRACE + GRACE
        body_bound = BODY_TIMEOUT + CLOSE_GRACE + GRACE
        attempts = await self.well_behaved(relay, "beside-slowloris", head_bound)
        for crowd in (heads, bodies, flood):
            await crowd.wait_closed(2.0)

        self.assert_served(attempts, upstream)
        self.assert_answered(heads, 408, "head slowloris", HEADER_TIMEOUT + GRACE)
        self.assert_closed_within(heads, head_bound, "head slowloris")
        self.assert_answered(bodies, 408, "body slowloris", BODY_TIMEOUT + GRACE)
        self.assert_closed_within(bodies, body_bound, "body slowloris")
        at_once = [c for c in flood.connected()
                   if c.closed_at is not None and c.closed_at - c.connected_at < 1.0]
        self.assertGreaterEqual(len(at_once), 30 - PER_ADDRESS,
                                "connections over the per-address cap must be closed at once")
        self.assertTrue(all(not c.received for c in at_once),
                        "a connection over the cap is closed without an answer")
        self.assert_closed_within(flood, head_bound, "silent")
        self.assert_memory_bounded()
        self.assert_no_traceback(relay)

    async def test_unauthenticated_uploads_are_refused_unread(self):
        """Uploads announced as 30 MB without valid credentials: with nothing sent after
        the head, with the body coming slowly, with a wrong password, some asking
        ``Expect: 100-continue``.  They used to be read and spooled to disk whole before
        the 401: twenty unfinished ones held 758 MB of temporary files."""
        relay, upstream = await self.start()
        temporary: set[str] = set()
        watch = task.LoopingCall(lambda: temporary.update(relay.temporary_files()))
        watch.start(0.1)
        self.addCleanup(lambda: watch.running and watch.stop())
        asking = itertools.cycle((True, False, False))  # a third ask for 100 Continue
        silent = self.crowd(lambda: hostile.Dribbler(
            reactor, opening=request_head(length=UPLOAD, expect=next(asking))))
        slow = self.crowd(lambda: hostile.Dribbler(
            reactor, opening=request_head(length=UPLOAD), rest=UPLOAD,
            chunk=16 * 1024, interval=0.25))
        wrong = self.crowd(lambda: hostile.Dribbler(
            reactor, opening=request_head(length=UPLOAD, auth=basic("office",
                                                                    "mallory:guess")),
            rest=UPLOAD, chunk=16 * 1024, interval=0.25))
        silent.connect(relay.http_port, 15, hostile.sources(15, first=700))
        slow.connect(relay.http_port, 10, hostile.sources(10, first=720))
        fast = self.crowd(lambda: hostile.Dribbler(
            reactor, opening=request_head(length=UPLOAD), rest=UPLOAD,
            chunk=64 * 1024, interval=0.005))
        wrong.connect(relay.http_port, 5, hostile.sources(5, first=740))
        fast.connect(relay.http_port, 5, hostile.sources(5, first=750))
        bound = CLOSE_GRACE + GRACE
        attempts = await self.well_behaved(relay, "beside-uploads", 2 * GRACE)
        for crowd in (silent, slow, wrong, fast):
            await crowd.wait_closed(2.0)
        watch.stop()

        self.assert_served(attempts, upstream)
        for crowd, what in ((silent, "announced-only"), (slow, "slow upload"),
                            (wrong, "wrong-password upload"), (fast, "fast upload")):
            self.assert_answered(crowd, 401, what, GRACE)
            self.assertTrue(all(b"\r\nwww-authenticate: basic" in c.received.lower()
                                for c in crowd.clients), f"{what}: 401 without a challenge")
            self.assert_closed_within(crowd, bound, what, since_answer=True)
        taken = [round(c.written / 2 ** 20, 1) for c in fast.clients]
        self.assertTrue(all(c.written < TAKEN_UNREAD for c in fast.clients),
                        f"the relay took {taken} MiB of unauthenticated uploads as fast as "
                        f"they came (bound {TAKEN_UNREAD / 2 ** 20:g} MiB each)")
        self.assertEqual(sorted(temporary), [],
                         "the relay spooled an unauthenticated body to a temporary file")
        self.assert_memory_bounded()
        self.assert_no_traceback(relay)

    async def test_deep_json_is_a_400_and_the_relay_goes_on(self):
        """A logged-in client posts JSON nested 100,000 deep (lists, objects, and a
        recipient list): it used to get a 500 and a traceback in the log;
        now a 400 with a JSON error, while the well-behaved client keeps being served."""
        relay, upstream = await self.start()
        bodies = {
            "lists": b"[" * DEPTH + b"]" * DEPTH,
            "objects": b'{"a":' * DEPTH + b"0" + b"}" * DEPTH,
            "recipients": (b'{"from": "alice@example.com", "to": ' + b"[" * DEPTH
                           + b"]" * DEPTH + b', "data": ""}'),
        }
        url = f"http://127.0.0.1:{relay.http_port}/"
        good = self.well_behaved(relay, "beside-deep-json", GRACE)
        answers = {}
        for round_ in range(3):
            for name, body in bodies.items():
                answers[name, round_] = await request("POST", url, body=body, auth=ATTACKER)
        attempts = await good
        attempts += await self.well_behaved(relay, "after-deep-json", 0.1)

        self.assert_served(attempts, upstream)
        wrong = {key: (r.code, r.header("content-type"), r.body[:120])
                 for key, r in answers.items()
                 if r.code != 400 or r.header("content-type") != "application/json"
                 or not isinstance(r.json().get("error"), str)}
        self.assertEqual(wrong, {}, "deep JSON must get a 400 with a JSON error")
        self.assert_memory_bounded()
        self.assert_no_traceback(relay)
