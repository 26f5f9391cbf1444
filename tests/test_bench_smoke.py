"""The benchmark script runs end to end and reports every mode.

Deliberately no timing assertions: performance figures come from `python -m benchmark`
on a quiet machine (docs/benchmarks.md), never from a timed test on a shared runner. Nor does
the bench itself depend on timing: a stream run ends when every event it published is handled
(not on an idle timeout), and every wait it makes is bounded and names what it waited for.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmark import MODES, RATIOS
from benchmark.ceiling import CEILING_MODES

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent


def test_quick_bench_reports_every_mode_with_positive_throughput_and_the_ratios(tmp_path: Path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmark", "--quick", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=580,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())

    assert set(report["modes"]) | set(report["ceiling"]) == set(MODES)
    for name, mode in report["modes"].items():
        assert mode["files"] == report["corpus"]["clips"], name
        assert mode["audio_seconds"] > 0 and mode["wall_seconds"] > 0, name
        assert mode["throughput"] > 0, name
    assert set(report["ratios"]) == {f"{a}/{b}" for a, b in RATIOS}
    assert all(v is not None and v > 0 for v in report["ratios"].values())
    assert set(report["targets"]) >= {"pipeline/seed", "stream-ceiling/io-floor", "flow_runs_per_1000_events"}
    per_batch = report["prefect"]["per_batch_pipeline"]
    assert per_batch["batches"] >= 1 and per_batch["flow_runs"] >= 1
    assert report["latency"]["rows"] == report["latency"]["events"]
    assert report["latency"]["p50_s"] > 0
    assert "backlog" not in report  # --quick skips it
    assert "paired median" in proc.stdout and "pipeline/seed" in proc.stdout  # the printed tables and ratios


def test_quick_bench_measures_the_streams_ceiling_on_every_event_with_prefect_recording_runs(tmp_path: Path):
    out = tmp_path / "ceiling.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmark", "--quick", "--clips", "2", "--max-sec", "3", "--json", str(out),
         "--skip", "seed,bare,model,model-segment,model-score,pipeline,pipeline-no-prefect,latency", "--ceiling-events", "40",
         "--batch-max-events", "8"],
        cwd=ROOT, capture_output=True, text=True, timeout=580,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    ceiling = report["ceiling"]
    assert set(ceiling) == set(CEILING_MODES) and not report["modes"]
    for name, mode in ceiling.items():
        assert mode["files"] == 40 and mode["details"]["events_per_second"] > 0, name
    on, off = ceiling["stream-ceiling"]["details"], ceiling["stream-ceiling-no-prefect"]["details"]
    assert on["batches"] >= 1 and on["per_batch"]["flow_runs"] >= 1  # a flow run per micro-batch
    assert on["flow_runs_per_1000_events"] == pytest.approx(1000 * on["per_batch"]["flow_runs"] / 40)
    assert on["task_runs_per_1000_events"] > 0  # transcription off: one task run (tokenize) per flow run
    assert off["flow_runs_per_1000_events"] == 0
    assert report["ratios"]["stream-ceiling/io-floor"] > 0
    assert report["ratios"]["stream-ceiling/plain-floor"] > 0  # both yardsticks in one run
    assert report["ratios"]["stream-ceiling-backfill/plain-floor"] > 0 and report["ratios"]["stream-ceiling-backfill/io-floor"] > 0
    assert ceiling["stream-ceiling-backfill"]["details"]["backfill_seconds"] > 0
    assert report["targets"]["stream-ceiling-backfill/plain-floor"]["measured"] is not None
    plain = ceiling["plain-floor"]
    assert plain["details"]["download_concurrency"] == 8 and plain["audio_seconds"] == pytest.approx(ceiling["io-floor"]["audio_seconds"], rel=0.01)
    assert report["ratios"]["stream-ceiling/stream-ceiling-no-prefect"] > 0
    assert report["ratios"]["stream-ceiling-s3-output/stream-ceiling"] > 0
    assert ceiling["stream-ceiling-s3-output"]["details"]["output"].startswith("s3://")
    # the two floors' ratios side by side, three ways: best round, paired per round, per CPU-second
    for key in ("stream-ceiling-backfill/plain-floor", "stream-ceiling-backfill/io-floor"):
        assert report["ratios_paired"][key]["median"] > 0 and len(report["ratios_paired"][key]["rounds"]) == 1, key
        assert report["ratios_cpu"][key] > 0, key
        assert report["targets"].get(key, {"per_cpu_second": 1})["per_cpu_second"] is not None, key
        assert key in proc.stdout, key


def test_backlog_pass_compares_a_full_backlog_with_the_in_flight_batches_alone(tmp_path: Path):
    out = tmp_path / "backlog.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmark", "--clips", "4", "--max-sec", "4", "--json", str(out),
         "--skip", "seed,bare,model,pipeline,pipeline-no-prefect,latency," + ",".join(CEILING_MODES),
         "--backlog-events", "2000", "--backlog-seconds", "6"],
        cwd=ROOT, capture_output=True, text=True, timeout=580,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    b = json.loads(out.read_text())["backlog"]
    small, large = b["in_flight_only"], b["backlog"]
    assert large["events"] == 2000 and small["events"] < large["events"]
    for run in (small, large):
        assert run["peak_rss_mb"] >= run["rss_after_model_load_mb"] > 0
        assert run["records_fetched"] > 0
    # the consumer takes a bounded number of records ahead of its work (the in-flight-only run's
    # events: its batches in flight and waiting, at their largest), never the whole backlog
    assert large["records_fetched"] < large["events"]
    assert abs(b["growth_from_backlog_mb"] - (large["peak_rss_mb"] - small["peak_rss_mb"])) < 0.01
    assert "growth from the backlog" in " ".join(proc.stdout.split())  # rich wraps lines
