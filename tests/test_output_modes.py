"""Outputs others can read: every file of a local output gets the process umask's mode, like the
Parquet files (summary.json, README.md and _manifest.json were 0600: a reader service or a teammate
on a shared volume got "permission denied")."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from pipeline.durable import atomic_write_bytes
from pipeline.ledger import OutputLedger, publish_summary
from pipeline.manifest import check_manifest
from pipeline.output import LocalOutput, OffsetRange
from pipeline.output.layout import CARD_NAME, MANIFEST_NAME, SUMMARY_NAME
from pipeline.parquet import RollingParquetWriter
from pipeline.records import to_table

from .test_parquet_writer import agg, row


@pytest.fixture(params=[0o022, 0o002, 0o077], ids=lambda m: f"umask-{m:03o}")
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_summary_card_manifest_and_data_files_get_the_umask_mode(tmp_path, umask):
    out = LocalOutput(tmp_path / "out")
    check_manifest(out, {"topic": "t", "group": "g", "whisper_model": "tiny.en", "tokenizer": "synthetic"})
    w = RollingParquetWriter(out, roll_max_rows=100, roll_max_seconds=60)
    w.append(to_table([row(0)]), [OffsetRange("t", 0, 0, 0)], agg([row(0)]))
    inprogress = next((out.root / "_tmp").glob("*.inprogress"))
    assert mode(inprogress) == 0o666 & ~umask  # the spool too
    OutputLedger(out).commit_file(w.finalize())
    w.close()
    publish_summary(out)

    want = 0o666 & ~umask
    (data,) = (out.root / "data").glob("*.parquet")
    files = {p.name: mode(p) for p in (data, out.root / SUMMARY_NAME, out.root / CARD_NAME, out.root / MANIFEST_NAME)}
    assert files == {name: want for name in files}
    assert mode(out.root / "data") == 0o777 & ~umask
    # a rewrite (compare-and-swap replaces the file) keeps it
    publish_summary(out)
    check_manifest(out, {"topic": "t", "group": "g", "whisper_model": "other", "tokenizer": "synthetic"}, force=True)
    assert (mode(out.root / SUMMARY_NAME), mode(out.root / MANIFEST_NAME)) == (want, want)
    assert not list(out.root.glob(".*.tmp")), "temporary files left behind"


def test_the_atomic_write_behind_the_backfill_checkpoint_gets_the_umask_mode(tmp_path, umask):
    path = tmp_path / "checkpoint.json"
    atomic_write_bytes(path, b"{}")
    assert mode(path) == 0o666 & ~umask and path.read_bytes() == b"{}"
