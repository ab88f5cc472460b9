"""The deployment files (`deploy/`, `docker-compose.yml`), checked without a Docker engine: they
parse, and reference only images, commands, ports, settings, health endpoints and metrics
that exist in this code base."""

from __future__ import annotations

import asyncio
import fnmatch
import json
import re
import shlex
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import pytest
import yaml
from aiohttp.test_utils import TestClient

import gateway
from admin.cli import parser as cli_parser
from admin.embedded import free_port
from gateway import db
from gateway.settings import SETTINGS
from tests.fakes import FakeUpstream

ROOT: Final = Path(__file__).resolve().parent.parent
DEPLOY: Final = ROOT / "deploy"
COMPOSE: Final = ROOT / "docker-compose.yml"
DOCKERFILE: Final = DEPLOY / "Dockerfile"
K8S: Final = DEPLOY / "k8s"
DASHBOARD: Final = DEPLOY / "grafana" / "dashboards" / "wallet.json"
ALERTS: Final = DEPLOY / "alerts.yml"
PYPROJECT: Final = tomllib.loads((ROOT / "pyproject.toml").read_text())

DECLARED: Final = {s.name for s in SETTINGS}
DEFAULTS: Final = {s.name: s.default for s in SETTINGS}
GATEWAY_PORT: Final = int(DEFAULTS["GATEWAY_PORT"] or 0)
ADMIN_PORT: Final = int(DEFAULTS["ADMIN_PORT"] or 0)
FORWARD_PORT: Final = int(DEFAULTS["FORWARD_PROXY_PORT"] or 0)
HEALTH: Final = "/monitoring/health"
METRICS_PATH: Final = "/monitoring/metrics"
SECRET_SETTINGS: Final = (
    "DATABASE_URL",
    "REDIS_URL",
    "JWT_SECRET",
    "ENCRYPTION_KEY",
    "ENCRYPTION_KEY_PREVIOUS",
    "WALLET_ADMIN_PASSWORD",
)
# Images other than the wallet's own that the compose file may use (official ones, tagged).
THIRD_PARTY_IMAGES: Final = {
    "postgres": "postgres",
    "redis": "redis",
    "prometheus": "prom/prometheus",
    "grafana": "grafana/grafana",
}
APP_PORT: Final = {"gateway": GATEWAY_PORT, "admin": ADMIN_PORT}
# Labels Prometheus adds itself, and the histogram bucket label.
IMPLICIT_LABELS: Final = {"job", "instance", "le"}

OPENAI_KEY = "sk-proj-" + "D" * 40
REFUSED_KEY = "sk-proj-" + "R" * 40


def deploy_files(*suffixes: str) -> list[Path]:
    found = [p for p in DEPLOY.rglob("*") if p.is_file() and p.suffix in suffixes]
    if COMPOSE.suffix in suffixes:
        found.append(COMPOSE)
    return sorted(found)


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def wallet_image() -> str:
    image: str = compose()["services"]["gateway"]["image"]
    return image


def k8s_docs() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs


def k8s(kind: str) -> list[dict[str, Any]]:
    return [d for d in k8s_docs() if d.get("kind") == kind]


def pod_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in k8s("Deployment") + k8s("Job"):
        yield doc["metadata"]["name"], doc["spec"]["template"]["spec"]


def assert_wallet_command(args: list[str]) -> str:
    """The `wallet` subcommand `args` run, checked against the real CLI parser."""
    parsed = cli_parser().parse_args(args)
    command: str = parsed.command
    return command


# ---- every file parses ----


