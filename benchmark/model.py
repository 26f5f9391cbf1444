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
    is DNSMOS (where on), speaker embeddings and labels, signal measures, on the segment stage's spans."""
    from pipeline.batch import Slot, score_stage, segment_stage

    slots = [Slot(None, a) for a in decoded.values()]  # type: ignore[arg-type]
    audio = sum(a.duration_sec for a in decoded.values())
    segmented = segment_stage(models, slots) if stage == "score" else slots
    fn = segment_stage if stage == "segment" else score_stage
    with measured(f"model-{stage}") as info:
        t0 = time.perf_counter()
        results = fn(models, segmented)  # type: ignore[arg-type]
        wall = time.perf_counter() - t0
    failed = sum(1 for r in results if not r.ok)
    names = models.analysis.names if models.analysis is not None else {}
    return ModeResult(f"model-{stage}", len(results) - failed, audio, wall, **info,
                      details={"failed": failed, "segmentation": models.settings.segmentation, **names})
