"""An object-store output (`s3://bucket/prefix` on R2, S3, MinIO): no shared filesystem, no lock.

A finalized file is uploaded into the table directory as data/<name> (`publish`): one PUT with
If-None-Match: *, or a multipart upload with equal-size parts (R2's rule) completed in one call.
Readers of the table see nothing of it until the consumer's table commit adds it
(pipeline/output/table.py): the Delta log, not a claim, decides which of two writers holding the
same offsets wins, and the loser's upload is removed (`remove`). An upload may take as long as it
takes: no lease runs out under it. summary.json and _manifest.json are compare-and-swap writes:
If-Match on the ETag read, If-None-Match: * to create, retried on 412. Footers are read with
ranged GETs (pyarrow's S3 filesystem reads the file's tail), the dedupe index from three columns.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from botocore.session import get_session

from ..errors import OutputWriteFailed
from ..faults import crash_point, delay_point
from .footer import FileFooter, parse_footer
from .layout import ATTEMPTS_DIR, DATA_DIR, PARQUET_SUFFIX
from .store import Output, discard
from .table import DatasetTable, options_from_client_kwargs

log = logging.getLogger(__name__)

CONFLICT_CODES = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}


def parse_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix/` -> ("bucket", "some/prefix")."""
    u = urlparse(url)
    if u.scheme != "s3" or not u.netloc:
        raise ValueError(f"an object-store output is s3://bucket[/prefix], got {url!r}")
    return u.netloc, u.path.strip("/")