@pytest.mark.parametrize(
    "path",
    deploy_files(".yml", ".yaml"),
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_yaml_parses(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} is empty"
    assert all(isinstance(d, dict) for d in docs)


@pytest.mark.parametrize("path", deploy_files(".json"), ids=lambda p: str(p.relative_to(ROOT)))
def test_json_parses(path: Path) -> None:
    assert isinstance(json.loads(path.read_text()), dict)


def test_the_expected_files_exist() -> None:
    for path in (
        DOCKERFILE,
        ROOT / ".dockerignore",
        COMPOSE,
        DEPLOY / "prometheus.yml",
        ALERTS,
        DASHBOARD,
        DEPLOY / "healthcheck.py",
        DEPLOY / "wallet.env.example",
    ):
        assert path.is_file(), path


# ---- the Dockerfile ----


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def dockerignored(relative: str) -> bool:
    ignored = False
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").removeprefix("**/")
        parts = Path(relative).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pattern) for p in prefixes) or fnmatch.fnmatch(
            parts[-1], pattern
        ):
            ignored = not negate
    return ignored


def test_dockerfile_is_multi_stage_on_slim_python_matching_requires_python() -> None:
    froms = [args for word, args in dockerfile_instructions() if word == "FROM"]
    assert len(froms) >= 2, "builder and runtime stages"
    args = dict(a.split("=", 1) for w, a in dockerfile_instructions() if w == "ARG" and "=" in a)
    images = [re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], f.split()[0]) for f in froms]
    assert all(image == "python:3.11-slim" for image in images), images
    required = PYPROJECT["project"]["requires-python"]
    assert required == ">=3.11", f"check the image's Python against requires-python {required}"
    assert froms[-1].split()[-1] == "runtime"


def test_dockerfile_installs_the_project_and_its_migrations() -> None:
    steps = dockerfile_instructions()
    copied = [shlex.split(args) for word, args in steps if word == "COPY"]
    sources = {src.rstrip("/") for c in copied if not c[0].startswith("--") for src in c[:-1]}
    # What `pip wheel .` needs: pyproject.toml, the readme it names, every package, sql/.
    needed = {
        "pyproject.toml",
        PYPROJECT["project"]["readme"],
        *PYPROJECT["tool"]["setuptools"]["packages"],
        "sql",
    }
    assert needed <= sources, f"not copied: {needed - sources}"
    for source in sources:
        assert (ROOT / source).exists(), f"COPY of a missing path: {source}"
        assert not dockerignored(source), f"COPY of a path .dockerignore excludes: {source}"
    runs = " ".join(args for word, args in steps if word == "RUN")
    assert "pip wheel" in runs
    assert re.search(r"pip install .*api-key-wallet", runs), runs
    assert PYPROJECT["project"]["name"] == "api-key-wallet"
    # Installed non-editable, gateway/db.py looks for migrations next to the package: the
    # image copies sql/ into site-packages and checks that they are found there.
    assert Path(gateway.__file__).resolve().parent.parent / "sql" == db.SQL_DIR
    assert 'cp -r sql "$SITE/sql"' in runs
    assert "migration_files" in runs
    # The runtime stage takes the venv from the builder.
    runtime = steps[max(i for i, (w, _) in enumerate(steps) if w == "FROM") :]
    assert ("COPY", "--from=builder /opt/venv /opt/venv") in runtime


def test_dockerfile_runs_wallet_as_non_root_with_a_healthcheck() -> None:
    steps = dockerfile_instructions()
    users = [args for word, args in steps if word == "USER"]
    assert users, "no USER: the image would run as root"
    assert users[-1].split(":")[0] not in ("root", "0")
    assert PYPROJECT["project"]["scripts"]["wallet"] == "admin.cli:main"
    assert ("ENTRYPOINT", '["wallet"]') in steps
    cmd = json.loads(next(args for word, args in reversed(steps) if word == "CMD"))
    assert assert_wallet_command(cmd) == "gateway"
    health = next(args for word, args in steps if word == "HEALTHCHECK")
    assert "healthcheck" in health
    assert ("COPY", "deploy/healthcheck.py /usr/local/bin/wallet-healthcheck") in steps
    exposed = {int(p) for word, args in steps if word == "EXPOSE" for p in args.split()}
    assert exposed == {GATEWAY_PORT, ADMIN_PORT, FORWARD_PORT}


