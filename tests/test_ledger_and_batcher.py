"""What the output already holds, and how records are accounted for in micro-batches."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
from aiokafka.structs import ConsumerRecord

from consumer.batcher import Batcher
from pipeline.errors import OutputConfigMismatch
from pipeline.ledger import DedupeIndex, OutputLedger, object_version_hash, publish_summary, rebuild_aggregates, recover
from pipeline.output import OffsetRange
from pipeline.output.layout import MANIFEST_NAME, SUMMARY_NAME
from pipeline.parquet import RollingParquetWriter
from pipeline.records import to_table

from .output_files import inprogress_files
from .test_parquet_writer import agg, row
from .test_summary_aggregates import write_file


def test_dedupe_index_answers_membership_across_merges():
    idx = DedupeIndex()
    idx.MERGE_AT = 10
    hashes = [object_version_hash("b", f"k{i}", "e") for i in range(35)]
    for h in hashes:
        idx.add(h)
    idx.add_many(np.array([object_version_hash("b", "bulk", "e")], dtype=np.uint64))
    assert all(h in idx for h in hashes) and object_version_hash("b", "bulk", "e") in idx
    assert object_version_hash("b", "k0", "other-etag") not in idx
    assert len(idx) == 36 and idx.nbytes < 36 * 64 + 1024


def test_ledger_rebuilds_positions_and_object_versions_from_files(tmp_path):
    write_file(tmp_path, 0, 3)
    write_file(tmp_path, 3, 2)
    ledger = OutputLedger(tmp_path)
    assert ledger.refresh() == 2
    assert ledger.next_offset("t", 0) == 5
    assert ledger.next_offset("t", 1) is None
    assert ledger.already_written("b", "k4.flac", "e4")
    assert not ledger.already_written("b", "k4.flac", "new-etag")
    assert ledger.refresh() == 0  # nothing new


IDENTITY = {"topic": "t", "group": "g", "whisper_model": "tiny.en", "tokenizer": "synthetic"}


def dead_writers_file(output_dir, first: int) -> None:
    """An in-progress file whose writer died (SIGKILL: its liveness lock released, nothing finalized)."""
    w = RollingParquetWriter(output_dir, roll_max_rows=100, roll_max_seconds=60)
    w.append(to_table([row(first)]), [OffsetRange("t", 0, first, first)], agg([row(first)]))
    w._liveness.close()  # noqa: SLF001  (what the kernel does to a dead process's flock)


def test_start_up_recovery_drops_dead_writers_files_indexes_the_rest_and_repairs_a_summary_behind_them(tmp_path):
    write_file(tmp_path, 0, 2)
    publish_summary(tmp_path)
    write_file(tmp_path, 2, 3)  # a crash between this file's publish and the summary write
    dead_writers_file(tmp_path, 5)
    assert orjson.loads((tmp_path / SUMMARY_NAME).read_bytes())["parquet_files"] == 1 and inprogress_files(tmp_path)

    ledger = OutputLedger(tmp_path)
    recover(ledger, IDENTITY)

    assert not inprogress_files(tmp_path)
    assert ledger.known_files == 2 and ledger.next_offset("t", 0) == 5 and ledger.already_written("b", "k4.flac", "e4")
    summary = orjson.loads((tmp_path / SUMMARY_NAME).read_bytes())
    assert summary["parquet_files"] == 2 and summary["total_files"] == rebuild_aggregates(tmp_path)[0].files == 5
    assert orjson.loads((tmp_path / MANIFEST_NAME).read_bytes())["whisper_model"] == "tiny.en"


def test_start_up_recovery_refuses_an_output_built_with_another_configuration_before_touching_it(tmp_path):
    recover(OutputLedger(tmp_path), IDENTITY)
    dead_writers_file(tmp_path, 0)
    other = {**IDENTITY, "tokenizer": "encodec"}
    with pytest.raises(OutputConfigMismatch, match="tokenizer"):
        recover(OutputLedger(tmp_path), other)
    assert inprogress_files(tmp_path)  # refused first: nothing else was done
    recover(OutputLedger(tmp_path), other, force=True)
    assert not inprogress_files(tmp_path)
    assert not (tmp_path / SUMMARY_NAME).exists()  # no finalized file: nothing to summarize


def test_an_assignment_catches_up_with_files_other_writers_finalized_or_left_behind(tmp_path):
    ledger = OutputLedger(tmp_path)
    assert ledger.catch_up() == 0
    write_file(tmp_path, 0, 3)
    dead_writers_file(tmp_path, 3)
    assert ledger.catch_up() == 1 and ledger.next_offset("t", 0) == 3
    assert not inprogress_files(tmp_path)


def record(offset: int, value: bytes | None, partition: int = 0) -> ConsumerRecord:
    return ConsumerRecord("t", partition, offset, 0, 0, b"k", value, None, 0, len(value or b""), [])


def r2(key: str, action: str = "PutObject", etag: str = "e1") -> bytes:
    return orjson.dumps({"account": "a", "action": action, "bucket": "b", "object": {"key": key, "size": 10, "eTag": etag},
                         "eventTime": "2026-01-01T00:00:00Z"})


def test_every_record_is_accounted_for_in_its_batch(tmp_path):
    write_file(tmp_path, 0, 1)  # k0.flac/e0 already written
    ledger = OutputLedger(tmp_path)
    ledger.refresh()
    b = Batcher(ledger, max_events=100, max_bytes=1 << 30, linger_ms=1000)
    b.add(record(10, r2("a.flac")))
    b.add(record(11, b"not json"))
    b.add(record(12, r2("a.flac", action="DeleteObject")))
    b.add(record(13, orjson.dumps({"Service": "Amazon S3", "Event": "s3:TestEvent"})))
    b.add(record(14, r2("k0.flac", etag="e0")))
    b.add(record(3, r2("c.flac"), partition=2))
    batch = b.take()
    assert [i.event.key for i in batch.items] == ["a.flac", "c.flac"]
    assert [f.error.error_type for f in batch.early_failures] == ["MalformedEvent"]
    assert batch.skipped == 2 and batch.duplicates == 1
    assert {tp.partition: tuple(r) for tp, r in batch.ranges.items()} == {0: (10, 14), 2: (3, 3)}


def test_batch_closes_on_events_bytes_or_linger(tmp_path):
    ledger = OutputLedger(tmp_path)
    b = Batcher(ledger, max_events=2, max_bytes=15, linger_ms=50)
    b.add(record(0, r2("a.flac")))
    assert not b.full() and not b.due(now=b._open.opened_at + 0.01)  # noqa: SLF001
    assert b.due(now=b._open.opened_at + 0.06)  # noqa: SLF001
    b.add(record(1, r2("b.flac")))
    assert b.full()  # 2 events (and 20 bytes > 15)


def test_under_a_backlog_a_micro_batch_grows_past_its_idle_size_and_shrinks_back_when_idle(tmp_path):
    ledger = OutputLedger(tmp_path)
    batcher = Batcher(ledger, max_events=4, max_bytes=1 << 30, linger_ms=10_000, backlog_max_events=10)
    event = lambda i: orjson.dumps({"action": "PutObject", "bucket": "b", "object": {"key": f"k{i}", "eTag": f"e{i}"}})
    for i in range(4):
        batcher.add(record(i, event(i)))
    assert batcher.full()  # idle stream: closes at max_events
    batcher.backlog = True  # every pipeline slot is busy
    assert not batcher.full() and batcher.event_limit == 10
    for i in range(4, 10):
        batcher.add(record(i, event(i)))
    assert batcher.full()
    assert len(batcher.take().items) == 10
    batcher.backlog = False
    assert batcher.event_limit == 4


def test_fencing_ranges_merged_from_files_find_exactly_the_offsets_some_file_holds():
    """`Spans` against a brute force over every file's span, for files in any order (gaps too)."""
    from hypothesis import given, settings, strategies as st

    from pipeline.ledger import Spans

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.tuples(st.integers(0, 60), st.integers(0, 6)), min_size=1, max_size=25),
           st.integers(0, 70), st.integers(0, 8))
    def check(files, q_first, q_len):
        spans, held = Spans(), set()
        for n, (first, length) in enumerate(files):
            spans.add(("t", 0), first, first + length, f"f{n}")
            held.update(range(first, first + length + 1))
        found = spans.holding(("t", 0), q_first, q_first + q_len)
        assert bool(found) == bool(held & set(range(q_first, q_first + q_len + 1)))
        covered = {o for a, b, _ in found for o in range(a, b + 1)}
        assert held & set(range(q_first, q_first + q_len + 1)) <= covered <= held
        assert len(spans) <= len(files)

    check()


