"""Backfill: enumerate a bucket that already holds data and publish one event per object.

Events carry the listing's etag, so running a backfill twice (or resuming one that died
mid-chunk) adds no rows: the consumer drops `(bucket, key, etag)` it has already written.

The path of one prefix, in order:

1. list the prefix page by page (a first page of one micro-batch, `first_page_keys`, so events
   flow at once, then 1000 keys a page) from `StartAfter` = the later of `--start-after` and the checkpoint's last key;
2. keep objects matching the suffix and the `[modified-since, modified-until)` window;
3. pace sends with the rate limit and queue them on the producer (acks=all);
4. every `chunk_size` events (or `CHECKPOINT_EVERY_S` seconds), wait until Kafka acknowledged
   every queued event, then record the chunk's last listed key in the checkpoint (atomic);
5. at the end of the listing, flush the last chunk and mark the prefix done.

A failure in step 4 raises before the checkpoint moves, so nothing unacknowledged is ever
recorded as done.

Before any topic is made, one listing request checks the bucket. Every listing request is
retried like a download (`s3_retry_attempts`); what still fails is a typed error with a
one-line message naming the bucket and the endpoint (`pipeline.storage.list_page`):
`BucketMissing`, `StorageAccessDenied`, `StorageOutage` (no answer past the retries),
`InvalidRequest` (an invalid bucket name), `ObjectRejected` (another refusal). A broker that
does not answer within `kafka_connect_timeout_s` is `BrokerUnreachable`.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from broker.topics import ensure_topics
from pipeline.config import Settings
from pipeline.events import ObjectEvent
from pipeline.storage import ListedObject, check_listable, list_objects, s3_client

from .checkpoint import BackfillCheckpoint, PrefixProgress
from .kafka import EventPublisher, event_publisher, wait_acknowledged
from .ratelimit import TokenBucket

log = logging.getLogger(__name__)

PUBLISH_CHUNK = 500  # events in flight per acknowledgement wait (and per checkpoint write)
# The first listing page asks for one micro-batch of keys (`batch_max_events`, at most this):
# consumers get their first batch after one short request instead of a full 1000-key page (listing
# and parsing it took 0.3-0.6 s, ~10 % of a 1,000-object backfill end to end, while the consumers
# waited). Later pages are full and arrive while that batch runs, so the consumers' next batches
# grow as under any backlog (a larger first page closed a second, partial batch on the linger:
# 7 flow runs per 1,000 events instead of 5).
FIRST_PAGE_MAX_KEYS = 1000


def first_page_keys(settings: Settings) -> int:
    """Keys of the first listing page: one micro-batch of the settings."""
    return min(settings.batch_max_events, FIRST_PAGE_MAX_KEYS)
# Also checkpoint at least this often, so a long run of filtered-out keys is not re-listed.
CHECKPOINT_EVERY_S = 5.0
# How long one chunk may wait for Kafka's acknowledgements before the run fails.
ACK_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class BackfillFilter:
    suffix: str = ".flac"
    modified_since: datetime | None = None  # inclusive
    modified_until: datetime | None = None  # exclusive

    def matches(self, obj: ListedObject) -> bool:
        if self.suffix and not obj.key.endswith(self.suffix):
            return False
        modified = obj.last_modified if obj.last_modified.tzinfo else obj.last_modified.replace(tzinfo=timezone.utc)
        if self.modified_since is not None and modified < self.modified_since:
            return False
        if self.modified_until is not None and modified >= self.modified_until:
            return False
        return True

    def params(self) -> dict[str, Any]:
        return {
            "suffix": self.suffix,
            "modified_since": self.modified_since.isoformat() if self.modified_since else None,
            "modified_until": self.modified_until.isoformat() if self.modified_until else None,
        }


@dataclass
class BackfillResult:
    listed: int = 0  # objects listed by this run
    matched: int = 0  # of those, matching the filters
    published: int = 0  # events Kafka acknowledged in this run (0 on a dry run)
    bytes: int = 0  # total size of the matching objects
    already_done: list[str] = field(default_factory=list)  # prefixes the checkpoint marked done
    dry_run: bool = False


def event_for(bucket: str, obj: ListedObject) -> ObjectEvent:
    return ObjectEvent(
        bucket=bucket,
        key=obj.key,
        action="PutObject",
        size=obj.size,
        etag=obj.etag,
        event_time=obj.last_modified.astimezone(timezone.utc),
    )


async def run_backfill(
    settings: Settings,
    bucket: str,
    prefixes: list[str] | None = None,
    suffix: str = ".flac",
    *,
    modified_since: datetime | None = None,
    modified_until: datetime | None = None,
    start_after: str | None = None,
    checkpoint: Path | None = None,
    rate_limit: float | None = None,
    dry_run: bool = False,
    progress: bool = False,
    chunk_size: int = PUBLISH_CHUNK,
) -> BackfillResult:
    filt = BackfillFilter(suffix, modified_since, modified_until)
    prefixes = list(dict.fromkeys(prefixes or [""]))  # keep order, drop repeats
    ckpt = None
    if checkpoint is not None:
        ckpt = BackfillCheckpoint.load(checkpoint, {"bucket": bucket, **filt.params()})
    limiter = TokenBucket(rate_limit) if rate_limit else None
    result = BackfillResult(dry_run=dry_run)

    async with contextlib.AsyncExitStack() as stack:
        s3 = await stack.enter_async_context(s3_client(settings))
        # A missing bucket, refused credentials or an endpoint that does not answer fail here, in
        # one line, before any topic is made.
        await check_listable(s3, bucket, prefixes[0], settings.s3_retry_attempts)
        publisher: EventPublisher | None = None
        if not dry_run:
            await ensure_topics(settings)
            publisher = await stack.enter_async_context(event_publisher(settings))
        bar = stack.enter_context(_progress_bar(progress, bucket, dry_run))
        for prefix in prefixes:
            state = ckpt.progress(prefix) if ckpt else PrefixProgress()
            if state.done:
                result.already_done.append(prefix)
                continue
            run = _PrefixRun(bucket, prefix, state, ckpt, publisher, result, bar, chunk_size)
            after = max(filter(None, [start_after, state.after]), default=None)
            async for obj in list_objects(s3, bucket, prefix, after, settings.s3_retry_attempts,
                                          first_page_keys=first_page_keys(settings)):
                result.listed += 1
                if filt.matches(obj):
                    if limiter is not None:
                        await limiter.acquire()
                    await run.add(obj)
                run.last_key = obj.key
                bar.advance(result)
                if run.should_flush():
                    await run.flush()
            await run.flush(done=True)
        bar.advance(result)
    log.info(
        "backfill of s3://%s: %d listed, %d matched (%d bytes), %d published%s",
        bucket, result.listed, result.matched, result.bytes, result.published, " (dry run)" if dry_run else "",
    )
    return result


class _PrefixRun:
    """Chunks of one prefix: queue sends, then acknowledge and checkpoint together."""

    def __init__(self, bucket, prefix, state, ckpt, publisher, result, bar, chunk_size) -> None:
        self.bucket = bucket
        self.prefix = prefix
        self.state: PrefixProgress = state
        self.ckpt: BackfillCheckpoint | None = ckpt
        self.publisher: EventPublisher | None = publisher
        self.result: BackfillResult = result
        self.bar = bar
        self.chunk_size = chunk_size
        self.futures: list = []
        self.last_key: str | None = None
        self.saved_at = time.monotonic()

    async def add(self, obj: ListedObject) -> None:
        self.result.matched += 1
        self.result.bytes += obj.size
        if self.publisher is not None:
            self.futures.append(await self.publisher.send(event_for(self.bucket, obj)))

    def should_flush(self) -> bool:
        return len(self.futures) >= self.chunk_size or time.monotonic() - self.saved_at >= CHECKPOINT_EVERY_S

    async def flush(self, done: bool = False) -> None:
        failures = [e for e in await wait_acknowledged(self.futures, ACK_TIMEOUT_S) if e is not None]
        if failures:
            raise failures[0]
        self.result.published += len(self.futures)
        self.state.published += len(self.futures)
        self.futures = []
        if self.last_key is not None:
            self.state.after = self.last_key
        self.state.done = done
        self.saved_at = time.monotonic()
        if self.ckpt is not None and self.publisher is not None:  # a dry run never moves it
            self.ckpt.save()


class _Bar:
    def __init__(self, progress: Any = None, task: Any = None) -> None:
        self.progress, self.task = progress, task

    def advance(self, result: BackfillResult) -> None:
        if self.progress is None:
            return
        from rich.filesize import decimal

        self.progress.update(
            self.task,
            completed=result.published if not result.dry_run else result.matched,
            listed=result.listed,
            matched=result.matched,
            size=decimal(result.bytes),
        )


@contextlib.contextmanager
def _progress_bar(enabled: bool, bucket: str, dry_run: bool) -> Iterator[_Bar]:
    if not enabled:
        yield _Bar()
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    verb = "counting" if dry_run else "publishing"
    progress = Progress(
        SpinnerColumn(),
        TextColumn(f"[bold]{verb}[/] s3://{bucket}"),
        BarColumn(),  # the total is unknown while listing: the bar pulses
        TextColumn("{task.completed:,.0f} objects"),
        TextColumn("{task.fields[size]}"),
        TextColumn("[dim]{task.fields[matched]:,} matched / {task.fields[listed]:,} listed"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=False,
    )
    with progress:
        task = progress.add_task(verb, total=None, listed=0, matched=0, size="0 bytes")
        yield _Bar(progress, task)


def progress_wanted(flag: bool) -> bool:
    """Draw the bar with `--progress`, or by default when stderr is a terminal."""
    return flag or sys.stderr.isatty()
