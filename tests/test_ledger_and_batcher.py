"""What the output already holds, and how records are accounted for in micro-batches."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
from aiokafka.structs import ConsumerRecord

from consumer.batcher import Batcher
from pipeline.errors import Fenced, OutputConfigMismatch, OutputNotMigrated, TableGap
from pipeline.ledger import (STATE_DEDUPE, DedupeIndex, ObjectDelete, OutputLedger, object_version_hash, publish_summary,
                             rebuild_aggregates, recover)
from pipeline.output import LocalOutput, OffsetRange
from pipeline.output.layout import MANIFEST_NAME, SUMMARY_NAME
from pipeline.parquet import RollingParquetWriter
from pipeline.records import to_table
from pipeline.summary import Aggregates

from .output_files import inprogress_files
from .test_parquet_writer import agg, row
from .test_summary_aggregates import commit_delete, delete_footer, write_file


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


def test_ledger_rebuilds_positions_and_object_versions_from_the_table(tmp_path):
    write_file(tmp_path, 0, 3)
    write_file(tmp_path, 3, 2)
    ledger = OutputLedger(tmp_path)
    assert ledger.refresh() >= 2 and ledger.files_read == 0  # each commit names its object versions
    assert ledger.next_offset("t", 0) == 5
    assert ledger.next_offset("t", 1) is None
    assert ledger.already_written("b", "k4.flac", "e4")
    assert not ledger.already_written("b", "k4.flac", "new-etag")
    assert ledger.refresh() == 0 and ledger.files_read == 0


def test_a_commit_that_does_not_name_its_object_versions_is_indexed_from_its_file(tmp_path):
    """A migrated 0.1 output's commit (or an older consumer's) has no `metavoice.versions`: its
    file's key columns are read, once; a commit that names them is not read."""
    write_file(tmp_path, 0, 3, named_versions=False)
    write_file(tmp_path, 3, 2)
    ledger = OutputLedger(tmp_path)
    ledger.refresh()
    assert ledger.files_read == 1
    assert all(ledger.already_written("b", f"k{i}.flac", f"e{i}") for i in range(5))


def test_a_compaction_read_from_the_log_costs_no_file_read_its_rows_are_indexed_already(tmp_path):
    from pipeline.output.maintenance import compact

    for first in range(0, 6, 2):
        write_file(tmp_path, first, 2)
    ledger = OutputLedger(tmp_path)
    ledger.refresh()
    compact(tmp_path)
    assert ledger.refresh() >= 1 and ledger.files_read == 0
    assert all(ledger.already_written("b", f"k{i}.flac", f"e{i}") for i in range(6))


def test_positions_are_per_group_app_transactions(tmp_path):
    write_file(tmp_path, 0, 3, group="g1")
    ledger = OutputLedger(tmp_path, group="g1")
    ledger.refresh()
    assert ledger.next_offset("t", 0) == 3
    other = OutputLedger(tmp_path, group="g2")
    other.refresh()
    assert other.next_offset("t", 0) is None and other.already_written("b", "k0.flac", "e0")


IDENTITY = {"topic": "t", "group": "g", "whisper_model": "tiny.en", "tokenizer": "synthetic"}


def dead_writers_file(output_dir, first: int) -> None:
    """An in-progress file whose writer died (SIGKILL: its liveness lock released, nothing finalized)."""
    w = RollingParquetWriter(output_dir, roll_max_rows=100, roll_max_seconds=60)
    w.append(to_table([row(first)]), [OffsetRange("t", 0, first, first)], agg([row(first)]))
    w._liveness.close()  # noqa: SLF001  (what the kernel does to a dead process's flock)


