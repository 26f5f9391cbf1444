"""Sample speech for the demo, the benchmark and the tests: espeak-ng speaks, sox converts.

Clips are FLAC at several sampling rates (one stereo), each with the text that was spoken,
so a transcript can be checked against what is really in the audio.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Speech data pipelines turn raw audio into training examples.",
    "Please call Stella and ask her to bring these things with her from the store.",
    "Kafka stores every event so the dataset can be rebuilt at any time.",
    "Six spoons of fresh snow peas, five thick slabs of blue cheese.",
    "We also need a small plastic snake and a big toy frog for the kids.",
    "The weather today is cloudy with a chance of light rain in the evening.",
    "Machine learning models learn patterns from large amounts of data.",
    "A journey of a thousand miles begins with a single step.",
    "She sells sea shells by the sea shore every summer morning.",
    "Parquet files keep columns together so reading them is fast.",
    "Good morning, this is a test of the transcription system.",
]

RATES = [48_000, 44_100, 24_000, 16_000, 22_050]


@dataclass(frozen=True)
class SampleClip:
    key: str
    path: Path
    text: str
    sample_rate: int
    channels: int


def require_tools() -> None:
    missing = [t for t in ("espeak-ng", "sox") if shutil.which(t) is None]
    if missing:
        raise RuntimeError(
            f"missing {', '.join(missing)}: install with `apt-get install -y espeak-ng sox flac`"
        )


def speak_to_flac(text: str, out: Path, rate: int, channels: int = 1, speed_wpm: int = 160) -> Path:
    """Synthesize `text` into a FLAC file at `rate` Hz with `channels` channels."""
    require_tools()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "speech.wav"
        subprocess.run(["espeak-ng", "-s", str(speed_wpm), "-w", str(wav), text], check=True, capture_output=True)
        subprocess.run(
            ["sox", str(wav), "-r", str(rate), "-c", str(channels), "-b", "16", str(out)],
            check=True,
            capture_output=True,
        )
    return out


def make_corpus(directory: Path, count: int, *, prefix: str = "clips/", repeat_to_seconds: float = 0.0) -> list[SampleClip]:
    """`count` clips cycling through sentences and rates; clip 1 is stereo.

    `repeat_to_seconds` > 0 repeats sentences inside a clip to vary lengths (benchmarks).
    """
    clips = []
    for i in range(count):
        text = SENTENCES[i % len(SENTENCES)]
        if repeat_to_seconds > 0:
            # ~2.6 s per sentence at 160 wpm; grow clip i towards a length in [2, repeat_to_seconds]
            reps = 1 + (i * 7919) % max(1, int(repeat_to_seconds / 2.6))
            text = " ".join(SENTENCES[(i + j) % len(SENTENCES)] for j in range(reps))
        rate = RATES[i % len(RATES)]
        channels = 2 if i % 12 == 1 else 1
        key = f"{prefix}clip-{i:05d}.flac"
        path = speak_to_flac(text, directory / key, rate, channels)
        clips.append(SampleClip(key, path, text, rate, channels))
    return clips


def word_overlap(reference: str, hypothesis: str) -> float:
    """Share of the reference's words found in the hypothesis (case and punctuation ignored)."""
    ref = normalize_words(reference)
    hyp = set(normalize_words(hypothesis))
    if not ref:
        return 1.0
    return sum(1 for w in ref if w in hyp) / len(ref)


def normalize_words(text: str) -> list[str]:
    return ["".join(ch for ch in w.lower() if ch.isalnum()) for w in text.split() if any(c.isalnum() for c in w)]
