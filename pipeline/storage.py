"""Object storage (R2 / S3 / MinIO) through aiobotocore: download with a size limit, list pages.

S3 failures are sorted here into the pipeline's error tree (pipeline/errors.py):
- about the object, dead-lettered: a missing object, an invalid request, an unlisted 4xx code,
  anything else that broke reading it;
- about the world, retried with capped exponential backoff and jitter (tenacity): a timeout,
  5xx, throttle or refused connection;
- about the account, never blamed on an object: refused credentials (`StorageAccessDenied`),
  a missing bucket we were told to serve (`BucketMissing`).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any, AsyncIterator

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    HTTPClientError,
    ParamValidationError,
    ReadTimeoutError,
)
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from .config import Settings
from .errors import (
    BucketMissing,
    DownloadFailed,
    EmptyObject,
    EnvironmentFault,
    InvalidRequest,
    ObjectMissing,
    ObjectRejected,
    ObjectTooLarge,
    PermanentError,
    StorageAccessDenied,
    StorageOutage,
    StorageUnavailable,
    Superseded,
)

log = logging.getLogger(__name__)

_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}
# Refusals of the caller, not of the object: a rotated key, an expired token, a revoked grant.
_ACCESS_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
                 "TokenRefreshRequired", "AllAccessDisabled", "AccountProblem", "InvalidSecurity", "Unauthorized",
                 "401", "403"}
_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError",
                    "ServiceUnavailable", "503", "500", "502", "504", "RequestTimeTooSkewed"}
# HTTPClientError covers botocore's ResponseStreamingError: the connection dropped while the body
# was being read (aiobotocore raises it, or aiohttp's ClientPayloadError, mid-download).
_NETWORK_ERRORS = (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError,
                   HTTPClientError, aiohttp.ClientPayloadError, aiohttp.ClientConnectionError,
                   ConnectionError, TimeoutError, OSError)


@dataclass(frozen=True, slots=True)
class ListedObject:
    key: str
    size: int
    etag: str
    last_modified: datetime


@contextlib.asynccontextmanager
async def s3_client(settings: Settings) -> AsyncIterator[Any]:
    config = AioConfig(
        retries={"max_attempts": 1, "mode": "standard"},  # retries are ours (tenacity), typed
        connect_timeout=10,
        read_timeout=60,
        max_pool_connections=max(10, settings.download_concurrency * 2),
    )
    async with get_session().create_client("s3", config=config, **settings.s3_client_kwargs()) as client:
        yield client


def classify_s3_error(exc: BaseException, bucket: str, key: str) -> Exception:
    """Any exception of one S3 call as a typed error of the tree (never the raw one)."""
    where = f"s3://{bucket}/{key}"
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket":
            return BucketMissing(f"bucket {bucket} does not exist (NoSuchBucket)")
        if code in _ACCESS_CODES or (not code and status in (401, 403)):
            return StorageAccessDenied(f"S3 refused our credentials for {where}: {code or status}; check the "
                                       "access key and secret (rotated?), the token's expiry and its grants")
        if code in _MISSING_CODES or status == 404:
            return ObjectMissing(f"{where} does not exist ({code or status})")
        if code == "PreconditionFailed" or status == 412:
            return Superseded(f"{where} was overwritten: the stored version is not the event's")
        if code in _TRANSIENT_CODES or (isinstance(status, int) and (status >= 500 or status == 429)):
            return StorageUnavailable(f"{where}: {code or status}")
        return ObjectRejected(f"{where}: S3 refused the request: {code or status}: {err.get('Message', '')}")
    if isinstance(exc, ParamValidationError):
        return InvalidRequest(f"{where}: not a valid S3 request: {exc}")
    if isinstance(exc, _NETWORK_ERRORS):
        return StorageUnavailable(f"{where}: {type(exc).__name__}: {exc}")
    if isinstance(exc, MemoryError):
        return ObjectTooLarge(f"{where}: out of memory reading it")
    if isinstance(exc, (BotoCoreError, ValueError, TypeError, KeyError, AttributeError)):
        return DownloadFailed(f"{where}: {type(exc).__name__}: {exc}")
    return exc if isinstance(exc, Exception) else RuntimeError(str(exc))


async def probe_bucket(client: Any, bucket: str) -> None:
    """After objects failed past their retries: does the bucket itself answer (HeadBucket, a few
    quick tries)? Any answer - even a refusal of HEAD by a token scoped to objects - means S3 is
    up and those objects fail alone; none means an outage (`StorageOutage`)."""
    try:
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(StorageUnavailable),
            wait=wait_exponential_jitter(multiplier=0.2, max=2),
            stop=stop_after_attempt(3),
            reraise=True,
        ):
            with attempt:
                try:
                    await client.head_bucket(Bucket=bucket)
                except Exception as exc:
                    typed = classify_s3_error(exc, bucket, "")
                    if isinstance(typed, StorageUnavailable):
                        raise typed from exc
                    log.debug("bucket probe of %s answered %s", bucket, typed)
    except StorageUnavailable as exc:
        raise StorageOutage(f"S3 is failing for bucket {bucket} itself, not only for some objects: {exc}") from exc


def retrying_unavailable(attempts: int, what: str) -> AsyncRetrying:
    """The one retry policy for transient S3 failures (`StorageUnavailable`): capped exponential
    backoff with jitter (0.2 s doubling to 10 s), `attempts` in all, the last failure re-raised."""
    return AsyncRetrying(
        retry=retry_if_exception_type(StorageUnavailable),
        wait=wait_exponential_jitter(multiplier=0.2, max=10),
        stop=stop_after_attempt(attempts),
        reraise=True,
        before_sleep=lambda rs: log.warning(
            "%s, retrying (attempt %d of %d): %s", what, rs.attempt_number, attempts,
            rs.outcome.exception() if rs.outcome else "",
        ),
    )


async def download_object(
    client: Any, bucket: str, key: str, max_bytes: int, attempts: int = 8, *,
    if_match: str | None = None, version_id: str | None = None,
) -> tuple[bytes, str]:
    """Bytes and etag of one object version; retries transient failures, raises typed permanent ones.

    `version_id` (S3/MinIO with versioning) reads exactly that version. `if_match` (the event's
    etag) makes S3 refuse other bytes: a key re-uploaded after the event raises `Superseded`,
    never returns the newer bytes under the older version's name.
    """
    async for attempt in retrying_unavailable(attempts, "S3 unavailable"):
        with attempt:
            return await _download_once(client, bucket, key, max_bytes, if_match, version_id)
    raise AssertionError("unreachable")  # pragma: no cover


async def _download_once(
    client: Any, bucket: str, key: str, max_bytes: int, if_match: str | None, version_id: str | None
) -> tuple[bytes, str]:
    request: dict[str, Any] = {"Bucket": bucket, "Key": key}
    if if_match:
        request["IfMatch"] = f'"{if_match}"'
    if version_id:
        request["VersionId"] = version_id
    try:
        resp = await client.get_object(**request)
        length = int(resp.get("ContentLength") or 0)
        etag = str(resp.get("ETag", "")).strip('"')
        if if_match and etag and etag != if_match:  # a store that ignores If-Match
            resp["Body"].close()
            raise Superseded(f"s3://{bucket}/{key} was overwritten: stored etag {etag}, the event's {if_match}")
        if length > max_bytes:
            resp["Body"].close()
            raise ObjectTooLarge(f"s3://{bucket}/{key} is {length} bytes, over the {max_bytes}-byte limit")
        async with resp["Body"] as body:
            data = await body.read()
    except (PermanentError, StorageUnavailable, Superseded, EnvironmentFault):
        raise
    except Exception as exc:
        raise classify_s3_error(exc, bucket, key) from exc
    if not data:
        raise EmptyObject(f"s3://{bucket}/{key} is empty (0 bytes)")
    return data, etag


async def list_objects(
    client: Any, bucket: str, prefix: str = "", start_after: str | None = None, attempts: int = 8
) -> AsyncIterator[ListedObject]:
    """Every object under `prefix`, all pages, in key order.

    Each page is one request, retried like a download (`attempts`, capped exponential backoff
    with jitter); what still fails is raised typed, one line naming the bucket and the endpoint
    (`list_page`)."""
    request: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
    if start_after:
        request["StartAfter"] = start_after
    while True:
        page = await list_page(client, request, attempts)
        for item in page.get("Contents", []):
            yield ListedObject(
                key=item["Key"],
                size=int(item.get("Size", 0)),
                etag=str(item.get("ETag", "")).strip('"'),
                last_modified=item["LastModified"],
            )
        token = page.get("NextContinuationToken")
        if not page.get("IsTruncated") or not token:
            return
        request = {**request, "ContinuationToken": token}


async def check_listable(client: Any, bucket: str, prefix: str = "", attempts: int = 8) -> None:
    """One listing request of at most one key: the bucket exists at the endpoint, which answers
    and accepts our credentials - before anything else is done. Raises as `list_page`."""
    await list_page(client, {"Bucket": bucket, "Prefix": prefix, "MaxKeys": 1}, attempts)


async def list_page(client: Any, request: dict[str, Any], attempts: int = 8) -> dict[str, Any]:
    """One ListObjectsV2 response. A failure that can pass (a timeout, 5xx, throttling, a refused
    connection) is retried `attempts` times in all, then raised as `StorageOutage`; the others at
    once: `BucketMissing` (no such bucket at the endpoint), `StorageAccessDenied` (credentials
    refused), `InvalidRequest` (an invalid bucket name), `ObjectRejected` (another refusal).
    Every message is one line that names the bucket and the endpoint."""
    bucket = str(request["Bucket"])
    endpoint = _endpoint(client)
    try:
        async for attempt in retrying_unavailable(attempts, f"S3 unavailable listing bucket {bucket!r}"):
            with attempt:
                try:
                    return await client.list_objects_v2(**request)
                except Exception as exc:
                    raise _listing_error(exc, bucket, str(request.get("Prefix", "")), endpoint) from exc
    except StorageUnavailable as exc:
        raise StorageOutage(
            f"S3 at {endpoint} did not answer listing bucket {bucket!r} ({attempts} attempts, "
            f"METAVOICE_S3_RETRY_ATTEMPTS): {_one_line(exc)}"
        ) from exc
    raise AssertionError("unreachable")  # pragma: no cover


def _listing_error(exc: BaseException, bucket: str, prefix: str, endpoint: str) -> Exception:
    """A failed listing request as a typed error with a one-line message."""
    typed = classify_s3_error(exc, bucket, prefix)
    if isinstance(typed, (BucketMissing, ObjectMissing)):  # a 404 on a bucket's listing: no such bucket
        return BucketMissing(f"bucket {bucket!r} does not exist at {endpoint}")
    if isinstance(typed, StorageUnavailable):
        return StorageUnavailable(_one_line(typed))
    if isinstance(typed, (PermanentError, EnvironmentFault)):
        return type(typed)(f"listing bucket {bucket!r} at {endpoint}: {_one_line(typed)}")
    return typed


def _endpoint(client: Any) -> str:
    meta = getattr(client, "meta", None)
    return str(getattr(meta, "endpoint_url", None) or "the default S3 endpoint")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())
