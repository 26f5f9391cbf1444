"""Maintenance of the dataset's Delta table: compaction, vacuum, and a card that names its files.

A quiet stream rolls small files (one per `roll_max_seconds` per consumer, a few rows each);
`compact` rewrites them into files of about `compact_target_bytes` (delta-rs `optimize.compact`)
and then deletes what earlier commits removed (`vacuum`). The order, and why each step is safe
while consumers append:

1. compact: one OPTIMIZE commit that removes the small files and adds the rewritten ones
   (`dataChange: false`: no row changed). delta-rs checks it against every commit since it read
   the table; appends never conflict with it (they only add new files), a delete that rewrote
   one of the same files does, and then the compaction is retried on a fresh snapshot
   (`COMPACT_ATTEMPTS`). The app transactions, and so every consumer's positions, are carried
   over untouched: an OPTIMIZE commit names none.
2. card and dedupe checkpoint: README.md's `configs:` name the files of the version step 1 left, so `datasets`
   (which has no Delta loader) reads one snapshot, never a replaced file next to its replacement.
   Written before step 3, so the card never names a file step 3 deletes. `_state/dedupe.bin` is
   brought to this version too: a consumer starting from an older one would read files added
   since it, and step 3 may delete those (it then falls back to reading every live file).
3. vacuum: deletes the files a commit removed more than `retention_hours` ago, and the files no
   commit names that are older than that (a killed consumer's upload that never got its commit:
   delta-rs's full mode goes by the file's modification time). A consumer's file between its
   upload and its commit is seconds old, never that old. Below `MIN_RETENTION_HOURS` it runs only
   when forced, and then in lite mode: removed files only, never a file no commit names (with a
   retention of minutes, that could be an upload about to be committed).
4. summary.json merges the commits since its version (pipeline/ledger.py `publish_summary`): the
   file count follows the compaction even when no consumer commits after it.

`dry_run` changes nothing: it reports the small files step 1 would consider and the files step 3
would delete now.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import MaintenanceRefused, OutputWriteFailed
from .layout import CARD_NAME
from .table import open_table, table_uri

if TYPE_CHECKING:
    from deltalake import DeltaTable

    from ..config import Settings

log = logging.getLogger(__name__)

# Delta's own default for delta.deletedFileRetentionDuration (7 days). A removed file must outlive
# every reader of a version that still names it: a query that opened the snapshot before a
# compaction, `metavoice summary --version N` and the other time-travel readers (README "Time
# travel"), and a consumer whose restart catches up on the files added since its last checkpoint.
MIN_RETENTION_HOURS = 168
# A compaction loses its commit only to a delete of one of the files it rewrote; each loss means
# another writer made progress, so a few fresh attempts are enough.
COMPACT_ATTEMPTS = 5


@dataclass
class CompactReport:
    """What one `compact` run did (or, with `dry_run`, would do) to the table at `table`."""

    table: str
    dry_run: bool
    retention_hours: int
    version_before: int
    version_after: int
    files_before: int  # data files of the snapshot compaction read
    files_after: int  # data files of the snapshot after compaction (new appends included)
    rows_before: int
    rows_after: int
    small_files: int  # files under the target size: what compaction considers
    compacted: dict[str, Any] = field(default_factory=dict)  # delta-rs optimize metrics
    vacuumed: list[str] = field(default_factory=list)  # deleted (or, dry run, to be deleted) files
    card_files: int = 0  # files README.md's configs name (0: card left alone)

    def lines(self) -> list[str]:
        """The report as a few lines for a terminal or a job log."""
        verb = "would delete" if self.dry_run else "deleted"
        out = [f"{self.table}: version {self.version_before} -> {self.version_after}",
               f"files {self.files_before} -> {self.files_after} (rows {self.rows_before} -> {self.rows_after}), "
               f"{self.small_files} under the target size"]
        if self.compacted:
            out.append(f"compaction: {self.compacted.get('numFilesRemoved', 0)} files rewritten into "
                       f"{self.compacted.get('numFilesAdded', 0)}")
        out.append(f"vacuum (files removed over {self.retention_hours} h ago): {verb} {len(self.vacuumed)} files")
        out += [f"  {name}" for name in self.vacuumed]
        if self.card_files:
            out.append(f"{CARD_NAME}: configs name the {self.card_files} files of version {self.version_after}")
        return out


def compact(location: str | Path, settings: "Settings | None" = None, *, target_size: int | None = None,
            retention_hours: int | None = None, force: bool = False, dry_run: bool = False) -> CompactReport:
    """Compact the output's table, refresh its card, vacuum it (module docstring: order and safety).

    Raises `MaintenanceRefused` before changing anything when the output has no table, or when
    `retention_hours` is under `MIN_RETENTION_HOURS` and not `force`d."""
    from ..config import Settings

    st = settings or Settings()
    target = target_size if target_size is not None else st.compact_target_bytes
    retention = retention_hours if retention_hours is not None else st.vacuum_retention_hours
    if retention < MIN_RETENTION_HOURS and not force:
        raise MaintenanceRefused(
            f"a vacuum retention of {retention} h is under the safe minimum of {MIN_RETENTION_HOURS} h: readers of "
            "older versions and queries still reading a replaced file would fail; pass --force to accept that")
    if target < 1:
        raise MaintenanceRefused(f"a target size of {target} bytes: give a positive size")
    table = open_table(location, st)
    if table is None:
        raise MaintenanceRefused(f"{table_uri(location)} holds no Delta table yet: nothing to compact")
    before = _snapshot(table, target)
    report = CompactReport(table=table_uri(location), dry_run=dry_run, retention_hours=retention,
                           version_before=table.version(), version_after=table.version(),
                           files_before=before["files"], files_after=before["files"],
                           rows_before=before["rows"], rows_after=before["rows"], small_files=before["small"])
    if dry_run:
        report.vacuumed = _vacuum(table, retention, force, dry_run=True)
        return report
    report.compacted = _compact(table, target)
    after = _snapshot(table, target)
    report.version_after = table.version()
    report.files_after, report.rows_after = after["files"], after["rows"]
    report.card_files = write_card(location, table, st)
    from . import open_output
    from ..ledger import OutputLedger, publish_summary

    output = open_output(location, st)
    # The dedupe checkpoint brought past the compaction before the vacuum: a consumer starting
    # from it reads only files added since, and the vacuum can delete none of those (step 2).
    ledger = OutputLedger(output)
    ledger.load_checkpoint()
    ledger.checkpoint()
    report.vacuumed = _vacuum(table, retention, force, dry_run=False)
    publish_summary(output)  # step 4: the file count follows the compaction
    log.info("compacted %s: %s", report.table, "; ".join(report.lines()[1:3]))
    return report


def current_files(table: "DeltaTable") -> list[str]:
    """The data files (names relative to the table root) of the loaded version, sorted."""
    import pyarrow as pa

    return sorted(pa.table(table.get_add_actions(flatten=False)).column("path").to_pylist())


def write_card(location: str | Path, table: "DeltaTable", settings: "Settings | None" = None) -> int:
    """README.md at the output root, its `configs:` naming the files of `table`'s loaded version
    (layout.dataset_card); returns how many. Glob readers are documented in README "Reading the dataset"."""
    from . import open_output
    from ..records import SCHEMA
    from .layout import dataset_card

    files = current_files(table)
    if not files:
        return 0
    output = open_output(location, settings)
    card = dataset_card(SCHEMA, output.location, data_files=files, version=table.version()).encode()
    output.update_doc(CARD_NAME, lambda current: card)
    return len(files)


def _snapshot(table: "DeltaTable", target: int) -> dict[str, int]:
    """Files, rows and files under `target` bytes of the loaded version, from the log's Add actions."""
    import pyarrow as pa

    adds = pa.table(table.get_add_actions(flatten=True)).select(["size_bytes", "num_records"]).to_pydict()
    sizes = adds.get("size_bytes", [])
    rows = sum(n or 0 for n in adds.get("num_records", []))
    return {"files": len(sizes), "rows": rows, "small": sum(1 for s in sizes if s < target)}


