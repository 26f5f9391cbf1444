"""A local (or NFS) output directory: a rename puts a file into the table directory, the Delta
log's atomic create of each entry orders the commits, an flock serializes summary/manifest writes.

Several consumers may share the directory on one host, or across hosts where `flock` works
(NFSv4); elsewhere, use an object-store output (pipeline/output/s3.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import OutputWriteFailed
from ..durable import atomic_write_bytes, fsync_dir
from .footer import FileFooter, parse_footer
from .layout import ATTEMPTS_DIR, DATA_DIR, PARQUET_SUFFIX, SPOOL_DIR
from .store import Output, discard, flock
from .table import DatasetTable, table_uri

LOCK_NAME = ".summary.lock"  # the name older versions used: consumers of both versions still exclude each other


class LocalOutput(Output):
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.location = str(self.root)
        self.data_dir = self.root / DATA_DIR
        self.spool = self.root / SPOOL_DIR
        self.attempts_dir = self.root / ATTEMPTS_DIR
        self.table = DatasetTable(table_uri(self.root))

    def lock(self):
        """The directory's lock: summary/manifest updates (compare-and-swap on a filesystem)."""
        return flock(self.root / LOCK_NAME)

    _doc_lock = lock

    def listed(self) -> list[str]:
        """Parquet files lying under data/, in the table or not (a 0.1 output's, before migrating)."""
        if not self.data_dir.is_dir():
            return []
        return sorted(p.name for p in self.data_dir.glob(f"*{PARQUET_SUFFIX}") if p.is_file())

    def data_size(self, name: str) -> int:
        return (self.data_dir / name).stat().st_size

    def data_path(self, name: str) -> str:
        return str(self.data_dir / name)

    def read_footer(self, name: str) -> FileFooter:
        return parse_footer(name, pq.read_metadata(self.data_dir / name))

    def read_columns(self, name: str, columns: list[str]) -> pa.Table:
        return pq.read_table(self.data_dir / name, columns=columns)

    def publish(self, spooled: Path, name: str) -> None:
        final = self.data_dir / name
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            os.replace(spooled, final)
            fsync_dir(self.data_dir)
        except OSError as exc:
            discard(spooled)
            raise OutputWriteFailed(f"publishing {final} failed: {exc}") from exc

    def remove(self, name: str) -> None:
        discard(self.data_dir / name)

    def _read_doc(self, name: str) -> tuple[bytes | None, Any]:
        try:
            return (self.root / name).read_bytes(), None
        except FileNotFoundError:
            return None, None

    def _write_doc(self, name: str, data: bytes, version: Any) -> bool:
        try:
            atomic_write_bytes(self.root / name, data)
        except OSError as exc:
            raise OutputWriteFailed(f"writing {self.root / name} failed: {exc}") from exc
        return True  # under the directory lock: nobody wrote in between

