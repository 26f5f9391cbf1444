"""Stays up, loses nothing: faults that are not about any object are waited out (never dead-lettered,
never committed past), hostile inputs become typed dead letters and the stream goes on, a record
that kills the process is dead-lettered after three deaths, and memory follows the 16 kHz result.

Real broker (Tansu), real S3 (moto; a second moto that checks signatures for the credential
tests), real consumer processes where a process must die or exit. Every test reads back state:
rows, dead letters, committed offsets, exit codes, /readyz and /metrics, peak RSS.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import boto3
import numpy as np
import orjson
import pytest
import soundfile as sf
from pydantic import SecretStr

from consumer.cli import pipeline_errors
from pipeline.errors import DeviceFault
from pipeline.events import ObjectEvent
from metavoice.local_services import MOTO_CREDENTIALS, MOTO_REGION, ManagedProcess, free_port
from tests.conftest import consume_until_idle, read_topic
from tests.consumer_process import (
    ConsumerProcess,
    assert_exactly_once,
    committed_offsets,
    create_topics,
    fake_models,
    logs_on_failure,
    output_rows,
    partition_ends,
    publish,
    upload_copies,
    versions,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cheap_models():
    m = fake_models()
    yield m
    m.close()


def dead_letters(st, expected: int) -> list[dict]:
    return [orjson.loads(r.value) for r in read_topic(st, st.dlq_topic, expected, timeout=10 if expected else 2)]


def assert_all_committed(st, published: int) -> None:
    ends = partition_ends(st, expected=published)
    assert sum(ends.values()) == published
    assert committed_offsets(st) == {p: (end or None) for p, end in ends.items()}


# --- account-wide faults -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def signing_s3(tmp_path_factory):
    """A second moto that checks signatures (after 4 unauthenticated calls: the IAM set-up), with a
    user whose key may do anything. Yields (endpoint, access key id, secret)."""
    port = free_port()
    exe = shutil.which("moto_server") or "moto_server"
    proc = ManagedProcess([exe, "-H", "127.0.0.1", "-p", str(port)], port, tmp_path_factory.mktemp("moto-auth") / "moto.log",
                          env={**os.environ, **MOTO_CREDENTIALS, "INITIAL_NO_AUTH_ACTION_COUNT": "4"}).start()
    url = f"http://127.0.0.1:{port}"
    iam = boto3.client("iam", endpoint_url=url, region_name=MOTO_REGION, aws_access_key_id="x", aws_secret_access_key="y")
    iam.create_user(UserName="stream")
    key = iam.create_access_key(UserName="stream")["AccessKey"]
    policy = iam.create_policy(PolicyName="all", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
    iam.attach_user_policy(UserName="stream", PolicyArn=policy["Policy"]["Arn"])
    try:
        yield url, key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        proc.stop()


def http_get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.mark.slow
def test_a_rotated_s3_secret_dead_letters_nothing_commits_nothing_and_a_fixed_key_finishes_the_stream(
    services, signing_s3, settings_factory, speech_corpus, cheap_models, tmp_path, unique
):
    url, key_id, secret = signing_s3
    admin = boto3.client("s3", endpoint_url=url, region_name=MOTO_REGION, aws_access_key_id=key_id, aws_secret_access_key=secret)
    bucket = f"signed-{unique}"
    admin.create_bucket(Bucket=bucket)
    st = settings_factory(s3_endpoint_url=url, bucket=bucket, exit_when_idle=2.0, fault_timeout_s=12.0)
    events = upload_copies(admin, bucket, [c.path for c in speech_corpus[:3]], 4)
    create_topics(st)
    publish(st, events)

    port = free_port()
    rotated = ConsumerProcess(services, st, tmp_path / "rotated.log", METAVOICE_S3_ACCESS_KEY_ID=key_id,
                              METAVOICE_S3_SECRET_ACCESS_KEY="the-old-secret", METAVOICE_METRICS_PORT=str(port)).start()
    try:
        with logs_on_failure(rotated):
            deadline, ready, metrics = time.monotonic() + 60, None, b""
            while time.monotonic() < deadline and rotated.proc.poll() is None:
                status, body = http_get(f"http://127.0.0.1:{port}/readyz") if _listening(port) else (0, b"")
                if status == 503 and b"StorageAccessDenied" in body:
                    ready = orjson.loads(body)
                    metrics = http_get(f"http://127.0.0.1:{port}/metrics")[1]
                    break
                time.sleep(0.3)
            assert ready is not None, "/readyz never reported the credential fault"
            assert ready["checks"]["environment"]["ok"] is False
            assert b'metavoice_environment_faults_total{kind="storage_access"}' in metrics
            rc = rotated.wait(timeout=60)
            assert rc == 1, "past fault_timeout_s the consumer must exit non-zero"
    finally:
        rotated.kill()
    assert committed_offsets(st) == {p: None for p in range(st.topic_partitions)}
    assert dead_letters(st, 0) == []
    assert output_rows(st.output_dir) == []

    # The key is fixed: every event is processed, none was lost to the fault.
    consume_until_idle(st.model_copy(update={"s3_access_key_id": SecretStr(key_id), "s3_secret_access_key": SecretStr(secret)}),
                       cheap_models)
    assert_exactly_once(st.output_dir, versions(events))
    assert dead_letters(st, 0) == []
    assert_all_committed(st, 4)


def signing_user(url: str, admin_key: tuple[str, str], name: str, deny: list[dict]) -> tuple[str, str, str]:
    """A user of the signing moto allowed everything except the `deny` statements (moto enforces
    identity policies per action and resource, `bucket/key` for object calls; it ignores bucket
    policies). Returns (access key id, secret, the deny policy's ARN)."""
    iam = boto3.client("iam", endpoint_url=url, region_name=MOTO_REGION, aws_access_key_id=admin_key[0],
                       aws_secret_access_key=admin_key[1])
    iam.create_user(UserName=name)
    key = iam.create_access_key(UserName=name)["AccessKey"]
    allow = iam.create_policy(PolicyName=f"{name}-allow", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
    denied = iam.create_policy(PolicyName=f"{name}-deny", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": deny}))
    for arn in (allow["Policy"]["Arn"], denied["Policy"]["Arn"]):
        iam.attach_user_policy(UserName=name, PolicyArn=arn)
    return key["AccessKeyId"], key["SecretAccessKey"], denied["Policy"]["Arn"]


def signed_stream(signing_s3, settings_factory, speech_corpus, unique, count: int, **overrides):
    """A bucket on the signing moto holding `count` clips plus `forbidden/secret.flac`, every event
    published (the forbidden one among them); returns (settings, good events, forbidden event)."""
    url, key_id, secret = signing_s3
    admin = boto3.client("s3", endpoint_url=url, region_name=MOTO_REGION, aws_access_key_id=key_id, aws_secret_access_key=secret)
    bucket = f"signed-{unique}"
    admin.create_bucket(Bucket=bucket)
    st = settings_factory(s3_endpoint_url=url, bucket=bucket, **overrides)
    good = upload_copies(admin, bucket, [c.path for c in speech_corpus[:3]], count)
    (forbidden,) = upload_copies(admin, bucket, [speech_corpus[0].path], 1, prefix="forbidden/")
    create_topics(st)
    publish(st, good[: count // 2] + [forbidden] + good[count // 2 :])
    return st, good, forbidden


@pytest.mark.slow
def test_one_forbidden_object_is_an_object_forbidden_dead_letter_and_the_stream_goes_on(
    services, signing_s3, settings_factory, speech_corpus, tmp_path, unique
):
    """A deny on one prefix (AWS's 403 for it, as for a KMS key the role cannot use) is about that
    object: the same credentials still read the bucket, so it is one dead letter, not a stopped stream."""
    st, good, forbidden = signed_stream(signing_s3, settings_factory, speech_corpus, unique, 6,
                                        exit_when_idle=None, fault_timeout_s=20.0, roll_max_seconds=1.0)
    key_id, secret, _ = signing_user(signing_s3[0], signing_s3[1:], f"prefix-{unique}", [
        {"Effect": "Deny", "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::{st.bucket}/forbidden/*"}])
    proc = ConsumerProcess(services, st, tmp_path / "consumer.log", METAVOICE_S3_ACCESS_KEY_ID=key_id,
                           METAVOICE_S3_SECRET_ACCESS_KEY=secret).start()
    try:
        with logs_on_failure(proc):
            ends = {p: (e or None) for p, e in partition_ends(st, expected=7).items()}
            deadline = time.monotonic() + 90
            while committed_offsets(st) != ends:
                assert proc.proc.poll() is None, "the consumer stopped"
                assert time.monotonic() < deadline, "the log was never committed to its end"
                time.sleep(0.5)
            assert_exactly_once(st.output_dir, versions(good))
            letters = dead_letters(st, 1)
            assert [(d["object"]["key"], d["error_type"]) for d in letters] == [(forbidden.key, "ObjectForbidden")]
            assert "AccessDenied" in letters[0]["error"]
            assert proc.proc.poll() is None, "the consumer must still be running"
            proc.signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
    assert_all_committed(st, 7)


@pytest.mark.slow
def test_credentials_whose_grant_was_revoked_dead_letter_nothing_and_commit_nothing(
    services, signing_s3, settings_factory, speech_corpus, cheap_models, tmp_path, unique
):
    """AccessDenied on every object and on the bucket too: the account's fault. Waited out with no
    dead letter and no commit; once the grant is back, every event lands exactly once."""
    st, good, forbidden = signed_stream(signing_s3, settings_factory, speech_corpus, unique, 4,
                                        exit_when_idle=2.0, fault_timeout_s=120.0)
    key_id, secret, deny_arn = signing_user(signing_s3[0], signing_s3[1:], f"revoked-{unique}", [
        {"Effect": "Deny", "Action": "s3:*", "Resource": "*"}])
    port = free_port()
    proc = ConsumerProcess(services, st, tmp_path / "consumer.log", METAVOICE_S3_ACCESS_KEY_ID=key_id,
                           METAVOICE_S3_SECRET_ACCESS_KEY=secret, METAVOICE_METRICS_PORT=str(port)).start()
    try:
        with logs_on_failure(proc):
            deadline, metrics = time.monotonic() + 90, b""
            while b'metavoice_environment_faults_total{kind="storage_access"} 2' not in metrics:
                assert proc.proc.poll() is None and time.monotonic() < deadline, "the fault was never waited out"
                metrics = http_get(f"http://127.0.0.1:{port}/metrics")[1] if _listening(port) else b""
                time.sleep(0.3)
            assert committed_offsets(st) == {p: None for p in range(st.topic_partitions)}
            assert dead_letters(st, 0) == []
            assert output_rows(st.output_dir) == []

            # the grant comes back: the batch that was waited out finishes, nothing was lost to the fault
            iam = boto3.client("iam", endpoint_url=signing_s3[0], region_name=MOTO_REGION,
                               aws_access_key_id=signing_s3[1], aws_secret_access_key=signing_s3[2])
            iam.detach_user_policy(UserName=f"revoked-{unique}", PolicyArn=deny_arn)
            assert proc.wait(timeout=120) == 0
    finally:
        proc.kill()
    assert_exactly_once(st.output_dir, versions(good + [forbidden]))
    assert dead_letters(st, 0) == []
    assert_all_committed(st, 5)


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class FlakyDevice:
    """Stands in for a CUDA context that fails every call (`fail_calls` times, or forever)."""

    def __init__(self, models, fail_calls: int | None) -> None:
        self.real, self.left = models.transcriber._transcribe_together, fail_calls
        self.calls = 0

    def __call__(self, clips):
        self.calls += 1
        if self.left is None or self.left > 0:
            if self.left is not None:
                self.left -= 1
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return self.real(clips)


@pytest.mark.slow
def test_a_gpu_that_fails_for_a_while_dead_letters_nothing_and_every_clip_lands_once_it_recovers(
    s3, bucket, settings_factory, speech_corpus, models, monkeypatch
):
    st = settings_factory(exit_when_idle=2.0, fault_timeout_s=120.0)
    events = upload_copies(s3, bucket, [c.path for c in speech_corpus[:2]], 2)
    create_topics(st)
    publish(st, events)
    device = FlakyDevice(models, fail_calls=3)
    monkeypatch.setattr(models.transcriber, "_transcribe_together", device)

    stats = consume_until_idle(st, models)

    assert device.calls > 3 and stats.dead_letters == 0 and stats.rows == 2
    assert_exactly_once(st.output_dir, versions(events))
    assert dead_letters(st, 0) == []
    assert_all_committed(st, 2)


@pytest.mark.slow
def test_a_gpu_that_stays_broken_stops_the_consumer_past_the_fault_timeout_without_a_dead_letter_or_commit(
    s3, bucket, settings_factory, speech_corpus, models, monkeypatch
):
    st = settings_factory(exit_when_idle=2.0, fault_timeout_s=4.0)
    events = upload_copies(s3, bucket, [c.path for c in speech_corpus[:2]], 2)
    create_topics(st)
    publish(st, events)
    monkeypatch.setattr(models.transcriber, "_transcribe_together", FlakyDevice(models, fail_calls=None))

    with pytest.raises(BaseException) as caught:
        consume_until_idle(st, models)

    assert [type(e) for e in pipeline_errors(caught.value)] == [DeviceFault], caught.value
    assert committed_offsets(st) == {p: None for p in range(st.topic_partitions)}
    assert dead_letters(st, 0) == []


# --- poison never stops the stream -------------------------------------------------------------------------------
def test_bad_buckets_and_oversized_messages_become_typed_dead_letters_and_nothing_else_stops(
    s3, bucket, settings_factory, speech_corpus, cheap_models
):
    st = settings_factory(topic_partitions=1, allowed_buckets=f"{bucket},arn:aws:s3:::another-{bucket}")
    valid = upload_copies(s3, bucket, [speech_corpus[0].path], 2)
    fanout = {"Records": [{"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": bucket}, "object": {"key": f"k{i}"}}}
                          for i in range(1001)]}
    create_topics(st)
    publish(st, [valid[0],
                 ObjectEvent(bucket="someone-elses-bucket", key="a.flac"),
                 ObjectEvent(bucket="bad bucket name", key="a.flac"),
                 (b"fanout", orjson.dumps(fanout)),
                 valid[1]])

    stats = consume_until_idle(st, cheap_models)

    assert_exactly_once(st.output_dir, versions(valid))
    letters = sorted((d["object"]["bucket"], d["error_type"]) for d in dead_letters(st, 3))
    assert letters == [("", "MalformedEvent"), ("bad bucket name", "BucketNotAllowed"),
                       ("someone-elses-bucket", "BucketNotAllowed")]
    assert stats.dead_letters == 3
    assert_all_committed(st, 5)


def test_an_invalid_bucket_name_is_a_typed_dead_letter_when_any_bucket_is_allowed(
    s3, bucket, settings_factory, speech_corpus, cheap_models
):
    st = settings_factory(topic_partitions=1)  # no bucket configured: any bucket may be named
    valid = upload_copies(s3, bucket, [speech_corpus[0].path], 1)
    create_topics(st)
    publish(st, [ObjectEvent(bucket="bad bucket name", key="a.flac"), ObjectEvent(bucket=f"gone-{bucket}", key="a.flac"), *valid])

    consume_until_idle(st, cheap_models)

    assert_exactly_once(st.output_dir, versions(valid))
    assert sorted(d["error_type"] for d in dead_letters(st, 2)) == ["InvalidRequest", "ObjectMissing"]
    assert_all_committed(st, 3)


class FailingKeyProxy:
    """An HTTP proxy in front of moto that answers 503 to every GET of one key (its bucket and
    every other key answer normally): one object whose 5xx persists."""

    def __init__(self, target: str, failing_key: str) -> None:
        from aiohttp import ClientSession, web

        self.port, self.target, self.failing = free_port(), target, failing_key
        self.hits = 0

        async def handle(request: web.Request) -> web.Response:
            if request.method == "GET" and request.path.endswith("/" + self.failing):
                self.hits += 1
                return web.Response(status=503, text="<Error><Code>ServiceUnavailable</Code></Error>")
            async with ClientSession() as session:
                async with session.request(request.method, self.target + request.path_qs, headers=request.headers,
                                           data=await request.read(), allow_redirects=False) as r:
                    body = await r.read()
                    headers = {k: v for k, v in r.headers.items() if k.lower() not in ("transfer-encoding", "content-encoding", "content-length")}
                    return web.Response(status=r.status, body=body, headers=headers)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        self._loop = asyncio.new_event_loop()
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        self._loop.run_until_complete(web.TCPSite(self._runner, "127.0.0.1", self.port).start())
        threading.Thread(target=self._loop.run_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)


def test_one_object_whose_5xx_persists_is_dead_lettered_while_its_bucket_answers(
    services, s3, bucket, settings_factory, speech_corpus, cheap_models
):
    valid = upload_copies(s3, bucket, [c.path for c in speech_corpus[:2]], 3)
    proxy = FailingKeyProxy(services.s3_endpoint_url, valid[1].key)
    try:
        st = settings_factory(topic_partitions=1, s3_endpoint_url=proxy.url, s3_retry_attempts=2, batch_max_events=8)
        create_topics(st)
        publish(st, valid)
        stats = consume_until_idle(st, cheap_models)
    finally:
        proxy.close()

    assert proxy.hits >= 2 and stats.rows == 2
    assert_exactly_once(st.output_dir, versions([valid[0], valid[2]]))
    assert [(d["object"]["key"], d["error_type"]) for d in dead_letters(st, 1)] == [(valid[1].key, "ObjectUnavailable")]
    assert_all_committed(st, 3)


# --- the crash-loop breaker ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_record_that_kills_the_process_is_dead_lettered_as_crash_loop_and_its_batch_mates_become_rows(
    services, s3, bucket, settings_factory, speech_corpus, tmp_path
):
    st = settings_factory(topic_partitions=1, batch_max_events=4, exit_when_idle=1.5)
    culprit_path = tmp_path / "culprit.flac"
    sf.write(culprit_path, np.full(33_333, 0.01, np.float32), 16_000, format="FLAC")  # 33 333 samples: the crash
    events = upload_copies(s3, bucket, [c.path for c in speech_corpus[:2]], 3)
    body = culprit_path.read_bytes()
    etag = s3.put_object(Bucket=bucket, Key="culprit.flac", Body=body)["ETag"].strip('"')
    culprit = ObjectEvent(bucket=bucket, key="culprit.flac", size=len(body), etag=etag)
    published = [events[0], culprit, events[1], events[2]]
    create_topics(st)
    publish(st, published)

    codes = []
    for attempt in range(4):
        proc = ConsumerProcess(services, st, tmp_path / f"run{attempt}.log", METAVOICE_TEST_CRASH_ON_SAMPLES="33333").start()
        with logs_on_failure(proc):
            codes.append(proc.wait(timeout=120))
        if codes[-1] == 0:
            break

    # in its batch, then twice alone: three deaths; the fourth start dead-letters it unprocessed
    assert codes == [-signal.SIGKILL] * 3 + [0], codes
    assert_exactly_once(st.output_dir, versions(events))
    assert [(orjson.loads(d["event"])["object"]["key"], d["error_type"]) for d in dead_letters(st, 1)] == \
        [("culprit.flac", "CrashLoop")]
    assert_all_committed(st, 4)


# --- memory follows the 16 kHz result ------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_25_minute_96khz_8_channel_file_is_processed_with_tiny_en_under_3_gb(
    services, s3, bucket, settings_factory, tmp_path
):
    path = tmp_path / "long.flac"
    rate, seconds = 96_000, 25 * 60
    with sf.SoundFile(path, "w", samplerate=rate, channels=8, format="FLAC", subtype="PCM_16") as f:
        t = np.arange(rate * 10) / rate
        block = (0.01 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[:, None].repeat(8, axis=1)
        for _ in range(seconds // 10):
            f.write(block)
    body = path.read_bytes()
    etag = s3.put_object(Bucket=bucket, Key="long.flac", Body=body)["ETag"].strip('"')
    st = settings_factory(topic_partitions=1, max_duration_sec=3600.0, exit_when_idle=2.0)
    create_topics(st)
    publish(st, [ObjectEvent(bucket=bucket, key="long.flac", size=len(body), etag=etag)])

    proc = ConsumerProcess(services, st, tmp_path / "long.log", fake_whisper=False)
    proc.argv = ["/usr/bin/time", "-f", "MAXRSS_KB=%M", *proc.argv] if Path("/usr/bin/time").exists() else proc.argv
    proc.start()
    with logs_on_failure(proc):
        assert proc.wait(timeout=900) == 0
        rss_kb = _peak_rss_kb(proc)
        # 2.5 GB before the analysis models (Silero VAD, Resemblyzer) and the whole-file scores of
        # file mode: measured 2.57 GB with them; the bound still fails a source-sized decode (5.5 GB)
        assert rss_kb < 3.0 * 1024 * 1024, f"peak RSS {rss_kb / 1024:.0f} MB"
    rows = output_rows(st.output_dir)
    assert [r["id"] for r in rows] == ["long.flac"]


def _peak_rss_kb(proc: ConsumerProcess) -> int:
    for line in proc.log().splitlines():
        if line.startswith("MAXRSS_KB="):
            return int(line.split("=", 1)[1])
    # no /usr/bin/time: the largest reaped child of this process (an upper bound for the consumer)
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
