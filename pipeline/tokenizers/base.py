"""The one small interface every audio tokenizer implements.

A tokenizer turns decoded clips into integer codes shaped `[codebooks, frames]` (int16).
It works on whole batches so it can pad them onto the device once; it resamples clips to
its own rate itself, so callers hand it audio exactly as decoded.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from ..audio import DecodedAudio


class AudioTokenizer(ABC):
    #: what the Parquet `tokenizer` column says, e.g. "synthetic" or "encodec:facebook/encodec_24khz@6kbps"
    name: str
    #: codebooks per frame and frames per second of the codes this tokenizer emits
    codebooks: int
    frame_rate: float
    #: "cuda" or "cpu", resolved
    device: str

    @abstractmethod
    def encode_batch(self, clips: list[DecodedAudio]) -> list[np.ndarray]:
        """One int16 array `[codebooks, frames]` per clip, in order."""

    def decode(self, tokens: np.ndarray) -> tuple[np.ndarray, int]:
        """Audio `[frames]` and its rate reconstructed from codes, for codecs that can."""
        raise NotImplementedError(f"tokenizer {self.name!r} cannot reconstruct audio")

    def close(self) -> None:
        """Release device memory; safe to call twice."""
