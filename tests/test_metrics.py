"""Operating the consumer: /metrics counts what was processed, /healthz and /readyz answer,
the batch log line is structured and free of secrets, the status line reads well on a TTY."""

from __future__ import annotations

import asyncio
import io
import logging
import socket
import time
from types import SimpleNamespace

import aiohttp
import orjson
import pytest
import soundfile as sf
from aiokafka.structs import TopicPartition
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from consumer.app import StreamConsumer
from consumer.committer import Latencies
from consumer.metrics import (
    STAGES,
    ConsumerMetrics,
    OperationsServer,
    Readiness,
    partition_lag,
    realtime_factor,
)
from consumer.status import StatusLine, StatusSnapshot, format_status
from pipeline.batch import BatchOutcome
from pipeline.config import Settings
from pipeline.errors import FatalError
from pipeline.logs import JsonFormatter
from pipeline.output.layout import SUMMARY_NAME

from .conftest import upload

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(m: Samples, name: str, **labels: str) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def total(m: Samples, name: str) -> float:
    return sum(v for (n, _), v in m.items() if n == name)


def labelled(m: Samples, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: v for (n, labels), v in m.items() if n == name}


async def get(http: aiohttp.ClientSession, port: int, path: str) -> tuple[int, str]:
    async with http.get(f"http://127.0.0.1:{port}{path}") as r:
        return r.status, await r.text()


