"""Backfill: enumerate a bucket that already holds data and publish one event per object.

Events carry the object's etag, so running a backfill twice adds no rows: the consumer
drops `(bucket, key, etag)` it has already written.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timezone

from pipeline.config import Settings
from pipeline.events import ObjectEvent
from pipeline.storage import ListedObject, list_objects, s3_client

from .kafka import ensure_topics, event_publisher

log = logging.getLogger(__name__)

PUBLISH_CHUNK = 500  # events in flight per acknowledgement wait


@dataclass
class BackfillResult:
    published: int = 0
    bytes: int = 0
    listed: int = 0


def event_for(bucket: str, obj: ListedObject) -> ObjectEvent:
    return ObjectEvent(
        bucket=bucket,
        key=obj.key,
        action="PutObject",
        size=obj.size,
        etag=obj.etag,
        event_time=obj.last_modified.astimezone(timezone.utc),
    )


async def run_backfill(settings: Settings, bucket: str, prefixes: list[str], suffix: str) -> BackfillResult:
    await ensure_topics(settings)
    result = BackfillResult()
    async with s3_client(settings) as s3, event_publisher(settings) as publisher:
        pending: list[ObjectEvent] = []
        for prefix in prefixes or [""]:
            async for obj in list_objects(s3, bucket, prefix):
                result.listed += 1
                if suffix and not obj.key.endswith(suffix):
                    continue
                pending.append(event_for(bucket, obj))
                result.bytes += obj.size
                if len(pending) >= PUBLISH_CHUNK:
                    result.published += await publisher.publish_many(pending)
                    pending.clear()
        result.published += await publisher.publish_many(pending)
    log.info("backfill of s3://%s published %d of %d listed objects", bucket, result.published, result.listed)
    return result
