"""summary.json from mergeable aggregates: incremental equals recomputed, and survives crashes."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.ledger import publish_summary
from pipeline.parquet import OffsetRange, RollingParquetWriter
from pipeline.records import to_table
from pipeline.output.layout import SUMMARY_NAME
from pipeline.summary import Aggregates

from .test_parquet_writer import agg, row


@given(st.lists(st.lists(st.integers(1, 50), max_size=5), max_size=6))
def test_merging_parts_equals_aggregating_the_whole(parts):
    rows, parts_rows = [], []
    for p in parts:  # the same rows, split into files
        part = [row(len(rows) + i, f) for i, f in enumerate(p)]
        rows += part
        parts_rows.append(part)
    merged = Aggregates()
    for part in parts_rows:
        merged.merge(agg(part))
    whole = agg(rows)
    a, b = merged.to_state(), whole.to_state()
    # float sums may differ in the last bits with the order of addition; everything else is exact
    for key in ("total_duration_sec",):
        assert a.pop(key) == pytest.approx(b.pop(key))
    for key in ("transcription_lengths", "token_frames"):
        assert a[key].pop("total") == pytest.approx(b[key].pop("total"))
    assert a == b


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
