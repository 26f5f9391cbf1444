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

from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import OutputWriteFailed
from .layout import DATA_DIR

if TYPE_CHECKING:
    from deltalake import DeltaTable

    from ..config import Settings


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
    kwargs = st.output_s3_client_kwargs()
    opts: dict[str, str] = {"AWS_REGION": kwargs.get("region_name") or "us-east-1"}
    endpoint = kwargs.get("endpoint_url")
    if endpoint:
        opts["AWS_ENDPOINT_URL"] = endpoint
        if endpoint.startswith("http://"):
            opts["AWS_ALLOW_HTTP"] = "true"
    if kwargs.get("aws_access_key_id"):
        opts["AWS_ACCESS_KEY_ID"] = kwargs["aws_access_key_id"]
        opts["AWS_SECRET_ACCESS_KEY"] = kwargs["aws_secret_access_key"]
    if conditional_put(st) == "etag":
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
