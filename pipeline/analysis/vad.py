"""Speech regions from Silero VAD (faster-whisper's bundled `silero_vad_v6.onnx`) and utterance spans cut from them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SAMPLE_RATE = 16_000
# Fine regions (short silences split them, little padding): utterance_spans joins them again up to the
# pause that splits, so the regions themselves must not bridge pauses.
MIN_SILENCE_MS = 100
SPEECH_PAD_MS = 30


def speech_regions(audio16k: np.ndarray) -> list[tuple[float, float]]:
    """(start, end) seconds of speech in a mono 16 kHz clip, in order, not overlapping."""
    from faster_whisper.vad import VadOptions, get_speech_timestamps

    if audio16k.shape[0] == 0:
        return []
    stamps = get_speech_timestamps(
        np.asarray(audio16k, np.float32),
        VadOptions(min_silence_duration_ms=MIN_SILENCE_MS, speech_pad_ms=SPEECH_PAD_MS),
    )
    out: list[tuple[float, float]] = []
    for s in stamps:
        start, end = s["start"] / SAMPLE_RATE, s["end"] / SAMPLE_RATE
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        elif end > start:
            out.append((start, end))
    return out


def utterance_spans(
    regions: Sequence[tuple[float, float]],
    duration: float,
    *,
    min_sec: float,
    max_sec: float,
    pause_sec: float,
    cuts: Sequence[float] = (),
) -> list[tuple[float, float]]:
    """Utterances (start, end) from speech regions: neighbouring regions are joined while the silence
    between them is shorter than `pause_sec`, no cut (a speaker change) lies between them and the
    result stays within `max_sec`; a region longer than `max_sec` is split evenly; spans shorter than
    `min_sec` are left out (too short to train on). Ordered and non-overlapping, inside [0, duration]."""
    cut_list = sorted(c for c in cuts if 0.0 < c < duration)
    pieces: list[tuple[float, float]] = []
    for start, end in regions:
        start, end = max(0.0, start), min(duration, end)
        if end <= start:
            continue
        inner = [c for c in cut_list if start < c < end]
        bounds = [start, *inner, end]
        pieces.extend(zip(bounds[:-1], bounds[1:]))
    spans: list[tuple[float, float]] = []
    for start, end in pieces:
        if spans:
            s0, e0 = spans[-1]
            cut_between = any(e0 - 1e-6 <= c <= start + 1e-6 for c in cut_list)
            if start - e0 < pause_sec and not cut_between and end - s0 <= max_sec:
                spans[-1] = (s0, end)
                continue
        spans.append((start, end))
    out: list[tuple[float, float]] = []
    for start, end in spans:
        n = max(1, int(np.ceil((end - start) / max_sec - 1e-9)))
        step = (end - start) / n
        out.extend((start + i * step, start + (i + 1) * step if i < n - 1 else end) for i in range(n))
    return [(round(s, 3), round(e, 3)) for s, e in out if e - s >= min_sec]