def test_dockerfile_bakes_in_no_secret() -> None:
    steps = dockerfile_instructions()
    for word, args in steps:
        if word in ("ENV", "ARG", "LABEL"):
            for name in SECRET_SETTINGS:
                assert name not in args, f"{word} {name} would bake a secret into the image"
    for secretish in (".env", ".wallet"):
        assert dockerignored(secretish), f".dockerignore must exclude {secretish}"


def test_package_data_ships_every_non_python_file() -> None:
    """The image installs a wheel: a template or static file that package-data does not name
    would be missing from it."""
    package_data = PYPROJECT["tool"]["setuptools"].get("package-data", {})
    for package in ("gateway", "admin"):  # the apps; bench/ holds docs besides code
        folder = ROOT / package
        for path in folder.rglob("*"):
            relative = path.relative_to(folder)
            if (
                not path.is_file()
                or path.suffix in (".py", ".pyc", ".md")
                or "__pycache__" in str(path)
            ):
                continue
            patterns = package_data.get(package, []) + package_data.get("*", [])
            assert any(fnmatch.fnmatch(str(relative), p) for p in patterns), (
                f"{package}/{relative} is not in [tool.setuptools.package-data]: "
                "the Docker image would not contain it"
            )


async def test_healthcheck_script_asks_both_apps(
    gateway_client: TestClient[Any, Any], admin_client: TestClient[Any, Any]
) -> None:
    script = str(DEPLOY / "healthcheck.py")

    async def run(gateway_port: int, admin_port: int) -> int:
        env = {"GATEWAY_PORT": str(gateway_port), "ADMIN_PORT": str(admin_port)}
        proc = await asyncio.create_subprocess_exec(sys.executable, script, env=env)
        return await proc.wait()

    closed = free_port()
    assert gateway_client.server.port is not None
    assert admin_client.server.port is not None
    assert await run(gateway_client.server.port, closed) == 0
    assert await run(closed, admin_client.server.port) == 0
    assert await run(closed, closed) == 1


# ---- docker-compose.yml ----


def wallet_services() -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in compose()["services"].items()
        if service.get("image") == wallet_image()
    }


def test_compose_has_the_topology() -> None:
    services = compose()["services"]
    assert set(wallet_services()) == {"migrate", "admin", "gateway"}
    assert set(services) == {"migrate", "admin", "gateway", *THIRD_PARTY_IMAGES}
    assert services["gateway"]["deploy"]["replicas"] >= 2
    for name in ("postgres", "redis"):
        assert services[name]["healthcheck"]["test"]
    for name in ("admin", "gateway"):
        assert services[name]["depends_on"]["migrate"] == {
            "condition": "service_completed_successfully"
        }
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_compose_images_and_build_context_exist() -> None:
    for name, service in compose()["services"].items():
        if name in THIRD_PARTY_IMAGES:
            repository, _, tag = service["image"].partition(":")
            assert repository == THIRD_PARTY_IMAGES[name]
            assert tag, f"{name}: pin a tag"
            assert "build" not in service
        else:
            build = service["build"]
            assert (ROOT / build["context"]).resolve() == ROOT
            assert (ROOT / build["dockerfile"]).resolve() == DOCKERFILE


