"""Prefect is bookkeeping: an outage of its API costs run records, never data (pipeline/flows.py).

Against a real Prefect server on PostgreSQL (tests/prefect_server.py), the real broker and S3
server, and consumer child processes (`FakeWhisper`: the model is beside the point). Each test
reads back state - finalized Parquet files, the dead-letter topic, the group's committed offsets,
the consumer's /metrics and what the Prefect API recorded - never logs alone.

- The server stopped mid-stream: batches run bare (no dead letter, nothing committed that the files
  do not hold), the metrics say so, run records resume once it is back, and a SIGTERM while it is
  down again still exits 0 with everything committed.
- Prefect down at start-up: the consumer runs without the parent flow run, and exits 0 when idle.
- Nothing Prefect records (flow-run parameters, task runs, logs, events) holds a credential.
- The deployment entry (deploy/prefect_flow.py, run by `prefect.engine` as a worker runs it)
  drains, finalizes and commits on SIGTERM and exits 0.

The first tests (fast, no services) pin how pipeline/flows.py tells Prefect's failures from ours,
with stand-ins for the flows: the same `_guarded` watchdog, registry and state the real ones use.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from datetime import datetime, timedelta, timezone

import httpx
import orjson
import pytest

from pipeline import flows
from pipeline.batch import BatchOutcome, MicroBatch
from pipeline.config import Settings
from pipeline.errors import FatalError
from pipeline.events import ObjectEvent
from pipeline.ledger import OutputLedger
from metavoice.local_services import MOTO_CREDENTIALS, free_port
from tests.conftest import consume_until_idle, read_topic
from tests.consumer_process import (
    ConsumerProcess,
    assert_exactly_once,
    assert_offsets_contiguous,
    assert_summary_matches_files,
    committed_offsets,
    create_topics,
    fake_models,
    logs_on_failure,
    partition_ends,
    publish,
    upload_copies,
    versions,
    wait_for_rows,
)
from tests.prefect_server import prefect_server  # noqa: F401  (the session fixture)

PREFECT_TIMEOUT_S = 3.0  # METAVOICE_PREFECT_TIMEOUT_S in the children: a dead API stalls a batch this long at most


@pytest.fixture
def prefect_api(prefect_server):  # noqa: F811
    """The session's Prefect server, running (a test before may have left it stopped)."""
    if not prefect_server.running:
        prefect_server.start()
    return prefect_server


def stream_settings(settings_factory, **overrides):
    base = dict(prefect_enabled=True, batch_max_events=2, roll_max_rows=4, exit_when_idle=None, shutdown_timeout=20.0)
    return settings_factory(**{**base, **overrides})


def prefect_metrics(port: int) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return {name: float(value) for name, _, value in (line.partition(" ") for line in text.splitlines())
            if name.startswith("metavoice_prefect_")}


def wait_until(what: str, check, timeout: float, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g}s")
        time.sleep(interval)


def completed(runs: list[dict]) -> list[dict]:
    return [r for r in runs if r["state_type"] == "COMPLETED"]


def started_between(runs: list[dict], after: datetime, before: datetime | None = None) -> list[dict]:
    def t(r):
        return datetime.fromisoformat(r["start_time"]) if r.get("start_time") else None

    return [r for r in runs if t(r) and t(r) > after and (before is None or t(r) < before)]


def assert_every_event_once_and_committed(st, events) -> None:
    """Exactly once in the files, no dead letter, summary agrees, commits at the end of the log."""
    assert_exactly_once(st.output_dir, versions(events))
    assert_summary_matches_files(st.output_dir)
    assert read_topic(st, st.dlq_topic, expected=0, timeout=3) == [], "Prefect's outage dead-lettered something"
    ends = partition_ends(st, expected=len(events))
    assert sum(ends.values()) == len(events)
    assert_offsets_contiguous(st.output_dir, ends)
    assert committed_offsets(st) == {p: (end or None) for p, end in ends.items()}


