"""The shipped dashboard and alert rules query only metrics the consumer really exports: names are
read from a running consumer's /metrics endpoint, not grepped from source. promtool (Debian's
prometheus package, ~100 MB installed) is not installed, so the rules' structure is checked here."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from consumer.app import StreamConsumer
from pipeline.config import Settings

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy/grafana/metavoice.json"
ALERTS = ROOT / "deploy/prometheus/alerts.yml"
# What a family of each type exposes as series names (prometheus_client's text format).
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "gauge": ("",), "info": ("_info",), "summary": ("_sum", "_count", "_created", "")}
METRIC = re.compile(r"\b((?:metavoice|process|python)_[a-zA-Z0-9_]+)\b")
DURATION = re.compile(r"^\d+[smhd]$")


async def exported_names(tmp_path: Path) -> set[str]:
    """Series names a real consumer's metrics endpoint serves (port 0: a free one)."""
    app = StreamConsumer(Settings(output_dir=tmp_path / "out", prefect_enabled=False, metrics_port=0))
    async with app.operations.running() as ops, aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{ops.server.port}/metrics") as r:
            assert r.status == 200
            text = await r.text()
    names = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + s for s in SUFFIXES.get(family.type, ("",)))
        names.update(s.name for s in family.samples)
    return names


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dash["templating"]["list"] if "definition" in v]
    return exprs


def alert_rules() -> list[dict]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


async def test_every_dashboard_and_alert_query_names_an_exported_metric(tmp_path):
    names = await exported_names(tmp_path)
    assert "metavoice_ready" in names and "metavoice_environment_fault_seconds" in names
    exprs = dashboard_exprs() + [r["expr"] for r in alert_rules()]
    unknown = {m: e for e in exprs for m in METRIC.findall(e) if m not in names}
    assert not unknown, f"queries name metrics the consumer does not export: {unknown}"
    assert all(METRIC.search(e) for e in exprs), "every query reads at least one consumer metric"


def test_the_dashboard_covers_what_operators_watch():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["__inputs"][0]["type"] == "datasource" and dash["uid"]  # importable with a datasource prompt
    joined = " ".join(dashboard_exprs())
    for metric in ("metavoice_rows_written_total", "metavoice_audio_seconds_total", "metavoice_consumer_lag",
                   "metavoice_realtime_factor", "metavoice_stage_duration_seconds_bucket",
                   "metavoice_events_dead_lettered_total", "metavoice_environment_faults_total",
                   "metavoice_device_memory_bytes"):
        assert metric in joined, metric
    assert "histogram_quantile(0.95" in joined
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_alert_rules_are_well_formed():
    rules = alert_rules()
    assert {r["alert"] for r in rules} >= {"MetavoiceLagGrowing", "MetavoiceNotReady", "MetavoiceDeadLetterRate",
                                           "MetavoiceFaultTimeoutNear", "MetavoiceStuck"}
    for r in rules:
        assert set(r) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}, r
        assert DURATION.match(str(r["for"])), r
        assert r["labels"]["severity"] in ("warning", "critical") and r["annotations"]["summary"], r
        assert r["expr"].count("(") == r["expr"].count(")"), r


@pytest.mark.parametrize("lasted", [0.0, 10.0])
async def test_fault_seconds_follow_the_current_fault(tmp_path, lasted):
    """The fault-timeout alert reads how long the current fault has lasted and the limit."""
    app = StreamConsumer(Settings(output_dir=tmp_path / "out", prefect_enabled=False, metrics_port=0))
    if lasted:
        app.environment.since = time.monotonic() - lasted
    async with app.operations.running() as ops, aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{ops.server.port}/metrics") as r:
            text = await r.text()
    got = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert got["metavoice_environment_fault_timeout_seconds"] == app.settings.fault_timeout_s
    assert lasted <= got["metavoice_environment_fault_seconds"] < lasted + 5
    assert got["metavoice_ready"] == 0  # no broker, no models: not ready, and the scrape says so
