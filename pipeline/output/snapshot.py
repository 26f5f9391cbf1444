"""One version of the dataset's Delta table, summarized: what `metavoice summary --version N` and
`--as-of TIME` show.

summary.json follows the latest version only. To know what an older version held - before a
reprocessing run, before a delete, before yesterday's backfill - the rows of that snapshot are
read back and summed with pipeline/summary.py's own `Aggregates.add_columns`, batch by batch, so
the figures mean exactly what summary.json's mean. Counts that have no row (dead letters, skips,
duplicates, superseded events) are in no file: they are summed from the metadata of the log's
commits up to the version (those the log still holds: delta-rs cleans up entries older than the
table's log retention, 30 days by default, after a checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import MaintenanceRefused
from ..summary import ROW_COLUMNS, Aggregates
from . import open_output
from .maintenance import current_files
from .table import open_table, table_uri

if TYPE_CHECKING:
    from ..config import Settings

BATCH_ROWS = 4096  # rows read at a time: the tokens column is the bulk of a row


@dataclass
class Snapshot:
    version: int
    committed_at: datetime | None  # the version's commit time (None: not in the log's history any more)
    files: list[str]
    aggregates: Aggregates

    def report(self) -> dict[str, Any]:
        """summary.json's keys for this version, plus which version and when."""
        shown = self.aggregates.report(self.files, self.version)
        shown.pop("_state", None)
        shown["updated_at"] = self.committed_at.isoformat(timespec="seconds") if self.committed_at else None
        return shown


def read_snapshot(location: str | Path, settings: "Settings | None" = None, *, version: int | None = None,
                  as_of: datetime | None = None) -> Snapshot:
    """The aggregates of the rows of table `version`, or of the version current at `as_of`, or of
    the latest. `MaintenanceRefused` when there is no table, no such version, or its files were
    vacuumed (older than the retention)."""
    from deltalake.exceptions import DeltaError

    try:
        table = open_table(location, settings, version=version, as_of=as_of)
    except DeltaError as exc:
        raise MaintenanceRefused(f"{table_uri(location)} has no version {_asked(version, as_of)}: {exc}") from exc
    if table is None:
        raise MaintenanceRefused(f"{table_uri(location)} holds no Delta table yet")
    committed_at = _committed_at(location, settings, table.version())
    if as_of is not None and committed_at is not None and committed_at > as_of:  # delta-rs falls back to version 0
        raise MaintenanceRefused(f"{table_uri(location)} did not exist yet at {as_of.isoformat()} "
                                 f"(its first version was committed at {committed_at.isoformat()})")
    aggregates = Aggregates()
    dataset = table.to_pyarrow_dataset()
    columns = [c for c in ROW_COLUMNS if c in dataset.schema.names]
    try:
        for batch in dataset.to_batches(columns=columns, batch_size=BATCH_ROWS):
            aggregates.add_columns(batch)
    except (OSError, DeltaError) as exc:  # pyarrow's FileNotFoundError, delta-rs's object store errors
        raise MaintenanceRefused(
            f"version {table.version()} of {table_uri(location)} cannot be read any more ({exc}): its files were "
            "vacuumed (`metavoice compact` keeps removed files for METAVOICE_VACUUM_RETENTION_HOURS)") from exc
    log = open_output(location, settings).table
    if log.refresh() is not None:
        aggregates.merge_rowless(log.rowless(table.version()))
    return Snapshot(table.version(), committed_at, current_files(table), aggregates)


def _committed_at(location: str | Path, settings: "Settings | None", wanted: int) -> datetime | None:
    """The commit time of version `wanted`, from the latest snapshot's history (delta-rs numbers the
    history of a table loaded at an older version wrongly)."""
    latest = open_table(location, settings)
    for entry in latest.history(latest.version() - wanted + 1) if latest is not None else []:
        if entry.get("version") == wanted and entry.get("timestamp") is not None:
            return datetime.fromtimestamp(entry["timestamp"] / 1000, timezone.utc)
    return None


def _asked(version: int | None, as_of: datetime | None) -> str:
    return str(version) if version is not None else f"as of {as_of.isoformat() if as_of else '?'}"