# --- how a Prefect failure is told from ours (stand-in flows, no services) ------------------------
class Stages:
    """Stand-ins for the flows and the bare stages; counts what ran."""

    def __init__(self) -> None:
        self.bare = 0
        self.flows = 0

    async def run_stages(self, ctx):
        self.bare += 1
        return BatchOutcome(timings={"bare": 1.0})

    def flow(self, before=None, body=None, after=None):
        """A stand-in `process_micro_batch`: Prefect's part (`before`, `after`) around our stages (`body`)."""

        async def process_micro_batch(ref: str, label: str):
            self.flows += 1
            ctx = flows._REGISTRY[ref]
            if before:
                await before()
            try:
                with ctx.watch.ours():
                    if body:
                        await body()
                    outcome = ctx.watch.finish(BatchOutcome(timings={"flow": 1.0}))
            finally:  # Prefect records the end, whatever it was
                if after:
                    await after()
            return outcome

        return process_micro_batch


@pytest.fixture
def orchestration(monkeypatch):
    monkeypatch.setattr(flows, "PROBE_FIRST_S", 0.05)
    o = flows.Orchestration()
    o._api_started = True  # no ephemeral API in a unit test

    async def no_answer():
        return httpx.ConnectError("down")

    monkeypatch.setattr(o, "_health", no_answer)  # the probe never reaches a real Prefect here
    monkeypatch.setattr(flows, "ORCHESTRATION", o)
    stages = Stages()
    monkeypatch.setattr(flows, "run_stages", stages.run_stages)
    yield o, stages
    if o._probe is not None:  # the session's event loop outlives the test
        o._probe.cancel()


def batch_call(timeout_s: float = 0.5):
    settings = Settings(prefect_enabled=True, prefect_timeout_s=timeout_s)
    return flows.process_batch(MicroBatch(seq=1, items=[]), None, None, settings)  # type: ignore[arg-type]


async def refused():
    raise httpx.ConnectError("All connection attempts failed")


async def test_an_unreachable_api_runs_the_batch_bare_and_marks_prefect_degraded(orchestration, monkeypatch):
    o, stages = orchestration
    monkeypatch.setattr(flows, "process_micro_batch", stages.flow(before=refused))
    outcome = await batch_call()
    assert outcome.timings == {"bare": 1.0}
    assert (o.failures, o.bare_batches, o.degraded) == (1, 1, True)
    assert not flows._REGISTRY


async def test_an_exception_raised_by_a_stage_propagates_even_when_prefect_then_fails_too(orchestration, monkeypatch):
    o, stages = orchestration

    async def stage_bug():
        raise ValueError("a bug in a stage")

    monkeypatch.setattr(flows, "process_micro_batch", stages.flow(body=stage_bug))
    with pytest.raises(ValueError, match="a bug in a stage"):
        await batch_call()
    assert (o.failures, o.bare_batches, o.degraded, stages.bare) == (0, 0, False, 0)

    # Prefect cannot record the failure: its error must not hide ours
    monkeypatch.setattr(flows, "process_micro_batch", stages.flow(body=stage_bug, after=refused))
    with pytest.raises(ValueError, match="a bug in a stage"):
        await batch_call()
    assert (o.failures, stages.bare) == (0, 0)


async def test_a_slow_api_stalls_a_batch_at_most_prefect_timeout_but_slow_stages_are_never_cut(orchestration, monkeypatch):
    o, stages = orchestration
    monkeypatch.setattr(flows, "process_micro_batch", stages.flow(before=lambda: asyncio.sleep(30)))
    t0 = time.monotonic()
    outcome = await batch_call(timeout_s=0.5)
    assert outcome.timings == {"bare": 1.0} and time.monotonic() - t0 < 2.0
    assert (o.failures, o.bare_batches) == (1, 1)

    o.succeeded()
    monkeypatch.setattr(flows, "process_micro_batch", stages.flow(body=lambda: asyncio.sleep(1.5)))
    assert (await batch_call(timeout_s=0.5)).timings == {"flow": 1.0}  # 1.5 s of stages, 0.5 s budget
    assert o.failures == 1

    # the stages finished, then Prefect hung recording the end: the outcome is kept, nothing reruns
    monkeypatch.setattr(flows, "process_micro_batch", stages.flow(after=lambda: asyncio.sleep(30)))
    assert (await batch_call(timeout_s=0.5)).timings == {"flow": 1.0}
    assert (o.failures, stages.bare) == (2, 1)