def test_compose_commands_ports_and_settings_exist() -> None:
    services = wallet_services()
    commands = {name: assert_wallet_command(s["command"]) for name, s in services.items()}
    assert commands == {"migrate": "migrate", "admin": "admin", "gateway": "gateway"}
    for name, service in services.items():
        env = service["environment"]
        assert set(env) <= DECLARED, f"{name}: undeclared settings {set(env) - DECLARED}"
        assert env["HOST"] == "0.0.0.0"
        assert "postgres:5432" in env["DATABASE_URL"]
        assert "redis:6379" in env["REDIS_URL"]
        assert {"GATEWAY_PORT", "ADMIN_PORT", "FORWARD_PROXY_PORT"} <= set(env)
        assert int(env["GATEWAY_PORT"]) == GATEWAY_PORT
        assert int(env["ADMIN_PORT"]) == ADMIN_PORT
        assert int(env["FORWARD_PROXY_PORT"]) == FORWARD_PORT
        for secret in ("JWT_SECRET", "ENCRYPTION_KEY", "WALLET_ADMIN_PASSWORD"):
            # Interpolated from the environment / .env, required: never a literal value.
            assert re.fullmatch(rf"\$\{{{secret}:\?[^}}]+\}}", env[secret]), env[secret]

    def container_ports(name: str) -> set[int]:
        return {int(str(p).rsplit(":", 1)[1]) for p in services[name].get("ports", [])}

    assert container_ports("gateway") == {GATEWAY_PORT, FORWARD_PORT}
    assert container_ports("admin") == {ADMIN_PORT}
    assert container_ports("migrate") == set()


def test_compose_mounts_only_files_that_exist() -> None:
    for name, service in compose()["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name} mounts a missing {source}"


# ---- Prometheus ----


def test_prometheus_scrapes_both_apps_and_every_gateway_replica() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"admin", "gateway"}
    assert all(job["metrics_path"] == METRICS_PATH for job in jobs.values())
    assert jobs["admin"]["static_configs"][0]["targets"] == [f"admin:{ADMIN_PORT}"]
    (dns,) = jobs["gateway"]["dns_sd_configs"]
    assert "gateway" in dns["names"]
    assert dns["type"] == "A"
    assert dns["port"] == GATEWAY_PORT
    # The rules file it loads is the one compose mounts.
    mounts = compose()["services"]["prometheus"]["volumes"]
    assert "./deploy/alerts.yml:/etc/prometheus/alerts.yml:ro" in mounts
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]


def test_grafana_is_provisioned_with_the_datasource_and_dashboard() -> None:
    provisioning = DEPLOY / "grafana" / "provisioning"
    sources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    (source,) = sources["datasources"]
    assert source["url"] == "http://prometheus:9090"
    assert source["type"] == "prometheus"
    dashboards = yaml.safe_load((provisioning / "dashboards" / "wallet.yml").read_text())
    assert dashboards["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    mounts = compose()["services"]["grafana"]["volumes"]
    assert "./deploy/grafana/dashboards:/var/lib/grafana/dashboards:ro" in mounts
    dashboard = json.loads(DASHBOARD.read_text())
    uids = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p["targets"]}
    assert uids == {source["uid"]}


# ---- Kubernetes ----


def test_k8s_has_the_objects() -> None:
    kinds = sorted(d["kind"] for d in k8s_docs() if d["kind"] != "Kustomization")
    assert kinds == sorted(
        [
            "ConfigMap",
            "Deployment",
            "Deployment",
            "HorizontalPodAutoscaler",
            "Job",
            "PodDisruptionBudget",
            "Service",
            "Service",
        ]
    )
    assert not k8s("Secret"), "secrets are referenced, never embedded in the manifests"
    (kustomization,) = k8s("Kustomization")
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}


def test_k8s_containers_run_real_commands_with_declared_settings_and_secret_refs() -> None:
    (config_map,) = k8s("ConfigMap")
    assert set(config_map["data"]) <= DECLARED
    assert config_map["data"]["HOST"] == "0.0.0.0"
    commands = {}
    for name, spec in pod_specs():
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] != 0
        (container,) = spec["containers"]
        assert container["image"] == wallet_image()
        commands[name] = assert_wallet_command(container["args"])
        env = container["env"]
        names = {e["name"] for e in env}
        assert names <= DECLARED, f"{name}: undeclared settings {names - DECLARED}"
        for entry in env:
            if entry["name"] in SECRET_SETTINGS:
                assert "value" not in entry, f"{name}: {entry['name']} given in clear"
                assert entry["valueFrom"]["secretKeyRef"]["key"] == entry["name"]
        assert set(SECRET_SETTINGS) - {"ENCRYPTION_KEY_PREVIOUS"} <= names
        refs = [e["configMapRef"]["name"] for e in container["envFrom"]]
        assert refs == [config_map["metadata"]["name"]]
    assert commands == {
        "wallet-gateway": "gateway",
        "wallet-admin": "admin",
        "wallet-migrate": "migrate",
    }


