"""Rolling Parquet files: whole or invisible, with the offsets they prove in their footer."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timezone

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.errors import OutputWriteFailed
from pipeline.output import LocalOutput, OffsetRange
from pipeline.parquet import BatchAppend, RollingParquetWriter, SourceOutcome
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
    assert len(LocalOutput(tmp_path).listed()) == 1 and not list(tmp_path.rglob("*.inprogress"))


def test_data_holds_only_finalized_files_while_one_is_being_written(tmp_path):
    """Readers glob data/ on a live output: the open file lives in the hidden _tmp/ spool."""
    w = RollingParquetWriter(LocalOutput(tmp_path), roll_max_rows=100, roll_max_seconds=60)
    w.append(to_table([row(0)]), [OffsetRange("t", 0, 0, 0)], agg([row(0)]))
    w.finalize()
    w.append(to_table([row(1)]), [OffsetRange("t", 0, 1, 1)], agg([row(1)]))
    assert [p.name for p in (tmp_path / "data").iterdir()] == LocalOutput(tmp_path).listed()
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


# --- limits that hold: a batch split across files (issue 22) ---------------------------------------
def outcome(r: TranscribedAudio) -> SourceOutcome:
    o = SourceOutcome(r.kafka_topic, r.kafka_partition, r.kafka_offset, [r])
    o.aggregates.add_row(r)
    return o


def at(p: int, i: int, **kw) -> TranscribedAudio:
    return replace(row(i, **kw), id=f"p{p}-k{i}.flac", kafka_partition=p)


def write_batch(w: RollingParquetWriter, outcomes, ranges) -> list:
    """What the committer does: append, finalizing each full file, until the whole batch is in."""
    part, done = BatchAppend(outcomes, ranges), []
    while not w.append_batch(part):
        done.append(w.finalize())
    return done


def test_a_batch_is_split_at_roll_max_rows_with_footers_holding_exactly_each_files_offsets(tmp_path):
    out = LocalOutput(tmp_path)
    w = RollingParquetWriter(out, roll_max_rows=3, roll_max_seconds=60)
    # partition 0: rows at 0-4, a dead letter at 5; partition 1: rows at 10-12, a skip at 13
    outcomes = [outcome(at(0, i)) for i in range(5)] + [outcome(at(1, i)) for i in (10, 11, 12)]
    dead, skip = SourceOutcome("t", 0, 5), SourceOutcome("t", 1, 13)
    dead.aggregates.add_error("NotAudio")
    skip.aggregates.skipped += 1
    done = write_batch(w, outcomes + [dead, skip], [OffsetRange("t", 0, 0, 5), OffsetRange("t", 1, 10, 13)])
    done.append(w.finalize())

    footers = [out.read_footer(n) for n in out.listed()]
    assert [f.rows for f in footers] == [3, 3, 2]
    assert [[(r.partition, r.first, r.last) for r in f.offsets] for f in footers] == [
        [(0, 0, 2)], [(0, 3, 5), (1, 10, 10)], [(1, 11, 13)]]
    for f in footers:  # every row lies in its own file's footer ranges, and each file's counts go with it
        rows = out.read_columns(f.name, ["kafka_partition", "kafka_offset"]).to_pylist()
        assert all(any(r.partition == x["kafka_partition"] and r.first <= x["kafka_offset"] <= r.last
                       for r in f.offsets) for x in rows)
        assert f.aggregates.files == f.rows
    assert [dict(f.aggregates.errors) for f in footers] == [{}, {"NotAudio": 1}, {}]
    assert [f.aggregates.skipped for f in footers] == [0, 0, 1]


def test_one_records_rows_stay_in_one_file_even_when_they_alone_pass_roll_max_rows(tmp_path):
    """Utterances mode: one event, many rows. They never span two files; too many get a file of their own."""
    out = LocalOutput(tmp_path)
    w = RollingParquetWriter(out, roll_max_rows=3, roll_max_seconds=60)
    first = [outcome(at(0, 0)), outcome(at(0, 1))]
    many = SourceOutcome("t", 0, 2, [replace(at(0, 2), id=f"utt{j}") for j in range(5)])
    for r in many.rows:
        many.aggregates.add_row(r)
    write_batch(w, first + [many, outcome(at(0, 3))], [OffsetRange("t", 0, 0, 3)])
    w.finalize()

    footers = [out.read_footer(n) for n in out.listed()]
    assert [f.rows for f in footers] == [2, 5, 1]
    assert [[(r.first, r.last) for r in f.offsets] for f in footers] == [[(0, 1)], [(2, 2)], [(3, 3)]]
    assert set(out.read_columns(footers[1].name, ["kafka_offset"]).column(0).to_pylist()) == {2}


def test_a_file_is_bounded_by_roll_max_bytes_of_rows(tmp_path):
    out = LocalOutput(tmp_path)
    one = to_table([at(0, 0, frames=3000)]).nbytes  # tokens 8 x 3000 int16: ~48 KB of Arrow per row
    bound = int(one * 3.5)
    w = RollingParquetWriter(out, roll_max_rows=10_000, roll_max_seconds=60, roll_max_bytes=bound)
    write_batch(w, [outcome(at(0, i, frames=3000)) for i in range(10)], [OffsetRange("t", 0, 0, 9)])
    w.finalize()

    names = out.listed()
    assert [out.read_footer(n).rows for n in names] == [3, 3, 3, 1]
    for n in names:
        assert pq.read_table(tmp_path / "data" / n).nbytes <= bound
        assert (tmp_path / "data" / n).stat().st_size <= bound  # compressed rows plus the footer
    assert [(r.first, r.last) for n in names for r in out.read_footer(n).offsets] == [(0, 2), (3, 5), (6, 8), (9, 9)]
