"""`metavoice demo` (`python -m metavoice demo`): the whole system on embedded defaults, on this machine.

Starts a Kafka-protocol broker (Tansu) and an S3 server (moto) on free loopback ports, fills a
bucket with spoken sample clips (several sampling rates, one stereo, one broken file to show the
dead-letter path), backfills it into Kafka, and runs the consumer until every event is handled.

Nothing waits that need not: the Prefect API (whose first start runs its migrations) and the
models load in the background from the first moment; the consumer joins its group while the clips
are spoken; the embedded broker's first JoinGroup is held for about half the session timeout, so
the demo's group uses a short one; files roll every second so the first rows are final at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console

from pipeline.config import Settings
from pipeline.output.layout import SUMMARY_NAME
from producer.backfill import progress_wanted, run_backfill

from .local_services import MOTO_CREDENTIALS, MOTO_REGION, local_services
from .samples import make_corpus

log = logging.getLogger(__name__)
DEMO_BUCKET = "metavoice-demo"
# The demo's own values for settings left at their defaults (the environment still wins):
DEMO_DEFAULTS = {
    # Tansu holds a new group's first JoinGroup for ~half the session timeout: 3 s instead of 15 s
    "kafka_session_timeout_ms": 6000,
    # a file is finalized a second after it opened: the first rows are readable at once
    "roll_max_seconds": 1.0,
}


def demo_settings(settings: Settings, **overrides: Any) -> Settings:
    """`settings` with the demo's defaults where a setting was left at the system default."""
    fields = Settings.model_fields
    mine = {k: v for k, v in DEMO_DEFAULTS.items() if getattr(settings, k) == fields[k].default}
    return settings.with_overrides(**mine, **overrides)


def run_demo(output_dir: Path, clips: int, settings: Settings) -> int:
    console = Console()
    os.environ.update({k: os.environ.get(k, v) for k, v in MOTO_CREDENTIALS.items()})
    loader = ThreadPoolExecutor(1, thread_name_prefix="demo-start")
    models_ready = loader.submit(_start_prefect_then_load_models, settings)  # meanwhile: services, clips
    if output_dir.exists():
        shutil.rmtree(output_dir)
    try:
        with tempfile.TemporaryDirectory(prefix="metavoice-demo-") as tmp, local_services(Path(tmp) / "services") as svc:
            console.print(f"[bold]Kafka[/] (Tansu) on {svc.kafka_bootstrap}, [bold]S3[/] (moto) on {svc.s3_endpoint_url}")
            st = demo_settings(
                settings,
                kafka_bootstrap=svc.kafka_bootstrap,
                s3_endpoint_url=svc.s3_endpoint_url,
                s3_region=MOTO_REGION,
                output_dir=output_dir,
                bucket=DEMO_BUCKET,
            ).model_copy(update={"exit_when_idle": None})  # it stops once every event is handled
            stats = asyncio.run(_stream(console, st, clips, Path(tmp) / "corpus", models_ready))
    finally:
        if models_ready.done() and models_ready.exception() is None:
            models_ready.result().close()
        loader.shutdown(wait=True)
    summary = orjson.loads((output_dir / SUMMARY_NAME).read_bytes())
    summary.pop("_state", None)  # the mergeable internals; the rest is what a person reads
    console.print_json(orjson.dumps(summary).decode())
    files = sorted((output_dir / "data").glob("*.parquet"))
    console.print(
        f"[bold green]{stats.rows} rows[/] in {len(files)} Parquet file(s) under {output_dir / 'data'}; "
        f"{stats.dead_letters} dead letter(s) on {st.dlq_topic}; {stats.audio_seconds:.1f}s of audio in {stats.wall_seconds:.1f}s"
    )
    query = f"select id, transcription from '{output_dir}/data/*.parquet'"
    console.print(f"summary: {output_dir / SUMMARY_NAME}\nquery:   python -c \"import duckdb; duckdb.sql(\\\"{query}\\\").show()\"")
    return 0


def _start_prefect_then_load_models(settings: Settings):
    """The longest start first: the Prefect API (its first start runs migrations, 5-15 s in its own
    process) is spawned before the models load (~3 s here), both while the clips are spoken."""
    if settings.prefect_enabled:
        from prefect.settings import PREFECT_API_URL

        from pipeline.flows import ORCHESTRATION

        if not PREFECT_API_URL.value():
            import prefect.server.api.server  # noqa: F401  (heavy: imported here, so the API is spawned at once)
        ORCHESTRATION.start_api_soon()
    from pipeline.models import Models

    return Models.load(settings)


async def _stream(console: Console, st: Settings, clips: int, corpus_dir: Path, models_ready: "Future[Any]"):
    """The consumer starts first (it joins its group while the clips are spoken) and stops once every
    event the backfill published is a row or a dead letter: no idle wait at the end."""
    app = _demo_consumer(st)
    app.install_signal_handlers()

    async def consume():
        app.models = await asyncio.wrap_future(models_ready)
        return await app.run()

    consumer = asyncio.create_task(consume())
    with console.status(f"speaking {clips} sample clips with espeak-ng…"):
        corpus = await asyncio.to_thread(make_corpus, corpus_dir, clips)
    await _fill_bucket(st, corpus)
    result = await run_backfill(st, DEMO_BUCKET, [], ".flac", progress=progress_wanted(False))
    console.print(f"backfill published [bold]{result.published}[/] events to topic {st.topic}")
    console.print(
        f"consumer: whisper={st.whisper_model or 'bundled tiny.en'} tokenizer=[bold]{st.tokenizer}[/]"
        + (" (the seed-style stand-in: deterministic codes, no audio in them;"
           " set METAVOICE_TOKENIZER=encodec with weights for real codec tokens)" if st.tokenizer == "synthetic" else "")
        + f", prefect={'on' if st.prefect_enabled else 'off'}; runs until the {result.published} events are handled"
    )
    app.expect(result.published)
    return await consumer


def _demo_consumer(settings: Settings):
    from consumer.app import StreamConsumer

    class DemoConsumer(StreamConsumer):
        """Stops itself once `expect(n)` events are handled (rows, dead letters, skips, duplicates)."""

        expected: int | None = None

        def __init__(self) -> None:
            super().__init__(settings)
            self.on_batch_done.append(self._batch_done)

        def handled(self) -> int:
            c = self.committer.stats if self.committer is not None else None
            return 0 if c is None else c.rows + c.dead_letters + c.skipped + c.duplicates + c.superseded

        def expect(self, n: int) -> None:
            self.expected = n
            if self.handled() >= n:  # handled before we knew how many
                self.request_stop(f"all {n} events handled")

        def _batch_done(self, batch, outcome, stats) -> None:  # type: ignore[no-untyped-def]
            if self.expected is not None and self.handled() >= self.expected:
                self.request_stop(f"all {self.expected} events handled")

    return DemoConsumer()


async def _fill_bucket(settings: Settings, corpus) -> None:
    from pipeline.storage import s3_client

    async with s3_client(settings) as s3:
        await s3.create_bucket(Bucket=DEMO_BUCKET)
        for clip in corpus:
            await s3.put_object(Bucket=DEMO_BUCKET, Key=clip.key, Body=clip.path.read_bytes())
        # One broken upload: the stream dead-letters it with a reason and carries on.
        await s3.put_object(Bucket=DEMO_BUCKET, Key="clips/broken-upload.flac", Body=b"this is not a flac file")
