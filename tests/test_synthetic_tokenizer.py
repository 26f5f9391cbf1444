"""The seed's stand-in tokenizer, made honest: deterministic, int16, frames proportional to duration."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.audio import DecodedAudio
from pipeline.config import Settings
from pipeline.tokenizers import load_tokenizer


def clip(seconds: float, rate: int, channels: int = 1, seed: int = 0) -> DecodedAudio:
    rng = np.random.default_rng(seed)
    return DecodedAudio.from_samples(rng.standard_normal((int(seconds * rate), channels)).astype(np.float32) * 0.1, rate)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(Settings(tokenizer="synthetic", device="cpu"))


@pytest.mark.parametrize("seconds,rate", [(1.0, 16000), (2.5, 48000), (0.3, 44100), (7.0, 22050)])
def test_frames_follow_duration_at_75_hz(tok, seconds, rate):
    (codes,) = tok.encode_batch([clip(seconds, rate)])
    assert codes.dtype == np.int16 and codes.shape[0] == 8
    assert abs(codes.shape[1] - seconds * 75) <= 1
    assert codes.min() >= 0 and codes.max() < 1024


def test_same_audio_gives_the_same_tokens_alone_or_in_a_batch(tok):
    a, b = clip(1.2, 16000, seed=1), clip(3.0, 48000, 2, seed=2)
    together = tok.encode_batch([a, b])
    alone = [tok.encode_batch([a])[0], tok.encode_batch([b])[0]]
    for x, y in zip(together, alone):
        assert np.array_equal(x, y)


def test_different_audio_gives_different_tokens(tok):
    x, y = tok.encode_batch([clip(1.0, 16000, seed=1), clip(1.0, 16000, seed=2)])
    assert not np.array_equal(x, y)


def test_unknown_tokenizer_is_refused_at_start_up():
    with pytest.raises(ValueError, match="unknown tokenizer"):
        load_tokenizer(Settings(tokenizer="nope"))
