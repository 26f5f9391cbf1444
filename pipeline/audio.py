"""Decode: bytes of an audio object -> float32 samples at native rate, plus the views models need.

FLAC and everything else libsndfile reads are accepted. Native rate and channel count are kept
for metadata; `to_mono` and `resample` give models the layout they expect (soxr, high quality).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import soxr

from .errors import DurationOutOfRange, EmptyObject, NotAudio

WHISPER_SAMPLE_RATE = 16_000


@dataclass(slots=True)
class DecodedAudio:
    samples: np.ndarray  # float32, shape [frames, channels]
    sample_rate: int

    @property
    def channels(self) -> int:
        return int(self.samples.shape[1])

    @property
    def duration_sec(self) -> float:
        return self.samples.shape[0] / float(self.sample_rate)

    def mono(self) -> np.ndarray:
        return to_mono(self.samples)

    def at_rate(self, rate: int, *, mono: bool = True) -> np.ndarray:
        """Samples resampled to `rate`: [frames] when mono, else [frames, channels]."""
        data = self.mono() if mono else self.samples
        return resample(data, self.sample_rate, rate)


def decode_audio(data: bytes) -> DecodedAudio:
    if not data:
        raise EmptyObject("object is empty (0 bytes)")
    try:
        samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise NotAudio(f"not readable audio: {exc}") from None
    if samples.shape[0] == 0:
        raise NotAudio("audio holds no samples")
    if not np.isfinite(samples).all():
        raise NotAudio("audio holds NaN or infinite samples")
    return DecodedAudio(np.ascontiguousarray(samples), int(rate))


def check_duration(audio: DecodedAudio, min_sec: float, max_sec: float) -> None:
    d = audio.duration_sec
    if d < min_sec:
        raise DurationOutOfRange(f"duration {d:.3f}s is shorter than the minimum {min_sec}s")
    if d > max_sec:
        raise DurationOutOfRange(f"duration {d:.3f}s is longer than the maximum {max_sec}s")


def to_mono(samples: np.ndarray) -> np.ndarray:
    if samples.ndim == 1:
        return samples
    if samples.shape[1] == 1:
        return samples[:, 0]
    return samples.mean(axis=1, dtype=np.float32)


def resample(samples: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    if from_rate == to_rate:
        return np.ascontiguousarray(samples, dtype=np.float32)
    return soxr.resample(samples, from_rate, to_rate, quality="HQ").astype(np.float32, copy=False)