def test_k8s_probes_services_hpa_and_pdb_match_the_apps() -> None:
    deployments = {d["metadata"]["name"]: d for d in k8s("Deployment")}
    apps = {"wallet-gateway": "gateway", "wallet-admin": "admin"}
    assert set(deployments) == set(apps)
    services = {s["metadata"]["name"]: s for s in k8s("Service")}
    for name, app in apps.items():
        deployment = deployments[name]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        ports = {p["containerPort"] for p in container["ports"]}
        for probe in ("readinessProbe", "livenessProbe"):
            get = container[probe]["httpGet"]
            assert get == {"path": HEALTH, "port": APP_PORT[app]}, (name, probe)
        service = services[name]
        assert service["spec"]["selector"].items() <= labels.items()
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/path"] == METRICS_PATH
        assert int(annotations["prometheus.io/port"]) == APP_PORT[app]
    gateway_ports = {
        p["containerPort"]
        for p in deployments["wallet-gateway"]["spec"]["template"]["spec"]["containers"][0]["ports"]
    }
    assert gateway_ports == {GATEWAY_PORT, FORWARD_PORT}
    (hpa,) = k8s("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "wallet-gateway"
    assert hpa["spec"]["minReplicas"] >= 2
    (pdb,) = k8s("PodDisruptionBudget")
    gateway_labels = deployments["wallet-gateway"]["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= gateway_labels.items()
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]


# ---- every metric queried exists on the running apps ----

METRIC_NAME: Final = re.compile(r"\b(wallet_[a-z0-9_]+)\b")
BY_LABELS: Final = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
MATCHER_LABELS: Final = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"")


def queries() -> list[tuple[str, str]]:
    """(where, PromQL) of every dashboard target and alert rule."""
    out = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        out += [(f"panel {panel['title']!r}", t["expr"]) for t in panel["targets"]]
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        out += [(f"alert {rule['alert']}", rule["expr"]) for rule in group["rules"]]
    return out


def exposition(text: str) -> tuple[dict[str, str], dict[str, set[str]]]:
    """Family -> TYPE, and sample name -> the label names seen on it."""
    types: dict[str, str] = {}
    labels: dict[str, set[str]] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            types[name] = kind
        elif line and not line.startswith("#"):
            name = re.split(r"[{ ]", line, maxsplit=1)[0]
            found = labels.setdefault(name, set())
            found.update(re.findall(r'([a-zA-Z_]\w*)="', line.partition("{")[2]))
    return types, labels


def family_of(name: str, types: dict[str, str]) -> str:
    for suffix in ("_bucket", "_count", "_sum"):
        base = name.removesuffix(suffix)
        if base != name and types.get(base) == "histogram":
            return base
    return name


# Families the requests in the test below give samples to; the dashboard must show them all.
EXERCISED: Final = {
    "wallet_proxied_requests_total",
    "wallet_gateway_overhead_seconds",
    "wallet_upstream_latency_seconds",
    "wallet_errors_total",
    "wallet_fallbacks_total",
    "wallet_cooldowns_total",
    "wallet_key_quota_used",
    "wallet_key_quota_remaining",
    "wallet_cost_total",
    "wallet_http_requests_total",
    "wallet_login_failures_total",
}


def test_queries_use_only_known_promql_shapes() -> None:
    """Every query names at least one wallet metric or `up`; the parsing below sees them."""
    for where, expr in queries():
        assert METRIC_NAME.search(expr) or re.search(r"\bup\{", expr), where


