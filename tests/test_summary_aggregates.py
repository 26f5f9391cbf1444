"""summary.json from mergeable aggregates: incremental equals recomputed, and survives crashes."""

from __future__ import annotations

import orjson
from hypothesis import given
from hypothesis import strategies as st

from pipeline.ledger import publish_summary
from pipeline.parquet import OffsetRange, RollingParquetWriter
from pipeline.records import to_table
from pipeline.summary import SUMMARY_NAME, Aggregates

from .test_parquet_writer import agg, row


def aggregate_of(frames: list[int]) -> Aggregates:
    return agg([row(i, f) for i, f in enumerate(frames)])


@given(st.lists(st.lists(st.integers(1, 50), max_size=5), max_size=6))
def test_merging_parts_equals_aggregating_the_whole(parts):
    merged = Aggregates()
    for p in parts:
        merged.merge(aggregate_of(p))
    whole = aggregate_of([f for p in parts for f in p])
    assert merged.to_state() == whole.to_state() or (
        merged.files == whole.files
        and abs(merged.total_duration_sec - whole.total_duration_sec) < 1e-9
        and merged.token_frames.min == whole.token_frames.min
        and merged.token_frames.max == whole.token_frames.max
    )


def write_file(tmp_path, first: int, n: int):
    w = RollingParquetWriter(tmp_path, roll_max_rows=100, roll_max_seconds=60)
    rows = [row(first + i) for i in range(n)]
    w.append(to_table(rows), [OffsetRange("t", 0, first, first + n - 1)], agg(rows))
    out = w.finalize()
    w.close()
    return out


def test_summary_is_brought_up_to_date_with_files_it_missed(tmp_path):
    write_file(tmp_path, 0, 2)
    publish_summary(tmp_path)
    write_file(tmp_path, 2, 3)  # a crash between the rename and the summary write
    doc = publish_summary(tmp_path)
    assert doc["total_files"] == 5 and doc["parquet_files"] == 2


def test_corrupt_summary_is_rebuilt_from_footers(tmp_path):
    write_file(tmp_path, 0, 2)
    write_file(tmp_path, 2, 1)
    (tmp_path / SUMMARY_NAME).write_text("{ half written")
    doc = publish_summary(tmp_path)
    assert doc["total_files"] == 3
    assert orjson.loads((tmp_path / SUMMARY_NAME).read_bytes())["total_files"] == 3


def test_summary_keeps_the_seed_keys(tmp_path):
    write_file(tmp_path, 0, 2)
    doc = publish_summary(tmp_path)
    for key in ("total_files", "total_duration_sec", "average_duration_sec", "sampling_rate_distribution",
                "transcription_lengths", "token_counts", "errors", "skipped", "languages", "parquet_files", "updated_at"):
        assert key in doc
    assert set(doc["transcription_lengths"]) == {"min", "max", "avg"}
    assert set(doc["token_counts"]) == {"min", "max", "avg"}
    assert doc["errors"] == {"total": 0, "by_type": {}}
