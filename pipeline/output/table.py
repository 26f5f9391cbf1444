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

import base64
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import orjson

from ..errors import FilesRemovedMeanwhile, OutputWriteFailed
from ..faults import crash_point, delay_point
from ..records import SCHEMA
from ..summary import Aggregates
from .footer import OffsetRange, PendingDeadLetter
from .layout import DATA_DIR

if TYPE_CHECKING:
    from deltalake import DeltaTable

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
# the object versions its file holds (base64 of little-endian uint64 hashes, records.version_hashes):
# a consumer that reads the commit indexes them without reading the file (a restart after a crash)
META_VERSIONS = "metavoice.versions"
# a commit that carries deletes: the aggregates of the rows it removed (summary.json subtracts them)
# and the object versions [(bucket, key, etag)] they were (the dedupe index forgets them)
META_REMOVED = "metavoice.removed"
META_REMOVED_VERSIONS = "metavoice.removed_versions"
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
    txns: dict[str, int | None] = field(default_factory=dict)  # the app transactions it carries
    removed: Aggregates | None = None  # the rows a delete took out (META_REMOVED)
    removed_versions: list[tuple[str, str, str]] = field(default_factory=list)
    removed_paths: list[str] = field(default_factory=list)  # its Remove actions (ours or a compaction's)
    versions: "np.ndarray | None" = None  # the object versions of its file (META_VERSIONS); None: not recorded

    @classmethod
    def from_history(cls, info: dict) -> "TableCommit":
        def load(key: str, default):
            raw = info.get(key)
            return orjson.loads(raw) if isinstance(raw, (str, bytes)) else default

        aggregates = load(META_AGGREGATES, None)
        removed = load(META_REMOVED, None)
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
            removed=Aggregates.from_state(removed) if removed is not None else None,
            removed_versions=[tuple(v) for v in load(META_REMOVED_VERSIONS, [])],
            versions=decode_versions(info.get(META_VERSIONS)),
        )


def encode_versions(versions: "np.ndarray") -> str:
    return base64.b64encode(np.asarray(versions, dtype="<u8").tobytes()).decode()


def decode_versions(raw: object) -> "np.ndarray | None":
    if not isinstance(raw, str):
        return None
    return np.frombuffer(base64.b64decode(raw), dtype="<u8").astype(np.uint64)


def commit_metadata(commit_id: str, files: list[tuple[str, int]], offsets: list[OffsetRange],
                    aggregates: Aggregates, dead_letters: list[PendingDeadLetter] = (),
                    dlq_marks: dict[int, int] | None = None, versions: "np.ndarray | None" = None) -> dict[str, str]:
    md = {
        META_COMMIT: commit_id,
        META_FILES: orjson.dumps([{"name": n, "rows": r} for n, r in files]).decode(),
        META_OFFSETS: orjson.dumps([r.to_dict() for r in offsets]).decode(),
        META_AGGREGATES: orjson.dumps(aggregates.to_state()).decode(),
    }
    if versions is not None:
        md[META_VERSIONS] = encode_versions(versions)
    if dead_letters:
        md[META_DEAD_LETTERS] = orjson.dumps([d.to_dict() for d in dead_letters]).decode()
        md[META_DLQ_MARKS] = orjson.dumps({str(p): o for p, o in (dlq_marks or {}).items()}).decode()
    return md