async def test_while_degraded_batches_skip_prefect_until_the_probe_answers_then_runs_resume(orchestration, monkeypatch):
    o, stages = orchestration
    monkeypatch.setattr(flows, "process_micro_batch", stages.flow(before=refused))
    health: list[BaseException | None] = [httpx.ConnectError("down"), None]

    async def probe():
        return health.pop(0) if len(health) > 1 else health[0]

    monkeypatch.setattr(o, "_health", probe)
    await batch_call()
    assert o.degraded and stages.flows == 1
    await batch_call()  # skipped: no second stall
    assert stages.flows == 1 and o.bare_batches == 2
    await asyncio.wait_for(_until(lambda: o._retry), 5)  # a failed probe, a backoff, a good probe
    monkeypatch.setattr(flows, "process_micro_batch", stages.flow())
    assert (await batch_call()).timings == {"flow": 1.0}
    assert not o.degraded and stages.flows == 2


async def test_the_consumer_runs_without_its_parent_flow_run_when_prefect_cannot_start_it(orchestration, monkeypatch):
    o, _ = orchestration
    ran = []

    async def consumer():
        ran.append(True)
        return "stats"

    async def lifetime_refused(ref, group, topic):
        await refused()

    monkeypatch.setattr(flows, "consumer_lifetime", lifetime_refused)
    assert await flows.consumer_flow(consumer, "g", "t", timeout_s=0.5) == "stats"
    assert ran == [True] and o.degraded and o.failures == 1

    async def lifetime(ref, group, topic):
        watch, run = flows._LIFETIMES[ref]
        with watch.ours():
            return watch.finish(await run())

    async def consumer_fails():
        raise FatalError("the consumer's own failure")

    monkeypatch.setattr(flows, "consumer_lifetime", lifetime)
    with pytest.raises(FatalError):
        await flows.consumer_flow(consumer_fails, "g", "t", timeout_s=0.5)
    assert o.failures == 1


async def test_cancelling_the_deployment_flow_drains_and_commits_before_the_cancellation_is_raised():
    from deploy.prefect_flow import run_until_stopped

    class Consumer:  # StreamConsumer's lifetime, reduced to what run_until_stopped uses
        def __init__(self) -> None:
            self.stop, self.reason, self.drained = asyncio.Event(), "", False

        def install_signal_handlers(self) -> None:
            raise ValueError("set_wakeup_fd only works in main thread")  # a run off the main thread

        def request_stop(self, reason: str) -> None:
            self.reason = reason
            self.stop.set()

        async def run(self) -> str:
            await self.stop.wait()
            await asyncio.sleep(0.2)  # drain, finalize, commit
            self.drained = True
            return "stats"

    consumer = Consumer()
    flow_run = asyncio.ensure_future(run_until_stopped(consumer))  # type: ignore[arg-type]
    await asyncio.sleep(0.1)
    flow_run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await flow_run
    assert consumer.reason == "flow run cancelled" and consumer.drained


async def _until(check, interval: float = 0.02) -> None:
    while not check():
        await asyncio.sleep(interval)