def test_ledger_and_latency_memory_stay_bounded_over_10_million_events(tmp_path):
    """10 million events in 10,000 files over 4 partitions: fencing keeps one range per partition,
    the indexed file names 8 bytes each, the latency window its fixed size - not one entry per
    file or batch for the whole uptime."""
    from consumer.committer import LATENCY_WINDOW, CommitStats
    from pipeline.output import FileFooter
    from pipeline.summary import Aggregates

    ledger = OutputLedger(tmp_path)
    per_file, files, partitions = 1_000, 10_000, 4
    next_offset = [0] * partitions
    for n in range(files):
        p = n % partitions
        first = next_offset[p]
        next_offset[p] += per_file
        ledger.record_finalized(FileFooter(f"part-{n:08d}.parquet", per_file, [OffsetRange("t", p, first, first + per_file - 1)],
                                           Aggregates()))
    assert ledger.known_files == files
    assert ledger.span_count == partitions
    assert ledger._indexed.nbytes <= 64 * 50_000  # hashes; the set of names held ~100 bytes per file
    assert [ledger.next_offset("t", p) for p in range(partitions)] == next_offset
    assert ledger.overlapping([OffsetRange("t", 1, 5, 5)]) and not ledger.overlapping([OffsetRange("t", 1, next_offset[1], next_offset[1] + 9)])

    stats = CommitStats()
    for _ in range(files):  # one finalize per file, one latency per batch: 10 million in all
        stats.latencies.extend([0.5] * per_file)
    assert stats.latencies.total == 10_000_000 and len(stats.latencies) == LATENCY_WINDOW
    assert len(stats.latencies.since(10_000_000 - 3)) == 3
