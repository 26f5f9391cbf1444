"""Transcript flags: a decoder loop or words over silence are flagged; a clean transcript is not."""

from __future__ import annotations

from pipeline.analysis.flags import HALLUCINATION, OVERLAP, quality_flags
from pipeline.records import Transcript, Word
from pipeline.transcribe import compression_ratio


def _t(text, words=()):
    return Transcript(text, "en", words=list(words), compression_ratio=compression_ratio(text))


def test_a_clean_transcript_has_no_flags():
    text = "And you always want to see it in the superlative degree."
    words = [Word(0.5 + 0.3 * i, 0.75 + 0.3 * i, w, 0.9) for i, w in enumerate(text.split())]
    assert quality_flags(_t(text, words), duration=4.0, speech_regions=[(0.4, 3.9)]) == []


def test_a_repetition_loop_is_suspected_hallucination():
    loop = "thank you for watching " * 6
    assert HALLUCINATION in quality_flags(_t(loop), duration=10.0, speech_regions=[(0.0, 10.0)])


def test_words_over_silence_are_suspected_hallucination():
    words = [Word(5.0 + i, 5.4 + i, w, 0.5) for i, w in enumerate("please subscribe to the channel".split())]
    flags = quality_flags(_t("please subscribe to the channel", words), duration=10.0, speech_regions=[(0.0, 2.0)])
    assert HALLUCINATION in flags
    assert HALLUCINATION in quality_flags(_t("hello there"), duration=3.0, speech_regions=[])


def test_more_words_than_one_voice_speaks_is_suspected_overlap():
    text = " ".join(["word"] * 2 + [f"w{i}" for i in range(30)])
    assert OVERLAP in quality_flags(_t(text), duration=4.0, speech_regions=[(0.0, 4.0)])