# --- against a real Prefect server ---------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.slow
def test_a_prefect_outage_mid_stream_costs_run_records_never_data(
    services, s3, bucket, settings_factory, speech_corpus, prefect_api, tmp_path
):
    st = stream_settings(settings_factory)
    events = upload_copies(s3, bucket, [c.path for c in speech_corpus[:2]], 24)
    create_topics(st)
    since = datetime.now(timezone.utc) - timedelta(seconds=1)
    port = free_port()
    proc = ConsumerProcess(
        services, st, tmp_path / "consumer.log", PREFECT_API_URL=prefect_api.api_url,
        METAVOICE_PREFECT_TIMEOUT_S=str(PREFECT_TIMEOUT_S), METAVOICE_METRICS_PORT=str(port),
    ).start()
    try:
        with logs_on_failure(proc):
            # 1. Prefect up: micro-batches are flow runs under the consumer's parent run
            publish(st, events[:8])
            wait_for_rows(st.output_dir, 8, timeout=90)
            wait_until("micro-batch flow runs recorded",
                       lambda: completed(prefect_api.flow_runs(since, "process-micro-batch")), timeout=30)
            assert prefect_metrics(port)["metavoice_prefect_degraded"] == 0

            # 2. the server stops mid-stream: the stream goes on, bare
            prefect_api.stop()
            stopped_at = datetime.now(timezone.utc)
            publish(st, events[8:16])
            wait_for_rows(st.output_dir, 16, timeout=60)
            m = prefect_metrics(port)
            assert m["metavoice_prefect_degraded"] == 1
            assert m["metavoice_prefect_unavailable_total"] >= 1
            assert m["metavoice_prefect_bare_batches_total"] >= 1
            assert proc.proc.poll() is None, "the consumer died with Prefect"

            # 3. it comes back: the probe notices, and micro-batches are flow runs again
            prefect_api.start()
            restarted_at = datetime.now(timezone.utc)
            proc.wait_for_log("Prefect API answers its health check again", timeout=60)
            publish(st, events[16:])
            wait_for_rows(st.output_dir, 24, timeout=60)
            resumed = wait_until(
                "micro-batch flow runs after the restart",
                lambda: completed(started_between(prefect_api.flow_runs(since, "process-micro-batch"), restarted_at)),
                timeout=30)
            assert prefect_metrics(port)["metavoice_prefect_degraded"] == 0

            # 4. down again, and SIGTERM: drain, finalize, commit, exit 0 - without Prefect
            prefect_api.stop()
            proc.signal(signal.SIGTERM)
            t0 = time.monotonic()
            rc = proc.wait(timeout=st.shutdown_timeout + 30)
            took = time.monotonic() - t0
            assert rc == 0, proc.log()[-3000:]
            assert took < st.shutdown_timeout + PREFECT_TIMEOUT_S + 10, f"SIGTERM took {took:.1f}s"
    finally:
        proc.kill()
        prefect_api.start()

    assert_every_event_once_and_committed(st, events)
    batches = prefect_api.flow_runs(since, "process-micro-batch")
    before = completed(started_between(batches, since, stopped_at))
    assert before, "no micro-batch was recorded before the outage"
    assert resumed
    [parent] = prefect_api.flow_runs(since, "metavoice-consumer")  # created before the outage, survived it
    assert parent["parameters"]["group"] == st.group


@pytest.mark.integration
@pytest.mark.slow
def test_a_consumer_started_while_prefect_is_down_processes_everything_and_exits_0(
    services, s3, bucket, settings_factory, speech_corpus, tmp_path
):
    st = stream_settings(settings_factory, exit_when_idle=2.0)
    events = upload_copies(s3, bucket, [speech_corpus[0].path], 6)
    create_topics(st)
    publish(st, events)
    nowhere = f"http://127.0.0.1:{free_port()}/api"  # nothing listens there
    proc = ConsumerProcess(services, st, tmp_path / "consumer.log", PREFECT_API_URL=nowhere,
                           METAVOICE_PREFECT_TIMEOUT_S=str(PREFECT_TIMEOUT_S)).start()
    try:
        with logs_on_failure(proc):
            assert proc.wait(timeout=90) == 0, proc.log()[-3000:]
            assert "Prefect unavailable (the consumer's flow run" in proc.log()
    finally:
        proc.kill()
    assert_every_event_once_and_committed(st, events)


