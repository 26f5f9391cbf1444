"""Object storage (R2 / S3 / MinIO) through aiobotocore: download with a size limit, list pages.

S3 failures are sorted here into the pipeline's error tree (pipeline/errors.py):
- about the object, dead-lettered: a missing object, an invalid request, an unlisted 4xx code,
  anything else that broke reading it;
- about the world, retried with capped exponential backoff and jitter (tenacity): a timeout,
  5xx, throttle or refused connection;
- about the account, never blamed on an object: refused credentials (`StorageAccessDenied`),
  a missing bucket we were told to serve (`BucketMissing`).
Two answers are ambiguous and are checked before either side is blamed: an `AccessDenied` on one
object (`ObjectAccessDenied`: the object's own deny, or the account's? `probe_access`), and a 412
on GetObject `If-Match` (overwritten after the event, or an etag that never was? `_not_the_events`).
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
    ObjectAccessDenied,
    ObjectMissing,
    ObjectRejected,
    ObjectTooLarge,
    PermanentError,
    StorageAccessDenied,
    StorageOutage,
    StorageUnavailable,
    Superseded,
    VersionMismatch,
)

log = logging.getLogger(__name__)

_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}
# Refusals of the caller, not of the object: a rotated key, an expired token, a revoked grant.
_ACCESS_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
                 "TokenRefreshRequired", "AllAccessDisabled", "AccountProblem", "InvalidSecurity", "Unauthorized",
                 "401", "403"}
# Refusals that may be about one object only (a deny on its key or prefix, its KMS key, a missing key
# read without s3:ListBucket): probed before they are blamed on the account (`probe_access`).
_OBJECT_ACCESS_CODES = {"AccessDenied", "403"}
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
        if key and (code in _OBJECT_ACCESS_CODES or (not code and status == 403)):
            return ObjectAccessDenied(f"S3 denied {where}: {code or status}: {err.get('Message', '')}")
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
    await _probe(client.head_bucket, {"Bucket": bucket}, bucket, refusal_is_fault=False)


async def probe_access(client: Any, bucket: str, readable_key: str | None = None) -> None:
    """After S3 denied some objects of `bucket` (`ObjectAccessDenied`): do the same credentials
    work on the bucket? The probe is HeadObject of `readable_key` - an object of the bucket read
    in the same batch, so the grant a GET needs is asked again now - or, with none, HeadBucket.
    It returns when S3 answers: the denials are about those objects alone (`ObjectForbidden`).
    A refusal is the account's (rotated or revoked credentials, a grant taken away):
    `StorageAccessDenied`, waited out with nothing dead-lettered; no answer is `StorageOutage`."""
    if readable_key:
        await _probe(client.head_object, {"Bucket": bucket, "Key": readable_key}, bucket, refusal_is_fault=True)
    else:
        await _probe(client.head_bucket, {"Bucket": bucket}, bucket, refusal_is_fault=True)


async def _probe(call: Any, request: dict[str, Any], bucket: str, *, refusal_is_fault: bool) -> None:
    """One probe request, a few quick tries while S3 does not answer; `StorageOutage` past them.
    With `refusal_is_fault`, refused credentials raise `StorageAccessDenied`; any other answer passes."""
    try:
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(StorageUnavailable),
            wait=wait_exponential_jitter(multiplier=0.2, max=2),
            stop=stop_after_attempt(3),
            reraise=True,
        ):
            with attempt:
                try:
                    await call(**request)
                except Exception as exc:
                    typed = classify_s3_error(exc, bucket, "")  # no key: a refusal here is the caller's
                    if isinstance(typed, StorageUnavailable):
                        raise typed from exc
                    if refusal_is_fault and isinstance(typed, StorageAccessDenied):
                        what = f"s3://{bucket}/{request['Key']}" if "Key" in request else f"bucket {bucket}"
                        raise StorageAccessDenied(f"S3 denied objects of {bucket} and refuses the same "
                                                  f"credentials on {what} too: {typed}") from exc
                    log.debug("probe of %s answered %s", bucket, typed)
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
    if_match: str | None = None, version_id: str | None = None, event_time: datetime | None = None,
) -> tuple[bytes, str]:
    """Bytes and etag of one object version; retries transient failures, raises typed permanent ones.

    `version_id` (S3/MinIO with versioning) reads exactly that version. `if_match` (the event's
    etag) makes S3 refuse other bytes, never returning a newer version's bytes under the older
    version's name: `Superseded` when the object really was overwritten after `event_time` (the
    event's), else `VersionMismatch` with both etags (`_not_the_events`).
    """
    async for attempt in retrying_unavailable(attempts, "S3 unavailable"):
        with attempt:
            return await _download_once(client, bucket, key, max_bytes, if_match, version_id, event_time)
    raise AssertionError("unreachable")  # pragma: no cover


async def _download_once(
    client: Any, bucket: str, key: str, max_bytes: int, if_match: str | None, version_id: str | None,
    event_time: datetime | None,
) -> tuple[bytes, str]:
    request: dict[str, Any] = {"Bucket": bucket, "Key": key}
    if if_match:
        request["IfMatch"] = f'"{if_match}"'
    if version_id:
        request["VersionId"] = version_id
    try:
        try:
            resp = await client.get_object(**request)
        except ClientError as exc:
            if if_match and isinstance(classify_s3_error(exc, bucket, key), Superseded):
                head = await _head(client, bucket, key, version_id)
                raise _not_the_events(bucket, key, if_match, version_id, event_time, head) from exc
            raise
        length = int(resp.get("ContentLength") or 0)
        etag = str(resp.get("ETag", "")).strip('"')
        if if_match and etag and etag != if_match:  # a store that ignores If-Match
            resp["Body"].close()
            raise _not_the_events(bucket, key, if_match, version_id, event_time, resp)
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


async def _head(client: Any, bucket: str, key: str, version_id: str | None) -> dict[str, Any]:
    """HeadObject of the stored version (`version_id`'s, else the current one), errors typed."""
    request: dict[str, Any] = {"Bucket": bucket, "Key": key, **({"VersionId": version_id} if version_id else {})}
    try:
        return await client.head_object(**request)
    except Exception as exc:
        raise classify_s3_error(exc, bucket, key) from exc


def _not_the_events(
    bucket: str, key: str, event_etag: str, version_id: str | None, event_time: datetime | None,
    stored: dict[str, Any],
) -> Superseded | VersionMismatch:
    """The stored object is not the version the event names: overwritten after the event, or an
    etag that never was? Only an overwrite the store shows - a LastModified later than the event
    (S3 gives it to the second: an overwrite within the event's own second reads as not later), or
    another VersionId than the event's - is `Superseded` (counted; that version's event makes its
    row). A read of the event's own version (`version_id`) cannot be overwritten: its other etag
    is the event's error. Anything else is a `VersionMismatch` dead letter naming both etags."""
    where = f"s3://{bucket}/{key}"
    stored_etag = str(stored.get("ETag", "")).strip('"')
    modified, stored_version = stored.get("LastModified"), stored.get("VersionId")
    if version_id is None and event_time is not None and isinstance(modified, datetime) and modified > event_time:
        return Superseded(f"{where} was overwritten at {modified.isoformat()}, after its event "
                          f"({event_time.isoformat()}): stored etag {stored_etag}, the event's {event_etag}")
    return VersionMismatch(
        f"{where}: the event's etag {event_etag} matches no version the store shows (stored etag {stored_etag}, "
        f"version {version_id or stored_version or '-'}, last modified "
        f"{modified.isoformat() if isinstance(modified, datetime) else '?'}, event time "
        f"{event_time.isoformat() if event_time else 'none'}): not an overwrite after the event",
        event_etag=event_etag, stored_etag=stored_etag,
    )


async def list_objects(
    client: Any, bucket: str, prefix: str = "", start_after: str | None = None, attempts: int = 8,
    first_page_keys: int | None = None,
) -> AsyncIterator[ListedObject]:
    """Every object under `prefix`, all pages, in key order.

    Each page is one request, retried like a download (`attempts`, capped exponential backoff
    with jitter); what still fails is raised typed, one line naming the bucket and the endpoint
    (`list_page`). `first_page_keys` asks the first page for that many keys only (the later ones
    are the server's full pages): the first objects are yielded after a short request instead of
    a full page (1000 keys: ~0.3-0.6 s on the local test server)."""
    request: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
    if start_after:
        request["StartAfter"] = start_after
    first = {"MaxKeys": first_page_keys} if first_page_keys else {}
    while True:
        page = await list_page(client, {**request, **first}, attempts)
        first = {}
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
    if isinstance(typed, ObjectAccessDenied):  # a listing is never about one object: the account's refusal
        typed = StorageAccessDenied(str(typed))
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
