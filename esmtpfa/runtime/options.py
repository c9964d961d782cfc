"""Command-line flags and environment variables (the original README's, plus ours).

One table drives ``--help``, parsing and the environment: each row names the flag, its
type, default, environment variable and help text.  A set environment variable overrides
the flag (original README); a value that does not parse is a startup error that names
the variable.
"""

from __future__ import annotations

import math
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from twisted.python import usage

from esmtpfa.auth.sendingrates import Limit
from esmtpfa.common.servertls import (
    LEGACY_CIPHERS,
    legacy_cipher_string,
    parse_cipher_string,
    parse_min_version,
)
from esmtpfa.runtime.settings import DEFAULT, Settings, Source
from esmtpfa.smtp.devices import LegacyProfile, parse_listen_address
from esmtpfa.smtp.proxy import parse_networks
from esmtpfa.spool.backends import parse_spool_url

TRUE = {"1", "true", "yes", "on", "t", "y"}
FALSE = {"0", "false", "no", "off", "f", "n", ""}


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in TRUE:
        return True
    if value in FALSE:
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def parse_port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} out of range 0-65535")
    return port


def parse_positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError(f"expected a positive number, got {value}")
    return value


def parse_count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(f"expected zero or a positive number, got {value}")
    return value


_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")


def parse_namespace(text: str) -> str:
    """A Prometheus metric name prefix (empty for none)."""
    if text and not _METRIC_NAME.match(text):
        raise ValueError(f"not a valid Prometheus metric name prefix: {text!r}")
    return text


def parse_http_url(text: str) -> str:
    if not re.match(r"https?://[^/?#\s]+", text, re.IGNORECASE) or any(c.isspace() for c in text):
        raise ValueError("expected an http:// or https:// URL")
    return text


def parse_seconds(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise ValueError(f"expected a positive number of seconds, got {text}")
    return value


def parse_share(text: str) -> float:
    """A fraction in (0, 1]."""
    value = float(text)
    if not 0 < value <= 1:
        raise ValueError(f"{text!r} is not a fraction between 0 (excluded) and 1")
    return value


def parse_rate(text: str) -> Limit | None:
    """A rate like ``100/1h``; empty means unlimited."""
    return Limit.parse(text) if text.strip() else None


def parse_workers(text: str) -> int:
    """A number of worker processes, or ``auto``: one per CPU this process may use."""
    if text.strip().lower() == "auto":
        return usable_cpus()
    try:
        value = parse_positive_int(text)
    except ValueError:
        raise ValueError(f"expected a number of workers or auto, got {text!r}") from None
    if value > MAX_WORKERS:
        raise ValueError(f"at most {MAX_WORKERS} workers, got {value}")
    return value


def usable_cpus(cgroup: str = "/sys/fs/cgroup") -> int:
    """The CPUs this process may run on (its affinity), held to its container's CPU
    quota when it has one (cgroup v2 ``cpu.max``, or v1 ``cpu.cfs_quota_us``): a pod
    limited to 2 CPUs on a 64-core node gets 2 workers, not 64."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        count = os.cpu_count() or 1
    quota = _cgroup_quota(cgroup)
    if quota is not None:
        count = min(count, max(math.ceil(quota), 1))
    return max(min(count, MAX_WORKERS), 1)


def _cgroup_quota(root: str) -> float | None:
    """CPUs allowed by the cgroup's quota, or None when there is none (or no cgroup)."""
    for path, parse in ((os.path.join(root, "cpu.max"), _v2_quota),
                        (os.path.join(root, "cpu", "cpu.cfs_quota_us"), _v1_quota)):
        try:
            with open(path) as f:
                return parse(f.read(), path)
        except (OSError, ValueError):
            continue
    return None


def _v2_quota(text: str, path: str) -> float | None:
    quota, _, period = text.strip().partition(" ")
    return None if quota == "max" else int(quota) / int(period or 100000)


def _v1_quota(text: str, path: str) -> float | None:
    quota = int(text.strip())
    if quota <= 0:
        return None
    with open(os.path.join(os.path.dirname(path), "cpu.cfs_period_us")) as f:
        return quota / int(f.read().strip())


#: More workers than this would only add processes to schedule on any host we know.
MAX_WORKERS = 64


def parse_state_url(text: str) -> str:
    """A ``redis://`` or ``rediss://`` URL (``esmtpfa.limits.resp.RedisURL``); the error
    never repeats the URL, which may hold a password."""
    from esmtpfa.limits.resp import RedisURL
    if text.strip():
        RedisURL.parse(text)
    return text.strip()


_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*\Z", re.IGNORECASE)
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """A positive duration: seconds, or a number with s, m, h or d (``5d``, ``300``)."""
    match = _DURATION.match(text)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"expected a positive duration like 300, 90s, 15m, 2h or 5d, "
                         f"got {text!r}")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2).lower()]


