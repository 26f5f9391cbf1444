"""Reprocessing controls: rewind by time, independent groups, and output directories that refuse to mix."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timezone

import pyarrow.parquet as pq
import pytest

from pipeline.errors import OutputConfigMismatch
from pipeline.manifest import check_manifest

from .conftest import backfill, consume_until_idle, upload

pytestmark = pytest.mark.integration


def test_output_directory_refuses_a_different_model_unless_forced(tmp_path):
    ident = {"topic": "t", "group": "g", "whisper_model": "tiny.en", "tokenizer": "synthetic"}
    check_manifest(tmp_path, ident)
    check_manifest(tmp_path, ident)  # same configuration: fine
    with pytest.raises(OutputConfigMismatch, match="whisper_model"):
        check_manifest(tmp_path, {**ident, "whisper_model": "large-v3"})
    doc = check_manifest(tmp_path, {**ident, "whisper_model": "large-v3"}, force=True)
    assert doc["whisper_model"] == "large-v3" and doc["history"][0]["whisper_model"] == "tiny.en"


@pytest.mark.slow
def test_from_timestamp_replays_only_events_at_or_after_it(s3, bucket, speech_corpus, settings_factory, models, tmp_path):
    first, second = speech_corpus[:2], speech_corpus[2:4]
    settings = settings_factory()
    upload(s3, bucket, first)
    backfill(settings, bucket)
    time.sleep(1.5)
    cut = datetime.now(timezone.utc)
    time.sleep(0.5)
    for c in first:  # remove the first wave so a second backfill publishes only the new clips
        s3.delete_object(Bucket=bucket, Key=c.key)
    upload(s3, bucket, second)
    backfill(settings, bucket)

    replay = settings.with_overrides(
        group=settings.group + "-from-ts", output_dir=tmp_path / "from-ts", from_timestamp=cut.isoformat()
    )
    stats = consume_until_idle(replay, models)
    ids = sorted(pq.read_table(replay.output_dir / "data", columns=["id"]).column("id").to_pylist())
    assert ids == sorted(c.key for c in second)
    assert stats.rows == 2


@pytest.mark.slow
def test_from_beginning_rewinds_an_existing_group_and_never_doubles_a_directory(
    s3, bucket, speech_corpus, settings_factory, models, tmp_path
):
    settings = settings_factory()
    upload(s3, bucket, speech_corpus[:2])
    backfill(settings, bucket)
    assert consume_until_idle(settings, models).rows == 2
    # Without a rewind the group resumes after its commits: nothing to do.
    assert consume_until_idle(settings.with_overrides(output_dir=tmp_path / "resumed"), models).records == 0
    # Rewound into a fresh directory: everything again.
    assert consume_until_idle(settings.with_overrides(output_dir=tmp_path / "rewound", from_beginning=True), models).rows == 2
    # Rewound into the original directory: its files already hold every event, nothing is doubled.
    assert consume_until_idle(settings.with_overrides(from_beginning=True), models).rows == 0
    assert pq.read_table(settings.output_dir / "data").num_rows == 2
