"""Time travel: `metavoice summary OUTPUT --version N` / `--as-of TIME` summarize the rows of one
table version with summary.py's own aggregates (pipeline/output/snapshot.py)."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from pipeline.errors import MaintenanceRefused
from pipeline.output.maintenance import compact
from pipeline.output.snapshot import read_snapshot
from pipeline.output.table import open_table
from tests.delta_tables import aggregates_of, append, row

REPO = Path(__file__).resolve().parents[1]
ROWS = [row(i, frames=75 * (i + 1), language="en" if i < 4 else "de") for i in range(7)]



@pytest.fixture
def history(tmp_path) -> tuple[Path, list[datetime]]:
    """Versions 0, 1, 2: rows 0-1, then 2-3, then 4-6; the commit times between them."""
    out = tmp_path / "out"
    between = []
    for chunk in (ROWS[:2], ROWS[2:4], ROWS[4:]):
        append(out, chunk)
        time.sleep(0.05)
        between.append(datetime.now(timezone.utc))
        time.sleep(0.05)
    return out, between


@pytest.mark.parametrize(("version", "rows"), [(0, 2), (1, 4), (2, 7)])
def test_the_summary_of_a_version_is_the_aggregate_of_its_rows(history, version, rows):
    out, _ = history
    snap = read_snapshot(out, version=version)
    assert snap.version == version and len(snap.files) == version + 1
    assert snap.aggregates.to_state() == aggregates_of(ROWS[:rows]).to_state()
    shown = snap.report()
    assert shown["table_version"] == version and shown["total_files"] == rows
    assert shown["languages"] == dict(aggregates_of(ROWS[:rows]).languages.most_common())
    assert "_state" not in shown and (shown["skipped"], shown["duplicates"]) == (0, 0)  # commits of no consumer


def test_a_version_counts_what_made_no_row_up_to_it_as_summary_json_does(tmp_path):
    """Dead letters, skips and duplicates are in no file: each version sums its commits' metadata."""
    from pipeline.ledger import publish_summary
    from tests.test_summary_aggregates import write_file

    counts = [({"DecodeFailed": 1}, 2, 0), ({"ObjectNotFound": 2}, 0, 3), ({"DecodeFailed": 1}, 1, 1)]
    for i, (errors, skipped, duplicates) in enumerate(counts):
        write_file(tmp_path, 2 * i, 2, rowless=(errors, skipped, duplicates))
    summary = publish_summary(tmp_path)
    latest = read_snapshot(tmp_path).report()
    for key in ("errors", "skipped", "duplicates", "superseded", "total_files"):
        assert latest[key] == summary[key], key
    first = read_snapshot(tmp_path, version=1).report()  # version 0: the table's creation
    assert (first["errors"]["by_type"], first["skipped"], first["duplicates"]) == ({"DecodeFailed": 1}, 2, 0)
    second = read_snapshot(tmp_path, version=2).report()
    assert (second["errors"]["by_type"], second["skipped"], second["duplicates"]) == (
        {"DecodeFailed": 1, "ObjectNotFound": 2}, 2, 3)


def test_a_version_before_a_delete_keeps_the_row_and_one_after_counts_it_deleted(tmp_path):
    """A delete is a table version like any other: the version before it still holds the row,
    the version after it neither holds nor counts it, as summary.json does."""
    from pipeline.ledger import publish_summary
    from tests.test_summary_aggregates import commit_delete, write_file

    write_file(tmp_path, 0, 2)  # rows k0, k1 (version 1)
    commit_delete(tmp_path, "k1.flac", 2)
    summary = publish_summary(tmp_path)

    before, after = read_snapshot(tmp_path, version=1).report(), read_snapshot(tmp_path).report()
    assert (before["total_files"], before["deleted"]) == (2, {"events": 0, "rows": 0})
    assert (after["total_files"], after["deleted"]) == (1, {"events": 1, "rows": 1})
    assert (after["total_files"], after["deleted"]) == (summary["total_files"], summary["deleted"])


def test_as_of_picks_the_version_current_at_that_time(history):
    out, between = history
    assert read_snapshot(out, as_of=between[0]).version == 0
    assert read_snapshot(out, as_of=between[1]).version == 1
    assert read_snapshot(out, as_of=between[2] + timedelta(days=1)).version == 2


def test_a_version_survives_compaction_and_deletes_until_vacuumed(history):
    out, _ = history
    open_table(out).delete("id = 'k0.flac'")
    compact(out)
    assert read_snapshot(out).aggregates.files == 6  # the latest: one row deleted
    assert read_snapshot(out, version=2).aggregates.to_state() == aggregates_of(ROWS).to_state()
    compact(out, retention_hours=0, force=True)
    with pytest.raises(MaintenanceRefused, match="vacuumed"):
        read_snapshot(out, version=2)


def test_a_version_or_time_the_table_never_had_is_refused(history):
    out, _ = history
    with pytest.raises(MaintenanceRefused, match="no version 9"):
        read_snapshot(out, version=9)
    with pytest.raises(MaintenanceRefused, match="did not exist yet"):
        read_snapshot(out, as_of=datetime(2020, 1, 1, tzinfo=timezone.utc))
    with pytest.raises(MaintenanceRefused, match="no Delta table"):
        read_snapshot(out.parent / "elsewhere", version=0)


def metavoice(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "metavoice", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**__import__("os").environ, "COLUMNS": "200"})


def test_the_summary_command_shows_an_older_version(history):
    out, between = history
    done = metavoice("summary", str(out), "--version", "1")
    assert done.returncode == 0, done.stderr
    assert "version 1" in done.stdout and "│ total_files " in done.stdout
    assert [l for l in done.stdout.splitlines() if "total_files" in l][0].split("│")[2].strip() == "4"
    as_of = metavoice("summary", str(out), "--as-of", between[0].isoformat())
    assert as_of.returncode == 0 and "version 0" in as_of.stdout, as_of.stderr
    refused = metavoice("summary", str(out), "--version", "9")
    assert refused.returncode == 1 and refused.stderr.startswith("error: MaintenanceRefused")
    assert metavoice("summary", str(out), "--version", "1", "--as-of", "2026-01-01").returncode == 2
    assert metavoice("summary", str(out), "--as-of", "yesterday").returncode == 2
