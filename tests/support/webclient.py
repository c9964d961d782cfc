"""HTTP from the tests' side: requests to the submission API and scrapes of ``/metrics``.

Requests go through treq over a *non-persistent* pool (``Connection: close``), so no
connection outlives its test and the reactor stays clean.  Scrapes are parsed with
prometheus_client's own text parser, so a test sees what Prometheus would::

    scrape = yield metrics(fixture.metrics_port)
    scrape.value("esmtpfa_messages_sent_total", provider="office")   # 0.0 when absent
    scrape.labelsets("esmtpfa_connections_total")   # {frozenset({("provider", …), …})}
    scrape.families["esmtpfa_mail_from_to"].type     # "counter"
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from typing import Any

import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor
from twisted.internet.ssl import Certificate
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool

TIMEOUT = 15


@dataclass
class Response:
    code: int
    headers: Any  # twisted.web.http_headers.Headers
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None

    def json(self) -> Any:
        return json.loads(self.body)


def _client(ca_pem: bytes | None) -> treq.client.HTTPClient:
    pool = HTTPConnectionPool(reactor, persistent=False)
    if ca_pem is None:
        return treq.client.HTTPClient(Agent(reactor, pool=pool))
    policy = BrowserLikePolicyForHTTPS(trustRoot=Certificate.loadPEM(ca_pem))
    return treq.client.HTTPClient(Agent(reactor, contextFactory=policy, pool=pool))


@defer.inlineCallbacks
def request(method: str, url: str, *, body: bytes | None = None,
            auth: tuple[str, str] | None = None, headers: dict[str, str] | None = None,
            ca_pem: bytes | None = None):
    """One request; fires with a ``Response`` (the whole body read)."""
    headers = dict(headers or {})
    if body is not None:
        headers.setdefault("Content-Type", "application/json")
    if "[" in url:
        # hyperlink (under treq) cannot turn an IPv6 literal into a URI: use the Agent.
        response = yield _agent_request(method, url, body, auth, headers)
    else:
        response = yield _client(ca_pem).request(
            method, url, data=body, auth=auth, headers=headers, allow_redirects=False,
            timeout=TIMEOUT)
    content = yield treq.content(response)
    return Response(response.code, response.headers, content)


def _agent_request(method: str, url: str, body: bytes | None,
                   auth: tuple[str, str] | None, headers: dict[str, str]):
    import io
    from base64 import b64encode

    from twisted.web.client import FileBodyProducer
    from twisted.web.http_headers import Headers
    if auth is not None:
        headers["Authorization"] = "Basic " + b64encode(":".join(auth).encode()).decode()
    producer = FileBodyProducer(io.BytesIO(body)) if body is not None else None
    agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
    d = agent.request(method.encode(), url.encode(),
                      Headers({k: [v] for k, v in headers.items()}), producer)
    return d.addTimeout(TIMEOUT, reactor)


def post_json(url: str, document: Any, **kwargs):
    return request("POST", url, body=json.dumps(document).encode(), **kwargs)


class Scrape:
    """One parsed ``/metrics`` page."""

    def __init__(self, text: str):
        self.text = text
        self.families = {family.name: family
                         for family in text_string_to_metric_families(text)}
        self.samples = [sample for family in self.families.values()
                        for sample in family.samples]

    def value(self, name: str, **labels: str) -> float:
        for sample in self.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
        return 0.0

    def labelsets(self, name: str) -> set[frozenset]:
        return {frozenset(sample.labels.items()) for sample in self.samples
                if sample.name == name}


@defer.inlineCallbacks
def metrics(port: int, host: str = "127.0.0.1"):
    response = yield request("GET", f"http://{host}:{port}/metrics")
    assert response.code == 200, response
    return Scrape(response.body.decode("utf-8"))


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    """What blocking ``sock`` received until ``marker`` arrived or the peer closed: the
    head of an answer read over a raw socket (each read bounded by the socket's
    timeout)."""
    received = b""
    while marker not in received:
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    return received


def get_blocking(port: int, path: str, timeout: float = 10.0) -> tuple[int, str]:
    """``GET http://127.0.0.1:port/path`` from a thread (``deferToThread``), as a probe
    or an operator's curl would: the status and the body (0 and "" when nothing
    answers)."""
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError:
        return 0, ""
