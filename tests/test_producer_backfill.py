"""`python -m producer backfill` against the real S3 server and broker: every page, filters,
checkpoint resume, dry run."""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import math
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import boto3
import orjson
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from botocore.exceptions import EndpointConnectionError

from pipeline.errors import BucketMissing, StorageOutage
from metavoice.local_services import MOTO_CREDENTIALS, MOTO_REGION
from pipeline.storage import list_objects
from producer.backfill import first_page_keys, run_backfill
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


async def test_a_backfill_sends_its_first_events_after_one_short_listing_page_then_lists_the_rest(
    big_bucket, settings_factory, services, monkeypatch
):
    """Consumers get their first micro-batch after one short request, not after a full 1000-key page
    is listed and parsed (~0.5 s): the first event is sent when one micro-batch of keys
    (`batch_max_events`) has been listed; every page is still listed and every .flac published once."""
    import pipeline.storage as storage
    import producer.kafka as kafka

    listed: list[int] = []  # keys returned by each listing request, in order
    at_first_send: list[int] = []
    real_list_page, real_send = storage.list_page, kafka.EventPublisher.send

    async def list_page(client, request, attempts=8):  # type: ignore[no-untyped-def]
        page = await real_list_page(client, request, attempts)
        listed.append(len(page.get("Contents", [])))
        return page

    async def send(self, event):  # type: ignore[no-untyped-def]
        if not at_first_send:
            at_first_send.append(sum(listed[1:]))  # listed[0] is the one-key bucket check
        return await real_send(self, event)

    monkeypatch.setattr(storage, "list_page", list_page)
    monkeypatch.setattr(kafka.EventPublisher, "send", send)
    settings = settings_factory()
    result = await run_backfill(settings, big_bucket, [], ".flac")

    assert settings.batch_max_events < 1000
    assert at_first_send == [first_page_keys(settings)] == [settings.batch_max_events]  # AUDIO sorts first
    assert sum(listed[1:]) == result.listed == len(EVERYTHING)
    records = await read_topic(services.kafka_bootstrap, settings.topic, len(FLAC))
    assert sorted(r["object"]["key"] for r in records) == sorted(FLAC)


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


# --- storage failures: typed, retried like downloads, one line --------------------------------
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_cli(args: list[str], **env: str) -> subprocess.CompletedProcess:
    """`python -m producer ...` as an operator runs it: its own process, its own stderr."""
    environ = {**os.environ, **{f"METAVOICE_{k}": v for k, v in env.items()}}
    return subprocess.run([sys.executable, "-m", "producer", *args], cwd=ROOT, env=environ,
                          capture_output=True, text=True, timeout=120)


async def list_topics(bootstrap: str) -> list[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return await admin.list_topics()
    finally:
        await admin.close()


def test_a_backfill_of_a_missing_bucket_prints_one_line_and_exits_non_zero_before_any_topic_is_made(
    services, unique
):
    missing, topic = f"missing-{unique}", f"missing-{unique}"
    done = run_cli(["backfill", "--bucket", missing], KAFKA_BOOTSTRAP=services.kafka_bootstrap,
                   S3_ENDPOINT_URL=services.s3_endpoint_url, S3_REGION=MOTO_REGION, TOPIC=topic)

    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ") and lines[0].endswith(  # whatever the CLI puts between
        f"bucket '{missing}' does not exist at {services.s3_endpoint_url}"
    ), done.stderr
    assert done.stdout == ""
    assert topic not in asyncio.run(list_topics(services.kafka_bootstrap))  # nothing was made for it


def test_an_unreachable_s3_endpoint_is_retried_as_set_then_fails_in_one_line(services, unique):
    endpoint = f"http://127.0.0.1:{closed_port()}"
    t0 = time.monotonic()
    done = run_cli(["backfill", "--bucket", f"b-{unique}"], KAFKA_BOOTSTRAP=services.kafka_bootstrap,
                   S3_ENDPOINT_URL=endpoint, S3_REGION=MOTO_REGION, TOPIC=f"unreachable-{unique}",
                   S3_RETRY_ATTEMPTS="3")
    elapsed = time.monotonic() - t0

    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    retries = [line for line in lines if "retrying (attempt" in line]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(retries) == 2 and lines[:2] == retries  # attempts 1 and 2 were retried; the 3rd failed
    assert len(errors) == 1 and lines[-1] == errors[0] and len(lines) == 3, done.stderr
    assert f"S3 at {endpoint} did not answer listing bucket 'b-{unique}' (3 attempts" in errors[0]
    assert "EndpointConnectionError" in errors[0]
    assert elapsed < 60


async def test_a_missing_bucket_is_a_typed_error_in_a_dry_run_too(settings_factory, unique):
    with pytest.raises(BucketMissing, match=f"bucket 'nope-{unique}' does not exist at http://"):
        await run_backfill(settings_factory(), f"nope-{unique}", [], ".flac", dry_run=True)


class FlakyListing:
    """An S3 client whose ListObjectsV2 refuses connections `failures` times, then answers pages."""

    class meta:
        endpoint_url = "http://flaky.invalid:9000"

    def __init__(self, failures: int) -> None:
        self.failures, self.calls = failures, []

    async def list_objects_v2(self, **request):
        self.calls.append(request)
        if self.failures:
            self.failures -= 1
            raise EndpointConnectionError(endpoint_url=self.meta.endpoint_url)
        modified = datetime(2026, 1, 1, tzinfo=timezone.utc)
        if "ContinuationToken" not in request:
            return {"Contents": [{"Key": "a.flac", "Size": 1, "ETag": '"e1"', "LastModified": modified}],
                    "IsTruncated": True, "NextContinuationToken": "page-2"}
        return {"Contents": [{"Key": "b.flac", "Size": 2, "ETag": '"e2"', "LastModified": modified}],
                "IsTruncated": False}


async def test_a_listing_page_is_retried_with_the_attempts_it_is_given_and_pagination_goes_on():
    client = FlakyListing(failures=2)
    listed = [o.key async for o in list_objects(client, "b", "", None, attempts=3)]
    assert listed == ["a.flac", "b.flac"]
    assert len(client.calls) == 4 and client.calls[-1]["ContinuationToken"] == "page-2"

    client = FlakyListing(failures=3)
    with pytest.raises(StorageOutage, match=r"S3 at http://flaky.invalid:9000 did not answer listing bucket 'b' \(3 attempts"):
        [o async for o in list_objects(client, "b", "", None, attempts=3)]
    assert len(client.calls) == 3