def test_start_up_recovery_drops_dead_writers_files_indexes_the_rest_and_repairs_a_summary_behind_them(tmp_path):
    write_file(tmp_path, 0, 2)
    publish_summary(tmp_path)
    write_file(tmp_path, 2, 3)  # a crash between this file's table commit and the summary write
    dead_writers_file(tmp_path, 5)
    assert orjson.loads((tmp_path / SUMMARY_NAME).read_bytes())["parquet_files"] == 1 and inprogress_files(tmp_path)

    ledger = OutputLedger(tmp_path)
    recover(ledger, IDENTITY)

    assert not inprogress_files(tmp_path)
    assert ledger.next_offset("t", 0) == 5 and ledger.already_written("b", "k4.flac", "e4")
    summary = orjson.loads((tmp_path / SUMMARY_NAME).read_bytes())
    assert summary["parquet_files"] == 2 and summary["total_files"] == rebuild_aggregates(tmp_path)[0].files == 5
    assert summary["table_version"] == ledger.table_version
    assert orjson.loads((tmp_path / MANIFEST_NAME).read_bytes())["whisper_model"] == "tiny.en"


def test_a_restart_reads_no_data_file_the_checkpoint_and_the_commits_since_name_every_version(tmp_path):
    """The index is checkpointed beside the table (outside data/) with the version it covers: the
    next start reads the checkpoint and the log entries since (each names its object versions),
    never a data file - after a crash too, when commits came after the checkpoint."""
    for first in range(0, 10, 2):
        write_file(tmp_path, first, 2)
    first = OutputLedger(tmp_path)
    recover(first, IDENTITY)
    assert first.files_read == 0 and (tmp_path / STATE_DEDUPE).exists()
    assert not str(STATE_DEDUPE).startswith("data/")  # VACUUM of the table root never touches it

    again = OutputLedger(tmp_path)
    recover(again, IDENTITY)
    assert again.files_read == 0 and again.already_written("b", "k9.flac", "e9") and again.next_offset("t", 0) == 10

    write_file(tmp_path, 10, 3)
    third = OutputLedger(tmp_path)
    recover(third, IDENTITY)
    assert third.files_read == 0 and third.already_written("b", "k12.flac", "e12") and third.already_written("b", "k0.flac", "e0")


def checkpoint_version(output_dir) -> int:
    from pipeline.ledger import parse_dedupe_checkpoint

    return parse_dedupe_checkpoint((output_dir / STATE_DEDUPE).read_bytes())[0]


def test_a_restart_from_a_checkpoint_older_than_a_vacuum_indexes_every_row_it_missed(tmp_path):
    """Files added after the checkpoint were compacted and vacuumed: a start that read only the
    files its commits name would find them gone. It indexes the live files instead."""
    from pipeline.output.maintenance import _vacuum, current_files
    from pipeline.output.table import open_table

    write_file(tmp_path, 0, 2)
    recover(OutputLedger(tmp_path), IDENTITY)  # checkpoint at the first file
    old = (tmp_path / STATE_DEDUPE).read_bytes()
    for first in range(2, 8, 2):  # commits that do not name their versions (migrated): files must be read
        write_file(tmp_path, first, 2, named_versions=False)
    table = open_table(tmp_path)
    table.optimize.compact()
    _vacuum(table, 0, True, dry_run=False)  # what a forced short retention does
    log = OutputLedger(tmp_path).table.refresh()
    since = [name for c in log.commits(checkpoint_version(tmp_path)) for name, _ in c.files]
    assert since and not any((tmp_path / "data" / name).exists() for name in since)  # vacuumed
    assert len(current_files(table)) == 1  # all four rewritten into one
    (tmp_path / STATE_DEDUPE).write_bytes(old)  # the compaction's own checkpoint lost: the worst case

    again = OutputLedger(tmp_path)
    recover(again, IDENTITY)
    assert all(again.already_written("b", f"k{i}.flac", f"e{i}") for i in range(8))
    assert again.next_offset("t", 0) == 8


