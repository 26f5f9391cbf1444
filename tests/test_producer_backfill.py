"""`python -m producer backfill` against the real S3 server and broker: every page, filters,
checkpoint resume, dry run."""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import math
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import boto3
import orjson
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from pipeline.local_services import MOTO_CREDENTIALS, MOTO_REGION
from producer.backfill import run_backfill
from producer.cli import main
from producer.errors import CheckpointMismatch
from tests.test_producer_support import cli_logging, read_topic  # noqa: F401  (fixture)

pytestmark = pytest.mark.integration

AUDIO = ["audio/a.flac", "audio/my clip+1.flac", "audio/z.flac"]
NOISE = [f"noise/{i:05d}.txt" for i in range(1000)]
NOISE_FLAC = ["noise/zzz-late-1.flac", "noise/zzz-late-2.flac"]  # listed on the second page
LATE = ["zz-late/x.flac", "zz-late/y.flac", "zz-late/z.flac"]  # second page too
FLAC = AUDIO + NOISE_FLAC + LATE
EVERYTHING = AUDIO + ["audio/readme.txt"] + NOISE + NOISE_FLAC + LATE  # 1009 objects


def body_of(key: str) -> bytes:
    return f"not audio: {key}".encode()  # tiny, distinct bytes: sizes and etags differ per key


@pytest.fixture(scope="module")
def big_bucket(services) -> str:
    """1009 objects (two listing pages at 1000 a page), 8 of them .flac, 5 of those on page two."""
    name = f"backfill-{int(time.time() * 1000)}"
    s3 = boto3.client("s3", endpoint_url=services.s3_endpoint_url, region_name=MOTO_REGION,
                      aws_access_key_id=MOTO_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=MOTO_CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
    s3.create_bucket(Bucket=name)
    for key in AUDIO + ["audio/readme.txt"] + NOISE_FLAC + LATE:
        s3.put_object(Bucket=name, Key=key, Body=body_of(key))

    def put_plain(keys: list[str]) -> None:
        # The 1000 filler objects go in over plain keep-alive HTTP: ~25% faster than boto3 here.
        conn = http.client.HTTPConnection("127.0.0.1", services.s3.port)
        for key in keys:
            conn.request("PUT", f"/{name}/{key}", body=body_of(key))
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200, resp.status
        conn.close()

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(put_plain, [NOISE[i::4] for i in range(4)]))
    return name


async def test_backfill_publishes_one_event_per_matching_object_across_all_listing_pages(
    big_bucket, settings_factory, services
):
    settings = settings_factory()
    result = await run_backfill(settings, big_bucket, [], ".flac")

    assert result.listed == len(EVERYTHING) > 1000  # the second page was listed too
    assert result.matched == result.published == len(FLAC)
    assert result.bytes == sum(len(body_of(k)) for k in FLAC)
    records = await read_topic(services.kafka_bootstrap, settings.topic, len(FLAC))
    assert sorted(r["object"]["key"] for r in records) == sorted(FLAC)
    for r in records:
        key = r["object"]["key"]
        assert r["bucket"] == big_bucket and r["action"] == "PutObject"
        assert r["object"]["eTag"] == hashlib.md5(body_of(key)).hexdigest()  # the listing's etag
        assert r["object"]["size"] == len(body_of(key))
        assert r["_key"] == f"{big_bucket}/{key}"


async def test_backfill_takes_repeatable_prefixes_and_an_empty_suffix_selects_every_object(
    big_bucket, settings_factory, services
):
    settings = settings_factory()
    result = await run_backfill(settings, big_bucket, ["audio/", "zz-late/", "audio/"], "")

    wanted = AUDIO + ["audio/readme.txt"] + LATE
    assert result.listed == result.published == len(wanted)  # the repeated prefix is listed once
    records = await read_topic(services.kafka_bootstrap, settings.topic, len(wanted))
    assert sorted(r["object"]["key"] for r in records) == sorted(wanted)


