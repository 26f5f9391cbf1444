"""The deployment files agree with each other and with the code (no Docker engine needed).

docker-compose.yml, the Dockerfile, deploy/prefect.yaml and deploy/k8s/*.yaml are parsed and
cross-checked: services, images and build targets, ports, volumes, listeners, topics,
credentials and commands must reference things that exist.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from pipeline.config import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict] = COMPOSE["services"]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
K8S = [doc for f in sorted((ROOT / "deploy" / "k8s").glob("*.yaml")) for doc in yaml.safe_load_all(f.read_text()) if doc]
PREFECT = yaml.safe_load((ROOT / "deploy" / "prefect.yaml").read_text())


def env(service: str) -> dict[str, str]:
    e = SERVICES[service].get("environment") or {}
    if isinstance(e, list):
        e = dict(item.split("=", 1) for item in e)
    return {k: str(v) for k, v in e.items()}


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def kafka_listeners() -> dict[str, tuple[str, int]]:
    """Advertised listener name -> (host, port)."""
    out = {}
    for item in env("kafka")["KAFKA_ADVERTISED_LISTENERS"].split(","):
        name, _, rest = item.partition("://")
        out[name] = host_port(rest)
    return out


def dockerfile_stages() -> set[str]:
    return set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", DOCKERFILE, re.M | re.I))


def python_module_commands():
    """(where, module, args) for every `python -m X ...` in compose, the Dockerfile and k8s."""
    found = []
    for name, svc in SERVICES.items():
        if isinstance(svc.get("command"), list):
            found.append((f"compose:{name}", svc["command"]))
    for cmd in re.findall(r"^CMD\s+(\[.*\])", DOCKERFILE, re.M):
        found.append(("Dockerfile", yaml.safe_load(cmd)))
    for doc in K8S:
        spec = doc.get("spec", {}).get("template", {}).get("spec", {})
        for c in spec.get("containers", []):
            if c.get("command"):
                found.append((f"k8s:{doc['metadata']['name']}", c["command"]))
    return [(where, cmd[2], cmd[3:]) for where, cmd in found if cmd[:2] == ["python", "-m"]]


# --- services, images, volumes, ports ----------------------------------------------------------


def test_every_service_runs_an_image_or_a_dockerfile_target_that_exists():
    assert {"kafka", "minio", "minio-init", "postgres", "prefect-server", "create-topics", "webhook", "consumer"} <= set(
        SERVICES
    )
    for name, svc in SERVICES.items():
        assert svc.get("image") or svc.get("build"), name
        build = svc.get("build")
        if build:
            assert (ROOT / build.get("context", ".") / build.get("dockerfile", "Dockerfile")).is_file(), name
            assert build.get("target") in dockerfile_stages(), f"{name}: unknown target {build.get('target')}"
    assert SERVICES["consumer"]["build"]["target"] == "consumer"
    assert SERVICES["webhook"]["build"]["target"] == "producer"


def test_depends_on_names_existing_services_with_conditions_they_can_meet():
    for name, svc in SERVICES.items():
        for target, spec in (svc.get("depends_on") or {}).items():
            assert target in SERVICES, f"{name} depends on unknown {target}"
            condition = spec.get("condition") if isinstance(spec, dict) else "service_started"
            if condition == "service_healthy":
                assert "healthcheck" in SERVICES[target], f"{name} waits for {target} to be healthy: it has no healthcheck"
            elif condition == "service_completed_successfully":
                assert SERVICES[target].get("restart", "no") == "no", f"{target} is a one-shot job: it must not restart"
            else:
                assert condition == "service_started", condition
    # The bucket must not publish events before the topic exists (auto-creation is off).
    assert SERVICES["minio"]["depends_on"]["create-topics"]["condition"] == "service_completed_successfully"
    assert env("kafka")["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"


def test_every_named_volume_is_declared_and_every_declared_volume_is_used():
    declared = set(COMPOSE.get("volumes") or {})
    used = set()
    for svc in SERVICES.values():
        for v in svc.get("volumes", []):
            source = v.split(":", 1)[0] if isinstance(v, str) else v.get("source")
            if not source.startswith((".", "/", "~")):
                used.add(source)
    assert used == declared


def test_published_ports_are_unique_and_served_by_their_service():
    host_ports: list[str] = []
    served = {
        "kafka": {kafka_listeners()["EXTERNAL"][1]},
        "minio": {_flag_port(SERVICES["minio"]["command"], "--address"), _flag_port(SERVICES["minio"]["command"], "--console-address")},
        "prefect-server": {int(_flag(SERVICES["prefect-server"]["command"], "--port"))},
        "webhook": {int(_flag(SERVICES["webhook"]["command"], "--port"))},
        "consumer": {int(env("consumer")["METAVOICE_METRICS_PORT"])},
    }
    for name, svc in SERVICES.items():
        for mapping in svc.get("ports", []):
            host, _, container = str(mapping).rpartition(":")
            host_ports.append(host)
            assert int(container) in served[name], f"{name} publishes {container}, which nothing there listens on"
    assert len(host_ports) == len(set(host_ports))
    assert kafka_listeners()["EXTERNAL"] == ("localhost", 9094)


def _flag(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def _flag_port(command: list[str], flag: str) -> int:
    return host_port(_flag(command, flag))[1]


# --- Kafka ---------------------------------------------------------------------------------------


def test_kafka_listener_configuration_is_coherent():
    e = env("kafka")
    listeners = {item.partition("://")[0]: item.partition("://")[2] for item in e["KAFKA_LISTENERS"].split(",")}
    protocols = dict(item.split(":") for item in e["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    assert set(kafka_listeners()) <= set(listeners)
    assert set(listeners) <= set(protocols)
    assert e["KAFKA_CONTROLLER_LISTENER_NAMES"] in listeners
    assert e["KAFKA_INTER_BROKER_LISTENER_NAME"] in kafka_listeners()
    node, _, voter = e["KAFKA_CONTROLLER_QUORUM_VOTERS"].partition("@")
    assert node == e["KAFKA_NODE_ID"]
    assert host_port(voter) == (_kafka_host(), host_port(listeners[e["KAFKA_CONTROLLER_LISTENER_NAMES"]])[1])


def _kafka_host() -> str:
    return SERVICES["kafka"].get("hostname", "kafka")


def test_every_kafka_bootstrap_points_at_the_brokers_in_network_advertised_listener():
    internal = kafka_listeners()[env("kafka")["KAFKA_INTER_BROKER_LISTENER_NAME"]]
    assert internal[0] in (_kafka_host(), "kafka")
    found = 0
    for name in SERVICES:
        for key, value in env(name).items():
            if key == "METAVOICE_KAFKA_BOOTSTRAP" or key.startswith("MINIO_NOTIFY_KAFKA_BROKERS_"):
                found += 1
                for address in value.split(","):
                    assert host_port(address) == internal, f"{name}.{key}={value}"
    assert found >= 4  # create-topics, minio, webhook, consumer


def test_minio_publishes_flac_puts_to_the_topic_the_consumer_reads():
    minio = env("minio")
    [target] = [k.removeprefix("MINIO_NOTIFY_KAFKA_ENABLE_") for k, v in minio.items()
                if k.startswith("MINIO_NOTIFY_KAFKA_ENABLE_") and v == "on"]
    topic = minio[f"MINIO_NOTIFY_KAFKA_TOPIC_{target}"]
    for service in ("consumer", "webhook", "create-topics"):
        assert env(service)["METAVOICE_TOPIC"] == topic, service
    assert minio[f"MINIO_NOTIFY_KAFKA_QUEUE_DIR_{target}"].startswith("/")  # MinIO wants an absolute path

    script = "\n".join(SERVICES["minio-init"]["command"])
    event_add = next(line for line in script.splitlines() if "mc event add" in line)
    assert f"arn:minio:sqs::{target}:kafka" in event_add
    assert "--event put" in event_add and "--suffix .flac" in event_add
    alias = next(line for line in script.splitlines() if "mc alias set" in line)
    assert f"http://minio:{_flag_port(SERVICES['minio']['command'], '--address')}" in alias
    init = env("minio-init")
    assert (init["MINIO_ROOT_USER"], init["MINIO_ROOT_PASSWORD"]) == (minio["MINIO_ROOT_USER"], minio["MINIO_ROOT_PASSWORD"])


def test_the_consumer_reaches_minio_and_prefect_with_their_own_credentials():
    consumer, minio = env("consumer"), env("minio")
    s3 = urlparse(consumer["METAVOICE_S3_ENDPOINT_URL"])
    assert (s3.hostname, s3.port) == ("minio", _flag_port(SERVICES["minio"]["command"], "--address"))
    assert consumer["METAVOICE_S3_ACCESS_KEY_ID"] == minio["MINIO_ROOT_USER"]
    assert consumer["METAVOICE_S3_SECRET_ACCESS_KEY"] == minio["MINIO_ROOT_PASSWORD"]

    api = urlparse(consumer["PREFECT_API_URL"])
    assert (api.hostname, api.port, api.path) == (
        "prefect-server", int(_flag(SERVICES["prefect-server"]["command"], "--port")), "/api")
    db = urlparse(env("prefect-server")["PREFECT_API_DATABASE_CONNECTION_URL"])
    pg = env("postgres")
    assert db.scheme == "postgresql+asyncpg" and db.hostname == "postgres"
    assert (db.username, db.password, db.path.lstrip("/")) == (pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"], pg["POSTGRES_DB"])


def test_the_consumer_reserves_an_nvidia_gpu_and_outlasts_its_shutdown_budget():
    devices = SERVICES["consumer"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    grace = SERVICES["consumer"]["stop_grace_period"]
    assert int(grace.rstrip("s")) > Settings.model_fields["shutdown_timeout"].default


def test_every_metavoice_variable_names_a_real_setting():
    fields = set(Settings.model_fields)
    places = [(f"compose:{name}", env(name)) for name in SERVICES]
    for doc in K8S:
        if doc["kind"] == "ConfigMap":
            places.append((f"k8s:{doc['metadata']['name']}", doc["data"]))
        for c in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            places.append((f"k8s:{doc['metadata']['name']}", {e["name"]: e.get("value") for e in c.get("env", [])}))
    for d in PREFECT["deployments"]:
        places.append((f"prefect:{d['name']}", d["work_pool"]["job_variables"].get("env", {})))
    for where, variables in places:
        for key in variables:
            if key.startswith("METAVOICE_"):
                assert key.removeprefix("METAVOICE_").lower() in fields, f"{where}: {key} is not a setting"


# --- images and commands -----------------------------------------------------------------------


def test_commands_name_modules_and_flags_that_exist():
    from producer.cli import build_parser

    consumer_flags = set(re.findall(r'add_argument\(\s*"(--[a-z-]+)"', (ROOT / "consumer" / "cli.py").read_text()))
    commands = python_module_commands()
    assert {m for _, m, _ in commands} == {"producer", "consumer"}
    for where, module, args in commands:
        assert (ROOT / module / "__main__.py").is_file(), where
        if module == "producer":
            build_parser().parse_args(args)  # exits (fails the test) on an unknown subcommand or flag
        else:
            assert {a for a in args if a.startswith("--")} <= consumer_flags, where


def test_the_dockerfile_builds_the_consumer_on_cuda_12_with_a_cu12_torch():
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:12\.\S*cudnn\S*runtime", DOCKERFILE, re.M)
    assert re.search(r"^ARG TORCH_INDEX=\S+/whl/cu12\d$", DOCKERFILE, re.M)
    assert {"producer", "consumer"} <= dockerfile_stages()
    assert DOCKERFILE.rstrip().splitlines()[-1].startswith("CMD")  # the default target is the consumer


def test_everything_the_dockerfile_copies_exists_and_is_not_dockerignored():
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for line in re.findall(r"^COPY\s+(?!--from)(.+)$", DOCKERFILE, re.M):
        *sources, _dest = line.split()
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: missing"
            assert source not in ignored and source.split("/")[0] not in ignored, f"COPY {source} is dockerignored"
    assert ".env" in ignored  # secrets never enter a build context


def test_the_producer_image_needs_none_of_the_gpu_stack():
    probe = (
        "import sys, producer.cli, producer.webhook, producer.r2_queue, producer.backfill;"
        "print(','.join(m for m in ('torch', 'faster_whisper', 'ctranslate2', 'numpy', 'pyarrow', 'prefect',"
        " 'soundfile', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
    installed = re.search(r"AS producer.*?RUN pip install (.*?)\n(?!\s)", DOCKERFILE, re.S).group(1)
    for package in ("aiobotocore", "aiokafka", "aiohttp", "orjson", "pydantic-settings", "tenacity", "rich"):
        assert f'"{package}>=' in installed, package


# --- Prefect and Kubernetes ------------------------------------------------------------------------


def test_prefect_deployments_point_at_a_flow_that_exists_and_is_in_the_image():
    for d in PREFECT["deployments"]:
        path, _, func = d["entrypoint"].partition(":")
        tree = ast.parse((ROOT / path).read_text())
        [fn] = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == func]
        assert any("flow" in ast.unparse(dec) for dec in fn.decorator_list), f"{func} is not a Prefect flow"
        assert set(d.get("parameters", {})) <= {a.arg for a in fn.args.args}
        assert d["concurrency_limit"] <= Settings.model_fields["topic_partitions"].default
        assert f"COPY {path} " in DOCKERFILE


def test_kubernetes_consumers_each_get_a_gpu_and_a_config_that_exists():
    config_maps = {d["metadata"]["name"] for d in K8S if d["kind"] == "ConfigMap"}
    [deployment] = [d for d in K8S if d["kind"] == "Deployment" and d["metadata"]["name"] == "metavoice-consumer"]
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["terminationGracePeriodSeconds"] > Settings.model_fields["shutdown_timeout"].default
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0  # no surge pod without a GPU
    port_names = {p["name"] for p in container["ports"]}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] in port_names
    config = next(d for d in K8S if d["kind"] == "ConfigMap")["data"]
    assert int(config["METAVOICE_METRICS_PORT"]) == next(p["containerPort"] for p in container["ports"])
    volumes = {v["name"] for v in pod["volumes"]}
    assert {m["name"] for m in container["volumeMounts"]} <= volumes
    assert config["METAVOICE_KAFKA_SSL_CAFILE"].startswith(
        next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "kafka-ca"))
    for doc in K8S:
        for c in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            for source in c.get("envFrom", []):
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] in config_maps, doc["metadata"]["name"]


WORKLOADS = [d for d in K8S if d.get("spec", {}).get("template")]


@pytest.mark.parametrize("doc", WORKLOADS, ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_kubernetes_workloads_run_as_the_images_non_root_user(doc):
    pod = doc["spec"]["template"]["spec"]
    uid = int(re.search(r"useradd .*--uid (\d+)", DOCKERFILE).group(1))
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == uid
