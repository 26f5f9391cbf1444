"""`metavoice summary DIR [--rebuild]` (metavoice/summary.py): the dataset at a glance, and a check of it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from metavoice.cli import main
from pipeline.output.layout import SUMMARY_NAME

from .datasets import write_dataset


@pytest.fixture
def dataset(tmp_path):
    return write_dataset(tmp_path / "out", rows=30, files=2)


def tamper(output_dir: Path, change) -> None:
    path = output_dir / SUMMARY_NAME
    doc = orjson.loads(path.read_bytes())
    change(doc)
    path.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))


def test_summary_prints_the_dataset_at_a_glance(dataset, capsys):
    assert main(["summary", str(dataset)]) == 0
    out = capsys.readouterr().out
    for key in ("total_files", "total_duration_sec", "sampling_rate_distribution", "languages", "errors", "parquet_files"):
        assert key in out
    assert "_state" not in out  # bookkeeping stays out of the table


def test_rebuild_agrees_with_untouched_files(dataset, capsys):
    assert main(["summary", str(dataset), "--rebuild"]) == 0
    assert "matches the 2 Parquet files" in capsys.readouterr().out


@pytest.mark.parametrize(
    "what, change",
    [
        ("files", lambda d: d["_state"]["aggregates"].update(files=d["_state"]["aggregates"]["files"] + 1)),
        ("languages", lambda d: d["_state"]["aggregates"]["languages"].update(xx=1)),
        ("total_duration_sec", lambda d: d["_state"]["aggregates"].update(total_duration_sec=1.0)),
        ("errors", lambda d: d["_state"]["aggregates"]["errors"].clear()),
        ("files included", lambda d: d["_state"].update(parquet_files=d["_state"]["parquet_files"] - 1)),
    ],
)
def test_rebuild_exits_1_when_the_summary_disagrees_with_the_files(dataset, capsys, what, change):
    tamper(dataset, change)
    assert main(["summary", str(dataset), "--rebuild"]) == 1
    out = capsys.readouterr().out
    assert "disagrees with the Parquet files" in out and what in out


def test_rebuild_exits_1_when_a_file_was_committed_that_the_summary_lacks(dataset, tmp_path):
    import numpy as np

    from pipeline.ledger import OutputLedger
    from pipeline.parquet import OffsetRange, RollingParquetWriter
    from pipeline.records import to_table
    from pipeline.summary import Aggregates

    from .datasets import make_row

    rows = [make_row(100 + i, np.random.default_rng(3), partition=1) for i in range(3)]
    agg = Aggregates()
    for r in rows:
        agg.add_row(r)
    w = RollingParquetWriter(dataset, roll_max_rows=100, roll_max_seconds=60)
    w.append(to_table(rows), [OffsetRange("events", 1, 0, 2)], agg)
    OutputLedger(dataset).commit_file(w.finalize())  # a crash before its summary write
    w.close()
    assert main(["summary", str(dataset), "--rebuild"]) == 1


def test_rebuild_exits_1_when_a_shown_total_was_edited(dataset):
    tamper(dataset, lambda d: d.update(total_files=d["total_files"] + 1))
    assert main(["summary", str(dataset), "--rebuild"]) == 1


def test_a_directory_without_summary_is_exit_code_2_with_one_line_on_stderr(tmp_path, capsys):
    assert main(["summary", str(tmp_path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and f"no {SUMMARY_NAME} in {tmp_path}" in err[0], err


def test_a_missing_directory_is_exit_code_2_with_one_line_on_stderr(tmp_path, capsys):
    assert main(["summary", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: {tmp_path / 'nope'} is not a directory (an output directory holds data/ and {SUMMARY_NAME})"
    ]


def test_summary_runs_as_a_module(dataset):
    env = {**os.environ, "COLUMNS": "200"}
    done = subprocess.run([sys.executable, "-m", "metavoice", "summary", str(dataset), "--rebuild"],
                          capture_output=True, text=True, timeout=60, env=env, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr
    assert "total_files" in done.stdout and "matches the 2 Parquet files" in done.stdout
