"""Limits the user sets hold: an explicit batch size bounds every micro-batch (the backlog size too,
unless that is set as well), a file never holds more than roll_max_rows rows, a batch split across
files leaves footers with exactly each file's offsets, and the batch log line counts a row already
written as a duplicate.

The scenario of issue 22 runs on the real broker (Tansu) and S3 (moto) with the consumer CLI's own
settings path (`--batch-max-events 3 --roll-max-rows 3` over METAVOICE_* variables); Whisper is
`FakeWhisper`. It reads back every file's row count and footer offsets, the committed offsets, the
summary and the run's returned counts.
"""

from __future__ import annotations

import logging

import pytest

from consumer.batcher import Batcher
from consumer.cli import build_parser
from pipeline.cli_support import settings_from
from pipeline.config import Settings
from pipeline.ledger import OutputLedger, load_summary
from pipeline.output import as_output
from tests.conftest import consume_until_idle
from tests.consumer_process import (
    assert_exactly_once,
    assert_offsets_contiguous,
    assert_summary_matches_files,
    committed_offsets,
    create_topics,
    fake_models,
    partition_ends,
    publish,
    settings_env,
    upload_copies,
    versions,
)
from tests.test_ledger_and_batcher import r2, record


# --- an explicit batch size is a bound -----------------------------------------------------------
def test_an_explicit_batch_size_also_caps_the_backlog_size(monkeypatch):
    for k in ("METAVOICE_BATCH_MAX_EVENTS", "METAVOICE_BATCH_MAX_EVENTS_BACKLOG"):
        monkeypatch.delenv(k, raising=False)
    assert (Settings().batch_max_events, Settings().batch_max_events_backlog) == (32, 256)  # defaults: adaptive
    assert Settings(batch_max_events=3).batch_max_events_backlog == 3
    parser = build_parser()
    from_flags = settings_from(parser.parse_args(["--batch-max-events", "3"]), parser)
    assert (from_flags.batch_max_events, from_flags.batch_max_events_backlog) == (3, 3)
    assert from_flags.with_overrides(batch_max_events=5).batch_max_events_backlog == 5  # derived again, not kept
    monkeypatch.setenv("METAVOICE_BATCH_MAX_EVENTS", "4")
    assert Settings().batch_max_events_backlog == 4


def test_a_backlog_size_set_explicitly_is_kept(monkeypatch):
    monkeypatch.setenv("METAVOICE_BATCH_MAX_EVENTS_BACKLOG", "64")
    parser = build_parser()
    st = settings_from(parser.parse_args(["--batch-max-events", "3"]), parser)
    assert (st.batch_max_events, st.batch_max_events_backlog) == (3, 64)
    assert Settings(batch_max_events=3, batch_max_events_backlog=9).with_overrides(group="g").batch_max_events_backlog == 9


def test_under_a_backlog_an_explicit_batch_size_still_closes_the_batch(tmp_path):
    st = Settings(batch_max_events=3)
    b = Batcher(OutputLedger(tmp_path), st.batch_max_events, st.batch_max_bytes, st.batch_linger_ms,
                backlog_max_events=st.batch_max_events_backlog)
    b.backlog = True
    for i in range(3):
        b.add(record(i, r2(f"k{i}.flac", etag=f"e{i}")))
    assert b.full() and len(b.take().items) == 3


# --- issue 22's scenario on the real broker --------------------------------------------------------
@pytest.fixture(scope="module")
def fake():
    m = fake_models()
    yield m
    m.close()


class BatchLines(logging.Handler):
    """Keeps the structured fields of the consumer's per-batch log lines."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.fields: list[dict] = []

    def emit(self, rec: logging.LogRecord) -> None:
        f = getattr(rec, "fields", None)
        if isinstance(f, dict) and "batch" in f:
            self.fields.append(f)


@pytest.mark.integration
def test_batch_max_events_3_and_roll_max_rows_3_hold_on_a_40_event_backlog_with_exact_footers(
    s3, bucket, settings_factory, speech_corpus, fake, monkeypatch
):
    base = settings_factory(topic_partitions=1)  # one partition: the batches' composition is the log's order
    # the consumer CLI's settings path: METAVOICE_* for the services, the two limits as flags
    for k, v in settings_env(base).items():
        if k not in ("METAVOICE_BATCH_MAX_EVENTS", "METAVOICE_BATCH_MAX_EVENTS_BACKLOG", "METAVOICE_ROLL_MAX_ROWS"):
            monkeypatch.setenv(k, v)
    parser = build_parser()
    st = settings_from(parser.parse_args(["--batch-max-events", "3", "--roll-max-rows", "3"]), parser)

    events = upload_copies(s3, bucket, [c.path for c in speech_corpus[:3]], 20)
    create_topics(st)
    # 40 records, 20 versions: x, a0, a0, a1, a1, ..., a18, a18, x. Batches of 3 objects then hold 2 new
    # versions each, not a multiple of 3: the second batch must be split across two files.
    x, pairs = events[0], events[1:]
    publish(st, [x, *[e for e in pairs for _ in range(2)], x])
    handler, app_log = BatchLines(), logging.getLogger("consumer.app")
    monkeypatch.setattr(app_log, "level", logging.INFO)
    app_log.addHandler(handler)
    try:
        stats = consume_until_idle(st, fake)
    finally:
        app_log.removeHandler(handler)
    lines = handler.fields

    # every micro-batch within 3 objects (a duplicate the batcher recognises costs nothing)
    assert stats.records == sum(f["records"] for f in lines) == 40
    assert max(f["objects"] for f in lines) <= 3 and stats.batches >= 13
    # every file within 3 rows, and each full but the last
    out = as_output(st.output_dir)
    footers = [out.read_footer(n) for n in out.finalized()]
    assert [f.rows for f in footers] == [3] * 6 + [2], [f.rows for f in footers]
    # footers: each file's rows inside its own ranges, all ranges together the whole log once
    for f in footers:
        for x in out.read_columns(f.name, ["kafka_partition", "kafka_offset"]).to_pylist():
            assert any(r.partition == x["kafka_partition"] and r.first <= x["kafka_offset"] <= r.last for r in f.offsets), \
                f"{f.name}: row at {x} outside its footer {f.offsets}"
    ends = partition_ends(st, expected=40)
    assert sum(ends.values()) == 40
    assert_offsets_contiguous(st.output_dir, ends)
    assert committed_offsets(st) == {p: (end or None) for p, end in ends.items()}
    assert_exactly_once(st.output_dir, versions(events))
    # duplicates are counted as duplicates: in the returned counts, the summary and each batch line
    assert (stats.rows, stats.duplicates) == (20, 20)
    summary = load_summary(st.output_dir).aggregates
    assert summary.duplicates == 20
    assert_summary_matches_files(st.output_dir)
    assert (sum(f["rows"] for f in lines), sum(f["duplicates"] for f in lines)) == (20, 20)
