"""`python -m pipeline demo`: the whole system on embedded defaults, on this machine.

Starts a Kafka-protocol broker (Tansu) and an S3 server (moto) on free loopback ports, fills a
bucket with spoken sample clips (several sampling rates, one stereo, one broken file to show the
dead-letter path), backfills it into Kafka, and runs the consumer until the stream is idle.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
from pathlib import Path

import orjson
from rich.console import Console

from producer.backfill import progress_wanted, run_backfill

from .config import Settings
from .local_services import MOTO_CREDENTIALS, MOTO_REGION, local_services
from .samples import make_corpus
from .summary import SUMMARY_NAME

log = logging.getLogger(__name__)
DEMO_BUCKET = "metavoice-demo"


def run_demo(output_dir: Path, clips: int, settings: Settings) -> int:
    console = Console()
    os.environ.update({k: os.environ.get(k, v) for k, v in MOTO_CREDENTIALS.items()})
    if output_dir.exists():
        shutil.rmtree(output_dir)
    with tempfile.TemporaryDirectory(prefix="metavoice-demo-") as tmp, local_services(Path(tmp) / "services") as svc:
        console.print(f"[bold]Kafka[/] (Tansu) on {svc.kafka_bootstrap}, [bold]S3[/] (moto) on {svc.s3_endpoint_url}")
        with console.status(f"speaking {clips} sample clips with espeak-ng…"):
            corpus = make_corpus(Path(tmp) / "corpus", clips)
        st = settings.with_overrides(
            kafka_bootstrap=svc.kafka_bootstrap,
            s3_endpoint_url=svc.s3_endpoint_url,
            s3_region=MOTO_REGION,
            output_dir=output_dir,
            exit_when_idle=settings.exit_when_idle or 5.0,
            bucket=DEMO_BUCKET,
        )
        asyncio.run(_fill_bucket(st, corpus))
        result = asyncio.run(run_backfill(st, DEMO_BUCKET, [], ".flac", progress=progress_wanted(False)))
        console.print(f"backfill published [bold]{result.published}[/] events to topic {st.topic}")
        console.print(
            f"consumer: whisper={st.whisper_model or 'bundled tiny.en'} tokenizer=[bold]{st.tokenizer}[/]"
            + (" (the seed-style stand-in: deterministic codes, no audio in them;"
               " set METAVOICE_TOKENIZER=encodec with weights for real codec tokens)" if st.tokenizer == "synthetic" else "")
            + f", prefect={'on' if st.prefect_enabled else 'off'}; runs until idle for {st.exit_when_idle:g}s"
        )
        from consumer.app import run_consumer

        stats = asyncio.run(run_consumer(st, handle_signals=True))
    summary = orjson.loads((output_dir / SUMMARY_NAME).read_bytes())
    summary.pop("_state", None)  # the mergeable internals; the rest is what a person reads
    console.print_json(orjson.dumps(summary).decode())
    files = sorted((output_dir / "data").glob("*.parquet"))
    console.print(
        f"[bold green]{stats.rows} rows[/] in {len(files)} Parquet file(s) under {output_dir / 'data'}; "
        f"{stats.dead_letters} dead letter(s) on {st.dlq_topic}; {stats.audio_seconds:.1f}s of audio in {stats.wall_seconds:.1f}s"
    )
    query = f"select id, transcription from '{output_dir}/**/*.parquet'"
    console.print(f"summary: {output_dir / SUMMARY_NAME}\nquery:   python -c \"import duckdb; duckdb.sql(\\\"{query}\\\").show()\"")
    return 0


async def _fill_bucket(settings: Settings, corpus) -> None:
    from .storage import s3_client

    async with s3_client(settings) as s3:
        await s3.create_bucket(Bucket=DEMO_BUCKET)
        for clip in corpus:
            await s3.put_object(Bucket=DEMO_BUCKET, Key=clip.key, Body=clip.path.read_bytes())
        # One broken upload: the stream dead-letters it with a reason and carries on.
        await s3.put_object(Bucket=DEMO_BUCKET, Key="clips/broken-upload.flac", Body=b"this is not a flac file")
