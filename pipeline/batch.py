"""A micro-batch and the stages that turn it into rows: download, decode, transcribe, tokenize, assemble.

Pure processing: nothing here knows Kafka. `SourceRef` is only provenance (where an event came
from), carried into the row. Every stage works on the whole batch and returns, per item, either
its result or the `PermanentError` that ends that item - one bad file never fails its neighbours.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable, Generic, TypeVar

import numpy as np

from .audio import WHISPER_SAMPLE_RATE, AudioLayout, DecodedAudio, DecodeSpec, decode_audio
from .device import device_fault, is_device_oom
from .config import Settings
from .errors import (
    BucketMissing,
    DeviceFault,
    ObjectAccessDenied,
    ObjectForbidden,
    ObjectMissing,
    ObjectUnavailable,
    PermanentError,
    StorageUnavailable,
    Superseded,
    TokenizationFailed,
)
from .events import ObjectEvent
from .faults import crash_point
from .models import Models
from .records import Transcript, TranscribedAudio
from .storage import download_object, probe_access, probe_bucket

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class SourceRef:
    topic: str
    partition: int
    offset: int


@dataclass(slots=True)
class WorkItem:
    event: ObjectEvent
    source: SourceRef
    raw: bytes | None = None  # the original message value, for dead letters


@dataclass
class MicroBatch:
    seq: int
    items: list[WorkItem]

    @property
    def label(self) -> str:
        """`topic[p]@first-last,…`: names the flow run so an operator sees which events it held."""
        spans: dict[tuple[str, int], list[int]] = {}
        for it in self.items:
            spans.setdefault((it.source.topic, it.source.partition), []).append(it.source.offset)
        parts = [f"p{p}@{min(o)}-{max(o)}" for (_, p), o in sorted(spans.items())]
        return f"batch-{self.seq}:" + ",".join(parts) if parts else f"batch-{self.seq}"


@dataclass(slots=True)
class Failure:
    item: WorkItem
    error: PermanentError


@dataclass(slots=True)
class Slot(Generic[T]):
    """One item's progress through the stages: a value, or what stopped it (a `PermanentError`
    dead-letters it; `Superseded` only counts it)."""

    item: WorkItem
    value: T | None = None
    error: PermanentError | Superseded | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class Downloaded:
    data: bytes
    etag: str
    size: int = -1  # bytes read; kept when `data` is released after decoding

    def __post_init__(self) -> None:
        if self.size < 0:
            self.size = len(self.data)

    def release(self) -> int:
        """Drop the compressed bytes (decoded, they are no longer needed); returns how many."""
        n, self.data = len(self.data), b""
        return n


@dataclass
class BatchOutcome:
    rows: list[TranscribedAudio] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    superseded: list[WorkItem] = field(default_factory=list)  # overwritten before read: no row, no dead letter
    timings: dict[str, float] = field(default_factory=dict)
    audio_seconds: float = 0.0


# --- stages ---------------------------------------------------------------------------
async def download_and_decode_stage(
    s3: Any, items: list[WorkItem], settings: Settings,
    decode: Callable[[list[Slot[Downloaded]]], Awaitable[list[Slot[DecodedAudio]]]],
) -> tuple[list[Slot[Downloaded]], list[Slot[DecodedAudio]]]:
    """Download and decode, object by object: each object is decoded as soon as it is read and
    its compressed bytes dropped, and a download starts only while the bytes held (read, not yet
    decoded) are under `batch_max_bytes` - the bytes actually read, whatever the events claim.
    So a batch holds at most the budget plus `download_concurrency` objects of compressed audio."""
    sem = asyncio.Semaphore(settings.download_concurrency)
    room = asyncio.Condition()
    held = 0

    async def one(item: WorkItem) -> tuple[Slot[Downloaded], Slot[DecodedAudio]]:
        nonlocal held
        async with sem:
            async with room:
                await room.wait_for(lambda: held < settings.batch_max_bytes or held == 0)
            slot = await _download_one(s3, item, settings)
            if slot.ok:
                held += slot.value.size  # type: ignore[union-attr]
        try:
            (decoded,) = await decode([slot])
        finally:
            if slot.ok:
                held -= slot.value.release()  # type: ignore[union-attr]
                async with room:
                    room.notify_all()
        return slot, decoded

    pairs = _raise_fault(await asyncio.gather(*(one(i) for i in items), return_exceptions=True))
    downloaded = [d for d, _ in pairs]
    await _probe_unavailable(s3, downloaded)
    await _probe_forbidden(s3, downloaded)
    return downloaded, [a for _, a in pairs]


async def _download_one(s3: Any, item: WorkItem, settings: Settings) -> Slot[Downloaded]:
    ev = item.event
    crash_point("download")
    try:
        data, etag = await download_object(
            s3, ev.bucket, ev.key, settings.max_object_bytes, settings.s3_retry_attempts,
            if_match=ev.etag, version_id=ev.version_id, event_time=ev.event_time,
        )
    except (PermanentError, Superseded) as exc:
        return Slot(item, error=exc)
    except ObjectAccessDenied as exc:  # the object's, unless the probe finds the credentials refused too
        return Slot(item, error=ObjectForbidden(f"{exc}; the same credentials read the bucket, so the "
                                                "denial is this object's (a policy on its key or prefix, its KMS key)"))
    except StorageUnavailable as exc:  # past its retries: the object's fault, unless the bucket fails too
        return Slot(item, error=ObjectUnavailable(str(exc)))
    except BucketMissing as exc:
        if settings.allowed_bucket_set() is None:  # any bucket may be named: a missing one is the event's problem
            return Slot(item, error=ObjectMissing(str(exc)))
        raise
    # the etag of the bytes read, never the event's claim: a row names the version it was made from
    return Slot(item, Downloaded(data, etag or ev.etag or ""))


def _raise_fault(results: list) -> list:
    for r in results:
        if isinstance(r, BaseException):
            raise r  # an EnvironmentFault (or a bug): the batch stops, nothing is blamed on objects
    return results


async def _probe_unavailable(s3: Any, slots: list[Slot[Downloaded]]) -> None:
    for bucket in sorted({s.item.event.bucket for s in slots if isinstance(s.error, ObjectUnavailable)}):
        await probe_bucket(s3, bucket)  # raises StorageOutage when the bucket itself does not answer


async def _probe_forbidden(s3: Any, slots: list[Slot[Downloaded]]) -> None:
    """Objects S3 denied become `ObjectForbidden` only if the same credentials still work on their
    bucket (an object of it read in this batch, else HeadBucket); otherwise `StorageAccessDenied`
    is raised: the batch stops, nothing is dead-lettered or committed, and it is waited out."""
    denied = {s.item.event.bucket for s in slots if isinstance(s.error, ObjectForbidden)}
    for bucket in sorted(denied):
        readable = next((s.item.event.key for s in slots if s.ok and s.item.event.bucket == bucket), None)
        await probe_access(s3, bucket, readable)


def decode_stage(
    slots: list[Slot[Downloaded]], settings: Settings, layouts: tuple[AudioLayout, ...] | None = None
) -> list[Slot[DecodedAudio]]:
    """Each object decoded in one streaming pass into `layouts`, the views the models read (the
    pipeline passes `Models.layouts`; default: `DecodeSpec`'s, Whisper's and the built-in
    tokenizers'), refused outside the settings' duration range."""
    spec = DecodeSpec(
        layouts=layouts if layouts is not None else DecodeSpec().layouts,
        min_duration_sec=settings.min_duration_sec,
        max_duration_sec=settings.max_duration_sec,
    )
    out: list[Slot[DecodedAudio]] = []
    for s in slots:
        if not s.ok:
            out.append(Slot(s.item, error=s.error))
            continue
        try:
            out.append(Slot(s.item, decode_audio(s.value.data, spec)))  # type: ignore[union-attr]
        except PermanentError as exc:
            out.append(Slot(s.item, error=exc))
    return out


def whisper_inputs(slots: list[Slot[DecodedAudio]]) -> list[np.ndarray]:
    return [s.value.at_rate(WHISPER_SAMPLE_RATE) for s in slots if s.ok]  # type: ignore[union-attr]


def transcribe_stage(models: Models, slots: list[Slot[DecodedAudio]], clips16k: list[np.ndarray]) -> list[Slot[Transcript]]:
    crash_point("transcribe")
    if not models.transcribes:  # transcription off: every slot goes on without a transcript (value None)
        return [Slot(s.item, error=s.error) for s in slots]
    results = iter(models.transcriber.transcribe_batch(clips16k) if clips16k else [])
    return [_merge(s, next(results)) if s.ok else Slot(s.item, error=s.error) for s in slots]


def tokenize_stage(models: Models, slots: list[Slot[DecodedAudio]]) -> list[Slot[np.ndarray]]:
    good = [s for s in slots if s.ok]
    codes = iter(_tokenize_isolating_failures(models, [s.value for s in good]))  # type: ignore[misc]
    return [_merge(s, next(codes)) if s.ok else Slot(s.item, error=s.error) for s in slots]


def _tokenize_isolating_failures(models: Models, clips: list[DecodedAudio]) -> list[np.ndarray | PermanentError]:
    """Codes per clip, a failing clip isolated by halving its batch. Raises `DeviceFault` for a
    broken device (a CUDA error, device memory short even for one clip, or - when every clip
    failed - a tokenizer that fails a second of silence too)."""
    if not clips:
        return []
    batch = models.settings.tokenizer_batch_size
    out: list[np.ndarray | PermanentError] = []
    for i in range(0, len(clips), batch):
        out.extend(_tokenize_halving(models, clips[i : i + batch]))
    if all(isinstance(r, PermanentError) for r in out):
        _probe_tokenizer(models)
    return out


def _tokenize_halving(models: Models, part: list[DecodedAudio]) -> list[np.ndarray | PermanentError]:
    try:
        return list(models.tokenizer.encode_batch(part))
    except Exception as exc:
        fault = device_fault(exc)
        if fault is not None and (not is_device_oom(exc) or len(part) == 1):
            raise fault from exc
        if len(part) == 1:
            return [exc if isinstance(exc, PermanentError) else TokenizationFailed(f"{type(exc).__name__}: {exc}")]
        mid = len(part) // 2
        return _tokenize_halving(models, part[:mid]) + _tokenize_halving(models, part[mid:])


def _probe_tokenizer(models: Models) -> None:
    layout = models.tokenizer.layout
    silence = DecodedAudio.from_samples(np.zeros((layout.sample_rate, 1), np.float32), layout.sample_rate,
                                        DecodeSpec(layouts=(layout,)))
    try:
        models.tokenizer.encode_batch([silence])
    except Exception as exc:
        raise device_fault(exc) or DeviceFault(
            f"the tokenizer fails on a second of silence too: {type(exc).__name__}: {exc}") from exc


def _merge(slot: Slot, result: Any) -> Slot:
    if isinstance(result, PermanentError):
        return Slot(slot.item, error=result)
    return Slot(slot.item, result)


def assemble_stage(
    models: Models,
    downloaded: list[Slot[Downloaded]],
    decoded: list[Slot[DecodedAudio]],
    transcripts: list[Slot[Transcript]],
    tokens: list[Slot[np.ndarray]],
) -> BatchOutcome:
    outcome = BatchOutcome()
    now = datetime.now(timezone.utc)
    for d, a, t, k in zip(downloaded, decoded, transcripts, tokens):
        err = d.error or a.error or t.error or k.error
        if isinstance(err, Superseded):
            outcome.superseded.append(d.item)
            continue
        if err is not None:
            outcome.failures.append(Failure(d.item, err))
            continue
        ev, src, audio, tr = d.item.event, d.item.source, a.value, t.value
        outcome.audio_seconds += audio.duration_sec  # type: ignore[union-attr]
        outcome.rows.append(
            TranscribedAudio(
                id=ev.key,
                bucket=ev.bucket,
                etag=d.value.etag,  # type: ignore[union-attr]
                size_bytes=d.value.size,  # type: ignore[union-attr]
                event_time=ev.event_time,
                duration_sec=round(audio.duration_sec, 6),  # type: ignore[union-attr]
                sampling_rate=audio.sample_rate,  # type: ignore[union-attr]
                channels=audio.channels,  # type: ignore[union-attr]
                # no transcript (transcription off): null transcription, language and segments
                transcription=tr.text if tr is not None else None,
                language=tr.language if tr is not None else None,
                segments=tr.segments if tr is not None else None,
                tokens=k.value,  # type: ignore[arg-type]
                tokenizer=models.tokenizer.name,
                token_frame_rate=float(models.tokenizer.frame_rate),
                whisper_model=models.transcriber.name,
                kafka_topic=src.topic,
                kafka_partition=src.partition,
                kafka_offset=src.offset,
                processed_at=now,
            )
        )
    return outcome


class StageTimer:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    def measure(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                timer.timings[name] = timer.timings.get(name, 0.0) + time.perf_counter() - self.t

        return _Ctx()
