"""A micro-batch and the stages that turn it into rows: download, decode, transcribe, tokenize, assemble.

Pure processing: nothing here knows Kafka. `SourceRef` is only provenance (where an event came
from), carried into the row. Every stage works on the whole batch and returns, per item, either
its result or the `PermanentError` that ends that item - one bad file never fails its neighbours.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field, replace
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
    AnalysisFailed,
)
from .events import ObjectEvent
from .faults import crash_point
from .models import Models
from .records import Segment, Transcript, TranscribedAudio, Word
from .storage import download_object, probe_access, probe_bucket
from .transcribe import CHUNK_SECONDS, compression_ratio

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


# --- segmentation: the spans an object version's rows hold --------------------------------------------
Span = tuple[float, float]  # seconds in the source file


@dataclass(slots=True)
class Segmented:
    """One object version cut into the spans of its rows: the whole file (segmentation=file) or its
    utterances. `crops` are each span's own audio (every decoded view cropped), what every model reads.

    In `utterances` mode with a transcript, `windows` are what Whisper decodes (regions joined up to
    30 s, never across a long pause) and `cuts` the speaker changes inside them; `transcribe_stage`
    then sets `spans` and `crops` to the utterances cut between the decoded words (the stages after
    it read those). The spans `segment_stage` sets are the VAD's own, for a run without a transcript."""

    audio: DecodedAudio
    regions: list[Span]  # VAD speech regions of the whole file
    spans: list[Span]
    crops: list[DecodedAudio]
    windows: list[Span] = field(default_factory=list)
    cuts: list[float] = field(default_factory=list)


def crop(audio: DecodedAudio, start: float, end: float) -> DecodedAudio:
    """The audio of `[start, end)` seconds in every decoded view (sample indices rounded to the nearest
    sample of each view's rate): a model encodes the utterance itself, never a slice of a whole-file result."""
    if start <= 0 and end >= audio.duration_sec:
        return audio
    views = {layout: v[round(start * layout.sample_rate) : round(end * layout.sample_rate)]
             for layout, v in audio.views.items()}
    frames = round(end * audio.sample_rate) - round(start * audio.sample_rate)
    return DecodedAudio(audio.sample_rate, audio.channels, frames, views)


def segment_stage(models: Models, slots: list[Slot[DecodedAudio]]) -> list[Slot[Segmented]]:
    """VAD regions of every file, and its spans: the whole file, or (segmentation=utterances) utterances
    cut at long pauses and at the speaker changes the encoder finds inside a region. A file without any
    utterance (no speech) keeps one row for the whole file: every input ends as exactly one row or more."""
    st, analysis = models.settings, models.analysis
    out: list[Slot[Segmented]] = []
    for s in slots:
        if not s.ok:
            out.append(Slot(s.item, error=s.error))
            continue
        audio: DecodedAudio = s.value  # type: ignore[assignment]
        whole = [(0.0, audio.duration_sec)]
        if analysis is None:
            out.append(Slot(s.item, Segmented(audio, [], whole, [audio])))
            continue
        try:
            out.append(Slot(s.item, _segment(models, audio, whole)))
        except Exception as exc:
            _isolate(exc)
            out.append(Slot(s.item, error=AnalysisFailed(f"segmentation: {type(exc).__name__}: {exc}")))
    return out


def _segment(models: Models, audio: DecodedAudio, whole: list[Span]) -> Segmented:
    from .analysis.vad import speech_regions, utterance_spans, widen

    st = models.settings
    a16 = audio.at_rate(WHISPER_SAMPLE_RATE)
    regions = speech_regions(a16)
    if st.segmentation != "utterances":
        return Segmented(audio, regions, whole, [audio])
    # Whisper's windows: regions joined across short silences up to 30 s, short ones grown to the
    # minimum length (a lone "Hello?" is decoded with the audio around it, never as a 0.2 s crop)
    windows = [(round(a, 3), round(b, 3)) for a, b in
               widen(utterance_spans(regions, audio.duration_sec, min_sec=0.0, max_sec=CHUNK_SECONDS,
                                     pause_sec=st.utterance_pause_sec), st.utterance_min_sec, audio.duration_sec)
               if b - a >= st.utterance_min_sec - 1e-6]
    cuts = [t for w in windows for t in models.analysis.speakers.change_points(a16, w)]  # type: ignore[union-attr]
    spans = utterance_spans(regions, audio.duration_sec, min_sec=st.utterance_min_sec,
                            max_sec=st.utterance_max_sec, pause_sec=st.utterance_pause_sec, cuts=cuts) or whole
    return Segmented(audio, regions, spans, [crop(audio, a, b) for a, b in spans], windows, cuts)


