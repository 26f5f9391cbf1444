"""The seed mode: the batch design this stream grew from, on the same corpus and models.

    seed   list the bucket; per file, in turn: download (boto3), decode, faster-whisper
           `transcribe()`, tokenize; one Parquet at the end
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline.config import Settings

from .corpus import BUCKET, CORPUS_PREFIX, boto3_s3, mean_overlap
from .measure import ModeResult, measured


def run_seed(settings: Settings, models: Any, out_path: Path, texts: dict[str, str]) -> ModeResult:
    """The seed's shape: list, then one file at a time through every step; one Parquet at the end."""
    import pyarrow.parquet as pq

    from pipeline.audio import WHISPER_SAMPLE_RATE, decode_audio
    from pipeline.records import TranscribedAudio, to_table

    timings = {"list": 0.0, "download": 0.0, "decode": 0.0, "transcribe": 0.0, "tokenize": 0.0, "write": 0.0}
    with measured("seed") as info:
        t0 = time.perf_counter()
        s3 = boto3_s3(settings)
        objects = [o for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=CORPUS_PREFIX)
                   for o in page.get("Contents", [])]
        timings["list"] = time.perf_counter() - t0
        rows = []
        for obj in objects:
            lap = _Lap(timings)
            data = s3.get_object(Bucket=BUCKET, Key=obj["Key"])["Body"].read()
            lap("download")
            audio = decode_audio(data)
            clip = audio.at_rate(WHISPER_SAMPLE_RATE)
            lap("decode")
            transcript = models.transcriber.transcribe_one_by_one(clip)
            lap("transcribe")
            tokens = models.tokenizer.encode_batch([audio])[0]
            lap("tokenize")
            rows.append(TranscribedAudio(
                id=obj["Key"], bucket=BUCKET, etag=str(obj["ETag"]).strip('"'), size_bytes=len(data),
                event_time=obj["LastModified"], duration_sec=round(audio.duration_sec, 6),
                sampling_rate=audio.sample_rate, channels=audio.channels, transcription=transcript.text,
                language=transcript.language, segments=transcript.segments, tokens=tokens,
                tokenizer=models.tokenizer.name, token_frame_rate=float(models.tokenizer.frame_rate),
                whisper_model=models.transcriber.name, kafka_topic="", kafka_partition=-1, kafka_offset=-1,
                processed_at=datetime.now(timezone.utc),
            ))
        t = time.perf_counter()
        pq.write_table(to_table(rows), out_path, compression="zstd")
        timings["write"] = time.perf_counter() - t
        wall = time.perf_counter() - t0
    return ModeResult(
        "seed", len(rows), sum(r.duration_sec for r in rows), wall, **info,
        word_overlap=mean_overlap({r.id: r.transcription for r in rows}, texts),
        details={"stage_seconds": timings},
    )


class _Lap:
    """`lap(stage)` adds the time since the previous lap to `timings[stage]`."""

    def __init__(self, timings: dict[str, float]) -> None:
        self.timings, self.t = timings, time.perf_counter()

    def __call__(self, stage: str) -> None:
        now = time.perf_counter()
        self.timings[stage] += now - self.t
        self.t = now