async def test_every_queried_metric_is_served_after_a_proxied_request(
    admin_client: TestClient[Any, Any],
    gateway_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    aiohttp_server: Any,
) -> None:
    upstream = FakeUpstream(OPENAI_KEY)
    server = await aiohttp_server(upstream.app())
    resp = await admin_client.put(
        "/services/openai",
        headers=as_admin,
        json={"base_url": f"http://127.0.0.1:{server.port}", "cost_model": {"per_call": "0.01"}},
    )
    assert resp.status == 200, await resp.text()
    # A key the upstream refuses, tried first (fallback + cooldown), then one with a quota.
    for key, priority, metadata in (
        (REFUSED_KEY, 10, {}),
        (OPENAI_KEY, 0, {"quota": 100, "quotaPeriod": "daily"}),
    ):
        resp = await admin_client.post(
            "/keys",
            headers=as_admin,
            json={
                "key": key,
                "service": "openai",
                "tier": "paid",
                "priority": priority,
                "metadata": metadata,
            },
        )
        assert resp.status == 201, await resp.text()
    resp = await admin_client.post(
        "/tokens", headers=as_admin, json={"name": "deploy", "services": ["openai"]}
    )
    assert resp.status == 201, await resp.text()
    token = (await resp.json())["token"]

    resp = await gateway_client.get("/openai/v1/models", headers={"X-Wallet-Token": token})
    assert resp.status == 200, await resp.text()
    assert resp.headers["X-Wallet-Fallbacks"] == "1"
    bad = await gateway_client.get("/openai/v1/models", headers={"X-Wallet-Token": "nope"})
    assert bad.status == 401
    resp = await admin_client.post(
        "/auth/login", json={"username": "admin", "password": "not-the-password"}
    )
    assert resp.status == 401

    types: dict[str, str] = {}
    labels: dict[str, set[str]] = {}
    for client in (gateway_client, admin_client):
        resp = await client.get(METRICS_PATH)
        assert resp.status == 200
        app_types, app_labels = exposition(await resp.text())
        types.update(app_types)
        for name, names in app_labels.items():
            labels.setdefault(name, set()).update(names)

    checked = set()
    for where, expr in queries():
        names = set(METRIC_NAME.findall(expr))
        for name in names:
            family = family_of(name, types)
            assert family in types, f"{where}: {name} is not served (no # TYPE {family})"
            if family in EXERCISED:
                assert name in labels, f"{where}: {name} has no sample after the requests"
            checked.add(family)
        # Every label the query groups or filters by exists on one of its metrics (checked
        # where the requests above produced samples).
        used = {label.strip() for group in BY_LABELS.findall(expr) for label in group.split(",")}
        used |= set(MATCHER_LABELS.findall(expr))
        used -= IMPLICIT_LABELS | {""}
        sampled = [labels[name] for name in names if name in labels]
        if sampled and len(sampled) == len(names):
            have = set().union(*sampled)
            assert used <= have, f"{where}: labels {used - have} not on {sorted(names)}"
    # The dashboard covers what the issue asks for.
    assert checked >= EXERCISED


# ---- Makefile ----


def make_recipes() -> dict[str, str]:
    recipes: dict[str, list[str]] = {}
    current = ""
    for line in (ROOT / "Makefile").read_text().splitlines():
        if line.startswith("\t") and current:
            recipes[current].append(line.strip())
        elif match := re.match(r"^([a-z][a-z-]*):", line):
            current = match[1]
            recipes[current] = [line.partition(":")[2].strip()]
        else:
            current = ""
    return {target: "\n".join(lines) for target, lines in recipes.items()}


def test_make_targets_call_docker_and_make_test_does_not() -> None:
    recipes = make_recipes()
    assert "docker build -f deploy/Dockerfile" in recipes["docker-build"]
    for target in ("docker-up", "docker-down", "docker-logs"):
        assert "$(COMPOSE)" in recipes[target], target
    assert "docker-build" in recipes["deploy"]
    for target in ("install", "test", "lint", "typecheck"):
        assert "docker" not in recipes[target], target
