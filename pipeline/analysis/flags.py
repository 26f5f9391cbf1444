"""Flags on a transcript that a dataset filter can drop: `hallucination_suspected`, `overlap_suspected`."""

from __future__ import annotations

from collections import Counter

from ..records import Transcript
from ..transcribe import SUSPICIOUS_COMPRESSION_RATIO

HALLUCINATION = "hallucination_suspected"
OVERLAP = "overlap_suspected"

REPEATED_NGRAM = 3  # a 3-word phrase said this often in one clip is usually a decoder loop
REPEATS_MAX = 3
UNSUPPORTED_WORDS_MAX = 0.5  # share of words with no VAD speech under them
# Two people talking at once make Whisper pack words faster than one person speaks (~2-4 words/s).
WORDS_PER_SPEECH_SECOND_MAX = 6.0


def _inside(t: float, regions: list[tuple[float, float]], slack: float = 0.2) -> bool:
    return any(s - slack <= t <= e + slack for s, e in regions)


def quality_flags(transcript: Transcript, *, duration: float, speech_regions: list[tuple[float, float]]) -> list[str]:
    """Heuristic flags (sorted); times of `transcript.words` and `speech_regions` are in the same clip's seconds."""
    flags: set[str] = set()
    words = transcript.text.lower().split()
    if transcript.compression_ratio is not None and transcript.compression_ratio > SUSPICIOUS_COMPRESSION_RATIO:
        flags.add(HALLUCINATION)
    grams = Counter(tuple(words[i : i + REPEATED_NGRAM]) for i in range(len(words) - REPEATED_NGRAM + 1))
    if grams and max(grams.values()) >= REPEATS_MAX:
        flags.add(HALLUCINATION)
    if words and not speech_regions:
        flags.add(HALLUCINATION)
    timed = transcript.words
    if len(timed) >= 3 and speech_regions:
        unsupported = sum(not _inside((w.start + w.end) / 2, speech_regions) for w in timed)
        if unsupported / len(timed) > UNSUPPORTED_WORDS_MAX:
            flags.add(HALLUCINATION)
    speech = sum(e - s for s, e in speech_regions)
    if speech >= 1.0 and len(words) / speech > WORDS_PER_SPEECH_SECOND_MAX:
        flags.add(OVERLAP)
    return sorted(flags)