@pytest.mark.integration
@pytest.mark.slow
def test_prefect_records_no_credential_in_run_parameters_task_runs_logs_or_events(
    services, s3, bucket, settings_factory, speech_corpus, prefect_api, tmp_path
):
    secrets = {
        "METAVOICE_S3_ACCESS_KEY_ID": f"AKIA{uuid.uuid4().hex[:16].upper()}",
        "METAVOICE_S3_SECRET_ACCESS_KEY": f"s3-{uuid.uuid4().hex}{uuid.uuid4().hex}",
        "METAVOICE_KAFKA_SASL_USERNAME": f"user-{uuid.uuid4().hex}",  # no mechanism: held, not used
        "METAVOICE_KAFKA_SASL_PASSWORD": f"sasl-{uuid.uuid4().hex}",
        "METAVOICE_WEBHOOK_TOKEN": f"tok-{uuid.uuid4().hex}",
        "METAVOICE_WEBHOOK_HMAC_SECRET": f"hmac-{uuid.uuid4().hex}",
        "METAVOICE_CF_API_TOKEN": f"cf-{uuid.uuid4().hex}",
    }
    st = stream_settings(settings_factory, exit_when_idle=2.0)
    events = upload_copies(s3, bucket, [speech_corpus[0].path], 4)
    s3.put_object(Bucket=bucket, Key="bad.flac", Body=b"not audio")  # a failure, logged and dead-lettered
    bad = ObjectEvent(bucket=bucket, key="bad.flac", size=9)
    create_topics(st)
    publish(st, [*events, bad])
    since = datetime.now(timezone.utc) - timedelta(seconds=1)
    proc = ConsumerProcess(
        services, st, tmp_path / "consumer.log",
        unset=tuple(MOTO_CREDENTIALS),  # the METAVOICE_S3_* pair is the only way in: rows prove it is used
        PREFECT_API_URL=prefect_api.api_url, PREFECT_LOGGING_LEVEL="DEBUG",
        PREFECT_LOGGING_EXTRA_LOGGERS="consumer,pipeline",  # our own log lines go to the API too
        METAVOICE_LOG_LEVEL="DEBUG", **secrets,
    ).start()
    try:
        with logs_on_failure(proc):
            assert proc.wait(timeout=90) == 0, proc.log()[-3000:]
    finally:
        proc.kill()
    assert_exactly_once(st.output_dir, versions(events))  # S3 was reached with these credentials

    runs = prefect_api.flow_runs(since)
    batch_runs = [r for r in runs if r["parameters"].keys() == {"ref", "label"}]
    assert batch_runs and any(r["parameters"].keys() == {"ref", "group", "topic"} for r in runs)
    ids = [r["id"] for r in runs]
    tasks = wait_until("task runs recorded", lambda: [t for t in prefect_api.task_runs(ids)
                                                      if t["name"].startswith("tokenize")], timeout=30)
    logs = prefect_api.logs(ids)
    assert any(entry["name"].startswith("consumer") for entry in logs), "the consumer's own log lines did not reach Prefect"
    places = {
        "flow runs": orjson.dumps(runs),
        "task runs": orjson.dumps(prefect_api.task_runs(ids)),
        "logs": orjson.dumps(logs),
        "events": prefect_api.events(since),
    }
    assert tasks and logs and b"prefect.task-run." in places["events"]
    for where, content in places.items():
        for name, value in secrets.items():
            assert value.encode() not in content, f"{name} leaked into Prefect's {where}"


@pytest.mark.integration
@pytest.mark.slow
def test_sigterm_to_the_deployment_flow_run_drains_finalizes_and_commits_and_exits_0(
    services, s3, bucket, settings_factory, speech_corpus, prefect_api, tmp_path
):
    st = stream_settings(settings_factory, shutdown_timeout=15.0)
    events = upload_copies(s3, bucket, [c.path for c in speech_corpus[:2]], 30)
    create_topics(st)
    publish(st, events)
    run_id = prefect_api.create_deployment_run(
        f"test-{uuid.uuid4().hex[:8]}", {"group": st.group, "topic": st.topic, "output_dir": str(st.output_dir)})
    proc = ConsumerProcess(services, st, tmp_path / "engine.log", PREFECT_API_URL=prefect_api.api_url,
                           METAVOICE_TEST_WHISPER_DELAY="0.15")
    proc.argv = [proc.argv[0], "-c", "from tests.prefect_server import deployment_child_main; deployment_child_main()", run_id]
    proc.start()
    try:
        with logs_on_failure(proc):
            proc.wait_for_log("batch 2:", timeout=90)  # mid-stream: micro-batches applied, more in flight
            proc.signal(signal.SIGTERM)
            rc = proc.wait(timeout=st.shutdown_timeout + 15)
            assert rc == 0, proc.log()[-3000:]
            assert "stopping: SIGTERM" in proc.log()
    finally:
        proc.kill()

    # everything fetched was finalized and committed; what the broker calls committed is in the files
    held = OutputLedger(st.output_dir, group=st.group)
    held.refresh()
    stopped_at = committed_offsets(st)
    assert any(o is not None for o in stopped_at.values())
    for p, off in stopped_at.items():
        assert off == held.next_offset(st.topic, p), "a graceful stop commits exactly what its files hold"
    assert sum(o or 0 for o in stopped_at.values()) < len(events), "SIGTERM came too late to test anything"
    assert prefect_api.flow_run(run_id)["state_type"] == "COMPLETED"

    models = fake_models()  # a restart does the rest, exactly once
    try:
        consume_until_idle(st.model_copy(update={"prefect_enabled": False, "exit_when_idle": 1.0}), models)
    finally:
        models.close()
    assert_every_event_once_and_committed(st, events)
