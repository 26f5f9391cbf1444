"""The deployment files agree with each other and with the code (no Docker engine needed).

docker-compose.yml, the Dockerfile, .dockerignore, deploy/prefect.yaml, deploy/k8s/*.yaml and
deploy/constraints.txt are parsed and cross-checked: services, images and build targets, ports,
volumes, listeners, topics, buckets, credentials, commands, image tags and pinned versions must
reference things that exist and agree with pyproject.toml.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from pipeline.config import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict] = COMPOSE["services"]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
K8S = [doc for f in sorted((ROOT / "deploy" / "k8s").glob("*.yaml")) for doc in yaml.safe_load_all(f.read_text()) if doc]
PREFECT = yaml.safe_load((ROOT / "deploy" / "prefect.yaml").read_text())
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
CONSTRAINTS = dict(
    line.split("==", 1) for line in (ROOT / "deploy" / "constraints.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
)


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


def dockerfile_stage(name: str) -> str:
    """The Dockerfile's text from `FROM ... AS name` to the next FROM."""
    return re.search(rf"^FROM\s+\S+\s+AS\s+{name}\s*$(.*?)(?=^FROM\s|\Z)", DOCKERFILE, re.M | re.S).group(1)


def _dockerignore_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


DOCKERIGNORE = [
    (line.startswith("!"), _dockerignore_regex(line.lstrip("!").strip("/")))
    for line in map(str.strip, (ROOT / ".dockerignore").read_text().splitlines())
    if line and not line.startswith("#")
]


def in_build_context(path: str) -> bool:
    """Whether .dockerignore lets `path` (relative to the repository) into the build context.

    Docker's rules: the last pattern matching the path or one of its parent directories decides;
    a `!pattern` lets back in what an earlier pattern left out.
    """
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    included = True
    for negated, regex in DOCKERIGNORE:
        if any(regex.match(prefix) for prefix in prefixes):
            included = negated
    return included


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


def _minio_init_buckets() -> set[str]:
    """The buckets minio-init's script makes (`mc mb local/...`), its variables resolved."""
    variables = env("minio-init")
    script = "\n".join(SERVICES["minio-init"]["command"])
    made = set()
    for target in re.findall(r"mc mb\b[^\n]*?\s\"?local/([^\s\"]+)", script):
        made.add(re.sub(r"\$\$\{?(\w+)\}?", lambda m: _compose_default(variables[m.group(1)]), target))
    return made


