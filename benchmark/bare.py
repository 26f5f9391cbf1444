"""The bare mode: faster-whisper's own batched pipeline, with nothing of the stream around it.

    bare   faster-whisper's `BatchedInferencePipeline.transcribe(batch_size=B)` per file, audio
           decoded in advance (no I/O)
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from .corpus import mean_overlap
from .measure import ModeResult, measured


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