def _isolate(exc: Exception) -> None:
    """A broken device is not one file's fault: raise it as the `DeviceFault` it is."""
    fault = device_fault(exc)
    if fault is not None:
        raise fault from exc


def _regroup(flat: list[Any], counts: list[int]) -> list[list[Any]]:
    out, i = [], 0
    for n in counts:
        out.append(flat[i : i + n])
        i += n
    return out


def whisper_inputs(slots: list[Slot[DecodedAudio]]) -> list[np.ndarray]:
    return [s.value.at_rate(WHISPER_SAMPLE_RATE) for s in slots if s.ok]  # type: ignore[union-attr]


def transcribe_stage(models: Models, slots: list[Slot[Segmented]]) -> list[Slot[list[Transcript]]]:
    """Every span of every file in one `transcribe_batch` call (Whisper batches them); a file whose
    span fails is failed whole. Times are the crop's own (rows get absolute ones: `assemble_stage`).

    In `utterances` mode Whisper decodes each file's `windows` instead, and the utterances are cut
    between the words it found (`cut_at_words`): the file's spans and crops become those utterances."""
    crash_point("transcribe")
    if not models.transcribes:  # transcription off: every slot goes on without a transcript (value None)
        return [Slot(s.item, error=s.error) for s in slots]
    good = [s for s in slots if s.ok]
    pieces = [[crop(s.value.audio, a, b) for a, b in s.value.windows] if s.value.windows  # type: ignore[union-attr]
              else s.value.crops for s in good]  # type: ignore[union-attr]
    clips = [c.at_rate(WHISPER_SAMPLE_RATE) for p in pieces for c in p]
    flat = models.transcriber.transcribe_batch(clips) if clips else []
    per = iter(_regroup(flat, [len(p) for p in pieces]))
    out: list[Slot[list[Transcript]]] = []
    for s in slots:
        if not s.ok:
            out.append(Slot(s.item, error=s.error))
            continue
        results = next(per)
        failed = next((r for r in results if isinstance(r, PermanentError)), None)
        if failed:
            out.append(Slot(s.item, error=failed))
        elif s.value.windows:  # type: ignore[union-attr]
            out.append(Slot(s.item, cut_at_words(models.settings, s.value, results)))  # type: ignore[arg-type]
        else:
            out.append(Slot(s.item, results))
    return out


def cut_at_words(st: Settings, seg: Segmented, decoded: list[Transcript]) -> list[Transcript]:
    """The utterances of one file from its decoded windows: sets `seg.spans` and `seg.crops`, and
    returns each utterance's transcript (its words and Whisper's segments, in the crop's own time;
    Whisper's statistics those of the window's decode). Recomputed from the windows on a rerun."""
    from .analysis.vad import widen, word_utterances

    duration = seg.audio.duration_sec
    cut: list[tuple[float, float, list[Word], Transcript, float]] = []
    for (ws, we), tr in zip(seg.windows, decoded):
        words = [replace(w, start=w.start + ws, end=w.end + ws) for w in tr.words]
        for a, b, group in word_utterances((ws, we), words, min_sec=st.utterance_min_sec,
                                           max_sec=st.utterance_max_sec, pause_sec=st.utterance_pause_sec,
                                           cuts=[c for c in seg.cuts if ws < c < we]):
            cut.append((a, b, group, tr, ws))
    bounds = widen([(a, b) for a, b, *_ in cut], st.utterance_min_sec, duration)
    kept = [((round(a, 3), round(b, 3)), rest) for (a, b), (_, _, *rest) in zip(bounds, cut)
            if b - a >= st.utterance_min_sec - 1e-6]
    if not kept:  # no utterance long enough: the file is one row, as in `file` mode
        kept = [((0.0, duration), ([w for (_, _, g, _, _) in cut for w in g], decoded[0] if decoded else None, 0.0))]
    seg.spans = [span for span, _ in kept]
    seg.crops = [crop(seg.audio, a, b) for a, b in seg.spans]
    return [_utterance_transcript(a, words, tr, ws) for (a, _), (words, tr, ws) in kept]


