"""The compaction schedules (deploy/k8s/maintenance.yaml, deploy/prefect.yaml `compact-hourly`) agree
with the code and with the consumers they run beside (no cluster, no Prefect server needed)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml
from prefect.client.schemas.schedules import CronSchedule

from metavoice.cli import build_parser
from pipeline.config import Settings
from pipeline.output.maintenance import MIN_RETENTION_HOURS
from tests.delta_tables import append, row

ROOT = Path(__file__).resolve().parents[1]
K8S = [d for f in sorted((ROOT / "deploy" / "k8s").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
PREFECT = yaml.safe_load((ROOT / "deploy" / "prefect.yaml").read_text())
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
[CRONJOB] = [d for d in K8S if d["kind"] == "CronJob" and d["metadata"]["name"] == "metavoice-compact"]
POD = CRONJOB["spec"]["jobTemplate"]["spec"]["template"]["spec"]
[CONTAINER] = POD["containers"]
[CONSUMER] = [d for d in K8S if d["kind"] == "Deployment" and d["metadata"]["name"] == "metavoice-consumer"]
[COMPACT_DEPLOYMENT] = [d for d in PREFECT["deployments"] if d["entrypoint"].endswith(":compact_output")]


def _flag(command: list[str], flag: str) -> str | None:
    return command[command.index(flag) + 1] if flag in command else None


def test_the_cronjob_runs_metavoice_compact_with_flags_that_exist():
    command = CONTAINER["command"]
    assert command[:4] == ["python", "-m", "metavoice", "compact"]
    args = build_parser().parse_args(command[3:])  # exits (fails the test) on an unknown flag
    assert args.command == "compact" and not args.force_retention and not args.dry_run


def test_the_cronjob_compacts_the_output_the_consumers_write():
    [consumer] = CONSUMER["spec"]["template"]["spec"]["containers"]
    output = _flag(consumer["command"], "--output")
    assert CONTAINER["command"][4] == output
    [mount] = [m for m in CONTAINER["volumeMounts"] if m["mountPath"] == output]
    [volume] = [v for v in POD["volumes"] if v["name"] == mount["name"]]
    [consumer_volume] = [v for v in CONSUMER["spec"]["template"]["spec"]["volumes"] if v["name"] == "output"]
    assert volume["persistentVolumeClaim"] == consumer_volume["persistentVolumeClaim"]
    assert {s["configMapRef"]["name"] for s in CONTAINER["envFrom"] if "configMapRef" in s} <= {
        d["metadata"]["name"] for d in K8S if d["kind"] == "ConfigMap"}


def test_one_compaction_at_a_time_and_each_ends_before_the_next_is_due():
    spec = CRONJOB["spec"]
    CronSchedule(cron=spec["schedule"])  # a valid cron expression
    minute, hour = spec["schedule"].split()[:2]
    assert minute.isdigit() and hour == "*", "the bound below assumes an hourly schedule"
    assert spec["concurrencyPolicy"] == "Forbid"
    assert spec["jobTemplate"]["spec"]["activeDeadlineSeconds"] < 3600
    assert POD["restartPolicy"] in ("Never", "OnFailure")


def test_the_cronjob_image_user_and_settings_are_the_consumers():
    name, _, tag = CONTAINER["image"].rpartition(":")
    assert name.rsplit("/", 1)[-1] == "metavoice-consumer" and tag == VERSION
    uid = int(re.search(r"useradd .*--uid (\d+)", (ROOT / "Dockerfile").read_text()).group(1))
    assert POD["securityContext"]["runAsNonRoot"] is True and POD["securityContext"]["runAsUser"] == uid
    assert "nvidia.com/gpu" not in CONTAINER["resources"].get("limits", {})
    env = {e["name"]: e["value"] for e in CONTAINER["env"]}
    for key in env:
        assert key.removeprefix("METAVOICE_").lower() in Settings.model_fields, key
    assert int(env["METAVOICE_VACUUM_RETENTION_HOURS"]) >= MIN_RETENTION_HOURS


def test_the_prefect_schedule_runs_the_compaction_flow_one_at_a_time_on_the_consumers_output():
    d = COMPACT_DEPLOYMENT
    [schedule] = d["schedules"]
    CronSchedule(cron=schedule["cron"], timezone=schedule.get("timezone"))
    assert d["concurrency_limit"] == 1
    assert {c["parameters"]["output_dir"] for c in PREFECT["deployments"] if c is not d} == {d["parameters"]["output_dir"]}
    assert d["parameters"].get("retention_hours", MIN_RETENTION_HOURS) >= MIN_RETENTION_HOURS
    assert "gpu" not in d["work_pool"]["name"]


@pytest.mark.integration
def test_the_compaction_flow_compacts_a_table(tmp_path):
    """The entrypoint itself, called as its function (no Prefect server)."""
    from deploy.prefect_flow import compact_output

    out = tmp_path / "out"
    for i in range(5):
        append(out, [row(i)])
    result = compact_output.fn(output_dir=str(out), retention_hours=MIN_RETENTION_HOURS)
    assert (result["files_before"], result["files_after"], result["rows"]) == (5, 1, 5)
