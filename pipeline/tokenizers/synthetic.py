"""`synthetic`: the seed's GPU-bound stand-in tokenizer, made honest.

Codes are a deterministic function of the audio content (a replay yields identical tokens),
int16, 8 codebooks at 75 frames per second like EnCodec 24 kHz at 6 kbps, computed with torch
on the device. An optional simulated load (`METAVOICE_SYNTHETIC_LOAD_MS` per clip; the seed
burned ~200 ms of GPU per file) makes it a stand-in for a heavy model in benchmarks.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from ..audio import DecodedAudio
from ..config import Settings
from ..device import resolve_device
from . import register
from .base import AudioTokenizer

SAMPLE_RATE = 24_000
HOP = 320  # 75 Hz at 24 kHz
CODEBOOKS = 8
CODEBOOK_SIZE = 1024


class SyntheticTokenizer(AudioTokenizer):
    name = "synthetic"
    sample_rate = SAMPLE_RATE
    codebooks = CODEBOOKS
    frame_rate = SAMPLE_RATE / HOP

    def __init__(self, device: str = "cpu", load_ms: float = 0.0) -> None:
        self.device = device
        self.load_ms = load_ms
        g = torch.Generator().manual_seed(0x5EED)
        # A fixed random projection of each frame onto each codebook: deterministic by construction.
        self._projection = torch.randn(CODEBOOKS, HOP, generator=g).to(device)

    def encode_batch(self, clips: list[DecodedAudio]) -> list[np.ndarray]:
        if not clips:
            return []
        waves = [torch.from_numpy(c.view(self.layout)) for c in clips]
        frames = [max(1, math.ceil(w.shape[0] / HOP)) for w in waves]
        longest = max(frames)
        batch = torch.zeros(len(waves), longest * HOP)
        for i, w in enumerate(waves):
            batch[i, : w.shape[0]] = w
        with torch.inference_mode():
            x = batch.to(self.device).view(len(waves), longest, HOP)
            # Quantize the projections: same audio -> same codes on any device (rounded before hashing).
            proj = torch.einsum("bth,ch->bct", x, self._projection)
            q = torch.round(proj * 64).to(torch.int64)
            codes = (q * 2654435761 + torch.arange(CODEBOOKS, device=self.device).view(1, -1, 1) * 97) % CODEBOOK_SIZE
            self._simulate_load(len(clips))
            codes = codes.to(torch.int16).cpu().numpy()
        return [np.ascontiguousarray(codes[i, :, : frames[i]]) for i in range(len(clips))]

    def _simulate_load(self, n_clips: int) -> None:
        if self.load_ms <= 0:
            return
        deadline = time.perf_counter() + self.load_ms * n_clips / 1000.0
        a = torch.randn(256, 256, device=self.device)
        while time.perf_counter() < deadline:
            a = torch.tanh(a @ a)
        if self.device == "cuda":
            torch.cuda.synchronize()


@register("synthetic")
def _build(settings: Settings) -> AudioTokenizer:
    return SyntheticTokenizer(resolve_device(settings.device), settings.synthetic_load_ms)