def _utterance_transcript(start: float, words: list[Word], window: Transcript | None, window_start: float) -> Transcript:
    """An utterance's transcript from its words (absolute) and the decode of the window they came
    from; times relative to `start`, each word under the Whisper segment its middle falls in."""
    import bisect

    rel = [replace(w, start=w.start - start, end=w.end - start) for w in words]
    text = " ".join(w.word for w in rel if w.word).strip()
    segs: list[Segment] = []
    if window is not None and window.segments:
        seg_starts = [sg.start + window_start for sg in window.segments]
        owner = [max(0, bisect.bisect_right(seg_starts, (w.start + w.end) / 2) - 1) for w in words]
        for i, w in enumerate(rel):
            if i and owner[i] == owner[i - 1]:
                last = segs[-1]
                segs[-1] = Segment(last.start, w.end, f"{last.text} {w.word}".strip())
            else:
                segs.append(Segment(w.start, w.end, w.word))
    lang = window.language if window is not None else ""
    return Transcript(
        text, lang, segs, rel,
        avg_logprob=window.avg_logprob if window is not None else None,
        no_speech_prob=window.no_speech_prob if window is not None else None,
        compression_ratio=compression_ratio(text) if text else None,
        language_probability=window.language_probability if window is not None else None,
    )


def tokenize_stage(models: Models, slots: list[Slot[Segmented]]) -> list[Slot[list[np.ndarray]]]:
    """Codes of every span's own crop (crop, then encode), batched across files; a failing crop fails its file."""
    good = [s for s in slots if s.ok]
    flat = _tokenize_isolating_failures(models, [c for s in good for c in s.value.crops])  # type: ignore[union-attr]
    per = iter(_regroup(flat, [len(s.value.crops) for s in good]))  # type: ignore[union-attr]
    out: list[Slot[list[np.ndarray]]] = []
    for s in slots:
        if not s.ok:
            out.append(Slot(s.item, error=s.error))
            continue
        codes = next(per)
        failed = next((c for c in codes if isinstance(c, PermanentError)), None)
        out.append(Slot(s.item, error=failed) if failed else Slot(s.item, codes))
    return out


@dataclass(slots=True)
class Scores:
    """What the analysis models and the signal measures say about one span."""

    dnsmos: Any  # analysis.quality.Dnsmos; None when DNSMOS is off
    embedding: np.ndarray
    speaker: str
    measures: Any  # analysis.quality.SignalMeasures
    regions: list[Span]  # speech regions inside the span, seconds from its start


def _widest_mono(audio: DecodedAudio) -> tuple[int, np.ndarray]:
    """The mono view of the highest rate decode made: bandwidth is measured as far up as the views reach."""
    layout = max((l for l in audio.views if l.channels == 1), key=lambda l: l.sample_rate)
    return layout.sample_rate, audio.views[layout]


