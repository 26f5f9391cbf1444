"""Helpers for the Delta table tests (this module holds no tests of its own): rows in the output's
schema appended the way a consumer commits them (one app transaction per partition), and what a
table holds, read back through the log or through a plain glob of data/."""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
from deltalake import CommitProperties, Transaction, write_deltalake

from pipeline.output.table import app_id, open_table, storage_options, table_uri
from pipeline.records import Segment, TranscribedAudio, to_table

GROUP, TOPIC = "g", "t"


def aggregates_of(rows) -> "Aggregates":
    """The summary aggregates of `rows`, folded one by one as the committer does."""
    from pipeline.summary import Aggregates

    a = Aggregates()
    for r in rows:
        a.add_row(r)
    return a


def row(i: int, frames: int = 10, language: str = "en") -> TranscribedAudio:
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    return TranscribedAudio(
        id=f"k{i}.flac", bucket="b", etag=f"e{i}", size_bytes=100, event_time=now, duration_sec=frames / 75,
        sampling_rate=16000 if i % 2 else 8000, channels=1, transcription=f"text {i}" * (i % 3 + 1), language=language,
        segments=[Segment(0.0, 1.0, f"text {i}")], tokens=np.arange(8 * frames).reshape(8, frames).astype(np.int16),
        tokenizer="synthetic", token_frame_rate=75.0, whisper_model="tiny.en", kafka_topic=TOPIC, kafka_partition=0,
        kafka_offset=i, processed_at=now,
    )


def append(location: str | Path, rows: list[TranscribedAudio], settings=None) -> None:
    """One commit of `rows` with partition 0's app transaction at the last row's offset."""
    write_deltalake(table_uri(location), to_table(rows), mode="append",
                    storage_options=storage_options(location, settings) or None,
                    commit_properties=CommitProperties(app_transactions=[
                        Transaction(app_id(GROUP, TOPIC, 0), rows[-1].kafka_offset)]))


def table_versions(location: str | Path, settings=None, version: int | None = None) -> Counter:
    """(bucket, id, etag, utterance) -> rows, as a Delta reader sees the table (or one version)."""
    t = open_table(location, settings, version=version).to_pyarrow_dataset()
    got = t.to_table(columns=["bucket", "id", "etag", "utterance"]).to_pylist()
    return Counter((r["bucket"], r["id"], r["etag"], r["utterance"]) for r in got)


def glob_rows(location: str | Path) -> int:
    """Rows a reader that globs data/*.parquet sees (pyarrow.dataset, as `datasets` and duckdb globs do)."""
    return pads.dataset(table_uri(location), format="parquet").count_rows()