def _compact(table: "DeltaTable", target: int) -> dict[str, Any]:
    """optimize.compact with zstd files like the consumer's, retried on a fresh snapshot when a
    concurrent delete rewrote a file it was rewriting."""
    from deltalake import WriterProperties
    from deltalake.exceptions import CommitFailedError, DeltaError

    for attempt in range(1, COMPACT_ATTEMPTS + 1):
        try:
            return table.optimize.compact(target_size=target, writer_properties=WriterProperties(compression="ZSTD"))
        except CommitFailedError as exc:
            if attempt == COMPACT_ATTEMPTS:
                raise OutputWriteFailed(f"compacting {table.table_uri} lost its commit {attempt} times in a row: {exc}") from exc
            log.info("compaction conflicted with a concurrent commit (%s); reading the table again", exc)
            time.sleep(0.2 * attempt)
            table.update_incremental()
        except (DeltaError, OSError) as exc:
            raise OutputWriteFailed(f"compacting {table.table_uri} failed: {exc}") from exc
    raise AssertionError("unreachable")


def _vacuum(table: "DeltaTable", retention: int, force: bool, *, dry_run: bool) -> list[str]:
    """Full vacuum at a safe retention, lite under it (module docstring, step 3); the table's own
    minimum retention is enforced unless forced, like ours."""
    from deltalake.exceptions import DeltaError

    try:
        return sorted(table.vacuum(retention_hours=retention, dry_run=dry_run, enforce_retention_duration=not force,
                                   full=retention >= MIN_RETENTION_HOURS))
    except DeltaError as exc:
        if "retention" in str(exc).lower():  # the table asks for a longer one (delta.deletedFileRetentionDuration)
            raise MaintenanceRefused(f"{table.table_uri}: {exc}; pass --force to accept a shorter one") from exc
        raise OutputWriteFailed(f"vacuuming {table.table_uri} failed: {exc}") from exc
    except OSError as exc:
        raise OutputWriteFailed(f"vacuuming {table.table_uri} failed: {exc}") from exc