class DatasetTable:
    """The output's Delta table as one consumer holds it, at a cost that does not grow with the files.

    A snapshot of delta-rs is loaded once (the app transactions as of then); after that the log is
    followed entry by entry (`refresh` reads the entries after the last known version, one small
    read each, and a miss), and the app transactions they carry are applied on top. A commit is
    the Delta protocol's own step, written here: create `_delta_log/<next version>.json` only if
    absent (a hard link locally, a PUT with If-None-Match: * in an object store); losing that race
    means another writer committed that version: read it, check again, try the next. delta-rs's
    commit keeps the whole file list in memory and its cost grew with every file (twice as slow at
    800 files); this one reads and writes one entry. Every `CHECKPOINT_INTERVAL` versions the writer
    of that version has delta-rs write a checkpoint, so readers (and a restart) load a checkpoint
    plus a few entries. Other writers (compaction) commit through delta-rs beside us: same protocol.
    Thread-safe: an assignment and a finalize may use it at once."""

    CHECKPOINT_INTERVAL = 100  # delta-rs's own default (delta.checkpointInterval)

    def __init__(self, uri: str, options: dict[str, str] | None = None) -> None:
        self.uri = uri
        self.options = options or {}
        self._base: "DeltaTable | None" = None  # the snapshot loaded once
        self._version: int | None = None  # the latest version known (base + entries read)
        self._txns: dict[str, int | None] = {}  # app id -> version, as of `_version`
        self._entries: dict[int, TableCommit] = {}  # recent entries read, by version
        self._fs = None  # for reading log entries by name
        self._client = None  # s3: botocore, for the conditional PUT of an entry
        self._lock = threading.RLock()

    def forget(self) -> None:
        """Drop what is known: the next `refresh` loads a snapshot again."""
        with self._lock:
            self._base, self._version, self._txns, self._entries = None, None, {}, {}

    def refresh(self) -> "DatasetTable | None":
        """Bring the known state to the log's latest entry (None: no table yet): the entries since
        the last known version only, never the file list."""
        from deltalake import DeltaTable
        from deltalake.exceptions import DeltaError, TableNotFoundError

        with self._lock:
            if self._base is None:
                try:
                    self._base = DeltaTable(self.uri, storage_options=self.options or None)
                except TableNotFoundError:
                    return None
                except (OSError, DeltaError) as exc:
                    if not self._is_dir():  # no table root (missing, or a file in its place): no table
                        return None
                    raise OutputWriteFailed(f"reading the table log {self.uri} failed: {exc}") from exc
                self._version, self._txns = self._base.version(), {}
            while (entry := self._entry(self._version + 1)) is not None:
                self._apply(entry)
            return self

    def _is_dir(self) -> bool:
        """Whether the table root is a directory (an object-store prefix always is)."""
        return self.uri.startswith("s3://") or Path(self.uri).is_dir()

    def _apply(self, entry: TableCommit) -> None:
        self._txns.update(entry.txns)
        self._version = entry.version
        self._entries[entry.version] = entry
        if len(self._entries) > 4096:
            for v in sorted(self._entries)[:1024]:
                del self._entries[v]

    def ensure(self) -> "DatasetTable":
        """The table, created with the dataset's schema when missing (two creators race safely:
        the log's first entry is a put-if-absent; the loser opens the winner's table)."""
        from deltalake import DeltaTable

        with self._lock:
            if self.refresh() is not None:
                self._evolve()
                return self
            try:
                DeltaTable.create(self.uri, SCHEMA, mode="ignore", storage_options=self.options or None)
            except Exception as exc:  # noqa: BLE001 - a racing creator: its table is as good as ours
                log.info("creating the table %s: %s (opening the one there)", self.uri, exc)
            if self.refresh() is None:
                raise OutputWriteFailed(f"could not create the table {self.uri}")
            return self

    def _evolve(self) -> None:
        """Add SCHEMA's columns a table made before them lacks (appended, nullable: the old
        files read them as nulls), so every reader sees the new columns of the rows written now."""
        from deltalake import DeltaTable
        from deltalake.schema import Field, Schema

        dt = self._base or DeltaTable(self.uri, storage_options=self.options or None)  # refresh loaded it
        have = {f.name for f in dt.schema().fields}
        wanted = Schema.from_arrow(SCHEMA).fields
        missing = [Field(f.name, f.type, nullable=True) for f in wanted if f.name not in have]
        if missing:
            log.info("adding column(s) %s to the table %s", [f.name for f in missing], self.uri)
            dt.alter.add_columns(missing)
            self.refresh()

    @property
    def version(self) -> int | None:
        """The latest version known (None: no table); `refresh` first for the log's latest."""
        with self._lock:
            return self._version

    def stored(self, app: str) -> int | None:
        """The version of app transaction `app` (the last offset committed) as of `version`, or None."""
        with self._lock:
            if self._base is None:
                return None
            if app not in self._txns:
                self._txns[app] = self._base.transaction_version(app)
            return self._txns[app]

    def snapshot(self) -> "DeltaTable | None":
        """A delta-rs snapshot of the latest version, for reading rows (readers, tests, tools)."""
        from deltalake import DeltaTable
        from deltalake.exceptions import TableNotFoundError

        try:
            return DeltaTable(self.uri, storage_options=self.options or None)
        except TableNotFoundError:
            return None

    def commits(self, after: int | None) -> list[TableCommit]:
        """The commits after version `after` (None: all) up to the known version, oldest first:
        one small read of each log entry not read yet, never a data file."""
        with self._lock:
            latest = self._version
        if latest is None:
            return []
        start = 0 if after is None else after + 1
        found = []
        for v in range(start, latest + 1):
            c = self._entries.get(v) or self._entry(v)
            if c is not None:
                found.append(c)
        return found

    def rowless(self, upto: int | None = None) -> Aggregates:
        """What made no row (dead letters, skips, duplicates, deletes) in the commits up to version
        `upto` (None: the known version): only our commits' metadata records them."""
        found = Aggregates()
        for c in self.commits(None):
            if upto is not None and c.version > upto:
                continue
            if c.aggregates is not None:
                found.merge_rowless(c.aggregates)
            if c.removed is not None:  # a delete: its rows left the files, the count stays here
                found.deleted += c.removed.utterances
        return found

    def _entry(self, version: int) -> TableCommit | None:
        fs, root = self._log_fs()
        try:
            with fs.open_input_stream(f"{root}/_delta_log/{version:020d}.json") as f:
                raw = f.read()
        except FileNotFoundError:
            return None  # not written yet, or cleaned up after a checkpoint (past the log retention)
        except OSError as exc:
            raise OutputWriteFailed(f"reading the table log {self.uri} failed: {exc}") from exc
        info: dict = {}
        adds = removes = 0
        txns: dict[str, int | None] = {}
        removed_paths: list[str] = []
        for line in raw.splitlines():
            if not line.strip():
                continue
            action = orjson.loads(line)
            if "commitInfo" in action:
                info = action["commitInfo"]
            elif "txn" in action:
                txns[action["txn"]["appId"]] = int(action["txn"]["version"])
            elif "remove" in action:
                removed_paths.append(action["remove"]["path"])
            adds += "add" in action
            removes += "remove" in action
        commit = TableCommit.from_history({**info, "version": version})
        commit.metrics = {**commit.metrics, "num_added_files": adds, "num_removed_files": removes}
        commit.txns = txns
        commit.removed_paths = removed_paths
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
        """The data files of the latest version, relative to the table root, sorted (loads a
        snapshot's file list: for readers and tests, not the consumer's hot path)."""
        dt = self.snapshot()
        return sorted(dt.get_add_actions(flatten=True).column("path").to_pylist()) if dt is not None else []

    def commit(self, adds: list[dict], offsets: list[OffsetRange], apps: dict[tuple[str, int], str],
               metadata: dict[str, str], check: Callable[[dict[tuple[str, int], int | None]], None],
               removes: list[str] = (), based_on: int | None = None) -> int:
        """Commit `adds` (Add actions of files already in the table directory, `add_action`) with one
        app transaction per range of `offsets` (version = its last offset). Before each attempt the
        log is read up to its latest entry and the stored versions handed to `check` (it raises to
        refuse: another writer got there first, a gap).

        Losing the race for the next version (another writer committed it) reads that entry and
        checks again; an outcome we cannot know (a timeout, a dropped connection) is resolved by
        reading the log: our commit id there means it landed. Returns the version committed.

        `removes`: data files this commit takes out of the table (a delete's rewrite), planned on
        version `based_on`: a commit since then that removed any of them (a compaction) raises
        `FilesRemovedMeanwhile` (their rows moved: the caller plans again)."""
        now = int(time.time() * 1000)
        lines = [orjson.dumps({"commitInfo": {"timestamp": now, "operation": "WRITE",
                                              "operationParameters": {"mode": "Append"},
                                              "clientVersion": "metavoice-stream", **metadata}})]
        lines += [orjson.dumps({"txn": {"appId": apps[(r.topic, r.partition)], "version": r.last, "lastUpdated": now}})
                  for r in offsets]
        lines += [orjson.dumps({"add": a}) for a in adds]
        lines += [orjson.dumps({"remove": {"path": p, "deletionTimestamp": now, "dataChange": True}}) for p in removes]
        body = b"\n".join(lines) + b"\n"
        last_error: Exception | None = None
        read_at: int | None = None
        errors = 0
        for _ in range(COMMIT_ATTEMPTS * 100):  # a lost race means another writer made progress
            if errors >= COMMIT_ATTEMPTS:
                break
            with self._lock:
                self.ensure()
                if read_at is not None and (mine := self._landed(metadata[META_COMMIT], read_at)) is not None:
                    return mine  # an attempt whose answer was lost did land
                read_at = self._version
                if removes and based_on is not None:
                    gone = {p for c in self.commits(based_on) for p in c.removed_paths} & set(removes)
                    if gone:
                        raise FilesRemovedMeanwhile(f"{len(gone)} file(s) this delete rewrites were removed "
                                                    f"since version {based_on} (e.g. {sorted(gone)[0]})")
                check({(r.topic, r.partition): self.stored(apps[(r.topic, r.partition)]) for r in offsets})
                version = read_at + 1
                try:
                    delay_point("table_commit")
                    created = self._create_entry(version, body)
                except OSError as exc:  # the outcome is unknown: the log decides, at the next attempt
                    last_error, errors = exc, errors + 1
                    log.warning("committing version %d to %s: %s; reading the log to learn whether it landed",
                                version, self.uri, exc)
                    time.sleep(min(2.0, 0.1 * 2 ** errors))
                    continue
                if not created:
                    log.info("version %d of %s was committed by another writer: reading it, checking again",
                             version, self.uri)
                    continue
                crash_point("after_table_commit")
                entry = self._entry(version)
                if entry is None or entry.commit_id != metadata[META_COMMIT]:
                    raise OutputWriteFailed(f"version {version} of {self.uri} was written but does not read back as ours")
                self._apply(entry)
            if version % self.CHECKPOINT_INTERVAL == 0:
                self._checkpoint(version)
            return version
        raise OutputWriteFailed(f"committing to {self.uri} failed ({errors} unknown outcomes): {last_error}")

    def _landed(self, commit_id: str, after: int) -> int | None:
        """The version of our commit `commit_id` if it is in the log after `after`, else None."""
        for c in self.commits(after):
            if c.commit_id == commit_id:
                return c.version
        return None

    def _create_entry(self, version: int, body: bytes) -> bool:
        """Write `_delta_log/<version>.json` only if it does not exist: False when it does."""
        name = f"{version:020d}.json"
        if self.uri.startswith("s3://"):
            from botocore.exceptions import BotoCoreError, ClientError

            bucket, _, prefix = self.uri.removeprefix("s3://").partition("/")
            key = f"{prefix.rstrip('/')}/_delta_log/{name}".lstrip("/")
            try:
                self._s3().put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")
                return True
            except ClientError as exc:
                err = exc.response.get("Error", {})
                code = str(err.get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
                if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                    return False
                raise OSError(f"PUT {key}: {exc}") from exc
            except BotoCoreError as exc:
                raise OSError(f"PUT {key}: {exc}") from exc
        log_dir = Path(self.uri) / "_delta_log"
        tmp = log_dir / f".{name}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, log_dir / name)  # atomic, and fails if the name exists (no overwrite)
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        fd = os.open(log_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def _s3(self):
        if self._client is None:
            from botocore.config import Config
            from botocore.session import get_session

            o = self.options
            kwargs: dict = {"region_name": o.get("AWS_REGION", "us-east-1")}
            if o.get("AWS_ENDPOINT_URL"):
                kwargs["endpoint_url"] = o["AWS_ENDPOINT_URL"]
            if o.get("AWS_ACCESS_KEY_ID"):
                kwargs["aws_access_key_id"], kwargs["aws_secret_access_key"] = o["AWS_ACCESS_KEY_ID"], o["AWS_SECRET_ACCESS_KEY"]
            config = Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=10, read_timeout=60,
                            s3={"addressing_style": "path"} if o.get("AWS_ENDPOINT_URL") else None)
            self._client = get_session().create_client("s3", config=config, **kwargs)
        return self._client

    def _checkpoint(self, version: int) -> None:
        """A Delta checkpoint at `version` (delta-rs writes it: the file list as of then), so a reader
        loads it plus a few entries. Best effort: readers replay the entries without it."""
        from deltalake import DeltaTable

        try:
            DeltaTable(self.uri, version=version, storage_options=self.options or None).create_checkpoint()
        except Exception as exc:  # noqa: BLE001
            log.warning("could not write a checkpoint of %s at version %d: %s", self.uri, version, exc)


def add_action(name: str, size: int, rows: int) -> dict:
    """The Add action of a file we uploaded into the table directory ourselves."""
    return {"path": name, "partitionValues": {}, "size": size, "modificationTime": int(time.time() * 1000),
            "dataChange": True, "stats": orjson.dumps({"numRecords": rows}).decode()}
