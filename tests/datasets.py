"""Output directories made without a broker or a model: the real writer, footers and summary.

For tests of the dataset tools (summary, report) that need varied rows fast.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from pipeline.ledger import OutputLedger, publish_summary
from pipeline.parquet import OffsetRange, RollingParquetWriter
from pipeline.records import Segment, TranscribedAudio, to_table
from pipeline.summary import Aggregates

RATES = [16_000, 22_050, 24_000, 44_100, 48_000]
LANGUAGES = ["en"] * 6 + ["de", "fr", "es"]
WORDS = "the quick brown fox jumps over the lazy dog while speech pipelines turn audio into data".split()
FRAME_RATE = 75.0
CODEBOOKS = 8


def make_row(i: int, rng: np.random.Generator, partition: int = 0) -> TranscribedAudio:
    duration = float(np.clip(rng.gamma(3.0, 2.0), 0.5, 30.0))
    words = int(duration * 2.5 * rng.uniform(0.7, 1.3)) if i % 17 else 0  # a few silent clips
    text = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(words))
    frames = int(round(duration * FRAME_RATE)) - (i % 5 == 0) * int(rng.integers(0, 40))  # some truncated
    tokens = rng.integers(0, 1024, size=(CODEBOOKS, max(frames, 1)), dtype=np.int16)
    now = datetime.now(timezone.utc)
    return TranscribedAudio(
        id=f"clips/clip-{i:05d}.flac", bucket="bucket", etag=f"etag-{i}", size_bytes=int(duration * 32_000),
        event_time=now, duration_sec=round(duration, 6), sampling_rate=RATES[i % len(RATES)], channels=1 + (i % 12 == 1),
        transcription=text, language=LANGUAGES[i % len(LANGUAGES)], segments=[Segment(0.0, duration, text)],
        tokens=tokens, tokenizer="synthetic", token_frame_rate=FRAME_RATE, whisper_model="tiny.en",
        kafka_topic="events", kafka_partition=partition, kafka_offset=i, processed_at=now,
    )


def write_dataset(output_dir: Path, rows: int = 120, files: int = 3, errors: dict[str, int] | None = None,
                  skipped: int = 2, duplicates: int = 1, seed: int = 7) -> Path:
    """`files` Parquet files committed to the table holding `rows` rows, plus dead-letter counts; summary.json published."""
    rng = np.random.default_rng(seed)
    errors = dict(errors if errors is not None else {"NotAudio": 3, "ObjectMissing": 1, "DurationOutOfRange": 2})
    writer = RollingParquetWriter(output_dir, roll_max_rows=10**9, roll_max_seconds=10**6)
    ledger = OutputLedger(output_dir)
    try:
        per_file = max(1, rows // files)
        offset = 0
        for f in range(files):
            count = per_file if f < files - 1 else rows - per_file * (files - 1)
            batch = [make_row(offset + k, rng) for k in range(count)]
            agg = Aggregates(skipped=skipped if f == 0 else 0, duplicates=duplicates if f == 0 else 0)
            for r in batch:
                agg.add_row(r)
            if f == 0:
                for error_type, n in errors.items():
                    for _ in range(n):
                        agg.add_error(error_type)
            writer.append(to_table(batch), [OffsetRange("events", 0, offset, offset + max(count, 1) - 1)], agg)
            ledger.commit_file(writer.finalize())
            offset += max(count, 1)
    finally:
        writer.close()
    publish_summary(output_dir)
    return output_dir
