"""Rolling Parquet files: whole or invisible, with the offsets they prove in their footer."""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.errors import OutputWriteFailed
from pipeline.output import LocalOutput, OffsetRange
from pipeline.parquet import RollingParquetWriter
from pipeline.records import SCHEMA, Segment, TranscribedAudio, to_table, tokens_from_column
from pipeline.summary import Aggregates


def row(i: int, frames: int = 10) -> TranscribedAudio:
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    return TranscribedAudio(
        id=f"k{i}.flac", bucket="b", etag=f"e{i}", size_bytes=100, event_time=now, duration_sec=frames / 75,
        sampling_rate=16000, channels=1, transcription=f"text {i}", language="en",
        segments=[Segment(0.0, 1.0, f"text {i}")], tokens=np.arange(8 * frames, dtype=np.int16).reshape(8, frames),
        tokenizer="synthetic", token_frame_rate=75.0, whisper_model="tiny.en", kafka_topic="t",
        kafka_partition=0, kafka_offset=i, processed_at=now,
    )


def agg(rows):
    a = Aggregates()
    for r in rows:
        a.add_row(r)
    return a


def test_open_file_never_matches_the_parquet_glob(tmp_path):
    w = RollingParquetWriter(LocalOutput(tmp_path), roll_max_rows=100, roll_max_seconds=60)
    rows = [row(0)]
    w.append(to_table(rows), [OffsetRange("t", 0, 0, 0)], agg(rows))
    assert list(tmp_path.rglob("*.parquet")) == []
    assert len(list(tmp_path.rglob("*.parquet.inprogress"))) == 1
    w.finalize()
    assert len(LocalOutput(tmp_path).finalized()) == 1 and not list(tmp_path.rglob("*.inprogress"))


def test_data_holds_only_finalized_files_while_one_is_being_written(tmp_path):
    """Readers glob data/ on a live output: the open file lives in the hidden _tmp/ spool."""
    w = RollingParquetWriter(LocalOutput(tmp_path), roll_max_rows=100, roll_max_seconds=60)
    w.append(to_table([row(0)]), [OffsetRange("t", 0, 0, 0)], agg([row(0)]))
    w.finalize()
    w.append(to_table([row(1)]), [OffsetRange("t", 0, 1, 1)], agg([row(1)]))
    assert [p.name for p in (tmp_path / "data").iterdir()] == LocalOutput(tmp_path).finalized()
    assert list((tmp_path / "_tmp").glob("*.inprogress"))
    import pyarrow.dataset as ds
    assert ds.dataset(tmp_path / "data", format="parquet").to_table().num_rows == 1


def test_footer_records_the_offset_ranges_and_aggregates_of_the_file(tmp_path):
    w = RollingParquetWriter(LocalOutput(tmp_path), roll_max_rows=100, roll_max_seconds=60)
    w.append(to_table([row(0), row(1)]), [OffsetRange("t", 0, 0, 1), OffsetRange("t", 3, 7, 9)], agg([row(0), row(1)]))
    a = Aggregates(skipped=1)
    a.add_error("NotAudio")
    w.append(to_table([]), [OffsetRange("t", 0, 2, 4)], a)
    done = w.finalize()
    footer = LocalOutput(tmp_path).read_footer(done.name)
    assert [(r.partition, r.first, r.last) for r in footer.offsets] == [(0, 0, 4), (3, 7, 9)]
    assert footer.rows == 2 and footer.aggregates.files == 2
    assert footer.aggregates.errors == {"NotAudio": 1} and footer.aggregates.skipped == 1


def test_offsets_must_increase_within_a_partition(tmp_path):
    w = RollingParquetWriter(LocalOutput(tmp_path), roll_max_rows=100, roll_max_seconds=60)
    w.append(to_table([row(5)]), [OffsetRange("t", 0, 5, 5)], Aggregates())
    with pytest.raises(ValueError):
        w.append(to_table([row(4)]), [OffsetRange("t", 0, 4, 4)], Aggregates())


def test_tokens_round_trip_as_nested_int16_lists(tmp_path):
    w = RollingParquetWriter(LocalOutput(tmp_path), roll_max_rows=100, roll_max_seconds=60)
    r = row(0, frames=13)
    w.append(to_table([r]), [OffsetRange("t", 0, 0, 0)], agg([r]))
    path = tmp_path / "data" / w.finalize().name
    table = pq.read_table(path)
    assert table.schema.remove_metadata().equals(SCHEMA)
    back = tokens_from_column(table.column("tokens")[0].as_py())
    assert back.dtype == np.int16 and np.array_equal(back, r.tokens)


def test_rolls_by_rows_and_by_age(tmp_path):
    w = RollingParquetWriter(LocalOutput(tmp_path), roll_max_rows=2, roll_max_seconds=10)
    w.append(to_table([row(0)]), [OffsetRange("t", 0, 0, 0)], Aggregates())
    assert not w.due_to_roll()
    w.append(to_table([row(1)]), [OffsetRange("t", 0, 1, 1)], Aggregates())
    assert w.due_to_roll()
    w.finalize()
    w.append(to_table([row(2)]), [OffsetRange("t", 0, 2, 2)], Aggregates())
    assert not w.due_to_roll()
    assert w.due_to_roll(now=w._open.opened_at + 10.01)  # noqa: SLF001


def test_abort_leaves_nothing_behind(tmp_path):
    w = RollingParquetWriter(LocalOutput(tmp_path), roll_max_rows=100, roll_max_seconds=60)
    w.append(to_table([row(0)]), [OffsetRange("t", 0, 0, 0)], Aggregates())
    w.abort()
    assert list((tmp_path / "data").glob("*.parquet*")) == []


def test_failed_rename_raises_a_typed_error_and_leaves_no_visible_file(tmp_path, monkeypatch):
    w = RollingParquetWriter(LocalOutput(tmp_path), roll_max_rows=100, roll_max_seconds=60)
    w.append(to_table([row(0)]), [OffsetRange("t", 0, 0, 0)], Aggregates())
    final = tmp_path / "data" / w._open.name  # noqa: SLF001
    final.mkdir(parents=True)  # a directory where the file should land: the rename fails for real
    with pytest.raises(OutputWriteFailed):
        w.finalize()
    assert [p for p in (tmp_path / "data").glob("*.parquet") if p.is_file()] == []


def test_crashed_writers_inprogress_files_are_discarded_live_ones_kept(tmp_path):
    live = RollingParquetWriter(LocalOutput(tmp_path), roll_max_rows=100, roll_max_seconds=60)
    live.append(to_table([row(0)]), [OffsetRange("t", 0, 0, 0)], Aggregates())
    orphan = tmp_path / "_tmp" / "part-20260101T000000-deadbeef-00001.parquet.inprogress"
    orphan.write_bytes(b"half a file")
    removed = LocalOutput(tmp_path).discard_orphans()
    assert removed == [orphan.name] and not orphan.exists()
    assert live._open.path.exists()  # noqa: SLF001