def _compose_default(value: str) -> str:
    """`${VAR:-default}` as compose resolves it with VAR unset (no .env): the default."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def test_the_consumer_writes_its_dataset_to_a_bucket_that_minio_init_creates():
    consumer = env("consumer")
    output = urlparse(consumer["METAVOICE_OUTPUT_DIR"])
    assert output.scheme == "s3" and output.netloc and output.path.strip("/"), consumer["METAVOICE_OUTPUT_DIR"]
    buckets = _minio_init_buckets()
    assert output.netloc in buckets, f"{output.netloc} is not made by minio-init (it makes {sorted(buckets)})"
    # The bucket exists before the consumer starts.
    assert SERVICES["consumer"]["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    # The dataset bucket is not the audio bucket, and sends no events: no event, no loop.
    audio = _compose_default(env("minio-init")["BUCKET"])
    assert output.netloc != audio and audio in buckets
    script = "\n".join(SERVICES["minio-init"]["command"])
    for line in script.splitlines():
        if "mc event add" in line:
            assert "$$BUCKET\"" in line or f"local/{audio}" in line, line
    # The output store is MinIO: its own endpoint and keys when set, else the audio's.
    endpoint = consumer.get("METAVOICE_OUTPUT_S3_ENDPOINT_URL", consumer["METAVOICE_S3_ENDPOINT_URL"])
    s3 = urlparse(endpoint)
    assert (s3.hostname, s3.port) == ("minio", _flag_port(SERVICES["minio"]["command"], "--address"))
    minio = env("minio")
    assert consumer.get("METAVOICE_OUTPUT_S3_ACCESS_KEY_ID", consumer["METAVOICE_S3_ACCESS_KEY_ID"]) == minio["MINIO_ROOT_USER"]
    assert (consumer.get("METAVOICE_OUTPUT_S3_SECRET_ACCESS_KEY", consumer["METAVOICE_S3_SECRET_ACCESS_KEY"])
            == minio["MINIO_ROOT_PASSWORD"])
    # Events naming the dataset bucket are refused unread.
    allowed = {b.strip() for b in _compose_default(consumer.get("METAVOICE_ALLOWED_BUCKETS", "")).split(",") if b.strip()}
    assert allowed and output.netloc not in allowed
    # The consumer's command does not override the output with a flag.
    assert "--output" not in SERVICES["consumer"]["command"]


def test_the_consumer_spools_and_caches_models_on_named_volumes_owned_by_its_user():
    consumer = env("consumer")
    mounts = {v.split(":")[1]: v.split(":")[0] for v in SERVICES["consumer"]["volumes"]}
    spool = consumer["METAVOICE_SPOOL_DIR"]
    assert spool in mounts and mounts[spool] in COMPOSE["volumes"], f"{spool} is not on a named volume"
    stage = dockerfile_stage("consumer")
    hf_home = re.search(r"HF_HOME=(\S+)", stage).group(1)
    assert mounts.get(hf_home) in COMPOSE["volumes"], "the model cache is not on a named volume"
    # A fresh named volume copies the ownership of the image's directory: it must be the user's.
    made = re.search(r"mkdir -p ([^\n\\&]+)", stage).group(1).split()
    chown = re.search(r"chown -R metavoice ([^\n\\&]+)", stage).group(1).split()
    for path in (spool, hf_home):
        assert path in made, f"the image does not make {path}"
        assert any(path == c or path.startswith(c.rstrip("/") + "/") for c in chown), f"{path} is not chowned"


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


def test_everything_the_dockerfile_copies_exists_and_is_in_the_build_context():
    for line in re.findall(r"^COPY\s+(?!--from)(.+)$", DOCKERFILE, re.M):
        *sources, _dest = line.split()
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: missing"
            assert source == "." or in_build_context(source), f"COPY {source} is dockerignored"
    # What `pip install .` reads: pyproject.toml and the README and LICENSE it names.
    for needed in ("pyproject.toml", PYPROJECT["project"]["readme"], *PYPROJECT["project"]["license-files"],
                   "deploy/constraints.txt", "deploy/requirements.py", "pipeline/config.py", "producer/cli.py"):
        assert in_build_context(needed), f"{needed} is dockerignored, the image build needs it"
    # Secrets and what no image needs stay out.
    for kept_out in (".env", ".env.production", "pipeline/.env", ".git/config", "tests/test_compose.py", "docs/deployment.md",
                     "deploy/k8s/consumer.yaml", "output/data/part.parquet", "pipeline/__pycache__/config.cpython-311.pyc",
                     "metavoice_stream.egg-info/PKG-INFO"):
        assert not in_build_context(kept_out), f"{kept_out} would enter the build context"


def test_every_package_pyproject_installs_enters_the_build_context():
    patterns = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = [d.name for d in ROOT.iterdir() if (d / "__init__.py").is_file()
                and any(re.fullmatch(p.replace("*", ".*"), d.name) for p in patterns)]
    assert {"pipeline", "broker", "consumer", "producer", "metavoice", "benchmark"} <= set(packages)
    for package in packages:
        assert in_build_context(f"{package}/__init__.py"), f"{package}/ is installed by pyproject.toml but dockerignored"
    # ... and every top-level package of the repository is one pyproject.toml installs (tests/ aside).
    top_level = {d.name for d in ROOT.iterdir() if (d / "__init__.py").is_file()} - {"tests"}
    assert top_level == set(packages), f"top-level packages pyproject.toml does not install: {sorted(top_level - set(packages))}"


def test_the_images_install_their_extras_with_the_pinned_constraints():
    producer, consumer = dockerfile_stage("producer"), dockerfile_stage("consumer")
    # The producer image: the base dependencies only, no extra.
    assert re.search(r"python deploy/requirements\.py > ", producer), "the producer stage lists the base only"
    assert "-c deploy/constraints.txt -r /tmp/requirements.txt" in producer
    assert re.search(r"pip install --no-deps .*\s\.\s", producer)
    # The GPU image: the consumer's and the codecs' extras, so encodec/dac/mimi work in it.
    assert re.search(r"python deploy/requirements\.py consumer codec > ", consumer)
    assert "-c deploy/constraints.txt -r /tmp/requirements.txt" in consumer
    # ... and torch at the pinned version, its CUDA build from TORCH_INDEX.
    assert "--index-url ${TORCH_INDEX}" in consumer and "grep -E '^torch==' deploy/constraints.txt" in consumer
    for extra in ("consumer", "codec"):
        assert extra in PYPROJECT["project"]["optional-dependencies"]


def test_the_constraints_pin_every_dependency_within_pyproject_bounds():
    listed = subprocess.run([sys.executable, str(ROOT / "deploy" / "requirements.py"), "consumer", "codec"],
                            capture_output=True, text=True, check=True).stdout.split()
    assert listed
    for line in listed:
        requirement = Requirement(line)
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        assert name in CONSTRAINTS, f"{name} is installed in the images but not pinned in deploy/constraints.txt"
        assert requirement.specifier.contains(Version(CONSTRAINTS[name]), prereleases=True), (
            f"deploy/constraints.txt pins {name}=={CONSTRAINTS[name]}, outside pyproject.toml's {requirement}")
    for name, version in CONSTRAINTS.items():
        assert "+" not in version, f"{name}=={version}: a local label would tie the images to one build"


def test_the_producer_image_needs_none_of_the_gpu_stack():
    probe = (
        "import sys, producer.cli, producer.webhook, producer.r2_queue, producer.backfill;"
        "print(','.join(m for m in ('torch', 'faster_whisper', 'ctranslate2', 'numpy', 'pyarrow', 'prefect',"
        " 'soundfile', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
    # ... and the base install the producer image gets carries none of it either
    # (tests/test_packaging.py runs the producers in a venv holding only that install).
    base = {re.sub(r"[-_.]+", "-", Requirement(r).name).lower() for r in PYPROJECT["project"]["dependencies"]}
    assert not base & {"torch", "faster-whisper", "ctranslate2", "numpy", "pyarrow", "prefect", "soundfile", "transformers"}


# --- Prefect and Kubernetes ------------------------------------------------------------------------


def test_prefect_deployments_point_at_a_flow_that_exists_and_is_in_the_image():
    for d in PREFECT["deployments"]:
        path, _, func = d["entrypoint"].partition(":")
        tree = ast.parse((ROOT / path).read_text())
        [fn] = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == func]
        assert any("flow" in ast.unparse(dec) for dec in fn.decorator_list), f"{func} is not a Prefect flow"
        assert set(d.get("parameters", {})) <= {a.arg for a in fn.args.args}
        assert d["concurrency_limit"] <= Settings.model_fields["topic_partitions"].default
        assert in_build_context(path) and re.search(r"^COPY \. \.", dockerfile_stage("consumer"), re.M), path


def test_prefect_yaml_names_the_prefect_the_images_install():
    [spec] = [Requirement(r) for r in PYPROJECT["project"]["optional-dependencies"]["consumer"]
              if Requirement(r).name == "prefect"]
    assert str(PREFECT["prefect-version"]) == CONSTRAINTS["prefect"]
    assert spec.specifier.contains(Version(str(PREFECT["prefect-version"])))


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


def _containers(doc: dict) -> list[dict]:
    return doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])


def test_every_image_we_build_is_tagged_with_the_project_version():
    version = PYPROJECT["project"]["version"]
    images = [(f"k8s:{d['metadata']['name']}", c["image"]) for d in K8S for c in _containers(d)]
    images += [(f"prefect:{d['name']}", d["work_pool"]["job_variables"]["image"])
               for d in PREFECT["deployments"] if "image" in d["work_pool"]["job_variables"]]
    images += [(f"compose:{name}", svc["image"]) for name, svc in SERVICES.items() if svc.get("build")]
    assert len(images) >= 6
    for where, image in images:
        name, _, tag = image.rpartition(":")
        assert name.rsplit("/", 1)[-1] in {"metavoice-consumer", "metavoice-producer"}, f"{where}: {image}"
        assert tag == version, f"{where}: {image} is not tagged {version} (pyproject.toml's version)"
    for doc in K8S:
        for c in _containers(doc):
            assert not c["image"].endswith(":latest") and ":" in c["image"].rsplit("/", 1)[-1], c["image"]


def test_kubernetes_consumers_keep_their_model_cache_on_a_persistent_volume():
    [deployment] = [d for d in K8S if d["kind"] == "Deployment" and d["metadata"]["name"] == "metavoice-consumer"]
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    hf_home = re.search(r"HF_HOME=(\S+)", dockerfile_stage("consumer")).group(1)
    [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == hf_home]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert "emptyDir" not in volume
    claim = volume["persistentVolumeClaim"]["claimName"]
    [pvc] = [d for d in K8S if d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"] == claim]
    # Every replica mounts it, on whichever node it runs.
    assert deployment["spec"]["replicas"] == 1 or "ReadWriteMany" in pvc["spec"]["accessModes"]


def test_the_webhook_is_probed_on_a_route_it_serves():
    routes = set(re.findall(r"add_get\(\s*\"([^\"]+)\"", (ROOT / "producer" / "webhook.py").read_text()))
    assert routes, "producer/webhook.py registers no GET route"
    [deployment] = [d for d in K8S if d["kind"] == "Deployment" and d["metadata"]["name"] == "metavoice-webhook"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    port_names = {p["name"] for p in container["ports"]}
    port = int(_flag(container["command"], "--port"))
    for probe in ("readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] in routes, f"{probe} asks {get['path']}, the webhook serves {sorted(routes)}"
        assert get["port"] in port_names
        assert next(p["containerPort"] for p in container["ports"] if p["name"] == get["port"]) == port


@pytest.mark.parametrize("doc", WORKLOADS, ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_kubernetes_workloads_run_as_the_images_non_root_user(doc):
    pod = doc["spec"]["template"]["spec"]
    uid = int(re.search(r"useradd .*--uid (\d+)", DOCKERFILE).group(1))
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == uid
