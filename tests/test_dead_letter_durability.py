"""Every input ends as exactly one row or one dead letter, durable together (issue 19 item 4).

A dead letter travels in the table commit that covers its offset and is sent once that commit
is durable, before the broker's commit. The crash windows of that order are each killed with -9
in a real child consumer (Tansu + moto), then a restart finishes; the dead-letter topic is read back:
    before_finalize     rows and dead letters applied, file not durable: both are decided again
    after_rename        file uploaded, not in the table: both are decided again
    after_table_commit  rows in the table, dead letters not sent: the restart sends them (from the commit)
    after_dead_letters  dead letters sent, offsets not committed: the restart sends none again
"""

from __future__ import annotations

import signal
import uuid
from collections import Counter

import boto3
import orjson
import pytest

from metavoice.local_services import MOTO_CREDENTIALS, MOTO_REGION
from tests.conftest import consume_until_idle, read_topic, test_settings
from tests.consumer_process import (
    ConsumerProcess,
    assert_exactly_once,
    assert_summary_matches_files,
    committed_offsets,
    create_topics,
    fake_models,
    logs_on_failure,
    partition_ends,
    publish,
    upload_copies,
    versions,
)
from tests.output_files import finalized_files

pytestmark = [pytest.mark.integration, pytest.mark.slow]

POISON = [(f"poison-{i}".encode(), b"{not json " + str(i).encode()) for i in range(3)]


@pytest.fixture(scope="module")
def models():
    m = fake_models()
    yield m
    m.close()


@pytest.fixture(scope="module")
def s3_admin(services):
    return boto3.client("s3", endpoint_url=services.s3_endpoint_url, region_name=MOTO_REGION,
                        aws_access_key_id=MOTO_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=MOTO_CREDENTIALS["AWS_SECRET_ACCESS_KEY"])


@pytest.mark.parametrize("point", ["before_finalize", "after_rename", "after_table_commit", "after_dead_letters"])
def test_kill_9_around_a_files_dead_letters_leaves_each_bad_input_one_dead_letter_and_each_good_one_row(
        point, services, s3_admin, tmp_path, speech_corpus, models):
    unique = uuid.uuid4().hex[:10]
    # one file for the whole stream, finalized at the idle exit: the crash lands in that finalize
    st = test_settings(services, unique, tmp_path / "out", batch_max_events=4, roll_max_rows=100,
                       kafka_session_timeout_ms=6000, exit_when_idle=1.0)
    bucket = f"bucket-{unique}"
    s3_admin.create_bucket(Bucket=bucket)
    events = upload_copies(s3_admin, bucket, [c.path for c in speech_corpus[:2]], 4)
    create_topics(st)
    publish(st, [events[0], POISON[0], events[1], POISON[1], events[2], events[3], POISON[2]])

    child = ConsumerProcess(services, st, tmp_path / "crashed.log", METAVOICE_CRASH_AT=f"{point}:1").start()
    child.wait(timeout=120)
    with logs_on_failure(child):
        assert child.proc.returncode == -signal.SIGKILL, "the crash point did not kill the consumer"
    durable = bool(finalized_files(st.output_dir))
    assert durable == (point in ("after_table_commit", "after_dead_letters"))

    consume_until_idle(st, models)  # the restart, without METAVOICE_CRASH_AT

    letters = read_topic(st, st.dlq_topic, expected=len(POISON) + 1, timeout=8)
    inputs = Counter(orjson.loads(m.value)["event"] for m in letters)
    assert inputs == Counter(v.decode() for _, v in POISON), f"dead letters: {dict(inputs)}"
    assert_exactly_once(st.output_dir, versions(events))
    assert sum(assert_summary_matches_files(st.output_dir)["aggregates"].errors.values()) == len(POISON)
    ends = partition_ends(st, expected=7)
    assert committed_offsets(st) == {p: (end or None) for p, end in ends.items()}
