"""`python -m pipeline summary DIR [--rebuild]`: the dataset at a glance, and a check of it."""

from __future__ import annotations

from pathlib import Path

import orjson
from rich.console import Console
from rich.table import Table

from .ledger import rebuild_aggregates
from .summary import SUMMARY_NAME, load_summary

CHECKED = ("files", "total_duration_sec", "sampling_rates", "languages", "transcription_lengths", "token_frames",
           "errors", "skipped", "duplicates", "superseded", "untranscribed")


def run_summary(output_dir: Path, rebuild: bool = False) -> int:
    console = Console()
    path = output_dir / SUMMARY_NAME
    if not path.exists():
        console.print(f"[red]no {SUMMARY_NAME} in {output_dir}[/]")
        return 2
    try:
        doc = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as exc:
        console.print(f"[red]{path} is not valid JSON ({exc}); the consumer rebuilds it from the file footers on its next finalize[/]")
        return 1
    table = Table(title=f"{output_dir} ({doc.get('updated_at', '?')})", show_header=True)
    table.add_column("metric")
    table.add_column("value", overflow="fold")
    for key, value in doc.items():
        if key.startswith("_"):
            continue
        table.add_row(key, orjson.dumps(value).decode() if isinstance(value, (dict, list)) else str(value))
    console.print(table)
    if not rebuild:
        return 0
    loaded = load_summary(output_dir)
    incremental = loaded[0].to_state() if loaded else {}
    recomputed, files = rebuild_aggregates(output_dir)
    mismatches = [k for k in CHECKED if _norm(incremental.get(k)) != _norm(recomputed.to_state().get(k))]
    if loaded and set(files) != loaded[1]:
        mismatches.append("files included")
    shown = recomputed.report(files)
    mismatches += [k for k in shown if not k.startswith("_") and k != "updated_at" and _norm(doc.get(k)) != _norm(shown[k])]
    if mismatches:
        console.print(f"[red]summary.json disagrees with the Parquet files on: {', '.join(mismatches)}[/]")
        return 1
    console.print(f"[green]summary.json matches the {len(files)} Parquet files[/]")
    return 0


def _norm(v):
    if isinstance(v, float):
        return round(v, 6)
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in v.items()}
    return v
