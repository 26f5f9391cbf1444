"""`summary.json`: dataset statistics from mergeable aggregates.

Each table commit of a file carries the aggregates of what its epoch handled (rows, errors,
skips) in its metadata (pipeline/output/table.py). `summary.json` is the merge of the aggregates
of every commit up to the table version it records (`_state.table_version`), so it is updated
incrementally (merge the commits since) and rebuilt from the log alone, without re-reading any row
data or listing any file. Several consumers may share one output: updates re-read, merge the
commits since, and replace the document in one compare-and-swap (pipeline/ledger.py
`publish_summary`, pipeline/output/).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable, NamedTuple

import orjson

from .records import TranscribedAudio


@dataclass
class MinMaxSum:
    count: int = 0
    total: float = 0.0
    min: float | None = None
    max: float | None = None

    def add(self, v: float) -> None:
        self.count += 1
        self.total += v
        self.min = v if self.min is None else min(self.min, v)
        self.max = v if self.max is None else max(self.max, v)

    def merge(self, o: "MinMaxSum") -> None:
        if o.count == 0:
            return
        self.count += o.count
        self.total += o.total
        self.min = o.min if self.min is None else min(self.min, o.min)  # type: ignore[type-var]
        self.max = o.max if self.max is None else max(self.max, o.max)  # type: ignore[type-var]

    def subtract(self, o: "MinMaxSum") -> bool:
        """Take rows `o` back out (a delete). Count and total subtract; min and max cannot: True when
        `o` held an extreme, so the caller must recompute them from the rows left (`recompute`)."""
        if o.count == 0:
            return False
        self.count -= o.count
        self.total -= o.total
        if self.count <= 0:
            self.count, self.total, self.min, self.max = 0, 0.0, None, None
            return False
        return (self.min is None or o.min <= self.min) or (self.max is None or o.max >= self.max)  # type: ignore[operator]

    def report(self) -> dict[str, float | None]:
        return {
            "min": self.min,
            "max": self.max,
            "avg": round(self.total / self.count, 3) if self.count else None,
        }


# Utterance lengths are counted in these bins (upper edges in seconds; the last bin is everything longer).
DURATION_BINS = (1.0, 2.0, 3.0, 5.0, 10.0, 15.0, 20.0, 30.0)
# Common selection cut-offs: summary.json says how many hours of rows pass each (and `metavoice report`
# draws hours kept against the cut-off). Rows without the score pass none.
DNSMOS_CUTOFF = 3.0
SNR_CUTOFF_DB = 15.0
CUTOFFS = (f"dnsmos_ovrl>={DNSMOS_CUTOFF}", f"snr_db>={SNR_CUTOFF_DB:g}", f"dnsmos_ovrl>={DNSMOS_CUTOFF} and snr_db>={SNR_CUTOFF_DB:g}")
# The columns `add_columns` reads (a rebuild from row data; older files may lack the later ones).
ROW_COLUMNS = ("duration_sec", "sampling_rate", "language", "transcription", "tokens", "bucket", "id", "etag",
               "utterance", "speaker", "dnsmos_ovrl", "snr_db")


def duration_bin(seconds: float) -> str:
    """The label of the bin `seconds` falls in: `<1`, `1-2`, ..., `20-30`, `>30` (upper edge exclusive)."""
    lower = 0.0
    for edge in DURATION_BINS:
        if seconds < edge:
            return f"<{edge:g}" if lower == 0 else f"{lower:g}-{edge:g}"
        lower = edge
    return f">={DURATION_BINS[-1]:g}"


def passed_cutoffs(dnsmos_ovrl: float | None, snr_db: float | None) -> list[str]:
    good_mos = dnsmos_ovrl is not None and dnsmos_ovrl >= DNSMOS_CUTOFF
    good_snr = snr_db is not None and snr_db >= SNR_CUTOFF_DB
    return [name for name, ok in zip(CUTOFFS, (good_mos, good_snr, good_mos and good_snr)) if ok]


@dataclass
class Aggregates:
    """Everything summary.json says, in a form where merge(a, b) == aggregate(a ∪ b)."""

    files: int = 0
    total_duration_sec: float = 0.0
    sampling_rates: Counter = field(default_factory=Counter)
    languages: Counter = field(default_factory=Counter)
    transcription_lengths: MinMaxSum = field(default_factory=MinMaxSum)
    token_frames: MinMaxSum = field(default_factory=MinMaxSum)
    errors: Counter = field(default_factory=Counter)
    skipped: int = 0
    duplicates: int = 0
    superseded: int = 0  # events whose object was overwritten before it was read: no row, no dead letter
    delete_events: int = 0  # delete notifications handled (one each, whether or not it matched a row)
    deleted: int = 0  # rows a delete took out of the table (every utterance of each object version)
    # rows written without a transcript (transcription off); files written before this existed had none
    untranscribed: int = 0
    # Rows: one per object version (segmentation=file) or per utterance; None in a state written before
    # utterances existed, where every row was a file (see `from_state`).
    utterances: int = 0
    utterance_durations: MinMaxSum = field(default_factory=MinMaxSum)
    duration_bins: Counter = field(default_factory=Counter)  # `duration_bin` label -> rows
    seconds_passing: Counter = field(default_factory=Counter)  # `CUTOFFS` name -> seconds of rows passing
    scored_seconds: float = 0.0  # seconds of rows that carry a DNSMOS or SNR score
    speakers_per_file: Counter = field(default_factory=Counter)  # str(distinct speakers) -> object versions
    # speakers of the object versions added row by row, folded into `speakers_per_file` on the way out:
    # an object version's rows are all in one Parquet file (one aggregate), so folding before a merge is exact
    _speakers: dict = field(default_factory=dict, repr=False, compare=False)

    def add_row(self, row: TranscribedAudio) -> None:
        self.add_values(row.duration_sec, row.sampling_rate, row.transcription, row.language, row.token_frames,
                        (row.bucket, row.id, row.etag), row.utterance, row.speaker, row.dnsmos_ovrl, row.snr_db)

    def add_values(self, duration: float, sampling_rate: int, text: str | None, language: str | None, frames: int,
                   version: tuple[str, str, str], utterance: int | None, speaker: str | None,
                   dnsmos_ovrl: float | None, snr_db: float | None) -> None:
        """One row's statistics (from a record, or from the columns of a file being rebuilt)."""
        if not utterance:  # utterance 0 (or a file written before utterances): one per object version
            self.files += 1
            self.sampling_rates[str(sampling_rate)] += 1
        self.utterances += 1
        self.total_duration_sec += duration
        self.utterance_durations.add(duration)
        self.duration_bins[duration_bin(duration)] += 1
        self.add_transcript(text, language)
        self.token_frames.add(frames)
        if dnsmos_ovrl is not None or snr_db is not None:
            self.scored_seconds += duration
            for name in passed_cutoffs(dnsmos_ovrl, snr_db):
                self.seconds_passing[name] += duration
        if speaker is not None:
            self._speakers.setdefault(version, set()).add(speaker)

    def add_columns(self, table: Any) -> None:
        """Every row of an Arrow table holding (some of) `ROW_COLUMNS`; a missing column reads as null."""
        cols = {n: table.column(n).to_pylist() if n in table.column_names else [None] * table.num_rows
                for n in ROW_COLUMNS}
        for i in range(table.num_rows):
            toks = cols["tokens"][i]
            self.add_values(cols["duration_sec"][i], cols["sampling_rate"][i], cols["transcription"][i],
                            cols["language"][i], len(toks[0]) if toks else 0,
                            (cols["bucket"][i], cols["id"][i], cols["etag"][i]), cols["utterance"][i],
                            cols["speaker"][i], cols["dnsmos_ovrl"][i], cols["snr_db"][i])

    def _fold_speakers(self) -> Counter:
        for speakers in self._speakers.values():
            self.speakers_per_file[str(len(speakers))] += 1
        self._speakers.clear()
        return self.speakers_per_file

    def add_transcript(self, text: str | None, language: str | None) -> None:
        """One row's transcript, or None when the row was written with transcription off."""
        if text is None:
            self.untranscribed += 1
            return
        if language is not None:
            self.languages[language] += 1
        self.transcription_lengths.add(len(text))

    @property
    def transcription(self) -> str | None:
        """`on` (every row has a transcript), `off` (none has: transcription was off), `mixed`
        (a directory written both ways, with --force), None (no rows yet)."""
        if not self.files:
            return None
        if not self.untranscribed:
            return "on"
        return "off" if self.untranscribed == max(self.utterances, self.files) else "mixed"  # rows

    def add_error(self, error_type: str) -> None:
        self.errors[error_type] += 1

    def merge(self, o: "Aggregates") -> None:
        self.files += o.files
        self.total_duration_sec += o.total_duration_sec
        self.sampling_rates.update(o.sampling_rates)
        self.languages.update(o.languages)
        self.transcription_lengths.merge(o.transcription_lengths)
        self.token_frames.merge(o.token_frames)
        self.merge_rowless(o)
        self.untranscribed += o.untranscribed
        self.utterances += o.utterances
        self.utterance_durations.merge(o.utterance_durations)
        self.duration_bins.update(o.duration_bins)
        self.seconds_passing.update(o.seconds_passing)
        self.scored_seconds += o.scored_seconds
        self._fold_speakers().update(o._fold_speakers())

    def merge_rowless(self, o: "Aggregates") -> None:
        """Only what made no row (dead letters, skips, duplicates, superseded events): a commit's
        metadata is the only record of them, where the rows' figures can be read from the files."""
        self.errors.update(o.errors)
        self.skipped += o.skipped
        self.duplicates += o.duplicates
        self.superseded += o.superseded
        self.delete_events += o.delete_events
        self.deleted += o.deleted

    # the MinMaxSum fields whose extremes a delete may leave stale (`subtract`, `recompute_extremes`)
    EXTREMES = ("transcription_lengths", "token_frames", "utterance_durations")

    def subtract(self, removed: "Aggregates") -> list[str]:
        """Take the rows a delete removed (their aggregates, `removed`) back out and count them as
        `deleted`. Every counter and sum subtracts exactly (an object version's rows all go at once,
        so its speakers count goes with it); a min or max held by a removed row cannot: the names
        of those `EXTREMES` are returned, for the caller to recompute from the live rows."""
        self.files -= removed.files
        self.total_duration_sec -= removed.total_duration_sec
        self.sampling_rates.subtract(removed.sampling_rates)
        self.languages.subtract(removed.languages)
        self.untranscribed -= removed.untranscribed
        self.utterances -= removed.utterances
        self.duration_bins.subtract(removed.duration_bins)
        self.seconds_passing.subtract(removed.seconds_passing)
        self.scored_seconds -= removed.scored_seconds
        self._fold_speakers().subtract(removed._fold_speakers())
        for c in (self.sampling_rates, self.languages, self.duration_bins, self.seconds_passing, self.speakers_per_file):
            for k in [k for k, v in c.items() if v <= 0]:
                del c[k]
        self.deleted += removed.utterances
        return [name for name in self.EXTREMES if getattr(self, name).subtract(getattr(removed, name))]

    def recompute_extremes(self, names: Iterable[str], live: "Aggregates") -> None:
        """Set the min and max of `names` from `live` (the aggregates of the rows left)."""
        for name in names:
            mine, theirs = getattr(self, name), getattr(live, name)
            mine.min, mine.max = theirs.min, theirs.max

    # --- serialization (footer metadata and summary.json's "_state") ---------------------
    def to_state(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "total_duration_sec": self.total_duration_sec,
            "sampling_rates": dict(self.sampling_rates),
            "languages": dict(self.languages),
            "transcription_lengths": vars(self.transcription_lengths),
            "token_frames": vars(self.token_frames),
            "errors": dict(self.errors),
            "skipped": self.skipped,
            "duplicates": self.duplicates,
            "superseded": self.superseded,
            "delete_events": self.delete_events,
            "deleted": self.deleted,
            "untranscribed": self.untranscribed,
            "utterances": self.utterances,
            "utterance_durations": vars(self.utterance_durations),
            "duration_bins": dict(self.duration_bins),
            "seconds_passing": dict(self.seconds_passing),
            "scored_seconds": self.scored_seconds,
            "speakers_per_file": dict(self._fold_speakers()),
        }

    @classmethod
    def from_state(cls, s: dict[str, Any]) -> "Aggregates":
        return cls(
            files=int(s.get("files", 0)),
            total_duration_sec=float(s.get("total_duration_sec", 0.0)),
            sampling_rates=Counter(s.get("sampling_rates", {})),
            languages=Counter(s.get("languages", {})),
            transcription_lengths=MinMaxSum(**s.get("transcription_lengths", {})),
            token_frames=MinMaxSum(**s.get("token_frames", {})),
            errors=Counter(s.get("errors", {})),
            skipped=int(s.get("skipped", 0)),
            duplicates=int(s.get("duplicates", 0)),
            superseded=int(s.get("superseded", 0)),
            delete_events=int(s.get("delete_events", 0)),
            deleted=int(s.get("deleted", 0)),
            untranscribed=int(s.get("untranscribed", 0)),
            # a state from before utterances: every row was one file
            utterances=int(s.get("utterances", s.get("files", 0))),
            utterance_durations=MinMaxSum(**s.get("utterance_durations", {})),
            duration_bins=Counter(s.get("duration_bins", {})),
            seconds_passing=Counter(s.get("seconds_passing", {})),
            scored_seconds=float(s.get("scored_seconds", 0.0)),
            speakers_per_file=Counter(s.get("speakers_per_file", {})),
        )

    def report(self, parquet_files: "Iterable[str] | int", table_version: int | None = None) -> dict[str, Any]:
        """The document's keys; `parquet_files`: the data files' names or how many there are."""
        count = parquet_files if isinstance(parquet_files, int) else len(list(parquet_files))
        return {
            "total_files": self.files,
            "transcription": self.transcription,
            "total_duration_sec": round(self.total_duration_sec, 3),
            "average_duration_sec": round(self.total_duration_sec / self.files, 3) if self.files else 0.0,
            "sampling_rate_distribution": dict(sorted(self.sampling_rates.items(), key=lambda kv: int(kv[0]))),
            "transcription_lengths": self.transcription_lengths.report(),
            "token_counts": self.token_frames.report(),
            "languages": dict(self.languages.most_common()),
            "errors": {"total": sum(self.errors.values()), "by_type": dict(self.errors.most_common())},
            "skipped": self.skipped,
            "duplicates": self.duplicates,
            "superseded": self.superseded,
            "deleted": {"events": self.delete_events, "rows": self.deleted},
            "total_utterances": self.utterances,
            "utterance_durations": {**self.utterance_durations.report(),
                                    "bins": {b: self.duration_bins[b] for b in _bin_labels() if self.duration_bins[b]}},
            "hours_above_cutoffs": {
                "scored_hours": round(self.scored_seconds / 3600, 4),
                **{name: round(self.seconds_passing[name] / 3600, 4) for name in CUTOFFS},
            },
            "speakers_per_file": dict(sorted(self._fold_speakers().items(), key=lambda kv: int(kv[0]))),
            "parquet_files": count,
            "table_version": table_version,
            "updated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "_state": {"aggregates": self.to_state(), "table_version": table_version, "parquet_files": count},
        }


def _bin_labels() -> list[str]:
    """Every `duration_bin` label, shortest first."""
    edges = [0.0, *DURATION_BINS]
    return [duration_bin((a + b) / 2) for a, b in zip(edges, edges[1:])] + [duration_bin(DURATION_BINS[-1])]


class SummaryState(NamedTuple):
    """What summary.json covers: the merged aggregates up to `table_version`, and the data files then."""

    aggregates: Aggregates
    table_version: int
    parquet_files: int


def parse_summary(doc: bytes | None) -> SummaryState | None:
    """The state of a summary.json, or None if missing, unreadable, or of 0.1 (a file list, no version)."""
    if doc is None:
        return None
    try:
        state = orjson.loads(doc)["_state"]
        return SummaryState(Aggregates.from_state(state["aggregates"]), int(state["table_version"]),
                            int(state["parquet_files"]))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def render_summary(aggregates: Aggregates, state: SummaryState) -> bytes:
    return orjson.dumps(aggregates.report(state.parquet_files, state.table_version), option=orjson.OPT_INDENT_2)
