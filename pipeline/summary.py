"""`summary.json`: dataset statistics from mergeable aggregates.

Each finalized Parquet file carries the aggregates of what its epoch handled (rows, errors,
skips) in its footer. `summary.json` is the merge of exactly the finalized files' aggregates,
so it can be updated incrementally (merge one file's aggregates) and rebuilt from footers alone,
without re-reading any row data. Several consumers may share one output: updates re-read, add
every finalized file not yet included, and replace the document in one compare-and-swap
(pipeline/ledger.py `publish_summary`, pipeline/output/).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable

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

    def report(self) -> dict[str, float | None]:
        return {
            "min": self.min,
            "max": self.max,
            "avg": round(self.total / self.count, 3) if self.count else None,
        }


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
    # rows written without a transcript (transcription off); files written before this existed had none
    untranscribed: int = 0

    def add_row(self, row: TranscribedAudio) -> None:
        self.files += 1
        self.total_duration_sec += row.duration_sec
        self.sampling_rates[str(row.sampling_rate)] += 1
        self.add_transcript(row.transcription, row.language)
        self.token_frames.add(row.token_frames)

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
        return "off" if self.untranscribed == self.files else "mixed"

    def add_error(self, error_type: str) -> None:
        self.errors[error_type] += 1

    def merge(self, o: "Aggregates") -> None:
        self.files += o.files
        self.total_duration_sec += o.total_duration_sec
        self.sampling_rates.update(o.sampling_rates)
        self.languages.update(o.languages)
        self.transcription_lengths.merge(o.transcription_lengths)
        self.token_frames.merge(o.token_frames)
        self.errors.update(o.errors)
        self.skipped += o.skipped
        self.duplicates += o.duplicates
        self.superseded += o.superseded
        self.untranscribed += o.untranscribed

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
            "untranscribed": self.untranscribed,
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
            untranscribed=int(s.get("untranscribed", 0)),
        )

    def report(self, parquet_files: Iterable[str]) -> dict[str, Any]:
        names = sorted(parquet_files)
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
            "parquet_files": len(names),
            "updated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "_state": {"aggregates": self.to_state(), "files": names},
        }


def parse_summary(doc: bytes | None) -> tuple[Aggregates, set[str]] | None:
    """The aggregates and file set of a summary.json, or None if missing or unreadable."""
    if doc is None:
        return None
    try:
        state = orjson.loads(doc)["_state"]
        return Aggregates.from_state(state["aggregates"]), set(state["files"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def render_summary(aggregates: Aggregates, files: Iterable[str]) -> bytes:
    return orjson.dumps(aggregates.report(files), option=orjson.OPT_INDENT_2)