class S3Output(Output):
    def __init__(
        self,
        url: str,
        *,
        spool: Path,
        client_kwargs: dict[str, Any],
        part_bytes: int = 16 * 1024 * 1024,
        claim_ttl_s: float = 300.0,
        retry_attempts: int = 8,
        conditional_put: str = "etag",
    ) -> None:
        self.bucket, self.prefix = parse_s3_url(url)
        self.location = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.spool = Path(spool)
        self.attempts_dir = self.spool / ATTEMPTS_DIR
        self.part_bytes = part_bytes
        self.claim_ttl_s = claim_ttl_s
        config = Config(retries={"max_attempts": retry_attempts, "mode": "standard"}, connect_timeout=10, read_timeout=60,
                        s3={"addressing_style": "path"} if client_kwargs.get("endpoint_url") else None)
        self.client = get_session().create_client("s3", config=config, **client_kwargs)
        self.fs = _arrow_fs(client_kwargs, retry_attempts)
        self.table = DatasetTable(f"{self.location}/{DATA_DIR}", options_from_client_kwargs(client_kwargs, conditional_put))

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            client.close()

    # --- reading back ------------------------------------------------------------------
    def listed(self) -> list[str]:
        """Parquet files lying under data/, in the table or not (a 0.1 output's, before migrating)."""
        start = self.key(f"{DATA_DIR}/")
        names = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=start):
                for obj in page.get("Contents", ()):
                    name = obj["Key"][len(start):]
                    if "/" not in name and name.endswith(PARQUET_SUFFIX):
                        names.append(name)
        except (ClientError, BotoCoreError) as exc:
            raise OutputWriteFailed(f"listing {self.location}/{DATA_DIR}/ failed: {exc}") from exc
        return sorted(names)

    def data_size(self, name: str) -> int:
        size = self._size_of(self.key(f"{DATA_DIR}/{name}"))
        if size is None:
            raise OutputWriteFailed(f"{self.data_path(name)} is gone")
        return size

    def data_path(self, name: str) -> str:
        return f"s3://{self.bucket}/{self.key(f'{DATA_DIR}/{name}')}"

    def _arrow_path(self, name: str) -> str:
        return f"{self.bucket}/{self.key(f'{DATA_DIR}/{name}')}"

    def read_footer(self, name: str) -> FileFooter:
        try:
            return parse_footer(name, pq.read_metadata(self._arrow_path(name), filesystem=self.fs))
        except OSError as exc:
            raise OutputWriteFailed(f"reading the footer of {self.data_path(name)} failed: {exc}") from exc

    def read_columns(self, name: str, columns: list[str]) -> pa.Table:
        try:
            return pq.read_table(self._arrow_path(name), columns=columns, filesystem=self.fs)
        except FileNotFoundError:
            raise  # vacuumed: the caller knows where the rows went
        except OSError as exc:
            raise OutputWriteFailed(f"reading {self.data_path(name)} failed: {exc}") from exc

    # --- publishing ----------------------------------------------------------------------
    def publish(self, spooled: Path, name: str) -> None:
        try:
            delay_point("publish")
            self._upload(spooled, self.key(f"{DATA_DIR}/{name}"))
            crash_point("after_upload")
        except (ClientError, BotoCoreError, OSError) as exc:
            raise OutputWriteFailed(f"publishing {self.data_path(name)} failed: {exc}") from exc
        finally:
            discard(spooled)

    def _size_of(self, key: str) -> int | None:
        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=key)["ContentLength"])
        except ClientError:
            return None

    def remove(self, name: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key(f"{DATA_DIR}/{name}"))
        except (ClientError, BotoCoreError) as exc:  # unreferenced: VACUUM removes it later
            log.warning("could not remove %s: %s", self.data_path(name), exc)

    def _upload(self, spooled: Path, key: str) -> None:
        size = spooled.stat().st_size
        if size <= self.part_bytes:
            try:
                self.client.put_object(Bucket=self.bucket, Key=key, Body=spooled.read_bytes(), IfNoneMatch="*")
            except ClientError as exc:
                # the name is this writer's alone: a 412 is botocore's retry of our own PUT that landed
                # (its response was lost), provided the object there has our size
                if _code(exc) not in CONFLICT_CODES or self._size_of(key) != size:
                    raise
            return
        upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=key)["UploadId"]
        try:
            parts = []
            with open(spooled, "rb") as f:
                number = 1
                while chunk := f.read(self.part_bytes):  # equal parts, the last may be shorter (R2)
                    etag = self.client.upload_part(Bucket=self.bucket, Key=key, UploadId=upload_id,
                                                   PartNumber=number, Body=chunk)["ETag"]
                    parts.append({"PartNumber": number, "ETag": etag})
                    number += 1
            self.client.complete_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id,
                                                  MultipartUpload={"Parts": parts})
        except BaseException:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            except (ClientError, BotoCoreError) as exc:
                log.warning("could not abort the multipart upload of %s: %s (discarded at the next start)", key, exc)
            raise

    # --- small documents -----------------------------------------------------------------
    def _read_doc(self, name: str) -> tuple[bytes | None, Any]:
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self.key(name))
        except ClientError as exc:
            if _code(exc) in ("NoSuchKey", "404"):
                return None, None
            raise OutputWriteFailed(f"reading {self.location}/{name} failed: {exc}") from exc
        except BotoCoreError as exc:
            raise OutputWriteFailed(f"reading {self.location}/{name} failed: {exc}") from exc
        return resp["Body"].read(), resp["ETag"]

    def _write_doc(self, name: str, data: bytes, version: Any) -> bool:
        cond = {"IfMatch": version} if version is not None else {"IfNoneMatch": "*"}
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.key(name), Body=data,
                                   ContentType=_content_type(name), **cond)
            return True
        except ClientError as exc:
            if _code(exc) in CONFLICT_CODES:
                return False
            raise OutputWriteFailed(f"writing {self.location}/{name} failed: {exc}") from exc
        except BotoCoreError as exc:
            raise OutputWriteFailed(f"writing {self.location}/{name} failed: {exc}") from exc

    # --- what dead writers left ------------------------------------------------------------
    def discard_orphans(self) -> list[str]:
        """The local spool's dead files, and multipart uploads under data/ older than `claim_ttl_s`
        by the server's own clock (its Date header: writers' clocks may differ): invisible, but billed."""
        removed = super().discard_orphans()
        try:
            pages = self.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=self.key(f"{DATA_DIR}/"))
            for page in pages:
                now = _server_now(page)
                for up in page.get("Uploads", ()):
                    if (now - up["Initiated"]).total_seconds() > self.claim_ttl_s:
                        self.client.abort_multipart_upload(Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"])
                        removed.append(up["Key"])
        except (ClientError, BotoCoreError) as exc:
            log.warning("could not list abandoned multipart uploads under %s: %s", self.location, exc)
        return removed


def _code(exc: ClientError) -> str:
    err = exc.response.get("Error", {})
    return str(err.get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))


def _server_now(resp: dict) -> datetime:
    """The server's clock at a response (its Date header), else ours."""
    try:
        return parsedate_to_datetime(resp["ResponseMetadata"]["HTTPHeaders"]["date"])
    except (KeyError, TypeError, ValueError):
        return datetime.now(timezone.utc)


def _content_type(name: str) -> str:
    return {".json": "application/json", ".md": "text/markdown; charset=utf-8"}.get(Path(name).suffix, "application/octet-stream")


def _arrow_fs(client_kwargs: dict[str, Any], retry_attempts: int) -> pafs.S3FileSystem:
    kwargs: dict[str, Any] = {"region": client_kwargs.get("region_name") or "us-east-1",
                              "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=retry_attempts)}
    endpoint = client_kwargs.get("endpoint_url")
    if endpoint:
        u = urlparse(endpoint)
        kwargs["endpoint_override"] = u.netloc or u.path
        kwargs["scheme"] = u.scheme or "https"
    if client_kwargs.get("aws_access_key_id"):
        kwargs["access_key"] = client_kwargs["aws_access_key_id"]
        kwargs["secret_key"] = client_kwargs["aws_secret_access_key"]
    return pafs.S3FileSystem(**kwargs)