async def test_interrupted_backfill_resumes_from_its_checkpoint_without_republishing_acknowledged_chunks(
    big_bucket, settings_factory, services, tmp_path
):
    settings = settings_factory()
    checkpoint = tmp_path / "backfill.json"
    prefixes = ["audio/", "noise/", "zz-late/"]
    # Two events a second, one event per chunk: slow enough to interrupt after the first prefix.
    first = asyncio.create_task(
        run_backfill(settings, big_bucket, prefixes, ".flac", checkpoint=checkpoint, rate_limit=2, chunk_size=1)
    )
    deadline = time.monotonic() + 15
    while not (checkpoint.exists() and orjson.loads(checkpoint.read_bytes())["prefixes"].get("audio/", {}).get("done")):
        assert time.monotonic() < deadline and not first.done(), "the first prefix never completed"
        await asyncio.sleep(0.02)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first

    saved = orjson.loads(checkpoint.read_bytes())  # a whole JSON document: written atomically
    recorded = sum(p["published"] for p in saved["prefixes"].values())
    assert saved["prefixes"]["audio/"] == {"after": "audio/z.flac", "done": True, "published": len(AUDIO)}
    assert recorded < len(FLAC)

    second = await run_backfill(settings, big_bucket, prefixes, ".flac", checkpoint=checkpoint)
    assert second.published == len(FLAC) - recorded  # nothing the checkpoint holds is sent again
    assert second.already_done == ["audio/"]
    records = await read_topic(services.kafka_bootstrap, settings.topic, len(FLAC))
    assert sorted({r["object"]["key"] for r in records}) == sorted(FLAC)
    # At most the one chunk in flight at the interruption is published twice (etag dedupe absorbs it).
    assert len(FLAC) <= len(records) <= len(FLAC) + 1

    third = await run_backfill(settings, big_bucket, prefixes, ".flac", checkpoint=checkpoint)
    assert third.published == third.listed == 0 and third.already_done == prefixes


async def test_a_checkpoint_is_refused_for_a_run_with_other_filters(big_bucket, settings_factory, tmp_path):
    checkpoint = tmp_path / "backfill.json"
    await run_backfill(settings_factory(), big_bucket, ["zz-late/"], ".flac", checkpoint=checkpoint)
    with pytest.raises(CheckpointMismatch):
        await run_backfill(settings_factory(), big_bucket, ["zz-late/"], "", checkpoint=checkpoint)


async def test_modified_since_and_until_select_objects_by_last_modified(s3, bucket, settings_factory, services):
    old, new = ["old-1.flac", "old-2.flac"], ["new-1.flac", "new-2.flac"]
    for key in old:
        s3.put_object(Bucket=bucket, Key=key, Body=body_of(key))
    # S3 keeps LastModified to the second: start the "new" uploads in a later second.
    boundary = math.floor(time.time()) + 1
    await asyncio.sleep(boundary - time.time() + 0.01)
    for key in new:
        s3.put_object(Bucket=bucket, Key=key, Body=body_of(key))
    since = datetime.fromtimestamp(boundary, timezone.utc)

    settings = settings_factory()
    result = await run_backfill(settings, bucket, [], ".flac", modified_since=since)
    assert (result.listed, result.published) == (4, 2)
    records = await read_topic(services.kafka_bootstrap, settings.topic, 2)
    assert sorted(r["object"]["key"] for r in records) == new

    before = await run_backfill(settings, bucket, [], ".flac", modified_until=since, dry_run=True)
    assert before.matched == 2  # until is exclusive: exactly the old ones


def test_dry_run_prints_the_counts_and_publishes_nothing(big_bucket, services, unique, monkeypatch, capsys,
                                                          cli_logging):
    topic = f"dry-{unique}"
    monkeypatch.setenv("METAVOICE_KAFKA_BOOTSTRAP", services.kafka_bootstrap)
    monkeypatch.setenv("METAVOICE_S3_ENDPOINT_URL", services.s3_endpoint_url)
    monkeypatch.setenv("METAVOICE_S3_REGION", MOTO_REGION)
    monkeypatch.setenv("METAVOICE_TOPIC", topic)

    rc = main(["backfill", "--bucket", big_bucket, "--dry-run", "--start-after", "noise/", "--progress"])

    assert rc == 0
    out = capsys.readouterr()
    # After "noise/": the 1002 noise objects and the 3 late ones; 2 + 3 of them are .flac.
    assert "dry run: 5 of 1005 listed objects match" in out.out
    assert "nothing published" in out.out
    assert "counting" in out.err  # the progress bar went to stderr

    async def topics() -> list[str]:
        admin = AIOKafkaAdminClient(bootstrap_servers=services.kafka_bootstrap)
        await admin.start()
        try:
            return await admin.list_topics()
        finally:
            await admin.close()

    assert topic not in asyncio.run(topics())  # not even created
