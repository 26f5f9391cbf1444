"""`python -m metavoice summary DIR [--rebuild | --version N | --as-of TIME]`: the dataset at a
glance, a check of it, and what an older version of its table held (pipeline/output/snapshot.py)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from rich.console import Console
from rich.table import Table

from pipeline.cli_support import print_error
from pipeline.ledger import load_summary, rebuild_aggregates
from pipeline.output import as_output, is_object_store
from pipeline.output.layout import SUMMARY_NAME

if TYPE_CHECKING:
    from pipeline.config import Settings

CHECKED = ("files", "total_duration_sec", "sampling_rates", "languages", "transcription_lengths", "token_frames",
           "errors", "skipped", "duplicates", "superseded", "untranscribed")


def run_summary(output_dir: Path | str, rebuild: bool = False) -> int:
    """`output_dir`: a local directory, or an object-store output (`s3://bucket/prefix`)."""
    console = Console()
    if not is_object_store(output_dir) and not Path(output_dir).is_dir():
        return print_error(f"{output_dir} is not a directory (an output directory holds data/ and {SUMMARY_NAME})", 2)
    output = as_output(output_dir)
    raw = output.read_doc(SUMMARY_NAME)
    if raw is None:
        return print_error(f"no {SUMMARY_NAME} in {output_dir}: the consumer writes it when it finalizes its first file", 2)
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return print_error(f"{output.location}/{SUMMARY_NAME} is not valid JSON ({exc}); the consumer rebuilds it from "
                           "the file footers on its next finalize")
    _print_doc(console, f"{output_dir} ({doc.get('updated_at', '?')})", doc)
    if not rebuild:
        return 0
    loaded = load_summary(output)
    incremental = loaded[0].to_state() if loaded else {}
    recomputed, files = rebuild_aggregates(output)
    mismatches = [k for k in CHECKED if _norm(incremental.get(k)) != _norm(recomputed.to_state().get(k))]
    if loaded and len(files) != loaded.parquet_files:
        mismatches.append("files included")
    shown = recomputed.report(files, loaded.table_version if loaded else None)
    mismatches += [k for k in shown if not k.startswith("_") and k != "updated_at" and _norm(doc.get(k)) != _norm(shown[k])]
    if mismatches:
        console.print(f"[red]summary.json disagrees with the Parquet files on: {', '.join(mismatches)}[/]")
        return 1
    console.print(f"[green]summary.json matches the {len(files)} Parquet files[/]")
    return 0


def run_summary_of_version(output_dir: Path | str, settings: "Settings", version: int | None,
                           as_of: datetime | None) -> int:
    """The summary of one table version (`version`, or the one current at `as_of`), from its rows."""
    from pipeline.output.snapshot import read_snapshot

    if not is_object_store(output_dir) and not Path(output_dir).is_dir():
        return print_error(f"{output_dir} is not a directory (an output directory holds data/ and {SUMMARY_NAME})", 2)
    snapshot = read_snapshot(output_dir, settings, version=version, as_of=as_of)
    doc = snapshot.report()
    _print_doc(Console(), f"{output_dir} version {snapshot.version} ({doc.get('updated_at') or '?'})", doc)
    return 0


def _print_doc(console: Console, title: str, doc: dict[str, Any]) -> None:
    table = Table(title=title, show_header=True)
    table.add_column("metric")
    table.add_column("value", overflow="fold")
    for key, value in doc.items():
        if key.startswith("_"):
            continue
        table.add_row(key, orjson.dumps(value).decode() if isinstance(value, (dict, list)) else str(value))
    console.print(table)


def _norm(v):
    if isinstance(v, float):
        return round(v, 6)
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in v.items()}
    return v