def test_a_restart_from_a_checkpoint_older_than_a_delete_and_a_vacuum_forgets_the_deleted_version(tmp_path):
    """The checkpoint indexed k1; a delete then removed it, and a compaction and vacuum took the
    files the log names. The start indexes the live files and still forgets k1, so uploading the
    same version again makes a row instead of being dropped as a duplicate."""
    from pipeline.output.maintenance import _vacuum
    from pipeline.output.table import open_table

    write_file(tmp_path, 0, 2)  # k0, k1
    recover(OutputLedger(tmp_path), IDENTITY)  # checkpoint holds k1
    old = (tmp_path / STATE_DEDUPE).read_bytes()
    write_file(tmp_path, 2, 2, named_versions=False)  # a commit to be read from its file, then vacuumed
    commit_delete(tmp_path, "k1.flac", 4)
    table = open_table(tmp_path)
    table.optimize.compact()
    _vacuum(table, 0, True, dry_run=False)
    (tmp_path / STATE_DEDUPE).write_bytes(old)

    again = OutputLedger(tmp_path)
    recover(again, IDENTITY)
    assert again.files_read > 0  # the fallback ran: the named files are gone
    assert not again.already_written("b", "k1.flac", "e1")
    assert all(again.already_written("b", f"k{i}.flac", f"e{i}") for i in (0, 2, 3))
    assert again.next_offset("t", 0) == 5


def test_compact_checkpoints_the_dedupe_index_before_it_vacuums(tmp_path):
    from pipeline.output.maintenance import compact

    write_file(tmp_path, 0, 2)
    recover(OutputLedger(tmp_path), IDENTITY)
    for first in range(2, 8, 2):
        write_file(tmp_path, first, 2)
    before = checkpoint_version(tmp_path)
    report = compact(tmp_path, retention_hours=0, force=True)
    assert checkpoint_version(tmp_path) >= report.version_after > before
    again = OutputLedger(tmp_path)
    recover(again, IDENTITY)
    assert again.files_read == 0 and all(again.already_written("b", f"k{i}.flac", f"e{i}") for i in range(8))


def test_a_checkpoint_is_never_replaced_by_an_older_one(tmp_path):
    write_file(tmp_path, 0, 2)
    stale = OutputLedger(tmp_path)
    stale.refresh()
    write_file(tmp_path, 2, 2)
    fresh = OutputLedger(tmp_path)
    fresh.checkpoint()
    stale.save_checkpoint()
    assert checkpoint_version(tmp_path) == fresh.table_version


def test_start_up_recovery_refuses_an_output_built_with_another_configuration_before_touching_it(tmp_path):
    recover(OutputLedger(tmp_path), IDENTITY)
    dead_writers_file(tmp_path, 0)
    other = {**IDENTITY, "tokenizer": "encodec"}
    with pytest.raises(OutputConfigMismatch, match="tokenizer"):
        recover(OutputLedger(tmp_path), other)
    assert inprogress_files(tmp_path)  # refused first: nothing else was done
    recover(OutputLedger(tmp_path), other, force=True)
    assert not inprogress_files(tmp_path)
    assert not (tmp_path / SUMMARY_NAME).exists()  # nothing committed: nothing to summarize


def test_start_up_refuses_a_0_1_output_naming_the_migrate_command(tmp_path):
    """Parquet files under data/ without a Delta log: the consumer refuses rather than resume from
    nothing (it would write every event again)."""
    (tmp_path / "data").mkdir()
    w = RollingParquetWriter(tmp_path, roll_max_rows=100, roll_max_seconds=60)
    w.append(to_table([row(0)]), [OffsetRange("t", 0, 0, 0)], agg([row(0)]))
    w.finalize()
    w.close()
    with pytest.raises(OutputNotMigrated, match="metavoice migrate"):
        recover(OutputLedger(tmp_path), IDENTITY)
    assert not (tmp_path / "data" / "_delta_log").exists()


def test_an_assignment_catches_up_with_files_other_writers_finalized_or_left_behind(tmp_path):
    ledger = OutputLedger(tmp_path)
    assert ledger.catch_up() == 0
    write_file(tmp_path, 0, 3)
    dead_writers_file(tmp_path, 3)
    assert ledger.catch_up() >= 1 and ledger.next_offset("t", 0) == 3
    assert not inprogress_files(tmp_path)


