"""The model modes: the seed's shape, bare faster-whisper, and the pipeline's own model call.

    seed   list the bucket; per file, in turn: download (boto3), decode, faster-whisper
           `transcribe()`, tokenize; one Parquet at the end
    bare   faster-whisper's `BatchedInferencePipeline.transcribe(batch_size=B)` per file, audio
           decoded in advance (no I/O)
    model  `WhisperTranscriber.transcribe_batch(all clips)`, audio decoded in advance: the pipeline's
           exact model call (fitted windows, cross-file batches), no I/O, no Kafka - its ceiling
"""

from __future__ import annotations

import contextlib
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..config import Settings
from ..samples import word_overlap
from .corpus import BUCKET, CORPUS_PREFIX, boto3_s3
from .measure import ModeResult, measured


def run_seed(settings: Settings, models: Any, out_path: Path, texts: dict[str, str]) -> ModeResult:
    """The seed's shape: list, then one file at a time through every step; one Parquet at the end."""
    import pyarrow.parquet as pq

    from ..audio import WHISPER_SAMPLE_RATE, decode_audio
    from ..records import TranscribedAudio, to_table

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


def run_bare(models: Any, clips16k: dict[str, np.ndarray], batch_size: int, without_timestamps: bool,
             texts: dict[str, str]) -> ModeResult:
    """faster-whisper's batched mode, one file per call (it batches the VAD chunks of one file)."""
    from faster_whisper import BatchedInferencePipeline

    tr = models.transcriber
    pipe = BatchedInferencePipeline(tr.model)
    out: dict[str, str] = {}
    with measured("bare") as info:
        t0 = time.perf_counter()
        for key, clip in clips16k.items():
            segments, _ = pipe.transcribe(
                clip, batch_size=batch_size, beam_size=tr.beam_size, language=tr.language,
                without_timestamps=without_timestamps,
            )
            out[key] = " ".join(s.text.strip() for s in segments).strip()
        wall = time.perf_counter() - t0
    audio = sum(c.shape[0] for c in clips16k.values()) / 16_000
    return ModeResult(
        "bare", len(out), audio, wall, **info, word_overlap=mean_overlap(out, texts),
        details={"batch_size": batch_size, "without_timestamps": without_timestamps, "vad_filter": True},
    )


def run_model(models: Any, clips16k: dict[str, np.ndarray], texts: dict[str, str]) -> ModeResult:
    """The pipeline's model call on every clip at once: fitted windows, batched across files."""
    tr = models.transcriber
    keys = list(clips16k)
    with measured("model") as info, count_encoder_seconds(tr) as encoded:
        t0 = time.perf_counter()
        results = tr.transcribe_batch([clips16k[k] for k in keys])
        wall = time.perf_counter() - t0
    out = {k: getattr(r, "text", "") for k, r in zip(keys, results)}
    failed = sum(1 for r in results if not hasattr(r, "text"))
    audio = sum(c.shape[0] for c in clips16k.values()) / 16_000
    return ModeResult(
        "model", len(keys) - failed, audio, wall, **info, word_overlap=mean_overlap(out, texts),
        details={"batch_size": tr.batch_size, "window": tr.window, "failed": failed,
                 # seconds of audio window through the encoder (the seed: 30 per clip of <= 30 s)
                 "encoder_window_seconds": encoded[0] if encoded else None,
                 "windows_decoded": encoded[1] if encoded else None},
    )


@contextlib.contextmanager
def count_encoder_seconds(transcriber: Any) -> Iterator[list[float]]:
    """[window seconds encoded, windows] of one call (diagnostic; wraps the instance's `_generate`)."""
    counted: list[float] = []
    inner = getattr(transcriber, "_generate", None)
    if inner is None:  # the transcriber changed shape: report nothing rather than fail
        yield counted
        return
    counted.extend([0.0, 0])

    def generate(chunks, frames):  # type: ignore[no-untyped-def]
        counted[0] += len(chunks) * frames / 100
        counted[1] += len(chunks)
        return inner(chunks, frames)

    transcriber._generate = generate
    try:
        yield counted
    finally:
        del transcriber._generate


def mean_overlap(transcripts: dict[str, str], texts: dict[str, str]) -> float | None:
    scores = [word_overlap(texts[k], v) for k, v in transcripts.items() if k in texts]
    return float(np.mean(scores)) if scores else None

