"""`metavoice compact`: small files rewritten with the rows and the positions unchanged, vacuum only
past a safe retention, a dataset card naming the current files, and all of it while a consumer
appends (pipeline/output/maintenance.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.errors import MaintenanceRefused
from pipeline.ledger import load_summary
from pipeline.output.layout import CARD_NAME
from pipeline.output.maintenance import MIN_RETENTION_HOURS, compact
from pipeline.output.table import app_id, open_table, table_uri
from pipeline.output import open_output
from tests.consumer_process import (ConsumerProcess, Trickle, assert_summary_matches_files, committed_offsets,
                                    create_topics, logs_on_failure, partition_ends, upload_copies, versions)
from tests.delta_tables import GROUP, TOPIC, append, glob_rows, row, table_versions

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def small_files(tmp_path) -> Path:
    """An output whose table holds 12 one-row files, committed one by one like a quiet stream."""
    out = tmp_path / "out"
    for i in range(12):
        append(out, [row(i)])
    return out


def card_files(out: Path) -> list[str]:
    front = (out / CARD_NAME).read_text().split("---")[1]
    [config] = yaml.safe_load(front)["configs"]
    return config["data_files"][0]["path"]


def test_compaction_rewrites_small_files_with_the_same_rows_and_positions(small_files):
    before = table_versions(small_files)
    report = compact(small_files)
    table = open_table(small_files)
    assert (report.files_before, report.files_after) == (12, 1) == (12, len(table.file_uris()))
    assert report.rows_before == report.rows_after == 12
    assert table_versions(small_files) == before  # same (bucket, id, etag, utterance) set, each once
    assert table.transaction_version(app_id(GROUP, TOPIC, 0)) == 11  # the consumer's position survives
    assert report.version_after == report.version_before + 1
    assert table.history(1)[0]["operation"] == "OPTIMIZE"
    assert report.vacuumed == []  # the small files were removed just now: kept for the retention


def test_summary_json_follows_the_compaction(small_files):
    """Its file count (these commits carry no aggregates of ours: the consumer's do, see below)."""
    compact(small_files)
    state = load_summary(small_files)
    assert (state.table_version, state.parquet_files) == (open_table(small_files).version(), 1)


def test_the_card_names_the_current_files_and_datasets_reads_each_row_once(small_files):
    import datasets

    compact(small_files)
    [current] = [Path(u).name for u in open_table(small_files).file_uris()]
    assert card_files(small_files) == [f"data/{current}"]
    loaded = datasets.load_dataset(str(small_files), split="train")
    assert sorted(loaded["id"]) == sorted(f"k{i}.flac" for i in range(12))


def test_a_glob_reader_sees_replaced_files_beside_their_replacement_until_vacuum(small_files):
    """What README "Reading the dataset" says: a glob of data/*.parquet is not a reader of the table."""
    import datasets

    compact(small_files)
    assert glob_rows(small_files) == 24  # the 12 small files and the compacted one, until vacuumed
    globbed = datasets.load_dataset("parquet", data_files=f"{small_files}/data/*.parquet", split="train",
                                    cache_dir=str(small_files.parent / "hf-cache"))
    assert globbed.num_rows == 24  # `datasets` on a glob: the same
    report = compact(small_files, retention_hours=0, force=True)
    assert len(report.vacuumed) == 12
    assert glob_rows(small_files) == 12
    assert sum(table_versions(small_files).values()) == 12
    with pytest.raises(FileNotFoundError):  # the price of forcing: version 11's files are gone
        table_versions(small_files, version=11)


def test_a_retention_under_the_safe_minimum_is_refused_unless_forced(small_files):
    version = open_table(small_files).version()
    with pytest.raises(MaintenanceRefused, match=f"safe minimum of {MIN_RETENTION_HOURS} h"):
        compact(small_files, retention_hours=MIN_RETENTION_HOURS - 1)
    assert open_table(small_files).version() == version  # refused before changing anything
    assert len(open_table(small_files).file_uris()) == 12
    compact(small_files)
    report = compact(small_files, retention_hours=0, force=True)
    assert len(report.vacuumed) == 12


def test_a_dry_run_changes_nothing_and_lists_what_vacuum_would_delete(small_files):
    compact(small_files)
    version = open_table(small_files).version()
    report = compact(small_files, retention_hours=0, force=True, dry_run=True)
    assert len(report.vacuumed) == 12 and report.small_files == 1
    assert open_table(small_files).version() == version
    assert glob_rows(small_files) == 24  # nothing deleted


def test_vacuum_deletes_a_file_no_commit_names_only_once_it_is_older_than_the_retention(small_files):
    """A killed consumer's upload that never got its commit goes with the default retention; a
    consumer's file about to be committed (seconds old) survives any vacuum, a forced one too."""
    [first] = [Path(u) for u in open_table(small_files, version=0).file_uris()]
    pending = first.with_name("part-pending-writer-00001.parquet")
    orphan = first.with_name("part-killed-writer-00001.parquet")
    for f in (pending, orphan):
        f.write_bytes(first.read_bytes())
    week_ago = time.time() - (MIN_RETENTION_HOURS + 1) * 3600
    os.utime(orphan, (week_ago, week_ago))
    assert "part-killed-writer-00001.parquet" in compact(small_files).vacuumed
    assert not orphan.exists() and pending.exists()
    compact(small_files, retention_hours=0, force=True)
    assert pending.exists()


def test_an_output_without_a_table_is_refused(tmp_path):
    with pytest.raises(MaintenanceRefused, match="no Delta table"):
        compact(tmp_path)


def metavoice(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "metavoice", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_the_command_compacts_and_refuses_in_one_line(small_files):
    done = metavoice("compact", str(small_files), "--target-size", str(64 * 1024 * 1024))
    assert done.returncode == 0, done.stderr
    assert "files 12 -> 1" in done.stdout and len(open_table(small_files).file_uris()) == 1
    refused = metavoice("compact", str(small_files), "--retention-hours", "1")
    assert refused.returncode == 1
    assert refused.stderr.count("\n") == 1 and "MaintenanceRefused" in refused.stderr
    bad = metavoice("compact", str(small_files), "--target-size", "12")
    assert bad.returncode == 2 and "--target-size" in bad.stderr
    assert table_uri(small_files).endswith("/data")


# --- while a real consumer appends -------------------------------------------------------------


def optimize_versions(location, settings) -> list[int]:
    """The versions of the table's OPTIMIZE commits."""
    return sorted(h["version"] for h in open_table(location, settings).history() if h.get("operation") == "OPTIMIZE")


def wait_for_table(location, settings, proc, *, files: int = 0, rows: int = 0, timeout: float = 120) -> None:
    """Until the latest version holds at least `files` files and `rows` rows (polling the log)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        table = open_table(location, settings)
        if table is not None and len(table.file_uris()) >= files and table.to_pyarrow_dataset().count_rows() >= rows:
            return
        assert proc.proc.poll() is None, f"the consumer exited ({proc.proc.returncode}):\n{proc.log()[-3000:]}"
        time.sleep(0.2)
    raise AssertionError(f"the table did not reach {files} files / {rows} rows in {timeout}s")


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "s3"])
def test_compaction_while_a_consumer_appends_keeps_every_row_exactly_once(
    where, services, s3, bucket, settings_factory, speech_corpus, unique, tmp_path
):
    """Compactions land between a live consumer's commits; each leaves the rows as they were, the
    file count drops, and a consumer restarted after them (kill -9) still writes every event once."""
    output = {}
    if where == "s3":
        s3.create_bucket(Bucket=f"out-{unique}")
        output = {"output_dir": f"s3://out-{unique}/dataset", "spool_dir": str(tmp_path / "spool")}
    # one event per micro-batch and per file: a quiet stream's small files
    st = settings_factory(batch_max_events=1, roll_max_rows=1, roll_max_seconds=1.0, exit_when_idle=None, **output)
    loc = st.output_dir
    create_topics(st)
    trickle = Trickle(st, upload_copies(s3, bucket, [c.path for c in speech_corpus[:3]], 36), interval=0.3)
    slow = {"METAVOICE_TEST_WHISPER_DELAY": "0.05"}
    first = ConsumerProcess(services, st, tmp_path / "first.log", **slow).start()
    second = None
    reports = []
    try:
        first.wait_for_log("partitions assigned", timeout=60)
        trickle.start()
        wait_for_table(loc, st, first, files=6)
        reports.append(compact(loc, st))  # while the consumer appends
        wait_for_table(loc, st, first, files=reports[-1].files_after + 3)
        reports.append(compact(loc, st))
        first.kill()  # the restart takes its positions from the compacted table
        second = ConsumerProcess(services, st, tmp_path / "second.log", **slow).start()
        events = trickle.finish(timeout=120)
        wait_for_table(loc, st, second, rows=len(events))
        reports.append(compact(loc, st))
        second.signal(signal.SIGTERM)
        assert second.wait(timeout=60) == 0
    finally:
        first.kill()
        if second is not None:
            second.kill()

    with logs_on_failure(first, second):
        optimized = optimize_versions(loc, st)
        assert len(optimized) == 3
        for v in optimized:  # each compaction changed no row: the same (bucket, id, etag, utterance) set
            assert table_versions(loc, st, version=v) == table_versions(loc, st, version=v - 1), f"version {v}"
        assert sum(r.compacted.get("numFilesRemoved", 0) for r in reports) > len(events) // 2
        final = open_table(loc, st)
        assert len(final.file_uris()) < len(events) // 2  # the 36 one-row files, compacted
        expected = {(b, k, e) for b, k, e in versions(events)}
        rows = table_versions(loc, st)
        assert {(b, k, e) for b, k, e, _ in rows} == expected and set(rows.values()) == {1}
        assert_summary_matches_files(open_output(loc, st))  # counts follow the compaction, rows unchanged
        ends = partition_ends(st, expected=len(events))
        assert committed_offsets(st) == {p: (end or None) for p, end in ends.items()}
        for p, end in ends.items():  # the table's positions: the last offset of each partition
            assert final.transaction_version(app_id(st.group, st.topic, p)) == (end - 1 if end else None)