async def until(predicate, timeout: float, task: asyncio.Task | None = None, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if task is not None and task.done():
            task.result()  # the consumer died: show why
            raise AssertionError(f"consumer stopped before {what}")
        got = await predicate()
        if got:
            return got
        await asyncio.sleep(0.25)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# --- the consumer, scraped while it runs -------------------------------------------------------
@pytest.mark.integration
@pytest.mark.slow
async def test_metrics_match_what_the_consumer_processed(services, s3, bucket, speech_corpus, settings_factory, models, unique):
    from producer.backfill import run_backfill

    clips = speech_corpus[:3]  # three rates, one stereo: enough, and Whisper on 2 shared CPU cores is slow
    upload(s3, bucket, clips)
    s3.put_object(Bucket=bucket, Key="clips/broken.flac", Body=b"definitely not audio")
    secret = f"secret-{unique}-value"
    settings = settings_factory(
        exit_when_idle=None, metrics_port=0, bucket=bucket, batch_max_events=2, log_format="json",
        kafka_session_timeout_ms=6_000,  # Tansu holds a first JoinGroup for about half the session timeout
        s3_access_key_id="testing", s3_secret_access_key=secret,
    )
    published = await run_backfill(settings, bucket, [], ".flac")
    assert published.published == len(clips) + 1
    expected_audio = sum(sf.info(str(c.path)).duration for c in clips)

    logs = io.StringIO()
    handler = logging.StreamHandler(logs)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    app = StreamConsumer(settings, models)
    task = asyncio.create_task(app.run())
    try:
        async with aiohttp.ClientSession() as http:

            async def port():
                server = app.operations.server
                return server.port if server is not None else None

            p = await until(port, 30, task, "the metrics server")
            assert (await get(http, p, "/healthz"))[0] == 200

            async def processed():
                m = parse((await get(http, p, "/metrics"))[1])
                done = value(m, "metavoice_rows_written_total") == len(clips) and total(m, "metavoice_events_dead_lettered_total") == 1
                return m if done else None

            await until(processed, 90, task, "every clip and the dead letter")

            async def settled():  # lag sampled after the last fetch, nothing in flight
                m = parse((await get(http, p, "/metrics"))[1])
                lag = labelled(m, "metavoice_consumer_lag")
                return m if lag and sum(lag.values()) == 0 and value(m, "metavoice_batches_in_flight") == 0 else None

            m = await until(settled, 15, task, "lag 0")
            status, body = await get(http, p, "/readyz")
            assert status == 200, body
            ready = orjson.loads(body)
            assert ready["ready"] and set(ready["checks"]) == {"broker", "s3", "models", "environment"}
            assert all(c["ok"] for c in ready["checks"].values())
            assert (await get(http, p, "/healthz"))[0] == 200
    finally:
        app.request_stop("test done")
        try:
            stats = await asyncio.wait_for(task, 60)
        finally:
            root.removeHandler(handler)
            root.setLevel(old_level)

    # counters agree with what was processed
    assert value(m, "metavoice_records_consumed_total") == len(clips) + 1
    assert value(m, "metavoice_events_dead_lettered_total", error_type="NotAudio") == 1
    assert value(m, "metavoice_audio_seconds_total") == pytest.approx(expected_audio, rel=0.01)
    assert value(m, "metavoice_batch_records_sum") == len(clips) + 1
    assert value(m, "metavoice_batch_records_count") == value(m, "metavoice_batches_total") >= 2
    for stage in STAGES:
        assert value(m, "metavoice_stage_duration_seconds_count", stage=stage) >= 1, stage
    assert 0 < value(m, "metavoice_realtime_factor") < 50
    assert value(m, "metavoice_device_memory_bytes", source="process_rss") > 50e6
    assert value(m, "metavoice_consumer_info", group=settings.group, topic=settings.topic) == 1
    assert {dict(k)["partition"] for k in labelled(m, "metavoice_consumer_lag")} <= {"0", "1", "2", "3"}

    # after the stop: the last file was finalized and committed, and counted
    final = parse(generate_latest(app.operations.registry).decode())
    assert stats.rows == len(clips) and stats.files >= 1
    assert value(final, "metavoice_files_finalized_total") == stats.files
    assert value(final, "metavoice_offset_commits_total") >= 1
    assert value(final, "metavoice_publish_to_finalized_seconds_count") >= 1
    summary = orjson.loads((settings.output_dir / SUMMARY_NAME).read_bytes())
    assert summary["total_files"] == value(final, "metavoice_rows_written_total")
    assert summary["errors"]["by_type"] == {"NotAudio": 1}

    # one structured line per batch, with the numbers an operator needs and no secret anywhere
    text = logs.getvalue()
    assert secret not in text
    lines = [orjson.loads(line) for line in text.splitlines() if line.startswith("{")]
    batches = [d for d in lines if d.get("logger") == "consumer.app" and "timings" in d]
    assert batches and all(
        {"batch", "label", "records", "events", "rows", "failed", "audio_seconds", "rtf", "offsets", "committed"} <= d.keys()
        for d in batches
    )
    assert sum(d["records"] for d in batches) == len(clips) + 1
    assert sum(d["rows"] for d in batches) == len(clips)
    assert sum(d["failed"] for d in batches) == 1
    assert sum(d["audio_seconds"] for d in batches) == pytest.approx(expected_audio, rel=0.01)
    assert all({"download", "decode", "transcribe", "tokenize", "write"} <= d["timings"].keys() for d in batches if d["rows"])
    assert all(len(first_last) == 2 for d in batches for first_last in d["offsets"].values())


# --- readiness against real and dead dependencies -----------------------------------------------
@pytest.mark.integration
async def test_readyz_names_the_dependency_that_is_missing(services, bucket, settings_factory):
    from pipeline.storage import s3_client

    app = StreamConsumer(settings_factory(bucket=bucket))
    ok, report = await app.operations.readiness.evaluate()
    assert not ok and {k: v["ok"] for k, v in report.items()} == {"broker": False, "s3": False, "models": False, "environment": True}

    app.models = SimpleNamespace(transcriber=SimpleNamespace(name="tiny.en", device="cpu"), tokenizer=SimpleNamespace(name="synthetic"))
    async with s3_client(app.settings) as s3:
        app.s3 = s3
        ok, report = await Readiness(app.operations.readiness.checks).evaluate()
        assert report["models"]["ok"] and report["s3"]["ok"], report
        assert not ok and report["broker"] == {"ok": False, "detail": "connecting"}

    dead = app.settings.model_copy(update={"s3_endpoint_url": f"http://127.0.0.1:{_free_port()}"})
    async with s3_client(dead) as s3:
        app.s3 = s3
        ok, report = await Readiness(app.operations.readiness.checks).evaluate()
        assert not report["s3"]["ok"], report

    missing = StreamConsumer(settings_factory(bucket=f"{bucket}-missing"))
    async with s3_client(missing.settings) as s3:
        missing.s3 = s3
        ok, report = await missing.operations.readiness.evaluate()
        assert not report["s3"]["ok"] and "404" in report["s3"]["detail"], report


@pytest.mark.integration
async def test_lag_counts_what_the_broker_holds_beyond_the_position(settings_factory):
    """On the real broker: the fetch highwater is right where ListOffsets "latest" is not (Tansu
    answers it wrongly for multi-record batches), so the lag comes from the highwater."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    st = settings_factory()
    admin = AIOKafkaAdminClient(bootstrap_servers=st.kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(st.topic, 1, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=st.kafka_bootstrap, linger_ms=50)  # multi-record batches
    await producer.start()
    try:
        await asyncio.gather(*[await producer.send(st.topic, b"%d" % i) for i in range(15)])
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(bootstrap_servers=st.kafka_bootstrap, group_id=None, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        tp = TopicPartition(st.topic, 0)
        consumer.assign([tp])
        assert await partition_lag(consumer) == {}  # nothing fetched yet: unknown, not zero
        got = 0
        while got < 4:
            got += sum(len(v) for v in (await consumer.getmany(timeout_ms=1000, max_records=4 - got)).values())
        assert await partition_lag(consumer) == {tp: 15 - 4}
    finally:
        await consumer.stop()


# --- the server and the pieces, without a broker ------------------------------------------------
async def test_healthz_is_always_200_and_readyz_503_until_every_check_passes():
    state = {"models": False}

    async def models():
        return state["models"], "loaded" if state["models"] else "loading"

    async def broker():
        return True, "ok"

    metrics = ConsumerMetrics("g", "t")
    server = OperationsServer(metrics.registry, Readiness({"broker": broker, "models": models}, cache_s=60), lambda: None)
    port = await server.start(0, "127.0.0.1")
    try:
        async with aiohttp.ClientSession() as http:
            assert await get(http, port, "/healthz") == (200, "ok\n")
            status, body = await get(http, port, "/readyz")
            assert status == 503
            assert orjson.loads(body)["checks"]["models"] == {"ok": False, "detail": "loading"}
            state["models"] = True  # a failed check is not cached: ready as soon as it passes
            assert (await get(http, port, "/readyz"))[0] == 200
            status, text = await get(http, port, "/metrics")
            assert status == 200 and "metavoice_batches_in_flight" in text
    finally:
        await server.stop()


async def test_a_hanging_probe_reads_as_not_ready(monkeypatch):
    async def hangs():
        await asyncio.sleep(60)
        return True, "never"

    monkeypatch.setattr("consumer.metrics.PROBE_TIMEOUT_S", 0.05)
    ok, report = await Readiness({"s3": hangs}).evaluate()
    assert not ok and "no answer" in report["s3"]["detail"]


async def test_a_taken_metrics_port_is_a_fatal_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        server = OperationsServer(ConsumerMetrics().registry, Readiness({}), lambda: None)
        with pytest.raises(FatalError, match="cannot serve metrics"):
            await server.start(s.getsockname()[1], "127.0.0.1")


def offline(tmp_path, **overrides) -> Settings:
    """Settings for a consumer that is built but never run: no broker needed."""
    return Settings(output_dir=tmp_path / "out", prefect_enabled=False, **overrides)


def test_each_consumer_has_its_own_registry(tmp_path):
    a, b = StreamConsumer(offline(tmp_path)), StreamConsumer(offline(tmp_path, group="other"))
    assert a.operations.registry is not b.operations.registry
    stats = SimpleNamespace(rows=3, skipped=0, duplicates=0, superseded=0, delete_events=1, deleted_rows=2, files=1, commits=1, audio_seconds=9.5,
                            errors_by_type={"NotAudio": 2}, latencies=Latencies([1.5]))
    a.operations.metrics.sync(stats)  # type: ignore[arg-type]
    a.operations.metrics.sync(stats)  # type: ignore[arg-type]  (idempotent: counters follow totals)
    ma = parse(generate_latest(a.operations.registry).decode())
    mb = parse(generate_latest(b.operations.registry).decode())
    assert value(ma, "metavoice_rows_written_total") == 3 and value(mb, "metavoice_rows_written_total") == 0
    assert value(ma, "metavoice_events_dead_lettered_total", error_type="NotAudio") == 2
    assert value(ma, "metavoice_publish_to_finalized_seconds_count") == 1
    assert (value(ma, "metavoice_events_deleted_total"), value(ma, "metavoice_rows_deleted_total")) == (1, 2)


async def test_lag_is_highwater_minus_position_and_never_negative():
    t0, t1, t2, gone = (TopicPartition("t", p) for p in range(4))

    class FakeConsumer:
        highs = {t0: 10, t1: None, t2: 5}
        positions = {t0: 4, t2: 7}

        def assignment(self):
            return {t0, t1, t2, gone}

        def highwater(self, tp):
            if tp is gone:
                raise AssertionError("Partition is not assigned")  # revoked between the two calls
            return self.highs[tp]

        async def position(self, tp):
            return self.positions[tp]

    assert await partition_lag(FakeConsumer()) == {t0: 6, t2: 0}


def test_realtime_factor_is_device_seconds_per_audio_second():
    assert realtime_factor(BatchOutcome(audio_seconds=20.0, timings={"transcribe": 1.5, "tokenize": 0.5, "download": 9})) == 0.1
    assert realtime_factor(BatchOutcome(audio_seconds=0.0, timings={"transcribe": 1.0})) is None


# --- the status line -----------------------------------------------------------------------------
class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_status_line_shows_rows_rate_lag_and_rtf_every_period():
    out = Tty()
    line = StatusLine(out, enabled=True, every=10)
    assert not line.tick(StatusSnapshot(rows=100), now=0.0)  # starts the clock
    assert not line.tick(StatusSnapshot(rows=150), now=5.0)
    assert line.tick(StatusSnapshot(rows=225, lag=40, rtf=0.125, in_flight=2, files=1, dead_letters=3), now=10.0)
    text = out.getvalue()
    assert text.count("\n") == 1
    assert "225 rows (12.5/s)" in text and "lag 40" in text and "RTF 0.12 (8.0x realtime)" in text
    assert "2 in flight" in text and "1 file " in text and "3 dead letters" in text


def test_status_line_is_silent_when_disabled_and_says_when_lag_is_unknown():
    out = io.StringIO()
    line = StatusLine(out, enabled=False, every=0)
    assert not line.tick(StatusSnapshot(rows=1), now=0.0) and not line.tick(StatusSnapshot(rows=2), now=1.0)
    assert out.getvalue() == ""
    assert "lag ?" in format_status(StatusSnapshot(), None)


def test_status_is_on_only_for_a_terminal_with_text_logs(tmp_path):
    from consumer.metrics import Operations

    tty_text = StreamConsumer(offline(tmp_path))
    assert Operations(tty_text, status_stream=Tty()).status.enabled
    assert not Operations(tty_text, status_stream=io.StringIO()).status.enabled
    json_logs = StreamConsumer(offline(tmp_path, log_format="json"))
    assert not Operations(json_logs, status_stream=Tty()).status.enabled


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
