"""The dataset as a Delta Lake table (delta-rs, PyPI `deltalake`): where it lives and how to open it.

The table root is `<output>/data/` (a local directory or `s3://bucket/prefix/data`): data files
`data/part-….parquet`, the log `data/_delta_log/`. summary.json, README.md, _manifest.json and
`_state/` stay beside it at `<output>/`, where VACUUM cannot touch them.

Exactly once rides on Delta *app transactions* (the kafka-delta-ingest design): every commit
carries one `Transaction(app_id, version)` per source partition it covers, `app_id` naming the
consumer group, topic and partition (`app_id`) and `version` the last offset committed. A start,
an assignment and a fencing check read the versions from the latest snapshot; nothing lists data/.

This module is the stable entry point for every reader and writer of the table (the consumer,
`metavoice compact`, time travel, tests): `table_uri`, `storage_options`, `open_table`.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import orjson

from ..errors import OutputWriteFailed
from ..faults import crash_point, delay_point
from ..records import SCHEMA
from ..summary import Aggregates
from .footer import OffsetRange, PendingDeadLetter
from .layout import DATA_DIR

if TYPE_CHECKING:
    from deltalake import DeltaTable
    from deltalake.transaction import AddAction

    from ..config import Settings


log = logging.getLogger(__name__)


def is_object_store(location: str | Path) -> bool:
    return str(location).startswith("s3://")


def table_uri(location: str | Path) -> str:
    """The table root of the output at `location`: `<dir>/data` (absolute) or `s3://bucket/prefix/data`."""
    if is_object_store(location):
        return f"{str(location).rstrip('/')}/{DATA_DIR}"
    return str((Path(location) / DATA_DIR).absolute())


def storage_options(location: str | Path, settings: "Settings | None" = None) -> dict[str, str]:
    """delta-rs storage options for the output at `location` ({} for a local directory).

    An s3:// output takes the output store's endpoint, region and keys from `settings` (its own,
    else the audio store's; without explicit keys delta-rs follows the standard AWS chain), allows
    plain http for an http:// endpoint (moto, MinIO in a lab), and asks for conditional puts by
    ETag where the store is not AWS S3 (`output_conditional_put`): R2 and MinIO need it for two
    writers never to overwrite one log entry."""
    if not is_object_store(location):
        return {}
    from ..config import Settings

    st = settings or Settings()
    return options_from_client_kwargs(st.output_s3_client_kwargs(), conditional_put(st))


def options_from_client_kwargs(kwargs: dict, conditional: str) -> dict[str, str]:
    """The same options from botocore client arguments (pipeline/config.py `output_s3_client_kwargs`)."""
    opts: dict[str, str] = {"AWS_REGION": kwargs.get("region_name") or "us-east-1"}
    endpoint = kwargs.get("endpoint_url")
    if endpoint:
        opts["AWS_ENDPOINT_URL"] = endpoint
        if endpoint.startswith("http://"):
            opts["AWS_ALLOW_HTTP"] = "true"
    if kwargs.get("aws_access_key_id"):
        opts["AWS_ACCESS_KEY_ID"] = kwargs["aws_access_key_id"]
        opts["AWS_SECRET_ACCESS_KEY"] = kwargs["aws_secret_access_key"]
    if conditional == "etag":
        opts["aws_conditional_put"] = "etag"
    return opts


def conditional_put(settings: "Settings") -> str:
    """"etag" or "none": `auto` is etag for any endpoint that is not AWS S3's own (R2, MinIO,
    moto), none for AWS (put-if-absent is delta-rs's default there)."""
    mode = settings.output_conditional_put
    if mode != "auto":
        return mode
    endpoint = settings.output_s3_endpoint_url or settings.s3_endpoint_url
    return "etag" if endpoint and "amazonaws.com" not in endpoint else "none"


def app_id(group: str, topic: str, partition: int) -> str:
    """The app transaction id of one source partition as written by one consumer group."""
    return f"{group}:{topic}:{partition}"


def open_table(location: str | Path, settings: "Settings | None" = None, *, version: int | None = None,
               as_of: datetime | str | None = None) -> "DeltaTable | None":
    """The output's table (its latest version, or `version`, or the version current at `as_of`);
    None when the output has no table yet."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    uri, opts = table_uri(location), storage_options(location, settings)
    try:
        table = DeltaTable(uri, version=version, storage_options=opts or None)
    except TableNotFoundError:
        return None
    except OSError as exc:
        raise OutputWriteFailed(f"opening the table {uri} failed: {exc}") from exc
    if as_of is not None:
        table.load_as_version(as_of)
    return table


# --- the consumer's side: commits with app transactions -------------------------------------------
# What a commit of ours says about itself, in its commitInfo (read back with `DeltaTable.history`):
# the files it added, the source offsets it handled, the aggregates of what it handled (summary.json
# merges these), and the dead letters of its records with where the DLQ ended before they were sent.
META_COMMIT = "metavoice.commit"  # a unique id: tells our own commit from another after an unknown outcome
META_FILES = "metavoice.files"  # [{"name", "rows"}]
META_OFFSETS = "metavoice.offsets"
META_AGGREGATES = "metavoice.aggregates"
META_DEAD_LETTERS = "metavoice.dead_letters"
META_DLQ_MARKS = "metavoice.dlq_marks"
COMMIT_ATTEMPTS = 8  # unknown outcomes (timeouts) retried after re-reading; a conflict is checked again first


@dataclass
class TableCommit:
    """One commit of the log as our commitInfo describes it (other writers' commits, such as a
    compaction, have no offsets and no files of ours)."""

    version: int
    commit_id: str = ""
    files: list[tuple[str, int]] = field(default_factory=list)  # (name, rows)
    offsets: list[OffsetRange] = field(default_factory=list)
    aggregates: Aggregates | None = None
    dead_letters: list[PendingDeadLetter] = field(default_factory=list)
    dlq_marks: dict[int, int] = field(default_factory=dict)
    operation: str = ""
    metrics: dict = field(default_factory=dict)

    @classmethod
    def from_history(cls, info: dict) -> "TableCommit":
        def load(key: str, default):
            raw = info.get(key)
            return orjson.loads(raw) if isinstance(raw, (str, bytes)) else default

        aggregates = load(META_AGGREGATES, None)
        return cls(
            version=int(info["version"]),
            commit_id=str(info.get(META_COMMIT, "")),
            files=[(d["name"], int(d["rows"])) for d in load(META_FILES, [])],
            offsets=[OffsetRange(**d) for d in load(META_OFFSETS, [])],
            aggregates=Aggregates.from_state(aggregates) if aggregates is not None else None,
            dead_letters=[PendingDeadLetter.from_dict(d) for d in load(META_DEAD_LETTERS, [])],
            dlq_marks={int(p): o for p, o in load(META_DLQ_MARKS, {}).items()},
            operation=str(info.get("operation", "")),
            metrics=info.get("operationMetrics") or {},
        )


def commit_metadata(commit_id: str, files: list[tuple[str, int]], offsets: list[OffsetRange],
                    aggregates: Aggregates, dead_letters: list[PendingDeadLetter] = (),
                    dlq_marks: dict[int, int] | None = None) -> dict[str, str]:
    md = {
        META_COMMIT: commit_id,
        META_FILES: orjson.dumps([{"name": n, "rows": r} for n, r in files]).decode(),
        META_OFFSETS: orjson.dumps([r.to_dict() for r in offsets]).decode(),
        META_AGGREGATES: orjson.dumps(aggregates.to_state()).decode(),
    }
    if dead_letters:
        md[META_DEAD_LETTERS] = orjson.dumps([d.to_dict() for d in dead_letters]).decode()
        md[META_DLQ_MARKS] = orjson.dumps({str(p): o for p, o in (dlq_marks or {}).items()}).decode()
    return md


class DatasetTable:
    """The output's Delta table as one consumer holds it: one snapshot, brought forward with
    `refresh` (only the log entries since, never the data files), and commits that carry one app
    transaction per source partition. Thread-safe: an assignment and a finalize may use it at once."""

    def __init__(self, uri: str, options: dict[str, str] | None = None) -> None:
        self.uri = uri
        self.options = options or {}
        self._dt: "DeltaTable | None" = None
        self._fs = None  # for reading log entries by name (`commits`)
        self._lock = threading.RLock()

    def refresh(self) -> "DeltaTable | None":
        """The latest snapshot (None: no table yet): the log entries since the last one only."""
        from deltalake import DeltaTable
        from deltalake.exceptions import TableNotFoundError

        with self._lock:
            try:
                if self._dt is None:
                    self._dt = DeltaTable(self.uri, storage_options=self.options or None)
                else:
                    self._dt.update_incremental()
            except TableNotFoundError:
                return None
            except OSError as exc:
                raise OutputWriteFailed(f"reading the table log {self.uri} failed: {exc}") from exc
            return self._dt

    def ensure(self) -> "DeltaTable":
        """The table, created with the dataset's schema when missing (two creators race safely:
        the log's first entry is a put-if-absent; the loser opens the winner's table)."""
        from deltalake import DeltaTable

        with self._lock:
            dt = self.refresh()
            if dt is not None:
                return dt
            try:
                DeltaTable.create(self.uri, SCHEMA, mode="ignore", storage_options=self.options or None)
            except Exception as exc:  # noqa: BLE001 - a racing creator: its table is as good as ours
                log.info("creating the table %s: %s (opening the one there)", self.uri, exc)
            dt = self.refresh()
            if dt is None:
                raise OutputWriteFailed(f"could not create the table {self.uri}")
            return dt

    @property
    def version(self) -> int | None:
        """The snapshot's version (None: no table); `refresh` first for the latest."""
        with self._lock:
            return self._dt.version() if self._dt is not None else None

    def stored(self, app: str) -> int | None:
        """The snapshot's version of app transaction `app` (the last offset committed), or None."""
        with self._lock:
            return self._dt.transaction_version(app) if self._dt is not None else None

    def commits(self, after: int | None) -> list[TableCommit]:
        """The commits after version `after` (None: all) up to the current snapshot, oldest first:
        one small read of each log entry, never a data file. (`DeltaTable.history` numbers its
        entries from the snapshot's version while listing the log's newest: with another writer
        committing meanwhile its versions can be off, so the entries are read by name.)"""
        with self._lock:
            latest = self._dt.version() if self._dt is not None else None
        if latest is None:
            return []
        start = 0 if after is None else after + 1
        return [c for c in (self._entry(v) for v in range(start, latest + 1)) if c is not None]

    def _entry(self, version: int) -> TableCommit | None:
        fs, root = self._log_fs()
        try:
            with fs.open_input_stream(f"{root}/_delta_log/{version:020d}.json") as f:
                raw = f.read()
        except FileNotFoundError:
            return None  # cleaned up after a checkpoint (older than the log retention)
        except OSError as exc:
            raise OutputWriteFailed(f"reading the table log {self.uri} failed: {exc}") from exc
        info: dict = {}
        adds = removes = 0
        for line in raw.splitlines():
            if not line.strip():
                continue
            action = orjson.loads(line)
            if "commitInfo" in action:
                info = action["commitInfo"]
            adds += "add" in action
            removes += "remove" in action
        commit = TableCommit.from_history({**info, "version": version})
        commit.metrics = {**commit.metrics, "num_added_files": adds, "num_removed_files": removes}
        return commit

    def _log_fs(self):
        """A pyarrow filesystem and the table root's path on it (the same store delta-rs writes)."""
        if self._fs is None:
            import pyarrow.fs as pafs

            if self.uri.startswith("s3://"):
                o = self.options
                kwargs: dict = {"region": o.get("AWS_REGION", "us-east-1")}
                if o.get("AWS_ENDPOINT_URL"):
                    from urllib.parse import urlparse

                    u = urlparse(o["AWS_ENDPOINT_URL"])
                    kwargs["endpoint_override"], kwargs["scheme"] = u.netloc, u.scheme or "https"
                if o.get("AWS_ACCESS_KEY_ID"):
                    kwargs["access_key"], kwargs["secret_key"] = o["AWS_ACCESS_KEY_ID"], o["AWS_SECRET_ACCESS_KEY"]
                self._fs = (pafs.S3FileSystem(**kwargs), self.uri.removeprefix("s3://").rstrip("/"))
            else:
                self._fs = (pafs.LocalFileSystem(), self.uri.rstrip("/"))
        return self._fs

    def file_names(self) -> list[str]:
        """The data files of the latest snapshot, relative to the table root, sorted."""
        with self._lock:
            dt = self.refresh()
            if dt is None:
                return []
            paths = dt.get_add_actions(flatten=True).column("path").to_pylist()
        return sorted(paths)

    def commit(self, adds: "list[AddAction]", offsets: list[OffsetRange], apps: dict[tuple[str, int], str],
               metadata: dict[str, str], check: Callable[[dict[tuple[str, int], int | None]], None]) -> int:
        """Commit `adds` (files already in the table directory) with one app transaction per range
        of `offsets` (version = its last offset). Before each attempt the stored versions are read
        again and handed to `check` (it raises to refuse: another writer got there first, a gap).

        A conflict (another commit touched one of our app ids since our read) is checked again; an
        outcome we cannot know (a timeout, a dropped connection) is resolved by re-reading: our
        commit id in the log since means it landed. Returns the version committed."""
        from deltalake import CommitProperties, Transaction
        from deltalake.exceptions import CommitFailedError

        txns = [Transaction(apps[(r.topic, r.partition)], r.last) for r in offsets]
        props = CommitProperties(app_transactions=txns, custom_metadata=metadata)
        last_error: Exception | None = None
        for attempt in range(COMMIT_ATTEMPTS):
            with self._lock:
                dt = self.ensure()
                read_at = dt.version()
                check({(r.topic, r.partition): dt.transaction_version(apps[(r.topic, r.partition)]) for r in offsets})
                try:
                    delay_point("table_commit")
                    dt.create_write_transaction(adds, mode="append", schema=SCHEMA, commit_properties=props)
                    crash_point("after_table_commit")
                except CommitFailedError as exc:
                    log.info("the table moved under our commit (%s): reading it again", exc)
                    last_error = exc
                    continue
                except Exception as exc:  # noqa: BLE001 - the outcome is unknown: the log decides
                    last_error = exc
                    log.warning("committing to %s: %s; reading the log to learn whether it landed", self.uri, exc)
                    time.sleep(min(2.0, 0.1 * 2 ** attempt))
                    mine = self._landed(metadata[META_COMMIT], read_at)
                    if mine is not None:
                        return mine
                    continue
                mine = self._landed(metadata[META_COMMIT], read_at)
                if mine is None:
                    raise OutputWriteFailed(f"the commit to {self.uri} returned but its entry is not in the log")
                return mine
        raise OutputWriteFailed(f"committing to {self.uri} failed {COMMIT_ATTEMPTS} times: {last_error}")

    def _landed(self, commit_id: str, after: int) -> int | None:
        """The version of our commit `commit_id` if it is in the log after `after`, else None."""
        dt = self.refresh()
        if dt is None:
            return None
        for c in self.commits(after):
            if c.commit_id == commit_id:
                return c.version
        return None


def add_action(name: str, size: int, rows: int) -> "AddAction":
    """The Add action of a file we uploaded into the table directory ourselves."""
    from deltalake.transaction import AddAction

    return AddAction(name, size, {}, int(time.time() * 1000), True, orjson.dumps({"numRecords": rows}).decode())
