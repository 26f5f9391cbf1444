"""The model mode: the pipeline's own model call, with nothing of the stream around it.

    model  `WhisperTranscriber.transcribe_batch(all clips)`, audio decoded in advance: the pipeline's
           exact model call (fitted windows, cross-file batches), no I/O, no Kafka - its ceiling
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Iterator

import numpy as np

from .corpus import mean_overlap
from .measure import ModeResult, measured


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


def run_analysis_stage(models: Any, decoded: dict[str, Any], stage: str) -> ModeResult:
    """`model-segment` / `model-score`: the pipeline's analysis stage beside the model call, on every clip at
    once (decoded in advance, no I/O). `segment` is VAD (plus speaker changes in utterances mode); `score`
    is DNSMOS (where on), speaker embeddings and labels, signal measures, on the segment stage's spans.
    `details.model_seconds` / `model_audio_s_per_s` split the stage per model (the README's cost table)."""
    from pipeline.batch import Slot, score_stage, segment_stage

    slots = [Slot(None, a) for a in decoded.values()]  # type: ignore[arg-type]
    audio = sum(a.duration_sec for a in decoded.values())
    segmented = segment_stage(models, slots) if stage == "score" else slots
    fn = segment_stage if stage == "segment" else score_stage
    with measured(f"model-{stage}") as info, time_analysis_calls(models) as seconds:
        t0 = time.perf_counter()
        results = fn(models, segmented)  # type: ignore[arg-type]
        wall = time.perf_counter() - t0
    failed = sum(1 for r in results if not r.ok)
    names = models.analysis.names if models.analysis is not None else {}
    return ModeResult(f"model-{stage}", len(results) - failed, audio, wall, **info,
                      details={"failed": failed, "segmentation": models.settings.segmentation, **names,
                               "model_seconds": seconds,
                               "model_audio_s_per_s": {k: audio / v for k, v in seconds.items() if v > 0}})


@contextlib.contextmanager
def time_analysis_calls(models: Any) -> Iterator[dict[str, float]]:
    """Seconds inside each analysis model during one stage call (diagnostic: wraps the calls the stages
    make; a call made inside another timed one, such as the encoder inside speaker changes, counts once)."""
    import pipeline.analysis.quality as quality
    import pipeline.analysis.vad as vad

    seconds: dict[str, float] = {}
    active: list[str] = []
    targets = [(vad, "speech_regions", "vad"), (quality, "signal_measures", "signal_measures")]
    an = models.analysis
    if an is not None:
        targets += [(an.speakers, "change_points", "speaker_changes"), (an.speakers, "embed", "speaker_embeddings")]
        if an.dnsmos is not None:
            targets.append((an.dnsmos, "score", "dnsmos"))

    def timed(fn: Any, name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            if active:
                return fn(*args, **kwargs)
            active.append(name)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0
                active.pop()
        return call

    saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in targets]
    for obj, attr, name in targets:
        setattr(obj, attr, timed(getattr(obj, attr), name))
    try:
        yield seconds
    finally:
        for obj, attr, original in saved:
            if isinstance(obj, type(vad)):
                setattr(obj, attr, original)
            else:
                delattr(obj, attr)  # the instance's wrapper: the class's method shows through again
