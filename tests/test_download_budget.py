"""The micro-batch byte budget counts the bytes actually read, not the size an event claims: a
batch whose events all claim 1 byte still holds at most `batch_max_bytes` (plus the downloads
already under way) of compressed audio, because each object is decoded and dropped as it arrives.

Real S3 (moto); the decode step is slowed down so downloads would race ahead if nothing held them.
"""

from __future__ import annotations

import asyncio

import pytest

from pipeline.batch import SourceRef, WorkItem, decode_stage, download_and_decode_stage
from pipeline.events import ObjectEvent
from pipeline.storage import s3_client

pytestmark = pytest.mark.integration


async def test_a_batch_of_lying_sizes_never_holds_more_than_its_byte_budget_of_downloads(
    s3, bucket, settings_factory, speech_corpus
):
    body = speech_corpus[0].path.read_bytes()
    items = []
    for i in range(12):
        key = f"liar/{i}.flac"
        etag = s3.put_object(Bucket=bucket, Key=key, Body=body)["ETag"].strip('"')
        items.append(WorkItem(ObjectEvent(bucket=bucket, key=key, size=1, etag=etag), SourceRef("t", 0, i)))
    st = settings_factory(batch_max_bytes=2 * len(body), download_concurrency=2)
    read, decoded, peak = 0, 0, 0

    async with s3_client(st) as client:
        real_get = client.get_object

        async def get_object(**kw):
            nonlocal read, peak
            resp = await real_get(**kw)
            read += 1
            peak = max(peak, read - decoded)  # read but not yet decoded (and dropped)
            return resp

        client.get_object = get_object

        async def decode(slots):
            nonlocal decoded
            await asyncio.sleep(0.1)  # a slow decoder: downloads would race ahead unheld
            out = decode_stage(slots, st)
            decoded += len(slots)
            return out

        downloaded, audio = await download_and_decode_stage(client, items, st, decode)

    assert [d.ok for d in downloaded] == [True] * 12 and [a.ok for a in audio] == [True] * 12
    assert all(d.value.size == len(body) and d.value.data == b"" for d in downloaded)  # compressed bytes dropped
    # the budget (2 objects) plus the downloads already under way when it filled (concurrency 2)
    assert peak <= 2 + st.download_concurrency, peak
