"""--exit-when-idle stops when the stream is read to its end and quiet, never in a quiet spell while
records wait (a fetch loop starved of CPU under load: the restart of a crash test lost events so)."""

from __future__ import annotations

import pytest

from tests.conftest import consume_until_idle
from tests.consumer_process import assert_exactly_once, create_topics, fake_models, publish, upload_copies, versions


@pytest.fixture(scope="module")
def models():
    m = fake_models()
    yield m
    m.close()


@pytest.mark.integration
def test_a_quiet_spell_while_records_wait_does_not_end_the_run(
    s3, bucket, settings_factory, speech_corpus, models, monkeypatch
):
    st = settings_factory(exit_when_idle=1.0, batch_max_events=2, batch_max_events_backlog=2)
    events = upload_copies(s3, bucket, [speech_corpus[0].path], 8)
    create_topics(st)
    publish(st, events)
    monkeypatch.setenv("METAVOICE_DELAY_AT", "fetch:1.5")  # each fetch waits longer than the idle time

    consume_until_idle(st, models)

    assert_exactly_once(st.output_dir, versions(events))