def committed_file(tmp_path, first: int, n: int):
    w = RollingParquetWriter(tmp_path, roll_max_rows=100, roll_max_seconds=60)
    rows = [row(first + i) for i in range(n)]
    w.append(to_table(rows), [OffsetRange("t", 0, first, first + n - 1)], agg(rows))
    out = w.finalize()
    w.close()
    return out


def test_a_file_whose_offsets_another_consumer_committed_first_is_fenced_and_removed(tmp_path):
    """Two ledgers read the table at the same version; both upload a file for the same offsets. The
    first commit wins; the second is refused by the table (its app transactions moved), finds the
    stored version past its first offset, removes its upload and raises `Fenced`."""
    a, b = OutputLedger(tmp_path), OutputLedger(tmp_path)
    a.table.ensure()
    a.refresh(), b.refresh()
    mine, theirs = committed_file(tmp_path, 0, 2), committed_file(tmp_path, 0, 2)
    a.commit_file(mine)
    with pytest.raises(Fenced, match="already committed"):
        b.commit_file(theirs)
    assert not (tmp_path / "data" / theirs.name).exists() and (tmp_path / "data" / mine.name).exists()
    assert LocalOutput(tmp_path).finalized() == [mine.name]
    assert b.check([OffsetRange("t", 0, 0, 1)])  # the check before an upload says so too
    assert not b.check([OffsetRange("t", 0, 2, 3)])


def test_a_partition_whose_version_goes_back_stops_the_consumer(tmp_path):
    ledger = OutputLedger(tmp_path)
    ledger.commit_file(committed_file(tmp_path, 0, 2))
    for entry in sorted((tmp_path / "data" / "_delta_log").glob("*.json"))[1:]:
        entry.unlink()  # the log rewritten under us: our commit vanished
    ledger.table.forget()  # a fresh read of the rewritten log
    with pytest.raises(TableGap, match="went back"):
        ledger.check([OffsetRange("t", 0, 2, 3)])


def test_a_commit_with_no_row_advances_the_partition_without_a_file(tmp_path):
    """A micro-batch of dead letters and duplicates only: no file uploaded, an empty commit with the
    partition's app transaction (and the dead letters in its metadata)."""
    w = RollingParquetWriter(tmp_path, roll_max_rows=100, roll_max_seconds=60)
    a = agg([])
    a.skipped = 2
    w.append(to_table([]), [OffsetRange("t", 0, 0, 1)], a)
    footer = w.finalize()
    w.close()
    ledger = OutputLedger(tmp_path)
    ledger.commit_file(footer)
    assert not (tmp_path / "data" / footer.name).exists() and ledger.output.finalized() == []
    fresh = OutputLedger(tmp_path)
    fresh.refresh()
    assert fresh.next_offset("t", 0) == 2
    assert publish_summary(tmp_path)["skipped"] == 2


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
    assert batch.skipped == 1 and batch.duplicates == 1  # the test event; the delete is a delete
    assert [(d.key, d.offset) for d in batch.deletes] == [("a.flac", 12)]
    assert {tp.partition: tuple(r) for tp, r in batch.ranges.items()} == {0: (10, 14), 2: (3, 3)}


def test_a_batch_closes_after_a_delete_so_nothing_after_it_shares_its_commit(tmp_path):
    b = Batcher(OutputLedger(tmp_path), max_events=100, max_bytes=1 << 30, linger_ms=10_000)
    b.add(record(0, r2("a.flac")))
    assert not b.full()
    b.add(record(1, r2("a.flac", action="DeleteObject")))
    assert b.full()


def test_the_dedupe_index_forgets_a_deleted_version(tmp_path):
    index = DedupeIndex()
    for h in (1, 2, 3):
        index.add(h)
    index.discard_many(np.array([2], dtype=np.uint64))
    assert 2 not in index and 1 in index and 3 in index
    index.add(2)
    assert 2 in index


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