def score_stage(models: Models, slots: list[Slot[Segmented]]) -> list[Slot[list[Scores] | None]]:
    """DNSMOS and speaker embeddings of every span, each one batched call for the micro-batch; speaker
    labels clustered within each file; signal measures from each span's own samples and VAD regions."""
    analysis = models.analysis
    if analysis is None:
        return [Slot(s.item, error=s.error) for s in slots]
    from .analysis.quality import signal_measures
    from .analysis.speakers import label_speakers

    good = [s for s in slots if s.ok]
    clips = [c.at_rate(WHISPER_SAMPLE_RATE) for s in good for c in s.value.crops]  # type: ignore[union-attr]
    counts = [len(s.value.crops) for s in good]  # type: ignore[union-attr]
    try:
        mos = analysis.dnsmos.score(clips) if clips and analysis.dnsmos else [None] * len(clips)
        emb = analysis.speakers.embed(clips) if clips else np.zeros((0, 256), np.float32)
    except Exception as exc:
        _isolate(exc)
        err = AnalysisFailed(f"scoring: {type(exc).__name__}: {exc}")
        return [Slot(s.item, error=s.error or err) for s in slots]
    per_mos, starts = iter(_regroup(list(mos), counts)), np.cumsum([0, *counts])
    out: list[Slot[list[Scores] | None]] = []
    k = 0
    for s in slots:
        if not s.ok:
            out.append(Slot(s.item, error=s.error))
            continue
        seg: Segmented = s.value  # type: ignore[assignment]
        e = emb[starts[k] : starts[k + 1]]
        k += 1
        labels = label_speakers(e)
        scores = []
        for (a, b), c, m, vec, lab in zip(seg.spans, seg.crops, next(per_mos), e, labels):
            inside = [(max(ra, a) - a, min(rb, b) - a) for ra, rb in seg.regions if rb > a and ra < b]
            rate, samples = _widest_mono(c)
            scores.append(Scores(m, np.asarray(vec, np.float32), lab, signal_measures(samples, rate, inside), inside))
        out.append(Slot(s.item, scores))
    return out


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
    segmented: list[Slot[Segmented]],
    transcripts: list[Slot[list[Transcript]]],
    tokens: list[Slot[list[np.ndarray]]],
    scores: list[Slot[list[Scores] | None]],
) -> BatchOutcome:
    """Rows: one per span of each object version (the whole file, or each utterance), in span order;
    the file columns repeated on each. An object version's rows are made together, so they are written
    in one Parquet file and counted (summary, ledger) once, as one object version."""
    outcome = BatchOutcome()
    now = datetime.now(timezone.utc)
    names = models.analysis.names if models.analysis is not None else {}
    for d, g, t, k, q in zip(downloaded, segmented, transcripts, tokens, scores):
        err = d.error or g.error or t.error or k.error or q.error
        if isinstance(err, Superseded):
            outcome.superseded.append(d.item)
            continue
        if err is not None:
            outcome.failures.append(Failure(d.item, err))
            continue
        ev, src, seg = d.item.event, d.item.source, g.value
        audio = seg.audio  # type: ignore[union-attr]
        outcome.audio_seconds += audio.duration_sec
        trs = t.value or [None] * len(seg.spans)  # type: ignore[union-attr]
        qs = q.value or [None] * len(seg.spans)  # type: ignore[union-attr]
        for i, ((a, b), tr, codes, sc) in enumerate(zip(seg.spans, trs, k.value, qs)):  # type: ignore[union-attr,arg-type]
            outcome.rows.append(TranscribedAudio(
                id=ev.key,
                bucket=ev.bucket,
                etag=d.value.etag,  # type: ignore[union-attr]
                size_bytes=d.value.size,  # type: ignore[union-attr]
                event_time=ev.event_time,
                version_id=ev.version_id,
                duration_sec=round(b - a, 6),
                sampling_rate=audio.sample_rate,
                channels=audio.channels,
                # no transcript (transcription off): null transcription, language and segments
                transcription=tr.text if tr is not None else None,
                language=tr.language if tr is not None else None,
                segments=[replace(g, start=g.start + a, end=g.end + a) for g in tr.segments] if tr is not None else None,
                tokens=codes,
                tokenizer=models.tokenizer.name,
                token_frame_rate=float(models.tokenizer.frame_rate),
                whisper_model=models.transcriber.name,
                kafka_topic=src.topic,
                kafka_partition=src.partition,
                kafka_offset=src.offset,
                processed_at=now,
                utterance=i,
                start_sec=round(a, 6),
                end_sec=round(b, 6),
                **_score_columns(tr, sc, b - a),  # flags read the crop's own times: before the shift below
                **_transcript_columns(tr, a),
                **names,
            ))
    return outcome


def _transcript_columns(tr: Transcript | None, offset: float) -> dict[str, Any]:
    """Whisper's columns of a span; word times moved from the crop's to absolute seconds in the source file."""
    if tr is None:
        return {}
    return {"words": [replace(w, start=w.start + offset, end=w.end + offset) for w in tr.words],
            "avg_logprob": tr.avg_logprob, "no_speech_prob": tr.no_speech_prob,
            "compression_ratio": tr.compression_ratio, "language_probability": tr.language_probability}


def _score_columns(tr: Transcript | None, sc: Scores | None, duration: float) -> dict[str, Any]:
    if sc is None:
        return {}
    from .analysis.flags import quality_flags

    m = sc.measures
    return {
        "speaker": sc.speaker, "speaker_embedding": sc.embedding,
        **({"dnsmos_ovrl": sc.dnsmos.ovrl, "dnsmos_sig": sc.dnsmos.sig, "dnsmos_bak": sc.dnsmos.bak} if sc.dnsmos else {}),
        "snr_db": m.snr_db, "bandwidth_hz": m.bandwidth_hz, "clipping_ratio": m.clipping_ratio,
        "rms_dbfs": m.rms_dbfs, "speech_ratio": m.speech_ratio,
        "flags": quality_flags(tr, duration=duration, speech_regions=sc.regions) if tr is not None else [],
    }


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
