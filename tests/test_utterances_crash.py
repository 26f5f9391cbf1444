"""Kill -9 in utterances mode: every utterance of every object version is in the output exactly once.

A real consumer child (`python -m consumer`, FakeWhisper: the model is beside the point here; real Silero
VAD, speaker encoder, synthetic tokenizer, Tansu broker, moto S3) is killed by a crash point mid-stream;
the restart finishes the stream. Read back: the finalized files' rows, summary.json, committed offsets.
"""

from __future__ import annotations

import signal
import uuid
from collections import Counter, defaultdict

import pytest
import soundfile as sf

from pipeline.output import as_output

from . import speech
from .conftest import consume_until_idle, test_settings
from .consumer_process import (
    ConsumerProcess,
    FakeWhisper,
    assert_summary_matches_files,
    committed_offsets,
    create_topics,
    logs_on_failure,
    partition_ends,
    publish,
    upload_copies,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def utterance_rows(output_dir) -> list[dict]:
    out = as_output(output_dir)
    rows: list[dict] = []
    for name in out.finalized():
        rows.extend(out.read_columns(name, ["bucket", "id", "etag", "utterance", "kafka_offset"]).to_pylist())
    return rows


def test_kill_9_in_utterances_mode_leaves_every_utterance_exactly_once(services, s3, bucket, tmp_path):
    from pipeline.models import Analysis, Models
    from pipeline.tokenizers import load_tokenizer

    arctic = speech.arctic().audio()
    one, three = tmp_path / "one.flac", tmp_path / "three.flac"
    sf.write(one, arctic, speech.SAMPLE_RATE, format="FLAC")
    sf.write(three, speech.concatenate([arctic] * 3, gap_sec=1.0), speech.SAMPLE_RATE, format="FLAC")
    st = test_settings(services, uuid.uuid4().hex[:10], tmp_path / "out", bucket=bucket, segmentation="utterances",
                       dnsmos="off", batch_max_events=2, roll_max_rows=2, pipeline_depth=3, kafka_session_timeout_ms=6000,
                       exit_when_idle=1.0, prefect_enabled=False)
    events = upload_copies(s3, bucket, [three, one], 12)
    want = {(e.bucket, e.key, e.etag): (3 if i % 2 == 0 else 1) for i, e in enumerate(events)}
    create_topics(st)
    publish(st, events)

    child = ConsumerProcess(services, st, tmp_path / "crashed.log", METAVOICE_CRASH_AT="transcribe:5",
                            METAVOICE_SEGMENTATION="utterances", METAVOICE_DNSMOS="off").start()
    child.wait(timeout=300)
    with logs_on_failure(child):
        assert child.proc.returncode == -signal.SIGKILL, "the crash point did not kill the consumer"
        assert utterance_rows(st.output_dir), "the crash came before any file was finalized: move it later"

    models = Models(st, FakeWhisper(st), load_tokenizer(st), Analysis.load(st))
    try:
        consume_until_idle(st, models)  # the restart, without METAVOICE_CRASH_AT
    finally:
        models.close()

    rows = utterance_rows(st.output_dir)
    counts = Counter((r["bucket"], r["id"], r["etag"], r["utterance"]) for r in rows)
    assert max(counts.values()) == 1, {k: n for k, n in counts.items() if n > 1}
    per_version: dict[tuple, list[int]] = defaultdict(list)
    for b, i, e, u in counts:
        per_version[(b, i, e)].append(u)
    assert {v: sorted(us) for v, us in per_version.items()} == {v: list(range(n)) for v, n in want.items()}
    agg = assert_summary_matches_files(st.output_dir)["aggregates"]
    assert agg.files == len(events) and agg.utterances == sum(want.values())
    ends = partition_ends(st, expected=len(events))
    assert committed_offsets(st) == {p: (end or None) for p, end in ends.items()}