def test_catching_up_with_many_files_merges_the_index_once(tmp_path, monkeypatch):
    """Merging per file re-sorted the whole index once per file (quadratic: 145 s for 2 M hashes in
    200 files); a catch-up merges every new file's hashes in one sort."""
    for first in range(0, 20, 2):
        write_file(tmp_path, first, 2)
    merges = []
    real = DedupeIndex._merge
    monkeypatch.setattr(DedupeIndex, "_merge", lambda self, extra=None: (merges.append(1), real(self, extra))[1])
    ledger = OutputLedger(tmp_path)
    ledger.refresh()
    assert ledger.files_read == 0 and len(merges) == 1 and len(ledger.index) == 20


def test_ledger_and_latency_memory_stay_bounded_over_10_million_events():
    """The latency window keeps its fixed size over 10 million events in 10,000 files - not one entry
    per batch for the whole uptime. (The ledger keeps one version per partition: the table holds the
    rest.)"""
    from consumer.committer import LATENCY_WINDOW, CommitStats

    per_file, files = 1_000, 10_000
    stats = CommitStats()
    for _ in range(files):  # one finalize per file, one latency per batch: 10 million in all
        stats.latencies.extend([0.5] * per_file)
    assert stats.latencies.total == 10_000_000 and len(stats.latencies) == LATENCY_WINDOW
    assert len(stats.latencies.since(10_000_000 - 3)) == 3


