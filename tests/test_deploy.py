"""What an operator deploys: deploy/ (Kubernetes), .env-sample, the Dockerfile.

The README's recipe is ``cp .env-sample .env; kubectl create secret generic esmtpfa
--from-env-file=.env; kubectl apply -f deploy/``.  There is no cluster and no container
registry here, so each step is checked with what it depends on:

* the manifests parse, validate against the Kubernetes API schema (pinned below, strict:
  an unknown field is an error, as ``kubectl apply`` makes it) and pass yamllint;
* the objects agree with each other and with the program (ports, paths, labels, the
  drain deadline), and ``.env-sample`` names exactly the variables esmtpfa reads, in a
  form ``kubectl --from-env-file`` accepts;
* the relay started with ``.env-sample``'s environment, the Deployment's ``env`` and the
  ConfigMap laid out as kubelet lays it out accepts a login, and an edit of the
  ConfigMap (kubelet's ``..data`` symlink swap) reaches it without a restart;
* the Dockerfile passes hadolint, and its builder steps, run in a fresh virtualenv,
  give a ``twistd esmtpfa`` that works outside the source tree.

The linters are Python packages (tox.ini ``deps``); a missing one fails, never skips.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import shutil
import smtplib
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import yaml
from twisted.internet import defer, threads
from twisted.trial import unittest

from esmtpfa.config.providers import parse_provider_document
from esmtpfa.runtime.options import SETTINGS, Options
from tests.support.certs import CertificateAuthority
from tests.support.httpservers import until
from tests.support.ports import free_port
from tests.support.processes import PROJECT, Twistd

#: The Kubernetes release the manifests are checked against (kubernetes-validate bundles
#: its schema, so no network is needed).  Raise it when kubernetes-validate gains a newer
#: one and the manifests still pass.
KUBERNETES_VERSION = "1.37.0"

DEPLOY = os.path.join(PROJECT, "deploy")
ENV_SAMPLE = os.path.join(PROJECT, ".env-sample")
DOCKERFILE = os.path.join(PROJECT, "Dockerfile")
DOCKERIGNORE = os.path.join(PROJECT, ".dockerignore")

#: The objects deploy/ must define (kind, name).
EXPECTED_OBJECTS = {
    ("Deployment", "esmtpfa"), ("Service", "esmtpfa"),
    ("HorizontalPodAutoscaler", "esmtpfa"), ("PodDisruptionBudget", "esmtpfa"),
    ("NetworkPolicy", "esmtpfa"), ("ConfigMap", "esmtpfa-providers"),
}

#: The Service's ports and the esmtpfa setting each one reaches.
SERVICE_PORTS = {25: "SMTP_PORT", 587: "SMTP_PORT", 465: "SMTP_TLS_PORT",
                 8080: "HTTP_PORT", 9090: "METRICS_PORT"}

#: Modules allowed to read the process environment, and why: the settings table, and
#: the ``${NAME}`` expansion of the providers document and the relay file (whose names
#: the operator chooses; .env-sample lists those the shipped ConfigMap uses).
ENVIRONMENT_READERS = {"esmtpfa/runtime/options.py", "esmtpfa/config/providers.py",
                       "esmtpfa/relay/config.py", "esmtpfa/spool/tool.py",
                       # passes its environment on to the workers it starts, with the
                       # directory of their counts added; reads no setting from it
                       "esmtpfa/runtime/workers/supervisor.py"}

#: kubectl's rule for a key of --from-env-file (an environment variable name).
ENV_NAME = re.compile(r"[-._a-zA-Z][-._a-zA-Z0-9]*\Z")
REFERENCE = re.compile(r"\$\{([^}]*)\}")


# -- reading what ships ----------------------------------------------------------------

def manifest_files() -> list[str]:
    """The files ``kubectl apply -f deploy/`` reads (it does not descend)."""
    return sorted(os.path.join(DEPLOY, name) for name in os.listdir(DEPLOY)
                  if os.path.isfile(os.path.join(DEPLOY, name)))


def objects() -> list[dict[str, Any]]:
    found = []
    for path in manifest_files():
        with open(path, encoding="utf-8") as file:
            found += [doc for doc in yaml.safe_load_all(file) if doc is not None]
    return found


def the(kind: str) -> dict[str, Any]:
    matches = [obj for obj in objects() if obj["kind"] == kind]
    assert len(matches) == 1, f"expected one {kind} in deploy/, found {len(matches)}"
    return matches[0]


def container() -> dict[str, Any]:
    containers = the("Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, "one container expected"
    return containers[0]


def container_env() -> dict[str, str]:
    return {item["name"]: item["value"] for item in container().get("env", [])}


def env_file(path: str = ENV_SAMPLE) -> list[tuple[str, str]]:
    """``NAME=value`` pairs as ``kubectl create secret --from-env-file`` reads them.

    kubectl takes every character after the first ``=`` (quotes included), skips blank
    lines and lines starting with ``#``, and refuses a key that is not a variable name;
    a line without ``=`` would copy the variable from the shell running kubectl.
    """
    pairs = []
    with open(path, encoding="utf-8") as file:
        for number, raw in enumerate(file, 1):
            line = raw.rstrip("\n").lstrip()
            if not line or line.startswith("#"):
                continue
            assert "=" in line, f"{path}:{number}: no '=': kubectl would read the shell's value"
            name, value = line.split("=", 1)
            assert ENV_NAME.match(name), f"{path}:{number}: {name!r} is not a variable name"
            assert value == value.strip(), f"{path}:{number}: blanks around {name}'s value"
            assert not value.startswith(("'", '"')), (
                f"{path}:{number}: quotes would be part of {name}'s value")
            pairs.append((name, value))
    return pairs


def providers_document() -> tuple[str, str]:
    """(the ConfigMap's key, the providers document it holds)."""
    data = the("ConfigMap")["data"]
    assert len(data) == 1, "the providers ConfigMap holds one document"
    return next(iter(data.items()))


def program_variables() -> set[str]:
    """Every variable esmtpfa reads with deploy/ as shipped."""
    settings = {setting.env for setting in SETTINGS if setting.env}
    return settings | set(REFERENCE.findall(providers_document()[1]))


def shutdown_grace() -> float:
    """The drain deadline: ``--shutdown-grace`` once it exists (25 s)."""
    return next((s.default for s in SETTINGS if s.flag == "shutdown-grace"), 25.0)


def tool(name: str) -> str:
    """A linter installed with the test dependencies (tox.ini); missing fails loudly."""
    path = shutil.which(name) or shutil.which(name, path=os.path.dirname(sys.executable))
    if path is None:
        raise AssertionError(f"{name} is not installed: pip install the test dependencies "
                             "listed in tox.ini (deps)")
    return path


def run(argv: list[str], timeout: float = 60, **kwargs: Any) -> tuple[int, str]:
    done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=timeout, **kwargs)
    return done.returncode, done.stdout.decode("utf-8", "replace")


