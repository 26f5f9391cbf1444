"""The one small interface every audio tokenizer implements.

A tokenizer turns decoded clips into integer codes shaped `[codebooks, frames]` (int16).
It works on whole batches so it can pad them onto the device once. It reads each clip in its own
`layout` (rate and channels), which it declares so decode makes that view in its single streaming
pass (`audio.DecodeSpec`): callers hand it clips exactly as decoded.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from ..audio import AudioLayout, DecodedAudio


class AudioTokenizer(ABC):
    #: what the Parquet `tokenizer` column says, e.g. "synthetic" or "encodec:facebook/encodec_24khz@6kbps"
    name: str
    #: codebooks per frame and frames per second of the codes this tokenizer emits
    codebooks: int
    frame_rate: float
    #: "cuda" or "cpu", resolved
    device: str
    #: the samples it reads: rate and channel count (1: the mono downmix)
    sample_rate: int
    channels: int = 1

    @property
    def layout(self) -> AudioLayout:
        """The view of each clip it reads; decode must be asked for it."""
        return AudioLayout(self.sample_rate, self.channels)

    @abstractmethod
    def encode_batch(self, clips: list[DecodedAudio]) -> list[np.ndarray]:
        """One int16 array `[codebooks, frames]` per clip, in order."""

    def decode(self, tokens: np.ndarray) -> tuple[np.ndarray, int]:
        """Audio `[frames]` and its rate reconstructed from codes, for codecs that can."""
        raise NotImplementedError(f"tokenizer {self.name!r} cannot reconstruct audio")

    def close(self) -> None:
        """Release device memory; safe to call twice."""