def test_a_commit_whose_answer_is_lost_is_resolved_from_the_log_not_committed_twice(tmp_path, monkeypatch):
    """The commit lands but its answer is lost (a timeout, a dropped connection): the ledger reads the
    log, finds its own commit id there and goes on; a commit that did not land is tried again."""
    from pipeline.output.table import DatasetTable

    real = DatasetTable._create_entry  # noqa: SLF001
    calls = []

    def lost_answer(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            real(self, *args, **kwargs)
            raise OSError("connection reset after the PUT landed")
        if len(calls) == 2:
            raise OSError("connection refused: nothing was written")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(DatasetTable, "_create_entry", lost_answer)
    ledger = OutputLedger(tmp_path)
    ledger.commit_file(committed_file(tmp_path, 0, 2))  # landed, answer lost
    ledger.commit_file(committed_file(tmp_path, 2, 2))  # refused once, then lands
    monkeypatch.undo()
    fresh = OutputLedger(tmp_path)
    fresh.refresh()
    assert fresh.next_offset("t", 0) == 4 and len(LocalOutput(tmp_path).finalized()) == 2
    assert len(calls) == 3
    offsets = [(r.first, r.last) for c in fresh.table.commits(None) for r in c.offsets]
    assert offsets == [(0, 1), (2, 3)]  # each once


def test_a_0_1_output_is_migrated_into_a_table_that_resumes_where_its_footers_end(tmp_path):
    """`migrate_output` commits 0.1's files with their footer offsets: the consumer then starts, the
    positions and the dedupe index come from the table, and summary.json counts the migrated rows."""
    from pipeline.ledger import migrate_output

    for first in (0, 3):
        committed_file(tmp_path, first, 3)  # 0.1: files under data/, no table
    with pytest.raises(OutputNotMigrated):
        recover(OutputLedger(tmp_path), IDENTITY)
    assert migrate_output(tmp_path) is not None
    ledger = OutputLedger(tmp_path)
    recover(ledger, IDENTITY)
    assert ledger.next_offset("t", 0) == 6 and ledger.already_written("b", "k5.flac", "e5")
    assert sorted(LocalOutput(tmp_path).finalized()) == sorted(p.name for p in (tmp_path / "data").glob("*.parquet"))
    assert orjson.loads((tmp_path / SUMMARY_NAME).read_bytes())["total_files"] == 6
    with pytest.raises(Exception, match="already has a Delta table"):
        migrate_output(tmp_path)


def test_losing_the_race_for_the_next_log_entry_reads_the_winner_and_is_fenced(tmp_path, monkeypatch):
    """Another consumer's commit lands between our check and our write of the next log entry: the
    entry is created only if absent, so ours is refused; the winner's entry is read, its app
    transaction holds our offsets, and we are `Fenced` - the winner's entry stays as it was."""
    from pipeline.output.table import DatasetTable

    a, b = OutputLedger(tmp_path), OutputLedger(tmp_path)  # two consumers: two outputs, two tables
    a.table.ensure(), b.table.ensure()
    mine, theirs = committed_file(tmp_path, 0, 2), committed_file(tmp_path, 0, 2)
    real, raced = DatasetTable._create_entry, []  # noqa: SLF001

    def racing(self, version, body):
        if self is b.table and not raced:
            raced.append(version)
            a.commit_file(mine)  # the winner writes the very version b is about to write
        return real(self, version, body)

    monkeypatch.setattr(DatasetTable, "_create_entry", racing)
    with pytest.raises(Fenced):
        b.commit_file(theirs)
    assert raced == [1] and LocalOutput(tmp_path).finalized() == [mine.name]
    fresh = OutputLedger(tmp_path)
    fresh.refresh()
    assert [(c.version, [n for n, _ in c.files]) for c in fresh.table.commits(0)] == [(1, [mine.name])]


def test_metavoice_migrate_makes_a_0_1_output_a_table_once_and_then_refuses(tmp_path, capsys):
    """The command the start-up refusal names exists: it commits 0.1's files, a second run is one error line."""
    from metavoice.cli import main

    for first in (0, 3):
        committed_file(tmp_path, first, 3)
    assert main(["migrate", str(tmp_path)]) == 0
    assert "table version" in capsys.readouterr().out
    ledger = OutputLedger(tmp_path)
    recover(ledger, IDENTITY)
    assert ledger.next_offset("t", 0) == 6
    assert main(["migrate", str(tmp_path)]) == 1
    assert "already has a Delta table" in capsys.readouterr().err.splitlines()[-1]


def test_a_delete_that_loses_its_files_to_a_compaction_is_planned_again_and_removes_the_row(tmp_path, monkeypatch):
    """A compaction commits between the delete's plan and its commit (it removed the files the plan
    rewrites): the commit refuses (`FilesRemovedMeanwhile`), the delete is planned again on the
    compacted file, and the row goes, once."""
    from pipeline.output.maintenance import compact

    for first in (0, 2, 4):
        write_file(tmp_path, first, 2)  # k0..k5 at offsets 0..5, three files
    footer = delete_footer(tmp_path, 6)  # the delete's record
    ledger = OutputLedger(tmp_path)
    ledger.refresh()
    real, plans = OutputLedger._plan_deletes, []

    def plan_then_compact(self, *args):
        plan = real(self, *args)
        if not plans:
            compact(tmp_path)
        plans.append(plan.based_on)
        return plan

    monkeypatch.setattr(OutputLedger, "_plan_deletes", plan_then_compact)
    ledger.commit_file(footer, [ObjectDelete("b", "k1.flac", "t", 0, 6)])

    assert len(plans) == 2 and plans[1] > plans[0]
    table = ledger.table.snapshot()
    ids = sorted(table.to_pyarrow_dataset().to_table(columns=["id"]).column("id").to_pylist())
    assert ids == [f"k{i}.flac" for i in (0, 2, 3, 4, 5)]
    doc = publish_summary(tmp_path)
    assert doc["deleted"] == {"events": 1, "rows": 1} and doc["total_files"] == 5
    assert table.transaction_version("metavoice-consumer:t:0") == 6


def _commit_versions(tmp_path, versions, delete=None):
    """Rows of one key b/k.flac from t[0] at offsets 0.., one per (etag, version_id); then a
    micro-batch holding `delete` at the next offset."""
    from dataclasses import replace as _replace

    rows = [_replace(row(0), id="k.flac", etag=e, version_id=v, kafka_offset=i) for i, (e, v) in enumerate(versions)]
    w = RollingParquetWriter(tmp_path, roll_max_rows=100, roll_max_seconds=60)
    w.append(to_table(rows), [OffsetRange("t", 0, 0, len(rows) - 1)], agg(rows))
    OutputLedger(tmp_path).commit_file(w.finalize())
    w.close()
    ledger = commit_delete(tmp_path, "k.flac", len(rows), version_id=delete)
    table = ledger.table.snapshot().to_pyarrow_dataset().to_table(columns=["etag", "version_id"])
    return ledger, sorted(zip(*(table.column(c).to_pylist() for c in ("etag", "version_id"))))


def test_a_delete_naming_a_version_removes_that_versions_rows_only(tmp_path):
    ledger, left = _commit_versions(tmp_path, [("e1", "v1"), ("e2", "v2")], delete="v1")
    assert left == [("e2", "v2")]
    assert publish_summary(tmp_path)["deleted"] == {"events": 1, "rows": 1}
    assert not ledger.already_written("b", "k.flac", "e1") and ledger.already_written("b", "k.flac", "e2")
    again = OutputLedger(tmp_path)  # the log's removed versions, read back from the table
    again.refresh()
    assert not again.already_written("b", "k.flac", "e1") and again.already_written("b", "k.flac", "e2")


def test_a_delete_without_a_version_removes_every_version_before_it(tmp_path):
    _, left = _commit_versions(tmp_path, [("e1", "v1"), ("e2", "v2")], delete=None)
    assert left == []
    assert publish_summary(tmp_path)["deleted"] == {"events": 1, "rows": 2}


def test_a_versioned_delete_also_removes_rows_that_recorded_no_version(tmp_path):
    """Consent first: a row whose version is unknown (written before the column) may be the one deleted."""
    _, left = _commit_versions(tmp_path, [("e0", None), ("e2", "v2")], delete="v1")
    assert left == [("e2", "v2")]


def test_a_deleted_version_whose_bytes_a_surviving_version_shares_stays_in_the_dedupe_index(tmp_path):
    """Two versions with the same content share the etag: deleting one must not let the other's
    re-delivered event write a second row."""
    ledger, left = _commit_versions(tmp_path, [("same", "v1"), ("same", "v2")], delete="v1")
    assert left == [("same", "v2")]
    assert ledger.already_written("b", "k.flac", "same")
    again = OutputLedger(tmp_path)
    again.refresh()
    assert again.already_written("b", "k.flac", "same")


def test_a_table_made_before_the_version_id_column_gains_it_and_reads_old_and_new_rows_together(tmp_path):
    """The first start after the upgrade adds the column to the table's schema (delta-rs
    `alter.add_columns`); deltalake and polars read the old file's rows with a null version_id."""
    from dataclasses import replace as _replace

    import polars as pl
    import pyarrow as pa
    import pyarrow.parquet as pq
    from deltalake import DeltaTable

    from pipeline.output.layout import DATA_DIR
    from pipeline.records import SCHEMA

    old_schema = pa.schema([f for f in SCHEMA if f.name != "version_id"])
    uri = OutputLedger(tmp_path).table.uri
    DeltaTable.create(uri, old_schema)
    old = write_file(tmp_path, 0, 1)  # k0, as a consumer before the column wrote it
    path = tmp_path / DATA_DIR / old.name
    before = path.stat().st_size
    pq.write_table(pq.read_table(path).select(old_schema.names).cast(old_schema), path)
    entry = sorted((tmp_path / DATA_DIR / "_delta_log").glob("*.json"))[-1]  # its Add action's size, as written
    entry.write_text(entry.read_text().replace(f'"size":{before},', f'"size":{path.stat().st_size},'))

    recover(OutputLedger(tmp_path), IDENTITY)
    assert "version_id" in [f.name for f in DeltaTable(uri).schema().fields]
    rows = [_replace(row(1), version_id="v1")]
    w = RollingParquetWriter(tmp_path, roll_max_rows=100, roll_max_seconds=60)
    w.append(to_table(rows), [OffsetRange("t", 0, 1, 1)], agg(rows))
    OutputLedger(tmp_path).commit_file(w.finalize())
    w.close()

    want = [("k0.flac", None), ("k1.flac", "v1")]
    t = DeltaTable(uri).to_pyarrow_table(columns=["id", "version_id"])
    assert sorted(zip(*(t.column(c).to_pylist() for c in ("id", "version_id")))) == want
    df = pl.read_delta(uri, columns=["id", "version_id"]).sort("id")
    assert list(df.iter_rows()) == want