_SIZE = re.compile(r"\s*(\d+)\s*([kmgt]?)i?b?\s*\Z", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """A number of octets, or one with K, M, G or T (powers of 1024): ``512M``, ``10G``."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"expected a size like 1048576, 512M or 10G, got {text!r}")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]


def parse_sni_certs(text: str):
    """``--tls-sni-certs``: (CERT:KEY pairs, directories) (``esmtpfa.common.certificates``)."""
    from esmtpfa.common.certificates import parse_sni_entries
    return parse_sni_entries(text)


def choice(*allowed: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}, got {text!r}")
        return value
    return parse


@dataclass(frozen=True)
class Setting:
    flag: str
    parse: Callable[[str], Any] | None  # None: a boolean flag
    default: Any
    env: str | None
    help: str



#: Flags that choose what ``twistd esmtpfa`` does rather than how the relay behaves:
#: ``--print-config`` does not list them.
ACTIONS = frozenset({"check-config", "check-connect", "print-config", "non-default"})

#: The last word of the name of a setting that holds a credential: its value is never
#: shown (``--print-config``, the override warning), except a ``-key`` setting's that
#: names an existing file (``--tls-key``: the path is no secret, the key in it is).
#: URLs are redacted separately.
SECRET_WORDS = frozenset({"pass", "password", "secret", "token", "key"})

_URL_CREDENTIALS = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/?#@\s]*@")


def is_secret(flag: str) -> bool:
    return flag.rsplit("-", 1)[-1] in SECRET_WORDS


def shown(flag: str, value: Any) -> str:
    """``value`` as ``--print-config`` writes it, with any credential redacted: a
    secret setting entirely, the user info of a URL (``redis://:PASSWORD@host``, an
    ``amqp://user:pass@`` spool), PEM key material wherever it appears."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, (list, tuple)):
        text = ",".join(str(item) for item in value)
    else:
        text = str(value)
    if is_secret(flag) and text and not (flag.endswith("-key") and os.path.isfile(text)):
        return "(redacted)"
    if "-----BEGIN" in text:
        return "(redacted: key material)"
    return _URL_CREDENTIALS.sub(r"\1(redacted)@", text)


LOG_LEVELS = ("debug", "info", "warn", "error", "critical")

SETTINGS: tuple[Setting, ...] = (
    # Listeners (original)
    Setting("plain", None, False, "SMTP_PLAIN_ENABLE", "Enable plain-text server (STARTTLS when a certificate is set)"),
    Setting("tls", None, False, "SMTP_TLS_ENABLE", "Enable implicit-TLS server (RFC 8314)"),
    Setting("http", None, False, "HTTP_ENABLE", "Enable HTTP server"),
    Setting("addr", str, "", "SMTP_ADDR", "SMTP server address (empty: all interfaces)"),
    Setting("port", parse_port, 25, "SMTP_PORT", "SMTP server port"),
    Setting("tls-port", parse_port, 465, "SMTP_TLS_PORT", "TLS port"),
    Setting("tls-cert", str, None, "SMTP_TLS_CERT", "TLS certificate (PEM, may include the chain)"),
    Setting("tls-key", str, None, "SMTP_TLS_KEY", "TLS key (PEM)"),
    Setting("tls-ca-cert", str, None, "SMTP_TLS_CA_CERT", "TLS CA certificate: verify optional client certificates"),
    # Server certificates and TLS settings (esmtpfa; docs/operations.md, "Certificates")
    Setting("tls-sni-certs", parse_sni_certs, None, "SMTP_TLS_SNI_CERTS", "More certificates for the SMTP listeners, chosen by the name the client asks for (SNI; exact, then wildcard, else --tls-cert): comma-separated CERT:KEY pairs and directories of NAME.crt (or .pem) with NAME.key; the same names with an RSA and an ECDSA key: the client's capabilities choose"),
    Setting("tls-poll-interval", parse_seconds, 5.0, "TLS_POLL_INTERVAL", "Seconds between checks of the certificate and key files (symlinks followed: a renewal or a Kubernetes Secret update) for changes; SIGHUP reloads at once"),
    Setting("tls-min-version", parse_min_version, "1.2", "TLS_MIN_VERSION", "Lowest TLS version the SMTP and HTTP listeners accept: 1.2 or 1.3"),
    Setting("tls-ciphers", parse_cipher_string, None, "TLS_CIPHERS", "OpenSSL cipher string for TLS 1.2 on the SMTP and HTTP listeners, e.g. ECDHE+AESGCM:ECDHE+CHACHA20 (default: Twisted's; TLS 1.3 suites are not affected)"),
    # Legacy listeners for old printers and scanners (esmtpfa; docs/devices.md)
    Setting("legacy-plain", parse_listen_address, None, "SMTP_LEGACY_PLAIN", "Listener for old devices, ADDR:PORT (e.g. 192.168.10.5:2525): STARTTLS with TLS 1.0 and up (cleartext only without --tls-cert), served only to --legacy-networks"),
    Setting("legacy-tls", parse_listen_address, None, "SMTP_LEGACY_TLS", "Implicit-TLS listener for old devices, ADDR:PORT: TLS 1.0 and up, served only to --legacy-networks; needs --tls-cert"),
    Setting("legacy-networks", parse_networks, None, "SMTP_LEGACY_NETWORKS", "Networks the legacy listeners serve, comma-separated (required with them); others hear 554 5.7.1"),
    Setting("legacy-cleartext-auth-networks", parse_networks, None, "SMTP_LEGACY_CLEARTEXT_AUTH_NETWORKS", "Networks whose clients may log in without TLS on the legacy listeners: private address space inside --legacy-networks (default: none)"),
    Setting("legacy-tls-ciphers", legacy_cipher_string, LEGACY_CIPHERS, "SMTP_LEGACY_TLS_CIPHERS", "OpenSSL cipher string of the legacy listeners, run at security level 0 (@SECLEVEL=0), which TLS 1.0 and 1.1 need"),
    # SMTP behaviour (original)
    Setting("allow-anonymous-auth", None, False, "SMTP_ALLOW_ANONYMOUS_AUTH", "Allow anonymous authentication (DANGEROUS: relays mail from anyone who can connect)"),
    Setting("allow-insecure-auth", None, False, "SMTP_ALLOW_INSECURE_AUTH", "Allow insecure authentication (AUTH without TLS)"),
    Setting("enable-binary-mime", None, False, "SMTP_ENABLE_BINARY_MIME", "Enable BINARYMIME"),
    Setting("enable-require-tls", None, False, "SMTP_ENABLE_REQUIRE_TLS", "Enable REQUIRETLS"),
    Setting("enable-smtp-utf8", None, False, "SMTP_ENABLE_SMTP_UTF8", "Enable SMTPUTF8"),
    # HTTP (original)
    Setting("http-port", parse_port, 8080, "HTTP_PORT", "HTTP server port"),
    Setting("http-tls-cert", str, None, "HTTP_TLS_CERT", "TLS certificate for HTTP server"),
    Setting("http-tls-key", str, None, "HTTP_TLS_KEY", "TLS key for HTTP server"),
    Setting("http-allow-anonymous", None, False, "HTTP_ALLOW_ANONYMOUS", "Allow anonymous access to HTTP server"),
    Setting("http-addr", str, "", "HTTP_ADDR", "HTTP server address (empty: all interfaces)"),
    # HTTP listeners' bounds (esmtpfa; docs/http-limits.md)
    Setting("http-max-connections", parse_positive_int, 200, "HTTP_MAX_CONNECTIONS", "Concurrent connections per HTTP listener (submission and metrics each); more are closed at once"),
    Setting("http-max-connections-per-ip", parse_positive_int, 20, "HTTP_MAX_CONNECTIONS_PER_IP", "Concurrent connections per client address per HTTP listener"),
    Setting("http-header-timeout", parse_seconds, 10.0, "HTTP_HEADER_TIMEOUT", "Seconds for a whole HTTP request head (TLS handshake included), however the client spreads its bytes"),
    Setting("http-body-timeout", parse_seconds, 30.0, "HTTP_BODY_TIMEOUT", "Seconds an HTTP request body may take beyond what --http-min-body-rate needs"),
    Setting("http-min-body-rate", parse_positive_int, 4096, "HTTP_MIN_BODY_RATE", "Octets per second an HTTP request body must average (after --http-body-timeout)"),
    Setting("http-idle-timeout", parse_seconds, 15.0, "HTTP_IDLE_TIMEOUT", "Seconds a kept-alive HTTP connection may stay idle between requests, and a client may leave an answer unread"),
    Setting("http-close-grace", parse_seconds, 5.0, "HTTP_CLOSE_GRACE", "Seconds a closing HTTP connection gets to flush its answer before it is aborted"),
    Setting("http-busy-timeout", parse_seconds, 2.0, "HTTP_BUSY_TIMEOUT", "Seconds a new HTTP connection gets for its TLS handshake and first request byte once its listener holds 3/4 of --http-max-connections (at most --http-header-timeout)"),
    # Providers, logs, metrics (original)
    Setting("config", str, "config.yaml", "PROVIDER_CONFIG", "Configuration file (YAML or JSON)"),
    Setting("config-svc", parse_http_url, None, "PROVIDER_CONFIG_SERVICE", "Configuration service URL (JSON or YAML; replaces --config)"),
    Setting("log-level", choice(*LOG_LEVELS), "info", "LOG_LEVEL", "Log level"),
    Setting("log-format", choice("text", "json"), "text", "LOG_FORMAT", "Log format: text, or json (one object per line, docs/logging.md)"),
    Setting("log-recipients", choice("plain", "hash", "omit"), "plain", "LOG_RECIPIENTS", "Recipients on the message line: plain (the addresses, as Postfix's to=<...>), hash (a keyed short hash of each, with --log-recipients-key; docs/logging.md says how to find one) or omit (only their number)"),
    Setting("log-recipients-key", str, None, "LOG_RECIPIENTS_KEY", "The key of --log-recipients hash (prefer the environment variable: flags show in ps)"),
    Setting("metrics-namespace", parse_namespace, "esmtpfa", "METRICS_NAMESPACE", "Metrics namespace"),
    Setting("metrics-port", parse_port, 9090, "METRICS_PORT", "Metrics port"),
    # Relay (original)
    Setting("relay-addr", str, None, "RELAY_ADDR", "Relay server address(es): host, host:port or [v6]:port, comma-separated, tried in order (none: deliver to the local Maildir)"),
    Setting("relay-port", parse_port, 25, "RELAY_PORT", "Relay server port"),
    Setting("relay-user", str, None, "RELAY_USER", "Relay server user"),
    Setting("relay-pass", str, None, "RELAY_PASS", "Relay server password"),
    Setting("relay-from", str, None, "RELAY_FROM", "Relay server from. If set, the client-provided value will be set to reply-to header"),
    Setting("relay-tls", None, False, "RELAY_TLS_ENABLE", "Enable TLS for Relay (implicit TLS)"),
    Setting("relay-tls-ca-cert", str, None, "RELAY_TLS_CA_CERT", "TLS CA certificate for Relay"),
    Setting("relay-tls-cert", str, None, "RELAY_TLS_CERT", "TLS certificate for Relay"),
    Setting("relay-tls-key", str, None, "RELAY_TLS_KEY", "TLS key for Relay"),
    Setting("relay-tls-skip-verify", None, False, "RELAY_TLS_SKIP_VERIFY", "Skip TLS verification for Relay"),
    # esmtpfa additions
    Setting("check-config", None, False, None, "Check the configuration (providers, TLS files, relay settings), print what was found and exit: 0 when sound"),
    Setting("check-connect", None, False, None, "Like --check-config, and also connect once to each relay server (EHLO, STARTTLS, AUTH) and each identity back end"),
    Setting("print-config", None, False, None, "Print every setting with its effective value and where it came from (default, flag, env VARIABLE, --demo), credentials redacted, and exit without starting (docs/operations.md, \"Seeing the effective configuration\")"),
    Setting("non-default", None, False, None, "With --print-config (also -n): only the settings given by a flag, the environment or --demo, like postconf -n"),
    Setting("demo", None, False, "ESMTPFA_DEMO", "Try-out mode: plain listener on 127.0.0.1:12525 with insecure auth, demo user 'demo'/'demo-password', Maildir upstream"),
    Setting("hostname", str, None, "SMTP_HOSTNAME", "Name in the greeting and Received header (default: this host's FQDN)"),
    Setting("maildir", str, "maildir", "MAILDIR", "Maildir used when no relay address is set"),
    Setting("max-message-size", parse_positive_int, 25 * 1024 * 1024, "SMTP_MAX_MESSAGE_SIZE", "Largest message accepted, in octets (advertised as SIZE)"),
    Setting("max-recipients", parse_positive_int, 100, "SMTP_MAX_RECIPIENTS", "Recipients per message"),
    Setting("max-line-length", parse_positive_int, 998, "SMTP_MAX_LINE_LENGTH", "Longest message line, octets without CRLF (RFC 5322: 998)"),
    Setting("bare-line-ends", choice("normalize", "reject"), "normalize", "SMTP_BARE_LINE_ENDS", "Bare CR/LF in DATA: rewrite to CRLF or refuse the message (never passed on)"),
    Setting("max-connections", parse_positive_int, 1000, "SMTP_MAX_CONNECTIONS", "Concurrent SMTP connections"),
    Setting("listen-backlog", parse_positive_int, 511, "LISTEN_BACKLOG", "Connections the kernel queues on each listening socket (SMTP, HTTP, metrics) until the relay accepts them, capped by net.core.somaxconn: a burst beyond it has its handshakes dropped and waits seconds for a retransmission (docs/smtp-limits.md)"),
    Setting("max-connections-per-ip", parse_positive_int, 50, "SMTP_MAX_CONNECTIONS_PER_IP", "Concurrent SMTP connections per client address"),
    Setting("max-auth-failures", parse_positive_int, 3, "SMTP_MAX_AUTH_FAILURES", "Failed AUTH attempts before the connection is closed"),
    Setting("max-auth-failures-per-ip", parse_positive_int, 30, "AUTH_MAX_FAILURES_PER_IP", "Failed logins (SMTP and HTTP) from one address within --auth-failure-window before its logins are refused (454 / HTTP 429) without asking a provider"),
    Setting("max-auth-failures-per-user", parse_positive_int, 10, "AUTH_MAX_FAILURES_PER_USER", "Failed logins for one identity (a provider and the user it is asked about) within --auth-failure-window, from any addresses, before its failed logins are answered late and refused from the addresses that failed; an address without failures is still asked (docs/login-throttle.md)"),
    Setting("auth-failure-window", parse_seconds, 600.0, "AUTH_FAILURE_WINDOW", "Seconds a failed login counts against an address and an identity"),
    Setting("rate-messages", parse_rate, None, "RATE_MESSAGES", "Messages one identity may send (accepted by the upstream) per window, e.g. 100/1h, for providers whose policy sets no rate (empty: unlimited)"),
    Setting("rate-recipients", parse_rate, None, "RATE_RECIPIENTS", "Recipients one identity may send to per window, e.g. 1000/1d, for providers whose policy sets no rate (empty: unlimited)"),
    Setting("auth-failure-max-delay", parse_seconds, 8.0, "AUTH_FAILURE_MAX_DELAY", "Longest wait, in seconds, before a failed login for an identity under attack is answered (the wait starts at 1 s and doubles)"),
    Setting("idle-timeout", parse_seconds, 300.0, "SMTP_IDLE_TIMEOUT", "Seconds a client may stay silent"),
    Setting("tls-handshake-timeout", parse_seconds, 30.0, "SMTP_TLS_HANDSHAKE_TIMEOUT", "Seconds an SMTP client may take to complete its TLS handshake (implicit TLS and after STARTTLS)"),
    Setting("close-grace", parse_seconds, 5.0, "SMTP_CLOSE_GRACE", "Seconds a closing SMTP connection may take to flush its last reply before it is aborted"),
    Setting("workers", parse_workers, 1, "SMTP_WORKERS", "Worker processes serving the same listeners, or 'auto' (one per CPU); with more than one, a supervisor keeps the limits, metrics, health and reloads of the relay as a whole (docs/workers.md)"),
    Setting("shutdown-grace", parse_seconds, 25.0, "SHUTDOWN_GRACE", "Seconds after SIGTERM that sessions inside a mail transaction get to finish it; then every connection left hears 421 and is closed"),
    Setting("command-timeout", parse_seconds, 60.0, "SMTP_COMMAND_TIMEOUT", "Seconds from the first byte of an SMTP command line to its end, however the client spreads its bytes; also where the DATA allowance starts"),
    Setting("min-data-rate", parse_positive_int, 500, "SMTP_MIN_DATA_RATE", "Octets per second SMTP message data (DATA, BDAT) must average beyond --command-timeout"),
    Setting("write-stall-timeout", parse_seconds, 30.0, "SMTP_WRITE_STALL_TIMEOUT", "Seconds an SMTP client may leave replies unread in a full send buffer before the connection is aborted"),
    Setting("client-send-buffer", parse_size, 16 * 1024, "CLIENT_SEND_BUFFER", "Kernel send buffer (SO_SNDBUF) of SMTP and HTTP submission client sockets, e.g. 16K; Linux reserves twice this (0: the kernel's own sizing, which grows to megabytes for a client that does not read)"),
    Setting("received-hide-client", None, False, "SMTP_RECEIVED_HIDE_CLIENT", "Leave the client's IP address out of the Received header"),
    Setting("proxy-protocol", None, False, "SMTP_PROXY_PROTOCOL", "Every SMTP connection starts with a PROXY protocol header (v1 or v2) naming the client; needs --proxy-protocol-trusted (docs/smtp-limits.md)"),
    Setting("proxy-protocol-trusted", parse_networks, None, "SMTP_PROXY_PROTOCOL_TRUSTED", "Networks of the proxies allowed to send a PROXY header, comma-separated, e.g. 10.0.0.0/8,192.168.1.7; connections from elsewhere are closed"),
    Setting("relay-config", str, None, "RELAY_CONFIG", "YAML/JSON file listing the relay servers in order, each with its own address, TLS and credentials (read at startup; the --relay-* flags are the defaults; replaces --relay-addr)"),
    Setting("relay-starttls", choice("opportunistic", "required", "none"), "opportunistic", "RELAY_STARTTLS", "STARTTLS toward the relay"),
    Setting("relay-tls-server-name", str, None, "RELAY_TLS_SERVER_NAME", "Name expected in the relay's certificate (default: --relay-addr)"),
    Setting("relay-allow-insecure-auth", None, False, "RELAY_ALLOW_INSECURE_AUTH", "Allow AUTH toward the relay without TLS"),
    Setting("relay-timeout", parse_seconds, 300.0, "RELAY_TIMEOUT", "Seconds to wait for each relay reply"),
    Setting("relay-connect-timeout", parse_seconds, 30.0, "RELAY_CONNECT_TIMEOUT", "Seconds to wait for the relay's TCP/TLS connection"),
    Setting("relay-data-timeout", parse_seconds, 600.0, "RELAY_DATA_TIMEOUT", "Seconds to wait for the relay's reply to the end of a message (RFC 5321: 10 minutes)"),
    Setting("relay-auth-mech", choice("scram-sha-256", "scram-sha-1", "cram-md5", "plain", "login", "oauthbearer", "xoauth2"), None, "RELAY_AUTH_MECH", "SASL mechanism toward the relay (default: the strongest it offers, SCRAM-SHA-256 > SCRAM-SHA-1 > CRAM-MD5 > PLAIN > LOGIN; with --relay-oauth2-*: OAUTHBEARER > XOAUTH2)"),
    Setting("relay-oauth2-token-url", str, None, "RELAY_OAUTH2_TOKEN_URL", "OAuth2 token endpoint: log in to the relay with an access token (XOAUTH2/OAUTHBEARER) for --relay-user instead of --relay-pass (docs/oauth2.md)"),
    Setting("relay-oauth2-client-id", str, None, "RELAY_OAUTH2_CLIENT_ID", "OAuth2 client (application) id"),
    Setting("relay-oauth2-client-secret", str, None, "RELAY_OAUTH2_CLIENT_SECRET", "OAuth2 client secret (prefer the environment variable: flags show in ps)"),
    Setting("relay-oauth2-private-key", str, None, "RELAY_OAUTH2_PRIVATE_KEY", "PEM private key (RSA or P-256) signing the private_key_jwt client assertion, instead of a client secret"),
    Setting("relay-oauth2-certificate", str, None, "RELAY_OAUTH2_CERTIFICATE", "PEM certificate of --relay-oauth2-private-key: its thumbprint names the key (x5t, what Entra ID needs)"),
    Setting("relay-oauth2-auth-method", choice("client_secret_basic", "client_secret_post", "private_key_jwt"), None, "RELAY_OAUTH2_AUTH_METHOD", "How the client authenticates to the token endpoint (default: private_key_jwt with a key, else client_secret_basic)"),
    Setting("relay-oauth2-scope", str, None, "RELAY_OAUTH2_SCOPE", "Scope asked for, e.g. https://outlook.office365.com/.default or https://mail.google.com/"),
    Setting("relay-oauth2-refresh-token", str, None, "RELAY_OAUTH2_REFRESH_TOKEN", "Refresh token: use the refresh-token grant (Gmail) instead of client credentials; a rotated one is kept in memory (prefer the environment variable)"),
    Setting("relay-pool-size", parse_positive_int, 20, "RELAY_POOL_SIZE", "Connections kept per relay server (busy and idle)"),
    Setting("relay-pool-idle-timeout", parse_seconds, 30.0, "RELAY_POOL_IDLE_TIMEOUT", "Seconds an unused relay connection stays open"),
    Setting("relay-breaker-failures", parse_positive_int, 3, "RELAY_BREAKER_FAILURES", "Consecutive connection failures after which a relay server is skipped"),
    Setting("relay-breaker-cooldown", parse_seconds, 30.0, "RELAY_BREAKER_COOLDOWN", "Seconds a failing relay server is skipped before it is tried again"),
    Setting("relay-rcpt-deadline", parse_seconds, 240.0, "RELAY_RCPT_DEADLINE", "Seconds within which every RCPT is answered, across all upstreams, connections and replays (RFC 5321 gives clients 5 minutes)"),
    Setting("relay-data-deadline", parse_seconds, 540.0, "RELAY_DATA_DEADLINE", "Seconds within which the end of a message is answered, across all upstreams and replays (RFC 5321 gives clients 10 minutes); past it the client hears 451"),
    Setting("relay-pool-client-share", parse_share, 0.5, "RELAY_POOL_CLIENT_SHARE", "Part of each relay server's connections (0 to 1) one client address or one identity may hold at once"),
    Setting("metrics-addr", str, "127.0.0.1", "METRICS_ADDR", "Metrics and health address: loopback by default, as /metrics has no authentication (0.0.0.0 or :: for every interface, e.g. for a Prometheus that scrapes the pod IP)"),
    Setting("metrics-address-labels", parse_count, 0, "METRICS_ADDRESS_LABELS", "Opt-in for the original's address-labelled series (bytes_sent_from_address_total, bytes_sent_to_address_total, mail_from_to): this many distinct senders (and recipients) get a series each, later ones count as 'other'; 0 (default): those series are not served, as addresses are private and unbounded"),
    Setting("config-poll-interval", parse_seconds, 2.0, "PROVIDER_CONFIG_POLL_INTERVAL", "Seconds between checks of --config for changes (SIGHUP reloads at once)"),
    Setting("config-svc-interval", parse_seconds, 30.0, "PROVIDER_CONFIG_SERVICE_INTERVAL", "Seconds between polls of --config-svc"),
    Setting("config-svc-timeout", parse_seconds, 10.0, "PROVIDER_CONFIG_SERVICE_TIMEOUT", "Seconds a --config-svc poll may take, body included"),
    Setting("config-svc-token", str, None, "PROVIDER_CONFIG_SERVICE_TOKEN", "Bearer token sent to --config-svc (prefer the environment variable: flags show in ps)"),
    Setting("state-url", parse_state_url, None, "STATE_URL", "Redis that keeps the login throttle's and the sending rates' counts for every relay using it, e.g. redis://:PASSWORD@redis:6379/0 or rediss://... (none: each relay counts alone; prefer the environment variable: flags show in ps; docs/shared-state.md)"),
    Setting("state-timeout", parse_seconds, 0.5, "STATE_TIMEOUT", "Seconds one request to --state-url may take, connecting included, before --state-failure applies"),
    Setting("state-failure", choice("open", "closed"), "open", "STATE_FAILURE", "When the shared state (--state-url, or the supervisor of --workers) cannot answer: open (this process's own counts decide, mail flows) or closed (answer a temporary 4xx); logged and counted either way"),
    # The durable spool (docs/spool.md)
    Setting("delivery-mode", choice("passthrough", "fallback", "spool"), "passthrough", "DELIVERY_MODE", "What the client's 250 means: passthrough (the upstream accepted the message), fallback (as passthrough, but a message the upstream cannot take before the final dot is spooled and retried), spool (durably stored, delivered in the background); per provider in its policy"),
    Setting("spool-url", parse_spool_url, "file:///var/lib/esmtpfa/spool", "SPOOL_URL", "Where the spool keeps messages: file:///path (this host; every worker shares it) or amqp[s]://user:pass@host/vhost (RabbitMQ quorum queues, for replicas; prefer the environment variable: flags show in ps)"),
    Setting("spool-undeliverable", choice("bounce", "hold"), "bounce", "SPOOL_UNDELIVERABLE", "A spooled message refused permanently or past --spool-lifetime: bounce (an RFC 3464 report to the sender; never for the null sender) or hold (kept for an operator: esmtpfa-queue)"),
    Setting("spool-max-size", parse_size, 5 << 30, "SPOOL_MAX_SIZE", "Octets the spool may hold (e.g. 5G); past it new messages hear 452 4.3.1"),
    Setting("spool-min-free", parse_size, 1 << 30, "SPOOL_MIN_FREE", "Free disk space the file spool always leaves (e.g. 1G); below it new messages hear 452 4.3.1"),
    Setting("spool-retry-min", parse_duration, 300.0, "SPOOL_RETRY_MIN", "First retry of a deferred spooled message (then doubling, Postfix's minimal_backoff_time)"),
    Setting("spool-retry-max", parse_duration, 4000.0, "SPOOL_RETRY_MAX", "Longest wait between retries (Postfix's maximal_backoff_time)"),
    Setting("spool-lifetime", parse_duration, 5 * 86400.0, "SPOOL_LIFETIME", "How long a spooled message is retried before it is bounced or held (e.g. 5d; Postfix's maximal_queue_lifetime)"),
    Setting("spool-concurrency", parse_positive_int, 40, "SPOOL_CONCURRENCY", "Spooled messages each process delivers at once (one identity gets at most half of them while others have mail waiting); twice the default pool size, because an attempt records its start before it asks for a connection; beyond the client share they use only the relay connections no live client wants"),
)

DEMO_PORT = 12525


def versions() -> str:
    """esmtpfa's version from the installed package's metadata (the source tree's
    ``__version__`` when it is not installed), then Twisted's."""
    from importlib import metadata

    import twisted
    try:
        mine = metadata.version("esmtpfa")
    except metadata.PackageNotFoundError:
        from esmtpfa import __version__ as mine
    return f"esmtpfa {mine}\nTwisted {twisted.__version__}"


def _plain_error(error: ValueError) -> str:
    """Python's own conversion messages in an operator's words."""
    text = str(error)
    if text.startswith("invalid literal for int()"):
        return f"expected a whole number, got {text.rpartition(': ')[2]}"
    if text.startswith("could not convert string to float"):
        return f"expected a number, got {text.rpartition(': ')[2]}"
    return text


def _flag_help(setting: Setting) -> str:
    env = f" [env {setting.env}]" if setting.env else ""
    return setting.help + env


class OptionsProblems(usage.UsageError):
    """Every setting whose value did not parse, one line each naming it.  Startup says
    the first (one line, no ``--help``: ``esmtpfa.runtime.tap``); ``--check-config`` lists all."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        more = len(self.problems) - 1
        super().__init__(self.problems[0] + (
            f" (and {more} more: --check-config lists them)" if more else ""))


class Options(usage.Options):
    """``twistd esmtpfa`` options.  Parsing ends with ``self.settings``, the typed and
    frozen ``Settings`` every other module reads (``esmtpfa.runtime.settings``); the
    values by flag name (``self[name]``) and their sources (``self.sources``) are this
    module's working state."""

    synopsis = "[options]"
    longdesc = ("esmtpfa: an authenticating SMTP submission relay. Environment variables "
                "override flags (a startup warning names each). Nothing listens unless "
                "--plain, --tls or --http is given (or --demo). --print-config shows what "
                "is in effect.")
    optFlags = [[s.flag, None, _flag_help(s)] for s in SETTINGS if s.parse is None]
    optParameters = [[s.flag, None, None, _flag_help(s) + (
        f" (default {s.default!r})" if s.default not in (None, "") else "")]
        for s in SETTINGS if s.parse is not None]

    def __init__(self, environ: Mapping[str, str] | None = None):
        super().__init__()
        self.environ = os.environ if environ is None else environ
        self.sources: dict[str, Source] = {}
        self.invalid: set[str] = set()  # settings whose value did not parse
        #: One line per environment variable that overrode a flag given on the command
        #: line with another value: logged at startup, shown by --check-config.
        self.overrides: list[str] = []
        #: Every value that did not parse or did not fit, one line each (empty when
        #: sound): ``--check-config`` reports them.
        self.problems: list[str] = []
        #: The typed, frozen settings, built when the options are parsed; nothing
        #: outside this module reads ``self[name]`` (docs/config-loading.md, "The
        #: settings object").
        self.settings: Settings | None = None
        #: What startup loads while parsing, so that a bad file is a one-line error:
        #: the provider set and the certificate stores (``esmtpfa.runtime.tap``).
        self.preloaded: Any = None

    def opt_version(self) -> None:
        """Print esmtpfa's version (and Twisted's) and exit."""
        print(versions())
        sys.exit(0)

    def opt_n(self) -> None:
        """Same as --non-default."""
        self["non-default"] = 1

    def parseOptions(self, options=None) -> None:
        """Remembers the arguments as given: a supervisor starts its workers with them
        (``esmtpfa.runtime.workers``), so each parses exactly what the operator wrote."""
        self.arguments = list(sys.argv[1:] if options is None else options)
        super().parseOptions(options)

    def postOptions(self) -> None:
        problems = []
        for setting in SETTINGS:
            try:
                self[setting.flag] = self._resolve(setting)
            except ValueError as error:
                # Every other setting still resolves, so --check-config can name each
                # bad one and check the rest with values of the right type.
                problems.append(str(error))
                self.invalid.add(setting.flag)
                self[setting.flag] = setting.default
        try:
            if problems:
                raise OptionsProblems(problems)
            if self["demo"]:
                self._apply_demo()
            self._validate()
        except usage.UsageError as error:
            self.problems = list(getattr(error, "problems", [str(error)]))
            raise
        finally:
            # Built even when a value was refused (its default stands in, a relay left
            # unresolved is None): --check-config checks the rest, --print-config
            # shows every row.
            self.settings = self._settings()

    def _resolve(self, setting: Setting) -> Any:
        """The setting's value, its ``Source`` recorded; a value that does not parse is
        a ``ValueError`` naming the flag or variable (never quoting a secret: the
        parsers of secret settings accept any text)."""
        flag = f"--{setting.flag}"
        given = self.get(setting.flag)  # the flag's text, a boolean flag's 0/1, or None
        on_command_line = bool(given) if setting.parse is None else given is not None
        raw_env = self.environ.get(setting.env) if setting.env else None
        if raw_env:  # an empty variable counts as unset, as in the original
            self.sources[setting.flag] = Source("environment", setting.env or "")
            value = self._parse(setting, raw_env, f"environment variable {setting.env} "
                                                  f"({flag})")
            overrides = ""
            if on_command_line and self._differs(setting, given, value):
                overrides = flag
                self.overrides.append(self._override_line(setting, given, value))
            self.sources[setting.flag] = Source("environment", setting.env or "", overrides)
            return value
        if not on_command_line:
            self.sources[setting.flag] = DEFAULT
            return setting.default
        self.sources[setting.flag] = Source("flag", flag)
        if setting.parse is None:
            return True
        assert given is not None  # on_command_line, for a flag that takes a value
        return self._parse(setting, given, flag)

    @staticmethod
    def _parse(setting: Setting, raw: str, where: str) -> Any:
        try:
            return parse_bool(raw) if setting.parse is None else setting.parse(raw)
        except ValueError as error:
            raise ValueError(f"{where}: {_plain_error(error)}") from None

    @staticmethod
    def _differs(setting: Setting, given: Any, value: Any) -> bool:
        if setting.parse is None:
            return value is not True
        try:
            return setting.parse(given) != value
        except ValueError:
            return True

    @staticmethod
    def _override_line(setting: Setting, given: Any, value: Any) -> str:
        flag = f"--{setting.flag}"
        if setting.parse is None or is_secret(setting.flag):
            return (f"environment variable {setting.env} overrides {flag} given on the "
                    f"command line (the environment wins: docs/config-loading.md)")
        return (f"environment variable {setting.env}={shown(setting.flag, value)} "
                f"overrides {flag} {shown(setting.flag, given)} given on the command line "
                f"(the environment wins: docs/config-loading.md)")

    def _apply_demo(self) -> None:
        demo = Source("demo", "--demo")

        def set_(flag: str, value: Any) -> None:
            self[flag] = value
            self.sources[flag] = demo
        set_("plain", True)
        set_("allow-insecure-auth", True)
        if self.get("addr") in (None, ""):
            set_("addr", "127.0.0.1")
        if self.defaulted("port"):
            set_("port", DEMO_PORT)
        for flag in ("http-addr", "metrics-addr"):  # loopback only, like the SMTP listener
            if self[flag] == "":
                set_(flag, "127.0.0.1")

    def effective(self, non_default: bool = False) -> list[str]:
        """``name = value  # source`` for every setting, sorted by name, credentials
        redacted (``shown``); with ``non_default`` only those set explicitly (a flag,
        the environment, ``--demo``), even to the default value, as ``postconf -n``
        shows what main.cf sets."""
        if self.settings is None:
            self.settings = self._settings()
        return self.settings.effective(non_default)

    def uses_spool(self) -> bool:
        """Whether the relay opens a spool: a spooling ``--delivery-mode``, or an
        explicit ``--spool-url`` for providers whose policy chooses one (docs/spool.md)."""
        return self["delivery-mode"] != "passthrough" or not self.defaulted("spool-url")

    def defaulted(self, flag: str) -> bool:
        setting = next(s for s in SETTINGS if s.flag == flag)
        return self[flag] == setting.default

    def _settings(self) -> Settings:
        """The typed settings (``esmtpfa.runtime.settings``): the only place that reads
        the table's values by flag name."""
        import socket

        from esmtpfa.auth.sendingrates import Rates
        from esmtpfa.limits.settings import StateSettings, ThrottleSettings
        from esmtpfa.relay.settings import PoolSettings
        from esmtpfa.runtime import settings as typed
        from esmtpfa.smtp.settings import ServerSettings
        from esmtpfa.spool.backends import SpoolSettings
        from esmtpfa.spool.runner import RetryPolicy
        from esmtpfa.web.bounds import HTTPLimits
        server = ServerSettings(
            hostname=self["hostname"] or socket.getfqdn(),
            max_message_size=self["max-message-size"],
            max_recipients=self["max-recipients"],
            max_line_length=self["max-line-length"],
            max_auth_failures=self["max-auth-failures"],
            idle_timeout=self["idle-timeout"],
            tls_handshake_timeout=self["tls-handshake-timeout"],
            close_grace=self["close-grace"],
            command_timeout=self["command-timeout"],
            min_data_rate=self["min-data-rate"],
            write_stall_timeout=self["write-stall-timeout"],
            send_buffer=self["client-send-buffer"],
            allow_insecure_auth=self["allow-insecure-auth"],
            allow_anonymous=self["allow-anonymous-auth"],
            smtputf8=self["enable-smtp-utf8"],
            binarymime=self["enable-binary-mime"],
            requiretls=self["enable-require-tls"],
            bare_line_ends=self["bare-line-ends"],
            max_connections=self["max-connections"],
            max_connections_per_ip=self["max-connections-per-ip"],
            hide_client_in_received=self["received-hide-client"])
        tls_policy = dict(min_version=self["tls-min-version"], ciphers=self["tls-ciphers"],
                          poll_interval=self["tls-poll-interval"])
        smtp = typed.SMTPSettings(
            plain=self["plain"], tls_enabled=self["tls"], addr=self["addr"],
            port=self["port"], tls_port=self["tls-port"], hostname=self["hostname"],
            server=server,
            tls=typed.TLSSettings(cert=self["tls-cert"], key=self["tls-key"],
                                  ca_cert=self["tls-ca-cert"],
                                  sni_certs=self["tls-sni-certs"], **tls_policy),
            proxy_protocol=self["proxy-protocol"],
            proxy_trusted=self["proxy-protocol-trusted"], legacy=self._legacy())
        http = typed.HTTPSettings(
            enabled=self["http"], addr=self["http-addr"], port=self["http-port"],
            tls=typed.TLSSettings(cert=self["http-tls-cert"], key=self["http-tls-key"],
                                  **tls_policy),
            allow_anonymous=self["http-allow-anonymous"],
            limits=HTTPLimits(
                max_connections=self["http-max-connections"],
                max_connections_per_ip=self["http-max-connections-per-ip"],
                header_timeout=self["http-header-timeout"],
                body_timeout=self["http-body-timeout"],
                min_body_rate=float(self["http-min-body-rate"]),
                idle_timeout=self["http-idle-timeout"],
                close_grace=self["http-close-grace"],
                busy_timeout=self["http-busy-timeout"]))
        upstreams = self.get("relay-upstreams")  # set by _validate, from the --relay-* rows
        relay = typed.RelaySettings(
            upstreams=None if upstreams is None else tuple(upstreams),
            defaults=dict(
                implicit_tls=self["relay-tls"], starttls=self["relay-starttls"],
                ca_cert=self["relay-tls-ca-cert"],
                client_cert=self["relay-tls-cert"], client_key=self["relay-tls-key"],
                skip_verify=self["relay-tls-skip-verify"],
                server_name=self["relay-tls-server-name"],
                username=self["relay-user"], password=self["relay-pass"],
                auth_mechanism=self["relay-auth-mech"],
                allow_insecure_auth=self["relay-allow-insecure-auth"],
                connect_timeout=self["relay-connect-timeout"],
                command_timeout=self["relay-timeout"],
                data_timeout=self["relay-data-timeout"]),
            pool=PoolSettings(
                size=self["relay-pool-size"],
                idle_timeout=self["relay-pool-idle-timeout"],
                breaker_failures=self["relay-breaker-failures"],
                breaker_cooldown=self["relay-breaker-cooldown"],
                rcpt_deadline=self["relay-rcpt-deadline"],
                data_deadline=self["relay-data-deadline"],
                client_share=self["relay-pool-client-share"]),
            maildir=self["maildir"], relay_from=self["relay-from"],
            config_file=self["relay-config"])
        delivery = typed.DeliverySettings(
            mode=self["delivery-mode"], undeliverable=self["spool-undeliverable"],
            spool=SpoolSettings(self["spool-url"], self["spool-max-size"],
                                self["spool-min-free"], prefetch=self["spool-concurrency"]),
            retry=RetryPolicy(self["spool-retry-min"], self["spool-retry-max"],
                              self["spool-lifetime"]),
            concurrency=self["spool-concurrency"],
            spool_url_given=not self.defaulted("spool-url"))
        return typed.Settings(
            smtp=smtp, http=http,
            metrics=typed.MetricsSettings(
                addr=self["metrics-addr"], port=self["metrics-port"],
                namespace=self["metrics-namespace"],
                address_labels=self["metrics-address-labels"]),
            relay=relay,
            throttle=ThrottleSettings(
                per_address=self["max-auth-failures-per-ip"],
                per_identity=self["max-auth-failures-per-user"],
                window=self["auth-failure-window"],
                max_delay=self["auth-failure-max-delay"]),
            rates=Rates(self["rate-messages"], self["rate-recipients"]),
            state=StateSettings(url=self["state-url"] or None,
                                timeout=self["state-timeout"],
                                failure=self["state-failure"]),
            delivery=delivery,
            providers=typed.ProviderSettings(
                config=self["config"], config_given=not self.defaulted("config"),
                service_url=self["config-svc"],
                poll_interval=self["config-poll-interval"],
                service_interval=self["config-svc-interval"],
                service_timeout=self["config-svc-timeout"],
                service_token=self["config-svc-token"], demo=bool(self["demo"])),
            logging=typed.LoggingSettings(
                level=self["log-level"], format=self["log-format"],
                recipients=self["log-recipients"],
                recipients_key=self["log-recipients-key"]),
            process=typed.ProcessSettings(
                workers=self["workers"], listen_backlog=self["listen-backlog"],
                shutdown_grace=self["shutdown-grace"]),
            actions=typed.Actions(
                check_config=bool(self["check-config"] or self["check-connect"]),
                check_connect=bool(self["check-connect"]),
                print_config=bool(self["print-config"]),
                non_default=bool(self["non-default"])),
            demo=bool(self["demo"]),
            table={flag: typed.Sourced(
                "(invalid)" if flag in self.invalid else shown(flag, self.get(flag)),
                self.sources.get(flag, DEFAULT))
                for flag in (s.flag for s in SETTINGS if s.flag not in ACTIONS)})

    def _upstreams(self) -> list:
        """Where messages go (``UpstreamEntry`` list; empty: the local Maildir)."""
        from esmtpfa.common.errors import ConfigError
        from esmtpfa.relay.config import UpstreamEntry, load_relay_file
        from esmtpfa.relay.settings import parse_upstream_addresses
        if self["relay-config"]:
            if self["relay-addr"]:
                raise usage.UsageError("--relay-addr and --relay-config both list relay "
                                       "servers: use one of them")
            try:
                entries = load_relay_file(self["relay-config"], self.environ,
                                          self["relay-port"])
            except ConfigError as error:
                raise usage.UsageError(f"--relay-config: {error}") from None
            # The --relay-oauth2-* flags are the default of the entries that name no
            # credentials of their own (neither 'oauth2' nor 'pass').
            return [UpstreamEntry(entry.host, entry.port,
                                  {**self._oauth2_overrides(), **entry.overrides})
                    if "oauth2" not in entry.overrides and "password" not in entry.overrides
                    else entry for entry in entries]
        if not self["relay-addr"]:
            return []
        try:
            return [UpstreamEntry(host, port, self._oauth2_overrides()) for host, port in
                    parse_upstream_addresses(self["relay-addr"], self["relay-port"])]
        except ValueError as error:
            raise usage.UsageError(f"--relay-addr: {error}") from None

    def _legacy(self) -> LegacyProfile:
        """The ``--legacy-*`` settings (docs/devices.md)."""
        return LegacyProfile(
            plain=self["legacy-plain"], tls=self["legacy-tls"],
            networks=self["legacy-networks"] or (),
            cleartext_auth=self["legacy-cleartext-auth-networks"] or (),
            ciphers=self["legacy-tls-ciphers"])

    def _oauth2_overrides(self) -> dict:
        """``{"oauth2": OAuth2Settings}`` from the ``--relay-oauth2-*`` flags, or {}."""
        return {"oauth2": self["relay-oauth2"]} if self["relay-oauth2"] else {}

    def _oauth2_settings(self):
        """The ``--relay-oauth2-*`` flags as ``OAuth2Settings`` (None when unset)."""
        names = ("token-url", "client-id", "client-secret", "private-key", "certificate",
                 "auth-method", "scope", "refresh-token")
        given = {name: self[f"relay-oauth2-{name}"] for name in names
                 if self[f"relay-oauth2-{name}"]}
        if not given:
            return None
        for name in ("token-url", "client-id"):
            if name not in given:
                raise usage.UsageError(f"--relay-oauth2-{name} is required with the other "
                                       "--relay-oauth2-* settings")
        for name in ("private-key", "certificate"):
            if name in given and not os.path.isfile(given[name]):
                raise usage.UsageError(f"--relay-oauth2-{name}: no such file: {given[name]}")
        if self["relay-pass"]:
            raise usage.UsageError("--relay-oauth2-* replaces --relay-pass: give one or the "
                                   "other")
        from esmtpfa.relay.oauth2 import OAuth2Settings
        try:
            return OAuth2Settings(**{name.replace("-", "_"): value
                                     for name, value in given.items()})
        except ValueError as error:  # names settings, never values
            raise usage.UsageError(f"--relay-oauth2-*: {error}") from None

    def _validate(self) -> None:
        if self["log-recipients"] == "hash" and not self["log-recipients-key"]:
            raise usage.UsageError("--log-recipients hash needs --log-recipients-key "
                                   "(LOG_RECIPIENTS_KEY): the hash is keyed")
        for prefix, what in (("tls", "SMTP TLS"), ("http-tls", "HTTP TLS"),
                             ("relay-tls", "relay client TLS")):
            cert, key = self[prefix + "-cert"], self[prefix + "-key"]
            if bool(cert) != bool(key):
                raise usage.UsageError(
                    f"{what}: --{prefix}-cert and --{prefix}-key go together")
        if self["tls"] and not self["tls-cert"]:
            raise usage.UsageError("--tls needs --tls-cert and --tls-key")
        self["relay-oauth2"] = self._oauth2_settings()
        if self["relay-oauth2"] is not None:
            if not self["relay-user"]:
                raise usage.UsageError("--relay-oauth2-* needs --relay-user: the mailbox "
                                       "the token is for")
        elif bool(self["relay-user"]) != bool(self["relay-pass"]):
            raise usage.UsageError("--relay-user and --relay-pass go together")
        problem = self._legacy().problem(certificate=bool(self["tls-cert"]))
        if problem:
            raise usage.UsageError(problem)
        if self["proxy-protocol"] and not self["proxy-protocol-trusted"]:
            raise usage.UsageError("--proxy-protocol needs --proxy-protocol-trusted: the "
                                   "networks of the proxies allowed to name clients")
        if self["spool-retry-min"] > self["spool-retry-max"]:
            raise usage.UsageError("--spool-retry-min must not exceed --spool-retry-max")
        if self.uses_spool():
            from esmtpfa.spool.backends import check_file_spool
            problem = check_file_spool(self["spool-url"])
            if problem:
                raise usage.UsageError(f"--spool-url: {problem}")
        self["relay-upstreams"] = self._upstreams()
        for flag in ("tls-cert", "tls-key", "tls-ca-cert", "http-tls-cert", "http-tls-key",
                     "relay-tls-ca-cert", "relay-tls-cert", "relay-tls-key"):
            path = self[flag]
            if path and not os.path.isfile(path):
                raise usage.UsageError(f"--{flag}: no such file: {path}")
