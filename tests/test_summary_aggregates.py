"""summary.json from mergeable aggregates: incremental equals recomputed, and survives crashes."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.ledger import OutputLedger, publish_summary
from pipeline.parquet import OffsetRange, RollingParquetWriter
from pipeline.records import to_table
from pipeline.output.layout import SUMMARY_NAME
from pipeline.summary import Aggregates

from .test_parquet_writer import agg, row


# One object version: its utterances (token frames each), the speaker of each, DNSMOS OVRL and SNR per row
_version = st.lists(st.tuples(st.integers(1, 50), st.sampled_from(["S0", "S1", "S2", None]),
                              st.one_of(st.none(), st.floats(1.0, 5.0)), st.one_of(st.none(), st.floats(-5.0, 40.0))),
                    min_size=1, max_size=4)


def utterance_rows(version: int, utterances) -> list:
    """The rows of one object version in utterances mode (utterance 0, 1, ...)."""
    out = []
    for u, (frames, speaker, mos, snr) in enumerate(utterances):
        r = row(version, frames)
        r.utterance, r.speaker, r.dnsmos_ovrl, r.snr_db = u, speaker, mos, snr
        out.append(r)
    return out


@given(st.lists(st.lists(_version, max_size=4), max_size=6))
def test_merging_parts_equals_aggregating_the_whole(parts):
    """Files (parts) hold whole object versions (each version's utterances in one file): merging their
    aggregates equals aggregating every row at once, utterance counts, bins, cut-offs and speakers included."""
    rows, parts_rows, versions = [], [], 0
    for p in parts:  # the same rows, split into files
        part = []
        for utterances in p:
            part += utterance_rows(versions, utterances)
            versions += 1
        rows += part
        parts_rows.append(part)
    merged = Aggregates()
    for part in parts_rows:
        merged.merge(agg(part))
    whole = agg(rows)
    a, b = merged.to_state(), whole.to_state()
    # float sums may differ in the last bits with the order of addition; everything else is exact
    for key in ("total_duration_sec", "scored_seconds"):
        assert a.pop(key) == pytest.approx(b.pop(key))
    for key in ("transcription_lengths", "token_frames", "utterance_durations"):
        assert a[key].pop("total") == pytest.approx(b[key].pop("total"))
    passing_a, passing_b = a.pop("seconds_passing"), b.pop("seconds_passing")
    assert passing_a.keys() == passing_b.keys() and all(passing_a[k] == pytest.approx(passing_b[k]) for k in passing_a)
    assert a == b
    assert whole.files == versions and whole.utterances == len(rows)
    assert sum(b["speakers_per_file"].values()) == sum(any(r[1] for r in u) for p in parts for u in p)


def test_summary_counts_utterances_bins_cutoff_hours_and_speakers_per_file():
    rows = utterance_rows(0, [(75 * 2, "S0", 3.5, 20.0), (75 * 4, "S1", 2.5, 20.0), (75 * 12, "S0", 3.2, 10.0)])
    rows += utterance_rows(1, [(75 * 6, "S0", None, None)])
    doc = agg(rows).report([])
    assert doc["total_files"] == 2 and doc["total_utterances"] == 4
    assert doc["utterance_durations"]["bins"] == {"2-3": 1, "3-5": 1, "5-10": 1, "10-15": 1}
    hours = doc["hours_above_cutoffs"]
    assert hours["scored_hours"] == pytest.approx(18 / 3600, abs=1e-4)
    assert hours["dnsmos_ovrl>=3.0"] == pytest.approx(14 / 3600, abs=1e-4)
    assert hours["snr_db>=15"] == pytest.approx(6 / 3600, abs=1e-4)
    assert hours["dnsmos_ovrl>=3.0 and snr_db>=15"] == pytest.approx(2 / 3600, abs=1e-4)
    assert doc["speakers_per_file"] == {"1": 1, "2": 1}


def write_file(tmp_path, first: int, n: int, group: str = "metavoice-consumer", rowless=None, named_versions=True):
    """A file of `n` rows from partition t[0] at `first`, finalized and committed to the table;
    `rowless` = (errors by type, skipped, duplicates) counted in the same micro-batch.
    `named_versions=False`: the commit does not name its object versions (a 0.1 output's migrate)."""
    w = RollingParquetWriter(tmp_path, roll_max_rows=100, roll_max_seconds=60)
    rows = [row(first + i) for i in range(n)]
    a = agg(rows)
    if rowless is not None:
        errors, a.skipped, a.duplicates = rowless
        a.errors.update(errors)
    w.append(to_table(rows), [OffsetRange("t", 0, first, first + n - 1)], a)
    out = w.finalize()
    w.close()
    if not named_versions:
        out.versions = None
    OutputLedger(tmp_path, group=group).commit_file(out)
    return out



def delete_footer(tmp_path, offset: int):
    """The finalized file of a micro-batch holding only a delete event at t[0] `offset` (no row)."""
    w = RollingParquetWriter(tmp_path, roll_max_rows=100, roll_max_seconds=60)
    w.append(to_table([]), [OffsetRange("t", 0, offset, offset)], Aggregates(delete_events=1))
    footer = w.finalize()
    w.close()
    return footer


def commit_delete(tmp_path, key: str, offset: int, version_id: str | None = None) -> OutputLedger:
    """A delete of b/`key` at t[0] `offset` committed as the committer does; returns its ledger."""
    from pipeline.ledger import ObjectDelete

    footer = delete_footer(tmp_path, offset)
    ledger = OutputLedger(tmp_path)
    ledger.refresh()
    ledger.commit_file(footer, [ObjectDelete("b", key, "t", 0, offset, version_id=version_id)])
    return ledger

def test_summary_is_brought_up_to_date_with_files_it_missed(tmp_path):
    write_file(tmp_path, 0, 2)
    publish_summary(tmp_path)
    write_file(tmp_path, 2, 3)  # a crash between the rename and the summary write
    doc = publish_summary(tmp_path)
    assert doc["total_files"] == 5 and doc["parquet_files"] == 2


def test_corrupt_summary_is_rebuilt_from_the_table_log(tmp_path):
    write_file(tmp_path, 0, 2)
    write_file(tmp_path, 2, 1)
    (tmp_path / SUMMARY_NAME).write_text("{ half written")
    doc = publish_summary(tmp_path)
    assert doc["total_files"] == 3
    assert orjson.loads((tmp_path / SUMMARY_NAME).read_bytes())["total_files"] == 3


def test_summary_keeps_the_seed_keys(tmp_path):
    write_file(tmp_path, 0, 2)
    doc = publish_summary(tmp_path)
    for key in ("total_files", "total_duration_sec", "average_duration_sec", "sampling_rate_distribution",
                "transcription_lengths", "token_counts", "errors", "skipped", "languages", "parquet_files", "updated_at"):
        assert key in doc
    assert set(doc["transcription_lengths"]) == {"min", "max", "avg"}
    assert set(doc["token_counts"]) == {"min", "max", "avg"}
    assert doc["errors"] == {"total": 0, "by_type": {}}
