"""An object-store output (`s3://bucket/prefix` on R2, S3, MinIO): no shared filesystem, no lock.

Publishing a finalized file (`publish`), in order:

    1. claim the offsets: per source partition, create `_claims/<topic>/<partition>/<first>`
       with If-None-Match: * (the new owner of a partition and a paused former owner both start
       their file at the same offset: the one after the last finalized file). A claim held by
       another writer is waited for; one older than `claim_ttl_s` (its writer died) is taken
       over with If-Match on its ETag.                                                      Fenced
    2. the fencing check: no finalized file under data/ holds any of the offsets (another
       writer finalized them and released its claim before we claimed)                     Fenced
    3. upload the spooled file as data/<name>: one PUT (If-None-Match: *), or a multipart upload
       with equal-size parts (R2's rule) completed in one call. Readers see nothing before the
       PUT or the completion returns, then the whole file.                       OutputWriteFailed
    4. release the claims.

A writer that cannot finish within half the claim TTL gives up before uploading (its claim could
be taken over), so two writers never both publish the same offsets. summary.json and
_manifest.json are compare-and-swap writes: If-Match on the ETag read, If-None-Match: * to create,
retried on 412. Footers are read with ranged GETs (pyarrow's S3 filesystem reads the file's tail),
the dedupe index from three projected columns.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import orjson
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from botocore.session import get_session

from ..errors import Fenced, OutputWriteFailed
from ..faults import crash_point, delay_point
from .footer import FileFooter, OffsetRange, parse_footer
from .layout import ATTEMPTS_DIR, CLAIMS_DIR, DATA_DIR, PARQUET_SUFFIX
from .store import Fence, Output, discard

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

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            client.close()

    # --- reading back ------------------------------------------------------------------
    def finalized(self) -> list[str]:
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
        except OSError as exc:
            raise OutputWriteFailed(f"reading {self.data_path(name)} failed: {exc}") from exc

    # --- publishing ----------------------------------------------------------------------
    def publish(self, spooled: Path, name: str, offsets: list[OffsetRange], fence: Fence | None) -> None:
        claims: list[str] = []
        started = time.monotonic()  # the lease runs from our oldest claim
        try:
            # 1. claims, in one global order (no two writers wait on each other in a circle)
            for r in sorted(offsets, key=lambda r: (r.topic, r.partition)):
                claims.append(self._claim(r, name))
                if len(claims) == 1:
                    started = time.monotonic()
            # 2. fencing check
            conflicts = fence(offsets) if fence is not None else []
            if conflicts:
                raise Fenced(
                    f"another consumer already finalized offsets of {name} ({'; '.join(conflicts[:3])}): this "
                    "consumer lost those partitions; its file is discarded and nothing is committed - restart "
                    "it to resume from the files"
                )
            # 3. upload, only while our claims are surely ours
            delay_point("publish")
            self._upload(spooled, self.key(f"{DATA_DIR}/{name}"), started)
            crash_point("after_upload")
        except (ClientError, BotoCoreError, OSError) as exc:
            self._release(claims)
            raise OutputWriteFailed(f"publishing {self.data_path(name)} failed: {exc}") from exc
        except BaseException:
            self._release(claims)
            raise
        finally:
            discard(spooled)
        # 4. release
        self._release(claims)

    def _claim(self, r: OffsetRange, name: str) -> str:
        key = self.key(f"{CLAIMS_DIR}/{r.topic}/{r.partition}/{r.first:020d}")
        body = orjson.dumps({"file": name, "first": r.first, "last": r.last})
        deadline = time.monotonic() + self.claim_ttl_s * 1.5
        while True:
            try:
                self.client.put_object(Bucket=self.bucket, Key=key, Body=body, IfNoneMatch="*")
                return key
            except ClientError as exc:
                if _code(exc) not in CONFLICT_CODES:
                    raise
            try:
                held = self.client.get_object(Bucket=self.bucket, Key=key)
            except ClientError as exc:
                if _code(exc) in ("NoSuchKey", "404"):
                    continue  # released meanwhile: try again
                raise
            holder = orjson.loads(held["Body"].read())
            if self._published(str(holder.get("file", ""))):
                raise Fenced(
                    f"{self.data_path(holder['file'])} already holds {r.topic}[{r.partition}] from offset {r.first}: "
                    f"this consumer lost the partition; {name} is discarded and nothing is committed"
                )
            if _age_s(held) > self.claim_ttl_s or time.monotonic() > deadline:
                log.warning("taking over the claim on %s[%d]@%d of %s: its writer is gone", r.topic, r.partition,
                            r.first, holder.get("file"))
                try:
                    self.client.put_object(Bucket=self.bucket, Key=key, Body=body, IfMatch=held["ETag"])
                    return key
                except ClientError as exc:
                    if _code(exc) not in CONFLICT_CODES:
                        raise
                    continue  # someone else took it over first
            time.sleep(0.5)

    def _published(self, name: str) -> bool:
        """Whether data/`name` exists (one HeadObject, not a listing of data/)."""
        if not name:
            return False
        try:
            self.client.head_object(Bucket=self.bucket, Key=self.key(f"{DATA_DIR}/{name}"))
            return True
        except ClientError as exc:
            if _code(exc) in ("NoSuchKey", "404", "NotFound"):
                return False
            raise

    def _release(self, claims: list[str]) -> None:
        for key in claims:
            try:
                self.client.delete_object(Bucket=self.bucket, Key=key)
            except (ClientError, BotoCoreError) as exc:  # it expires; the next claimant takes it over
                log.warning("could not release the claim %s: %s", key, exc)

    def _check_lease(self, started: float) -> None:
        if time.monotonic() - started > self.claim_ttl_s / 2:
            raise OutputWriteFailed(
                f"the upload could not finish within half the claim TTL ({self.claim_ttl_s:.0f} s, "
                "METAVOICE_OUTPUT_CLAIM_TTL_S): given up so no other writer can publish the same offsets"
            )

    def _upload(self, spooled: Path, key: str, started: float) -> None:
        size = spooled.stat().st_size
        if size <= self.part_bytes:
            self._check_lease(started)
            self.client.put_object(Bucket=self.bucket, Key=key, Body=spooled.read_bytes(), IfNoneMatch="*")
            return
        upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=key)["UploadId"]
        try:
            parts = []
            with open(spooled, "rb") as f:
                number = 1
                while chunk := f.read(self.part_bytes):  # equal parts, the last may be shorter (R2)
                    self._check_lease(started)
                    etag = self.client.upload_part(Bucket=self.bucket, Key=key, UploadId=upload_id,
                                                   PartNumber=number, Body=chunk)["ETag"]
                    parts.append({"PartNumber": number, "ETag": etag})
                    number += 1
            self._check_lease(started)
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
        """The local spool's dead files, and multipart uploads under data/ older than the claim TTL
        (no live writer keeps one that long): invisible, but billed."""
        removed = super().discard_orphans()
        now = datetime.now(timezone.utc)
        try:
            pages = self.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=self.key(f"{DATA_DIR}/"))
            for page in pages:
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


def _age_s(resp: dict) -> float:
    """How old an object is by the server's own clock (Date header - LastModified): writers' clocks may differ."""
    try:
        server_now = parsedate_to_datetime(resp["ResponseMetadata"]["HTTPHeaders"]["date"])
    except (KeyError, TypeError, ValueError):
        server_now = datetime.now(timezone.utc)
    return (server_now - resp["LastModified"]).total_seconds()


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