# -- the manifests ---------------------------------------------------------------------

class ManifestTests(unittest.TestCase):
    """deploy/ as ``kubectl apply -f deploy/`` sees it."""

    def test_top_level_holds_exactly_the_kubernetes_objects(self):
        found = set()
        for path in manifest_files():
            self.assertTrue(path.endswith(".yaml"), f"{path}: not a manifest")
            with open(path, encoding="utf-8") as file:
                docs = [doc for doc in yaml.safe_load_all(file) if doc is not None]
            self.assertTrue(docs, f"{path}: no object")
            for doc in docs:
                self.assertTrue({"apiVersion", "kind", "metadata"} <= doc.keys(), path)
                found.add((doc["kind"], doc["metadata"]["name"]))
        self.assertEqual(found, EXPECTED_OBJECTS)
        # what is not a Kubernetes object lives below, where kubectl does not look
        self.assertTrue(os.path.isfile(os.path.join(DEPLOY, "systemd", "esmtpfa.service")))
        self.assertTrue(os.path.isfile(os.path.join(DEPLOY, "systemd", "esmtpfa.env.example")))

    def test_every_object_validates_against_the_kubernetes_schema(self):
        import kubernetes_validate
        for obj in objects():
            try:
                kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as error:
                self.fail(f"{obj['kind']}/{obj['metadata']['name']}: {error}")
        # strict validation does refuse a misspelt field (the check above can fail)
        broken = yaml.safe_load(yaml.safe_dump(the("Deployment")))
        broken["spec"]["template"]["spec"]["containers"][0]["securityContext"][
            "readOnlyRootFileSystem"] = True
        self.assertRaises(kubernetes_validate.ValidationError,
                          kubernetes_validate.validate, broken, KUBERNETES_VERSION, True)

    def test_yamllint_passes(self):
        yamllint = tool("yamllint")
        config = os.path.join(PROJECT, ".yamllint")
        code, output = run([yamllint, "--strict", "-c", config, DEPLOY, config])
        self.assertEqual(code, 0, output)
        # and it does read files with these settings: a duplicate key is reported
        bad = self.mktemp() + ".yaml"
        with open(bad, "w") as file:
            file.write("a: 1\na: 2\n")
        code, output = run([yamllint, "--strict", "-c", config, bad])
        self.assertNotEqual(code, 0, output)

    def test_deployment_runs_locked_down(self):
        pod = the("Deployment")["spec"]["template"]["spec"]
        self.assertIs(pod["securityContext"]["runAsNonRoot"], True)
        self.assertNotEqual(pod["securityContext"]["runAsUser"], 0)
        self.assertEqual(pod["securityContext"]["seccompProfile"], {"type": "RuntimeDefault"})
        security = container()["securityContext"]
        self.assertIs(security["readOnlyRootFilesystem"], True)
        self.assertIs(security["allowPrivilegeEscalation"], False)
        self.assertEqual(security["capabilities"]["drop"], ["ALL"])
        self.assertNotIn("add", security["capabilities"])
        # without capabilities nothing below 1024 can be bound
        for port in container()["ports"]:
            self.assertGreaterEqual(port["containerPort"], 1024, port)
        resources = container()["resources"]
        for kind in ("requests", "limits"):
            self.assertTrue({"cpu", "memory"} <= resources[kind].keys(), kind)

    def test_probes_use_the_health_endpoints_on_the_metrics_port(self):
        env = container_env()
        ports = {p["name"]: p["containerPort"] for p in container()["ports"]}
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            http = container()[probe]["httpGet"]
            self.assertEqual(http["path"], path)
            self.assertEqual(ports[http["port"]], int(env["METRICS_PORT"]))
        annotations = the("Deployment")["spec"]["template"]["metadata"]["annotations"]
        self.assertEqual(annotations["prometheus.io/scrape"], "true")
        self.assertEqual(int(annotations["prometheus.io/port"]), int(env["METRICS_PORT"]))
        self.assertEqual(annotations["prometheus.io/path"], "/metrics")

    def test_settings_come_from_the_secret_and_the_configmap_is_a_watched_directory(self):
        self.assertIn({"secretRef": {"name": "esmtpfa"}}, container()["envFrom"])
        pod = the("Deployment")["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["name"]: m for m in container()["volumeMounts"]}
        name = next(n for n, v in volumes.items()
                    if v.get("configMap", {}).get("name") == "esmtpfa-providers")
        # a subPath mount would be a copy that kubelet never updates
        self.assertNotIn("subPath", mounts[name])
        key, _ = providers_document()
        self.assertEqual(container_env()["PROVIDER_CONFIG"],
                         mounts[name]["mountPath"].rstrip("/") + "/" + key)

    def test_everything_the_relay_writes_is_on_an_empty_dir(self):
        pod = the("Deployment")["spec"]["template"]["spec"]
        scratch = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
        writable = [m["mountPath"] for m in container()["volumeMounts"]
                    if m["name"] in scratch and not m.get("readOnly")]
        env = container_env()
        for variable in ("TMPDIR", "MAILDIR"):
            self.assertTrue(any(env[variable] == path or env[variable].startswith(path + "/")
                                for path in writable), f"{variable} {env[variable]}")

    def test_pods_get_longer_than_the_drain_deadline(self):
        pod = the("Deployment")["spec"]["template"]["spec"]
        pause = container().get("lifecycle", {}).get("preStop", {}).get(
            "sleep", {}).get("seconds", 0)
        self.assertGreater(pod["terminationGracePeriodSeconds"], pause + shutdown_grace())

    def test_service_ports_reach_the_listeners(self):
        env = container_env()
        named = {p["name"]: p["containerPort"] for p in container()["ports"]}
        service = the("Service")["spec"]
        published = {p["port"]: p for p in service["ports"]}
        self.assertEqual(set(published), set(SERVICE_PORTS))
        for port, variable in SERVICE_PORTS.items():
            target = published[port]["targetPort"]
            self.assertEqual(named.get(target, target), int(env[variable]), port)

    def test_objects_select_the_deployments_pods(self):
        labels = the("Deployment")["spec"]["template"]["metadata"]["labels"]

        def selects(selector: dict[str, str]) -> bool:
            return bool(selector) and selector.items() <= labels.items()
        self.assertTrue(selects(the("Deployment")["spec"]["selector"]["matchLabels"]))
        self.assertTrue(selects(the("Service")["spec"]["selector"]))
        self.assertTrue(selects(the("PodDisruptionBudget")["spec"]["selector"]["matchLabels"]))
        policy = the("NetworkPolicy")["spec"]
        self.assertTrue(selects(policy["podSelector"]["matchLabels"]))
        target = the("HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
        self.assertEqual((target["kind"], target["name"]), ("Deployment", "esmtpfa"))
        metrics = the("HorizontalPodAutoscaler")["spec"]["metrics"]
        self.assertIn("cpu", [m["resource"]["name"] for m in metrics if m["type"] == "Resource"])
        # a PDB needs a second pod to be any use
        self.assertGreaterEqual(the("HorizontalPodAutoscaler")["spec"]["minReplicas"], 2)
        # the NetworkPolicy lets in every port the Service publishes
        allowed = {p["port"] for rule in policy["ingress"] for p in rule.get("ports", [])}
        for port in the("Service")["spec"]["ports"]:
            self.assertIn(port["targetPort"], allowed)


# -- .env-sample -----------------------------------------------------------------------

class EnvSampleTests(unittest.TestCase):
    """``cp .env-sample .env; kubectl create secret generic esmtpfa --from-env-file=.env``"""

    def test_names_exactly_the_variables_esmtpfa_reads(self):
        names = [name for name, _ in env_file()]
        self.assertEqual(len(names), len(set(names)), "a variable is listed twice")
        expected = program_variables()
        self.assertEqual(set(names), expected,
                         f"missing from .env-sample: {sorted(expected - set(names))}; "
                         f"not read by esmtpfa: {sorted(set(names) - expected)}")

    def test_every_variable_has_a_comment(self):
        with open(ENV_SAMPLE, encoding="utf-8") as file:
            lines = [line.strip() for line in file]
        for index, line in enumerate(lines):
            if line and not line.startswith("#"):
                block = index
                while block > 0 and lines[block - 1] and not lines[block - 1].startswith("#"):
                    block -= 1  # variables grouped under one comment
                self.assertTrue(block > 0 and lines[block - 1].startswith("#"),
                                f"no comment above {line.split('=')[0]}")

    def test_only_known_modules_read_the_environment(self):
        """A new ``os.environ`` read elsewhere must reach .env-sample (and this list)."""
        readers = set()
        package = os.path.join(PROJECT, "esmtpfa")
        for directory, _, files in os.walk(package):
            for name in files:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(directory, name)
                with open(path, encoding="utf-8") as file:
                    tree = ast.parse(file.read(), path)
                for node in ast.walk(tree):
                    if (isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv")
                            or isinstance(node, ast.Name) and node.id in ("environ", "getenv")):
                        readers.add(os.path.relpath(path, PROJECT).replace(os.sep, "/"))
        self.assertEqual(readers, ENVIRONMENT_READERS)

    def test_the_sample_with_the_deployment_env_is_a_valid_configuration(self):
        """What the pods start with: the Secret made from .env-sample, overridden by the
        Deployment's ``env`` (Kubernetes puts ``env`` after ``envFrom``)."""
        environment = dict(env_file()) | container_env()
        options = Options(environ=environment)
        options.parseOptions([])
        self.assertTrue(options["plain"])
        self.assertFalse(options["allow-anonymous-auth"])  # never an open relay as shipped
        self.assertFalse(options["demo"])
        # and the providers document expands with that environment
        key, document = providers_document()
        self.assertTrue(parse_provider_document(document.encode(), key, environment))

    def test_the_reference_example_still_parses(self):
        """deploy/examples/providers.example.yaml (every provider type) is what the
        ConfigMap's comment sends operators to: it must still be a valid document."""
        path = os.path.join(DEPLOY, "examples", "providers.example.yaml")
        with open(path, encoding="utf-8") as file:
            text = file.read()
        placeholders = {name: "placeholder" for name in REFERENCE.findall(text)}
        self.assertEqual(len(parse_provider_document(text.encode(), path, placeholders)), 5)

    def test_the_deployment_and_the_sample_agree(self):
        sample = dict(env_file())
        for name, value in container_env().items():
            if name in sample:
                self.assertEqual(sample[name], value, name)

    def test_placeholders_are_not_secrets(self):
        for name, value in env_file():
            if re.search(r"PASS|TOKEN|SECRET|KEY\Z", name) and not name.endswith("_TLS_KEY"):
                self.assertTrue(value == "" or value.startswith("change-me"), name)


# -- kubelet's ConfigMap mount ---------------------------------------------------------

def kubelet_publish(directory: str, files: dict[str, bytes], age: float = 0) -> None:
    """Write ``files`` the way kubelet updates a ConfigMap or Secret volume: a new
    timestamped directory, the ``..data`` symlink renamed over in one step, each key a
    symlink through ``..data``, and the old directory removed.  ``age``: seconds ago
    this happened (a pod's mount is usually old: no timestamp looks fresh)."""
    os.makedirs(directory, exist_ok=True)
    stamp = time.strftime("..%Y_%m_%d_%H_%M_%S.") + str(time.monotonic_ns())
    os.mkdir(os.path.join(directory, stamp))
    for name, data in files.items():
        with open(os.path.join(directory, stamp, name), "wb") as file:
            file.write(data)
    data_link = os.path.join(directory, "..data")
    previous = os.readlink(data_link) if os.path.islink(data_link) else None
    os.symlink(stamp, os.path.join(directory, "..data_tmp"))
    os.rename(os.path.join(directory, "..data_tmp"), data_link)
    for name in files:
        if not os.path.lexists(os.path.join(directory, name)):
            os.symlink(os.path.join("..data", name), os.path.join(directory, name))
    if previous is not None:
        shutil.rmtree(os.path.join(directory, previous))
    if age:
        then = time.time() - age
        for name in (stamp, "..data", *files, *(os.path.join(stamp, f) for f in files)):
            os.utime(os.path.join(directory, name), (then, then), follow_symlinks=False)


def smtp_login(port: int, ca_file: str, user: str, password: str) -> int:
    """STARTTLS (certificate checked), then AUTH; the reply code (blocking)."""
    context = ssl.create_default_context(cafile=ca_file)
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.starttls(context=context)
        try:
            return client.login(user, password)[0]
        except smtplib.SMTPAuthenticationError as error:
            return error.smtp_code


def http_status(port: str, path: str) -> int:
    """The status of ``GET path`` on the metrics listener (blocking)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
            return answer.status
    except urllib.error.HTTPError as error:
        return error.code


class KubeletMountTests(unittest.TestCase):
    """The pod's view, on this machine: the relay as the manifests start it."""

    timeout = 90

    @defer.inlineCallbacks
    def test_shipped_settings_accept_a_login_and_configmap_edits_reload(self):
        root = os.path.abspath(self.mktemp())

        def host(path: str) -> str:  # a path in the pod, under root here
            return root + path

        pod = the("Deployment")["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["name"]: m["mountPath"] for m in container()["volumeMounts"]}
        mount_of = {}  # ConfigMap or Secret name -> where the pod sees it
        for name, volume in volumes.items():
            if "configMap" in volume:
                mount_of[volume["configMap"]["name"]] = mounts[name]
            elif "secret" in volume:
                mount_of[volume["secret"]["secretName"]] = mounts[name]
        for name, volume in volumes.items():
            if "emptyDir" in volume:
                os.makedirs(host(mounts[name]))
        key, document = providers_document()
        kubelet_publish(host(mount_of["esmtpfa-providers"]), {key: document.encode()},
                        age=3600)
        # the certificate as docs/operations.md says: Secret esmtpfa-tls, tls.crt and tls.key
        ca = CertificateAuthority(os.path.join(root, "ca"))
        leaf = ca.issue("localhost", "127.0.0.1")
        tls = mount_of["esmtpfa-tls"]
        kubelet_publish(host(tls), {"tls.crt": leaf.cert_pem, "tls.key": leaf.key_pem})

        env = dict(env_file()) | container_env()
        env.update(SMTP_TLS_CERT=host(tls + "/tls.crt"), SMTP_TLS_KEY=host(tls + "/tls.key"))
        for variable in ("PROVIDER_CONFIG", "MAILDIR", "TMPDIR"):
            env[variable] = host(env[variable])
        for variable in ("SMTP_PORT", "SMTP_TLS_PORT", "HTTP_PORT", "METRICS_PORT"):
            env[variable] = str(free_port())
        env["SMTP_ADDR"] = env["METRICS_ADDR"] = "127.0.0.1"
        env["PROVIDER_CONFIG_POLL_INTERVAL"] = "0.2"  # kubelet's own delay is not tested

        relay = Twistd(["--metrics-port", env["METRICS_PORT"]], env=env)
        relay.start()
        self.addCleanup(relay.stop)
        port = int(env["SMTP_PORT"])
        yield relay.wait_for_port(port)
        health = yield threads.deferToThread(http_status, env["METRICS_PORT"], "/healthz")
        self.assertEqual(health, 200)
        # ready although RELAY_ADDR is the placeholder: readiness is this replica's own
        # state, never the upstream's (docs/metrics.md, "Health"); /status names it
        ready = yield threads.deferToThread(http_status, env["METRICS_PORT"], "/readyz")
        self.assertEqual(ready, 200)

        user, password = env["SUBMISSION_USER"], env["SUBMISSION_PASSWORD"]
        code = yield threads.deferToThread(smtp_login, port, ca.cert_path, user, password)
        self.assertEqual(code, 235, relay.output)

        # kubectl apply of an edited ConfigMap: kubelet swaps ..data under the relay
        edited = yaml.safe_load(document)
        edited["providers"].append({"meta": {"name": "ops", "type": "userpass"},
                                    "params": {"username": "bot", "password": "ops-s3cret"}})
        before = len(relay.output)
        kubelet_publish(host(mount_of["esmtpfa-providers"]),
                        {key: yaml.safe_dump(edited).encode()})
        yield until(lambda: "ops" in relay.output[before:], timeout=20)
        code = yield threads.deferToThread(smtp_login, port, ca.cert_path,
                                           "ops", "bot:ops-s3cret")
        self.assertEqual(code, 235, relay.output)
        # no restart: the first account is served by the same process, still
        code = yield threads.deferToThread(smtp_login, port, ca.cert_path, user, password)
        self.assertEqual(code, 235, relay.output)


# -- the container image ---------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuation lines joined, comments dropped."""
    instructions, pending = [], ""
    with open(DOCKERFILE, encoding="utf-8") as file:
        for raw in file:
            line = raw.rstrip("\n")
            if line.lstrip().startswith("#"):
                continue
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            line, pending = pending + line, ""
            if line.strip():
                word, _, rest = line.strip().partition(" ")
                instructions.append((word.upper(), rest.strip()))
    return instructions


def stages() -> list[list[tuple[str, str]]]:
    found: list[list[tuple[str, str]]] = []
    for instruction in dockerfile_instructions():
        if instruction[0] == "FROM":
            found.append([])
        found[-1].append(instruction)
    return found


def dockerignore_patterns() -> list[tuple[bool, re.Pattern]]:
    patterns = []
    with open(DOCKERIGNORE, encoding="utf-8") as file:
        for line in file:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            glob = line.lstrip("!").strip("/")
            regex = "".join(
                "(.*/)?" if part == "**/" else ".*" if part == "**" else "[^/]*" if part == "*"
                else "[^/]" if part == "?" else re.escape(part)
                for part in re.findall(r"\*\*/|\*\*|\*|\?|[^*?]+", glob))
            patterns.append((negate, re.compile(regex + r"\Z")))
    return patterns


def ignored(relative: str, patterns: list[tuple[bool, re.Pattern]]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents wins."""
    parts = relative.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    result = False
    for negate, pattern in patterns:
        if any(pattern.match(prefix) for prefix in prefixes):
            result = not negate
    return result


def build_context(target: str) -> None:
    """Copy what ``docker build .`` would send, following .dockerignore."""
    patterns = dockerignore_patterns()
    for directory, dirs, files in os.walk(PROJECT):
        relative_dir = os.path.relpath(directory, PROJECT)
        relative_dir = "" if relative_dir == "." else relative_dir.replace(os.sep, "/") + "/"
        # an excluded directory is not entered (.dockerignore re-includes only
        # top-level names, checked in test_build_context_...)
        dirs[:] = [d for d in dirs if not ignored(relative_dir + d, patterns)]
        for name in files:
            relative = relative_dir + name
            if not ignored(relative, patterns):
                os.makedirs(os.path.join(target, relative_dir), exist_ok=True)
                shutil.copy2(os.path.join(directory, name), os.path.join(target, relative))


class ImageTests(unittest.TestCase):
    """The Dockerfile, without a registry: its rules, and its steps run here."""

    def test_hadolint_passes(self):
        hadolint = tool("hadolint")
        code, output = run([hadolint, DOCKERFILE])
        self.assertEqual(code, 0, output)
        bad = self.mktemp()
        with open(bad, "w") as file:
            file.write("FROM python\nRUN cd /tmp && pip install requests\n")
        code, output = run([hadolint, bad])
        self.assertNotEqual(code, 0, output)

    def test_multi_stage_slim_non_root_twistd(self):
        builder, final = stages()
        for stage in (builder, final):
            self.assertEqual(stage[0][1].split()[0], "python:3.11-slim")
        self.assertIn("pip\" install --no-cache-dir .", dict(builder)["RUN"])
        # nothing of the build in the final stage but the virtualenv: no installer, no
        # compiler (python:3.11-slim has none)
        final_words = [word for word, _ in final]
        for word, arguments in final:
            if word == "RUN":
                self.assertNotRegex(arguments, r"\b(pip|apt-get|apt|gcc|make|build-essential)\b")
        self.assertIn("--from=builder", dict(final)["COPY"])
        user = dict(final)["USER"].split(":")[0]
        self.assertTrue(user.isdigit() and int(user) != 0, user)
        pod = the("Deployment")["spec"]["template"]["spec"]
        self.assertEqual(int(user), pod["securityContext"]["runAsUser"])
        self.assertEqual(final_words[-1], "ENTRYPOINT")
        self.assertEqual(yaml.safe_load(dict(final)["ENTRYPOINT"]),
                         ["twistd", "-n", "--pidfile=", "esmtpfa"])
        exposed = {int(p) for p in dict(final)["EXPOSE"].split()}
        self.assertEqual(exposed, {p["containerPort"] for p in container()["ports"]})

    def test_build_context_leaves_out_secrets_and_the_tree_around_the_package(self):
        patterns = dockerignore_patterns()
        for path in (".env", ".git/config", "tests/test_deploy.py", ".venv/bin/python",
                     "esmtpfa/__pycache__/options.cpython-311.pyc", "maildir/new/x"):
            self.assertTrue(ignored(path, patterns), path)
        for path in ("setup.cfg", "pyproject.toml", "README.md", "esmtpfa/runtime/options.py",
                     "twisted/plugins/esmtpfa_plugin.py"):
            self.assertFalse(ignored(path, patterns), path)
        # exceptions name top-level entries only (what build_context supports)
        with open(DOCKERIGNORE, encoding="utf-8") as file:
            for line in file:
                if line.startswith("!"):
                    self.assertNotIn("/", line.strip()[1:].rstrip("/"), line)

    timeout = 600

    @defer.inlineCallbacks
    def test_builder_steps_install_a_working_twistd_esmtpfa(self):
        """The builder stage's COPY and RUN steps in a fresh virtualenv (from PyPI, as
        ``docker build`` does), then the image's entry point outside the source tree."""
        root = os.path.abspath(self.mktemp())
        context = os.path.join(root, "context")
        build_context(context)
        python_dir = os.path.join(root, "python")  # `python` in the builder is 3.11
        os.makedirs(python_dir)
        os.symlink(sys.executable, os.path.join(python_dir, "python"))
        env = {key: value for key, value in os.environ.items()
               if key not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
        env["PATH"] = python_dir + os.pathsep + env.get("PATH", "")
        builder, final = stages()
        workdir = root
        for word, arguments in builder[1:]:
            if word == "ENV":
                for item in shlex.split(arguments):
                    name, _, value = item.partition("=")
                    env[name] = root + value if value.startswith("/") else value
            elif word == "WORKDIR":
                workdir = root + arguments
                os.makedirs(workdir, exist_ok=True)
            elif word == "COPY":
                *sources, destination = shlex.split(arguments)
                destination = os.path.join(workdir, destination)
                for source in sources:
                    path = os.path.join(context, source)
                    self.assertTrue(os.path.exists(path), f"COPY {source}: not in the context")
                    if os.path.isdir(path):
                        shutil.copytree(path, destination, dirs_exist_ok=True)
                    elif len(sources) > 1 or destination.endswith("/"):
                        os.makedirs(destination, exist_ok=True)
                        shutil.copy2(path, destination)
                    else:
                        shutil.copy2(path, destination)
            elif word == "RUN":
                code, output = yield threads.deferToThread(
                    run, ["sh", "-c", arguments], 500, env=env, cwd=workdir)
                self.assertEqual(code, 0, f"RUN {arguments}\n{output}")
            else:
                self.fail(f"the test does not know how to run {word} {arguments}")
        venv = env["VENV"]
        copied = dict(final)["COPY"].split()
        self.assertEqual(root + copied[-2], venv, "the final stage copies the virtualenv")

        # the entry point, from an empty directory, with the final stage's PATH
        entry = yaml.safe_load(dict(final)["ENTRYPOINT"])
        clean = {key: value for key, value in env.items() if not key.startswith("PIP_")}
        clean["PATH"] = os.path.join(venv, "bin") + os.pathsep + os.environ.get("PATH", "")
        elsewhere = os.path.join(root, "elsewhere")
        os.makedirs(elsewhere)
        self.assertEqual(shutil.which(entry[0], path=clean["PATH"]),
                         os.path.join(venv, "bin", entry[0]))
        code, output = yield threads.deferToThread(
            run, [*entry, "--help"], 60, env=clean, cwd=elsewhere)
        self.assertEqual(code, 0, output)
        self.assertIn("PROVIDER_CONFIG", output)
        code, output = yield threads.deferToThread(
            run, [os.path.join(venv, "bin", "python"), "-c",
                  "import esmtpfa; print(esmtpfa.__file__)"], 60, env=clean, cwd=elsewhere)
        self.assertEqual(code, 0, output)
        self.assertTrue(output.strip().startswith(venv), output)
        # Twisted's plugin cache was written at build time: the image's files are read-only
        plugins = os.path.join(venv, "lib", f"python{sys.version_info[0]}."
                               f"{sys.version_info[1]}", "site-packages", "twisted", "plugins")
        self.assertTrue(os.path.isfile(os.path.join(plugins, "dropin.cache")))
