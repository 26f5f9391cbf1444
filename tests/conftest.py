"""Shared fixtures: the real broker and S3 server once per session, fresh topics per test."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Callable, Iterator

import boto3
import pytest

from metavoice.local_services import MOTO_CREDENTIALS, MOTO_REGION, LocalServices, local_services
from metavoice.samples import SampleClip, make_corpus
from pipeline.config import Settings

for _k, _v in MOTO_CREDENTIALS.items():
    os.environ.setdefault(_k, _v)
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServices]:
    with local_services(tmp_path_factory.mktemp("services")) as s:
        yield s


@pytest.fixture
def unique() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture
def s3(services: LocalServices):
    """A plain boto3 client for arranging test data (the code under test uses aiobotocore)."""
    return boto3.client(
        "s3",
        endpoint_url=services.s3_endpoint_url,
        region_name=MOTO_REGION,
        aws_access_key_id=MOTO_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=MOTO_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    )


@pytest.fixture
def bucket(s3, unique: str) -> str:
    name = f"bucket-{unique}"
    s3.create_bucket(Bucket=name)
    return name


def test_settings(services: LocalServices, unique: str, output_dir: Path, **overrides) -> Settings:
    """Settings pointed at the session's services, with their own topic, group and output dir."""
    base = dict(
        kafka_bootstrap=services.kafka_bootstrap,
        topic=f"events-{unique}",
        group=f"group-{unique}",
        s3_endpoint_url=services.s3_endpoint_url,
        s3_region=MOTO_REGION,
        output_dir=output_dir,
        topic_partitions=4,
        batch_linger_ms=100,
        # batch sizes as the tests set them; tests of backlog growth opt in
        batch_max_events_backlog=1,
        exit_when_idle=3.0,
        prefect_enabled=False,
        # Tansu holds a first group join for about half the session timeout: keep it short.
        kafka_session_timeout_ms=6000,
    )
    base.update(overrides)
    return Settings(**base)


test_settings.__test__ = False  # a helper, not a test


@pytest.fixture
def settings_factory(services: LocalServices, unique: str, tmp_path: Path) -> Callable[..., Settings]:
    """Settings pointed at the session's services, with a fresh topic, group and output dir."""

    def make(**overrides) -> Settings:
        return test_settings(services, unique, overrides.pop("output_dir", tmp_path / "out"), **overrides)

    return make


@pytest.fixture(scope="session")
def speech_corpus(tmp_path_factory: pytest.TempPathFactory) -> list[SampleClip]:
    """Six spoken clips at several rates (clip 1 stereo), made once per session."""
    return make_corpus(tmp_path_factory.mktemp("speech"), 6)


def upload(s3, bucket: str, clips: list[SampleClip]) -> None:
    for c in clips:
        s3.upload_file(str(c.path), bucket, c.key)


@pytest.fixture(scope="session")
def models():
    """Whisper (bundled tiny.en) and the synthetic tokenizer, loaded once for in-process consumers."""
    from pipeline.models import Models

    m = Models.load(Settings(prefect_enabled=False))
    yield m
    m.close()


def consume_until_idle(settings: Settings, models) -> "RunStats":  # noqa: F821
    """Run the real consumer in-process until the stream is idle; returns its stats."""
    import asyncio

    from consumer.app import run_consumer

    assert settings.exit_when_idle, "settings must set exit_when_idle"
    return asyncio.run(run_consumer(settings, models=models))


def backfill(settings: Settings, bucket: str, suffix: str = ".flac"):
    import asyncio

    from producer.backfill import run_backfill

    return asyncio.run(run_backfill(settings, bucket, [], suffix))


def read_topic(settings: Settings, topic: str, expected: int, timeout: float = 20.0) -> list:
    """Every record of `topic` from the earliest offset, until `expected` arrived or `timeout`.

    Reads with a throwaway consumer instead of trusting end offsets (Tansu's ListOffsets
    "latest" is unreliable for multi-record batches).
    """
    import asyncio
    import time

    from aiokafka import AIOKafkaConsumer

    async def run() -> list:
        c = AIOKafkaConsumer(
            topic, bootstrap_servers=settings.kafka_bootstrap, group_id=None,
            auto_offset_reset="earliest", enable_auto_commit=False,
        )
        await c.start()
        got: list = []
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                batch = await c.getmany(timeout_ms=300)
                for recs in batch.values():
                    got.extend(recs)
                if len(got) >= expected:
                    # linger briefly so that "more than expected" is caught too
                    extra = await c.getmany(timeout_ms=500)
                    for recs in extra.values():
                        got.extend(recs)
                    break
        finally:
            await c.stop()
        return got

    return asyncio.run(run())
