"""Speech regions from Silero VAD (faster-whisper's bundled `silero_vad_v6.onnx`), and utterances cut from them.

With a transcript (the WhisperX way): the regions are joined into Whisper windows (`utterance_spans`
up to 30 s, never across a long pause), each window is decoded once with word times, and the
utterances are cut between words (`word_utterances`): at pauses, at speaker changes and at the
maximum length. An utterance's text is its words from the window's decode, never a re-decode of a
short crop (a 1.6 s crop loses its context: WER 0.31 against 0.16 for the whole call). Without a
transcript, `utterance_spans` cuts the regions themselves."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

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


class Timed(Protocol):
    start: float
    end: float


W = TypeVar("W", bound=Timed)


def _mid(w: Timed) -> float:
    return (w.start + w.end) / 2


# A change point from the speaker encoder's sliding windows is placed to about its hop (0.8 s); people
# take turns between words, so a turn goes to the widest gap between words that near it.
TURN_TOLERANCE_SEC = 0.8


def _turn_gaps(words: Sequence[Timed], cuts: Sequence[float]) -> set[int]:
    """Indices i of the gaps (between words i and i+1) where a speaker turn falls: for each change
    point the widest gap whose middle is within `TURN_TOLERANCE_SEC` of it (the nearest on a tie),
    else the gap between the words whose middles straddle it."""
    out: set[int] = set()
    for c in cuts:
        near = [i for i in range(len(words) - 1)
                if abs((words[i].end + words[i + 1].start) / 2 - c) <= TURN_TOLERANCE_SEC]
        if near:
            out.add(max(near, key=lambda i: (round(words[i + 1].start - words[i].end, 3),
                                             -abs((words[i].end + words[i + 1].start) / 2 - c))))
        else:
            out.update(i for i in range(len(words) - 1) if _mid(words[i]) < c <= _mid(words[i + 1]))
    return out


def word_utterances(
    window: tuple[float, float],
    words: Sequence[W],
    *,
    min_sec: float,
    max_sec: float,
    pause_sec: float,
    cuts: Sequence[float] = (),
) -> list[tuple[float, float, list[W]]]:
    """Utterances (start, end, their words) of one decoded window; times absolute, words in order.

    Words are grouped until a pause of `pause_sec` between two words, a speaker change (`_turn_gaps`)
    or `max_sec`. The window's edges bound the first and last utterance; inner bounds lie midway
    between the words.
    A group shorter than `min_sec` joins the neighbour across the smaller gap between words (a turn
    that short is below what the speaker encoder's 1.6 s windows resolve) unless that would exceed
    `max_sec`. A window without words is one utterance (speech the VAD found, Whisper did not)."""
    ws, we = window
    if not words:
        return [(ws, we, [])]
    turns = _turn_gaps(words, cuts)
    groups: list[list[W]] = [[words[0]]]
    gaps: list[float] = []  # gap between the words either side of each bound
    for i, (prev, w) in enumerate(zip(words, words[1:])):
        if w.start - prev.end >= pause_sec or i in turns or w.end - groups[-1][0].start > max_sec:
            groups.append([w])
            gaps.append(w.start - prev.end)
        else:
            groups[-1].append(w)
    bounds = [ws, *(min(we, max(ws, (a[-1].end + b[0].start) / 2)) for a, b in zip(groups, groups[1:])), we]
    spans = [[bounds[i], bounds[i + 1], g] for i, g in enumerate(groups)]
    while len(spans) > 1:
        short = [i for i, (a, b, _) in enumerate(spans) if b - a < min_sec]
        merged = False
        for i in sorted(short, key=lambda i: spans[i][1] - spans[i][0]):
            sides = [j for j in (i - 1, i + 1) if 0 <= j < len(spans)
                     and max(spans[i][1], spans[j][1]) - min(spans[i][0], spans[j][0]) <= max_sec]
            if not sides:
                continue
            j = min(sides, key=lambda j: gaps[min(i, j)])
            lo, hi = min(i, j), max(i, j)
            spans[lo : hi + 1] = [[spans[lo][0], spans[hi][1], spans[lo][2] + spans[hi][2]]]
            del gaps[lo]
            merged = True
            break
        if not merged:
            break
    out = []
    for a, b, g in spans:
        if b - a > max_sec:  # the silence around the words goes first
            a = max(a, g[0].start)
            b = min(b, a + max_sec)
        out.append((a, b, g))
    return out


def widen(spans: Sequence[tuple[float, float]], min_sec: float, duration: float) -> list[tuple[float, float]]:
    """Spans shorter than `min_sec` grown evenly into the audio around them (a lone "Yeah." between
    pauses), never past the file or into a neighbour (to the right, half the gap at most, so the
    neighbour can grow too); ordered spans stay ordered and non-overlapping."""
    out: list[tuple[float, float]] = []
    for i, (a, b) in enumerate(spans):
        need = min_sec - (b - a)
        if need > 0:
            left_room = a - (out[-1][1] if out else 0.0)
            right_room = ((spans[i + 1][0] - b) / 2) if i + 1 < len(spans) else duration - b
            grow_left = min(left_room, max(need / 2, need - right_room))
            grow_right = min(right_room, need - grow_left)
            a, b = a - grow_left, b + grow_right
        out.append((a, b))
    return out
